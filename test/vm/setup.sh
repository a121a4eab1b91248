#!/usr/bin/env bash
# Prepare everything the real-kernel test VM needs (see test/vm/README.md).
#
#   test/vm/setup.sh [--refresh]
#
# Idempotent; run as root on Debian 12. It
#   1. installs (only when missing) qemu, busybox, kmod, cpio and the tools the guest runs;
#   2. downloads Debian's generic-flavour kernel package (never installs it), unpacks it with
#      `dpkg -x` into $CACHE/kernel-root and runs `depmod -b` there;
#   3. builds a tiny busybox initramfs that loads virtio + 9p and hands over to the
#      stage-2 script that test/vm/run.sh passes in through a 9p share.
# The cache ($NBD_ATTACH_CACHE, default ~/.cache/nbd-attach) is reused when present, so a
# second run only checks the packages. --refresh throws the cache away and starts again.
set -euo pipefail

# Bump when the cache layout or the initramfs changes: run.sh rebuilds a cache of another format.
FORMAT=1
CACHE="${NBD_ATTACH_CACHE:-${HOME:-/root}/.cache/nbd-attach}"
REFRESH=0

for arg in "$@"; do
  case "$arg" in
    --refresh) REFRESH=1 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

log() { printf 'vm-setup: %s\n' "$*"; }
die() { printf 'vm-setup: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages with apt-get); re-run with sudo"
mkdir -p "$CACHE"
# Several checkouts may start VMs at once: one builder at a time, the others then find it ready.
exec 9>"$CACHE/.lock"
flock -w 900 9 || die "another test/vm/setup.sh holds $CACHE/.lock for more than 15 minutes"

# --- 1. packages --------------------------------------------------------------------------
# Host side: qemu + initramfs tools. Guest side (it runs the host's own binaries over 9p):
# servers, clients and filesystem/network tools the kernel tests use.
PACKAGES=(
  qemu-system-x86 busybox-static cpio kmod
  nbdkit nbd-server nbd-client qemu-utils fio e2fsprogs iproute2 libnbd-bin util-linux procps fdisk
  openssl   # test certificates for the server's TLS (interop tests)
  man-db    # renders the Debian package's man pages (test/interop/package.test.ts)
  systemd   # systemd-analyze verify and systemd-notify for the unit and notify tests (nothing is started)
  dmsetup   # a device-mapper holder in the lifecycle kernel test
)
missing=()
for p in "${PACKAGES[@]}"; do
  status="$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)"
  [ "$status" = installed ] || missing+=("$p")
done
APT_UPDATED=0
apt_update() {
  if [ "$APT_UPDATED" -eq 0 ]; then
    log "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    APT_UPDATED=1
  fi
}
if [ "${#missing[@]}" -gt 0 ]; then
  apt_update
  log "installing: ${missing[*]}"
  # nbd-client/nbd-server ship services and debconf questions: never prompt, never start them.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}"
fi

# --- 2. kernel ------------------------------------------------------------------------------
READY="$CACHE/ready"
if [ "$REFRESH" -eq 1 ]; then
  log "--refresh: removing $CACHE/{ready,kernel-root,debs,initramfs.cpio.gz}"
  rm -rf "$READY" "$CACHE/kernel-root" "$CACHE/debs" "$CACHE/initramfs.cpio.gz"
fi
if [ -f "$READY" ] && grep -qx "format=$FORMAT" "$READY"; then
  log "cache is ready: $CACHE ($(grep '^kver=' "$READY"))"
  exit 0
fi
rm -f "$READY"

# The generic flavour (not -cloud-amd64, which lacks 9p): whatever linux-image-amd64 depends on.
kernel_pkg="${NBD_VM_KERNEL_PKG:-}"
if [ -z "$kernel_pkg" ]; then
  find_pkg() {
    apt-cache depends linux-image-amd64 2>/dev/null \
      | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n1
  }
  kernel_pkg="$(find_pkg)"
  if [ -z "$kernel_pkg" ]; then apt_update; kernel_pkg="$(find_pkg)"; fi
fi
[ -n "$kernel_pkg" ] || die "cannot find the kernel package: 'apt-cache depends linux-image-amd64' names none; check the apt sources, or set NBD_VM_KERNEL_PKG=linux-image-6.1.0-N-amd64"
case "$kernel_pkg" in
  *cloud*) die "$kernel_pkg is the cloud flavour, which lacks 9p; use the generic linux-image-6.1.0-N-amd64" ;;
esac
kver="${kernel_pkg#linux-image-}"

