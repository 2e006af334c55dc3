//! What `/healthz` reports: whether the buffer takes writes and, per destination, whether it is
//! delivering, since when it is not, and how much it holds back. The stages write their part;
//! the admin server reads a snapshot.

use std::sync::{Arc, Mutex};

use serde::Serialize;

/// One destination's view, as `/healthz` shows it.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct DestinationHealth {
    pub name: String,
    /// False while deliveries (or the reads feeding them) fail.
    pub up: bool,
    /// Wall-clock time (epoch ms) of the first failure of the current outage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub down_since_ms: Option<i64>,
    /// Failed attempts in the current outage.
    pub failures: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub backlog_records: u64,
    pub backlog_bytes: u64,
    pub oldest_age_seconds: f64,
}

#[derive(Debug, Default)]
struct Inner {
    /// Set once ingress listens: before that devices cannot connect, whatever the rest says.
    ready: bool,
    /// None while the buffer takes writes; else why it does not.
    buffer_error: Option<String>,
    destinations: Vec<DestinationHealth>,
}

/// Shared health state: cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Health(Arc<Mutex<Inner>>);

/// The body of `/healthz`.
#[derive(Debug, Serialize)]
pub struct Report {
    /// `ok`, `degraded` (a destination is down; records are buffered), `starting` (ingress is
    /// not listening yet) or `failing` (the buffer does not take writes: devices are refused or
    /// wait).
    pub status: &'static str,
    /// Whether ingress listens (devices can connect).
    pub ready: bool,
    pub buffer: BufferHealth,
    pub destinations: Vec<DestinationHealth>,
}

#[derive(Debug, Serialize)]
pub struct BufferHealth {
    pub accepts_writes: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Health {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a destination (up until it fails); returns its slot.
    pub fn add_destination(&self, name: &str) -> usize {
        let mut inner = self.lock();
        inner.destinations.push(DestinationHealth {
            name: name.to_string(),
            up: true,
            ..Default::default()
        });
        inner.destinations.len() - 1
    }

    /// Updates a destination's entry in place.
    pub fn update(&self, slot: usize, f: impl FnOnce(&mut DestinationHealth)) {
        if let Some(d) = self.lock().destinations.get_mut(slot) {
            f(d);
        }
    }

    /// Ingress listens: the gateway is ready for devices.
    pub fn set_ready(&self) {
        self.lock().ready = true;
    }

    pub fn set_buffer_error(&self, error: Option<String>) {
        self.lock().buffer_error = error;
    }

    pub fn report(&self) -> Report {
        let inner = self.lock();
        let status = if inner.buffer_error.is_some() {
            "failing"
        } else if !inner.ready {
            "starting"
        } else if inner.destinations.iter().any(|d| !d.up) {
            "degraded"
        } else {
            "ok"
        };
        Report {
            status,
            ready: inner.ready,
            buffer: BufferHealth {
                accepts_writes: inner.buffer_error.is_none(),
                error: inner.buffer_error.clone(),
            },
            destinations: inner.destinations.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_follows_the_worst_part() {
        let h = Health::default();
        assert_eq!(h.report().status, "starting");
        h.set_ready();
        let d = h.add_destination("local");
        assert_eq!(h.report().status, "ok");
        h.update(d, |d| d.up = false);
        assert_eq!(h.report().status, "degraded");
        h.set_buffer_error(Some("disk full".into()));
        let r = h.report();
        assert_eq!(r.status, "failing");
        assert!(!r.buffer.accepts_writes);
        assert_eq!(r.destinations[0].name, "local");
    }
}
