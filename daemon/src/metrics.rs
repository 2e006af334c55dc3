//! Metric names and their descriptions, in one place. Labels are low-cardinality: a reject
//! reason, a destination name, never a topic or a client id.

use metrics::{describe_counter, describe_gauge, Unit};

pub const RECEIVED: &str = "edgehose_messages_received_total";
pub const RULE_DROPPED: &str = "edgehose_rule_dropped_total";
pub const RULE_FAILED: &str = "edgehose_rule_failures_total";
pub const WINDOWS_EMITTED: &str = "edgehose_windows_emitted_total";
pub const WINDOWS_OPEN: &str = "edgehose_windows_open";
pub const WINDOWS_INCOMPLETE: &str = "edgehose_window_rows_inputs_dropped_total";
pub const WINDOW_LATE: &str = "edgehose_window_late_records_total";
pub const WINDOW_BAD_ROWS: &str = "edgehose_window_unreadable_rows_total";
pub const CLOCK_STEPS: &str = "edgehose_clock_steps_total";
pub const CONNECTIONS: &str = "edgehose_connections_total";
pub const LOCAL_FANOUT_DROPPED: &str = "edgehose_local_fanout_dropped_total";
pub const SUBSCRIPTIONS_REFUSED: &str = "edgehose_subscriptions_refused_total";
pub const AUTH_REFUSED: &str = "edgehose_auth_refused_total";
pub const RATE_LIMITED: &str = "edgehose_connection_rate_limited_total";
pub const PARTIAL_BUDGET_WAITS: &str = "edgehose_partial_packet_budget_waits_total";
pub const RETAINED_REFUSED: &str = "edgehose_retained_refused_total";
pub const SESSIONS_EXPIRED: &str = "edgehose_sessions_expired_total";
pub const REJECTED: &str = "edgehose_messages_rejected_total";
pub const BROKER_DROPPED: &str = "edgehose_broker_dropped_total";
pub const COMMITTED: &str = "edgehose_records_committed_total";
pub const COMMITS: &str = "edgehose_buffer_commits_total";
pub const BUFFER_RECORDS: &str = "edgehose_buffer_records";
pub const BUFFER_BYTES: &str = "edgehose_buffer_bytes";
pub const BUFFER_DROPPED: &str = "edgehose_buffer_dropped_total";
pub const BUFFER_FULL_WAITS: &str = "edgehose_buffer_full_waits_total";
pub const BUFFER_CORRUPT: &str = "edgehose_buffer_corrupt_records_total";
pub const BUFFER_SALVAGES: &str = "edgehose_buffer_salvages_total";
pub const BUFFER_LOST_FILES: &str = "edgehose_buffer_files_lost_total";
pub const DELIVERED_RECORDS: &str = "edgehose_records_delivered_total";
pub const DELIVERED_BATCHES: &str = "edgehose_batches_delivered_total";
pub const DELIVERED_BYTES: &str = "edgehose_bytes_delivered_total";
pub const DELIVERY_ERRORS: &str = "edgehose_delivery_errors_total";
pub const ERROR_RECORDS: &str = "edgehose_error_records_total";
pub const BACKLOG_RECORDS: &str = "edgehose_destination_backlog_records";
pub const BACKLOG_AGE: &str = "edgehose_destination_backlog_age_seconds";
pub const DESTINATION_UP: &str = "edgehose_destination_up";
pub const KINESIS_RECORDS: &str = "edgehose_kinesis_records_total";
pub const KINESIS_REQUESTS: &str = "edgehose_kinesis_requests_total";
pub const KINESIS_PUT_UNITS: &str = "edgehose_kinesis_put_units_total";
pub const KINESIS_FAILED_ENTRIES: &str = "edgehose_kinesis_failed_entries_total";
pub const RESENT_RECORDS: &str = "edgehose_records_resent_total";
pub const RESENT_OBJECTS: &str = "edgehose_objects_resent_total";
pub const THROTTLED: &str = "edgehose_destination_throttled_total";
pub const BACKLOG_BYTES: &str = "edgehose_destination_backlog_bytes";

