#!/usr/bin/env bash
# snaptree's merge engine against `qemu-img commit` (see README.md,
# "Benchmarks"). Two measurements:
#
# 1. Coalescing a SIZE_MB MiB delta, offline. The chain is
#        base.qcow2 <- delta.qcow2 <- leaf.qcow2      (2*SIZE_MB virtual)
#    where base and delta each hold SIZE_MB MiB, on disjoint clusters
#    (delta's in scattered 64 KiB..1 MiB chunks, base's in the gaps), and
#    the leaf a little. Both sides then move SIZE_MB MiB into newly
#    allocated clusters of the other image:
#      - qemu-img: `qemu-img commit -f qcow2 delta.qcow2` (delta into base;
#        qemu-img then empties delta, its default);
#      - snaptree: `snaptree merge DIR base` (deletes base, which is hidden
#        since delta stacks on it, then coalesces it; with both sides of one
#        size the engine streams base into delta). Its summary line says
#        which way it went and how much it copied; both are printed.
#    Each run starts from a fresh copy of the same images with the page
#    cache dropped, and times the command plus a `sync`. After every run
#    delta and leaf must read the same as before (qemu-img compare against
#    the pristine copy) and every image must pass `qemu-img check`; any
#    mismatch aborts the script. Runs alternate between the tools.
#
# 2. The writer pause of a leaf coalesce. A tree base <- delta (SIZE_MB/2
#    MiB scattered) <- leaf is mounted (-o gc_idle=off), delta is deleted
#    (hidden: the leaf stacks on it), fio writes 4 KiB at random to
#    leaf/disk.raw (O_DIRECT, psync), and after 2 s `merge-now` is written.
#    fio's writes stay inside the first FIO_SPAN_MB MiB so the leaf stays
#    smaller than delta and the engine copies the leaf into delta in passes
#    while it is written (the path with a writer pause); FIO_SPAN_MB=0 lets
#    fio write the whole disk, and the engine may then stream delta into the
#    leaf instead. Prints the `merge pass` lines and `merge writer pause:`
#    from status, fio's IOPS over the whole run and during the merge, and
#    fio's longest completion latency (the stall the writer saw). Afterwards
#    the leaf must read the same through the mount and from its image
#    (md5), and pass `qemu-img check`.
#
# Needs root (drop_caches, FUSE mounts), /dev/fuse, qemu-img and qemu-io;
# fio (installed with apt-get if missing and possible) is optional: part 2
# prints SKIP without it.
#
# Knobs (environment): SIZE_MB (512), RUNS (3), RUNTIME (30, fio's
# --runtime in part 2; fio is stopped 2 s after the merge anyway), FIO_SPAN_MB (SIZE_MB/8), KEEP=1 (keep the temp dir under
# /var/tmp), SNAPTREE_BIN (use this binary instead of `cargo build
# --release`).
#
#   sudo bash benches/merge_vs_commit.sh
#   SIZE_MB=64 RUNS=1 sudo bash benches/merge_vs_commit.sh   # quick run

set -euo pipefail
export LC_ALL=C
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SIZE_MB=${SIZE_MB:-512}
RUNS=${RUNS:-3}
RUNTIME=${RUNTIME:-30}

[[ $SIZE_MB =~ ^[0-9]+$ && $SIZE_MB -ge 8 ]] || die "SIZE_MB must be an integer >= 8"
[[ $RUNS =~ ^[0-9]+$ && $RUNS -ge 1 ]] || die "RUNS must be a positive integer"
[[ $RUNTIME =~ ^[0-9]+$ && $RUNTIME -ge 5 ]] || die "RUNTIME must be an integer >= 5"
FIO_SPAN_MB=${FIO_SPAN_MB:-$((SIZE_MB / 8))}
[[ $FIO_SPAN_MB =~ ^[0-9]+$ ]] || die "FIO_SPAN_MB must be a non-negative integer"
VSIZE=$((2 * SIZE_MB * 1024 * 1024))
LEAF_MB=$((SIZE_MB / 64 > 0 ? SIZE_MB / 64 : 1))

# ---------------------------------------------------------------- prerequisites
[[ $(id -u) -eq 0 ]] || skip_all "not root (needs to drop caches and to mount FUSE)"
require_tools qemu-img qemu-io

if [[ -c /dev/fuse ]]; then
    find_fio
