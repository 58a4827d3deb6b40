#!/usr/bin/env bash
# snaptree's FUSE mount against qemu-storage-daemon's FUSE export of the same
# qcow2 leaf (see README.md, "Benchmarks").
#
# Builds a chain l00 (base) <- ... <- l{DEPTH-1} (leaf) of SIZE_MB MiB whose
# data is spread over every layer (layer k owns every DEPTH-th 1 MiB stripe,
# so reads resolve through the whole chain), then measures, one tool at a
# time (never both on one image file at once):
#
#   - sequential read, cold (caches dropped) and a second pass (not dropped),
#     `dd bs=1M` to /dev/null, on the leaf;
#   - the second pass also on a non-leaf snaptree point with the same
#     content (an empty overlay is put on the leaf for that mount, so the
#     depth-DEPTH chain is read-only there and keeps its page cache with
#     FOPEN_KEEP_CACHE); qsd only exports the leaf, so its leaf figure is
#     the reference for both rows;
#   - random 4 KiB read IOPS, fio, 1 and 2 jobs, O_DIRECT, caches dropped;
#   - random 4 KiB write IOPS on the leaf, fio, O_DIRECT, --fsync=0 and
#     --end_fsync=1, each tool on its own fresh copy of the leaf.
#
# Prints a table (snaptree, qsd, snaptree/qsd) and whether the goals are met.
# Needs root (mounts, drop_caches), /dev/fuse, qemu-img and qemu-io; fio
# (installed with apt-get if missing and possible) and qemu-storage-daemon
# are optional: their rows print SKIP with the reason.
#
# Knobs (environment): SIZE_MB (1024), DEPTH (32), RUNTIME (10, seconds per
# fio run), KEEP=1 (keep the temp dir under /var/tmp), SNAPTREE_THREADS
# (passed as --threads to snaptree mount; default: snaptree's own),
# SNAPTREE_BIN (use this binary instead of `cargo build --release`).
#
#   sudo bash benches/mount_vs_qsd.sh
#   SIZE_MB=128 DEPTH=8 RUNTIME=3 bash benches/mount_vs_qsd.sh   # quick run

set -euo pipefail
export LC_ALL=C
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SIZE_MB=${SIZE_MB:-1024}
DEPTH=${DEPTH:-32}
RUNTIME=${RUNTIME:-10}
SNAPTREE_THREADS=${SNAPTREE_THREADS:-}

[[ $SIZE_MB =~ ^[0-9]+$ && $SIZE_MB -ge 1 ]] || die "SIZE_MB must be a positive integer"
[[ $DEPTH =~ ^[0-9]+$ && $DEPTH -ge 1 && $DEPTH -le 100 ]] || die "DEPTH must be 1..100"
[[ $RUNTIME =~ ^[0-9]+$ && $RUNTIME -ge 1 ]] || die "RUNTIME must be a positive integer"
SIZE=$((SIZE_MB * 1024 * 1024))

# ---------------------------------------------------------------- prerequisites
[[ $(id -u) -eq 0 ]] || skip_all "not root (needs to mount FUSE and to drop caches)"
[[ -c /dev/fuse ]] || skip_all "/dev/fuse does not exist"
require_tools qemu-img qemu-io

QSD_SKIP=""
command -v qemu-storage-daemon >/dev/null ||
    QSD_SKIP="qemu-storage-daemon is not on PATH (apt-get install qemu-utils)"

find_fio
build_snaptree

# ---------------------------------------------------------------- cleanup
Q_PID="" Q_FILE="" Q_ERR=""

stop_qsd() {
    [[ -n $Q_PID ]] || return 0
    kill -TERM "$Q_PID" 2>/dev/null || true
    wait_gone "$Q_PID" 100 || kill -KILL "$Q_PID" 2>/dev/null || true
    wait "$Q_PID" 2>/dev/null || true
    is_mounted "$Q_FILE" && umount -l "$Q_FILE" 2>/dev/null
    Q_PID=""
}
CLEANUP_STEPS+=(stop_qsd)

