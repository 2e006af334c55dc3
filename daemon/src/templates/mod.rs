//! Templates shared by the config, which parses and checks them, and the stages that evaluate
//! them: MQTT topic filters and IoT Core partition-key templates ([`topic`]), Firehose prefixes
//! and object keys ([`keys`]), the JSON field a partition key is read from ([`json_field`]). They depend on nothing else in the crate, so the config never
//! reaches up into the stages.

pub mod json_field;
pub mod keys;
pub mod topic;
