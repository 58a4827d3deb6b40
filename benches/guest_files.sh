#!/usr/bin/env bash
# Guest files through snaptree (`fs/p2`, parsed in userspace) against the
# kernel's ext4 on a read-only loop device over the same point's
# `disk.raw` through the same mount, and against `debugfs rdump` (a
# userspace peer) on that point's `volumes/p2.raw` (see README.md,
# "Benchmarks").
#
# Builds a GPT disk (p1 EFI, p2 ext4 made by `mkfs.ext4 -d` from SRC, by
# default /usr, under `usr/`, plus a BIG_MB MiB file `big.bin` written with
# debugfs), puts it in a qcow2 chain of DEPTH images (the data in the base,
# the point read is the leaf, so every read resolves through the chain),
# mounts the tree, then, caches dropped before each:
#
#   - first access: open the volume and list its root (`ls fs/p2`);
#   - stat of every entry: `find fs/p2 -printf ''` (readdir + getattr);
#   - `tar -cf - usr | wc -c` (every file's bytes);
#   - copying big.bin vs a sequential read of as many bytes of disk.raw;
#   - debugfs rdump of usr (userspace peer; ext4 only, no FUSE).
#
# Prints the times and the ratios snaptree / kernel (as speed: > 1 means
# snaptree is faster) and whether the goals of issue 13 are met.
# Needs root (loop devices, mounts, drop_caches), /dev/fuse, qemu-img,
# sgdisk, mkfs.ext4, debugfs, mkfs.vfat.
#
# Knobs: SRC (/usr), BIG_MB (1024), DEPTH (8), KEEP=1, SNAPTREE_BIN.
#
#   sudo bash benches/guest_files.sh
#   SRC=/usr/share BIG_MB=64 DEPTH=4 bash benches/guest_files.sh   # quick

set -euo pipefail
export LC_ALL=C
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SRC=${SRC:-/usr}
BIG_MB=${BIG_MB:-1024}
DEPTH=${DEPTH:-8}
[[ -d $SRC ]] || die "SRC=$SRC is not a directory"
[[ $BIG_MB =~ ^[0-9]+$ && $BIG_MB -ge 1 ]] || die "BIG_MB must be a positive integer"
[[ $DEPTH =~ ^[0-9]+$ && $DEPTH -ge 1 && $DEPTH -le 64 ]] || die "DEPTH must be 1..64"

[[ $(id -u) -eq 0 ]] || skip_all "not root (needs loop devices, mounts, drop_caches)"
[[ -c /dev/fuse ]] || skip_all "/dev/fuse does not exist"
require_tools qemu-img sgdisk mkfs.ext4 debugfs mkfs.vfat losetup

LOOP="" KMNT="" BIND=""
stop_kernel() {
    [[ -n $KMNT ]] && is_mounted "$KMNT" && umount "$KMNT"
    [[ -n $LOOP ]] && losetup -d "$LOOP" 2>/dev/null
    [[ -n $BIND ]] && is_mounted "$BIND" && umount "$BIND"
    LOOP="" KMNT="" BIND=""
    return 0
}
CLEANUP_STEPS=(stop_kernel stop_snaptree)
make_workdir snaptree-guest-bench
build_snaptree

# ---------------------------------------------------------------- the disk
log "staging $SRC as usr/ (bind mount)"
mkdir -p "$T/stage/usr" "$T/images" "$T/kmnt" "$T/rdump"
BIND=$T/stage/usr
mount --bind "$SRC" "$BIND"
mount -o remount,bind,ro "$BIND"
src_bytes=$(du -sb "$SRC" | cut -f1)
files=$(find "$SRC" | wc -l)
ext_mb=$(((src_bytes * 13 / 10 + BIG_MB * 1048576) / 1048576 + 512))
log "mkfs.ext4 -d: $files entries, $((src_bytes / 1048576)) MiB, in a $ext_mb MiB volume"
mkfs.ext4 -q -F -L benchroot -d "$T/stage" "$T/root.img" "${ext_mb}M"
umount "$BIND"
BIND=""
head -c $((BIG_MB * 1048576)) /dev/urandom >"$T/big.bin"
debugfs -w -R "write $T/big.bin big.bin" "$T/root.img" >/dev/null 2>&1
rm -f "$T/big.bin"

