#!/usr/bin/env python3
"""Drives `blockrep serve` with QEMU's own Python QMP library (qemu.qmp).

Usage: serve_qemu_qmp_client.py QMP_SOCKET WORK_DIR

Runs every command of the daemon at least once (with QEMU's argument
shapes), checks errors by class and wording, and waits for the job events
(JOB_STATUS_CHANGE, BLOCK_JOB_READY, BLOCK_JOB_COMPLETED,
BLOCK_JOB_CANCELLED). Exits non-zero with a message on the first mismatch.
Started by tests/serve_qemu_qmp.rs.
"""

import asyncio
import os
import sys
import time

from qemu.qmp import ExecuteError
from qemu.qmp.legacy import QEMUMonitorProtocol

MIB = 1 << 20
SEEN = []  # every event received, in order


def cmd(qmp, name, /, **args):
    return qmp.cmd(name, **args)


def expect_error(qmp, cls, desc, name, /, **args):
    try:
        ret = qmp.cmd(name, **args)
    except ExecuteError as err:
        assert err.error_class == cls, (name, err.error_class, cls, str(err))
        if desc is not None:
            assert str(err) == desc, (name, str(err), desc)
        return str(err)
    raise AssertionError(f"{name} {args} succeeded with {ret!r}, expected {cls}")


def wait_event(qmp, name, pred=lambda d: True, timeout=30.0):
    deadline = time.time() + timeout
    for ev in SEEN:
        if ev["event"] == name and pred(ev.get("data", {})) and not ev.get("_used"):
            ev["_used"] = True
            return ev
    while True:
        left = deadline - time.time()
        if left <= 0:
            raise AssertionError(f"no {name} event within {timeout}s; seen {SEEN}")
        try:
            ev = qmp.pull_event(wait=left)
        except asyncio.TimeoutError:
            continue
        if ev is None:
            continue
        assert "timestamp" in ev and "seconds" in ev["timestamp"], ev
        SEEN.append(ev)
        if ev["event"] == name and pred(ev.get("data", {})):
            ev["_used"] = True
            return ev


def job_of(qmp, job_id):
    for j in cmd(qmp, "query-block-jobs"):
        if j["device"] == job_id:
            return j
    return None


