//! Log lines a client can trigger at will (a malformed packet, a refused message, a refused
//! connection) are limited to one a second per call site, each saying how many were suppressed
//! since the last; the metrics count every event. Client-supplied strings go into log fields
//! with `?` (Rust's escaped Debug form), so a client id holding a newline and `<3>` cannot forge
//! a journal entry.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

pub struct LogLimit {
    second: AtomicI64,
    suppressed: AtomicU64,
}

impl LogLimit {
    pub const fn new() -> Self {
        Self {
            second: AtomicI64::new(i64::MIN),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Some(lines suppressed since the last one) when a line may be logged now; None (and
    /// counted as suppressed) otherwise.
    pub fn allow(&self) -> Option<u64> {
        let now = crate::clock::now_ms().div_euclid(1000);
        if self.second.swap(now, Ordering::Relaxed) != now {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

impl Default for LogLimit {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_second_and_every_other_call_counted() {
        let l = LogLimit::new();
        assert_eq!(l.allow(), Some(0));
        let mut allowed = Vec::new();
        for _ in 0..1000 {
            if let Some(n) = l.allow() {
                allowed.push(n);
            }
        }
        // A tight loop crosses at most one second boundary.
        assert!(allowed.len() <= 1, "{allowed:?}");
        // Every call was either logged or counted as suppressed.
        let pending = l.suppressed.load(Ordering::Relaxed);
        assert_eq!(
            allowed.iter().sum::<u64>() + pending + allowed.len() as u64,
            1000
        );
    }
}
