# shellcheck shell=sh
# What an initramfs needs to run nbd-attach, in one place: sourced by the initramfs-tools hook
# (packaging/initramfs-tools/hooks/nbd-attach) and the dracut module (packaging/dracut/95nbd-attach).
# Installed as /usr/lib/nbd-attach/boot-files.sh, beside the files it names.

# The installed program: the built modules (npm run build's dist/*.mjs, at the top of the
# directory, as scripts/deb.mjs installs them) and the packages they import at run time.
# Override with NBD_ATTACH_LIB (a directory with the same layout: packaging/boot/stage-lib.sh).
NBD_ATTACH_LIB="${NBD_ATTACH_LIB:-/usr/lib/nbd-attach}"
# The Node.js binary copied with its libraries.
NBD_ATTACH_NODE="${NBD_ATTACH_NODE:-$(command -v node 2>/dev/null || echo /usr/bin/node)}"
# Kernel modules: the nbd driver (network drivers come from each framework's own rules).
NBD_ATTACH_KMODS="nbd"
# TLS material for nbds:// roots that name no files (src/boot/cmdline.ts INITRAMFS_TLS_DIR).
NBD_ATTACH_TLS_DIR=/etc/nbd-attach/initramfs-tls

# nbd_attach_boot_files: every file under $NBD_ATTACH_LIB the initramfs needs, relative to it, one
# per line: the .mjs modules (no source maps), commander, debug + ms, and koffi with its
# native module (@koromix/koffi-linux-*: koffi's src/koffi/index.js finds it from its own path).
nbd_attach_boot_files() {
  (
    cd "$NBD_ATTACH_LIB" || exit 1
    find . -maxdepth 1 -name '*.mjs' | sed 's|^\./||'
    find node_modules/commander node_modules/debug node_modules/ms -type f \
      ! -name '*.md' ! -name '*.d.ts' ! -name '*.d.mts' ! -name '*.map'
    find node_modules/koffi/package.json node_modules/koffi/index.js node_modules/koffi/index.cjs node_modules/koffi/src -type f
    find node_modules/@koromix -type f
  )
}

# nbd_attach_boot_wrapper: the /usr/sbin/nbd-attach of the initramfs.
nbd_attach_boot_wrapper() {
  printf '#!/bin/sh\nexec /usr/bin/node /usr/lib/nbd-attach/nbd-attach.mjs "$@"\n'
}

# nbd_attach_boot_check: fail with one line when something the initramfs needs is missing.
nbd_attach_boot_check() {
  for f in nbd-attach.mjs node_modules/commander/package.json node_modules/koffi/package.json; do
    [ -e "$NBD_ATTACH_LIB/$f" ] || { echo "nbd-attach: $NBD_ATTACH_LIB/$f is missing: reinstall nbd-attach (or set NBD_ATTACH_LIB to a directory laid out as /usr/lib/nbd-attach)" >&2; return 1; }
  done
  [ -x "$NBD_ATTACH_NODE" ] || { echo "nbd-attach: no Node.js binary at $NBD_ATTACH_NODE: install nodejs (>= 20) or set NBD_ATTACH_NODE" >&2; return 1; }
}
