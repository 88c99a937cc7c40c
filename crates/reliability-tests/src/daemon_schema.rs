//! The daemon's schema source (`blockrep/src/serve/schema.rs`), included as
//! is (blockrep has no library), inside a stand-in for its parent module.

/// The daemon's status command (`blockrep::serve::STATUS_COMMAND`), which
/// the schema names through `super::`.
pub const STATUS_COMMAND: &str = "x-blockrep-query-replication";

#[allow(missing_docs, dead_code)]
#[path = "../../blockrep/src/serve/schema.rs"]
pub mod schema;
