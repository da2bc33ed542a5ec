#!/usr/bin/env bash
# Step: the stock Debian cloud kernel, "what users already have": fetched with apt-get download
# and unpacked with dpkg-deb, never installed on this machine.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

# linux-image-cloud-amd64 is a metapackage; the kernel is in the versioned package it names.
package="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
    | awk '$1 == "Depends:" && $2 ~ /^linux-image-.*-cloud-amd64$/ { print $2; exit }')"
[ -n "$package" ] || die "apt knows no linux-image-cloud-amd64 (run apt-get update, check the sources list)"
version="$(apt-cache policy "$package" | awk '$1 == "Candidate:" { print $2 }')"
if [ -z "$version" ] || [ "$version" = "(none)" ]; then
    die "apt has no installable version of $package"
fi
release="${package#linux-image-}"
key="$(stamp_key "$0" "$IMAGES_DIR/scripts/lib.sh" "$package $version")"

if stamp_fresh cloud-kernel "$key" "$OUT/debian-cloud.vmlinuz" "$OUT/debian-cloud.vmlinux" "$OUT/debian-cloud.config"; then
    log "cached: $OUT/debian-cloud.vmlinuz ($package $version)"
    exit 0
fi
work="$BUILD/debian-cloud"
rm -rf "$work"
mkdir -p "$work/root"
log "apt-get download $package=$version"
if ! (cd "$work" && apt-get download -q "$package=$version") >"$work/download.log" 2>&1; then
    cat "$work/download.log" >&2
    die "apt-get download $package=$version failed (output above)"
fi
debs=("$work"/*.deb)
[ -f "${debs[0]}" ] || die "apt-get download of $package=$version left no .deb in $work"
deb="${debs[0]}"
dpkg-deb -x "$deb" "$work/root"
[ -f "$work/root/boot/vmlinuz-$release" ] || die "$deb has no /boot/vmlinuz-$release"
cp "$work/root/boot/vmlinuz-$release" "$OUT/debian-cloud.vmlinuz"
cp "$work/root/boot/config-$release" "$OUT/debian-cloud.config"
# The uncompressed ELF too: on a kvm_pvm host the bzImage's decompressor runs in KVM's
# instruction emulator for many minutes, so spanvm boots the stock kernel from its vmlinux
# (extract-vmlinux comes with the kernel source of step 2).
extract="$(ls -d "$BUILD"/linux-source-*/scripts/extract-vmlinux 2>/dev/null | head -n 1)"
[ -n "$extract" ] || die "no scripts/extract-vmlinux under $BUILD/linux-source-*: run the kernel source step first"
bash "$extract" "$OUT/debian-cloud.vmlinuz" >"$work/vmlinux" || die "extract-vmlinux failed on $OUT/debian-cloud.vmlinuz"
mv "$work/vmlinux" "$OUT/debian-cloud.vmlinux"
printf '%s %s %s\n' "$package" "$version" "$release" >"$OUT/debian-cloud.version"
# The unpacked modules are 100 MB nobody needs: keep only the .deb.
rm -rf "$work/root"
stamp_write cloud-kernel "$key"
log "Debian cloud kernel: $OUT/debian-cloud.vmlinuz ($release)"
