# Shell functions the benchmark scripts share: logging, the snaptree binary,
# fio, starting and stopping a snaptree mount by its pid, and the cleanup
# trap. Sourced (not run) by mount_vs_qsd.sh, merge_vs_commit.sh and
# gc_throttle.sh:
#
#   . "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# State it keeps (globals, empty when unset): T, the script's temp dir
# (removed on exit unless KEEP=1); BIN, the snaptree binary; ST_PID and
# ST_MNT, the running snaptree mount; FIO_PID, a background fio;
# CLEANUP_STEPS, the functions the exit trap runs before removing T.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
T=""
BIN=""
ST_PID="" ST_MNT=""
FIO_PID=""
CLEANUP_STEPS=(stop_fio stop_snaptree)

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# skip_all WHY: the whole benchmark cannot run here; says so, exits 0.
skip_all() { echo "SKIP all: $*"; exit 0; }

# require_tools TOOL...: skip_all unless every TOOL is on PATH.
require_tools() {
    local t hint
    for t; do
        hint=""
        [[ $t == qemu-* ]] && hint=" (apt-get install qemu-utils)"
        command -v "$t" >/dev/null || skip_all "$t is not on PATH$hint"
    done
}

now() { date +%s.%N; }
# elapsed T0: seconds since T0 (a `now`), to the millisecond.
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }

is_mounted() { awk -v p="$1" '$5 == p { f = 1 } END { exit !f }' /proc/self/mountinfo; }

# Waits up to $2 tenths of a second for pid $1 to end; 0 if it did.
wait_gone() {
    local pid=$1 n=$2
    while kill -0 "$pid" 2>/dev/null && ((n-- > 0)); do sleep 0.1; done
    ! kill -0 "$pid" 2>/dev/null
}

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# can_direct FILE: whether a 4 KiB O_DIRECT read of FILE works.
can_direct() { dd if="$1" of=/dev/null bs=4k count=1 iflag=direct status=none 2>/dev/null; }

# build_snaptree: sets BIN to $SNAPTREE_BIN if given, else builds this
# checkout with cargo build --release.
build_snaptree() {
    if [[ -n ${SNAPTREE_BIN:-} ]]; then
        BIN=$SNAPTREE_BIN
    else
        log "cargo build --release"
        (cd "$ROOT" && cargo build --release --quiet) || die "cargo build --release failed"
        BIN=$ROOT/target/release/snaptree
    fi
    [[ -x $BIN ]] || die "$BIN is not an executable"
}

# find_fio: FIO_SKIP stays empty if fio runs (installed with apt-get if
# missing and possible), else says why it does not.
find_fio() {
    FIO_SKIP=""
    command -v fio >/dev/null && return 0
    log "fio missing; trying apt-get install -y fio"
    if command -v apt-get >/dev/null &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q fio >/dev/null 2>&1 &&
        command -v fio >/dev/null; then
        log "installed $(fio --version)"
    else
        FIO_SKIP="fio is not on PATH and apt-get install -y fio did not provide it"
    fi
}

# start_snaptree SOURCE [MOUNT ARG...]: mounts SOURCE on $T/mnt in the
# foreground (-f), in the background of this script, logging to
# $T/snaptree.log, and waits up to 30 s for $T/mnt/tree.
start_snaptree() {
    local src=$1
    shift
    ST_MNT=$T/mnt
    "$BIN" mount "$src" "$ST_MNT" -f "$@" </dev/null >>"$T/snaptree.log" 2>&1 &
    ST_PID=$!
    local n=300
    until [[ -e $ST_MNT/tree ]]; do
        kill -0 "$ST_PID" 2>/dev/null || { ST_PID=""; die "snaptree mount exited: $(tail -3 "$T/snaptree.log")"; }
        ((n-- > 0)) || die "snaptree did not mount within 30 s"
        sleep 0.1
    done
    log "snaptree mounted $src on $ST_MNT (pid $ST_PID)"
}

# stop_snaptree: unmounts the mount start_snaptree made and waits for its
# daemon (SIGTERM, then SIGKILL, if it lingers); returns its exit status.
stop_snaptree() {
    [[ -n $ST_PID ]] || return 0
    if is_mounted "$ST_MNT"; then
        umount "$ST_MNT" 2>/dev/null || umount -l "$ST_MNT" 2>/dev/null || true
    fi
    if ! wait_gone "$ST_PID" 300; then
        log "snaptree (pid $ST_PID) still running after umount; SIGTERM"
        kill -TERM "$ST_PID" 2>/dev/null || true
        wait_gone "$ST_PID" 100 || kill -KILL "$ST_PID" 2>/dev/null || true
    fi
    local rc=0
    wait "$ST_PID" 2>/dev/null || rc=$?
    is_mounted "$ST_MNT" && umount -l "$ST_MNT" 2>/dev/null
    ST_PID=""
    return $rc
}

# stop_snaptree_ok: stop_snaptree, which must find the daemon exiting 0.
stop_snaptree_ok() {
    stop_snaptree || die "snaptree exited with an error (see $T/snaptree.log)"
}

# stop_fio: stops the background fio FIO_PID (SIGINT, then SIGKILL).
stop_fio() {
    [[ -n $FIO_PID ]] || return 0
    kill -INT "$FIO_PID" 2>/dev/null || true
    wait_gone "$FIO_PID" 100 || kill -KILL "$FIO_PID" 2>/dev/null || true
    wait "$FIO_PID" 2>/dev/null || true
    FIO_PID=""
}

# check_images LABEL IMAGE...: qemu-img check of each must be clean.
check_images() {
    local label=$1 img out
    shift
    for img; do
        out=$(qemu-img check -q "$img" 2>&1) || die "$label: qemu-img check $(basename "$img") failed: $out"
    done
}

# The exit trap: runs CLEANUP_STEPS, then removes T (kept with KEEP=1);
# the script exits with its own status.
cleanup() {
    local rc=$? step
    trap - EXIT INT TERM
    set +e
    for step in "${CLEANUP_STEPS[@]}"; do "$step"; done
    if [[ -n $T && -d $T ]]; then
        if [[ ${KEEP:-0} == 1 ]]; then
            log "kept $T"
        else
            rm -rf "$T"
        fi
    fi
    exit "$rc"
}

# make_workdir PREFIX: sets the traps (cleanup on exit, and on SIGINT and
# SIGTERM after a log line), then makes T, /var/tmp/PREFIX.XXXXXX, with
# the mount point T/mnt in it.
make_workdir() {
    trap cleanup EXIT
    trap 'log "interrupted"; exit 130' INT
    trap 'log "terminated"; exit 143' TERM
    T=$(mktemp -d "/var/tmp/$1.XXXXXX")
    mkdir -p "$T/mnt"
}
