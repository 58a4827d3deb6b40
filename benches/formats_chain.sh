#!/usr/bin/env bash
# Sequential read throughput of VMDK and VHDX chains through snaptree's
# mount, side by side with qemu-storage-daemon's FUSE export of the same
# leaf (see README.md, "Benchmarks").
#
# VMDK: a monolithicSparse base (qemu-img create -f vmdk) and DEPTH-1
# deltas (qemu-img create -f vmdk -b), each level writing its own share of
# the data with qemu-io (level k owns every DEPTH-th stripe of STRIPE_KB),
# so reads resolve through the whole chain; qsd opens the same chain.
# VHDX: QEMU cannot open differencing VHDX, so the peer reads a dynamic
# VHDX of the same bytes (depth 1); snaptree reads both that file and a
# chain of DEPTH made through its own mount (`ctl snapshot`, each level
# writing its stripes through `disk.raw`).
#
# Measures `dd bs=1M` of the leaf to /dev/null, caches dropped before
# each, median of RUNS; prints MB/s and snaptree/qsd ratios.
#
# Needs root (mounts, drop_caches), /dev/fuse, qemu-img, qemu-io,
# qemu-storage-daemon (its rows say SKIP without it).
#
# Knobs: SIZE_MB (512), DEPTH (16), STRIPE_KB (1024), RUNS (3),
# FORMATS ("vmdk vhdx"), KEEP=1, SNAPTREE_BIN.
#
#   sudo bash benches/formats_chain.sh
#   SIZE_MB=64 DEPTH=4 RUNS=1 sudo bash benches/formats_chain.sh   # quick
set -euo pipefail
export LC_ALL=C
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SIZE_MB=${SIZE_MB:-512}
DEPTH=${DEPTH:-16}
STRIPE_KB=${STRIPE_KB:-1024}
RUNS=${RUNS:-3}
FORMATS=${FORMATS:-vmdk vhdx}
for v in SIZE_MB DEPTH STRIPE_KB RUNS; do
    [[ ${!v} =~ ^[0-9]+$ && ${!v} -ge 1 ]] || die "$v must be a positive integer"
done
((DEPTH <= 64)) || die "DEPTH must be 1..64"

[[ $(id -u) -eq 0 ]] || skip_all "not root (needs mounts, drop_caches)"
[[ -c /dev/fuse ]] || skip_all "/dev/fuse does not exist"
require_tools qemu-img qemu-io
QSD_SKIP=""
command -v qemu-storage-daemon >/dev/null || QSD_SKIP="qemu-storage-daemon is not on PATH"

Q_PID="" Q_FILE=""
stop_qsd() {
    [[ -n $Q_PID ]] || return 0
    kill -TERM "$Q_PID" 2>/dev/null || true
    wait_gone "$Q_PID" 100 || kill -KILL "$Q_PID" 2>/dev/null || true
    wait "$Q_PID" 2>/dev/null || true
    is_mounted "$Q_FILE" && umount -l "$Q_FILE" 2>/dev/null
    Q_PID=""
}
CLEANUP_STEPS=(stop_qsd stop_snaptree)
make_workdir snaptree-formats-bench
build_snaptree

# start_qsd DRIVER IMAGE: exports IMAGE (and its backing chain) read-only
# on the regular file $T/qsd.img; returns 1 (with Q_ERR) if it fails.
start_qsd() {
    Q_FILE=$T/qsd.img
    : >"$Q_FILE"
    qemu-storage-daemon \
        --blockdev "driver=file,filename=$2,node-name=file0,read-only=on" \
        --blockdev "driver=$1,file=file0,node-name=fmt0,read-only=on" \
        --export "type=fuse,id=e0,node-name=fmt0,mountpoint=$Q_FILE" \
        </dev/null >>"$T/qsd.log" 2>&1 &
    Q_PID=$!
    local n=300
    until is_mounted "$Q_FILE"; do
        kill -0 "$Q_PID" 2>/dev/null || { Q_PID="" Q_ERR="qsd exited: $(tail -2 "$T/qsd.log" | tr '\n' ' ')"; return 1; }
        ((n-- > 0)) || { Q_ERR="qsd did not export within 30 s"; return 1; }
        sleep 0.1
    done
}

# seq_read FILE: median MB/s of RUNS cold `dd bs=1M` passes.
seq_read() {
    local i t0 s rates=()
    for ((i = 0; i < RUNS; i++)); do
        drop_caches
        t0=$(now)
        dd if="$1" of=/dev/null bs=1M status=none
        s=$(elapsed "$t0")
        rates+=("$(awk -v b=$((SIZE_MB * 1048576)) -v s="$s" 'BEGIN { printf "%.0f", (s > 0 ? b / s / 1e6 : 0) }')")
    done
    printf '%s\n' "${rates[@]}" | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'
}

