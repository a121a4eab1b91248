#!/bin/sh
# dracut netroot handler (/sbin/nbdroot, /sbin/nbdsroot): NETIF NETROOT NEWROOT. Attaches the root
# with `nbd-attach boot`, one process that attaches and then carries the root as its supervisor
# (argv[0] marked '@', state and log under /run/nbd-attach, moved into the real root with /run).
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
mkdir -p /run/nbd-attach
report=/run/nbd-attach/boot.env
# Another interface may have come up first: its handler started the attach already.
if [ -r "$report" ]; then
    . "$report"
    [ -n "$NBDROOT_PID" ] && kill -0 "$NBDROOT_PID" 2> /dev/null && exit 0
    [ "$NBDROOT_STATE" = ready ] && exit 0
    rm -f "$report"
fi

# One Node.js process for the whole job: `nbd-attach boot` reads the command line (and the
# root-path handed to us), attaches the root (trying again while the server comes up) and stays as
# its supervisor; it reports to $report (shell assignments, replaced whole).
export NBD_ATTACH_LOG_DIR=/run/nbd-attach NBD_ATTACH_RUN_DIR=/run/nbd-attach
detach=
command -v setsid > /dev/null 2>&1 && detach=setsid
$detach nbd-attach boot --root-path "$rootpath" --report "$report" < /dev/null > /run/nbd-attach/boot.out 2>&1 &
NBDROOT_STATE=attaching NBDROOT_PID=
n=0
while [ "$n" -lt 1800 ]; do
    [ -r "$report" ] && . "$report"
    [ "$NBDROOT_STATE" = attaching ] || break
    if [ -n "$NBDROOT_PID" ] && ! kill -0 "$NBDROOT_PID" 2> /dev/null; then
        . "$report"
        [ "$NBDROOT_STATE" = attaching ] && NBDROOT_STATE=failed NBDROOT_MESSAGE="nbd-attach boot ended"
        break
    fi
    sleep 0.1
    n=$((n + 1))
done
case "$NBDROOT_STATE" in
    ready) ;;
    none) exit 0 ;;
    *)
        warn "$(cat /run/nbd-attach/boot.out)"
        die "nbd-attach: cannot attach the root: ${NBDROOT_MESSAGE:-no answer in 180 s}"
        ;;
esac

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
