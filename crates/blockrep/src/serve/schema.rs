//! The QAPI types and command argument shapes the daemon accepts, written in
//! QEMU's own schema language (`qapi/block-core.json`, `qapi/sockets.json`,
//! `qapi/block-export.json`, `qapi/job.json`, `qapi/migration.json`), cut down
//! to the drivers and members we implement. Arguments are checked against
//! these before any handler runs, with QEMU's error wording.

/// Named types (enums, structs, unions, alternates).
pub const TYPES: &str = r#"
{ 'enum': 'BlockdevDriver',
  'data': [ 'blkdebug', 'file', 'memory', 'nbd', 'null-co', 'qcow2', 'quorum', 'raw',
            'replication' ] }
{ 'enum': 'BlockdevDiscardOptions', 'data': [ 'ignore', 'unmap' ] }
{ 'enum': 'BlockdevDetectZeroesOptions', 'data': [ 'off', 'on', 'unmap' ] }
{ 'struct': 'BlockdevCacheOptions', 'data': { '*direct': 'bool', '*no-flush': 'bool' } }
{ 'union': 'BlockdevOptions',
  'base': { 'driver': 'BlockdevDriver', '*node-name': 'str',
            '*discard': 'BlockdevDiscardOptions', '*cache': 'BlockdevCacheOptions',
            '*read-only': 'bool', '*auto-read-only': 'bool', '*force-share': 'bool',
            '*detect-zeroes': 'BlockdevDetectZeroesOptions' },
  'discriminator': 'driver',
  'data': { 'blkdebug': 'BlockdevOptionsBlkdebug', 'file': 'BlockdevOptionsFile',
            'memory': 'BlockdevOptionsMemory',
            'nbd': 'BlockdevOptionsNbd', 'null-co': 'BlockdevOptionsNull',
            'qcow2': 'BlockdevOptionsQcow2', 'quorum': 'BlockdevOptionsQuorum',
            'raw': 'BlockdevOptionsRaw', 'replication': 'BlockdevOptionsReplication' } }
{ 'alternate': 'BlockdevRef', 'data': { 'definition': 'BlockdevOptions', 'reference': 'str' } }
{ 'alternate': 'BlockdevRefOrNull',
  'data': { 'definition': 'BlockdevOptions', 'reference': 'str', 'null': 'null' } }
{ 'struct': 'BlockdevOptionsGenericFormat', 'data': { 'file': 'BlockdevRef' } }
{ 'struct': 'BlockdevOptionsGenericCOWFormat', 'base': 'BlockdevOptionsGenericFormat',
  'data': { '*backing': 'BlockdevRefOrNull' } }
{ 'struct': 'BlockdevOptionsQcow2', 'base': 'BlockdevOptionsGenericCOWFormat',
  'data': { '*lazy-refcounts': 'bool' } }
{ 'struct': 'BlockdevOptionsRaw', 'base': 'BlockdevOptionsGenericFormat',
  'data': { '*offset': 'int', '*size': 'int' } }
{ 'enum': 'BlockdevAioOptions', 'data': [ 'threads' ] }
{ 'enum': 'OnOffAuto', 'data': [ 'auto', 'on', 'off' ] }
{ 'struct': 'BlockdevOptionsFile',
  'data': { 'filename': 'str', '*aio': 'BlockdevAioOptions', '*locking': 'OnOffAuto' } }
{ 'struct': 'BlockdevOptionsNull',
  'data': { '*size': 'int', '*latency-ns': 'uint64', '*read-zeroes': 'bool' } }
{ 'struct': 'BlockdevOptionsMemory',
  'data': { '*size': 'size', '*cluster-size': 'size', '*align': 'size',
            '*backing': 'BlockdevRefOrNull' } }
{ 'enum': 'BlkdebugEvent', 'prefix': 'BLKDBG',
  'data': [ 'read_aio', 'write_aio', 'flush_to_disk', 'flush_to_os', 'pwritev', 'preadv',
            'pwritev_zero' ] }
{ 'enum': 'BlkdebugIOType',
  'data': [ 'read', 'write', 'write-zeroes', 'discard', 'flush', 'block-status' ] }
{ 'struct': 'BlkdebugInjectErrorOptions',
  'data': { 'event': 'BlkdebugEvent', '*state': 'int', '*iotype': 'BlkdebugIOType',
            '*errno': 'int', '*sector': 'int', '*once': 'bool', '*immediately': 'bool' } }
{ 'struct': 'BlockdevOptionsBlkdebug',
  'data': { 'image': 'BlockdevRef', '*align': 'int',
            '*inject-error': ['BlkdebugInjectErrorOptions'] } }
{ 'enum': 'QuorumReadPattern', 'data': [ 'quorum', 'fifo' ] }
{ 'struct': 'BlockdevOptionsQuorum',
  'data': { '*blkverify': 'bool', 'children': [ 'BlockdevRef' ], 'vote-threshold': 'int',
            '*rewrite-corrupted': 'bool', '*read-pattern': 'QuorumReadPattern',
            '*x-parallel-writes': 'bool' } }
{ 'enum': 'ReplicationMode', 'data': [ 'primary', 'secondary' ] }
{ 'struct': 'BlockdevOptionsReplication', 'base': 'BlockdevOptionsGenericFormat',
  'data': { 'mode': 'ReplicationMode', '*top-id': 'str' } }
{ 'enum': 'SocketAddressType', 'data': [ 'inet', 'unix', 'vsock', 'fd' ] }
{ 'struct': 'InetSocketAddressBase', 'data': { 'host': 'str', 'port': 'str' } }
{ 'struct': 'InetSocketAddress', 'base': 'InetSocketAddressBase',
  'data': { '*numeric': 'bool', '*to': 'uint16', '*ipv4': 'bool', '*ipv6': 'bool' } }
{ 'struct': 'UnixSocketAddress', 'data': { 'path': 'str', '*abstract': 'bool', '*tight': 'bool' } }
{ 'struct': 'VsockSocketAddress', 'data': { 'cid': 'str', 'port': 'str' } }
{ 'struct': 'FdSocketAddress', 'data': { 'str': 'str' } }
{ 'union': 'SocketAddress', 'base': { 'type': 'SocketAddressType' }, 'discriminator': 'type',
  'data': { 'inet': 'InetSocketAddress', 'unix': 'UnixSocketAddress',
            'vsock': 'VsockSocketAddress', 'fd': 'FdSocketAddress' } }
{ 'struct': 'InetSocketAddressWrapper', 'data': { 'data': 'InetSocketAddress' } }
{ 'struct': 'UnixSocketAddressWrapper', 'data': { 'data': 'UnixSocketAddress' } }
{ 'struct': 'VsockSocketAddressWrapper', 'data': { 'data': 'VsockSocketAddress' } }
{ 'struct': 'FdSocketAddressWrapper', 'data': { 'data': 'FdSocketAddress' } }
{ 'union': 'SocketAddressLegacy', 'base': { 'type': 'SocketAddressType' },
  'discriminator': 'type',
  'data': { 'inet': 'InetSocketAddressWrapper', 'unix': 'UnixSocketAddressWrapper',
            'vsock': 'VsockSocketAddressWrapper', 'fd': 'FdSocketAddressWrapper' } }
{ 'struct': 'BlockdevOptionsNbd',
  'data': { 'server': 'SocketAddress', '*export': 'str', '*reconnect-delay': 'uint32',
            '*open-timeout': 'uint32' } }
{ 'enum': 'MirrorSyncMode', 'data': [ 'top', 'full', 'none', 'incremental', 'bitmap' ] }
{ 'enum': 'BlockdevOnError', 'data': [ 'report', 'ignore', 'enospc', 'stop', 'auto' ] }
{ 'enum': 'MirrorCopyMode', 'data': [ 'background', 'write-blocking' ] }
{ 'enum': 'BlockExportType', 'data': [ 'nbd', 'vhost-user-blk', 'fuse', 'vduse-blk' ] }
{ 'enum': 'BlockExportRemoveMode', 'data': [ 'safe', 'hard' ] }
{ 'struct': 'BlockExportOptionsNbdBase', 'data': { '*name': 'str', '*description': 'str' } }
{ 'struct': 'BlockExportOptionsNbd', 'base': 'BlockExportOptionsNbdBase',
  'data': { '*bitmaps': ['str'], '*allocation-depth': 'bool' } }
{ 'struct': 'BlockExportOptionsNone', 'data': { } }
{ 'union': 'BlockExportOptions',
  'base': { 'type': 'BlockExportType', 'id': 'str', '*fixed-iothread': 'bool',
            '*iothread': 'str', 'node-name': 'str', '*writable': 'bool',
            '*writethrough': 'bool' },
  'discriminator': 'type',
  'data': { 'nbd': 'BlockExportOptionsNbd', 'vhost-user-blk': 'BlockExportOptionsNone',
            'fuse': 'BlockExportOptionsNone', 'vduse-blk': 'BlockExportOptionsNone' } }