make_workdir snaptree-mvq
C=$T/chain
mkdir -p "$C"

# ---------------------------------------------------------------- helpers
# Page cache drops so far (ours and anyone else's on this host).
drops() { awk '$1 == "drop_pagecache" { print $2 }' /proc/vmstat; }
# cold_caches: drop_caches, noting the drop count for taint.
cold_caches() { drop_caches; DROPS0=$(drops); }
# taint TOOL KEY...: if someone else dropped the page cache since our last
# cold_caches, marks these figures as unreliable (a second pass or a warm
# random run would have been partly cold).
declare -A TAINT
TAINTED=0
taint() {
    local tool=$1 k
    shift
    [[ $(drops) == "$DROPS0" ]] && return 0
    for k; do TAINT[$tool:$k]=1; done
    TAINTED=1
    log "warning: another process dropped the page cache during $([[ $tool == ST ]] && echo snaptree || echo qsd) $*"
}

# mount_st SOURCE: start_snaptree with the SNAPTREE_THREADS knob.
mount_st() { start_snaptree "$1" ${SNAPTREE_THREADS:+--threads "$SNAPTREE_THREADS"}; }

# start_qsd IMAGE: exports IMAGE read-write on the regular file $T/qsd.img.
start_qsd() {
    Q_FILE=$T/qsd.img
    : >"$Q_FILE"
    qemu-storage-daemon \
        --blockdev "driver=file,filename=$1,node-name=file0" \
        --blockdev "driver=qcow2,file=file0,node-name=fmt0" \
        --export "type=fuse,id=e0,node-name=fmt0,mountpoint=$Q_FILE,writable=on" \
        </dev/null >>"$T/qsd.log" 2>&1 &
    Q_PID=$!
    local n=300
    until is_mounted "$Q_FILE"; do
        if ! kill -0 "$Q_PID" 2>/dev/null; then
            local rc=0
            wait "$Q_PID" || rc=$?
            Q_PID=""
            Q_ERR="exited with status $rc: $(tail -3 "$T/qsd.log" | tr '\n' ' ')"
            return 1
        fi
        ((n-- > 0)) || { Q_ERR="did not mount its export within 30 s"; return 1; }
        sleep 0.1
    done
    log "qsd exported $(basename "$1") (pid $Q_PID)"
}

# seq_read FILE: one sequential pass with dd bs=1M; prints MB/s (10^6 B/s).
seq_read() {
    local out bytes secs
    out=$(dd if="$1" of=/dev/null bs=1M iflag=fullblock 2>&1 | tail -1)
    bytes=$(awk '{ print $1 }' <<<"$out")
    secs=$(awk '{ print $(NF-3) }' <<<"$out")
    [[ $bytes == "$SIZE" ]] || die "dd read $bytes bytes of $1, expected $SIZE: $out"
    awk -v b="$bytes" -v s="$secs" 'BEGIN { printf "%.1f", b / s / 1e6 }'
}

# fio_iops FILE RW NJOBS DIRECT: IOPS of a time-based 4 KiB run.
fio_iops() {
    local file=$1 rw=$2 jobs=$3 direct=$4 field=8 extra=()
    [[ $rw == randwrite ]] && { field=49; extra=(--fsync=0 --end_fsync=1); }
    [[ $direct == 1 ]] || extra+=(--invalidate=1)
    local out
    out=$(fio --name=mvq --filename="$file" --rw="$rw" --bs=4k --direct="$direct" \
        --ioengine=psync --numjobs="$jobs" --group_reporting --time_based \
        --runtime="$RUNTIME" --size="$SIZE" --fallocate=none \
        --output-format=terse --terse-version=3 ${extra[@]+"${extra[@]}"} 2>"$T/fio.err") ||
        die "fio $rw on $file failed: $(tail -3 "$T/fio.err")"
    local line
    line=$(grep '^3;' <<<"$out" | tail -1)
    [[ $(cut -d';' -f5 <<<"$line") == 0 ]] || die "fio $rw on $file reported an error: $line"
    cut -d';' -f"$field" <<<"$line"
}

