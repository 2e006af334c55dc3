//! What wakes a connection's task: its acks committed, its session's queue filled, a newer
//! connection taking its client id, shutdown. One `Notify` with a flag per source, instead of a
//! notifier (and a future waiting on it) per source: an idle device's task has room for one
//! waiting future, not four (10,000 idle devices are 10,000 of them).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

use tokio::sync::Notify;

use crate::message::Outcome;

/// An ack completion on its way back to the connection: (packet id, outcome), or None when the
/// buffer could not store the message (the connection then closes so the device resends it).
pub type AckEvent = (u16, Option<Outcome>);

#[derive(Default)]
pub struct Wake {
    notify: Notify,
    raised: AtomicU8,
    /// Ack completions, pushed by the buffer's writer, drained by the connection; bounded by
    /// the connection's window (`receive_maximum`).
    acks: Mutex<VecDeque<AckEvent>>,
}

/// The session's queue has messages for the device.
pub const QUEUED: u8 = 1;
/// A newer connection registered the same client id.
pub const TAKEN_OVER: u8 = 2;
/// The gateway is shutting down.
pub const SHUTDOWN: u8 = 4;

impl Wake {
    /// Raises `what` and wakes the connection (a permit is kept if it is not waiting, so a
    /// raise between its last look and its next wait is not lost).
    pub fn raise(&self, what: u8) {
        self.raised.fetch_or(what, Ordering::AcqRel);
        self.notify.notify_one();
    }

    /// What was raised since the last call (acks are in [`Self::pop_ack`]).
    pub fn take(&self) -> u8 {
        self.raised.swap(0, Ordering::AcqRel)
    }

    /// Waits until something is raised or an ack pushed.
    pub async fn wait(&self) {
        self.notify.notified().await
    }

    pub fn push_ack(&self, event: AckEvent) {
        self.acks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(event);
        self.notify.notify_one();
    }

    pub fn pop_ack(&self) -> Option<AckEvent> {
        self.acks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    fn ready(w: &Wake) -> bool {
        let fut = std::pin::pin!(w.wait());
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        fut.poll(&mut cx).is_ready()
    }

    #[test]
    fn a_raise_while_not_waiting_is_kept() {
        let w = Wake::default();
        assert!(!ready(&w));
        w.raise(QUEUED);
        w.raise(TAKEN_OVER);
        assert!(ready(&w));
        assert_eq!(w.take(), QUEUED | TAKEN_OVER);
        assert_eq!(w.take(), 0);
        w.push_ack((7, None));
        assert!(ready(&w));
        assert_eq!(w.take(), 0);
        assert_eq!(w.pop_ack(), Some((7, None)));
        assert_eq!(w.pop_ack(), None);
    }
}
