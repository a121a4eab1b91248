#!/usr/bin/env bash
# Host-side entry point for the real-kernel tests: boots the test VM once (test/vm/run.sh) and
# runs every test/kernel/*.test.ts in it, one file at a time, as root.
#   test/kernel/run.sh [--timeout SECONDS] [--mem MB] [--shard K/N [--preload S1,...,SN]] [--list] [TEST_FILE...]
# --shard K/N runs the K-th of N shares of the files (several VMs at once: test/run-all.sh), split
# by the seconds in test/kernel/durations.txt, longest first, each to the share with the least so
# far; --preload gives each share seconds it already has (work that follows it in its lane).
# --list prints the files it would run, and boots nothing.
# Exits with the test runner's status; 124 when the VM timed out, 125 when it broke.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

# The whole kernel suite takes ~26 min in one VM under software emulation; a VM gets 40 min at most.
VM_ARGS=(--timeout 2400)
SHARD=""
PRELOAD=""
LIST=0
while [ $# -gt 0 ]; do
  case "$1" in
    --shard) SHARD="${2:?--shard needs K/N}"; shift 2 ;;
    --preload) PRELOAD="${2:?--preload needs seconds per share}"; shift 2 ;;
    --list) LIST=1; shift ;;
    --timeout|--mem) VM_ARGS+=("$1" "${2:?$1 needs a value}"); shift 2 ;;
    --timeout=*|--mem=*) VM_ARGS+=("$1"); shift ;;
    *) break ;;
  esac
done
if [ $# -gt 0 ]; then FILES=("$@"); else FILES=(test/kernel/*.test.ts); fi
[ -e "${FILES[0]}" ] || { echo "kernel tests: no test files found" >&2; exit 1; }
if [ -n "$SHARD" ]; then
  [[ "$SHARD" =~ ^([0-9]+)/([0-9]+)$ ]] && [ "${BASH_REMATCH[1]}" -ge 1 ] && [ "${BASH_REMATCH[1]}" -le "${BASH_REMATCH[2]}" ] \
    || { echo "kernel tests: --shard wants K/N with 1 <= K <= N, not '$SHARD'" >&2; exit 2; }
  mapfile -t FILES < <(printf '%s\n' "${FILES[@]}" | awk -v k="${BASH_REMATCH[1]}" -v n="${BASH_REMATCH[2]}" -v pre="$PRELOAD" '
    NR == FNR { if ($0 !~ /^#/ && NF == 2) w[$2] = $1; next }
    { f[++m] = $0; b = $0; sub(/.*\//, "", b); s[m] = (b in w) ? w[b] : 60 }
    END {
      split(pre, p, ",")
      for (i = 1; i <= n; i++) load[i] = p[i] + 0
      for (done = 0; done < m; done++) {            # longest first (ties: the order given)
        best = 0
        for (i = 1; i <= m; i++) if (!(i in taken) && (best == 0 || s[i] > s[best])) best = i
        taken[best] = 1
        to = 1
        for (i = 2; i <= n; i++) if (load[i] < load[to]) to = i
        load[to] += s[best]
        if (to == k) print f[best]
      }
    }' test/kernel/durations.txt -)
  [ "${#FILES[@]}" -gt 0 ] || { echo "kernel tests: shard $SHARD has no files" >&2; exit 0; }
fi
if [ "$LIST" -eq 1 ]; then printf '%s\n' "${FILES[@]}"; exit 0; fi
[ -z "$SHARD" ] || echo "kernel tests: shard $SHARD: ${FILES[*]}"

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
