//! The write budget: how many checkpoint bytes a day the disk takes, and the writer that keeps
//! to it.
//!
//! An SD card wears by the bytes written to it, so saves are paced by a token bucket:
//! `[checkpoint] max_mib_per_day` refills it evenly over the day, and it holds at most an
//! hour's worth (or one checkpoint, if that is bigger), so a burst of saves cannot spend a
//! day's budget at once and the saves of a saturated learner come evenly spaced. A due save the
//! budget does not allow is *deferred*, not lost: the [`CheckpointWriter`] keeps the newest
//! deferred state and writes it as soon as the budget allows, and the final save at shutdown
//! always goes through (charged against the budget like any other: a clean stop is rare, and
//! its state is the one a restart resumes from). The budget is counted from start-up.

use std::time::Instant;

use super::store::CheckpointStore;
use super::{CheckpointError, Manifest, Saved};

/// A day, the period the budget is stated for.
const DAY_S: f64 = 86_400.0;

/// The bucket holds this share of a day's budget: an hour's worth.
const BURST_SHARE: f64 = 1.0 / 24.0;

/// Checkpoint bytes allowed over time: a token bucket in bytes.
#[derive(Debug, Clone)]
pub struct WriteBudget {
    /// Refill, in bytes per second.
    rate: f64,
    /// Most bytes the bucket holds.
    capacity: f64,
    /// Bytes available now; negative after a save that was let through without the budget.
    balance: f64,
    at: Instant,
}

impl WriteBudget {
    /// A full bucket for `mib_per_day` MiB a day.
    pub fn new(mib_per_day: f64, now: Instant) -> Self {
        let per_day = mib_per_day.max(0.0) * 1024.0 * 1024.0;
        let capacity = per_day * BURST_SHARE;
        WriteBudget {
            rate: per_day / DAY_S,
            capacity,
            balance: capacity,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.balance = (self.balance + dt * self.rate).min(self.capacity);
        self.at = self.at.max(now);
    }

    /// Whether a write of `bytes` fits now. A checkpoint bigger than the bucket fits when
    /// the bucket is full, so a big model still saves, at the budget's pace.
    pub fn allows(&mut self, bytes: u64, now: Instant) -> bool {
        self.refill(now);
        self.balance >= (bytes as f64).min(self.capacity)
    }

    /// Takes `bytes` from the budget (the balance may go below zero).
    pub fn charge(&mut self, bytes: u64, now: Instant) {
        self.refill(now);
        self.balance -= bytes as f64;
    }

    /// Seconds until a write of `bytes` fits (0 when it fits now).
    pub fn wait_s(&mut self, bytes: u64, now: Instant) -> f64 {
        self.refill(now);
        let missing = (bytes as f64).min(self.capacity) - self.balance;
        if missing <= 0.0 {
            0.0
        } else if self.rate > 0.0 {
            missing / self.rate
        } else {
            f64::INFINITY
        }
    }
}

/// What became of a state offered to the [`CheckpointWriter`].
#[derive(Debug)]
pub enum Offered {
    /// Written now.
    Written(Box<Manifest>),
    /// Kept until the budget allows it (replacing an older deferred state, if any).
    Deferred { wait_s: f64 },
}

/// Running totals of a writer, for metrics and reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterTotals {
    /// Checkpoints written.
    pub written: u64,
    /// Bytes they took on disk (tensor files and manifests).
    pub bytes: u64,
    /// Due saves the budget deferred.
    pub deferred: u64,
}

/// A [`CheckpointStore`] behind a [`WriteBudget`]: what replay and the daemon's writer thread
/// save through.
pub struct CheckpointWriter {
    store: CheckpointStore,
    budget: WriteBudget,
    pending: Option<Saved>,
    totals: WriterTotals,
}

impl CheckpointWriter {
    pub fn new(store: CheckpointStore, mib_per_day: f64, now: Instant) -> Self {
        CheckpointWriter {
            store,
            budget: WriteBudget::new(mib_per_day, now),
            pending: None,
            totals: WriterTotals::default(),
        }
    }