pub fn describe() {
    describe_counter!(
        CLOCK_STEPS,
        "Times the wall clock stepped by a second or more (NTP after boot, a manual change)"
    );
    describe_counter!(RECEIVED, "MQTT messages that reached ingress");
    describe_counter!(
        RULE_DROPPED,
        "Messages a stream's rule did not select (WHERE false, Null or Undefined)"
    );
    describe_counter!(WINDOWS_EMITTED, "Windows a windowed rule closed and stored");
    describe_gauge!(WINDOWS_OPEN, "Windows a windowed rule holds open");
    describe_counter!(
        WINDOWS_INCOMPLETE,
        "Window rows marked inputs_dropped: the full buffer (drop_oldest) removed input rows first"
    );
    describe_counter!(
        WINDOW_LATE,
        "Input rows stamped inside a window already emitted (left out)"
    );
    describe_counter!(
        WINDOW_BAD_ROWS,
        "Input rows a windowed rule cannot read (stored by an earlier version of the rule)"
    );
    describe_counter!(
        RULE_FAILED,
        "Messages a stream's rule failed on (sent to its error_stream, or refused without one)"
    );
    describe_counter!(CONNECTIONS, "MQTT connections accepted by the front door");
    describe_counter!(
        RATE_LIMITED,
        "Times a connection sent faster than ingress.frontdoor.max_bytes_per_second and was not read until its rate allowed"
    );
    describe_counter!(
        AUTH_REFUSED,
        "Requests the front door refused, by action (accept, connect, publish, retain_publish, subscribe, receive) and reason (not_authorized, bad_credentials, tls_handshake, tls_handshake_timeout, revoked, per_address_limit)"
    );
    describe_counter!(
        RETAINED_REFUSED,
        "Retained messages delivered but not retained: the retained messages are at their bound"
    );
    describe_counter!(
        SESSIONS_EXPIRED,
        "Offline persistent sessions dropped: past their expiry (1 h) or the most kept (10,000)"
    );
    describe_counter!(
        PARTIAL_BUDGET_WAITS,
        "Times a connection stopped reading because packets still arriving held the whole partial_packet_budget"
    );
    describe_counter!(
        SUBSCRIPTIONS_REFUSED,
        "Topic filters refused in SUBSCRIBE (invalid, or past the 50 a session may hold)"
    );
    describe_counter!(
        LOCAL_FANOUT_DROPPED,
        "Messages not delivered to a local subscriber whose queue was full (QoS 0 fan-out)"
    );
    describe_counter!(
        REJECTED,
        "Messages refused by ingress or the buffer, by reason"
    );
    describe_counter!(
        BROKER_DROPPED,
        "Messages the embedded rumqttd dropped from its log before edgehose read them (acknowledged to the device, then lost)"
    );
    describe_counter!(COMMITTED, "Records committed to the SQLite buffer");
    describe_counter!(COMMITS, "SQLite group commits");
    describe_gauge!(
        BUFFER_RECORDS,
        "Records in the buffer that some destination has not delivered yet"
    );
    describe_gauge!(
        BUFFER_BYTES,
        Unit::Bytes,
        "Bytes held in the buffer (accounted)"
    );
    describe_counter!(
        BUFFER_DROPPED,
        "Records deleted undelivered by the drop_oldest policy"
    );
    describe_counter!(
        BUFFER_CORRUPT,
        "Records skipped because their block in the buffer file could not be read back (disk corruption)"
    );
    describe_counter!(
        BUFFER_SALVAGES,
        "Times a damaged buffer file was moved aside at start and its readable records copied into a fresh one"
    );
    describe_counter!(
        BUFFER_LOST_FILES,
        "Times the buffer file was missing or empty at start although a buffer had been created"
    );
    describe_counter!(
        BUFFER_FULL_WAITS,
        "Times ingest waited because the buffer was full (block policy)"
    );
    describe_counter!(DELIVERED_RECORDS, "Records delivered, by destination");
    describe_counter!(DELIVERED_BATCHES, "Objects delivered, by destination");
    describe_counter!(
        DELIVERED_BYTES,
        Unit::Bytes,
        "Record bytes delivered before compression, by destination"
    );
    describe_counter!(DELIVERY_ERRORS, "Failed delivery attempts, by destination");
    describe_counter!(
        ERROR_RECORDS,
        "Records written to the error output instead of the destination, by destination and error code"
    );
    describe_gauge!(
        BACKLOG_RECORDS,
        "Committed records a destination has not delivered yet"
    );
    describe_gauge!(
        BACKLOG_BYTES,
        Unit::Bytes,
        "Bytes (before compression, delimiters included) of committed records a destination has not delivered yet"
    );
    describe_gauge!(
        BACKLOG_AGE,
        Unit::Seconds,
        "Age of the oldest record a destination has not delivered yet (0 when caught up)"
    );
    describe_gauge!(
        DESTINATION_UP,
        "1 when the destination's last delivery or check succeeded, 0 while it is failing"
    );
    describe_counter!(
        KINESIS_RECORDS,
        "Kinesis records put (aggregates count once)"
    );
    describe_counter!(KINESIS_REQUESTS, "PutRecords requests sent");
    describe_counter!(KINESIS_PUT_UNITS, "Kinesis 25 KB PUT payload units used");
    describe_counter!(
        KINESIS_FAILED_ENTRIES,
        "PutRecords entries that failed and were sent again"
    );
    describe_counter!(
        RESENT_RECORDS,
        "Records sent again although the destination may already hold them (for objects: put again under the same key; for Kinesis: possible duplicates)"
    );
    describe_counter!(
        RESENT_OBJECTS,
        "Objects put again under the same key (a retry, or a batch replayed after a restart)"
    );
    describe_counter!(
        THROTTLED,
        "Times a destination's endpoint asked it to slow down (not counted as delivery errors)"
    );
}
