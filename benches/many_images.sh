#!/usr/bin/env bash
# Mounting a directory of many small qcow2 images: how long until the mount
# is ready, the daemon's resident memory (VmRSS, VmHWM) and its open
# descriptors (one per image: each holds the image's QEMU-compatible lock).
# No peer mounts a whole directory of chains, so this reports absolute
# figures for one build; run it with SNAPTREE_BIN set to compare builds.
#
#   sudo bash benches/many_images.sh                 # 10,000 images
#   COUNT=2000 RUNS=1 bash benches/many_images.sh    # quick run
#
# Env: COUNT (images, default 10000), RUNS (mounts, default 3),
# SNAPTREE_BIN (default: cargo build --release).
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT=${COUNT:-10000}
RUNS=${RUNS:-3}
if [ -z "${SNAPTREE_BIN:-}" ]; then
    cargo build --release --quiet
    SNAPTREE_BIN=$PWD/target/release/snaptree
fi
[ -e /dev/fuse ] || { echo "SKIP: /dev/fuse is missing"; exit 0; }
work=$(mktemp -d /tmp/snaptree-many-XXXXXX)
pid=
cleanup() {
    if mountpoint -q "$work/mnt" 2>/dev/null; then umount "$work/mnt" || umount -l "$work/mnt"; fi
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/images" "$work/mnt"
qemu-img create -q -f qcow2 "$work/one.qcow2" 1M
for i in $(seq 1 "$COUNT"); do cp --sparse=always "$work/one.qcow2" "$work/images/img$i.qcow2"; done
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
printf '%-6s %10s %10s %10s %8s %8s\n' run mount_s rss_kb hwm_kb fds points
for r in $(seq 1 "$RUNS"); do
    start=$(date +%s.%N)
    "$SNAPTREE_BIN" mount "$work/images" "$work/mnt" -f -o gc_idle=off 2>"$work/daemon.log" &
    pid=$!
    until mountpoint -q "$work/mnt"; do
        kill -0 "$pid" 2>/dev/null || { echo "daemon exited:"; tail -3 "$work/daemon.log"; exit 1; }
        sleep 0.01
    done
    end=$(date +%s.%N)
    points=$(ls "$work/mnt" | wc -l)
    rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
    hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
    fds=$(ls "/proc/$pid/fd" | wc -l)
    printf '%-6s %10.2f %10s %10s %8s %8s\n' "$r" "$(awk -v a="$start" -v b="$end" 'BEGIN { print b - a }')" "$rss" "$hwm" "$fds" "$((points - 3))"
    umount "$work/mnt"
    wait "$pid" || true
    pid=
done
