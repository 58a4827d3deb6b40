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
# Measures sequential reads of the leaf, `dd bs=1M` to /dev/null, caches
# dropped before each run (median of RUNS): snaptree's disk.raw on the deep
# chain and on depth 1, and libvhdi's vhdimount (FUSE, read-only) on both.
#
# Needs root (mounts, drop_caches), /dev/fuse, qemu-img; vhdimount
# (libvhdi-utils) is optional: its rows say SKIP with the reason.
#
# Knobs: SIZE_MB (512), DEPTH (30), STRIPE_KB (2048), RUNS (3), KEEP=1,
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
RUNS=${RUNS:-3}
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

# seq_read FILE: MB/s of a cold sequential read, median of RUNS.
seq_read() {
    local f=$1 i t0 s all=()
    for ((i = 0; i < RUNS; i++)); do
        drop_caches
        t0=$(now)
        dd if="$f" of=/dev/null bs=1M status=none
        s=$(elapsed "$t0")
        all+=("$(awk -v m="$SIZE_MB" -v s="$s" 'BEGIN { printf "%.0f", m / s }')")
    done
    printf '%s\n' "${all[@]}" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'
}

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

# --- measure --------------------------------------------------------------------
declare -A R
for tree in deep flat; do
    dir=$T/$tree
    start_snaptree "$dir" -o ro
    [[ $(md5sum <"$ST_MNT/leaf/disk.raw" | cut -d' ' -f1) == "$md5_mount" ]] ||
        die "snaptree reads other bytes from the $tree tree than were written"
    R[snaptree_$tree]=$(seq_read "$ST_MNT/leaf/disk.raw")
    stop_snaptree_ok
    if [[ -z $VHDI_SKIP ]]; then
        if start_vhdimount "$dir/leaf.vhd"; then
            if [[ $(md5sum <"$VM_FILE" | cut -d' ' -f1) == "$md5_mount" ]]; then
                R[vhdi_$tree]=$(seq_read "$VM_FILE")
            else
                R[vhdi_$tree]="wrong-bytes"
            fi
        else
            R[vhdi_$tree]="failed: $(tail -2 "$T/vhdimount.log" | tr '\n' ' ')"
        fi
        stop_vhdimount
    fi
done

echo
echo "VHD chain read throughput (sequential dd bs=1M, cold cache, median of $RUNS)"
echo "host: $(uname -r), $(nproc) CPUs, $(qemu-img --version | head -1)"
echo "disk: $SIZE_MB MiB, $DEPTH levels, each owning every ${DEPTH}th stripe of $STRIPE_KB KiB"
echo
printf '%-26s %12s %12s %10s\n' "reader" "depth $DEPTH" "depth 1" "deep/flat"
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 > 0 && a + 0 > 0) printf "%.0f%%", 100 * a / b; else print "-" }'; }
printf '%-26s %9s MB/s %7s MB/s %10s\n' "snaptree disk.raw" "${R[snaptree_deep]}" "${R[snaptree_flat]}" "$(ratio "${R[snaptree_deep]}" "${R[snaptree_flat]}")"
if [[ -n $VHDI_SKIP ]]; then
    echo "vhdimount                  SKIP: $VHDI_SKIP"
else
    printf '%-26s %9s MB/s %7s MB/s %10s\n' "vhdimount" "${R[vhdi_deep]}" "${R[vhdi_flat]}" "$(ratio "${R[vhdi_deep]}" "${R[vhdi_flat]}")"
    echo "snaptree / vhdimount at depth $DEPTH: $(ratio "${R[snaptree_deep]}" "${R[vhdi_deep]}")"
fi
echo
goal=$(awk -v a="${R[snaptree_deep]}" -v b="${R[snaptree_flat]}" 'BEGIN { print (a >= 0.95 * b) ? "met" : "NOT met" }')
echo "goal: depth $DEPTH >= 95% of depth 1 through snaptree: $goal ($(ratio "${R[snaptree_deep]}" "${R[snaptree_flat]}"))"
