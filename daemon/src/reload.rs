//! SIGHUP: reload the config file and apply what can change safely while running — the log
//! filter and each destination's buffering hints (`buffer_size`, `buffer_interval`). Anything
//! else that changed is named in the log as waiting for a restart; a config that does not
//! validate is refused (key and problem logged) and the running one stays.

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::{self, Config};

/// Swaps the log filter; Ok(false) when the environment's `EDGEHOSE_LOG` pins it.
pub type SetLogFilter = Box<dyn Fn(&str) -> Result<bool, String> + Send + Sync>;

/// How to reload: the config file, and how to swap the log filter.
pub struct Reload {
    pub path: PathBuf,
    pub set_log_filter: SetLogFilter,
}

/// A destination's buffering hints, which a reload may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hints {
    pub size: u64,
    pub interval: Duration,
}

/// Reloads `reload.path` into the running `current` config (which is updated with what was
/// applied). `hints` are the destinations' channels, in config order.
pub fn apply(reload: &Reload, current: &mut Config, hints: &[watch::Sender<Hints>]) {
    let new = match config::load(&reload.path) {
        Ok(c) => c,
        Err(e) => {
            error!(path = %reload.path.display(), "reload refused, the running configuration stays: {e:#}");
            return;
        }
    };
    let mut applied = Vec::new();
    let mut restart = Vec::new();
    if new.log_filter != current.log_filter {
        match (reload.set_log_filter)(&new.log_filter) {
            Ok(true) => {
                current.log_filter = new.log_filter.clone();
                applied.push("log.filter".to_string());
            }
            Ok(false) => warn!("log.filter changed, but EDGEHOSE_LOG is set and wins"),
            Err(e) => warn!(error = %e, "cannot change the log filter"),
        }
    }
    let sections = [
        ("ingress", differs(&current.ingress, &new.ingress)),
        ("buffer", differs(&current.buffer, &new.buffer)),
        ("admin", differs(&current.admin, &new.admin)),
        ("shutdown", current.shutdown_timeout != new.shutdown_timeout),
        ("streams", differs(&current.streams, &new.streams)),
    ];
    restart.extend(
        sections
            .iter()
            .filter(|(_, d)| *d)
            .map(|(s, _)| s.to_string()),
    );
    let names = |c: &Config| {
        c.destinations
            .iter()
            .map(|d| d.name.clone())
            .collect::<Vec<_>>()
    };
    if names(current) != names(&new) {
        restart.push("the set of destinations".into());
    }
    for (i, dest) in current.destinations.iter_mut().enumerate() {
        let Some(next) = new.destinations.iter().find(|d| d.name == dest.name) else {
            continue;
        };
        let key = format!("destinations.{}", dest.name);
        if differs(&dest.sink, &next.sink) || differs(&dest.keys, &next.keys) {
            restart.push(format!("{key} (where or how objects are written)"));
        }
        if dest.batching.compression != next.batching.compression
            || dest.batching.newline != next.batching.newline
        {
            restart.push(format!("{key}.compression / record_delimiter"));
        }
        let hint = Hints {
            size: next.batching.size,
            interval: next.batching.interval,
        };
        let old = Hints {
            size: dest.batching.size,
            interval: dest.batching.interval,
        };
        if hint != old {
            dest.batching.size = hint.size;
            dest.batching.interval = hint.interval;
            if let Some(tx) = hints.get(i) {
                tx.send_replace(hint);
            }
            applied.push(format!("{key}.buffer_size/buffer_interval"));
        }
    }
    info!(
        path = %reload.path.display(),
        applied = ?applied,
        "configuration reloaded"
    );
    if !restart.is_empty() {
        warn!(
            changed = ?restart,
            "these changes take effect only after a restart (systemctl restart edgehose)"
        );
    }
}

fn differs<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
    format!("{a:?}") != format!("{b:?}")
}