def main():
    sock, work = sys.argv[1], sys.argv[2]
    qmp = QEMUMonitorProtocol(sock)
    greeting = qmp.connect(negotiate=True)
    assert greeting["QMP"]["capabilities"] == [], greeting

    # --- introspection
    version = cmd(qmp, "query-version")
    assert version["package"].startswith("blockrep"), version
    names = {c["name"] for c in cmd(qmp, "query-commands")}
    wanted = """blockdev-add blockdev-del query-named-block-nodes query-block
        query-blockstats x-blockdev-change nbd-server-start nbd-server-add
        block-export-add nbd-server-remove nbd-server-stop blockdev-backup
        block-commit blockdev-mirror block-stream query-block-jobs
        block-job-cancel block-job-pause block-job-resume block-job-complete
        block-job-set-speed job-dismiss xen-set-replication
        query-xen-replication-status xen-colo-do-checkpoint
        x-colo-lost-heartbeat x-blockrep-query-replication query-version
        query-commands quit qmp_capabilities""".split()
    missing = [w for w in wanted if w not in names]
    assert not missing, missing

    # --- blockdev-add, every driver
    raw = os.path.join(work, "f0.raw")
    with open(raw, "wb") as f:
        f.truncate(4 * MIB)
    qc = os.path.join(work, "qc0.qcow2")
    assert os.path.exists(qc), "the Rust test creates qc0.qcow2 with qemu-img"
    cmd(qmp, "blockdev-add", driver="memory", **{"node-name": "m0"}, size=4 * MIB)
    cmd(qmp, "blockdev-add", driver="raw", **{"node-name": "f0"},
        file={"driver": "file", "filename": raw})
    cmd(qmp, "blockdev-add", driver="null-co", **{"node-name": "n0"}, size=4 * MIB)
    cmd(qmp, "blockdev-add", driver="blkdebug", **{"node-name": "bd0"},
        image={"driver": "null-co", "size": 4 * MIB},
        **{"inject-error": [{"event": "pwritev", "iotype": "write", "errno": 5,
                             "sector": 0, "once": True}]})
    cmd(qmp, "blockdev-add", driver="quorum", **{"node-name": "q0"},
        children=["m0", {"driver": "memory", "size": 4 * MIB}],
        **{"vote-threshold": 1, "read-pattern": "fifo"})
    cmd(qmp, "blockdev-add", driver="qcow2", **{"node-name": "qc0"},
        file={"driver": "file", "filename": qc})
    cmd(qmp, "blockdev-add", driver="replication", **{"node-name": "rp0"},
        mode="primary", file={"driver": "null-co", "size": 4 * MIB})
    expect_error(qmp, "GenericError", None, "blockdev-add", driver="memory",
                 **{"node-name": "m0"}, size=MIB)
    expect_error(qmp, "GenericError", "Parameter 'driver' does not accept value 'vmdk'",
                 "blockdev-add", driver="vmdk", **{"node-name": "x"})

    nodes = {n["node-name"]: n for n in cmd(qmp, "query-named-block-nodes")}
    for n in ["m0", "f0", "n0", "bd0", "q0", "qc0", "rp0"]:
        assert n in nodes, (n, sorted(nodes))
    assert nodes["qc0"]["drv"] == "qcow2" and nodes["qc0"]["image"]["virtual-size"] == 4 * MIB
    assert nodes["f0"]["image"]["filename"] == raw or nodes["f0"]["file"] == raw, nodes["f0"]

    # --- x-blockdev-change: add a third quorum child, then remove it
    cmd(qmp, "blockdev-add", driver="memory", **{"node-name": "m9"}, size=4 * MIB)
    cmd(qmp, "x-blockdev-change", parent="q0", node="m9")
    q0 = {n["node-name"]: n for n in cmd(qmp, "query-named-block-nodes")}["q0"]
    assert {"child": "children.2", "node-name": "m9"} in q0["children"], q0
    cmd(qmp, "x-blockdev-change", parent="q0", child="children.2")
    expect_error(qmp, "GenericError", "The parameters child and node are in conflict",
                 "x-blockdev-change", parent="q0", child="children.0", node="m9")
    expect_error(qmp, "DeviceNotFound", "Cannot find device='nope' nor node-name='nope'",
                 "x-blockdev-change", parent="nope", node="m9")

    # --- NBD server and exports
    nbd_sock = os.path.join(work, "nbd.sock")
    cmd(qmp, "nbd-server-start", addr={"type": "unix", "data": {"path": nbd_sock}})
    expect_error(qmp, "GenericError", "NBD server already running", "nbd-server-start",
                 addr={"type": "unix", "data": {"path": nbd_sock + "2"}})
    cmd(qmp, "nbd-server-add", device="m9", name="m9", writable=True)
    cmd(qmp, "block-export-add", type="nbd", id="e-f0", **{"node-name": "f0"}, name="f0",
        writable=False)
    expect_error(qmp, "DeviceNotFound", "Cannot find device='nope' nor node-name='nope'",
                 "nbd-server-add", device="nope")
    cmd(qmp, "blockdev-add", driver="nbd", **{"node-name": "nb0"},
        server={"type": "unix", "path": nbd_sock}, export="f0", **{"read-only": True})
    assert {n["node-name"] for n in cmd(qmp, "query-named-block-nodes")} >= {"nb0"}
    devices = {b["device"] for b in cmd(qmp, "query-block")}
    assert {"m9", "e-f0"} <= devices, devices
    stats = cmd(qmp, "query-blockstats")
    assert any(s["device"] == "m9" for s in stats), stats
    stats = cmd(qmp, "query-blockstats", **{"query-nodes": True})
    assert any(s["node-name"] == "q0" and "rd_bytes" in s["stats"] for s in stats), stats
    # nb0 is connected to f0: a safe removal is refused, a hard one works
    expect_error(qmp, "GenericError", None, "nbd-server-remove", name="f0", mode="safe")
    cmd(qmp, "blockdev-del", **{"node-name": "nb0"})
    cmd(qmp, "nbd-server-remove", name="f0", mode="hard")
    expect_error(qmp, "GenericError", None, "nbd-server-remove", name="f0")

    # --- block jobs
    for n in ["src", "dst", "msrc", "mdst", "cbase", "ndst"]:
        cmd(qmp, "blockdev-add", driver="memory", **{"node-name": n}, size=4 * MIB)
    cmd(qmp, "blockdev-add", driver="memory", **{"node-name": "ctop"}, backing="cbase")
    cmd(qmp, "blockdev-add", driver="memory", **{"node-name": "sbase"}, size=4 * MIB)
    cmd(qmp, "blockdev-add", driver="memory", **{"node-name": "stop"}, backing="sbase")

    # backup sync=full: runs to completion
    cmd(qmp, "blockdev-backup", **{"job-id": "bk1"}, device="src", target="dst", sync="full")
    ev = wait_event(qmp, "BLOCK_JOB_COMPLETED", lambda d: d["device"] == "bk1")
    assert ev["data"]["type"] == "backup" and "error" not in ev["data"], ev
    wait_event(qmp, "JOB_STATUS_CHANGE", lambda d: d["id"] == "bk1" and d["status"] == "concluded")

    # backup sync=none runs until cancelled
    cmd(qmp, "blockdev-backup", **{"job-id": "bk2"}, device="src", target="ndst", sync="none",
        speed=0)
    wait_event(qmp, "JOB_STATUS_CHANGE", lambda d: d["id"] == "bk2" and d["status"] == "running")
    expect_error(qmp, "GenericError", "Job ID 'bk2' already in use", "blockdev-backup",
                 **{"job-id": "bk2"}, device="src", target="ndst", sync="none")
    cmd(qmp, "block-job-cancel", device="bk2")
    ev = wait_event(qmp, "BLOCK_JOB_CANCELLED", lambda d: d["device"] == "bk2")
    assert ev["data"]["type"] == "backup", ev

    # mirror: ready, speed, pause/resume, complete
    cmd(qmp, "blockdev-mirror", **{"job-id": "mir1"}, device="msrc", target="mdst", sync="full")
    ev = wait_event(qmp, "BLOCK_JOB_READY", lambda d: d["device"] == "mir1")
    assert ev["data"]["type"] == "mirror", ev
    cmd(qmp, "block-job-set-speed", device="mir1", speed=1 << 30)
    assert job_of(qmp, "mir1")["speed"] == 1 << 30
    cmd(qmp, "block-job-pause", device="mir1")
    deadline = time.time() + 10
    while not job_of(qmp, "mir1")["paused"]:
        assert time.time() < deadline, job_of(qmp, "mir1")
        time.sleep(0.02)
    cmd(qmp, "block-job-resume", device="mir1")
    cmd(qmp, "block-job-complete", device="mir1")
    ev = wait_event(qmp, "BLOCK_JOB_COMPLETED", lambda d: d["device"] == "mir1")
    assert "error" not in ev["data"], ev

    # active commit (ctop into cbase): ready, then complete
    cmd(qmp, "block-commit", **{"job-id": "cm1"}, device="ctop")
    wait_event(qmp, "BLOCK_JOB_READY", lambda d: d["device"] == "cm1")
    cmd(qmp, "block-job-complete", device="cm1")
    ev = wait_event(qmp, "BLOCK_JOB_COMPLETED", lambda d: d["device"] == "cm1")
    assert ev["data"]["type"] == "commit" and "error" not in ev["data"], ev

    # intermediate commit: pmid into pbase, ptop's backing becomes pbase
    cmd(qmp, "blockdev-add", driver="memory", **{"node-name": "pbase"}, size=4 * MIB)
    cmd(qmp, "blockdev-add", driver="memory", **{"node-name": "pmid"}, backing="pbase")
    cmd(qmp, "blockdev-add", driver="memory", **{"node-name": "ptop"}, backing="pmid")
    cmd(qmp, "block-commit", **{"job-id": "cm2"}, device="ptop", **{"top-node": "pmid",
        "base-node": "pbase"})
    ev = wait_event(qmp, "BLOCK_JOB_COMPLETED", lambda d: d["device"] == "cm2")
    assert ev["data"]["type"] == "commit" and "error" not in ev["data"], ev
    ptop = {n["node-name"]: n for n in cmd(qmp, "query-named-block-nodes")}["ptop"]
    assert {"child": "backing", "node-name": "pbase"} in ptop["children"], ptop

    # stream (sbase into stop), kept until dismissed
    cmd(qmp, "block-stream", **{"job-id": "st1"}, device="stop", **{"auto-dismiss": False})
    ev = wait_event(qmp, "BLOCK_JOB_COMPLETED", lambda d: d["device"] == "st1")
    assert ev["data"]["type"] == "stream" and "error" not in ev["data"], ev
    wait_event(qmp, "JOB_STATUS_CHANGE", lambda d: d["id"] == "st1" and d["status"] == "concluded")
    assert job_of(qmp, "st1")["status"] == "concluded"
    cmd(qmp, "job-dismiss", id="st1")
    assert job_of(qmp, "st1") is None
    stop = {n["node-name"]: n for n in cmd(qmp, "query-named-block-nodes")}["stop"]
    assert "backing_file" not in stop, stop

    # an I/O error with on-target-error=stop: BLOCK_JOB_ERROR, job paused
    cmd(qmp, "blockdev-add", driver="blkdebug", **{"node-name": "bad"},
        image={"driver": "memory", "size": 4 * MIB},
        **{"inject-error": [{"event": "pwritev", "errno": 5},
                            {"event": "pwritev_zero", "errno": 5}]})
    cmd(qmp, "blockdev-backup", **{"job-id": "bk3"}, device="f0", target="bad", sync="full",
        **{"on-target-error": "stop"})
    ev = wait_event(qmp, "BLOCK_JOB_ERROR", lambda d: d["device"] == "bk3")
    assert ev["data"] == {"device": "bk3", "operation": "write", "action": "stop"}, ev
    cmd(qmp, "block-job-cancel", device="bk3", force=True)
    wait_event(qmp, "BLOCK_JOB_CANCELLED", lambda d: d["device"] == "bk3")

    for verb in ["block-job-cancel", "block-job-pause", "block-job-resume",
                 "block-job-complete"]:
        expect_error(qmp, "DeviceNotActive", "Block job 'nojob' not found", verb,
                     device="nojob")
    expect_error(qmp, "DeviceNotActive", "Block job 'nojob' not found",
                 "block-job-set-speed", device="nojob", speed=0)
    expect_error(qmp, "GenericError", "Job not found", "job-dismiss", id="nojob")

    # --- replication commands (rp0: primary mode over null-co)
    expect_error(qmp, "GenericError", "Parameter 'failover' is only for stopping replication",
                 "xen-set-replication", enable=True, primary=True, failover=True)
    cmd(qmp, "xen-set-replication", enable=True, primary=True)
    assert cmd(qmp, "query-xen-replication-status") == {"error": False}
    cmd(qmp, "xen-colo-do-checkpoint")
    st = cmd(qmp, "x-blockrep-query-replication")
    assert [s["node-name"] for s in st] == ["rp0"] and st[0]["state"] == "RUNNING", st
    cmd(qmp, "x-colo-lost-heartbeat")
    st = cmd(qmp, "x-blockrep-query-replication", **{"node-name": "rp0"})
    assert st[0]["state"] in ("FAILOVER", "DONE"), st
    expect_error(qmp, "GenericError", "The feature 'colo' is not enabled",
                 "x-colo-lost-heartbeat")
    cmd(qmp, "xen-set-replication", enable=False, primary=True, failover=True)

    # --- blockdev-del, nbd-server-stop
    expect_error(qmp, "GenericError", "Failed to find node with node-name='nope'",
                 "blockdev-del", **{"node-name": "nope"})
    expect_error(qmp, "GenericError", None, "blockdev-del", **{"node-name": "m9"})  # exported
    expect_error(qmp, "GenericError", None, "blockdev-del", **{"node-name": "m0"})  # in q0
    cmd(qmp, "blockdev-del", **{"node-name": "n0"})
    cmd(qmp, "nbd-server-stop")
    expect_error(qmp, "GenericError", "NBD server not running", "nbd-server-stop")
    cmd(qmp, "blockdev-del", **{"node-name": "bd0"})

    kinds = {e["event"] for e in SEEN}
    for k in ["JOB_STATUS_CHANGE", "BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED",
              "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR"]:
        assert k in kinds, (k, kinds)

    cmd(qmp, "quit")
    try:
        qmp.close()
    except EOFError:
        pass  # the daemon closed the connection after quit, as QEMU does
    print("ok")


if __name__ == "__main__":
    main()
