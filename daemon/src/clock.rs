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
