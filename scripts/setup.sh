#!/usr/bin/env bash
# Installs the Debian packages ringattn needs that this machine lacks (run as root, or with
# sudo available). Safe to run again: it installs nothing when everything is present.
set -euo pipefail

packages=(
  cmake g++ make pkg-config
  libopenmpi-dev openmpi-bin          # MPI (the CPU ring, mpirun)
  libopenblas-dev                     # CBLAS for the CPU kernel
  libboost-program-options-dev        # the ringattn program's flags
  libgtest-dev libgmock-dev           # tests
  python3-dev python3-pybind11        # the Python package (ringattn._C) for /usr/bin/python3
  python3-torch python3-numpy         # ringattn.torch, its tests and examples/train_lm.py
  python3-pytest python3-matplotlib   # Python tests (ctest), the training plot
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  sudo_cmd=()
  [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get update -q
  "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "setup: all packages present"
fi
