#!/usr/bin/env bash
# Builds the Vigil guest image: images/out/vmlinux (uncompressed, PVH entry: ~3 s TCG boot) and
# images/out/initramfs.cpio (busybox, kernel modules, meterd (also /bin/meter), vigil-agent, init),
# and images/out/data.qcow2 (the empty ext4 data disk every guest starts from).
# Reproducible (sorted cpio, fixed mtimes, uncompressed) and cached: rebuilt only when an input changes
# (kernel package version, busybox, binaries, init, this script).
#
# Environment: VIGIL_IMAGE_PROFILE=dev|release (cargo profile of the binaries, default release:
#              a guest boots about 0.6 s sooner under TCG than with dev binaries),
#              VIGIL_IMAGE_NO_BUILD=1 (use the binaries already in target/, do not run cargo),
#              VIGIL_KERNEL_PKG (default: what linux-image-amd64 depends on), CARGO.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=$root/images/out
cache=$out/cache
profile=${VIGIL_IMAGE_PROFILE:-release}
cargo=${CARGO:-cargo}
mkdir -p "$cache"

need() { command -v "$1" >/dev/null || { echo "build-image: $1 is missing (run \`make deps\` as root)" >&2; exit 2; }; }
for tool in apt-get dpkg-deb depmod modprobe cpio gzip xz sha256sum strip mkfs.ext4 qemu-img; do need "$tool"; done
busybox=$(command -v busybox || true)
if [ ! -x /bin/busybox ] || ! file -L /bin/busybox 2>/dev/null | grep -q 'statically linked'; then
  echo "build-image: a static /bin/busybox is needed (busybox-static; run \`make deps\`)" >&2; exit 2
fi
busybox=/bin/busybox

# 1. The binaries that go into the guest.
if [ "$profile" = release ]; then flag=--release; dir=release; else flag=; dir=debug; fi
# The harness build of the runtime (meterd-sim): it trusts the world root the harness gives it
# (METER_HARNESS_ROOT on the kernel command line); the shipped meterd trusts only the production
# root, so no scenario could certify its vendor.
meterd_bin=$root/target/$dir/meterd-sim
agent_bin=$root/target/$dir/vigil-agent
if [ -n "${VIGIL_IMAGE_NO_BUILD:-}" ]; then
  echo "build-image: using the binaries already built in target/$dir (VIGIL_IMAGE_NO_BUILD)"
else
  echo "build-image: building meterd-sim and vigil-agent ($profile)"
  $cargo build -q $flag -p meterd --features simulated-platform --bin meterd-sim
  $cargo build -q $flag -p vigil-agent --bin vigil-agent
fi
for b in "$meterd_bin" "$agent_bin"; do
  [ -x "$b" ] || { echo "build-image: $b is missing" >&2; exit 2; }
done

