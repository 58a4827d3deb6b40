#!/usr/bin/env bash
# How the memory import's knobs (mount options ckpt_pages, ckpt_wait) trade
# import speed against foreground I/O, to choose their defaults by
# measurement (issue: "import of a 1 GiB memory source with the default
# throttle and at full speed, and foreground read throughput of another
# snapshot point's disk.raw during each; the throttle must keep foreground
# >= 80% of idle").
#
# Tree (qcow2, made with qemu-img): base (DISK_MB MiB of random data) <-
# vm1 <- vm2 <- leaf. Memory sources, raw dumps outside the tree directory
# (named *.vmem: a *.raw inside the tree would be taken as a disk):
# ram1.vmem (MEM_MB MiB, random pages with ZERO_PCT% zero pages in 256 KiB
# runs) and ram2.vmem (ram1 with CHANGE_PCT% of its pages, at random,
# rewritten with new random data).
#
#   first import: `checkpoint ram1.vmem` into vm1 (its parent base has no
#                 checkpoint: every non-zero page is stored), for each
#                 setting of FULL_SETTINGS;
#   delta import: `checkpoint ram2.vmem` into vm2 (against vm1's
#                 checkpoint: only the changed pages are stored, the
#                 realistic case), for each setting of SETTINGS.
# Each run mounts with -o gc_idle=off,ckpt_pages=N,ckpt_wait=MS, detaches
# the point's previous checkpoint (`memory none`), starts fio reading
# base/disk.raw (sequential, 1 MiB blocks, O_DIRECT when the mount allows
# it, psync, time-based) and 1 s later writes the command to the point's
# ctl, which returns when the import is done. The foreground figure is
# what fio completed between the write and its return (from fio's per-I/O
# log), in MB/s; its idle reference is the same fio run's MB/s in the
# IDLE_S s before the write and the IDLE_S s after the import (the mean of
# the two), so each ratio pairs figures taken under the same load on the
# host. "sleeps" is the time the throttle alone adds: (blocks - 1) *
# ckpt_wait. Before each kind's runs, one import at full speed with no
# reader measures the import's own time and the CPU the daemon spends on
# it (utime + stime): "cores" = that CPU / a setting's import time, the
# share of a core the import takes on average under that setting.
#
# Checked on every run: the write succeeds, status says "last command:
# <point>/ctl: checkpoint ...: ok" with no import left in progress and no
# problems, and <point>/info.json's "memory" is a page-delta checkpoint
# whose parent is vm1's (delta imports) or none (first imports); once per
# kind: <point>/memory.raw equals the source (cmp). At the end every delta
# image passes qemu-img check. Any failure aborts the script (exit 1);
# timings are only reported.
#
# By default the host page cache is warm (the sources, the deltas and base
# fit in RAM), so import and reader compete for the CPU (2 cores here) and
# the FUSE daemon; COLD=1 drops the caches before each run (fio's first
# pass over base and the import's reads then come from the disk).
#
# Knobs: DISK_MB (1024), MEM_MB (1024), CHANGE_PCT (10), ZERO_PCT (25),
# SETTINGS ("2048:0 2048:20 2048:5 2048:10 4096:10 4096:20 8192:40 512:5
# 2048:50 256:2"; add 64:25, VMware's, for a ~110 s import at 1 GiB), FULL_SETTINGS
# ("2048:0 4096:20"; "" measures first imports only alone), RUNS (1; medians of RUNS rounds), IDLE_S (3, 1 below 256 MiB), COLD (0), GOAL_PCT
# (80), KEEP=1 (keep the temp dir under /var/tmp), SNAPTREE_BIN (use this
# binary instead of `cargo build --release`). Needs root, /dev/fuse,
# qemu-img, qemu-io, fio, python3.
#
# On a shared host, `nice -n -10` on the whole script keeps other work
# from swamping the ratios (the import and the reader keep competing with
# each other as before).
#
#   sudo bash benches/checkpoint_throttle.sh
#   DISK_MB=64 MEM_MB=64 SETTINGS="2048:0 4096:20" sudo bash benches/checkpoint_throttle.sh   # quick

