#!/usr/bin/env bash
# Step: build the minimal guest kernel (vmlinux and bzImage) from the configured tree.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
require_packages linux-source

src="$(kernel_source_dir)"
[ -f "$KERNEL_OBJ/.config" ] || die "no kernel config in $KERNEL_OBJ (run images/build.sh, which configures first)"
jobs="${SPANVM_IMAGES_JOBS:-$(nproc)}"
key="$(stamp_key "$0" "$IMAGES_DIR/scripts/lib.sh" "$KERNEL_OBJ/.config" \
    "linux-source $(pkg_version linux-source)" "$(gcc --version | head -n1)")"

if stamp_fresh kernel-build "$key" "$OUT/minimal.vmlinux" "$OUT/minimal.bzImage"; then
    log "cached: $OUT/minimal.vmlinux, $OUT/minimal.bzImage"
    exit 0
fi
log "make -j$jobs vmlinux bzImage (10 to 25 minutes on 2 cores; log: $KERNEL_OBJ/build.log)"
# The timestamp baked into the kernel is the source's release date, so rebuilds are identical.
release_date="$(dpkg-parsechangelog -l /usr/share/doc/linux-source-*/changelog.Debian.gz -S Date 2>/dev/null \
    || date -u -d @0)"
start=$SECONDS
if ! make -C "$src" O="$KERNEL_OBJ" ARCH=x86_64 -j"$jobs" \
    KBUILD_BUILD_TIMESTAMP="$release_date" vmlinux bzImage >"$KERNEL_OBJ/build.log" 2>&1; then
    tail -n 40 "$KERNEL_OBJ/build.log" >&2
    die "kernel build failed (last lines above; full log $KERNEL_OBJ/build.log)"
fi
cp "$KERNEL_OBJ/vmlinux" "$OUT/minimal.vmlinux.partial"
mv "$OUT/minimal.vmlinux.partial" "$OUT/minimal.vmlinux"
cp "$KERNEL_OBJ/arch/x86/boot/bzImage" "$OUT/minimal.bzImage.partial"
mv "$OUT/minimal.bzImage.partial" "$OUT/minimal.bzImage"
stamp_write kernel-build "$key"
log "built in $((SECONDS - start)) s: $OUT/minimal.vmlinux, $OUT/minimal.bzImage"
