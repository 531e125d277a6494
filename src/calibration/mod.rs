//! Mounting calibration: undoing a sensor worn rotated, flipped or on the other side of the
//! body by re-orienting every declared 3-axis channel group with one of the 48 signed axis
//! permutations (90° rotations and mirrors), before the model sees the sample.
//!
//! Its parts, each leaning only on the ones before it:
//! - this file: the `[calibration]` section ([`CalibrationConfig`]) and its checks;
//! - [`mounting`]: the candidates ([`SignedPerm`]), applying one to a flat sample
//!   ([`Mounting`]), and the adopted mounting as checkpoints and exports keep it
//!   ([`MountingRecord`]);
//! - [`search`]: the label-free score ([`infomax`]) and the search/adoption state machine
//!   ([`Calibrator`]). It never runs a model: the caller hands [`Calibrator::search`] and
//!   [`Calibrator::label`] a closure that predicts a batch with the *frozen pretrained*
//!   model, so the score measures the mounting and not whatever the adapting head has
//!   learned.
//!
//! Accelerometer-like groups are polar vectors (`v' = R·v`); gyroscope and magnetometer
//! groups are axial vectors, which a mirror flips once more (`v' = det(R)·R·v`). A search
//! proposes the candidate whose predictions carry the most information about the class
//! (information maximization); only labels adopt it, since a label is a clean test of a
//! frozen model: the log-likelihood ratio against the current mounting must reach
//! `adopt_log_ratio`. An adopted mounting is reverted to identity when the same statistic
//! against identity later falls below `-adopt_log_ratio`.

pub mod mounting;
pub mod search;

pub use mounting::{Mounting, MountingRecord, SignedPerm};
pub use search::{infomax, CalibrationEvent, Calibrator, ADOPTED_SEARCH_SLOWDOWN, LABELED_KEPT};

/// Fewer recent samples than this make the information score meaningless (streams arrive in
/// long single-activity segments).
pub const MIN_WINDOW: usize = 32;

/// `[calibration]`: which channels are 3-axis vectors and how eagerly to re-orient them.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CalibrationConfig {
    /// Channel indices (into the input's channel axis) of accelerometer-like groups.
    pub polar: Vec<[usize; 3]>,
    /// Channel indices of gyroscope/magnetometer groups.
    pub axial: Vec<[usize; 3]>,
    /// Recent samples a search scores.
    pub window: usize,
    /// New samples between searches while nothing is adopted.
    pub search_every: usize,
    /// Log-likelihood ratio (nats) the labels must show to adopt, or against, to revert.
    pub adopt_log_ratio: f32,
}

impl Default for CalibrationConfig {
    fn default() -> Self {
        CalibrationConfig {
            polar: Vec::new(),
            axial: Vec::new(),
            window: 256,
            search_every: 256,
            // ≈ ln 20: the labels make the candidate 20 times likelier than the current one.
            adopt_log_ratio: 3.0,
        }
    }
}

impl CalibrationConfig {
    /// Calibration runs only when at least one group is declared.
    pub fn enabled(&self) -> bool {
        !self.polar.is_empty() || !self.axial.is_empty()
    }

    /// Checks the groups against an input with `channels` channels and the numeric knobs.
    pub fn validate(&self, channels: usize) -> Result<(), String> {
        let mut seen: Vec<(usize, String)> = Vec::new();
        let groups = self
            .polar
            .iter()
            .map(|g| ("polar", g))
            .chain(self.axial.iter().map(|g| ("axial", g)));
        for (kind, group) in groups {
            let label = format!("{kind} group {group:?}");
            for &c in group {
                if c >= channels {
                    return Err(format!(
                        "{label} names channel {c}, but the input has {channels} channels (0..{channels})"
                    ));
                }
                if let Some((_, first)) = seen.iter().find(|(s, _)| *s == c) {
                    return Err(if *first == label {
                        format!("{label} names channel {c} twice")
                    } else {
                        format!("channel {c} is in both {first} and {label}")
                    });
                }
                seen.push((c, label.clone()));
            }
        }
        if self.window < MIN_WINDOW {
            return Err(format!(
                "window must be at least {MIN_WINDOW} samples, got {}",
                self.window
            ));
        }
        if self.search_every < 1 {
            return Err("search_every must be at least 1".into());
        }
        if !(self.adopt_log_ratio.is_finite() && self.adopt_log_ratio > 0.0) {
            return Err(format!(
                "adopt_log_ratio must be finite and positive, got {}",
                self.adopt_log_ratio
            ));
        }
        Ok(())
    }
}
