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

run_server() { # ours|qemu-nbd
  local sock=$DIR/$1.sock port
  port=$(free_port)
  rm -f "$sock"
  if [ "$1" = ours ]; then
    $SERVE --file "$IMG" --unix "$sock" --port "$port" --name bench 2>/dev/null &
  else
    qemu-nbd -t -f raw -x bench --cache=writeback --aio=threads -k "$sock" "$IMG" &
    PIDS+=($!)
    wait_sock "$sock"
    qemu-nbd -t -f raw -x bench --cache=writeback --aio=threads --bind 127.0.0.1 --port "$port" --shared=4 -U "$IMG" &
  fi
  PIDS+=($!)
  wait_sock "$sock"
  sleep 0.3
  for op in read write; do
    for d in 1 16; do
      bench "$1" "nbd+unix:///bench?socket=$sock" $op $d unix
      bench "$1" "nbd://127.0.0.1:$port/bench" $op $d tcp
    done
  done
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  PIDS=()
}

echo "qemu-img bench -f raw -c $COUNT -s 64k [-w] -d {1,16} URL; image 256 MiB raw; $(nproc) CPUs"
for r in $(seq "$ROUNDS"); do
  run_server ours
  run_server qemu-nbd
done
