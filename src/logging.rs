//! Log output: human lines on a terminal, and under systemd the `<N>` syslog priority
//! prefix that journald reads from a service's stderr (SyslogLevelPrefix=, on by default),
//! so `journalctl -p warning -u edgemt` shows exactly the warnings and errors. journald
//! stamps the time itself, so the prefixed form leaves it out.

use std::fmt;
use std::io::IsTerminal;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The default filter: `info`, but rumqttc's per-packet lines about refused publishes and
/// held-back packet ids only at error, since the daemon counts those and tells each topic's
/// once a minute (a WARN per refused prediction would bury the journal).
const DEFAULT_FILTER: &str = "info,rumqttc::v5::state=error";

/// Installs the global subscriber; `RUST_LOG` overrides [`DEFAULT_FILTER`].
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| DEFAULT_FILTER.into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // systemd sets JOURNAL_STREAM when stderr goes to the journal.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        let format = tracing_subscriber::fmt::format()
            .without_time()
            .with_ansi(false);
        builder
            .with_ansi(false)
            .event_format(SyslogPriority(format))
            .init();
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

/// The syslog priority of a tracing level (sd-daemon(3)'s `<N>` prefixes).
pub fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// Another event format, with the `<N>` prefix in front.
struct SyslogPriority<F>(F);

impl<S, N, F> FormatEvent<S, N> for SyslogPriority<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "<{}>", priority(event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}
