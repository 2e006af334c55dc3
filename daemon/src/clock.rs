//! Time, in one place. Two clocks with two jobs:
//!
//! - the **wall clock** ([`now_ms`]) stamps what people read: a record's arrival time, and so
//!   the date in its object's key (Firehose's `ApproximateArrivalTimestamp`);
//! - the **monotonic clock** (`tokio::time::Instant`) times everything the gateway waits for:
//!   flush deadlines, retries, keep-alives. An NTP step (a Pi without an RTC steps its clock at
//!   every boot) therefore never stalls or rushes delivery.

/// Milliseconds since the Unix epoch by the wall clock (0 if the clock is before 1970).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// How often [`watch_steps`] compares the two clocks, and the difference it calls a step (NTP
/// slews small errors at most 0.5 ms/s; it steps larger ones).
const STEP_CHECK: std::time::Duration = std::time::Duration::from_secs(2);
const STEP_THRESHOLD_MS: i64 = 1000;

/// Logs and counts wall-clock steps (a Pi without an RTC steps its clock when NTP first
/// answers, often by hours): nothing waits on the wall clock, but the dates in object keys
/// follow it, so an operator should see when it jumped.
pub async fn watch_steps(mut shutdown: crate::shutdown::Shutdown) {
    let mut mono = tokio::time::Instant::now();
    let mut wall = now_ms();
    let mut tick = tokio::time::interval(STEP_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait() => return,
        }
        let (m, w) = (tokio::time::Instant::now(), now_ms());
        let step = (w - wall) - m.duration_since(mono).as_millis() as i64;
        if step.abs() >= STEP_THRESHOLD_MS {
            tracing::warn!(
                step_seconds = step as f64 / 1000.0,
                "the wall clock stepped: records arriving from now on are stamped (and keyed) with the new time; flush deadlines and retries run on the monotonic clock and are not affected"
            );
            metrics::counter!(crate::metrics::CLOCK_STEPS).increment(1);
        }
        (mono, wall) = (m, w);
    }
}
