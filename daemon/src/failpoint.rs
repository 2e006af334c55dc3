//! Deterministic fault injection for the crash tests: with `EDGEHOSE_FAILPOINT=<name>` (or
//! `<name>:<n>` for the n-th pass) the process aborts, as a kill -9 would end it, exactly when
//! it passes the named point. Unset (always, outside tests) a pass costs one atomic load.
//!
//! Points: `delivery.after-intent` (a batch's intent is committed, nothing put yet),
//! `delivery.after-first-put` (the first object of a batch is in the bucket, the others not).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
static PASSES: AtomicU64 = AtomicU64::new(0);

/// Aborts the process if `name` is the armed point and this is the armed pass.
pub fn hit(name: &str) {
    let armed = ARMED.get_or_init(|| {
        let v = std::env::var("EDGEHOSE_FAILPOINT").ok()?;
        let (point, n) = match v.split_once(':') {
            Some((p, n)) => (p.to_string(), n.parse().unwrap_or(1)),
            None => (v, 1),
        };
        Some((point, n))
    });
    if let Some((point, n)) = armed {
        if point == name && PASSES.fetch_add(1, Ordering::SeqCst) + 1 == *n {
            eprintln!("failpoint {name}: aborting");
            std::process::abort();
        }
    }
}
