#!/usr/bin/env bash
# Set up a fresh Debian machine and run every test of cove.
# Needs root (sandboxes need namespaces and cgroups) and network access to
# Debian's archive and crates.io.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "scripts/test.sh: run as root (cove's tests create namespaces and cgroups)" >&2
  exit 1
fi

# Packages the tests use: busybox-static for the busybox template, python3
# and procps inside sandboxes, bubblewrap/runc/crun for benchmarks' peers,
# nftables (egress rules), iproute2 and curl for the network tests,
# docker-registry for a local OCI registry on loopback (template pull tests),
# debootstrap for the debian template.
packages=(busybox-static python3 procps iproute2 nftables curl bubblewrap runc crun hyperfine tmux
  docker-registry debootstrap)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  apt-get install -y --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo-nextest >/dev/null 2>&1 && ! cargo nextest --version >/dev/null 2>&1; then
  cargo install cargo-nextest --locked
fi

# The microVM backend's tests run too (under CI a missing piece fails
# them): QEMU, vhost-device-vsock, the guest kernel package and a static
# agent. vm-deps.sh prints `export COVE_VM_AGENT=...` last.
vm_env=$(./scripts/vm-deps.sh | tee /dev/stderr | grep '^export COVE_VM_AGENT=')
eval "$vm_env"
export COVE_VM_AGENT

cargo build --workspace --all-targets --locked
cargo nextest run --workspace --locked --no-fail-fast "$@"
cargo test --workspace --doc --locked