# 2. The kernel package: a pinned Debian linux-image (not backports, whose kernel is newer).
kpkg=${VIGIL_KERNEL_PKG:-$(apt-cache depends linux-image-amd64 2>/dev/null \
  | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')}
[ -n "$kpkg" ] || { echo "build-image: cannot find the kernel package (apt-get update?)" >&2; exit 2; }
kver=${kpkg#linux-image-}
kpkg_version=$(apt-cache policy "$kpkg" | awk '/Candidate:/ {print $2}')

inputs=$( {
  echo "kernel $kpkg $kpkg_version"
  sha256sum "$busybox" "$meterd_bin" "$agent_bin" images/init scripts/build-image.sh | awk '{print $1}'
} | sha256sum | awk '{print $1}')
if [ -f "$out/inputs.sha256" ] && [ "$(cat "$out/inputs.sha256")" = "$inputs" ] \
   && [ -f "$out/vmlinux" ] && [ -f "$out/initramfs.cpio" ] && [ -f "$out/data.qcow2" ]; then
  echo "build-image: images/out is up to date (inputs $inputs)"
  exit 0
fi

kdir=$cache/$kpkg-$kpkg_version
if [ ! -d "$kdir/boot" ]; then
  echo "build-image: fetching $kpkg $kpkg_version"
  (cd "$cache" && rm -f "${kpkg}"_*.deb && apt-get download -q "$kpkg=$kpkg_version" >/dev/null)
  rm -rf "$kdir.tmp" && mkdir -p "$kdir.tmp"
  dpkg-deb -x "$cache/${kpkg}_"*.deb "$kdir.tmp"
  mv "$kdir.tmp" "$kdir"
fi

# 3. vmlinux: the xz payload of the bzImage decompresses to the ELF kernel (PVH entry).
vmlinuz=$kdir/boot/vmlinuz-$kver
offset=$(grep -abo $'\xfd7zXZ\x00' "$vmlinuz" | head -n 1 | cut -d: -f1)
[ -n "$offset" ] || { echo "build-image: no xz payload in $vmlinuz" >&2; exit 2; }
tail -c +$((offset + 1)) "$vmlinuz" | xz -dc --single-stream > "$out/vmlinux.tmp" 2>/dev/null || true
head -c 4 "$out/vmlinux.tmp" | grep -q $'\x7fELF' || { echo "build-image: extracted kernel is not ELF" >&2; exit 2; }
mv "$out/vmlinux.tmp" "$out/vmlinux"

# 4. The root file system.
rootfs=$out/rootfs
rm -rf "$rootfs"
mkdir -p "$rootfs"/{bin,sbin,etc,proc,sys,dev,run,tmp,disk,root,lib/modules/"$kver"}
cp "$busybox" "$rootfs/bin/busybox"
for applet in $("$rootfs/bin/busybox" --list); do
  [ -e "$rootfs/bin/$applet" ] || ln -s busybox "$rootfs/bin/$applet"
done
strip -o "$rootfs/bin/meterd" "$meterd_bin"
strip -o "$rootfs/bin/vigil-agent" "$agent_bin"
ln -sf meterd "$rootfs/bin/meter"
# Shared libraries the binaries need, at the paths the dynamic loader expects.
for lib in $(ldd "$meterd_bin" "$agent_bin" | awk '/=> \// {print $3} /^[ \t]*\/lib/ {print $1}' | sort -u); do
  mkdir -p "$rootfs$(dirname "$lib")"
  cp -L "$lib" "$rootfs$lib"
done
# Kernel modules with their dependencies, indexed for modprobe.
mods="crc32c_generic libcrc32c virtio_pci virtio_net virtio_blk virtio_console virtio_rng ext4 xhci_pci xhci_hcd usbhid hid_generic usbip_core vhci_hcd"
mdir=$kdir/lib/modules/$kver
[ -f "$mdir/modules.dep" ] || depmod -b "$kdir" "$kver"
for m in $mods; do
  modprobe -d "$kdir" -S "$kver" --show-depends "$m" 2>/dev/null | awk '$1=="insmod" {print $2}'
done | sort -u | while read -r file; do
  rel=${file#"$kdir"/lib/modules/"$kver"/}
  mkdir -p "$rootfs/lib/modules/$kver/$(dirname "$rel")"
  cp "$file" "$rootfs/lib/modules/$kver/$rel"
done
cp "$mdir"/modules.order "$mdir"/modules.builtin* "$rootfs/lib/modules/$kver/" 2>/dev/null || true
depmod -b "$rootfs" "$kver"
module_count=$(find "$rootfs/lib/modules" -name '*.ko*' | wc -l)
# Only root: the agent creates each session user's account (same uid as on every machine).
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$rootfs/etc/passwd"
printf 'root:x:0:\n' > "$rootfs/etc/group"
cp images/init "$rootfs/init"
chmod 0755 "$rootfs/init"

# 5. A reproducible archive: sorted names, fixed owners and times; not compressed, because the
#    guest kernel unpacks gzip slowly under TCG (about a second of every boot).
find "$rootfs" -exec touch -h -d @0 {} +
(cd "$rootfs" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --reproducible --quiet) \
  > "$out/initramfs.cpio.tmp"
mv "$out/initramfs.cpio.tmp" "$out/initramfs.cpio"
rm -rf "$rootfs"

# 6. The data disk template: an empty ext4 file system (fixed UUID and hash seed) in qcow2.
rm -f "$out/data.raw"
truncate -s 256M "$out/data.raw"
E2FSPROGS_FAKE_TIME=1 mkfs.ext4 -q -F -L vigil-data -U 6f0f8a8e-4b1d-4c55-9d0e-7669676c0001 \
  -E root_owner=0:0,hash_seed=6f0f8a8e-4b1d-4c55-9d0e-7669676c0002 "$out/data.raw"
qemu-img convert -f raw -O qcow2 "$out/data.raw" "$out/data.qcow2"
rm -f "$out/data.raw"
echo "$inputs" > "$out/inputs.sha256"
cat > "$out/manifest.json" <<JSON
{"inputs": "$inputs", "kernel_package": "$kpkg", "kernel_package_version": "$kpkg_version",
 "kernel": "$kver", "profile": "$profile", "modules": $module_count,
 "vmlinux_sha256": "$(sha256sum "$out/vmlinux" | awk '{print $1}')",
 "initramfs_sha256": "$(sha256sum "$out/initramfs.cpio" | awk '{print $1}')"}
JSON
ls -la "$out/vmlinux" "$out/initramfs.cpio" "$out/data.qcow2"
echo "build-image: done ($module_count modules, inputs $inputs)"
