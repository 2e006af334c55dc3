//! Shutdown: one "begin" signal that every stage watches. The stages then finish in data-flow
//! order (ingress stops, the buffer commits what it has, destinations flush every open batch),
//! which `crate::run` waits for within the configured timeout.

use tokio::sync::watch;

/// Sends the "begin shutdown" signal.
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

/// Watches for the signal. Cheap to clone; one per task.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    pub fn begin(&self) {
        let _ = self.0.send(true);
    }
}

impl Shutdown {
    pub fn is_begun(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once shutdown has begun (at once if it already has).
    pub async fn wait(&mut self) {
        // An error means the trigger is gone, which also means: stop.
        let _ = self.0.wait_for(|begun| *begun).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_watcher_sees_the_signal() {
        let (trigger, mut a) = channel();
        let mut b = a.clone();
        assert!(!a.is_begun());
        trigger.begin();
        a.wait().await;
        b.wait().await;
        assert!(b.is_begun());
    }
}
