#!/usr/bin/env bash
# Read throughput through a deep VHD chain (issue: "a 30-deep VHD chain vs
# depth 1, goal >= 95%, and vs vhdimount on the same chain").
#
# Builds with snaptree itself: a dynamic VHD base (qemu-img create -f vpc,
# SIZE_MB), then DEPTH-1 snapshots through the mount, each level writing
# its own share of the data first: level k owns every DEPTH-th stripe of
# STRIPE_KB, so reads resolve through the whole chain. With the default
# 2048 KiB stripes (the VHD block size) each level holds whole blocks, the
# case XCP's "fully allocated" bits serve without reading bitmaps; smaller
# stripes leave every level's blocks partly allocated. Depth 1 is the same
# bytes in one dynamic VHD (qemu-img convert -O vpc of the flattened leaf).
#
# A third tree, "same bytes, deeper chain", is that depth-1 VHD with DEPTH-1
# empty differencing disks on top (snapshots through the mount): reads
# then resolve through the whole chain but every byte comes from one file,
# so only the cost of resolution changes with depth. The spread layout adds
# what the kernel pays to read DEPTH files instead of one (as the qcow2
# chain_depth benchmark shows, a bare pread loop pays that too).
#
# Measures sequential reads of the leaf, `dd bs=1M` to /dev/null, caches
# dropped before each (median of RUNS interleaved rounds, each through a
# fresh mount): snaptree's disk.raw on the three trees, and libvhdi's
# vhdimount (FUSE, read-only) on them.
#
# Needs root (mounts, drop_caches), /dev/fuse, qemu-img; vhdimount
# (libvhdi-utils) is optional: its rows say SKIP with the reason.
#
# Knobs: SIZE_MB (512), DEPTH (30), STRIPE_KB (2048), RUNS (5), KEEP=1,
# SNAPTREE_BIN.
#
#   sudo bash benches/vhd_chain.sh
#   SIZE_MB=64 DEPTH=8 RUNS=1 sudo bash benches/vhd_chain.sh   # quick
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

SIZE_MB=${SIZE_MB:-512}
DEPTH=${DEPTH:-30}
STRIPE_KB=${STRIPE_KB:-2048}
RUNS=${RUNS:-5}
((DEPTH >= 2)) || die "DEPTH must be at least 2"

[[ $(id -u) == 0 ]] || skip_all "needs root (mounts, drop_caches)"
[[ -c /dev/fuse ]] || skip_all "no /dev/fuse"
require_tools qemu-img
VHDI_SKIP=""
command -v vhdimount >/dev/null || VHDI_SKIP="vhdimount is not on PATH (apt-get install libvhdi-utils)"

build_snaptree
make_workdir snaptree-vhd
CLEANUP_STEPS=(stop_snaptree stop_vhdimount)
VM_PID=""
VM_DIR=$T/vhdi

stop_vhdimount() {
    [[ -n $VM_PID ]] || return 0
    is_mounted "$VM_DIR" && { fusermount3 -u "$VM_DIR" 2>/dev/null || umount -l "$VM_DIR" 2>/dev/null || true; }
    wait_gone "$VM_PID" 50 || kill -KILL "$VM_PID" 2>/dev/null || true
    wait "$VM_PID" 2>/dev/null || true
    VM_PID=""
}

# start_vhdimount IMAGE: vhdimount in the foreground (-v) as our child.
# It shows the chain as vhdi1 (the root) .. vhdiN (IMAGE): VM_FILE is vhdiN.
start_vhdimount() {
    mkdir -p "$VM_DIR"
    vhdimount -v "$1" "$VM_DIR" </dev/null >/dev/null 2>"$T/vhdimount.log" &
    VM_PID=$!
    local n=100 i=1
    until [[ -e $VM_DIR/vhdi1 ]]; do
        kill -0 "$VM_PID" 2>/dev/null || { VM_PID=""; return 1; }
        ((n-- > 0)) || return 1
        sleep 0.1
    done
    while [[ -e $VM_DIR/vhdi$((i + 1)) ]]; do i=$((i + 1)); done
    VM_FILE=$VM_DIR/vhdi$i
}

# seq_read FILE: MB/s of one cold sequential read.
seq_read() {
    local t0 s
    drop_caches
    t0=$(now)
    dd if="$1" of=/dev/null bs=1M status=none
    s=$(elapsed "$t0")
    awk -v m="$SIZE_MB" -v s="$s" 'BEGIN { printf "%.0f", m / s }'
}

# median N...: the median of its arguments.
median() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# --- build the deep chain through the mount ---------------------------------
DEEP=$T/deep
mkdir -p "$DEEP"
qemu-img create -q -f vpc -o subformat=dynamic,force_size=on "$DEEP/leaf.vhd" "${SIZE_MB}M"
start_snaptree "$DEEP" -o gc_idle=off
stripes=$((SIZE_MB * 1024 / STRIPE_KB))
log "building a $DEPTH-deep chain: $stripes stripes of $STRIPE_KB KiB, level k writes stripes i with i % $DEPTH == k"
for ((k = 0; k < DEPTH; k++)); do
    for ((i = k; i < stripes; i += DEPTH)); do
        # Distinct bytes per level and stripe, so a wrong layer shows.
        head -c $((STRIPE_KB * 1024)) /dev/urandom |
            dd of="$ST_MNT/leaf/disk.raw" bs=1K seek=$((i * STRIPE_KB)) conv=notrunc,fsync status=none
    done
    ((k == DEPTH - 1)) || echo "snapshot l$k" >"$ST_MNT/leaf/ctl"
