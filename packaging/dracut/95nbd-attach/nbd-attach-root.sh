#!/bin/sh
# dracut netroot handler (/sbin/nbdroot, /sbin/nbdsroot): NETIF NETROOT NEWROOT. Attaches the root
# with nbd-attach: the supervisor it leaves running carries the root from here on (argv[0] marked
# '@', state and log under /run/nbd-attach, moved into the real root with /run).
type getarg > /dev/null 2>&1 || . /lib/dracut-lib.sh
PATH=/usr/sbin:/usr/bin:/sbin:/bin

netif="$1"
nroot="$2"
NEWROOT="$3"
[ -n "$netif" ] && [ -n "$nroot" ] && [ -n "$NEWROOT" ] || exit 1

# NETROOT is what the command line (or DHCP's root-path, for netroot=dhcp) said; for nbd-client's
# nbdroot= form the parse hook put a placeholder there.
rootpath="$nroot"
[ "$nroot" = nbd:nbdroot ] && rootpath=
tls=
[ -d /etc/nbd-attach/initramfs-tls ] && tls=--tls-dir-present
plan="$(nbd-attach boot-args --root-path "$rootpath" $tls)" || die "nbd-attach: cannot use this kernel command line"
[ -n "$plan" ] || exit 0
eval "$plan"
eval "set -- $NBDROOT_ARGS"

# Another interface may have come up first and attached it already.
nbd-attach check "$NBDROOT_DEVICE" > /dev/null 2>&1 && exit 0

mkdir -p /run/nbd-attach
export NBD_ATTACH_LOG_DIR=/run/nbd-attach NBD_ATTACH_RUN_DIR=/run/nbd-attach
tries=0
until nbd-attach "$@"; do
    rc=$?
    [ "$rc" -ne 2 ] || die "nbd-attach: cannot attach $NBDROOT_DEVICE with: nbd-attach $*"
    tries=$((tries + 1))
    [ "$tries" -lt 10 ] || exit 1
    warn "nbd-attach: attach failed; trying again in 3 s ($tries/10)"
    sleep 3
done

# The supervisor starts beside the command and must have loaded all of itself before the
# initramfs is emptied at switch_root: wait until it says it is supervising (30 s at most).
n=0
until grep -q 'supervising (pid' "/run/nbd-attach/${NBDROOT_DEVICE#/dev/}.log" 2>/dev/null || [ "$n" -ge 300 ]; do
    sleep 0.1; n=$((n + 1))
done
[ "$n" -lt 300 ] || warn "nbd-attach: the supervisor of $NBDROOT_DEVICE did not report in 30 s"

if [ "$NBDROOT_ROOT" != "$NBDROOT_DEVICE" ]; then
    blockdev --rereadpt "$NBDROOT_DEVICE" 2> /dev/null || dd if="$NBDROOT_DEVICE" of=/dev/null bs=4096 count=1 2> /dev/null
    wait_for_dev -n "$NBDROOT_ROOT" 2> /dev/null
fi

if [ "$root" = block:/dev/root ] || [ "$root" = dhcp ]; then
    ln -sf "$NBDROOT_ROOT" /dev/root
    opts="$NBDROOT_MOUNTOPTS"
    getarg ro && opts="${opts:+$opts,}ro"
    getarg rw && opts="${opts:+$opts,}rw"
    if [ -z "$DRACUT_SYSTEMD" ]; then
        type write_fs_tab > /dev/null 2>&1 || . /lib/fs-lib.sh
        write_fs_tab /dev/root "${NBDROOT_FSTYPE:-auto}" "${opts:-defaults}"
        printf '/bin/mount %s\n' "$NEWROOT" > "$hookdir"/mount/01-$$-nbd-attach.sh
    else
        mkdir -p /run/systemd/system/sysroot.mount.d
        printf '[Mount]\nWhere=/sysroot\nWhat=%s\nType=%s\nOptions=%s\n' "$NBDROOT_ROOT" "${NBDROOT_FSTYPE:-auto}" "${opts:-defaults}" \
            > /run/systemd/system/sysroot.mount.d/nbd-attach.conf
        systemctl --no-block daemon-reload
    fi
fi
need_shutdown
exit 0