p2_off=$((33 * 1048576))
disk_mb=$((33 + ext_mb + 1))
truncate -s "${disk_mb}M" "$T/disk.img"
sgdisk -n1:2048:+32M -t1:ef00 -c1:EFI -n2:$((p2_off / 512)):+${ext_mb}M -t2:8300 "$T/disk.img" >/dev/null
mkfs.vfat -C "$T/efi.img" 32768 >/dev/null
dd if="$T/efi.img" of="$T/disk.img" bs=1M seek=1 conv=notrunc status=none
dd if="$T/root.img" of="$T/disk.img" bs=1M seek=33 conv=notrunc status=none
rm -f "$T/efi.img" "$T/root.img"
qemu-img convert -O qcow2 "$T/disk.img" "$T/images/d00.qcow2"
rm -f "$T/disk.img"
prev=d00
for ((i = 1; i < DEPTH; i++)); do
    cur=$(printf 'd%02d' "$i")
    qemu-img create -q -f qcow2 -b "$prev.qcow2" -F qcow2 "$T/images/$cur.qcow2"
    prev=$cur
done
start_snaptree "$T/images" -o ro
P=$ST_MNT/$prev

# ---------------------------------------------------------------- runs
# timed LABEL CMD...: runs CMD with caches dropped; prints the seconds.
timed() {
    local t0
    drop_caches
    t0=$(now)
    "$@" >/dev/null
    elapsed "$t0"
}

first=$(timed ls "$P/fs/p2")
snap_find=$(timed find "$P/fs/p2" -printf '')
snap_tar=$(timed sh -c "tar -cf - -C '$P/fs/p2' usr | wc -c")
snap_big=$(timed cat "$P/fs/p2/big.bin")
# big.bin's bytes, read sequentially from disk.raw: the ceiling.
disk_seq=$(timed dd if="$P/disk.raw" of=/dev/null bs=1M skip=33 count="$BIG_MB" status=none)

LOOP=$(losetup -f --show -r -o "$p2_off" --sizelimit $((ext_mb * 1048576)) "$P/disk.raw")
KMNT=$T/kmnt
mount -o ro,noload "$LOOP" "$KMNT"
kern_first=$(timed ls "$KMNT")
kern_find=$(timed find "$KMNT" -printf '')
kern_tar=$(timed sh -c "tar -cf - -C '$KMNT' usr | wc -c")
kern_big=$(timed cat "$KMNT/big.bin")
stop_kernel
rdump=$(timed debugfs -R "rdump /usr $T/rdump" "$P/volumes/p2.raw")
rm -rf "$T/rdump"
stop_snaptree_ok

# ---------------------------------------------------------------- report
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }
ms() { awk -v a="$1" 'BEGIN { printf "%.0f ms", a * 1000 }'; }
echo
echo "guest files: snaptree fs/ vs the kernel's ext4 (loop, ro, over the same disk.raw)"
echo "  volume: $files entries from $SRC, big.bin $BIG_MB MiB, chain depth $DEPTH"
printf '  %-28s %12s %12s %10s\n' "" snaptree kernel "speed x"
printf '  %-28s %12s %12s %10s\n' "first access (ls root)" "$(ms "$first")" "$(ms "$kern_first")" "$(ratio "$kern_first" "$first")"
printf '  %-28s %12s %12s %10s\n' "stat every entry (find)" "$snap_find s" "$kern_find s" "$(ratio "$kern_find" "$snap_find")"
printf '  %-28s %12s %12s %10s\n' "tar usr | wc -c" "$snap_tar s" "$kern_tar s" "$(ratio "$kern_tar" "$snap_tar")"
printf '  %-28s %12s %12s %10s\n' "copy big.bin" "$snap_big s" "$kern_big s" "$(ratio "$kern_big" "$snap_big")"
printf '  %-28s %12s\n' "debugfs rdump usr (peer)" "$rdump s"
echo
goal() { awk -v r="$2" -v g="$3" -v n="$1" 'BEGIN { printf "  %-44s %s (%.2f, goal %s)\n", n, (r >= g ? "met" : "NOT met"), r, g }'; }
goal "stat: at least 1x the kernel" "$(ratio "$kern_find" "$snap_find")" 1
goal "tar: at least 0.8x the kernel" "$(ratio "$kern_tar" "$snap_tar")" 0.8
goal "copy big.bin: 0.8x a disk.raw read of as much" "$(ratio "$disk_seq" "$snap_big")" 0.8
awk -v f="$first" 'BEGIN { printf "  %-44s %s (%.0f ms, goal < 50 ms)\n", "first access", (f < 0.05 ? "met" : "NOT met"), f * 1000 }'
