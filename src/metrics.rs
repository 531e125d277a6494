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
