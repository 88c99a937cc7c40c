//! Permissions (taken and shared by each user of a node) and operation blockers.

use std::fmt;

/// A set of permissions, as in QEMU: each user of a node (a parent edge or a
/// backend) *takes* some permissions and *shares* some with the other users.
/// Attaching a user fails when what it takes is not shared by an existing user,
/// or when it does not share what an existing user takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Perms(pub u8);

impl Perms {
    /// No permission.
    pub const NONE: Perms = Perms(0);
    /// Reads return consistent data (nobody else writes underneath without telling).
    pub const CONSISTENT_READ: Perms = Perms(1);
    /// Write guest-visible data.
    pub const WRITE: Perms = Perms(2);
    /// Write data that does not change what a reader sees (e.g. copy-on-read).
    pub const WRITE_UNCHANGED: Perms = Perms(4);
    /// Change the node's length.
    pub const RESIZE: Perms = Perms(8);
    /// Change the graph below this user (e.g. a job swapping nodes).
    pub const GRAPH_MOD: Perms = Perms(16);
    /// Every permission.
    pub const ALL: Perms = Perms(31);

    /// True if every bit of `other` is in `self`.
    pub fn contains(self, other: Perms) -> bool {
        self.0 & other.0 == other.0
    }

    /// True if no bit is set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Bits of `self` that are not in `other`.
    pub fn minus(self, other: Perms) -> Perms {
        Perms(self.0 & !other.0)
    }

    /// The QEMU names of the bits set, e.g. `["consistent read", "write"]`.
    pub fn names(self) -> Vec<&'static str> {
        const NAMES: [(&str, Perms); 5] = [
            ("consistent read", Perms::CONSISTENT_READ),
            ("write", Perms::WRITE),
            ("write unchanged", Perms::WRITE_UNCHANGED),
            ("resize", Perms::RESIZE),
            ("change children", Perms::GRAPH_MOD),
        ];
        NAMES
            .iter()
            .filter(|(_, p)| self.contains(*p))
            .map(|(n, _)| *n)
            .collect()
    }
}

impl std::ops::BitOr for Perms {
    type Output = Perms;
    fn bitor(self, rhs: Perms) -> Perms {
        Perms(self.0 | rhs.0)
    }
}

impl std::ops::BitAnd for Perms {
    type Output = Perms;
    fn bitand(self, rhs: Perms) -> Perms {
        Perms(self.0 & rhs.0)
    }
}

impl fmt::Display for Perms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        f.write_str(&self.names().join(", "))
    }
}

/// What a user of a node takes and shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PermPair {
    /// Permissions this user needs.
    pub perm: Perms,
    /// Permissions this user allows others to hold.
    pub shared: Perms,
}

impl PermPair {
    /// Read and write, sharing everything (the usual guest device / NBD export).
    pub const READ_WRITE: PermPair = PermPair {
        perm: Perms(Perms::CONSISTENT_READ.0 | Perms::WRITE.0 | Perms::RESIZE.0),
        shared: Perms::ALL,
    };
    /// Read only, sharing everything.
    pub const READ_ONLY: PermPair = PermPair {
        perm: Perms::CONSISTENT_READ,
        shared: Perms::ALL,
    };
    /// Takes nothing, shares everything (a monitor-style handle).
    pub const NONE: PermPair = PermPair {
        perm: Perms::NONE,
        shared: Perms::ALL,
    };
}

/// Operation types that can be blocked on a node (QEMU's `BlockOpType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum BlockOp {
    /// Source of a backup job.
    BackupSource,
    /// Target of a backup job.
    BackupTarget,
    /// Medium change.
    Change,
    /// Top/source of a commit job.
    CommitSource,
    /// Base/target of a commit job.
    CommitTarget,
    /// Dataplane start (kept for QEMU parity; replication unblocks it).
    DataplaneStart,
    /// Deleting the drive.
    DriveDel,
    /// Ejecting the medium.
    Eject,
    /// External snapshot.
    ExternalSnapshot,
    /// Internal snapshot.
    InternalSnapshot,
    /// Internal snapshot deletion.
    InternalSnapshotDelete,
    /// Source of a mirror job.
    MirrorSource,
    /// Target of a mirror job.
    MirrorTarget,
    /// Resize (block_resize).
    Resize,
    /// Stream job.
    Stream,
    /// Node replacement.
    Replace,
}

impl BlockOp {
    /// Every op type.
    pub const ALL: [BlockOp; 16] = [
        BlockOp::BackupSource,
        BlockOp::BackupTarget,
        BlockOp::Change,
        BlockOp::CommitSource,
        BlockOp::CommitTarget,
        BlockOp::DataplaneStart,
        BlockOp::DriveDel,
        BlockOp::Eject,
        BlockOp::ExternalSnapshot,
        BlockOp::InternalSnapshot,
        BlockOp::InternalSnapshotDelete,
        BlockOp::MirrorSource,
        BlockOp::MirrorTarget,
        BlockOp::Resize,
        BlockOp::Stream,
        BlockOp::Replace,
    ];

    pub(crate) fn bit(self) -> u32 {
        1u32 << (self as u8)
    }

    /// QEMU's name for this op type.
    pub fn name(self) -> &'static str {
        match self {
            BlockOp::BackupSource => "backup-source",
            BlockOp::BackupTarget => "backup-target",
            BlockOp::Change => "change",
            BlockOp::CommitSource => "commit-source",
            BlockOp::CommitTarget => "commit-target",
            BlockOp::DataplaneStart => "dataplane-start",
            BlockOp::DriveDel => "drive-del",
            BlockOp::Eject => "eject",
            BlockOp::ExternalSnapshot => "external-snapshot",
            BlockOp::InternalSnapshot => "internal-snapshot",
            BlockOp::InternalSnapshotDelete => "internal-snapshot-delete",
            BlockOp::MirrorSource => "mirror-source",
            BlockOp::MirrorTarget => "mirror-target",
            BlockOp::Resize => "resize",
            BlockOp::Stream => "stream",
            BlockOp::Replace => "replace",
        }
    }
}

impl fmt::Display for BlockOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
