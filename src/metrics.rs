//! Process-level measurements (resident memory) shared by replay reports and daemon metrics.

/// Reads a `kB` field of /proc/self/status, in bytes (0 where /proc is unavailable).
fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Peak resident set size of this process so far.
pub fn peak_rss_bytes() -> u64 {
    status_kb("VmHWM:")
}

/// Current resident set size.
pub fn rss_bytes() -> u64 {
    status_kb("VmRSS:")
}

/// Recent latencies in microseconds; percentiles are taken over what arrived since the last
/// report (bounded: the newest `capacity` values are kept).
#[derive(Debug)]
pub struct LatencyWindow {
    values: Vec<u32>,
    capacity: usize,
    next: usize,
    scratch: Vec<u32>,
}

impl LatencyWindow {
    pub fn new(capacity: usize) -> Self {
        LatencyWindow {
            values: Vec::with_capacity(capacity),
            capacity,
            next: 0,
            scratch: Vec::with_capacity(capacity),
        }
    }

    pub fn record(&mut self, micros: u64) {
        let v = micros.min(u32::MAX as u64) as u32;
        if self.values.len() < self.capacity {
            self.values.push(v);
        } else {
            self.values[self.next] = v;
            self.next = (self.next + 1) % self.capacity;
        }
    }

    /// (p50, p99) of the values since the last call, then forgets them.
    pub fn take_percentiles(&mut self) -> Option<(u32, u32)> {
        if self.values.is_empty() {
            return None;
        }
        self.scratch.clear();
        self.scratch.extend_from_slice(&self.values);
        self.values.clear();
        self.next = 0;
        self.scratch.sort_unstable();
        let at = |q: f64| self.scratch[((self.scratch.len() - 1) as f64 * q).round() as usize];
        Some((at(0.50), at(0.99)))
    }
}
