#!/usr/bin/env bash
# `npm run bench`: boots the test VM once and runs test/bench/bench.ts in it (as root).
# BENCH_REPS (default 5) and BENCH_FIO_SECONDS (default 5) tune the run; BENCH_ONLY=reconnect
# (section names, comma-separated) runs only some sections; BENCH_SERVER_REPS (default 5) repeats
# the server comparison (medians), after BENCH_SERVER_WARM (default 12) seconds of warm-up per job;
# the comparison runs twice (BENCH_ONLY=server runs both): image on tmpfs, then on ext4.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d node_modules ] || npm ci --no-audit --no-fund --loglevel=error
exec test/vm/run.sh --timeout 3000 --env "BENCH_REPS=${BENCH_REPS:-5}" --env "BENCH_FIO_SECONDS=${BENCH_FIO_SECONDS:-5}" --env "BENCH_SERVER_WARM=${BENCH_SERVER_WARM:-12}" --env "BENCH_ONLY=${BENCH_ONLY:-}" --env "BENCH_SERVER_REPS=${BENCH_SERVER_REPS:-5}" \
  -- node --import tsx test/bench/bench.ts
