#!/usr/bin/env bash
# Step: install, with apt, the Debian packages the images are built from and with.
# Nothing else is ever downloaded: the kernel source, busybox, sysbench, stress-ng and their
# libraries, the stock cloud kernel and mkfs.ext4 (e2fsprogs, for the data disk) all come from
# Debian's archive.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

packages=(
    linux-source build-essential bc bison flex libelf-dev libssl-dev xz-utils lz4 python3
    cpio busybox-static sysbench stress-ng e2fsprogs
)
missing=()
for package in "${packages[@]}"; do
    status="$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)"
    [ "$status" = "install ok installed" ] || missing+=("$package")
done
if [ "${#missing[@]}" -eq 0 ]; then
    log "all installed: ${packages[*]}"
    exit 0
fi
[ "$(id -u)" -eq 0 ] || die "packages missing (${missing[*]}) and installing them needs root"
log "apt-get install ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
log "installed: ${missing[*]}"
