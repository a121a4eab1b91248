#!/usr/bin/env bash
# What the boot tests need on the host (Debian 12, as root), on top of the kernel test VM's cache
# (test/vm/setup.sh): initramfs-tools (mkinitramfs, the framework under test), busybox-static (the
# test root's userland), e2fsprogs (mkfs.ext4 -d, e2fsck). Idempotent.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$HERE/../vm/setup.sh" >/dev/null
missing=()
for p in initramfs-tools busybox-static e2fsprogs zstd; do
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)" = installed ] || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "boot-setup: installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# mkinitramfs reads the kernel's modules from /lib/modules/VERSION: the tests bind the unpacked
# tree there inside a private mount namespace, which needs the directory to exist.
mkdir -p /lib/modules

# dracut: Debian's dracut conflicts with initramfs-tools, so it is unpacked (dpkg -x), never
# installed, into the cache; its network-legacy module needs dhclient and arping on the host.
CACHE="${NBD_ATTACH_CACHE:-${HOME:-/root}/.cache/nbd-attach}"
for p in isc-dhcp-client iputils-arping; do
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)" = installed ] || {
    echo "boot-setup: installing $p"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$p" >/dev/null
  }
done
if ! [ -x "$CACHE/dracut/root/usr/bin/dracut" ]; then
  echo "boot-setup: unpacking dracut-core and dracut-network into $CACHE/dracut (dpkg -x, not installed)"
  rm -rf "$CACHE/dracut"
  mkdir -p "$CACHE/dracut/debs" "$CACHE/dracut/root.tmp"
  ( cd "$CACHE/dracut/debs" && apt-get download -qq -o APT::Sandbox::User=root dracut-core dracut-network )
  for d in "$CACHE"/dracut/debs/*.deb; do dpkg -x "$d" "$CACHE/dracut/root.tmp"; done
  mv "$CACHE/dracut/root.tmp" "$CACHE/dracut/root"
fi