    pub fn store(&self) -> &CheckpointStore {
        &self.store
    }

    pub fn totals(&self) -> WriterTotals {
        self.totals
    }

    /// Whether a deferred state waits for the budget.
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// The next checkpoint's expected size: the last one's (0 before the first: the first
    /// save is let through and teaches the size).
    fn estimate(&self) -> u64 {
        self.store.last_bytes().unwrap_or(0)
    }

    /// Saves `saved` now if the budget allows it, else keeps it (the newest wins) for
    /// [`poll`](Self::poll) or [`finish`](Self::finish).
    pub fn offer(&mut self, saved: Saved, now: Instant) -> Result<Offered, CheckpointError> {
        let estimate = self.estimate();
        if self.budget.allows(estimate, now) {
            self.pending = None;
            return self
                .write(&saved, now)
                .map(|m| Offered::Written(Box::new(m)));
        }
        self.totals.deferred += 1;
        self.pending = Some(saved);
        Ok(Offered::Deferred {
            wait_s: self.budget.wait_s(estimate, now),
        })
    }

    /// Writes the deferred state, if there is one and the budget now allows it.
    pub fn poll(&mut self, now: Instant) -> Option<Result<Manifest, CheckpointError>> {
        if self.pending.is_none() || !self.budget.allows(self.estimate(), now) {
            return None;
        }
        let saved = self.pending.take()?;
        Some(self.write(&saved, now))
    }

    /// The last save before stopping: `last` (else the deferred state) is written whatever
    /// the budget says.
    pub fn finish(
        &mut self,
        last: Option<Saved>,
        now: Instant,
    ) -> Option<Result<Manifest, CheckpointError>> {
        let saved = last.or_else(|| self.pending.take())?;
        self.pending = None;
        Some(self.write(&saved, now))
    }

    fn write(&mut self, saved: &Saved, now: Instant) -> Result<Manifest, CheckpointError> {
        let manifest = self.store.save(saved)?;
        let bytes = self.store.last_bytes().unwrap_or(0);
        self.budget.charge(bytes, now);
        self.totals.written += 1;
        self.totals.bytes += bytes;
        Ok(manifest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn a_full_bucket_holds_an_hour_of_the_daily_budget_and_refills_evenly() {
        let t0 = Instant::now();
        // 24 MiB a day: 1 MiB an hour, the bucket holds 1 MiB.
        let mut b = WriteBudget::new(24.0, t0);
        assert!(b.allows(MIB / 2, t0));
        b.charge(MIB / 2, t0);
        assert!(b.allows(MIB / 2, t0));
        b.charge(MIB / 2, t0);
        assert!(!b.allows(MIB / 2, t0), "the hour's worth is spent");
        let half_hour = t0 + Duration::from_secs(1800);
        assert!(
            b.allows(MIB / 2, half_hour),
            "half an hour refills half a MiB"
        );
        assert!((b.wait_s(MIB, half_hour) - 1800.0).abs() < 1.0);
        // Idle for days, it still holds one hour's worth only.
        let later = t0 + Duration::from_secs(5 * 86_400);
        b.charge(MIB, later);
        assert!(!b.allows(1, later));
    }

    #[test]
    fn a_checkpoint_bigger_than_the_bucket_is_let_through_when_it_is_full() {
        let t0 = Instant::now();
        let mut b = WriteBudget::new(24.0, t0);
        assert!(b.allows(3 * MIB, t0));
        b.charge(3 * MIB, t0);
        // 3 MiB at 1 MiB an hour: the next one waits three hours (two to repay, one to fill).
        assert!(!b.allows(3 * MIB, t0 + Duration::from_secs(2 * 3600 + 3000)));
        assert!(b.allows(3 * MIB, t0 + Duration::from_secs(3 * 3600)));
    }
}
