#!/usr/bin/env bash
# Guest files through snaptree (`fs/p2`, parsed in userspace) against the
# peer that reads the same volume through the same mount: the kernel's
# ext4 and XFS on a read-only loop device over the point's `disk.raw`, and
# ntfs-3g (the only NTFS peer here) on such a loop device; plus, for ext4,
# `debugfs rdump` (a userspace peer) on `volumes/p2.raw` (see README.md,
# "Benchmarks").
#
# For each filesystem in FSTYPES, builds a GPT disk (p1 EFI, p2 holding SRC,
# by default /usr, under `usr/`, plus a BIG_MB MiB file `big.bin`: ext4 made
# by `mkfs.ext4 -d`, XFS filled through a kernel loop mount, NTFS through
# ntfs-3g), puts it in a qcow2 chain of DEPTH images (the data in the base,
# the point read is the leaf, so every read resolves through the chain),
# mounts the tree, then, caches dropped before each:
#
#   - first access: open the volume and list its root (`ls fs/p2`);
#   - stat of every entry: `find fs/p2 -printf ''` (readdir + getattr);
#   - `tar -cf - usr | wc -c` (every file's bytes);
#   - copying big.bin vs a sequential read of as many bytes of disk.raw;
#   - debugfs rdump of usr (ext4 only; userspace, no FUSE).
#
# Prints the times and the ratios snaptree / peer (as speed: > 1 means
# snaptree is faster) and whether the goals of issues 13 and 15 are met.
# Needs root (loop devices, mounts, drop_caches), /dev/fuse, qemu-img,
# sgdisk, mkfs.vfat; mkfs.ext4 + debugfs, mkfs.xfs, mkntfs + ntfs-3g for
# each filesystem (one whose tools are missing is skipped, said so).
#
# Knobs: SRC (/usr), BIG_MB (1024), DEPTH (8), FSTYPES ("ext4 xfs ntfs"),
# KEEP=1, SNAPTREE_BIN.
#
#   sudo bash benches/guest_files.sh
#   SRC=/usr/share BIG_MB=64 DEPTH=4 bash benches/guest_files.sh   # quick

set -euo pipefail
export LC_ALL=C
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SRC=${SRC:-/usr}
BIG_MB=${BIG_MB:-1024}
DEPTH=${DEPTH:-8}
FSTYPES=${FSTYPES:-ext4 xfs ntfs}
[[ -d $SRC ]] || die "SRC=$SRC is not a directory"
[[ $BIG_MB =~ ^[0-9]+$ && $BIG_MB -ge 1 ]] || die "BIG_MB must be a positive integer"
[[ $DEPTH =~ ^[0-9]+$ && $DEPTH -ge 1 && $DEPTH -le 64 ]] || die "DEPTH must be 1..64"

[[ $(id -u) -eq 0 ]] || skip_all "not root (needs loop devices, mounts, drop_caches)"
[[ -c /dev/fuse ]] || skip_all "/dev/fuse does not exist"
require_tools qemu-img sgdisk mkfs.vfat losetup

LOOP="" KMNT="" BIND="" FILL=""
stop_kernel() {
    [[ -n $KMNT ]] && is_mounted "$KMNT" && umount "$KMNT"
    [[ -n $FILL ]] && is_mounted "$FILL" && umount "$FILL"
    [[ -n $LOOP ]] && losetup -d "$LOOP" 2>/dev/null
    LOOP="" KMNT="" FILL=""
    return 0
}
stop_bind() {
    [[ -n $BIND ]] && is_mounted "$BIND" && umount "$BIND"
    BIND=""
    return 0
}
CLEANUP_STEPS=(stop_kernel stop_bind stop_snaptree)
make_workdir snaptree-guest-bench
build_snaptree

# ---------------------------------------------------------------- the disks
log "staging $SRC as usr/ (bind mount)"
mkdir -p "$T/stage/usr" "$T/images" "$T/kmnt" "$T/fill" "$T/rdump"
BIND=$T/stage/usr
mount --bind "$SRC" "$BIND"
mount -o remount,bind,ro "$BIND"
src_bytes=$(du -sb "$SRC" | cut -f1)
files=$(find "$SRC" | wc -l)
# XFS needs at least 300 MiB.
vol_mb=$(((src_bytes * 13 / 10 + BIG_MB * 1048576) / 1048576 + 512))
((vol_mb >= 320)) || vol_mb=320
head -c $((BIG_MB * 1048576)) /dev/urandom >"$T/big.bin"
p2_off=$((33 * 1048576))

