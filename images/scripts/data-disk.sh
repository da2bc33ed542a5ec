#!/usr/bin/env bash
# Step: the guest's data disk, data.ext4: a 64 MiB raw ext4 image made by mkfs.ext4 -d from a
# directory of files with known contents, plus a SHA256SUMS of them inside the image, so that a
# guest with the image as its virtio-blk disk can check what it reads:
#
#   mount -t ext4 /dev/vda /mnt && cd /mnt && sha256sum -c SHA256SUMS
#
# The contents are generated here, deterministically (no randomness, no host files), and the
# image is bit-reproducible with the same e2fsprogs and /etc/mke2fs.conf (see images/README.md).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
require_packages e2fsprogs python3

output="$OUT/data.ext4"
size=64M
# Fixed identity of the file system: its UUID and the seed of its directory hashes (both are
# random otherwise). The metadata checksums are seeded from the UUID.
uuid=5ba7f1e0-da7a-4d15-8000-000000000001
hash_seed=5ba7f1e0-da7a-4d15-8000-000000000002
# Every time stamp in the image. e2fsprogs reads E2FSPROGS_FAKE_TIME=0 as "not set", so the
# epoch itself cannot be used: one second after it.
disk_time=$((${SOURCE_DATE_EPOCH:-0} > 0 ? SOURCE_DATE_EPOCH : 1))
mke2fs_conf="${MKE2FS_CONFIG:-/etc/mke2fs.conf}"
key="$(stamp_key "$0" "$IMAGES_DIR/scripts/lib.sh" "e2fsprogs $(pkg_version e2fsprogs)" \
    "python3 $(pkg_version python3)" "$mke2fs_conf" "$size $uuid $hash_seed $disk_time")"

if stamp_fresh data-disk "$key" "$output"; then
    log "cached: $output"
    exit 0
fi

root="$BUILD/data-disk-root"
rm -rf "$root"
mkdir -p "$root/nested/deeper"
log "contents: random-1M.bin, hello.txt, nested/, SHA256SUMS"
# random-1M.bin: 1 MiB of a fixed pseudo-random stream, SHA-256 in counter mode:
# block i (32 bytes) = SHA-256("spanvm-data-disk-v1" || i as 8 bytes little-endian).
# Anyone can regenerate it; it does not compress and every 4 KiB block differs.
python3 - "$root" <<'EOF'
import hashlib
import sys

root = sys.argv[1]
with open(f"{root}/random-1M.bin", "wb") as out:
    out.write(b"".join(
        hashlib.sha256(b"spanvm-data-disk-v1" + i.to_bytes(8, "little")).digest()
        for i in range((1 << 20) // 32)
    ))
EOF
printf 'spanvm data disk\nIf you can read this, virtio-blk and ext4 work.\n' >"$root/hello.txt"
printf 'a file two directories down\n' >"$root/nested/deeper/leaf.txt"
# 100 numbered lines: a text file of a few KiB.
seq -f 'line %03g of nested/lines.txt' 1 100 >"$root/nested/lines.txt"
# Relative names, so that `cd <mount point> && sha256sum -c SHA256SUMS` checks every file.
(cd "$root" && find . -type f | sed 's|^\./||' | sort | xargs sha256sum) >"$BUILD/data-disk.SHA256SUMS"
mv "$BUILD/data-disk.SHA256SUMS" "$root/SHA256SUMS"
find "$root" -exec touch -h -d "@$disk_time" {} +

log "mkfs.ext4 -d (size $size, UUID $uuid)"
rm -f "$output.partial"
truncate -s "$size" "$output.partial"
# -T default: the [defaults] of mke2fs.conf (4 KiB blocks) rather than the "small" type a
# 64 MiB file system would get (1 KiB blocks). E2FSPROGS_FAKE_TIME fixes the time stamps that
# mke2fs and debugfs take from the clock (creation, last write, new inodes).
export E2FSPROGS_FAKE_TIME="$disk_time"
mkfs.ext4 -q -F -T default -L spanvm-data -U "$uuid" \
    -E "root_owner=0:0,hash_seed=$hash_seed" -d "$root" "$output.partial" \
    || die "mkfs.ext4 failed on $output.partial"
# mke2fs -d copies each file's ctime and atime from the staging tree, and neither can be set
# there (the kernel sets ctime; reading a file moves its atime): overwrite them with debugfs.
(cd "$root" && find . -mindepth 1 | sed 's|^\.||' | sort) | while read -r path; do
    printf 'set_inode_field %s atime @%s\nset_inode_field %s ctime @%s\n' "$path" "$disk_time" "$path" "$disk_time"
done >"$BUILD/data-disk.debugfs"
debugfs -w -f "$BUILD/data-disk.debugfs" "$output.partial" >"$BUILD/data-disk.debugfs.log" 2>&1 \
    || { cat "$BUILD/data-disk.debugfs.log" >&2; die "debugfs could not fix the time stamps"; }
if grep -v '^debugfs' "$BUILD/data-disk.debugfs.log" | grep -q .; then
    cat "$BUILD/data-disk.debugfs.log" >&2
    die "debugfs complained while fixing the time stamps (above)"
fi
e2fsck -fn "$output.partial" >"$BUILD/data-disk.e2fsck.log" 2>&1 \
    || { cat "$BUILD/data-disk.e2fsck.log" >&2; die "e2fsck finds $output.partial inconsistent"; }
mv "$output.partial" "$output"
stamp_write data-disk "$key"
log "data disk: $output ($(numfmt --to=iec --suffix=B "$(stat -c %s "$output")"), $(du -k "$output" | cut -f1) KiB allocated)"
