#!/usr/bin/env bash
# Installs what mpar needs on a Debian machine: OpenCL headers and the ICD
# loader, PoCL (the CPU OpenCL used for tests), CLBlast, cmocka, zlib and the
# data sets used by the examples. As root it runs apt-get; otherwise it prints
# the exact command and exits non-zero so that `make` stops with a clear hint.
set -eu
pkgs="opencl-headers ocl-icd-opencl-dev pocl-opencl-icd libclblast-dev libcmocka-dev libblis-serial-dev zlib1g-dev pkg-config cmake valgrind dataset-fashion-mnist bible-kjv-text openmpi-bin libopenmpi-dev"
missing=""
for p in $pkgs; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "mpar: missing Debian packages:$missing" >&2
  echo "mpar: install them with: sudo apt-get install -y$missing" >&2
  exit 1
fi
echo "mpar: installing:$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq || true
apt-get install -y -qq --no-install-recommends $missing