# fill_through_mount DIR: copies the staged tree and big.bin into DIR
# (a mounted volume); ownership that NTFS cannot keep is not an error.
fill_through_mount() {
    cp -dR --preserve=mode,timestamps "$T/stage/usr" "$1/" 2>/dev/null || true
    cp "$T/big.bin" "$1/big.bin"
    sync
}

# make_volume FS FILE: FILE becomes a volume of FS holding the staged tree.
make_volume() {
    local fs=$1 f=$2
    case $fs in
    ext4)
        mkfs.ext4 -q -F -L benchroot -d "$T/stage" "$f" "${vol_mb}M"
        debugfs -w -R "write $T/big.bin big.bin" "$f" >/dev/null 2>&1
        ;;
    xfs)
        truncate -s "${vol_mb}M" "$f"
        mkfs.xfs -q -L benchroot "$f"
        FILL=$T/fill
        mount -o loop "$f" "$FILL"
        fill_through_mount "$FILL"
        stop_kernel
        ;;
    ntfs)
        truncate -s "${vol_mb}M" "$f"
        mkntfs -q -F -Q -L benchroot "$f" 2>/dev/null
        FILL=$T/fill
        ntfs-3g "$f" "$FILL"
        fill_through_mount "$FILL"
        stop_kernel
        ;;
    esac
}

# build_chain FS: the GPT disk with FS in p2, as a chain FS00..; sets
# LEAF[FS] to the leaf's name (no subshell: a mount it makes must stay
# known to the exit trap).
build_chain() {
    local fs=$1 prev cur i type
    make_volume "$fs" "$T/root.img"
    type=8300
    [[ $fs == ntfs ]] && type=0700
    truncate -s "$((33 + vol_mb + 1))M" "$T/disk.img"
    sgdisk -n1:2048:+32M -t1:ef00 -c1:EFI -n2:$((p2_off / 512)):+${vol_mb}M -t2:$type "$T/disk.img" >/dev/null
    mkfs.vfat -C "$T/efi.img" 32768 >/dev/null
    dd if="$T/efi.img" of="$T/disk.img" bs=1M seek=1 conv=notrunc status=none
    dd if="$T/root.img" of="$T/disk.img" bs=1M seek=33 conv=notrunc status=none
    rm -f "$T/efi.img" "$T/root.img"
    qemu-img convert -O qcow2 "$T/disk.img" "$T/images/${fs}00.qcow2"
    rm -f "$T/disk.img"
    prev=${fs}00
    for ((i = 1; i < DEPTH; i++)); do
        cur=$(printf '%s%02d' "$fs" "$i")
        qemu-img create -q -f qcow2 -b "$prev.qcow2" -F qcow2 "$T/images/$cur.qcow2"
        prev=$cur
    done
    LEAF[$fs]=$prev
}

declare -A LEAF
fs_tools() {
    case $1 in
    ext4) echo mkfs.ext4 debugfs ;;
    xfs) echo mkfs.xfs ;;
    ntfs) echo mkntfs ntfs-3g ;;
    *) die "FSTYPES: unknown filesystem $1 (ext4, xfs, ntfs)" ;;
    esac
}

DONE=()
for fs in $FSTYPES; do
    missing=""
    for t in $(fs_tools "$fs"); do command -v "$t" >/dev/null || missing+=" $t"; done
    if [[ -n $missing ]]; then
        echo "SKIP $fs: not installed:$missing"
        continue
    fi
    log "building the $fs disk: $files entries, $((src_bytes / 1048576)) MiB + big.bin in a $vol_mb MiB volume"
    build_chain "$fs"
    DONE+=("$fs")
