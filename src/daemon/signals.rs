//! The signals that stop the daemon, watched from before anything connects.
//!
//! The signals a person or a tool might send edgemt (SIGTERM, SIGINT, SIGHUP, SIGUSR1,
//! SIGUSR2, SIGQUIT, SIGALRM), all of which would end the process by default, are each a
//! clean stop: no new input, the current step finished, a final checkpoint, the final metrics
//! and the retained `offline` status. A process killed on the
//! spot by a stray signal loses every step since the last checkpoint and leaves `online`
//! until the broker's keep-alive runs out, which is worse than any meaning the signal might
//! have had. SIGHUP does not reload: the model, the broker connection and the learner's state
//! cannot be swapped in place soundly, so a changed config needs a restart (which resumes
//! from the final checkpoint).
//!
//! [`StopSignals::register`] installs the handlers at once (tokio replaces the default action
//! as it registers), so `edgemt run` calls it right after reading its config: a signal that
//! arrives while the model loads or the broker connects is kept and ends the run as soon as
//! it starts waiting for one. The library never installs handlers itself; `main` passes
//! [`StopSignals::recv`] to [`super::Daemon::run`] as its shutdown future.

use std::fmt;

use tokio::signal::unix::{signal, Signal, SignalKind};

use super::error::DaemonError;

/// A signal that stops the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    /// systemd's stop.
    Term,
    /// Ctrl-C.
    Int,
    /// An administrator's habitual "reload": edgemt has none, so it stops cleanly.
    Hup,
    Usr1,
    Usr2,
    Quit,
    Alrm,
}

impl StopSignal {
    /// All of them, in the order they are registered.
    pub const ALL: [StopSignal; 7] = [
        StopSignal::Term,
        StopSignal::Int,
        StopSignal::Hup,
        StopSignal::Usr1,
        StopSignal::Usr2,
        StopSignal::Quit,
        StopSignal::Alrm,
    ];

    pub fn name(self) -> &'static str {
        match self {
            StopSignal::Term => "SIGTERM",
            StopSignal::Int => "SIGINT",
            StopSignal::Hup => "SIGHUP",
            StopSignal::Usr1 => "SIGUSR1",
            StopSignal::Usr2 => "SIGUSR2",
            StopSignal::Quit => "SIGQUIT",
            StopSignal::Alrm => "SIGALRM",
        }
    }

    /// Whether this is the way to stop edgemt (SIGTERM, SIGINT); the others stop it too, but
    /// are logged at warn level, since whoever sent them may have expected something else.
    pub fn is_a_stop_request(self) -> bool {
        matches!(self, StopSignal::Term | StopSignal::Int)
    }

    fn kind(self) -> SignalKind {
        match self {
            StopSignal::Term => SignalKind::terminate(),
            StopSignal::Int => SignalKind::interrupt(),
            StopSignal::Hup => SignalKind::hangup(),
            StopSignal::Usr1 => SignalKind::user_defined1(),
            StopSignal::Usr2 => SignalKind::user_defined2(),
            StopSignal::Quit => SignalKind::quit(),
            StopSignal::Alrm => SignalKind::alarm(),
        }
    }
}

impl fmt::Display for StopSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The handlers for every [`StopSignal`], installed.
pub struct StopSignals {
    watched: Vec<(StopSignal, Signal)>,
}

impl StopSignals {
    /// Installs a handler for every [`StopSignal`]. Must run inside a tokio runtime (enter it
    /// with `Runtime::enter` before `block_on`); fails only if a handler cannot be installed,
    /// and then nothing should start, since that signal would kill the process mid-step.
    pub fn register() -> Result<StopSignals, DaemonError> {
        let watched = StopSignal::ALL
            .into_iter()
            .map(|s| {
                signal(s.kind())
                    .map(|handler| (s, handler))
                    .map_err(|e| DaemonError::Setup(format!("cannot watch {s}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(StopSignals { watched })
    }

    /// Completes at the first stop signal, including one that arrived after `register` and
    /// before this was first polled, and logs which one it was.
    pub async fn recv(mut self) -> StopSignal {
        let received = std::future::poll_fn(|cx| {
            for (s, handler) in &mut self.watched {
                if handler.poll_recv(cx).is_ready() {
                    return std::task::Poll::Ready(*s);
                }
            }
            std::task::Poll::Pending
        })
        .await;
        if received.is_a_stop_request() {
            tracing::info!("{received} received: stopping cleanly");
        } else {
            tracing::warn!(
                "{received} received: edgemt has no use for it (and does not reload), so it \
                 stops cleanly as on SIGTERM, with a final checkpoint"
            );
        }
        received
    }
}
