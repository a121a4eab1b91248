#!/usr/bin/env bash
# Host-side checks of test/vm/run.sh itself (3 VM boots, about 1.5 minutes):
# exit status, argument quoting, --env, a checkout under /tmp, and both timeouts.
#   test/vm/selftest.sh
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RUN="$HERE/run.sh"
pass=0
fail=0
check() { # $1 = description, $2... = test command
  local what="$1"; shift
  if "$@"; then pass=$((pass + 1)); echo "ok - $what"; else fail=$((fail + 1)); echo "not ok - $what"; fi
}

work="$(mktemp -d /tmp/nbd-vm-selftest.XXXXXX)"
trap 'rm -rf "$work"' EXIT
echo "marker $$" > "$work/marker"

# 1. One boot: cwd under /tmp (hidden by the guest's tmpfs, so it must come through its own
#    share), quoting of awkward arguments, --env, and a non-zero exit status carried back.
out="$(cd "$work" && "$RUN" --timeout 120 --env "SELFTEST_VAR=x y" -- \
  bash -c 'echo "cwd=$(pwd) $(cat marker)"; echo "env=$SELFTEST_VAR"; printf "arg=%s|" "$@"; echo; exit 7' _ 'a b' "c'd" '$HOME' 2>&1)"
status=$?
echo "$out" | sed 's/^/    /'
check "exit status 7 is carried back" test "$status" -eq 7
check "cwd is the same absolute path, under /tmp too" grep -qx "cwd=$work marker $$" <<<"$out"
check "--env reaches the command" grep -qx 'env=x y' <<<"$out"
check "arguments arrive unchanged" grep -qxF "arg=a b|arg=c'd|arg=\$HOME|" <<<"$out"

# 2. The guest watchdog stops a hung command, shows what was running, and exits 124.
out="$("$RUN" --timeout 60 -- sleep 600 2>&1)"
status=$?
echo "$out" | tail -n 5 | sed 's/^/    /'
check "guest timeout exits 124" test "$status" -eq 124
check "guest timeout is reported with the process list" grep -q 'GUEST TIMEOUT.*processes' <<<"$out"

# 3. The host kills qemu when the guest does not stop in time.
start=$SECONDS
mkdir -p "$work/tmpd"   # run.sh puts its control dir here, so its qemu is recognisable below
out="$(TMPDIR="$work/tmpd" NBD_VM_GUEST_TIMEOUT=600 "$RUN" --timeout 20 -- sleep 600 2>&1)"
status=$?
echo "$out" | tail -n 3 | sed 's/^/    /'
check "host timeout exits 124" test "$status" -eq 124
check "host timeout says so" grep -q 'vm-run: TIMEOUT: the VM ran longer than 20s' <<<"$out"
check "host timeout is prompt" test $((SECONDS - start)) -lt 40
no_qemu_left() { ! pgrep -f "path=$work/tmp[d]/" >/dev/null; }   # [d]: do not match pgrep's own caller
check "no qemu left behind" no_qemu_left
check "control dir removed" bash -c "[ -z \"\$(ls -A '$work/tmpd')\" ]"

echo "selftest: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
