#!/usr/bin/env bash
# Sets up and runs every test: the README's test command, and what .ci/run calls.
#
#   bash test/run-all.sh            (as root on Debian 12; installs what it needs)
#
# 1. system packages, the test kernel and its initramfs (test/vm/setup.sh; cached), npm packages;
# 2. type check; 3. unit tests; 4. interop tests against real servers on loopback;
# 5. kernel tests inside qemu VMs (test/kernel/run.sh); 6. real boots with the root on NBD
#    (test/boot/: initramfs-tools and dracut initramfs images, each booted by qemu).
# On a host with 2 or more CPUs and 6 GB of free memory, 5 and 6 run as two lanes at once: half of
# the kernel test files in one VM; the other half in a second VM, then the boots (NBD_TEST_LANES=1:
# one after the other). The lanes' output is printed once both have ended.
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

# The same, its output kept in the log and printed when it ends (for lanes running at once).
run_suite_quiet() {
  local name="$1"; shift
  "$@" > "$LOGDIR/$name.out" 2>&1
  echo $? > "$LOGDIR/$name.rc"
}
# Counts and prints a suite that run_suite_quiet ran.
collect_suite() {
  local name="$1"
  run_suite "$name" sh -c 'cat "$1"; rc="$(cat "$2" 2>/dev/null)"; exit "${rc:-1}"' sh "$LOGDIR/$name.out" "$LOGDIR/$name.rc"
}

shopt -s nullglob
run_suite unit node --import tsx --test --test-reporter=tap test/unit/*.test.ts
run_suite interop node --import tsx --test --test-reporter=tap --test-concurrency=2 test/interop/*.test.ts
# Real boots of a diskless machine with its root on NBD (test/boot/: initramfs-tools, dracut).
BOOT=(node --import tsx --test --test-reporter=tap --test-concurrency=1 test/boot/*.test.ts)
lanes="${NBD_TEST_LANES:-}"
if [ -z "$lanes" ]; then
  mem_kb=$(awk '/^MemAvailable:/ { print $2 }' /proc/meminfo)
  if [ "$(nproc)" -ge 2 ] && [ "${mem_kb:-0}" -ge 6000000 ]; then lanes=2; else lanes=1; fi
fi
if [ "$lanes" -ge 2 ]; then
  # The boots take ~350 s: the second lane gets that much less kernel work (test/kernel/run.sh --preload).
  step "kernel tests in two VMs at once, the boots after the second (output once both lanes end)"
  run_suite_quiet kernel-1 bash test/kernel/run.sh --shard 1/2 --preload 0,350 &
  lane1=$!
  { run_suite_quiet kernel-2 bash test/kernel/run.sh --shard 2/2 --preload 0,350; run_suite_quiet boot "${BOOT[@]}"; } &
  lane2=$!
  wait "$lane1" "$lane2"
  collect_suite kernel-1
  collect_suite kernel-2
  collect_suite boot
else
  run_suite kernel bash test/kernel/run.sh
  run_suite boot "${BOOT[@]}"
fi

echo
# Skipped tests (e.g. no IPv6 loopback) are not passes: they are counted apart.
echo "tests: $passed passed, $failed failed, $skipped skipped"
[ "$suite_failed" -eq 0 ] && [ "$failed" -eq 0 ]