# sample_sums FILE: md5 of a few 1 MiB stripes, to check both tools see the
# same disk.
sample_sums() {
    local n=$SIZE_MB s
    for s in 0 $((DEPTH - 1)) $((n / 2 + 3)) $((n - 1)); do
        ((s < n)) || continue
        dd if="$1" bs=1M skip="$s" count=1 status=none | md5sum | cut -c1-12
    done | paste -sd' '
}

declare -A ST QS
NOTES=()
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------- the chain
LEAF_NAME=$(printf 'l%02d' $((DEPTH - 1)))
LEAF=$C/$LEAF_NAME.qcow2
log "building a ${SIZE_MB} MiB chain of depth $DEPTH in $C"
t0=$(now)
for ((k = 0; k < DEPTH; k++)); do
    name=$(printf 'l%02d.qcow2' "$k")
    if ((k == 0)); then
        qemu-img create -q -f qcow2 "$C/$name" "$SIZE"
    else
        # -u: do not open the backing chain (quadratic in the depth).
        qemu-img create -q -f qcow2 -u -b "$(printf 'l%02d.qcow2' $((k - 1)))" -F qcow2 "$C/$name" "$SIZE"
    fi
done
args=()
for ((k = 0; k < DEPTH; k++)); do
    if ((k > 0)); then
        args+=(-c close -c "open -o driver=qcow2 $(printf 'l%02d.qcow2' "$k")")
    fi
    for ((i = k; i < SIZE_MB; i += DEPTH)); do
        args+=(-c "write -q -P $((1 + (i * 37 + k * 11) % 255)) $((i * 1048576)) 1M")
    done
done
qio_out=$(cd "$C" && qemu-io -f qcow2 l00.qcow2 "${args[@]}" 2>&1) || die "qemu-io failed: $qio_out"
[[ -z $qio_out ]] || die "qemu-io said: $qio_out"
# An empty overlay on the leaf: mounting it makes the depth-$DEPTH chain a
# non-leaf (read-only, page cache kept) point with the leaf's content.
qemu-img create -q -f qcow2 -u -b "$LEAF_NAME.qcow2" -F qcow2 "$C/over.qcow2" "$SIZE"
# Fresh, identical leaves for the write test, one per tool (same backing).
cp --sparse=always "$LEAF" "$C/wst.qcow2"
cp --sparse=always "$LEAF" "$C/wqsd.qcow2"
sync
log "chain built in $(elapsed "$t0") s ($(du -sh "$C" | cut -f1) on disk)"

ST_DISK=$T/mnt/$LEAF_NAME/disk.raw

# ---------------------------------------------------------------- snaptree, leaf
mount_st "$LEAF"
[[ -f $ST_DISK ]] || die "$ST_DISK does not exist; tree: $(cat "$T/mnt/tree")"
[[ $(stat -c %a "$ST_DISK") == 644 ]] || die "$ST_DISK is not read-write (should be the leaf)"
cold_caches
ST[seq_cold]=$(seq_read "$ST_DISK"); log "snaptree seq cold (leaf): ${ST[seq_cold]} MB/s"
ST[seq_2nd]=$(seq_read "$ST_DISK"); log "snaptree seq 2nd pass (leaf): ${ST[seq_2nd]} MB/s"
taint ST seq_2nd
ST_SUMS=$(sample_sums "$ST_DISK")
if [[ -z $FIO_SKIP ]]; then
    ST_DIRECT=1
    if ! can_direct "$ST_DISK"; then
        ST_DIRECT=0
        NOTES+=("snaptree: O_DIRECT open/read failed, random I/O used buffered I/O with --invalidate=1")
    fi
    for j in 1 2; do
        cold_caches
        ST[rr$j]=$(fio_iops "$ST_DISK" randread "$j" "$ST_DIRECT")
        log "snaptree randread 4k, $j job(s): ${ST[rr$j]} IOPS"
        taint ST "rr$j"
    done
fi
stop_snaptree_ok

