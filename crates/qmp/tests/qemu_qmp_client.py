#!/usr/bin/env python3
"""Drives a qmp-crate test server with QEMU's own Python QMP library.

Usage: qemu_qmp_client.py UNIX_SOCKET_PATH TCP_PORT

The server (started by tests/qemu_qmp.rs) serves the dummy commands of
tests/common/mod.rs. Exits non-zero with a message on the first mismatch.
"""

import sys

from qemu.qmp import ExecuteError
from qemu.qmp.legacy import QEMUMonitorProtocol


def expect_error(qmp, cls, desc, name, **args):
    try:
        ret = qmp.cmd(name, **args)
    except ExecuteError as err:
        assert err.error_class == cls, (name, err.error_class, cls)
        assert str(err) == desc, (name, str(err), desc)
        return
    raise AssertionError(f"{name} {args} succeeded with {ret!r}, expected {cls}")


def main():
    path, port = sys.argv[1], int(sys.argv[2])

    qmp = QEMUMonitorProtocol(path)
    greeting = qmp.connect(negotiate=True)
    version = greeting["QMP"]["version"]
    assert version["qemu"] == {"major": 9, "minor": 2, "micro": 0}, version
    assert version["package"].startswith("blockrep "), version
    assert greeting["QMP"]["capabilities"] == [], greeting

    assert qmp.cmd("x-add", a=40, b=2) == 42
    assert qmp.cmd("x-echo", value={"nested": [1, "two", None, True]}) == {
        "value": {"nested": [1, "two", None, True]}
    }
    assert qmp.cmd("query-version") == version
    names = sorted(c["name"] for c in qmp.cmd("query-commands"))
    assert names == sorted([
        "qmp_capabilities", "query-commands", "query-version", "quit",
        "x-add", "x-echo", "x-emit", "x-fail",
    ]), names

    expect_error(qmp, "DeviceNotFound", "Device 'd0' not found", "x-fail", device="d0")
    expect_error(qmp, "CommandNotFound", "The command no-such-command has not been found",
                 "no-such-command")
    expect_error(qmp, "GenericError", "Parameter 'bogus' is unexpected",
                 "x-add", a=1, b=2, bogus=3)
    expect_error(qmp, "GenericError", "Parameter 'b' is missing", "x-add", a=1)
    expect_error(qmp, "GenericError", "Invalid parameter type for 'a', expected: integer",
                 "x-add", a="1", b=2)
    expect_error(qmp, "CommandNotFound",
                 "Capabilities negotiation is already complete, command ignored",
                 "qmp_capabilities")

    # Raw messages (no automatic id), as iotests send them.
    raw = qmp.cmd_obj({"execute": "x-add", "arguments": {"a": 1, "b": 1}, "id": "mine"})
    assert raw == {"return": 2, "id": "mine"}, raw

    # Events.
    assert qmp.cmd("x-emit", event="TEST_EVENT", data={"k": "v"}) == {}
    ev = qmp.pull_event(wait=5.0)
    assert ev["event"] == "TEST_EVENT", ev
    assert ev["data"] == {"k": "v"}, ev
    assert set(ev["timestamp"]) == {"seconds", "microseconds"}, ev

    # A second client at once, over TCP; events go to both.
    tcp = QEMUMonitorProtocol(("127.0.0.1", port))
    tcp.connect(negotiate=True)
    assert tcp.cmd("x-add", a=1, b=2) == 3
    tcp.cmd("x-emit", event="SECOND")
    assert qmp.pull_event(wait=5.0)["event"] == "SECOND"
    assert tcp.pull_event(wait=5.0)["event"] == "SECOND"
    tcp.close()

    assert qmp.cmd("quit") == {}
    try:
        qmp.close()
    except EOFError:
        # The server hangs up after quit; QEMU does too, and QEMU's own
        # machine.py accepts EOFError here once 'quit' was issued.
        pass


if __name__ == "__main__":
    main()
