#!/usr/bin/env bash
# Installs every system package spanvm's build and tests need on a fresh Debian machine of this
# kind, and checks what cannot be installed (the Rust toolchain, KVM). Idempotent; quiet when
# everything is already there. Run as root (or with sudo available).
set -euo pipefail

packages=(
  binutils        # as, ld, objcopy: build the probe guests (vmm/build.rs)
  gcc             # the linker driver Rust uses
  libc6-dev
  pkg-config
  iproute2        # network namespaces for the network-fault tests (ip netns, tc)
  nftables        # partitions and segment loss injected inside those namespaces
  acpica-tools    # iasl -d: the ACPI table tests disassemble what the VMM generates
  fonts-dejavu-core  # the font of spanvm bench sysbench's PNG plot
  libibverbs-dev  # the RDMA transport (cargo feature rdma): verbs, linked by rdma-sys
  librdmacm-dev   # ... and the RDMA connection manager
  libclang-dev    # ... whose bindings rdma-sys generates with bindgen at build time
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found: install the Rust toolchain (stable, x86_64-unknown-linux-gnu)" >&2
  exit 1
fi
if [ ! -e "${SPANVM_KVM_DEVICE:-/dev/kvm}" ]; then
  echo "setup: ${SPANVM_KVM_DEVICE:-/dev/kvm} does not exist: spanvm needs KVM (load kvm_intel/kvm_amd or kvm_pvm)" >&2
  exit 1
fi
if [ ! -r "${SPANVM_KVM_DEVICE:-/dev/kvm}" ] || [ ! -w "${SPANVM_KVM_DEVICE:-/dev/kvm}" ]; then
  echo "setup: no read/write access to ${SPANVM_KVM_DEVICE:-/dev/kvm} (add yourself to the kvm group)" >&2
  exit 1
fi
echo "setup: ok"
