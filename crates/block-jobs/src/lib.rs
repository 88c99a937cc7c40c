//! Block jobs: the job framework (states, verbs, pause points, speed limit,
//! error policies, events, registry) and the jobs that move data between
//! nodes of a block graph: backup (copy-before-write), mirror, active and
//! plain commit, stream.
//!
//! Every job blocks every operation (but dataplane start) on each node it
//! uses while it runs, as QEMU's `block_job_add_bdrv`: backup and mirror
//! their source and target; commit and active commit top, the nodes between
//! and base; stream top and the nodes down to (excluding) base. A second job
//! touching one of them is refused with [`ErrorKind::Busy`] and QEMU's text,
//! `Node 'x' is busy: block device is in use by block job: backup`. The
//! blockers go when the job ends (before `Job::wait` returns). See the
//! README's "Op blockers".
//!
//! The behaviour follows QEMU's `job.c`, `block/backup.c`,
//! `block/copy-before-write.c`, `block/block-copy.c`, `block/mirror.c` and
//! `block/commit.c`; the code is our own.

pub mod backup;
mod blockers;
pub mod cbw;
pub mod commit;
pub mod copy;
pub mod error;
mod graph_util;
pub mod job;
pub mod mirror;
pub mod ratelimit;

pub use backup::{register_drivers, BackupJob, BackupOptions, BackupSync};
pub use blockers::check_op_free;
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
