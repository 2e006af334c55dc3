//! Running under systemd: the sd_notify protocol (READY=1 once ingress and the buffer are up,
//! RELOADING=1 around a SIGHUP reload, STOPPING=1 at shutdown, WATCHDOG=1 while the pipeline is
//! alive) and log lines the journal understands. Outside systemd (no NOTIFY_SOCKET, no
//! JOURNAL_STREAM) all of it does nothing.

use std::fmt;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn, Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::buffer::Control;
use crate::shutdown::Shutdown;

fn notify(state: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, state) {
        warn!(error = %e, "cannot notify systemd");
    }
}

/// READY=1: ingress listens and every accepted message can be committed.
pub fn ready() {
    notify(&[NotifyState::Ready, NotifyState::Status("running")]);
}

/// STOPPING=1: shutdown has begun.
pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// RELOADING=1 (with the monotonic time systemd's notify-reload wants); `reloaded` ends it.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(_) => notify(&[NotifyState::Reloading]),
    }
}

pub fn reloaded() {
    ready();
}

/// The watchdog interval systemd asked for (`WatchdogSec=`), if any: WATCHDOG_USEC, for this
/// process when WATCHDOG_PID names it or is unset (as libsystemd's sd_watchdog_enabled reads it).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse() != Ok(std::process::id()) {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Pings systemd's watchdog at half its interval, but only while the buffer writer answers a
/// ping of its own through its control channel: a stuck writer (a hung disk, a deadlock) or a
/// stuck runtime stops the pings, and systemd restarts the service. Once shutdown has begun the
/// writer may be gone; the pings then only show the runtime is alive.
pub async fn watchdog(interval: Duration, control: mpsc::WeakSender<Control>, shutdown: Shutdown) {
    let period = interval / 2;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let alive = match control.upgrade() {
            Some(control) if !shutdown.is_begun() => {
                let (tx, rx) = oneshot::channel();
                let asked = control.send(Control::Ping(tx));
                matches!(tokio::time::timeout(period, asked).await, Ok(Ok(())))
                    && matches!(tokio::time::timeout(period, rx).await, Ok(Ok(())))
            }
            // Shutting down: the writer finishes on its own time (TimeoutStopSec bounds it).
            _ => true,
        };
        if alive {
            notify(&[NotifyState::Watchdog]);
        } else {
            warn!("the buffer writer did not answer; withholding the watchdog ping");
        }
        debug!(alive, "watchdog");
    }
}

/// Whether stderr goes to the journal (systemd sets JOURNAL_STREAM to its device and inode).
pub fn logging_to_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.split_once(':') else {
        return false;
    };
    let Ok(meta) = std::fs::File::open("/proc/self/fd/2").and_then(|f| f.metadata()) else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

/// Log lines for the journal: the syslog priority as a `<N>` prefix (sd-daemon(3)), so levels
/// map to journal priorities, and no timestamp, since the journal adds its own.
pub struct JournalFormat;

impl<S, N> FormatEvent<S, N> for JournalFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        write!(writer, "<{}>{}: ", priority(*meta.level()), meta.target())?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// syslog priorities: err, warning, info, debug.
pub fn priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_map_to_syslog_priorities() {
        assert_eq!(priority(Level::ERROR), 3);
        assert_eq!(priority(Level::WARN), 4);
        assert_eq!(priority(Level::INFO), 6);
        assert_eq!(priority(Level::DEBUG), 7);
    }
}