# ---------------------------------------------------------------- snaptree, non-leaf
mount_st "$C/over.qcow2"
[[ -f $ST_DISK && $(stat -c %a "$ST_DISK") == 444 ]] || die "$ST_DISK should be a read-only non-leaf point here"
cold_caches
ST[nl_cold]=$(seq_read "$ST_DISK"); log "snaptree seq cold (non-leaf): ${ST[nl_cold]} MB/s"
ST[nl_2nd]=$(seq_read "$ST_DISK"); log "snaptree seq 2nd pass (non-leaf): ${ST[nl_2nd]} MB/s"
taint ST nl_2nd
stop_snaptree_ok

# ---------------------------------------------------------------- qsd, leaf
if [[ -z $QSD_SKIP ]]; then
    if start_qsd "$LEAF"; then
        cold_caches
        QS[seq_cold]=$(seq_read "$Q_FILE"); log "qsd seq cold: ${QS[seq_cold]} MB/s"
        QS[seq_2nd]=$(seq_read "$Q_FILE"); log "qsd seq 2nd pass: ${QS[seq_2nd]} MB/s"
        taint QS seq_2nd
        QS_SUMS=$(sample_sums "$Q_FILE")
        [[ $QS_SUMS == "$ST_SUMS" ]] ||
            die "content differs: snaptree [$ST_SUMS] vs qsd [$QS_SUMS]"
        NOTES+=("content check: sampled stripes identical through both ($ST_SUMS)")
        if [[ -z $FIO_SKIP ]]; then
            Q_DIRECT=1
            if ! can_direct "$Q_FILE"; then
                Q_DIRECT=0
                NOTES+=("qsd: O_DIRECT read failed, random I/O used buffered I/O with --invalidate=1")
            fi
            for j in 1 2; do
                cold_caches
                QS[rr$j]=$(fio_iops "$Q_FILE" randread "$j" "$Q_DIRECT")
                log "qsd randread 4k, $j job(s): ${QS[rr$j]} IOPS"
                taint QS "rr$j"
            done
        fi
        stop_qsd
    else
        QSD_SKIP="qemu-storage-daemon $Q_ERR"
        stop_qsd
    fi
fi

# ---------------------------------------------------------------- random writes
if [[ -z $FIO_SKIP ]]; then
    mount_st "$C/wst.qcow2"
    W_DISK=$T/mnt/wst/disk.raw
    [[ $(stat -c %a "$W_DISK") == 644 ]] || die "$W_DISK is not read-write"
    W_DIRECT=1
    can_direct "$W_DISK" || { W_DIRECT=0; NOTES+=("snaptree: randwrite used buffered I/O (O_DIRECT failed)"); }
    cold_caches
    ST[rw1]=$(fio_iops "$W_DISK" randwrite 1 "$W_DIRECT")
    log "snaptree randwrite 4k: ${ST[rw1]} IOPS"
    taint ST rw1
    stop_snaptree_ok
    if qemu-img check -q "$C/wst.qcow2" >"$T/check.log" 2>&1; then
        NOTES+=("qemu-img check of the leaf snaptree wrote: no errors")
    else
        NOTES+=("qemu-img check of the leaf snaptree wrote: FAILED: $(head -3 "$T/check.log" | tr '\n' ' ')")
    fi
    if [[ -z $QSD_SKIP ]]; then
        if start_qsd "$C/wqsd.qcow2"; then
            W_DIRECT=1
            can_direct "$Q_FILE" || { W_DIRECT=0; NOTES+=("qsd: randwrite used buffered I/O (O_DIRECT failed)"); }
            cold_caches
            QS[rw1]=$(fio_iops "$Q_FILE" randwrite 1 "$W_DIRECT")
            log "qsd randwrite 4k: ${QS[rw1]} IOPS"
            taint QS rw1
        else
            QSD_SKIP="qemu-storage-daemon $Q_ERR"
        fi
        stop_qsd
    fi
fi

