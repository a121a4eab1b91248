#!/usr/bin/env bash
# The whole local-attach cycle, run as root inside the test VM by `npm run demo` (test/demo/run.sh):
# attach an image file through the in-process server, mkfs, mount, write, read back, detach, and
# show that the image file holds what was written. Every command is printed before it runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT=$PWD
nbd-attach() { node "$ROOT/dist/nbd-attach.mjs" "$@"; }   # dist/ as test/vm/run.sh built it on the host
say() { printf '\n\033[1m# %s\033[0m\n' "$*"; }
show() { printf '$ %s\n' "$*"; "$@"; }

KROOT=${NBD_VM_KERNEL_ROOT:-/run/nbd-vm/kroot}
say "load the nbd driver of the test kernel (on a normal machine: modprobe nbd)"
show modprobe -d "$KROOT" nbd
W=$(mktemp -d /tmp/demo.XXXXXX)
mkdir -p "$W/mnt"

say "an empty 256 MiB image, attached through the built-in server on a socketpair"
show truncate -s 256M "$W/disk.img"
out=$(nbd-attach --file "$W/disk.img")
printf '$ nbd-attach --file %s\n%s\n' "$W/disk.img" "$out"
dev=$(printf '%s\n' "$out" | sed -n 's/^\(\/dev\/nbd[0-9]*\) attached: .*/\1/p')
[ -n "$dev" ] || { echo "demo: no device in the output above" >&2; exit 1; }
show nbd-attach status "$dev"

say "a filesystem on it, a file written, read back after a remount"
show mkfs.ext4 -q "$dev"
show mount "$dev" "$W/mnt"
show dd if=/dev/urandom of="$W/mnt/data.bin" bs=1M count=16 status=none
echo "hello from a block device served in user land" > "$W/mnt/hello.txt"
echo "\$ echo 'hello from a block device served in user land' > $W/mnt/hello.txt"
written=$(sha256sum < "$W/mnt/data.bin")
show umount "$W/mnt"
show mount "$dev" "$W/mnt"
show cat "$W/mnt/hello.txt"
readback=$(sha256sum < "$W/mnt/data.bin")
printf 'data.bin written %s\ndata.bin read    %s\n' "${written%% *}" "${readback%% *}"
[ "$written" = "$readback" ] || { echo "demo: read back differs" >&2; exit 1; }
show umount "$W/mnt"

say "detach: the supervisor flushes the image and exits; the image holds the filesystem"
devsum=$(sha256sum < "$dev")
show nbd-attach -d "$dev"
imgsum=$(sha256sum < "$W/disk.img")
printf 'device %s\nimage  %s\n' "${devsum%% *}" "${imgsum%% *}"
[ "$devsum" = "$imgsum" ] || { echo "demo: the image differs from the device" >&2; exit 1; }
show nbd-attach status "$dev"
say "demo finished: attach, mkfs, mount, write, read back, detach all worked"