done
stop_bind
rm -f "$T/big.bin"
((${#DONE[@]} > 0)) || skip_all "no filesystem's tools are installed"
start_snaptree "$T/images" -o ro

# ---------------------------------------------------------------- runs
# timed CMD...: runs CMD with caches dropped; prints the seconds.
timed() {
    local t0
    drop_caches
    t0=$(now)
    "$@" >/dev/null
    elapsed "$t0"
}

# peer_mount FS DEV DIR: the peer's read-only mount of the volume.
peer_mount() {
    case $1 in
    ext4) mount -o ro,noload "$2" "$3" ;;
    xfs) mount -t xfs -o ro,norecovery "$2" "$3" ;;
    ntfs) ntfs-3g -o ro "$2" "$3" ;;
    esac
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }
ms() { awk -v a="$1" 'BEGIN { printf "%.0f ms", a * 1000 }'; }
goal() { awk -v r="$2" -v g="$3" -v n="$1" 'BEGIN { printf "  %-44s %s (%.2f, goal %s)\n", n, (r >= g ? "met" : "NOT met"), r, g }'; }

REPORT=""
for fs in "${DONE[@]}"; do
    P=$ST_MNT/${LEAF[$fs]}
    log "$fs: snaptree"
    first=$(timed ls "$P/fs/p2")
    snap_find=$(timed find "$P/fs/p2" -printf '')
    snap_tar=$(timed sh -c "tar -cf - -C '$P/fs/p2' usr | wc -c")
    snap_big=$(timed cat "$P/fs/p2/big.bin")
    # As many bytes of disk.raw, read sequentially: the ceiling.
    disk_seq=$(timed dd if="$P/disk.raw" of=/dev/null bs=1M skip=33 count="$BIG_MB" status=none)
    log "$fs: peer"
    LOOP=$(losetup -f --show -r -o "$p2_off" --sizelimit $((vol_mb * 1048576)) "$P/disk.raw")
    KMNT=$T/kmnt
    peer_mount "$fs" "$LOOP" "$KMNT"
    kern_first=$(timed ls "$KMNT")
    kern_find=$(timed find "$KMNT" -printf '')
    kern_tar=$(timed sh -c "tar -cf - -C '$KMNT' usr | wc -c")
    kern_big=$(timed cat "$KMNT/big.bin")
    stop_kernel
    peer=kernel
    [[ $fs == ntfs ]] && peer=ntfs-3g
    {
        echo
        echo "guest files, $fs: snaptree fs/ vs $peer (loop, ro, over the same disk.raw)"
        echo "  volume: $files entries from $SRC, big.bin $BIG_MB MiB, chain depth $DEPTH"
        printf '  %-28s %12s %12s %10s\n' "" snaptree "$peer" "speed x"
        printf '  %-28s %12s %12s %10s\n' "first access (ls root)" "$(ms "$first")" "$(ms "$kern_first")" "$(ratio "$kern_first" "$first")"
        printf '  %-28s %12s %12s %10s\n' "stat every entry (find)" "$snap_find s" "$kern_find s" "$(ratio "$kern_find" "$snap_find")"
        printf '  %-28s %12s %12s %10s\n' "tar usr | wc -c" "$snap_tar s" "$kern_tar s" "$(ratio "$kern_tar" "$snap_tar")"
        printf '  %-28s %12s %12s %10s\n' "copy big.bin" "$snap_big s" "$kern_big s" "$(ratio "$kern_big" "$snap_big")"
        if [[ $fs == ext4 ]]; then
            rdump=$(timed debugfs -R "rdump /usr $T/rdump" "$P/volumes/p2.raw")
            rm -rf "$T/rdump"
            printf '  %-28s %12s\n' "debugfs rdump usr (peer)" "$rdump s"
        fi
        goal "stat: at least 1x the $peer" "$(ratio "$kern_find" "$snap_find")" 1
        goal "tar: at least 0.8x the $peer" "$(ratio "$kern_tar" "$snap_tar")" 0.8
        goal "copy big.bin: 0.8x a disk.raw read of as much" "$(ratio "$disk_seq" "$snap_big")" 0.8
        awk -v f="$first" 'BEGIN { printf "  %-44s %s (%.0f ms, goal < 50 ms)\n", "first access", (f < 0.05 ? "met" : "NOT met"), f * 1000 }'
    } >"$T/report-$fs"
    REPORT+=$(cat "$T/report-$fs")$'\n'
done
stop_snaptree_ok

# ---------------------------------------------------------------- report
printf '%s' "$REPORT"
