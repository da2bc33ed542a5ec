#!/usr/bin/env bash
# Step: configure the minimal guest kernel: allnoconfig, merged with the spanvm fragment, then
# olddefconfig, then a check that every option of the fragment survived.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
require_packages linux-source

src="$(kernel_source_dir)"
here="$IMAGES_DIR/scripts"
key="$(stamp_key "$0" "$here/lib.sh" "$here/check-kernel-config.py" "$FRAGMENT" \
    "linux-source $(pkg_version linux-source)" "$(gcc --version | head -n1)")"

if stamp_fresh kernel-config "$key" "$KERNEL_OBJ/.config" "$OUT/minimal.config"; then
    log "cached: $OUT/minimal.config"
    exit 0
fi
mkdir -p "$KERNEL_OBJ"
export ARCH=x86_64
log "make allnoconfig"
make -s -C "$src" O="$KERNEL_OBJ" allnoconfig
log "merge_config.sh -n ${FRAGMENT#"$IMAGES_DIR"/}"
# merge_config.sh runs make in the current directory, so run it from the source tree.
(cd "$src" && scripts/kconfig/merge_config.sh -n -O "$KERNEL_OBJ" "$KERNEL_OBJ/.config" "$FRAGMENT") \
    >"$KERNEL_OBJ/merge_config.log" 2>&1 \
    || { cat "$KERNEL_OBJ/merge_config.log" >&2; die "merge_config.sh failed (log above)"; }
make -s -C "$src" O="$KERNEL_OBJ" olddefconfig
log "checking that every option of the fragment holds"
python3 "$here/check-kernel-config.py" "$FRAGMENT" "$KERNEL_OBJ/.config" | sed 's/^/[images]     /'
mkdir -p "$OUT"
cp "$KERNEL_OBJ/.config" "$OUT/minimal.config"
stamp_write kernel-config "$key"
log "kernel config in $OUT/minimal.config"