set -euo pipefail
export LC_ALL=C
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DISK_MB=${DISK_MB:-1024}
MEM_MB=${MEM_MB:-1024}
CHANGE_PCT=${CHANGE_PCT:-10}
ZERO_PCT=${ZERO_PCT:-25}
SETTINGS=${SETTINGS:-"2048:0 2048:20 2048:5 2048:10 4096:10 4096:20 8192:40 512:5 2048:50 256:2"}
FULL_SETTINGS=${FULL_SETTINGS-"2048:0 4096:20"}
RUNS=${RUNS:-1}
IDLE_S=${IDLE_S:-$((MEM_MB >= 256 ? 3 : 1))}
COLD=${COLD:-0}
GOAL_PCT=${GOAL_PCT:-80}

for v in DISK_MB MEM_MB CHANGE_PCT ZERO_PCT RUNS IDLE_S GOAL_PCT; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a non-negative integer (is ${!v:-empty})"
done
((DISK_MB >= 8 && MEM_MB >= 1 && RUNS >= 1 && IDLE_S >= 1)) || die "need DISK_MB >= 8, MEM_MB >= 1, RUNS >= 1, IDLE_S >= 1"
((CHANGE_PCT <= 100 && ZERO_PCT <= 100)) || die "CHANGE_PCT and ZERO_PCT are percentages"
for s in $SETTINGS $FULL_SETTINGS; do
    [[ $s =~ ^[0-9]+:[0-9]+$ && ${s%%:*} -ge 1 ]] || die "bad setting $s (PAGES:WAIT_MS, PAGES >= 1)"
done
[[ -n $SETTINGS ]] || die "SETTINGS is empty"

[[ $(id -u) -eq 0 ]] || skip_all "not root"
[[ -c /dev/fuse ]] || skip_all "no /dev/fuse"
require_tools qemu-img qemu-io python3 cmp
find_fio
[[ -z $FIO_SKIP ]] || skip_all "$FIO_SKIP"
build_snaptree

make_workdir snaptree-ckpt
MNT=$T/mnt
TREE=$T/tree
# Memory sources inside the tree directory (a subdirectory, which discovery
# passes over): `ctl checkpoint` reads no file from outside the tree.
SRC=$TREE/src
PAGE=4096
MEM_PAGES=$((MEM_MB * 1024 * 1024 / PAGE))
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

# ------------------------------------------------------------ the inputs
mkdir "$TREE" "$SRC"
log "making the tree: base with $DISK_MB MiB of random data <- vm1 <- vm2 <- leaf"
head -c $((DISK_MB * 1024 * 1024)) /dev/urandom >"$SRC/disk.bin"
(
    cd "$TREE"
    qemu-img convert -q -f raw -O qcow2 "$SRC/disk.bin" base.qcow2
    qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 vm1.qcow2
    qemu-img create -q -f qcow2 -b vm1.qcow2 -F qcow2 vm2.qcow2
    qemu-img create -q -f qcow2 -b vm2.qcow2 -F qcow2 leaf.qcow2
    # A little of each overlay's own, as a VM leaves between snapshots.
    qemu-io -f qcow2 -c "write -P 0x21 0 4M" vm1.qcow2 >/dev/null
    qemu-io -f qcow2 -c "write -P 0x22 4M 4M" vm2.qcow2 >/dev/null
)
rm -f "$SRC/disk.bin"

