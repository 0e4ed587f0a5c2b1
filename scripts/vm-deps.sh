#!/usr/bin/env bash
# Install what the microVM backend's tests need, idempotently:
#   - QEMU (microvm machine), erofs-utils (mkfs.erofs), xz-utils (vmlinux),
#     busybox-static (the busybox template), dpkg-deb/apt-get (guest kernel)
#   - vhost-device-vsock (vsock without /dev/vhost-vsock), from crates.io
#   - /dev/net/tun (the tap of a microVM with a network)
#   - the guest kernel package (linux-image-*-amd64 .deb, not installed on
#     the host), into the tests' image cache
#   - a static cove-agent for the initramfs, as the tests expect it
# Needs root and network access to Debian's archive and crates.io.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "scripts/vm-deps.sh: run as root (apt-get install)" >&2
  exit 1
fi

packages=(qemu-system-x86 erofs-utils xz-utils busybox-static)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
export DEBIAN_FRONTEND=noninteractive
if [ ${#missing[@]} -gt 0 ] || ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then
  apt-get update -q
fi
if [ ${#missing[@]} -gt 0 ]; then
  apt-get install -y --no-install-recommends "${missing[@]}"
fi

# A microVM with a network gets a tap device: QEMU opens /dev/net/tun.
if [ ! -e /dev/net/tun ]; then
  modprobe tun 2>/dev/null || true
  if [ ! -e /dev/net/tun ]; then
    mkdir -p /dev/net && mknod -m 0666 /dev/net/tun c 10 200 || \
      echo "scripts/vm-deps.sh: no /dev/net/tun; microVMs with a network will fail" >&2
  fi
fi

if ! command -v vhost-device-vsock >/dev/null 2>&1 && [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/vhost-device-vsock" ]; then
  cargo install vhost-device-vsock --locked
fi

# The guest kernel: downloaded, never installed. cove-vm looks in its
# cache's debs/ before running apt-get download itself.
debs=target/tmp/cove-vm-cache/debs
mkdir -p "$debs"
if ! ls "$debs"/linux-image-*-amd64_*.deb >/dev/null 2>&1; then
  kernel=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
  (cd "$debs" && apt-get download -q "$kernel")
fi

# The agent as /init must be static (no libc in the initramfs), and is
# stripped: a quarter of the size, so the guest unpacks a smaller initramfs.
RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" \
  cargo build --release --locked --target x86_64-unknown-linux-gnu -p cove-agent --target-dir target/vm-agent
echo "export COVE_VM_AGENT=$PWD/target/vm-agent/x86_64-unknown-linux-gnu/release/cove-agent"
