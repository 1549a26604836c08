#!/usr/bin/env bash
# The container tools the image test (tests/test_image.py) runs, installed if missing, so
# `make test` sets up a fresh Debian/Ubuntu machine by itself. Needs root (or sudo) for apt.
set -euo pipefail
tools=(podman buildah runc mmdebstrap newuidmap)
missing=()
for t in "${tools[@]}"; do command -v "$t" >/dev/null || missing+=("$t"); done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "container-tools: installing podman buildah runc mmdebstrap uidmap (missing: ${missing[*]})" >&2
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq podman buildah runc mmdebstrap uidmap >/dev/null
