//! systemd's notify protocol through the `sd-notify` crate: READY, STATUS, WATCHDOG and
//! STOPPING. Without $NOTIFY_SOCKET every call is a no-op, so the daemon runs the same
//! outside systemd.

use std::time::Duration;

pub use sd_notify::NotifyState;

/// Sends the states; errors are logged at debug only because systemd may simply not be there.
pub fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("sd_notify {states:?}: {e}");
    }
}

/// A human-readable STATUS= line (what `systemctl status` shows).
pub fn status(text: &str) {
    notify(&[NotifyState::Status(text)]);
}

/// The watchdog period systemd asked for (WATCHDOG_USEC, for this PID), if any.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}
