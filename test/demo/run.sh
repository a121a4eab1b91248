#!/usr/bin/env bash
# `npm run demo`: for machines whose kernel has no nbd module. Sets up the test VM (Debian's stock
# kernel under qemu; test/vm/setup.sh installs what it needs, as root) and runs the whole
# local-attach cycle in it (test/demo/guest.sh), printing each command and its output.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
[ "$(id -u)" -eq 0 ] || { echo "demo: needs root (it installs qemu and boots a VM); re-run with sudo" >&2; exit 1; }
bash test/vm/setup.sh
[ -d node_modules/koffi ] || npm ci --no-audit --no-fund --loglevel=error
exec test/vm/run.sh --timeout 600 -- bash test/demo/guest.sh
