#!/bin/bash
# Throughput of our NBD server against qemu-nbd, both serving the same raw image,
# with `qemu-img bench` as the client: 64 KiB sequential reads and writes, queue
# depth 1 and 16, Unix socket and TCP loopback. Run from the workspace root:
#   crates/nbd/bench.sh [COUNT] [ROUNDS]
# Prints one line per run: server transport op depth MiB/s.
set -euo pipefail
COUNT=${1:-4096}
ROUNDS=${2:-2}
for t in qemu-img qemu-nbd; do
  command -v $t >/dev/null || { echo "$t missing: apt-get install -y qemu-utils" >&2; exit 1; }
done
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
cargo build -q --release -p nbd --example serve
SERVE=$CARGO_TARGET_DIR/release/examples/serve
DIR=$(mktemp -d)
IMG=$DIR/bench.raw
dd if=/dev/zero of=$IMG bs=1M count=256 status=none
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$DIR"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_sock() { for _ in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }

bench() { # name url op depth
  local w=""; [ "$3" = write ] && w="-w"
  local secs
  secs=$(qemu-img bench -f raw -c "$COUNT" -d "$4" -s 64k $w "$2" | sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p')
  python3 -c "print('%-8s %-5s %-5s depth=%-2s %8.1f MiB/s' % ('$1', '$5', '$3', '$4', $COUNT*64/1024/$secs))"
}

run_server() { # ours|qemu-nbd unix|tcp
  local sock=$DIR/$1.sock port url
  port=$(free_port)
  rm -f "$sock"
  if [ "$1" = ours ]; then
    if [ "$2" = unix ]; then $SERVE --file "$IMG" --unix "$sock" --name bench 2>/dev/null &
    else $SERVE --file "$IMG" --port "$port" --name bench 2>/dev/null & fi
  else
    if [ "$2" = unix ]; then qemu-nbd -t -f raw -x bench --cache=writeback --aio=threads -k "$sock" "$IMG" &
    else qemu-nbd -t -f raw -x bench --cache=writeback --aio=threads --bind 127.0.0.1 --port "$port" "$IMG" & fi
  fi
  PIDS+=($!)
  if [ "$2" = unix ]; then wait_sock "$sock"; url="nbd+unix:///bench?socket=$sock"
  else
    for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.05; done
    url="nbd://127.0.0.1:$port/bench"
  fi
  for op in read write; do
    for d in 1 16; do
      bench "$1" "$url" $op $d "$2"
    done
  done
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  PIDS=()
}

OUT=$DIR/results.txt
echo "qemu-img bench -f raw -c $COUNT -s 64k [-w] -d {1,16} URL; image 256 MiB raw; $(nproc) CPUs"
for r in $(seq "$ROUNDS"); do
  for t in unix tcp; do
    run_server ours $t | tee -a "$OUT"
    run_server qemu-nbd $t | tee -a "$OUT"
  done
done
echo "median of $ROUNDS rounds (MiB/s):"
python3 - "$OUT" <<'PY'
import sys, statistics, collections
r = collections.defaultdict(list)
for line in open(sys.argv[1]):
    f = line.split()
    r[(f[1], f[2], f[3])].append((f[0], float(f[4])))
print("%-5s %-5s %-9s %10s %10s %7s" % ("", "", "", "ours", "qemu-nbd", "ratio"))
for k in sorted(r):
    o = statistics.median(v for s, v in r[k] if s == "ours")
    q = statistics.median(v for s, v in r[k] if s == "qemu-nbd")
    print("%-5s %-5s %-9s %10.1f %10.1f %7.2f" % (k[0], k[1], k[2], o, q, o / q))
PY
