#!/bin/bash
# dracut module: attach the root file system over NBD with nbd-attach (instead of dracut's own
# 95nbd, which runs nbd-client). Same kernel command lines as the initramfs-tools script:
# root=nbd:SERVER:PORT_OR_EXPORT[:FSTYPE[:MOUNTOPTS[:NBDOPTS]]] (or netroot=), root=nbd://… and
# nbds://…, nbd-client's nbdroot=SERVER,PORT_OR_NAME[,nbdX] with root=/dev/nbdX[pN]; the network
# comes from dracut's network module (ip=, or DHCP's root-path with root=dhcp / netroot=dhcp).
# Parsing: `nbd-attach boot` (src/boot/cmdline.ts), which also attaches and supervises.
# Node.js makes the image about 30 MB larger: the module is only included when asked for
# (`dracut --add nbd-attach`, or add_dracutmodules+=" nbd-attach " in a dracut.conf.d file).

# called by dracut
check() {
    local _lib="${NBD_ATTACH_LIB:-/usr/lib/nbd-attach}"
    [[ -r "$_lib/boot-files.sh" ]] || return 1
    return 255
}

# called by dracut
depends() {
    echo network rootfs-block
}

# called by dracut
installkernel() {
    local _lib="${NBD_ATTACH_LIB:-/usr/lib/nbd-attach}"
    # shellcheck source=../../boot/files.sh
    . "$_lib/boot-files.sh"
    # shellcheck disable=SC2086
    instmods $NBD_ATTACH_KMODS
}

# called by dracut
install() {
    NBD_ATTACH_LIB="${NBD_ATTACH_LIB:-/usr/lib/nbd-attach}"
    # shellcheck source=../../boot/files.sh
    . "$NBD_ATTACH_LIB/boot-files.sh"
    nbd_attach_boot_check || return 1
    local _f
    while read -r _f; do
        inst_simple "$NBD_ATTACH_LIB/$_f" "/usr/lib/nbd-attach/$_f"
    done < <(nbd_attach_boot_files)
    inst_binary "$NBD_ATTACH_NODE" /usr/bin/node
    nbd_attach_boot_strip "$initdir/usr/bin/node"
    mkdir -p "$initdir/usr/sbin"
    nbd_attach_boot_wrapper > "$initdir/usr/sbin/nbd-attach"
    chmod 755 "$initdir/usr/sbin/nbd-attach"
    if [[ -d $NBD_ATTACH_TLS_FROM ]]; then
        for _f in "$NBD_ATTACH_TLS_FROM"/*; do
            [[ -f $_f ]] && inst_simple "$_f" "$NBD_ATTACH_TLS_DIR/${_f##*/}"
        done
    fi
    inst_multiple -o blockdev setsid
    inst_hook cmdline 90 "$moddir/parse-nbd-attach.sh"
    # dracut's network module calls /sbin/${netroot%%:*}root once an interface is up.
    inst_script "$moddir/nbd-attach-root.sh" /sbin/nbdroot
    inst_script "$moddir/nbd-attach-root.sh" /sbin/nbdsroot
    dracut_need_initqueue
}
