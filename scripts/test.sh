#!/usr/bin/env bash
# Every test: install what is missing, build, and run the whole ctest suite (unit, MPI with
# 1-4 ranks, and GPU tests, which skip without a device).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
ctest --test-dir build --output-on-failure -j"$(nproc)" --timeout 600
