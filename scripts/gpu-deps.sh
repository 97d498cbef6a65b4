#!/usr/bin/env bash
# Fetches (does not install) the Debian 12 packages a GPU machine lacks to build ringattn:
# OpenMPI, OpenBLAS, Boost.program_options and GoogleTest, as amd64 .deb files in .gpu-deps/.
# The GPU image has nvcc, cmake, ninja and python3 but no network, so run this first on a
# machine with apt (any Debian 12, any processor), then carry .gpu-deps to the GPU machine
# (it is ignored by git); scripts/gpu-check.sh unpacks there only what that machine misses,
# into /tmp/ringattn-deps, never into /.
#
#   bash scripts/gpu-deps.sh          # then: device run with carry [".gpu-deps"]
set -euo pipefail
cd "$(dirname "$0")/.."

dest=.gpu-deps
# The build needs these; the rest of each library's runtime closure on an image that has the
# usual base system (libc, libstdc++, zlib, libudev) but none of these libraries.
packages=(
  # MPI: headers and libmpi (libopenmpi-dev, libopenmpi3), orted/mpirun for singleton runs,
  # help texts and the MCA defaults (openmpi-common), and libmpi's own library closure
  # (ldd libmpi.so: open-rte/open-pal come with libopenmpi3; hwloc, libevent; PMIx for the
  # pmix component a singleton loads, with its munge dependency).
  libopenmpi-dev libopenmpi3 openmpi-bin openmpi-common
  libhwloc15 libevent-core-2.1-7 libevent-pthreads-2.1-7 libpmix2 libmunge2
  # CBLAS: cblas.h and libopenblas.so (the -pthread flavour FindOpenBLAS looks for first).
  libopenblas-dev libopenblas-pthread-dev libopenblas0-pthread libopenblas0 libgfortran5
  libquadmath0
  # Boost.program_options: library, CMake config and the Boost headers it includes.
  libboost-program-options-dev libboost-program-options1.74-dev libboost-program-options1.74.0
  libboost1.74-dev
  # GoogleTest/GoogleMock: headers, static libraries and the GTest CMake config.
  libgtest-dev libgmock-dev
)

# A private amd64 package list, so this works the same on an arm64 machine and leaves the
# system's lists alone. Refreshed once a day.
lists=/tmp/ringattn-apt-amd64
apt_opts=(-o APT::Architecture=amd64 -o APT::Architectures=amd64 -o "Dir::State::Lists=$lists"
          -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache= -q)
mkdir -p "$lists/partial"
if [[ -z $(find "$lists" -maxdepth 1 -name '*_Packages*' -mmin -1440 -print -quit) ]]; then
  echo "gpu-deps: apt-get update (amd64 lists in $lists)"
  apt-get "${apt_opts[@]}" update >/dev/null
fi

rm -rf "$dest.tmp"
mkdir -p "$dest.tmp"
# apt's download sandbox user (_apt) cannot write into a root-owned work tree: let it.
chmod 777 "$dest.tmp"
(cd "$dest.tmp" && apt-get "${apt_opts[@]}" download "${packages[@]}")
chmod 755 "$dest.tmp"
rm -rf "$dest"
mv "$dest.tmp" "$dest"

grep -qx '/.gpu-deps/' .gitignore 2>/dev/null || echo '/.gpu-deps/' >>.gitignore

count=$(ls "$dest"/*.deb | wc -l)
bytes=$(cat "$dest"/*.deb | wc -c)
echo "gpu-deps: $count packages in $dest/, $(awk -v b="$bytes" 'BEGIN{printf "%.1f MiB", b/1048576}')"
echo "gpu-deps: device run with carry [\"$dest\"], then: bash scripts/gpu-check.sh"