done
depth=$(grep -o '"chain_depth": *[0-9]*' "$ST_MNT/leaf/info.json" | grep -o '[0-9]*$')
[[ $depth == "$DEPTH" ]] || die "the leaf's chain depth is $depth, not $DEPTH"
md5_mount=$(md5sum <"$ST_MNT/leaf/disk.raw" | cut -d' ' -f1)
stop_snaptree_ok

# --- depth 1: the same bytes in one dynamic VHD --------------------------------
FLAT=$T/flat
mkdir -p "$FLAT"
"$BIN" export --quiet "$DEEP/leaf.vhd" "$T/leaf.raw"
qemu-img convert -O vpc -o subformat=dynamic,force_size=on "$T/leaf.raw" "$FLAT/leaf.vhd"
rm -f "$T/leaf.raw"

# --- same bytes, deeper: empty differencing disks on the depth-1 VHD ---------
SAME=$T/same
mkdir -p "$SAME"
cp "$FLAT/leaf.vhd" "$SAME/leaf.vhd"
start_snaptree "$SAME" -o gc_idle=off
for ((k = 1; k < DEPTH; k++)); do echo "snapshot s$k" >"$ST_MNT/leaf/ctl"; done
stop_snaptree_ok

# --- measure --------------------------------------------------------------------
# Rounds of one cold read per reader and tree, interleaved, each through a
# fresh mount (nothing resolved yet), so drift of the host's disk speed
# over the run hits every tree alike; the medians are reported.
declare -A R ALL
for ((round = 0; round < RUNS; round++)); do
    for tree in deep flat same; do
        dir=$T/$tree
        start_snaptree "$dir" -o ro
        ALL[snaptree_$tree]+=" $(seq_read "$ST_MNT/leaf/disk.raw")"
        if ((round == 0)); then
            [[ $(md5sum <"$ST_MNT/leaf/disk.raw" | cut -d' ' -f1) == "$md5_mount" ]] ||
                die "snaptree reads other bytes from the $tree tree than were written"
        fi
        stop_snaptree_ok
        [[ -z $VHDI_SKIP && -z ${R[vhdi_$tree]:-} ]] || continue
        if start_vhdimount "$dir/leaf.vhd"; then
            if ((round > 0)) || [[ $(md5sum <"$VM_FILE" | cut -d' ' -f1) == "$md5_mount" ]]; then
                ALL[vhdi_$tree]+=" $(seq_read "$VM_FILE")"
            else
                R[vhdi_$tree]="wrong-bytes"
            fi
        else
            R[vhdi_$tree]="failed: $(tail -2 "$T/vhdimount.log" | tr '\n' ' ')"
        fi
        stop_vhdimount
    done
done
for k in "${!ALL[@]}"; do
    # shellcheck disable=SC2086 # the list splits into its numbers
    [[ -n ${R[$k]:-} ]] || R[$k]=$(median ${ALL[$k]})
done

echo
echo "VHD chain read throughput (sequential dd bs=1M, cold cache, fresh mount, median of $RUNS interleaved rounds)"
echo "host: $(uname -r), $(nproc) CPUs, $(qemu-img --version | head -1)"
echo "disk: $SIZE_MB MiB, $DEPTH levels, each owning every ${DEPTH}th stripe of $STRIPE_KB KiB"
echo
printf '%-26s %12s %12s %10s %14s %10s\n' "reader" "depth $DEPTH" "depth 1" "deep/flat" "same, deeper" "same/flat"
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 > 0 && a + 0 > 0) printf "%.0f%%", 100 * a / b; else print "-" }'; }
row() { # NAME PREFIX
    printf '%-26s %7s MB/s %7s MB/s %10s %9s MB/s %10s\n' "$1" "${R[$2_deep]}" "${R[$2_flat]}" \
        "$(ratio "${R[$2_deep]}" "${R[$2_flat]}")" "${R[$2_same]}" "$(ratio "${R[$2_same]}" "${R[$2_flat]}")"
}
row "snaptree disk.raw" snaptree
if [[ -n $VHDI_SKIP ]]; then
    echo "vhdimount                  SKIP: $VHDI_SKIP"
else
    row vhdimount vhdi
    echo "snaptree / vhdimount at depth $DEPTH: $(ratio "${R[snaptree_deep]}" "${R[vhdi_deep]}") (data spread), $(ratio "${R[snaptree_same]}" "${R[vhdi_same]}") (same bytes)"
fi
echo
goal() { awk -v a="$1" -v b="$2" 'BEGIN { print (a >= 0.95 * b) ? "met" : "NOT met" }'; }
echo "goal: depth $DEPTH >= 95% of depth 1 through snaptree, same bytes (resolution cost): $(goal "${R[snaptree_same]}" "${R[snaptree_flat]}") ($(ratio "${R[snaptree_same]}" "${R[snaptree_flat]}"))"
echo "      data spread over the $DEPTH files: $(goal "${R[snaptree_deep]}" "${R[snaptree_flat]}") ($(ratio "${R[snaptree_deep]}" "${R[snaptree_flat]}"))"
