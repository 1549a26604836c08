#!/usr/bin/env bash
# Fills the Containerfile's wheels/ folder with every wheel the image build installs, so the
# build needs no network: m3fuse (built from this checkout), its dependencies for the image's
# Python, and the wheels the lock pins (fetched and hash-checked by `m3fuse fetch`).
#   tools/image-wheels.sh PYTHON_VERSION [m3fuse fetch options, e.g. --lock FILE]
# PY: a Python with m3fuse installed; it runs pip and `m3fuse fetch` (default python3).
# WHEELS: the folder (default wheels/ beside the Containerfile). PLATFORM: the image's wheel
# platform (default manylinux_2_28_x86_64, which pip widens to the older manylinux tags).
set -euo pipefail
pyver=${1:?usage: tools/image-wheels.sh PYTHON_VERSION (of the image, e.g. 3.12) [m3fuse fetch options]}
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-python3}
WHEELS=${WHEELS:-$repo/wheels}
PLATFORM=${PLATFORM:-manylinux_2_28_x86_64}
mkdir -p "$WHEELS"
rm -f "$WHEELS"/m3fuse-*.whl
"$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir "$WHEELS" "$repo"
m3fuse_wheel=$(ls "$WHEELS"/m3fuse-*.whl)
"$PY" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --python-version "$pyver" \
  --implementation cp --platform "$PLATFORM" --dest "$WHEELS" "$m3fuse_wheel"
"$PY" -m m3fuse fetch --all --dest "$WHEELS" "$@"
