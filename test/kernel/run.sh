#!/usr/bin/env bash
# Host-side entry point for the real-kernel tests: boots the test VM once (test/vm/run.sh) and
# runs every test/kernel/*.test.ts in it, one file at a time, as root.
#   test/kernel/run.sh [--timeout SECONDS] [--mem MB] [TEST_FILE...]
# Exits with the test runner's status; 124 when the VM timed out, 125 when it broke.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

# The whole kernel suite takes ~22 min under software emulation; the VM gets 40 min at most.
VM_ARGS=(--timeout 2400)
while [ $# -gt 0 ]; do
  case "$1" in
    --timeout|--mem) VM_ARGS+=("$1" "${2:?$1 needs a value}"); shift 2 ;;
    --timeout=*|--mem=*) VM_ARGS+=("$1"); shift ;;
    *) break ;;
  esac
done
if [ $# -gt 0 ]; then FILES=("$@"); else FILES=(test/kernel/*.test.ts); fi
[ -e "${FILES[0]}" ] || { echo "kernel tests: no test files found" >&2; exit 1; }

# The guest runs the tests as JavaScript bundled here (test/kernel/bundle.mjs): loading tsx in the
# guest costs 20-40 s per test file under software emulation. The bundle directory is two levels
# below the checkout (the tests find the checkout at ../..), one per run, removed afterwards.
OUT=".kernel-tests-$$/kernel"
trap 'rm -rf ".kernel-tests-$$"' EXIT
node test/kernel/bundle.mjs "$OUT" "${FILES[@]}" || { echo "kernel tests: bundling the test files failed" >&2; exit 1; }
BUNDLED=()
for f in "${FILES[@]}"; do
  b="$(basename "$f")"
  BUNDLED+=("$OUT/${b%.ts}.mjs")
done

# In the guest HOME and TMPDIR are the tmpfs /tmp (Node's caches stay writable while the checkout
# is read-only). Source maps turn failures' stack traces back into test/ and src/ lines.
test/vm/run.sh "${VM_ARGS[@]}" -- \
  node --enable-source-maps --test --test-reporter=tap --test-concurrency=1 "${BUNDLED[@]}"