# ---------------------------------------------------------------- report
# cell KIND KEY: a figure, or the reason it is missing.
cell() {
    local -n arr=$1
    local v=${arr[$2]:-}
    if [[ -n $v ]]; then printf '%s' "$v"; else printf 'SKIP'; fi
}
ratio() {
    local a=$1 b=$2
    [[ $a =~ ^[0-9.]+$ && $b =~ ^[0-9.]+$ ]] || { printf -- '-'; return; }
    awk -v a="$a" -v b="$b" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else printf "-" }'
}
GOALS=()
row() { # label unit st-key qsd-key goal
    local label=$1 unit=$2 s q r g=${5:-} verdict=""
    s=$(cell ST "$3")
    q=$(cell QS "$4")
    r=$(ratio "$s" "$q")
    local star=""
    [[ -n ${TAINT[ST:$3]:-} ]] && { s="$s*"; star="*"; }
    [[ -n ${TAINT[QS:$4]:-} ]] && { q="$q*"; star="*"; }
    [[ $r == - ]] || r="$r$star"
    if [[ -n $g ]]; then
        if [[ $r == - ]]; then
            verdict="n/a"
        elif awk -v a="${s%\*}" -v b="${q%\*}" -v g="$g" 'BEGIN { exit !(a / b >= g) }'; then
            verdict="met"
        else
            verdict="NOT met"
        fi
        GOALS+=("$(printf '%-44s %-9s %-8s %s' "$label" ">= ${g}x" "$verdict" "$r")")
        g=">=${g}x"
    fi
    printf '%-44s %-5s %10s %10s %8s  %s\n' "$label" "$unit" "$s" "$q" "$r" "$g"
}

echo
echo "snaptree mount vs qemu-storage-daemon --export type=fuse"
echo "chain: ${SIZE_MB} MiB virtual, depth $DEPTH (layer k owns every ${DEPTH}th 1 MiB stripe), 64 KiB clusters"
echo "host: $(uname -r), $(nproc) CPUs, $(qemu-img --version | head -1 | cut -d' ' -f1-3), $(fio --version 2>/dev/null || echo 'no fio')," \
    "snaptree threads: ${SNAPTREE_THREADS:-default}"
echo "load average (1/5/15 min): before $LOAD_BEFORE, after $(cut -d' ' -f1-3 /proc/loadavg) (other work on the host skews every figure)"
echo "seq: dd bs=1M buffered; random: fio psync 4k direct=1, ${RUNTIME} s; MB/s = 10^6 B/s"
echo
printf '%-44s %-5s %10s %10s %8s  %s\n' "test" "unit" "snaptree" "qsd" "st/qsd" "goal"
printf '%-44s %-5s %10s %10s %8s  %s\n' "----" "----" "--------" "---" "------" "----"
row "seq read, cold, leaf" MB/s seq_cold seq_cold 2
row "seq read, 2nd pass, leaf" MB/s seq_2nd seq_2nd 5
row "seq read, 2nd pass, non-leaf (qsd: leaf)" MB/s nl_2nd seq_2nd 5
row "seq read, cold, non-leaf (qsd: leaf)" MB/s nl_cold seq_cold
row "randread 4k, 1 job" IOPS rr1 rr1 1.3
row "randread 4k, 2 jobs" IOPS rr2 rr2 1.3
row "randwrite 4k, leaf, 1 job, end_fsync" IOPS rw1 rw1 1
echo
echo "leaf: $LEAF_NAME/disk.raw, read-write; non-leaf: the same"
echo "chain as a read-only point, in a mount of an empty overlay on the leaf (both keep the page cache); qsd"
echo "exports only the leaf, so its leaf figure is the reference for the non-leaf rows too."
[[ -z $QSD_SKIP ]] || echo "SKIP qsd: $QSD_SKIP"
[[ -z $FIO_SKIP ]] || echo "SKIP fio: $FIO_SKIP (randread/randwrite rows)"
((TAINTED == 0)) ||
    echo "* another process dropped the page cache during this measurement (drop_pagecache in /proc/vmstat moved): unreliable, rerun on a quiet host"
for n in ${NOTES[@]+"${NOTES[@]}"}; do echo "note: $n"; done
echo
echo "goals:"
for g in ${GOALS[@]+"${GOALS[@]}"}; do echo "  $g"; done