else
    FIO_SKIP="/dev/fuse does not exist"
fi
build_snaptree

make_workdir snaptree-mvc
O=$T/orig
mkdir -p "$O"

# ---------------------------------------------------------------- helpers
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }

# layout SEED DELTA_CLUSTERS: the disk in 2 MiB regions of 32 clusters of
# 64 KiB; in each, DELTA_CLUSTERS clusters go to delta in runs of 1..16
# clusters at random places and the rest to base. Prints "D|B offset len".
layout() {
    awk -v seed="$1" -v dc="$2" -v regions="$SIZE_MB" 'BEGIN {
        srand(seed); C = 65536
        for (r = 0; r < regions; r++) {
            left["D"] = dc; left["B"] = 32 - dc; at = r * 32
            who = rand() < 0.5 ? "D" : "B"
            while (left["D"] + left["B"] > 0) {
                if (left[who] == 0) who = (who == "D") ? "B" : "D"
                max = left[who] < 16 ? left[who] : 16
                n = 1 + int(rand() * max)
                print who, at * C, n * C
                left[who] -= n; at += n
                who = (who == "D") ? "B" : "D"
            }
        }
    }'
}

# qio DIR IMAGE CMDS: runs the qemu-io commands in file CMDS (one a line,
# fed on stdin: no argument-length limit) on IMAGE; anything it prints
# besides its prompts is an error.
qio() {
    local dir=$1 img=$2 cmds=$3 out
    out=$(cd "$dir" && qemu-io -f qcow2 "$img" <"$cmds" 2>&1) || die "qemu-io on $img failed: $out"
    out=${out//qemu-io> /}
    [[ -z ${out//[[:space:]]/} ]] || die "qemu-io on $img said: $(head -c 500 <<<"$out")"
}
# cmds_for KIND SALT < layout: a qemu-io write for each KIND run, each with
# its own byte pattern.
cmds_for() {
    awk -v k="$1" -v s="$2" '$1 == k { printf "write -q -P %d %d %d\n", 1 + (NR * 37 + s) % 255, $2, $3 }'
}

# Allocated bytes an image holds itself (qemu-img check's cluster count).
allocated() {
    qemu-img check -U --output=json "$1" 2>/dev/null |
        awk -F'[:,]' '/"allocated-clusters"/ { a = $2 } END { printf "%d", a * 65536 }'
}

same_as_orig() { # LABEL DIR NAME...
    local label=$1 dir=$2 n out
    shift 2
    for n; do
        out=$(qemu-img compare -q -f qcow2 -F qcow2 "$dir/$n.qcow2" "$O/$n.qcow2" 2>&1) ||
            die "$label: $n reads differently after the merge: ${out:-qemu-img compare exit status $?}"
    done
}

fresh_copy() { # DEST
    rm -rf "$1"
    mkdir -p "$1"
    cp --sparse=always "$O"/base.qcow2 "$O"/delta.qcow2 "$O"/leaf.qcow2 "$1"/
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
NOTES=()

# ---------------------------------------------------------------- the chain
log "building base <- delta <- leaf: $((2 * SIZE_MB)) MiB virtual, ${SIZE_MB} MiB in base and in delta, ${LEAF_MB} MiB in leaf, in $O"
t0=$(now)
layout 1 16 >"$T/layout"
qemu-img create -q -f qcow2 "$O/base.qcow2" "$VSIZE"
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$O/delta.qcow2" "$VSIZE"
qemu-img create -q -f qcow2 -b delta.qcow2 -F qcow2 "$O/leaf.qcow2" "$VSIZE"
cmds_for B 11 <"$T/layout" >"$T/base.cmds"
cmds_for D 53 <"$T/layout" >"$T/delta.cmds"
awk -v n=$((LEAF_MB * 16)) -v clusters=$((2 * SIZE_MB * 16)) 'BEGIN {
    srand(7); for (i = 0; i < n; i++) { printf "write -q -P %d %d 65536\n", 200 + i % 50, int(rand() * clusters) * 65536 } }' >"$T/leaf.cmds"
qio "$O" base.qcow2 "$T/base.cmds"
qio "$O" delta.qcow2 "$T/delta.cmds"
qio "$O" leaf.qcow2 "$T/leaf.cmds"
sync
BASE_BYTES=$(allocated "$O/base.qcow2")
DELTA_BYTES=$(allocated "$O/delta.qcow2")
LEAF_BYTES=$(allocated "$O/leaf.qcow2")
[[ $DELTA_BYTES == $((SIZE_MB * 1048576)) && $BASE_BYTES == "$DELTA_BYTES" ]] ||
    die "layout: base holds $BASE_BYTES and delta $DELTA_BYTES bytes, expected $((SIZE_MB * 1048576)) each"
DELTA_RUNS=$(grep -c '^D' "$T/layout")
log "built in $(elapsed "$t0") s: base $(mib "$BASE_BYTES") MiB, delta $(mib "$DELTA_BYTES") MiB in $DELTA_RUNS chunks, leaf $(mib "$LEAF_BYTES") MiB"

# ---------------------------------------------------------------- part 1: coalesce
QI_TIMES=() ST_TIMES=() ST_LINE=""
for ((run = 1; run <= RUNS; run++)); do
    for tool in qemu-img snaptree; do
        W=$T/w-$tool
        fresh_copy "$W"
        drop_caches
        t0=$(now)
        if [[ $tool == qemu-img ]]; then
            out=$(qemu-img commit -q -f qcow2 "$W/delta.qcow2" 2>&1) || die "qemu-img commit failed: $out"
            sync
            secs=$(elapsed "$t0")
            QI_TIMES+=("$secs")
            same_as_orig "qemu-img run $run" "$W" delta leaf
            check_images "qemu-img run $run" "$W"/base.qcow2 "$W"/delta.qcow2 "$W"/leaf.qcow2
            log "run $run: qemu-img commit: $secs s (base now holds $(mib "$(allocated "$W/base.qcow2")") MiB, delta $(mib "$(allocated "$W/delta.qcow2")") MiB)"
        else
            out=$("$BIN" merge --quiet "$W" base 2>&1) || die "snaptree merge failed: $out"
            sync
            secs=$(elapsed "$t0")
            ST_TIMES+=("$secs")
            ST_LINE=$(tail -1 <<<"$out")
            [[ $ST_LINE == merged* ]] || die "snaptree merge did not merge: $out"
            [[ ! -e $W/base.qcow2 ]] || die "snaptree merge left base.qcow2 behind: $out"
            same_as_orig "snaptree run $run" "$W" delta leaf
            check_images "snaptree run $run" "$W"/delta.qcow2 "$W"/leaf.qcow2
            log "run $run: snaptree merge: $secs s ($ST_LINE)"
        fi
        rm -rf "$W"
    done
done
QI_MED=$(printf '%s\n' "${QI_TIMES[@]}" | median)
ST_MED=$(printf '%s\n' "${ST_TIMES[@]}" | median)
RATIO=$(awk -v q="$QI_MED" -v s="$ST_MED" 'BEGIN { printf "%.2f", q / s }')
ST_COPIED=$(sed -n 's/.*(\(.*\) copied).*/\1/p' <<<"$ST_LINE")
if [[ $ST_LINE == *"committing the child"* ]]; then ST_WAY="commit (delta into base)"; else ST_WAY="stream (base into delta)"; fi

# ---------------------------------------------------------------- part 2: writer pause
P_PAUSE="" P_COPIED="" P_PASSES="" P_LAST="" P_MERGE_S="" P_WAY=""
F_IOPS="" F_IOPS_MERGE="" F_CLAT_MAX="" F_ERR=""
if [[ -z $FIO_SKIP ]]; then
    P=$T/pause
    mkdir -p "$P"
    log "part 2: base <- delta ($((SIZE_MB / 2)) MiB) <- leaf in $P"
    cp --sparse=always "$O/base.qcow2" "$O/leaf.qcow2" "$P"/
    qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$P/delta.qcow2" "$VSIZE"
    layout 2 8 | cmds_for D 97 >"$T/pdelta.cmds"
    qio "$P" delta.qcow2 "$T/pdelta.cmds"
    # The leaf's header still names delta.qcow2, now the new one.
    sync
    P_DELTA_BYTES=$(allocated "$P/delta.qcow2")

    start_snaptree "$P" -o gc_idle=off
    DISK=$ST_MNT/leaf/disk.raw
    [[ -f $DISK && $(stat -c %a "$DISK") == 644 ]] || die "$DISK is not a writable leaf; tree: $(cat "$ST_MNT/tree")"
    echo delete >"$ST_MNT/delta/ctl" || die "delete of delta failed: $(grep -i 'delta' "$ST_MNT/status" | tail -3)"
    DIRECT=1
    can_direct "$DISK" ||
        { DIRECT=0; NOTES+=("writer pause: O_DIRECT failed on the mount, fio used buffered writes"); }
    span=()
    ((FIO_SPAN_MB > 0)) && span=(--size="${FIO_SPAN_MB}M")
    drop_caches
    fio --name=w --filename="$DISK" --rw=randwrite --bs=4k --direct="$DIRECT" --time_based \
        --runtime="$RUNTIME" --ioengine=psync --fallocate=none ${span[@]+"${span[@]}"} \
        --write_iops_log="$T/fio" --log_avg_msec=100 \
        --output-format=terse --terse-version=3 >"$T/fio.out" 2>"$T/fio.err" &
    FIO_PID=$!
    fio_t0=$(now)
    sleep 2
    kill -0 "$FIO_PID" 2>/dev/null || die "fio ended early: $(tail -3 "$T/fio.err")"
    m0=$(now)
    if ! echo 1 >"$ST_MNT/merge-now"; then
        die "merge-now failed: $(grep '^last merge' "$ST_MNT/status")"
    fi
    P_MERGE_S=$(elapsed "$m0")
    m1=$(now)
    status=$(cat "$ST_MNT/status")
    P_PASSES=$(grep '^merge pass' <<<"$status" || true)
    P_PAUSE=$(sed -n 's/^merge writer pause: \([0-9.]*\) ms$/\1/p' <<<"$status")
    P_LAST=$(sed -n 's/^last merge: //p' <<<"$status")
    [[ $P_LAST == ok:* ]] || die "merge-now: $P_LAST"
    if [[ $P_LAST == *"committing the child"* ]]; then P_WAY="commit (leaf into delta, in passes)"; else P_WAY="stream (delta into leaf)"; fi
    P_COPIED=$(sed -n 's/.*(\(.*\) copied).*/\1/p' <<<"$P_LAST")
    log "merge-now took $P_MERGE_S s: $P_LAST; writer pause ${P_PAUSE:-none} ms"
    sleep 2 # the writer going on after the merge
    kill -0 "$FIO_PID" 2>/dev/null || die "fio ended during the merge: $(tail -3 "$T/fio.err")"
    stop_fio
    line=$(grep '^3;' "$T/fio.out" | tail -1 || true)
    if [[ -z $line ]]; then
        F_ERR="fio printed no result: $(tail -3 "$T/fio.err" | tr '\n' ' ')"
    else
        [[ $(cut -d';' -f5 <<<"$line") == 0 ]] || F_ERR="fio reported an error: $(cut -d';' -f5 <<<"$line")"
        F_IOPS=$(cut -d';' -f49 <<<"$line")
        F_CLAT_MAX=$(awk -v u="$(cut -d';' -f56 <<<"$line")" 'BEGIN { printf "%.1f", u / 1000 }')
    fi
    # IOPS samples (100 ms averages, ms since fio started) inside the merge.
    a=$(awk -v a="$fio_t0" -v b="$m0" 'BEGIN { printf "%d", (b - a) * 1000 }')
    b=$(awk -v a="$fio_t0" -v b="$m1" 'BEGIN { printf "%d", (b - a) * 1000 }')
    log_file=$(ls "$T"/fio_iops*.log 2>/dev/null | head -1 || true)
    if [[ -n $log_file ]]; then
        F_IOPS_MERGE=$(awk -F', *' -v a="$a" -v b="$b" '$1 > a && $1 <= b + 100 { s += $2; n++ } END { if (n) printf "%.0f", s / n }' "$log_file")
    fi
    sum_mnt=$(md5sum <"$DISK" | cut -c1-32)
    stop_snaptree_ok
    [[ ! -e $P/delta.qcow2 ]] || die "delta.qcow2 still exists after the merge"
    check_images "writer pause" "$P"/leaf.qcow2 "$P"/base.qcow2
    qemu-img convert -f qcow2 -O raw "$P/leaf.qcow2" "$T/leaf.raw"
    sum_img=$(md5sum <"$T/leaf.raw" | cut -c1-32)
    rm -f "$T/leaf.raw"
    [[ $sum_mnt == "$sum_img" ]] || die "the leaf read through the mount ($sum_mnt) differs from its image ($sum_img)"
    NOTES+=("writer pause: leaf after the merge reads the same through the mount and from the image (md5 $sum_mnt), qemu-img check clean")
fi

# ---------------------------------------------------------------- report
verdict() { awk -v v="$1" -v g="$2" -v op="$3" 'BEGIN { if (v == "") { print "n/a"; exit } ok = (op == ">=") ? v >= g : v < g; print ok ? "met" : "NOT met" }'; }

echo
echo "snaptree merge vs qemu-img commit"
echo "host: $(uname -r), $(nproc) CPUs, $(qemu-img --version | head -1 | cut -d' ' -f1-3), $(fio --version 2>/dev/null || echo 'no fio')"
echo "load average (1/5/15 min): before $LOAD_BEFORE, after $(cut -d' ' -f1-3 /proc/loadavg) (other work on the host skews every figure)"
echo "chain: base <- delta <- leaf, $((2 * SIZE_MB)) MiB virtual, 64 KiB clusters; base $(mib "$BASE_BYTES") MiB," \
    "delta $(mib "$DELTA_BYTES") MiB in $DELTA_RUNS chunks of 64 KiB..1 MiB (disjoint from base's), leaf $(mib "$LEAF_BYTES") MiB"
echo "coalesce: cold cache, time of the command plus sync, median of $RUNS run(s)"
echo "  qemu-img: qemu-img commit -f qcow2 delta.qcow2 (delta into base, then empties delta); runs: ${QI_TIMES[*]} s"
echo "  snaptree: snaptree merge DIR base ($ST_WAY, ${ST_COPIED:-?} copied); runs: ${ST_TIMES[*]} s"
echo "  snaptree said: $ST_LINE"
echo
printf '%-40s %-5s %10s %10s %8s  %s\n' "test" "unit" "snaptree" "qemu-img" "qemu/st" "goal"
printf '%-40s %-5s %10s %10s %8s  %s\n' "----" "----" "--------" "--------" "-------" "----"
printf '%-40s %-5s %10s %10s %8s  %s\n' "coalesce ${SIZE_MB} MiB delta (median)" s "$ST_MED" "$QI_MED" "${RATIO}x" ">=1.0x"
if [[ -z $FIO_SKIP ]]; then
    printf '%-40s %-5s %10s %10s %8s  %s\n' "writer pause during leaf coalesce" ms "${P_PAUSE:-none}" - - "<100 ms"
fi
echo
if [[ -z $FIO_SKIP ]]; then
    echo "writer pause: base <- delta ($(mib "$P_DELTA_BYTES") MiB, hidden) <- leaf; fio randwrite 4k psync direct=$DIRECT," \
        "$( ((FIO_SPAN_MB > 0)) && echo "first $FIO_SPAN_MB MiB" || echo "whole disk"), merge-now 2 s in"
    echo "  engine: $P_WAY, ${P_COPIED:-?} copied, merge-now took $P_MERGE_S s"
    if [[ -n $P_PASSES ]]; then
        sed 's/^/  /' <<<"$P_PASSES"
    else
        echo "  (no merge pass lines: passes are only reported when the leaf is copied into delta)"
    fi
    echo "  merge writer pause: ${P_PAUSE:-none} ms"
    if [[ -n $F_ERR ]]; then
        echo "  fio: $F_ERR"
    else
        echo "  fio: ${F_IOPS} write IOPS over the run, ${F_IOPS_MERGE:-?} IOPS during the merge (100 ms samples), longest write ${F_CLAT_MAX} ms"
    fi
else
    echo "SKIP writer pause: $FIO_SKIP"
fi
for n in ${NOTES[@]+"${NOTES[@]}"}; do echo "note: $n"; done
echo "note: after every coalesce run, delta and leaf read the same as before (qemu-img compare) and qemu-img check is clean"
echo
echo "goals:"
printf '  %-40s %-9s %-8s %s\n' "coalesce, qemu-img time / snaptree time" ">= 1.0x" "$(verdict "$RATIO" 1.0 '>=')" "${RATIO}x"
if [[ -z $FIO_SKIP ]]; then
    printf '  %-40s %-9s %-8s %s\n' "writer pause during leaf coalesce" "< 100 ms" "$(verdict "$P_PAUSE" 100 '<')" "${P_PAUSE:-none} ms"
fi
