#!/bin/sh
# Fresh-image 64 KiB sequential writes, ours and `qemu-img bench` interleaved
# in the same run (same file system, same load), ROUNDS times each, N writes
# per round. Prints MiB/s per round for both sides; the final flush is untimed
# on both sides. Build first:
#   cargo build --release -p qcow-lite --example seq_fresh
# Usage: seq_fresh_vs_qemu.sh SEQ_FRESH_BINARY DIR [N] [ROUNDS]
set -eu
bin=$1 dir=$2 n=${3:-1024} rounds=${4:-12}
mkdir -p "$dir"
ours="" qemu=""
i=0
while [ "$i" -lt "$rounds" ]; do
    o=$("$bin" "$dir/ours.qcow2" "$n" 1 | awk '{print $(NF-1)}')
    qemu-img create -q -f qcow2 -o cluster_size=65536 "$dir/q.qcow2" "$((n * 64))M"
    t=$(qemu-img bench -f qcow2 -w -t writeback -d 1 -s 65536 -c "$n" "$dir/q.qcow2" |
        awk '/Run completed/ {print $4}')
    q=$(awk -v n="$n" -v t="$t" 'BEGIN {printf "%.1f", n * 64 / 1024 / t}')
    ours="$ours $o" qemu="$qemu $q"
    i=$((i + 1))
done
med() { echo "$@" | tr ' ' '\n' | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
echo "N=$n ours MiB/s:$ours  median $(med $ours)"
echo "N=$n qemu MiB/s:$qemu  median $(med $qemu)"
