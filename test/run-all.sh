#!/usr/bin/env bash
# Sets up and runs every test: the README's test command, and what .ci/run calls.
#
#   bash test/run-all.sh            (as root on Debian 12; installs what it needs)
#
# 1. system packages, the test kernel and its initramfs (test/vm/setup.sh; cached), npm packages;
# 2. type check; 3. unit tests; 4. interop tests against real servers on loopback;
# 5. kernel tests inside one qemu VM boot (test/kernel/run.sh); 6. real boots with the root on NBD
#    (test/boot/: initramfs-tools and dracut initramfs images, each booted by qemu).
# Prints one closing line "tests: N passed, N failed, N skipped" over all three runs; exits non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== %s ===\n' "$*"; }
fail() { printf 'run-all: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "needs root (it installs packages and boots a VM for the kernel tests); re-run with sudo"

step "setup: system packages and test kernel"
bash test/vm/setup.sh || fail "test/vm/setup.sh failed"
step "setup: npm packages"
npm ci --no-audit --no-fund --loglevel=error || fail "npm ci failed"

step "type check"
npx tsc --noEmit -p . || fail "type check failed"

passed=0
failed=0
skipped=0
suite_failed=0
LOGDIR="$(mktemp -d)"
run_suite() {
  local name="$1"; shift
  step "$name"
  "$@" 2>&1 | tee "$LOGDIR/$name.log"
  local rc=${PIPESTATUS[0]}
  local p f s
  p=$(grep -E '^# pass [0-9]+' "$LOGDIR/$name.log" | tail -n1 | awk '{print $3}')
  f=$(grep -E '^# fail [0-9]+' "$LOGDIR/$name.log" | tail -n1 | awk '{print $3}')
  s=$(grep -E '^# skipped [0-9]+' "$LOGDIR/$name.log" | tail -n1 | awk '{print $3}')
  passed=$((passed + ${p:-0}))
  failed=$((failed + ${f:-0}))
  skipped=$((skipped + ${s:-0}))
  if [ "$rc" -ne 0 ]; then
    suite_failed=1
    [ -n "$f" ] && [ "$f" -gt 0 ] || failed=$((failed + 1))  # a suite that died without counting
    echo "run-all: $name exited with $rc"
  fi
}

shopt -s nullglob
run_suite unit node --import tsx --test --test-reporter=tap test/unit/*.test.ts
run_suite interop node --import tsx --test --test-reporter=tap --test-concurrency=2 test/interop/*.test.ts
run_suite kernel bash test/kernel/run.sh
# Real boots of a diskless machine with its root on NBD (test/boot/: initramfs-tools, dracut).
run_suite boot node --import tsx --test --test-reporter=tap --test-concurrency=1 test/boot/*.test.ts

echo
# Skipped tests (e.g. no IPv6 loopback) are not passes: they are counted apart.
echo "tests: $passed passed, $failed failed, $skipped skipped"
[ "$suite_failed" -eq 0 ] && [ "$failed" -eq 0 ]
