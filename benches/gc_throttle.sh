#!/usr/bin/env bash
# How the background merge's knobs (mount options gc_step, gc_pause) trade
# merge speed against foreground I/O, to choose their defaults by
# measurement (issue: "Defaults chosen by measurement, not guessed").
#
# Tree: base (SIZE_MB of data) <- mid (SIZE_MB/2 of data, scattered 1 MiB
# pieces) <- leaf (4 MiB). For each setting STEP:PAUSE_MS:
#   idle:  mount with gc_idle=0, delete mid, time the background merge with
#          no other I/O (the merge copies mid's data or the leaf's, the
#          smaller: here the leaf's, so a 'commit' merge of a small leaf...
#          to make the copy size matter, the leaf holds SIZE_MB/2 + 4 MiB,
#          so the engine streams mid into the leaf: SIZE_MB/2 copied);
#   load:  the same with a foreground reader on base/disk.raw (fio, 4 KiB
#          random reads, O_DIRECT, rate-limited to FG_IOPS) for RUNTIME s:
#          the reader's mean and p99 latency, and how much the merge did.
# A baseline load run without any merge comes first.
#
# Knobs: SIZE_MB (256), SETTINGS ("1M:0 4M:0 4M:5 16M:5 4M:25 64M:0"),
# FG_IOPS (1000), RUNTIME (15), KEEP=1 (keep the temp dir under /var/tmp),
# SNAPTREE_BIN (use this binary instead of `cargo build --release`).
# Needs root, /dev/fuse, qemu-img, fio.
#
#   sudo bash benches/gc_throttle.sh
#   SIZE_MB=64 SETTINGS="4M:5" RUNTIME=5 sudo bash benches/gc_throttle.sh   # quick

set -euo pipefail
export LC_ALL=C
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SIZE_MB=${SIZE_MB:-256}
SETTINGS=${SETTINGS:-"1M:0 4M:0 4M:5 16M:5 4M:25 64M:0"}
FG_IOPS=${FG_IOPS:-1000}
RUNTIME=${RUNTIME:-15}

[[ $(id -u) -eq 0 ]] || skip_all "not root"
[[ -c /dev/fuse ]] || skip_all "no /dev/fuse"
require_tools qemu-img qemu-io fio
build_snaptree

make_workdir snaptree-gc
MNT=$T/mnt

# ------------------------------------------------------------ the template
S=$((SIZE_MB * 1024 * 1024))
HALF=$((SIZE_MB / 2))
mkdir "$T/tpl"
(
    cd "$T/tpl"
    qemu-img create -q -f qcow2 base.qcow2 "$S"
    qemu-io -f qcow2 -c "write -P 0x11 0 $S" base.qcow2 >/dev/null
    qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2 "$S"
    qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 leaf.qcow2 "$S"
    args=()
    for ((i = 0; i < HALF; i++)); do args+=(-c "write -P 0x22 $((i * 2))M 1M"); done
    qemu-io -f qcow2 "${args[@]}" mid.qcow2 >/dev/null
    args=()
    for ((i = 0; i < HALF + 4; i++)); do args+=(-c "write -P 0x33 $(((i * 2 + 1) % SIZE_MB))M 1M"); done
    qemu-io -f qcow2 "${args[@]}" leaf.qcow2 >/dev/null
)

fresh() {
    rm -rf "$T/tree"
    cp -a --sparse=always "$T/tpl" "$T/tree"
}

merged() { ! grep -q mid "$MNT/tree"; }

# fio on base/disk.raw for RUNTIME s; prints "mean_us p99_us iops".
fg_load() {
    fio --name=fg --filename="$MNT/base/disk.raw" --rw=randread --bs=4k --direct=1 \
        --ioengine=psync --rate_iops="$FG_IOPS" --time_based --runtime="$RUNTIME" \
        --output-format=json >"$T/fio.json" 2>"$T/fio.err" &
    FIO_PID=$!
}

fg_wait() {
    wait "$FIO_PID" || die "fio failed: $(cat "$T/fio.err")"
    FIO_PID=""
}

fg_result() {
    python3 - "$T/fio.json" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]["read"]
c = j["clat_ns"]
p99 = c.get("percentile", {}).get("99.000000", 0)
print(f'{c["mean"] / 1000:.0f} {p99 / 1000:.0f} {j["iops"]:.0f}')
PY
}

done_bytes() { # from status: "X of Y done"
    sed -n 's/.*: \(.*\) of \(.*\) done.*/\1/p' "$MNT/status" | head -1
}

log "baseline: foreground reads, no merge"
fresh
start_snaptree "$T/tree" -o gc_idle=off
fg_load
fg_wait
read -r b_mean b_p99 b_iops < <(fg_result)
stop_snaptree_ok

printf '\n%-10s %12s %10s | %-32s\n' "setting" "idle merge" "MB/s" "under load: mean/p99 latency, merged"
printf '%-10s %12s %10s | baseline: %s us / %s us, %s IOPS\n' "-" "-" "-" "$b_mean" "$b_p99" "$b_iops"
for s in $SETTINGS; do
    step=${s%%:*}
    pause=${s##*:}
    opts="gc_idle=0,gc_step=$step,gc_pause=$pause"

    fresh
    start_snaptree "$T/tree" -o "$opts"
    t0=$(now)
    echo delete >"$MNT/mid/ctl"
    until merged; do sleep 0.05; done
    t1=$(now)
    stop_snaptree_ok
    check_images "after $s" "$T/tree/leaf.qcow2"
    idle_s=$(echo "$t1 - $t0" | bc -l)
    rate=$(echo "$HALF / $idle_s" | bc -l)

    fresh
    start_snaptree "$T/tree" -o "$opts"
    fg_load
    sleep 1
    echo delete >"$MNT/mid/ctl"
    sleep $((RUNTIME - 2))
    progress=$(if merged; then echo "all"; else done_bytes; fi)
    fg_wait
    read -r mean p99 iops < <(fg_result)
    stop_snaptree_ok
    printf '%-10s %10.2f s %10.0f | %s us / %s us, %s IOPS, merged: %s\n' \
        "$s" "$idle_s" "$rate" "$mean" "$p99" "$iops" "$progress"
done
