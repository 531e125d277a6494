//! A log line limit: a flood of bad messages must not become a flood of log lines (journald
//! would rate-limit the whole service and hide the one line that matters). Its own module
//! because both the router and the shared state use it, and neither should import the other.
//! Each line is also cut to [`MAX_LINE_BYTES`], so a line that quotes what a client sent
//! cannot carry the whole of it into the log.

use std::time::{Duration, Instant};

/// The longest line a limited log writes; the rest is replaced by its length.
pub const MAX_LINE_BYTES: usize = 512;

/// At most `burst` log lines per `period`; the rest are counted and summarised.
pub struct RateLimitedLog {
    period: Duration,
    burst: u32,
    window_start: Instant,
    in_window: u32,
    suppressed: u64,
    /// What the lines are about, for the summary ("rejected messages").
    what: &'static str,
}

impl RateLimitedLog {
    pub fn new(burst: u32, period: Duration) -> Self {
        RateLimitedLog {
            period,
            burst,
            window_start: Instant::now(),
            in_window: 0,
            suppressed: 0,
            what: "rejected messages",
        }
    }

    /// Names what the lines are about in the summary of those not logged.
    pub fn about(mut self, what: &'static str) -> Self {
        self.what = what;
        self
    }

    pub fn warn(&mut self, msg: std::fmt::Arguments) {
        let (untold, admitted) = self.admit();
        if let Some(n) = untold {
            tracing::warn!("{n} more {} were not logged", self.what);
        }
        if admitted {
            tracing::warn!("{}", excerpt(msg));
        }
    }

    pub fn info(&mut self, msg: std::fmt::Arguments) {
        let (untold, admitted) = self.admit();
        if let Some(n) = untold {
            tracing::info!("{n} more {} were not logged", self.what);
        }
        if admitted {
            tracing::info!("{}", excerpt(msg));
        }
    }

    /// Whether the next line may be written, and the count of those that were not in the
    /// window just ended, if any.
    fn admit(&mut self) -> (Option<u64>, bool) {
        let mut untold = None;
        if self.window_start.elapsed() >= self.period {
            if self.suppressed > 0 {
                untold = Some(self.suppressed);
            }
            self.window_start = Instant::now();
            self.in_window = 0;
            self.suppressed = 0;
        }
        if self.in_window < self.burst {
            self.in_window += 1;
            (untold, true)
        } else {
            self.suppressed += 1;
            (untold, false)
        }
    }

    /// As [`warn`](Self::warn), at ERROR, for a failure that repeats (a checkpoint that
    /// cannot be written, every save): the first ones are logged, then one line a period
    /// says how many more there were.
    pub fn error(&mut self, msg: std::fmt::Arguments) {
        let (untold, admitted) = self.admit();
        if let Some(n) = untold {
            tracing::error!("{n} more {} were not logged", self.what);
        }
        if admitted {
            tracing::error!("{}", excerpt(msg));
        }
    }
}

/// The line, cut to [`MAX_LINE_BYTES`] at a character boundary.
pub fn excerpt(msg: std::fmt::Arguments) -> String {
    let mut line = msg.to_string();
    if line.len() > MAX_LINE_BYTES {
        let total = line.len();
        let mut cut = MAX_LINE_BYTES;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push_str(&format!("… (cut, {total} bytes in all)"));
    }
    line
}