# stripes LEVEL: qemu-io write commands for the stripes level LEVEL owns.
stripes() {
    local k=$1 off=$(($1 * STRIPE_KB * 1024)) step=$((DEPTH * STRIPE_KB * 1024)) end=$((SIZE_MB * 1048576))
    while ((off < end)); do
        printf -- '-c\nwrite -P %d %d %dk\n' $((k + 1)) "$off" "$STRIPE_KB"
        off=$((off + step))
    done
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "-" }'; }
REPORT=""
row() { REPORT+=$(printf '  %-44s %10s %10s %8s' "$1" "$2" "$3" "$4")$'\n'; }

# ---------------------------------------------------------------- VMDK
bench_vmdk() {
    local d=$T/vmdk k prev cur st q="-" args
    mkdir -p "$d"
    qemu-img create -q -f vmdk "$d/d00.vmdk" "${SIZE_MB}M"
    prev=d00
    for ((k = 0; k < DEPTH; k++)); do
        if ((k > 0)); then
            cur=$(printf 'd%02d' "$k")
            qemu-img create -q -f vmdk -b "$prev.vmdk" -F vmdk "$d/$cur.vmdk"
            prev=$cur
        fi
        mapfile -t args < <(stripes "$k")
        (cd "$d" && qemu-io -f vmdk "${args[@]}" "$prev.vmdk" >/dev/null)
    done
    start_snaptree "$d" -o ro
    st=$(seq_read "$ST_MNT/$prev/disk.raw")
    stop_snaptree_ok
    if [[ -z $QSD_SKIP ]] && start_qsd vmdk "$d/$prev.vmdk"; then
        q=$(seq_read "$Q_FILE")
        stop_qsd
    fi
    row "vmdk chain, depth $DEPTH (MB/s)" "$st" "$q" "$(ratio "$st" "$q")"
    rm -rf "$d"
}

# ---------------------------------------------------------------- VHDX
bench_vhdx() {
    local d=$T/vhdx flat=$T/flat.raw k st1 stn q="-" off step end
    mkdir -p "$d"
    # The same bytes as the chain below: level k's stripes hold k+1.
    truncate -s "${SIZE_MB}M" "$flat"
    for ((k = 0; k < DEPTH; k++)); do
        mapfile -t args < <(stripes "$k")
        qemu-io -f raw "${args[@]}" "$flat" >/dev/null
    done
    qemu-img convert -O vhdx "$flat" "$d/one.vhdx"
    start_snaptree "$d" -o ro
    st1=$(seq_read "$ST_MNT/one/disk.raw")
    stop_snaptree_ok
    if [[ -z $QSD_SKIP ]] && start_qsd vhdx "$d/one.vhdx"; then
        q=$(seq_read "$Q_FILE")
        stop_qsd
    fi
    row "vhdx, depth 1 (MB/s)" "$st1" "$q" "$(ratio "$st1" "$q")"
    # The chain, made through the mount: level k writes its stripes into
    # the leaf, then freezes it as snapshot sK.
    rm -f "$d/one.vhdx"
    qemu-img create -q -f vhdx "$d/leaf.vhdx" "${SIZE_MB}M"
    start_snaptree "$d"
    step=$((DEPTH * STRIPE_KB * 1024)) end=$((SIZE_MB * 1048576))
    for ((k = 0; k < DEPTH; k++)); do
        for ((off = k * STRIPE_KB * 1024; off < end; off += step)); do
            head -c $((STRIPE_KB * 1024)) /dev/zero | tr '\0' "\\$(printf '%03o' $((k + 1)))" |
                dd of="$ST_MNT/leaf/disk.raw" bs=1M seek="$off" oflag=seek_bytes conv=notrunc status=none
        done
        ((k + 1 < DEPTH)) && echo "snapshot s$k" >"$ST_MNT/leaf/ctl"
    done
    stop_snaptree_ok
    start_snaptree "$d" -o ro
    stn=$(seq_read "$ST_MNT/leaf/disk.raw")
    cmp -s "$ST_MNT/leaf/disk.raw" "$flat" || die "the vhdx chain does not read the bytes written"
    stop_snaptree_ok
    row "vhdx chain, depth $DEPTH (MB/s; peer: depth 1)" "$stn" "$q" "$(ratio "$stn" "$q")"
    rm -rf "$d" "$flat"
}

for f in $FORMATS; do
    case $f in
    vmdk) bench_vmdk ;;
    vhdx) bench_vhdx ;;
    *) die "FORMATS: unknown format $f (vmdk, vhdx)" ;;
    esac
done

echo
echo "sequential read of the leaf, $SIZE_MB MiB, stripes of $STRIPE_KB KiB, median of $RUNS"
[[ -n $QSD_SKIP ]] && echo "  qsd: SKIP: $QSD_SKIP"
printf '  %-44s %10s %10s %8s\n' "" snaptree qsd "ratio"
printf '%s' "$REPORT"
