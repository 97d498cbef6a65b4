#!/usr/bin/env bash
# The main job: install what is missing, build, and run a long-context prefill through the
# ring on 2 ranks (sink + sliding-window attention). Extra arguments go to `ringattn infer`,
# e.g. bash scripts/run.sh --seq-len 1M
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
ranks=${RINGATTN_RANKS:-2}
exec mpirun -np "$ranks" --oversubscribe --bind-to none --allow-run-as-root ./build/bin/ringattn infer "$@"