"#;

/// Commands: name and QAPI `data` (argument shape).
pub const COMMANDS: &[(&str, &str)] = &[
    ("blockdev-add", "'BlockdevOptions'"),
    ("blockdev-del", "{ 'node-name': 'str' }"),
    ("query-named-block-nodes", "{ '*flat': 'bool' }"),
    ("query-block", "{ }"),
    ("query-blockstats", "{ '*query-nodes': 'bool' }"),
    (
        "x-blockdev-change",
        "{ 'parent': 'str', '*child': 'str', '*node': 'str' }",
    ),
    (
        "nbd-server-start",
        "{ 'addr': 'SocketAddressLegacy', '*tls-creds': 'str', '*tls-authz': 'str', \
           '*max-connections': 'uint32' }",
    ),
    (
        "nbd-server-add",
        "{ 'device': 'str', '*name': 'str', '*description': 'str', '*writable': 'bool', \
           '*bitmap': 'str' }",
    ),
    ("block-export-add", "'BlockExportOptions'"),
    (
        "nbd-server-remove",
        "{ 'name': 'str', '*mode': 'BlockExportRemoveMode' }",
    ),
    ("nbd-server-stop", "{ }"),
    (
        "blockdev-backup",
        "{ '*job-id': 'str', 'device': 'str', 'target': 'str', 'sync': 'MirrorSyncMode', \
           '*speed': 'int', '*bitmap': 'str', '*compress': 'bool', \
           '*on-source-error': 'BlockdevOnError', '*on-target-error': 'BlockdevOnError', \
           '*auto-finalize': 'bool', '*auto-dismiss': 'bool', '*filter-node-name': 'str' }",
    ),
    (
        "block-commit",
        "{ '*job-id': 'str', 'device': 'str', '*base-node': 'str', '*base': 'str', \
           '*top-node': 'str', '*top': 'str', '*backing-file': 'str', \
           '*backing-mask-protocol': 'bool', '*speed': 'int', \
           '*on-error': 'BlockdevOnError', '*filter-node-name': 'str', \
           '*auto-finalize': 'bool', '*auto-dismiss': 'bool' }",
    ),
    (
        "blockdev-mirror",
        "{ '*job-id': 'str', 'device': 'str', 'target': 'str', '*replaces': 'str', \
           'sync': 'MirrorSyncMode', '*speed': 'int', '*granularity': 'uint32', \
           '*buf-size': 'int', '*on-source-error': 'BlockdevOnError', \
           '*on-target-error': 'BlockdevOnError', '*filter-node-name': 'str', \
           '*copy-mode': 'MirrorCopyMode', '*auto-finalize': 'bool', '*auto-dismiss': 'bool' }",
    ),
    (
        "block-stream",
        "{ '*job-id': 'str', 'device': 'str', '*base': 'str', '*base-node': 'str', \
           '*backing-file': 'str', '*backing-mask-protocol': 'bool', '*bottom': 'str', \
           '*speed': 'int', '*on-error': 'BlockdevOnError', '*filter-node-name': 'str', \
           '*auto-finalize': 'bool', '*auto-dismiss': 'bool' }",
    ),
    ("query-block-jobs", "{ }"),
    ("block-job-cancel", "{ 'device': 'str', '*force': 'bool' }"),
    ("block-job-pause", "{ 'device': 'str' }"),
    ("block-job-resume", "{ 'device': 'str' }"),
    ("block-job-complete", "{ 'device': 'str' }"),
    ("block-job-set-speed", "{ 'device': 'str', 'speed': 'int' }"),
    ("query-jobs", "{ }"),
    ("job-pause", "{ 'id': 'str' }"),
    ("job-resume", "{ 'id': 'str' }"),
    ("job-cancel", "{ 'id': 'str' }"),
    ("job-complete", "{ 'id': 'str' }"),
    ("job-finalize", "{ 'id': 'str' }"),
    ("job-dismiss", "{ 'id': 'str' }"),
    (
        "block_resize",
        "{ '*device': 'str', '*node-name': 'str', 'size': 'int' }",
    ),
    (
        "block-export-del",
        "{ 'id': 'str', '*mode': 'BlockExportRemoveMode' }",
    ),
    ("query-block-exports", "{ }"),
    (
        "xen-set-replication",
        "{ 'enable': 'bool', 'primary': 'bool', '*failover': 'bool' }",
    ),
    ("query-xen-replication-status", "{ }"),
    ("xen-colo-do-checkpoint", "{ }"),
    ("x-colo-lost-heartbeat", "{ }"),
    (super::STATUS_COMMAND, "{ '*node-name': 'str' }"),
];
