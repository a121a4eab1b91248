#!/usr/bin/env bash
# `npm run bench`: boots the test VM once and runs test/bench/bench.ts in it (as root).
# BENCH_REPS (default 5) and BENCH_FIO_SECONDS (default 5) tune the run; BENCH_ONLY=reconnect
# (section names, comma-separated) runs only some sections; BENCH_SERVER_REPS (default 5) repeats
# the server comparison (medians), after BENCH_SERVER_WARM (default 12) seconds of warm-up per job;
# the comparison runs twice (BENCH_ONLY=server runs both): image on tmpfs, then on ext4.
# At the end docs/benchmarks.md gets the run's date, machine, versions and ratios (test/bench/report.ts).
# Then, on the host, the boot section (test/boot/bench.ts): kernel start to init on an NBD root with
# nbd-attach's initramfs-tools hook vs nbd-client's (BENCH_BOOT_REPS); BENCH_ONLY=boot runs only that.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d node_modules ] || npm ci --no-audit --no-fund --loglevel=error
# The guest's checkout is read-only: the results come back through the VM's control share
# (run.sh --out) and test/bench/report.ts rewrites docs/benchmarks.md here, on the host.
want() { [ -z "${BENCH_ONLY:-}" ] || [[ ",$BENCH_ONLY," == *",$1,"* ]]; }
status=0
if [ "${BENCH_ONLY:-}" != boot ]; then
OUT="$(mktemp -d "${TMPDIR:-/tmp}/nbd-bench.XXXXXX")"
trap 'rm -rf "$OUT"' EXIT
test/vm/run.sh --timeout 3000 --out "$OUT" --env "BENCH_REPS=${BENCH_REPS:-5}" --env "BENCH_FIO_SECONDS=${BENCH_FIO_SECONDS:-5}" --env "BENCH_SERVER_WARM=${BENCH_SERVER_WARM:-12}" --env "BENCH_ONLY=${BENCH_ONLY:-}" --env "BENCH_SERVER_REPS=${BENCH_SERVER_REPS:-5}" \
  -- node --import tsx test/bench/bench.ts || status=$?
if [ -f "$OUT/bench-results.json" ]; then
  node --import tsx test/bench/report.ts "$OUT/bench-results.json" docs/benchmarks.md || echo "bench: docs/benchmarks.md not written" >&2
else
  echo "bench: the run left no results: docs/benchmarks.md unchanged" >&2
fi
fi
if want boot; then node --import tsx test/boot/bench.ts || status=$?; fi
exit "$status"
