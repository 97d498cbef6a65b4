#!/usr/bin/env bash
# Configures and builds ringattn into ./build (Release). Extra arguments go to cmake, e.g.
#   bash scripts/build.sh -DRINGATTN_CUDA=OFF
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release "$@"
cmake --build build -j"$(nproc)"
