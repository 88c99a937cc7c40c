//! Block jobs: the job framework (states, verbs, pause points, speed limit,
//! error policies, events, registry) and the jobs that move data between
//! nodes of a block graph: backup (copy-before-write), mirror, active and
//! plain commit, stream.
//!
//! The behaviour follows QEMU's `job.c`, `block/backup.c`,
//! `block/copy-before-write.c`, `block/block-copy.c`, `block/mirror.c` and
//! `block/commit.c`; the code is our own.

pub mod backup;
pub mod cbw;
pub mod commit;
pub mod copy;
pub mod error;
mod graph_util;
pub mod job;
pub mod mirror;
pub mod ratelimit;

pub use backup::{register_drivers, BackupJob, BackupOptions, BackupSync};
pub use cbw::{CopyBeforeWrite, CBW_DRIVER};
pub use commit::{CommitJob, CommitOptions, StreamJob};
pub use copy::{CopyTracker, ReadGuard};
pub use error::{ErrorKind, JobError, Result};
pub use job::{
    ErrorAction, IoOperation, Job, JobContext, JobDriver, JobEvent, JobInfo, JobManager,
    JobOptions, JobOutcome, JobStatus, JobType, JobVerb, OnError, DRAIN_PARK_TIMEOUT,
};
pub use mirror::{DirtyMap, MirrorJob, MirrorOptions, MirrorSync, MirrorTop, MIRROR_TOP_DRIVER};
pub use ratelimit::RateLimit;
