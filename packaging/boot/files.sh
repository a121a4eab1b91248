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
# Kernel modules: the nbd driver; for kernel TLS on an nbds:// root, tls and the ciphers of the TLS
# suites it carries (AES-GCM, AES-CCM, ChaCha20-Poly1305: the kernel loads them, through modprobe in
# the initramfs, when the first TLS socket is set up; without them the supervisor relays, slower),
# with the x86 accelerated versions where the kernel has them (names missing here are skipped).
# Network drivers come from each framework's own rules.
NBD_ATTACH_KMODS="nbd tls gcm ghash-generic ccm chacha20poly1305 aesni-intel ghash-clmulni-intel chacha-x86_64 poly1305-x86_64"
# TLS material for nbds:// roots that name no files (src/boot/cmdline.ts INITRAMFS_TLS_DIR): the
# path inside the image; NBD_ATTACH_TLS_FROM is where it is copied from (default: the same path on
# this machine): ca-cert.pem, and client-cert.pem + client-key.pem when the server asks for them.
NBD_ATTACH_TLS_DIR=/etc/nbd-attach/initramfs-tls
NBD_ATTACH_TLS_FROM="${NBD_ATTACH_TLS_FROM:-$NBD_ATTACH_TLS_DIR}"

# nbd_attach_boot_files: every file under $NBD_ATTACH_LIB the initramfs needs, relative to it, one
# per line: the .mjs modules (no source maps; commander is bundled in them), debug + ms, and koffi's loader with the
# one native module this Node.js can load (@koromix/koffi-linux-*: koffi's src/koffi/index.js finds
# the package from its own path, and the package's index.js picks linux_ARCH for glibc, musl_ARCH
# for musl by reading node's ELF interpreter): no C++ sources, no module for the other libc.
nbd_attach_boot_files() {
  (
    cd "$NBD_ATTACH_LIB" || exit 1
    other_libc=musl_
    grep -q 'ld-musl' "$NBD_ATTACH_NODE" 2> /dev/null && other_libc=linux_
    find . -maxdepth 1 -name '*.mjs' | sed 's|^\./||'
    find node_modules/debug node_modules/ms -type f \
      ! -name '*.md' ! -name '*.d.ts' ! -name '*.d.mts' ! -name '*.map'
    find node_modules/koffi/package.json node_modules/koffi/index.js node_modules/koffi/index.cjs -type f
    find node_modules/koffi/src -type f \( -name '*.js' -o -name '*.cjs' -o -name '*.mjs' -o -name '*.json' \)
    find node_modules/@koromix -type f ! -path "*/${other_libc}*" ! -name '*.md'
  )
}

# nbd_attach_boot_strip FILE: the Node.js binary in the image without its debugging symbols
# (official builds carry them: ~13 MB of 99 MB). The dynamic symbol table that native modules
# (koffi) link against stays. Without binutils' strip, nothing changes.
nbd_attach_boot_strip() {
  command -v strip > /dev/null 2>&1 || return 0
  strip --strip-debug --strip-unneeded "$1" 2> /dev/null || true
}

# nbd_attach_boot_wrapper: the /usr/sbin/nbd-attach of the initramfs.
nbd_attach_boot_wrapper() {
  printf '#!/bin/sh\nexec /usr/bin/node /usr/lib/nbd-attach/nbd-attach.mjs "$@"\n'
}

# nbd_attach_boot_check: fail with one line when something the initramfs needs is missing.
nbd_attach_boot_check() {
  for f in nbd-attach.mjs node_modules/koffi/package.json; do
    [ -e "$NBD_ATTACH_LIB/$f" ] || { echo "nbd-attach: $NBD_ATTACH_LIB/$f is missing: reinstall nbd-attach (or set NBD_ATTACH_LIB to a directory laid out as /usr/lib/nbd-attach)" >&2; return 1; }
  done
  [ -x "$NBD_ATTACH_NODE" ] || { echo "nbd-attach: no Node.js binary at $NBD_ATTACH_NODE: install nodejs (>= 20) or set NBD_ATTACH_NODE" >&2; return 1; }
}
