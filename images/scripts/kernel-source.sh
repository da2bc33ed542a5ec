#!/usr/bin/env bash
# Step: unpack Debian's linux-source tarball into the build directory.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
require_packages linux-source

tarball="$(kernel_tarball)"
src="$(kernel_source_dir)"
name="$(basename "$src")"
key="$(stamp_key "$0" "$IMAGES_DIR/scripts/lib.sh" "linux-source $(pkg_version linux-source)" "$name")"

if stamp_fresh kernel-source "$key" "$src/Makefile"; then
    log "cached: $src"
    exit 0
fi
log "unpacking $tarball (about 1.5 GB)"
rm -rf "$src" "$src.partial"
mkdir -p "$src.partial"
tar -C "$src.partial" -xJf "$tarball"
mv "$src.partial/$name" "$src"
rmdir "$src.partial"
stamp_write kernel-source "$key"
log "kernel source in $src"
