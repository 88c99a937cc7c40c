//! The lowest layer of the block replication stack.
//!
//! * [`ReplicationMode`]: `primary` or `secondary`, in QEMU's words.
//! * [`ReplicationOps`] and [`Registry`]: the members of a replication pair
//!   (QEMU's `ReplicationOps` / `replication_new` / `replication_*_all`): every
//!   member is started, checkpointed, asked for errors and stopped together,
//!   most recently registered first, stopping at the first error.
//! * [`StateParticipant`] and [`StateRegistry`]: QEMU's savevm handler registry
//!   (`register_savevm_live` / `unregister_savevm`): named, versioned
//!   participants that write their state into a framed, checksummed checkpoint
//!   stream and load it on the other side.
//!
//! ```
//! use std::sync::Arc;
//! use replication_core::{OpError, Registry, ReplicationMode, ReplicationOps};
//!
//! struct Filter(&'static str);
//! impl ReplicationOps for Filter {
//!     fn name(&self) -> String {
//!         self.0.to_string()
//!     }
//!     fn checkpoint(&self) -> Result<(), OpError> {
//!         Err("backup job is gone".into())
//!     }
//! }
//!
//! let registry = Registry::new();
//! let handle = registry.register(Arc::new(Filter("repl0")));
//! registry.start_all("secondary".parse::<ReplicationMode>()?)?;
//! let err = registry.checkpoint_all().unwrap_err();
//! assert_eq!(
//!     err.to_string(),
//!     "replication member 'repl0' failed in checkpoint: backup job is gone"
//! );
//! drop(handle); // unregisters
//! registry.checkpoint_all()?;
//! # Ok::<(), replication_core::Error>(())
//! ```

mod error;
mod mode;
mod registry;
mod savevm;

pub use error::{Error, ErrorKind, OpError, ReplicationOp, SavePhase};
pub use mode::ReplicationMode;
pub use registry::{global, RegistrationHandle, Registry, ReplicationOps};
pub use savevm::{
    IterateStatus, LoadedSection, Pending, SectionKind, StateHandle, StateParticipant,
    StateRegistry, DEFAULT_MAX_ITERATE_ROUNDS, FORMAT_VERSION, MAGIC, MAX_ID_LEN,
    MAX_SECTION_PAYLOAD, MAX_STREAM_BYTES,
};
