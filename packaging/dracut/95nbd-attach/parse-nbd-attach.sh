#!/bin/sh
# dracut cmdline hook (sourced): does the command line ask for a root on NBD? Then tell dracut the
# root is coming (rootok=1) and over the network (netroot=…, handled by /sbin/nbdroot once an
# interface is up). The full parsing happens there, in `nbd-attach boot`.

[ -z "$root" ] && root=$(getarg root=)
nbdroot_arg=$(getarg nbdroot=)
_nbdnet=
# root=dhcp / netroot=dhcp: dracut's network module (40network/netroot.sh) sets netroot to DHCP's
# root-path once a lease is bound and sources the cmdline hooks again; an NBD root-path is ours.
case "$netroot" in nbd:* | nbd://* | nbds://*) _nbdnet=$netroot ;; esac
for _n in $(getargs netroot=); do
    case "$_n" in nbd:* | nbd://* | nbds://*) _nbdnet=$_n ;; esac
done

case "$root" in
    nbd:* | nbd://* | nbds://*)
        netroot=$root
        root=block:/dev/root
        ;;
    *)
        if [ -n "$_nbdnet" ]; then
            netroot=$_nbdnet
        elif [ -n "$nbdroot_arg" ] || getarg nbdroot= > /dev/null; then
            # nbd-client's form: the handler reads nbdroot= from the command line itself.
            netroot=nbd:nbdroot
        else
            return 0
        fi
        case "$root" in
            /dev/nbd* | block:/dev/nbd*) ;;
            *) root=block:/dev/root ;;
        esac
        ;;
esac
unset _n _nbdnet nbdroot_arg

incol2 /proc/devices nbd || modprobe nbd || die "a root on NBD was asked for, but the nbd module cannot be loaded"
# shellcheck disable=SC2034
rootok=1
# The initqueue is finished once the device is connected (the kernel publishes its pid).
echo 'for f in /sys/block/nbd*/pid; do [ -e "$f" ] && exit 0; done; exit 1' > "$hookdir"/initqueue/finished/nbd-attach.sh
