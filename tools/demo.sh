#!/usr/bin/env bash
# The main job on a real vLLM release: m3fuse installed as users install it (non-editable, in
# its own venv), vllm 0.26.0 installed into a second venv exactly as the wheel ships it, then
# install -> verify -> status -> revert -> verify --expect pristine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DEMO=.demo
rm -rf "$DEMO"
mkdir -p "$DEMO"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

step "venv for m3fuse itself (pip install ., not editable)"
run "$PY" -m venv "$DEMO/tool"
run "$DEMO/tool/bin/pip" install -q --disable-pip-version-check .
M3FUSE="$DEMO/tool/bin/m3fuse"

step "venv with the real vllm 0.26.0 release wheel (--no-deps: no torch or GPU needed to patch it)"
run "$PY" -m venv "$DEMO/vllm"
run "$DEMO/vllm/bin/pip" install -q --disable-pip-version-check --no-deps --only-binary=:all: vllm==0.26.0
VPY="$DEMO/vllm/bin/python"

step "status before"
run "$M3FUSE" status --python "$VPY"

step "install --no-wheels (the pinned AITER/FlyDSL wheels are ROCm/cp312 builds; this machine has no GPU)"
run "$M3FUSE" install --no-wheels --python "$VPY"

step "verify (what CI runs)"
run "$M3FUSE" verify --no-wheels --python "$VPY"

step "status after"
run "$M3FUSE" status --python "$VPY"

step "install again: idempotent"
run "$M3FUSE" install --no-wheels --python "$VPY"

step "revert (control runs)"
run "$M3FUSE" revert --python "$VPY"

step "verify --expect pristine"
run "$M3FUSE" verify --no-wheels --expect pristine --python "$VPY"

step "a drifted file is refused (one byte changed), nothing written"
MODEL=$("$VPY" -c 'import importlib.util,os;print(os.path.join(importlib.util.find_spec("vllm").submodule_search_locations[0],"models/minimax_m3/amd/model.py"))')
printf '\n# local edit\n' >> "$MODEL"
set +e
"$M3FUSE" install --no-wheels --python "$VPY"
code=$?
set -e
echo "exit code: $code (3 = source drift)"
[ "$code" -eq 3 ]
printf '\ndemo finished: install, verify, status, revert and drift refusal all behaved.\n'