mkdir -p "$CACHE/debs"
deb="$(ls "$CACHE/debs/${kernel_pkg}_"*.deb 2>/dev/null | head -n1 || true)"
if [ -z "$deb" ]; then
  log "downloading $kernel_pkg (about 70 MB)"
  ( cd "$CACHE/debs" && apt-get download -qq -o APT::Sandbox::User=root "$kernel_pkg" ) \
    || { apt_update; ( cd "$CACHE/debs" && apt-get download -qq -o APT::Sandbox::User=root "$kernel_pkg" ); } \
    || die "apt-get download $kernel_pkg failed; check network access to the Debian mirror"
  deb="$(ls "$CACHE/debs/${kernel_pkg}_"*.deb | head -n1)"
fi

log "unpacking $(basename "$deb") (dpkg -x, not installed)"
rm -rf "$CACHE/kernel-root.tmp"
mkdir -p "$CACHE/kernel-root.tmp"
dpkg -x "$deb" "$CACHE/kernel-root.tmp"
# Debian 12 is merged-/usr, but the package may ship either layout.
moddir="$CACHE/kernel-root.tmp/lib/modules/$kver"
[ -d "$moddir" ] || moddir="$CACHE/kernel-root.tmp/usr/lib/modules/$kver"
[ -d "$moddir" ] || die "the package has no modules for $kver"
[ -f "$CACHE/kernel-root.tmp/boot/vmlinuz-$kver" ] || die "the package has no /boot/vmlinuz-$kver"
if [ "$moddir" != "$CACHE/kernel-root.tmp/lib/modules/$kver" ]; then
  mkdir -p "$CACHE/kernel-root.tmp/lib/modules"
  ln -s "../../usr/lib/modules/$kver" "$CACHE/kernel-root.tmp/lib/modules/$kver"
fi
depmod -b "$CACHE/kernel-root.tmp" "$kver"
rm -rf "$CACHE/kernel-root"
mv "$CACHE/kernel-root.tmp" "$CACHE/kernel-root"
moddir="$CACHE/kernel-root/lib/modules/$kver"

# --- 3. initramfs -----------------------------------------------------------------------------
# Modules in load order (kernel-lab.md): virtio transport, then 9p over virtio.
INITRD_MODULES=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
                netfs fscache 9pnet 9pnet_virtio 9p)
log "building initramfs"
work="$(mktemp -d "${TMPDIR:-/tmp}/nbd-vm-initramfs.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work"/{bin,dev,proc,sys,ctl,newroot,modules}
cp /bin/busybox "$work/bin/busybox"
file_of() { # path of a module inside the unpacked tree (may be compressed)
  local f
  f="$(modprobe -d "$CACHE/kernel-root" -S "$kver" --show-depends "$1" 2>/dev/null \
        | awk -v m="$1" '$1=="insmod" { p=$2 } END { print p }')"
  [ -n "$f" ] || f="$(find "$moddir" -name "$1.ko*" | head -n1)"
  printf '%s' "$f"
}
: > "$work/modules/order"
for m in "${INITRD_MODULES[@]}"; do
  f="$(file_of "$m")"
  [ -n "$f" ] && [ -f "$f" ] || die "module $m not found in $kver"
  case "$f" in
    *.ko) cp "$f" "$work/modules/$m.ko" ;;
    *.ko.xz) xz -dc "$f" > "$work/modules/$m.ko" ;;
    *.ko.zst) zstd -qdc "$f" > "$work/modules/$m.ko" ;;
    *.ko.gz) gzip -dc "$f" > "$work/modules/$m.ko" ;;
    *) die "unknown module format: $f" ;;
  esac
  echo "$m" >> "$work/modules/order"
done
mknod "$work/dev/console" c 5 1
mknod "$work/dev/null" c 1 3
cat > "$work/init" <<'EOF'
#!/bin/busybox sh
# nbd-attach test VM, stage 1 (built by test/vm/setup.sh): load virtio + 9p, mount the control
# share and hand over to the stage-2 script that test/vm/run.sh put there.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1
halt_now() { echo "nbd-vm: $*"; sync; poweroff -f; sleep 5; }
while read -r m; do
  insmod "/modules/$m.ko" || halt_now "stage 1: insmod $m failed"
done < /modules/order
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 nbdvm_ctl /ctl \
  || halt_now "stage 1: cannot mount the control share nbdvm_ctl"
[ -f /ctl/stage2.sh ] || halt_now "stage 1: /ctl/stage2.sh missing"
. /ctl/stage2.sh
halt_now "stage 2 returned without powering off"
EOF
chmod 755 "$work/init"
( cd "$work" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1 ) > "$CACHE/initramfs.cpio.gz.tmp"
mv "$CACHE/initramfs.cpio.gz.tmp" "$CACHE/initramfs.cpio.gz"

printf 'format=%s\nkver=%s\npackage=%s\ndeb=%s\n' "$FORMAT" "$kver" "$kernel_pkg" "$(basename "$deb")" > "$READY"
log "ready: kernel $kver, cache $CACHE"