log "making the memory sources: ram1.vmem ($MEM_MB MiB, $ZERO_PCT% zero pages), ram2.vmem ($CHANGE_PCT% of the pages changed)"
# Prints "zero_pages changed_pages".
read -r ZERO_PAGES CHANGED_PAGES < <(python3 - "$SRC" "$MEM_PAGES" "$ZERO_PCT" "$CHANGE_PCT" <<'PY'
import os, random, shutil, sys
src, pages, zero_pct, change_pct = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
P, RUN = 4096, 64                       # zero pages come in 256 KiB runs
rng = random.Random(1)
zero = [False] * pages
with open(f"{src}/ram1.vmem", "wb") as f:
    for at in range(0, pages, RUN):
        n = min(RUN, pages - at)
        if at > 0 and rng.randrange(100) < zero_pct:   # page 0 holds data
            f.write(bytes(n * P))
            zero[at:at + n] = [True] * n
        else:
            f.write(os.urandom(n * P))
shutil.copyfile(f"{src}/ram1.vmem", f"{src}/ram2.vmem")
changed = sorted(rng.sample(range(pages), pages * change_pct // 100))
fd = os.open(f"{src}/ram2.vmem", os.O_WRONLY)
for p in changed:
    os.pwrite(fd, os.urandom(P), p * P)
os.close(fd)
print(sum(zero), len(changed))
PY
)
[[ -n ${CHANGED_PAGES:-} && -s $SRC/ram2.vmem ]] || die "making the memory sources failed"
sync

# ------------------------------------------------------------ helpers
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
status_line() { grep -E "^(last command|problems|memory import)" "$MNT/status" | tr '\n' ' '; }

mount_with() { # PAGES WAIT_MS
    start_snaptree "$TREE" -o "gc_idle=off,ckpt_pages=$1,ckpt_wait=$2"
    [[ -f $MNT/base/disk.raw ]] || die "no base/disk.raw; tree: $(cat "$MNT/tree")"
}

# mem_info POINT: "none", or "kind|delta_parent|bytes_held|size|source|error"
# of its info.json "memory".
mem_info() {
    python3 - "$MNT/$1/info.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1])).get("memory")
if m is None:
    print("none")
else:
    print(f'{m.get("kind")}|{m.get("delta_parent")}|{m.get("bytes_held")}|{m.get("size")}|{m.get("source")}|{m.get("error", "")}')
PY
}

detach() { # POINT: removes its checkpoint, if any
    [[ $(mem_info "$1") == none ]] && return 0
    echo "memory none" >"$MNT/$1/ctl" 2>/dev/null || die "memory none on $1 failed: $(status_line)"
    [[ $(mem_info "$1") == none ]] || die "$1 still has memory after 'memory none': $(mem_info "$1")"
}

DIRECT=""
fg_start() {
    if [[ -z $DIRECT ]]; then
        DIRECT=1
        can_direct "$MNT/base/disk.raw" || DIRECT=0
        ((DIRECT)) || log "O_DIRECT fails on the mount; the foreground uses buffered reads"
    fi
    rm -f "$T"/fg_bw*.log
    fio --name=fg --filename="$MNT/base/disk.raw" --rw=read --bs=1M --direct="$DIRECT" \
        --ioengine=psync --time_based --runtime=3600 \
        --write_bw_log="$T/fg" --log_avg_msec=0 --log_unix_epoch=1 \
        --output-format=json --output="$T/fio.json" >/dev/null 2>"$T/fio.err" &
    FIO_PID=$!
    sleep 1
    kill -0 "$FIO_PID" 2>/dev/null || die "fio ended early: $(tail -3 "$T/fio.err")"
}

# fg_window T0 T1: MB/s fio completed between two `now`s, from its
# per-I/O log (written when fio stops: call fg_stop first).
fg_window() {
    local f
    f=$(ls "$T"/fg_bw*.log 2>/dev/null | head -1 || true)
    [[ -s $f ]] || die "fio wrote no I/O log: $(tail -3 "$T/fio.err")"
    awk -F', *' -v a="$1" -v b="$2" '
        { t = $1 / 1000; if (t > a && t <= b) { s += $4; n++ } }
        END { if (!n) exit 1; printf "%.0f\n", s / 1e6 / (b - a) }' "$f" ||
        die "fio completed no read between $1 and $2 (its log: $(head -2 "$f" | tr '\n' ' '))"
}

fg_stop() {
    kill -0 "$FIO_PID" 2>/dev/null || die "fio ended during the run: $(tail -3 "$T/fio.err")"
    stop_fio
}

# import_run POINT SOURCE PAGES WAIT_MS PARENT: one throttled import with
# the foreground reader running through it and IDLE_S s either side, the
# import's checkpoint must back onto PARENT's (vm1) or nothing (None);
# sets R_S (import seconds), R_FG (foreground MB/s during the import),
# R_IDLE (the mean of its MB/s just before and just after), R_PCT (R_FG
# as % of R_IDLE), R_HELD (bytes the new delta holds).
import_run() {
    local point=$1 src=$2 pages=$3 wait=$4 parent=$5 a0 a1 t0 t1 b0 b1 pre post
    local info kind dparent msize msrc merr
    mount_with "$pages" "$wait"
    if [[ $parent == vm1 ]]; then # the delta backs onto vm1's checkpoint file
        IFS='|' read -r kind dparent R_HELD msize msrc merr <<<"$(mem_info vm1)"
        [[ $kind == page-delta* ]] || die "vm1 has no page-delta checkpoint: $(mem_info vm1)"
        parent=$(basename "$msrc")
    fi
    detach "$point"
    if ((COLD)); then drop_caches; fi
    fg_start
    a0=$(now)
    sleep "$IDLE_S"
    a1=$(now) t0=$a1
    if ! echo "checkpoint $src" >"$MNT/$point/ctl" 2>"$T/ctl.err"; then
        stop_fio
        die "checkpoint $src into $point failed ($(cat "$T/ctl.err")): $(status_line)"
    fi
    t1=$(now) b0=$t1
    sleep "$IDLE_S"
    b1=$(now)
    fg_stop
    pre=$(fg_window "$a0" "$a1")
    R_FG=$(fg_window "$t0" "$t1")
    post=$(fg_window "$b0" "$b1")
    IDLE_MBS+=("$pre" "$post")
    R_IDLE=$(((pre + post) / 2))
    R_PCT=$(awk -v f="$R_FG" -v i="$R_IDLE" 'BEGIN { printf "%.0f", 100 * f / i }')
    R_S=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
    grep -q "^last command: $point/ctl: checkpoint .*: ok$" "$MNT/status" ||
        die "status after the import into $point: $(status_line)"
    ! grep -q "^memory import into" "$MNT/status" || die "an import still shows as running: $(status_line)"
    grep -q "^problems: none" "$MNT/status" || die "problems after the import: $(status_line)"
    info=$(mem_info "$point")
    IFS='|' read -r kind dparent R_HELD msize msrc merr <<<"$info"
    [[ $kind == page-delta* ]] || die "$point/info.json memory after the import: $info"
    [[ $dparent == "$parent" ]] || die "$point's checkpoint backs onto '$dparent', expected '$parent'"
    [[ $msize == $((MEM_MB * 1024 * 1024)) ]] || die "$point's memory is $msize bytes, the source $((MEM_MB * 1024 * 1024))"
    [[ -z $merr ]] || die "$point's memory: $merr"
    log "$point <- $(basename "$src") at $pages:$wait: $R_S s; foreground $pre / $R_FG / $post MB/s" \
        "(before / during / after: $R_PCT%); delta holds $(mib "$R_HELD") MiB; load $(cut -d' ' -f1 /proc/loadavg)"
}

# daemon_cpu: seconds of CPU the snaptree daemon has used (user + system).
daemon_cpu() { awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.2f\n", ($12 + $13) / hz }' "/proc/$ST_PID/stat"; }

# alone_run POINT SOURCE KIND: the import at full speed with nothing else
# running: its time and the CPU the daemon spent on it (the import's cost,
# which the throttle only spreads out) in ALONE_S[KIND], ALONE_CPU[KIND].
alone_run() {
    local c0 t0
    mount_with 2048 0
    detach "$1"
    if ((COLD)); then drop_caches; fi
    c0=$(daemon_cpu) t0=$(now)
    echo "checkpoint $2" >"$MNT/$1/ctl" 2>"$T/ctl.err" ||
        die "checkpoint $2 into $1 failed ($(cat "$T/ctl.err")): $(status_line)"
    ALONE_S[$3]=$(elapsed "$t0")
    ALONE_CPU[$3]=$(awk -v a="$c0" -v b="$(daemon_cpu)" 'BEGIN { printf "%.2f", b - a }')
    log "$1 <- $(basename "$2") alone at full speed: ${ALONE_S[$3]} s, ${ALONE_CPU[$3]} s CPU"
    stop_snaptree_ok
}

verify_bytes() { # POINT SOURCE
    log "cmp $1/memory.raw $(basename "$2")"
    [[ $(stat -c %s "$MNT/$1/memory.raw") == $(stat -c %s "$2") ]] ||
        die "$1/memory.raw is $(stat -c %s "$MNT/$1/memory.raw") bytes, $(basename "$2") $(stat -c %s "$2")"
    cmp "$MNT/$1/memory.raw" "$2" >"$T/cmp.out" 2>&1 || die "$1/memory.raw differs from $(basename "$2"): $(cat "$T/cmp.out")"
    NOTES+=("$1/memory.raw equals $(basename "$2") (cmp, $MEM_MB MiB)")
}

# blocks - 1 sleeps of WAIT_MS: what the throttle itself adds.
sleeps() { awk -v p="$MEM_PAGES" -v n="${1%%:*}" -v w="${1##*:}" 'BEGIN { b = int((p + n - 1) / n); printf "%.2f", (b - 1) * w / 1000 }'; }

declare -A IMP_S IMP_FG IMP_IDLE IMP_PCT IMP_HELD ALONE_S ALONE_CPU
NOTES=()
IDLE_MBS=()

record() { # KIND SETTING
    IMP_S[$1,$2]+="$R_S " IMP_FG[$1,$2]+="$R_FG " IMP_IDLE[$1,$2]+="$R_IDLE " IMP_PCT[$1,$2]+="$R_PCT "
    IMP_HELD[$1,$2]=$R_HELD
}

# ------------------------------------------------------------ the runs
# Runs go round the settings RUNS times, so that drifting load on the host
# spreads over all of them. First imports come first: the last one's
# checkpoint of vm1 stays for the delta imports.
alone_run vm1 "$SRC/ram1.vmem" first
for ((r = 0; r < RUNS; r++)); do
    for s in $FULL_SETTINGS; do
        import_run vm1 "$SRC/ram1.vmem" "${s%%:*}" "${s##*:}" None
        record first "$s"
        stop_snaptree_ok
    done
done
mount_with 2048 0
verify_bytes vm1 "$SRC/ram1.vmem"
stop_snaptree_ok

alone_run vm2 "$SRC/ram2.vmem" delta
for ((r = 0; r < RUNS; r++)); do
    for s in $SETTINGS; do
        import_run vm2 "$SRC/ram2.vmem" "${s%%:*}" "${s##*:}" vm1
        record delta "$s"
        if [[ ${VERIFIED:-} != 1 ]]; then
            verify_bytes vm2 "$SRC/ram2.vmem"
            VERIFIED=1
        fi
        stop_snaptree_ok
    done
done

check_images "deltas" "$TREE"/.snaptree-memory/*.qcow2
NOTES+=("every delta in .snaptree-memory passes qemu-img check: $(cd "$TREE/.snaptree-memory" && ls ./*.qcow2 | xargs -n1 basename | tr '\n' ' ')")

# ------------------------------------------------------------ report
IDLE=$(printf '%s\n' "${IDLE_MBS[@]}" | median | xargs printf '%.0f')
BEST="" BEST_S="" BEST_M="" BEST_M_S=""
med() { tr ' ' '\n' <<<"$1" | grep . | median; }
row() { # KIND SETTING
    local k=$1 s=$2 t fg idle pct rate cores note=""
    t=$(med "${IMP_S[$k,$s]}")
    fg=$(med "${IMP_FG[$k,$s]}")
    idle=$(med "${IMP_IDLE[$k,$s]}")
    pct=$(med "${IMP_PCT[$k,$s]}" | xargs printf '%.0f')
    rate=$(awk -v m="$MEM_MB" -v t="$t" 'BEGIN { printf "%.0f", m / t }')
    cores=$(awk -v c="${ALONE_CPU[$k]}" -v t="$t" 'BEGIN { printf "%.2f", c / t }')
    [[ $s == 4096:20 ]] && note="default"
    [[ ${s##*:} == 0 ]] && note="full speed"
    printf '%-7s %-10s %8s %9.2f %7s %6s %9.0f %9.0f %7s%% %9s  %s\n' "$k" "$s" "$(sleeps "$s")" "$t" "$rate" "$cores" "$idle" "$fg" "$pct" \
        "$(mib "${IMP_HELD[$k,$s]}")" "$note"
    [[ $k == delta ]] || return 0
    if ((pct >= GOAL_PCT)) && { [[ -z $BEST ]] || awk -v a="$t" -v b="$BEST_S" 'BEGIN { exit !(a < b) }'; }; then
        BEST=$s BEST_S=$t
    fi
    if ((pct >= GOAL_PCT + 5)) && { [[ -z $BEST_M ]] || awk -v a="$t" -v b="$BEST_M_S" 'BEGIN { exit !(a < b) }'; }; then
        BEST_M=$s BEST_M_S=$t
    fi
}

echo
echo "snaptree memory import throttle (mount -o ckpt_pages=N,ckpt_wait=MS)"
echo "host: $(uname -r), $(nproc) CPUs, $(qemu-img --version | head -1 | cut -d' ' -f1-3), $(fio --version)"
echo "load average (1/5/15 min): before $LOAD_BEFORE, after $(cut -d' ' -f1-3 /proc/loadavg) (other work on the host skews every figure)"
echo "tree: base ($DISK_MB MiB random data, qcow2) <- vm1 <- vm2 <- leaf; page cache $(if ((COLD)); then echo "dropped before each run"; else echo warm; fi)"
echo "memory: ram1.vmem $MEM_MB MiB raw, $ZERO_PAGES of $MEM_PAGES pages zero; ram2.vmem = ram1 with $CHANGED_PAGES pages changed ($CHANGE_PCT%)"
echo "  first: checkpoint ram1.vmem into vm1 (parent has none: whole import); delta: checkpoint ram2.vmem into vm2 (against vm1's)"
echo "foreground: fio read base/disk.raw, sequential 1 MiB, direct=$DIRECT, psync; idle = its MB/s in the $IDLE_S s before and after"
echo "  each import (mean of the two), fg = during the import (the ctl write); fg/idle per run. All idle windows: median $IDLE MB/s,"
echo "  range $(printf '%s\n' "${IDLE_MBS[@]}" | sort -n | sed -n '1p;$p' | paste -sd- -) MB/s"
echo "alone (full speed, no reader): first ${ALONE_S[first]} s, ${ALONE_CPU[first]} s CPU; delta ${ALONE_S[delta]} s, ${ALONE_CPU[delta]} s CPU"
echo "figures: median of $RUNS run(s); sleeps = (blocks - 1) * ckpt_wait, what the throttle adds; cores = CPU alone / import s,"
echo "  the share of a core the import takes on average; held = what the new delta stores"
echo
printf '%-7s %-10s %8s %9s %7s %6s %9s %9s %8s %9s\n' "import" "pages:ms" "sleeps s" "import s" "MiB/s" "cores" "idle MB/s" "fg MB/s" "fg/idle" "held MiB"
printf '%-7s %-10s %8s %9s %7s %6s %9s %9s %8s %9s\n' "------" "--------" "--------" "--------" "-----" "-----" "---------" "-------" "-------" "--------"
for s in $FULL_SETTINGS; do row first "$s"; done
for s in $SETTINGS; do row delta "$s"; done
echo
echo "fastest delta import with foreground >= $GOAL_PCT% of idle: ${BEST:-none} ${BEST:+($BEST_S s)}"
echo "fastest delta import with foreground >= $((GOAL_PCT + 5))% of idle: ${BEST_M:-none} ${BEST_M:+($BEST_M_S s)}"
if ((RUNS > 1)); then
    echo
    echo "runs (import s / fg as % of idle):"
    for s in $FULL_SETTINGS; do echo "  first $s: ${IMP_S[first,$s]}/ ${IMP_PCT[first,$s]}"; done
    for s in $SETTINGS; do echo "  delta $s: ${IMP_S[delta,$s]}/ ${IMP_PCT[delta,$s]}"; done
fi
echo
for n in "${NOTES[@]}"; do echo "ok: $n"; done
