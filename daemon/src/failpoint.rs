//! Deterministic fault injection for the crash tests: with `EDGEHOSE_FAILPOINT=<name>` (or
//! `<name>:<n>` for the n-th pass) the process aborts, as a kill -9 would end it, exactly when
//! it passes the named point; with `<name>:fail` the point reports a failure at every pass
//! instead ([`fails`]). Unset (always, outside tests) a pass costs one atomic load.
//!
//! Points: `delivery.after-intent` (a batch's intent is committed, nothing put yet),
//! `delivery.after-first-put` (the first object of a batch is in the bucket, the others not),
//! `buffer.commit` (`fail`: the commit fails, as on a full or failing disk),
//! `window.between-pieces` (a closed window's first rows are committed, the rest not).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The armed point: its name, and the pass to abort at (0: `fail` at every pass).
static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
static PASSES: AtomicU64 = AtomicU64::new(0);

fn armed() -> Option<&'static (String, u64)> {
    ARMED
        .get_or_init(|| {
            let v = std::env::var("EDGEHOSE_FAILPOINT").ok()?;
            Some(match v.split_once(':') {
                Some((p, "fail")) => (p.to_string(), 0),
                Some((p, n)) => (p.to_string(), n.parse().unwrap_or(1)),
                None => (v, 1),
            })
        })
        .as_ref()
}

/// Whether the point `name` is armed to fail (`<name>:fail`).
pub fn fails(name: &str) -> bool {
    armed().is_some_and(|(point, n)| *n == 0 && point == name)
}

/// Aborts the process if `name` is the armed point and this is the armed pass.
pub fn hit(name: &str) {
    if let Some((point, n)) = armed() {
        if *n > 0 && point == name && PASSES.fetch_add(1, Ordering::SeqCst) + 1 == *n {
            eprintln!("failpoint {name}: aborting");
            std::process::abort();
        }
    }
}
