#!/usr/bin/env python3
"""Fresh-image write throughput of `blockrep img bench` binaries against
`qemu-img bench`, interleaved (one run of each side in turn, a new image
created before every run, the first round unrecorded), timed by wall clock
from spawn to exit like `cargo xtask bench`.

usage: fresh_writes_vs_qemu.py DIR ROUNDS SIZE_MIB DEPTH CACHE BS STEP NAME=BLOCKREP...
e.g.   fresh_writes_vs_qemu.py target/tmp 9 16 1 none 65536 65536 \\
           before=/tmp/blockrep-old after=target/release/blockrep
"""
import os, statistics as st, subprocess, sys, time

d, R, S, D, C, BS, STEP = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], int(sys.argv[6]), int(sys.argv[7])
sides = {k: [v, "img"] for k, v in (a.split("=", 1) for a in sys.argv[8:])}
sides["qemu-img"] = ["qemu-img"]
img = os.path.join(d, "fresh-vs-qemu.qcow2")
cnt = (S * 2**20 - BS) // STEP
v = {k: [] for k in sides}
l0 = os.getloadavg()[0]
for i in range(R + 1):
    for k, pre in sides.items():
        if os.path.exists(img):
            os.unlink(img)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", img, f"{S}M"], check=True)
        os.sync()
        cmd = pre + ["bench", "-q", "-f", "qcow2", "-t", C, "-d", D, "-c", str(cnt), "-s", str(BS), "-S", str(STEP), "-w", "--pattern=90", img]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        dt = time.perf_counter() - t
        if i > 0:
            v[k].append(cnt * BS / 2**20 / dt)
m = {k: st.median(x) for k, x in v.items()}
print(f"fresh, -s {BS} -S {STEP} -t {C} -d {D}, {S} MiB, {R} runs each, load {l0:.1f}->{os.getloadavg()[0]:.1f}")
for k in v:
    print(f"  {k}: median {m[k]:.1f} MiB/s [{min(v[k]):.0f}..{max(v[k]):.0f}], ratio to qemu-img {m[k] / m['qemu-img']:.2f}")
