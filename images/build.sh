#!/usr/bin/env bash
# Build every spanvm guest image from Debian's packages, with one progress line per step.
#
#   images/build.sh            all steps
#   images/build.sh STEP...    only these steps (names below), then the checksums
#
# Outputs go to $SPANVM_IMAGES_DIR (default images/out/, git-ignored); see images/README.md.
# Every step is cached: a re-run does only what changed. SPANVM_IMAGES_JOBS sets make -j.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=scripts/lib.sh
. "$(dirname "$0")/scripts/lib.sh"

steps=(apt kernel-source kernel-config kernel-build cloud-kernel initramfs data-disk)
declare -A script=(
    [apt]=apt-deps.sh
    [kernel-source]=kernel-source.sh
    [kernel-config]=kernel-config.sh
    [kernel-build]=kernel-build.sh
    [cloud-kernel]=cloud-kernel.sh
    [initramfs]=initramfs.sh
    [data-disk]=data-disk.sh
)
declare -A title=(
    [apt]="apt packages"
    [kernel-source]="kernel source (Debian linux-source)"
    [kernel-config]="kernel config (allnoconfig + kernel/spanvm-minimal.config)"
    [kernel-build]="minimal kernel (vmlinux, bzImage)"
    [cloud-kernel]="Debian cloud kernel"
    [initramfs]="initramfs (busybox, sysbench, /init; and with stress-ng for bench sysbench)"
    [data-disk]="data disk (data.ext4, mkfs.ext4 -d)"
)
# Which step makes each output, so that an output that no longer matches SHA256SUMS is rebuilt.
declare -A made_by=(
    [minimal.config]=kernel-config
    [minimal.vmlinux]=kernel-build
    [minimal.bzImage]=kernel-build
    [debian-cloud.vmlinuz]=cloud-kernel
    [debian-cloud.vmlinux]=cloud-kernel
    [debian-cloud.config]=cloud-kernel
    [initramfs.cpio]=initramfs
    [initramfs-bench.cpio]=initramfs
    [data.ext4]=data-disk
)
outputs=(minimal.vmlinux minimal.bzImage minimal.config debian-cloud.vmlinuz debian-cloud.vmlinux debian-cloud.config
    initramfs.cpio initramfs-bench.cpio data.ext4)

if [ "$#" -gt 0 ]; then
    for wanted in "$@"; do
        [ -n "${script[$wanted]:-}" ] || die "unknown step '$wanted'; steps are: ${steps[*]}"
    done
    steps=("$@")
fi

mkdir -p "$OUT"
exec 9>"$OUT/.lock"
flock -n 9 || die "another images/build.sh is already building in $OUT"
# A cached output that was changed or damaged since it was checksummed is built again.
if [ -f "$OUT/SHA256SUMS" ]; then
    while read -r sum name; do
        name="${name#\*}"
        if [ -n "${made_by[$name]:-}" ] && [ -f "$OUT/$name" ] \
            && [ "$(sha256sum <"$OUT/$name" | cut -d' ' -f1)" != "$sum" ]; then
            log "$name does not match SHA256SUMS: building it again"
            rm -f "$STAMPS/${made_by[$name]}"
        fi
    done <"$OUT/SHA256SUMS"
fi

total=$((${#steps[@]} + 1))
number=0
for step in "${steps[@]}"; do
    number=$((number + 1))
    printf '[images] %d/%d %s ...\n' "$number" "$total" "${title[$step]}"
    start=$SECONDS
    "$IMAGES_DIR/scripts/${script[$step]}"
    printf '[images]     done in %d s\n' "$((SECONDS - start))"
done

printf '[images] %d/%d checksums ...\n' "$total" "$total"
present=()
for name in "${outputs[@]}"; do
    [ -f "$OUT/$name" ] && present+=("$name")
done
(cd "$OUT" && sha256sum "${present[@]}" >SHA256SUMS.partial && mv SHA256SUMS.partial SHA256SUMS)
log "$OUT/SHA256SUMS"

echo "[images] images in $OUT:"
for name in "${present[@]}"; do
    printf '[images]     %-22s %s\n' "$name" "$(numfmt --to=iec --suffix=B "$(stat -c %s "$OUT/$name")")"
done
