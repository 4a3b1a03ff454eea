#!/usr/bin/env bash
# Builds the fast guest kernel: Debian's linux-source with images/kernel/guest.config on top of
# `make tinyconfig` (PVH entry, every driver a guest needs built in, no modules), into
# images/out/vmlinux-fast. Cached outside the work tree, keyed by the source package's version and
# the config, so a machine builds it once: $VIGIL_KERNEL_CACHE (default /var/cache/vigil-kernel).
#
# Environment: VIGIL_KERNEL_CACHE, VIGIL_KERNEL_SOURCE_PKG (default linux-source-6.1),
#              VIGIL_FAST_KERNEL=0 (skip: guests boot the Debian kernel),
#              VIGIL_FAST_KERNEL=cached (use it if this machine built it before, else skip; CI,
#              whose time budget a first build's 6.5 minutes would strain).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=$root/images/out
config=$root/images/kernel/guest.config
cache=${VIGIL_KERNEL_CACHE:-/var/cache/vigil-kernel}
pkg=${VIGIL_KERNEL_SOURCE_PKG:-linux-source-6.1}
mkdir -p "$out"

if [ "${VIGIL_FAST_KERNEL:-1}" = 0 ]; then
  echo "build-kernel: skipped (VIGIL_FAST_KERNEL=0): guests boot the Debian kernel"
  rm -f "$out/vmlinux-fast"
  exit 0
fi
need() { command -v "$1" >/dev/null || { echo "build-kernel: $1 is missing (run \`make deps\` as root)" >&2; exit 2; }; }
for tool in apt-get dpkg-deb make gcc flex bison bc tar xz sha256sum; do need "$tool"; done

version=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}')
[ -n "$version" ] && [ "$version" != "(none)" ] \
  || { echo "build-kernel: no $pkg in the package lists (apt-get update?)" >&2; exit 2; }
key=$( { echo "$pkg $version"; sha256sum "$config" "$0" | awk '{print $1}'; } | sha256sum | cut -c1-16)
built=$cache/$key/vmlinux
if [ -f "$built" ]; then
  echo "build-kernel: $pkg $version with images/kernel/guest.config is cached ($cache/$key)"
  cp "$built" "$out/vmlinux-fast.tmp" && mv "$out/vmlinux-fast.tmp" "$out/vmlinux-fast"
  exit 0
fi
if [ "${VIGIL_FAST_KERNEL:-1}" = cached ]; then
  echo "build-kernel: not built on this machine yet and VIGIL_FAST_KERNEL=cached: guests boot the Debian kernel"
  rm -f "$out/vmlinux-fast"
  exit 0
fi

work=$cache/src-$pkg-$version
if [ ! -f "$work/.unpacked" ]; then
  echo "build-kernel: fetching and unpacking $pkg $version"
  rm -rf "$work" && mkdir -p "$work"
  (cd "$work" && apt-get download -q "$pkg=$version" >/dev/null)
  dpkg-deb --fsys-tarfile "$work"/"${pkg}"_*.deb | tar -x --wildcards -O '*/linux-source-*.tar.xz' \
    | tar -xJ -C "$work" --strip-components=1
  rm -f "$work"/"${pkg}"_*.deb
  touch "$work/.unpacked"
fi

started=$(date +%s)
echo "build-kernel: configuring (tinyconfig + images/kernel/guest.config)"
make -C "$work" -s tinyconfig >/dev/null
"$work/scripts/kconfig/merge_config.sh" -m -O "$work" "$work/.config" "$config" >/dev/null 2>&1
# (Its warnings that the config overrides tinyconfig's choices are the point: not shown.)
make -C "$work" -s olddefconfig 2> >(grep -v 'warning: override' >&2)
# Every option the config asks for must have taken (a dependency missed turns one off quietly).
missing=0
while IFS= read -r line; do
  case "$line" in CONFIG_*=*) ;; *) continue ;; esac
  option=${line%%=*} value=${line#*=}
  if [ "$value" = n ]; then
    if grep -qx "$option=y" "$work/.config"; then
      echo "build-kernel: $option stayed on" >&2; missing=1
    fi
  elif ! grep -qx "$line" "$work/.config"; then
    echo "build-kernel: $line did not take (a dependency is off)" >&2; missing=1
  fi
done < "$config"
[ "$missing" = 0 ] || exit 2
echo "build-kernel: building vmlinux on $(nproc) cores (a few minutes, once per machine)"
make -C "$work" -s -j"$(nproc)" vmlinux
# Kernels built from an earlier config or recipe are not used again.
find "$cache" -mindepth 1 -maxdepth 1 -type d ! -name 'src-*' ! -name "$key" -exec rm -rf {} +
mkdir -p "$cache/$key"
cp "$work/vmlinux" "$built.tmp" && mv "$built.tmp" "$built"
cp "$work/.config" "$cache/$key/config"
cp "$built" "$out/vmlinux-fast.tmp" && mv "$out/vmlinux-fast.tmp" "$out/vmlinux-fast"
echo "build-kernel: done in $(( $(date +%s) - started )) s ($cache/$key)"
