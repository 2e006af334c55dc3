//! Templates shared by the config, which parses and checks them, and the stages that evaluate
//! them: MQTT topic filters and IoT Core partition-key templates ([`topic`]), Firehose prefixes
//! and object keys ([`keys`]). They depend on nothing else in the crate, so the config never
//! reaches up into the stages.

pub mod keys;
pub mod topic;
