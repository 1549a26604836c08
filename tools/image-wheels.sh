#!/usr/bin/env bash
# Fills the Containerfile's wheels/ folder with every wheel the image build installs, so the
# build needs no network: m3fuse (built from this checkout), its dependencies for the image's
# Python, and the wheels of the lock that the image's install can use (fetched and
# hash-checked by `m3fuse fetch`).
#   tools/image-wheels.sh [PYTHON_VERSION] [m3fuse fetch options, e.g. --lock FILE]
# PYTHON_VERSION: the image's Python, X.Y (default $IMAGE_PYTHON, else 3.12: the ROCm images').
# PY: a Python with m3fuse installed; it runs pip and `m3fuse fetch` (default .venv/bin/python
# of this checkout, else python3). WHEELS: the folder (default wheels/ beside the
# Containerfile). PLATFORM: the image's wheel platform (default manylinux_2_28_x86_64, which
# pip widens to the older manylinux tags). VLLM: the image's vLLM release (default: the tag of
# the Containerfile's BASE_IMAGE, vX.Y.Z); pins that release cannot run M3 with (the AITER pin
# on vLLM 0.30+) are not downloaded: the image's install keeps the image's own newer AITER and
# never installs them. Which AITER the image holds cannot be known here (the image is not
# pulled on this machine); the build's `m3fuse install` judges it and refuses if it falls short.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
die() { echo "image-wheels.sh: $1" >&2; echo "hint: $2" >&2; exit 2; }
pyver=${IMAGE_PYTHON:-3.12}
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then pyver=$1; shift; fi
[[ $pyver =~ ^3\.[0-9]{1,2}$ ]] ||
  die "PYTHON_VERSION must be the image's CPython as X.Y (e.g. 3.12); got: $pyver" \
      "ask the image: podman run --rm IMAGE python3 --version"
if [ -z "${PY:-}" ]; then
  PY=python3
  [ -x "$repo/.venv/bin/python" ] && PY=$repo/.venv/bin/python
fi
if [ -d "$PY" ]; then
  [ -x "$PY/bin/python" ] || die "PY=$PY is a folder without bin/python" "set PY to a Python with m3fuse installed"
  PY=$PY/bin/python
fi
[ "$("$PY" -c 'import m3fuse, pip; print("m3fuse-ok")' 2>/dev/null)" = m3fuse-ok ] ||
  die "PY=$PY cannot import m3fuse and pip" \
      "python3 -m venv .venv && .venv/bin/pip install . (in this checkout), then PY=.venv/bin/python"
WHEELS=${WHEELS:-$repo/wheels}
PLATFORM=${PLATFORM:-manylinux_2_28_x86_64}
if [ -z "${VLLM:-}" ]; then
  VLLM=$(sed -n 's/^ARG BASE_IMAGE=.*:v\([0-9][0-9.]*\)$/\1/p' "$repo/Containerfile")
fi
for_vllm=()
if [ -n "$VLLM" ]; then
  for_vllm=(--for-vllm "$VLLM")
else
  echo "image-wheels.sh: the image's vLLM release is not known (set VLLM=X.Y.Z): fetching every pin" >&2
fi
mkdir -p "$WHEELS"
rm -f "$WHEELS"/m3fuse-*.whl
"$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir "$WHEELS" "$repo"
m3fuse_wheel=$(ls "$WHEELS"/m3fuse-*.whl)
"$PY" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --python-version "$pyver" \
  --implementation cp --platform "$PLATFORM" --dest "$WHEELS" "$m3fuse_wheel"
"$PY" -m m3fuse fetch --all --python-version "$pyver" "${for_vllm[@]}" --dest "$WHEELS" "$@"
