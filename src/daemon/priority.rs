//! Training yields the CPU to inference. A student step is CPU-bound for a millisecond or more,
//! and on a small board (two cores here) the training thread competes with the inference
//! thread, the ingest thread, the MQTT task and the broker for a core. The scheduler shares a
//! core fairly between equals, which shows as prediction latency and a lower saturated rate.
//! So the training thread and the checkpoint writer run at a higher nice value than the rest
//! of the daemon: inference gets most of a core it shares with training, training gets every
//! cycle inference leaves idle, and no lock is involved. Measured with `cargo bench --bench
//! daemon` (README): the saturated rate with training on went from 0.77 to 0.83 of training
//! off (medians of three runs); what holds back the rest is not established yet. Linux keeps
//! a nice value per thread, so only the calling thread is lowered (threads it starts
//! afterwards inherit its value).
//!
//! The value is relative to the daemon's own, so a daemon started with `nice` or systemd's
//! `Nice=` keeps inference where the operator put it; it is never raised (that would need
//! privileges). Failing to lower it is a warning, not an error: the daemon works as before,
//! with training competing as an equal. The shipped unit allows `setpriority` back from
//! `@resources`, whose other calls stay filtered.

/// How many nice levels below the daemon's own the background threads run. Each level is
/// about 1.25x less CPU weight, so +10 gives a busy training thread about a tenth of a core
/// that inference also wants, and all of one that inference leaves idle.
pub const BACKGROUND_NICE_INCREMENT: i32 = 10;

/// The largest nice value Linux accepts (lowest priority).
const NICE_MAX: i32 = 19;

/// Lowers the calling thread's CPU priority by [`BACKGROUND_NICE_INCREMENT`] nice levels;
/// `what` names the thread in the warning logged if the system refuses.
pub fn lower_current_thread(what: &str) {
    match set_background(BACKGROUND_NICE_INCREMENT) {
        Ok(nice) => tracing::debug!("{what} thread runs at nice {nice}"),
        Err(e) => tracing::warn!(
            "could not lower the {what} thread's CPU priority ({e}); it competes with inference as an equal"
        ),
    }
}

/// Sets the calling thread's nice value `increment` above the daemon's own (its main thread's,
/// which is what `nice` or `Nice=` set), capped at [`NICE_MAX`], and returns it. Relative to
/// the main thread rather than to the calling thread, so a thread started by an already
/// lowered one is not lowered twice.
#[cfg(target_os = "linux")]
fn set_background(increment: i32) -> std::io::Result<i32> {
    let daemon = main_thread_nice()?;
    let wanted = daemon.saturating_add(increment).min(NICE_MAX);
    // SAFETY: setpriority takes plain integers and touches no memory of ours. With
    // PRIO_PROCESS and who = 0 Linux changes the calling thread only (nice is per thread
    // there, whatever POSIX says).
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, wanted) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(wanted)
}

/// The main thread's nice value: field 19 of /proc/self/stat, counted after the command name
/// (which is in parentheses and may itself hold spaces or parentheses).
#[cfg(target_os = "linux")]
fn main_thread_nice() -> std::io::Result<i32> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(19 - 3))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "no nice value in /proc/self/stat",
            )
        })
}

#[cfg(not(target_os = "linux"))]
fn set_background(_increment: i32) -> std::io::Result<i32> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "per-thread nice values are Linux's",
    ))
}
