# shellcheck shell=bash
# Shared helpers for images/build.sh and its step scripts (sourced, not run).
# Every step caches its outputs under a stamp: a hash of everything that decides them
# (the step's scripts, the config fragment, the Debian package versions it uses). A step whose
# stamp matches and whose outputs all exist is skipped, which is what makes a re-run fast.

IMAGES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${SPANVM_IMAGES_DIR:-$IMAGES_DIR/out}"
BUILD="$OUT/build"
STAMPS="$OUT/stamps"

# Fixed build identity, so that the same inputs give byte-identical images.
export KBUILD_BUILD_USER=spanvm KBUILD_BUILD_HOST=spanvm KBUILD_BUILD_VERSION=1
export SOURCE_DATE_EPOCH=0 LC_ALL=C

log() { printf '[images]     %s\n' "$*"; }
die() { printf '[images] error: %s\n' "$*" >&2; exit 1; }

# Version of an installed Debian package, or die naming it.
pkg_version() {
    dpkg-query -W -f='${Version}' "$1" 2>/dev/null \
        || die "package $1 is not installed (images/build.sh installs it; run that)"
}

# Dies unless every named package is installed (pkg_version inside $(...) cannot stop a script).
require_packages() {
    local package
    for package in "$@"; do pkg_version "$package" >/dev/null; done
}

# stamp_key WORDS... : the cache key of a step, from strings and the contents of files.
stamp_key() {
    local item
    for item in "$@"; do
        if [ -f "$item" ]; then
            printf 'file %s %s\n' "$(realpath --relative-to="$IMAGES_DIR" "$item")" "$(sha256sum <"$item" | cut -d' ' -f1)"
        else
            printf 'word %s\n' "$item"
        fi
    done | sha256sum | cut -d' ' -f1
}

# stamp_fresh NAME KEY OUTPUTS... : true if step NAME last finished with KEY and every output
# is still there.
stamp_fresh() {
    local name="$1" key="$2" f
    shift 2
    [ -f "$STAMPS/$name" ] && [ "$(cat "$STAMPS/$name")" = "$key" ] || return 1
    for f in "$@"; do [ -e "$f" ] || return 1; done
}

stamp_write() {
    mkdir -p "$STAMPS"
    printf '%s\n' "$2" >"$STAMPS/$1"
}

# The one Debian kernel source tarball (package linux-source) and where it is unpacked.
kernel_tarball() {
    local tarballs
    shopt -s nullglob
    tarballs=(/usr/src/linux-source-*.tar.xz)
    shopt -u nullglob
    [ "${#tarballs[@]}" -eq 1 ] \
        || die "expected exactly one /usr/src/linux-source-*.tar.xz (package linux-source), found ${#tarballs[@]}"
    printf '%s\n' "${tarballs[0]}"
}
kernel_source_dir() { printf '%s/%s\n' "$BUILD" "$(basename "$(kernel_tarball)" .tar.xz)"; }

# Used by the kernel step scripts that source this file.
# shellcheck disable=SC2034
FRAGMENT="$IMAGES_DIR/kernel/spanvm-minimal.config"
# shellcheck disable=SC2034
KERNEL_OBJ="$BUILD/kernel-minimal"
