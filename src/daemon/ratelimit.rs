//! A log line limit: a flood of bad messages must not become a flood of log lines (journald
//! would rate-limit the whole service and hide the one line that matters). Its own module
//! because both the router and the shared state use it, and neither should import the other.

use std::time::{Duration, Instant};

/// At most `burst` log lines per `period`; the rest are counted and summarised.
pub struct RateLimitedLog {
    period: Duration,
    burst: u32,
    window_start: Instant,
    in_window: u32,
    suppressed: u64,
}

impl RateLimitedLog {
    pub fn new(burst: u32, period: Duration) -> Self {
        RateLimitedLog {
            period,
            burst,
            window_start: Instant::now(),
            in_window: 0,
            suppressed: 0,
        }
    }

    pub fn warn(&mut self, msg: std::fmt::Arguments) {
        if self.window_start.elapsed() >= self.period {
            if self.suppressed > 0 {
                tracing::warn!("{} more rejected messages were not logged", self.suppressed);
            }
            self.window_start = Instant::now();
            self.in_window = 0;
            self.suppressed = 0;
        }
        if self.in_window < self.burst {
            self.in_window += 1;
            tracing::warn!("{msg}");
        } else {
            self.suppressed += 1;
        }
    }

    /// As [`warn`](Self::warn), at ERROR, for a failure that repeats (a checkpoint that
    /// cannot be written, every save): the first ones are logged, then one line a period
    /// says how many more there were.
    pub fn error(&mut self, msg: std::fmt::Arguments) {
        if self.window_start.elapsed() >= self.period {
            if self.suppressed > 0 {
                tracing::error!("{} more like it were not logged", self.suppressed);
            }
            self.window_start = Instant::now();
            self.in_window = 0;
            self.suppressed = 0;
        }
        if self.in_window < self.burst {
            self.in_window += 1;
            tracing::error!("{msg}");
        } else {
            self.suppressed += 1;
        }
    }
}
