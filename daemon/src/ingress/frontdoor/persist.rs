//! Saving the front door's persistent sessions and retained messages in the buffer file, so
//! that they survive a restart ([`super::pubsub`] collects what changed; the buffer writer
//! stores it in one transaction, `buffer/sessions.rs`).
//!
//! When: every [`SAVE_INTERVAL`] while something changed, and once more at shutdown after every
//! connection has ended (so the messages connections had in flight are back in their queues).
//! A kill -9 or a power cut therefore loses at most the last interval's changes to sessions and
//! retained messages: a subscription made, a message queued for an offline device, an
//! acknowledgement of one (sent again after the restart, flagged DUP). Messages for local
//! subscribers are not what a PUBACK promises (that is the commit of the device's own message,
//! which the destinations deliver); an MQTT broker that persists sessions (mosquitto's
//! `autosave_interval`) makes the same trade.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::pubsub::PubSub;
use crate::buffer::Control;

/// How often changed sessions are saved: one small transaction (one fsync) a second at most,
/// and only while sessions or retained messages change.
pub const SAVE_INTERVAL: Duration = Duration::from_secs(1);

/// Saves what changed since the last save; false if the writer refused or is gone (what was
/// not saved is marked changed again, for the next try).
pub async fn save(pubsub: &PubSub, control: &mpsc::Sender<Control>) -> bool {
    let changes = pubsub.changes();
    if changes.is_empty() {
        return true;
    }
    let (done, answer) = oneshot::channel();
    let sent = control
        .send(Control::SaveSessions {
            changes: Box::new(changes.clone()),
            done,
        })
        .await;
    let result = match sent {
        Ok(()) => answer
            .await
            .map_err(|_| "the buffer writer has stopped".to_string()),
        Err(_) => Err("the buffer writer has stopped".to_string()),
    };
    match result.and_then(|r| r.map_err(|e| e.to_string())) {
        Ok(()) => {
            debug!(
                sessions = changes.sessions.len(),
                removed = changes.removed.len(),
                retained = changes.retained.len(),
                "MQTT sessions saved"
            );
            true
        }
        Err(e) => {
            static LOG: crate::ratelimit::LogLimit = crate::ratelimit::LogLimit::new();
            if let Some(suppressed) = LOG.allow() {
                warn!(error = %e, suppressed, "cannot save MQTT sessions; will try again");
            }
            pubsub.save_failed(changes);
            false
        }
    }
}

/// Saves what changed at most every [`SAVE_INTERVAL`], waking only when something did, until
/// dropped (the front door aborts it and saves once more).
pub async fn run(pubsub: Arc<PubSub>, control: mpsc::Sender<Control>) {
    loop {
        pubsub.changed().await;
        // Let changes gather: one transaction for a second's worth.
        tokio::time::sleep(SAVE_INTERVAL).await;
        // A failed save marks its changes again, which wakes this loop for the next try.
        save(&pubsub, &control).await;
    }
}
