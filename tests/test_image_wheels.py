"""tools/image-wheels.sh and the `m3fuse fetch` options it uses (issue 26): the Python it is
given is checked, and pins the image's vLLM release cannot run M3 with are not downloaded.
Real wheels on disk behind file:// pins and a real podman-free run of the script; no network."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, run_cli
from wheelkit import aiter_build, build_wheel, lock_text, needed_modules

SCRIPT = REPO / "tools" / "image-wheels.sh"
NEWEST = "vllm-0.34.0"


def script(*args: str, **env: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def local_lock(tmp_path, *, aiter_version: str, fly_tag: str = "py3-none-any"):
    fly = build_wheel(tmp_path / "src", "flydsl", "0.1.9", tag=fly_tag)
    aiter = aiter_build(tmp_path / "src", aiter_version, needed_modules(NEWEST))
    lock = tmp_path / "local.lock"
    lock.write_text(lock_text([("flydsl", "0.1.9", [(fly, fly.as_uri())]),
                               ("amd-aiter", aiter_version, [(aiter, aiter.as_uri())])]))
    return lock, fly, aiter


def test_the_script_refuses_a_bad_python_version_and_a_python_without_m3fuse(tmp_path):
    r = script("3.x", PY=sys.executable, WHEELS=str(tmp_path / "w"))
    assert r.returncode == 2 and "PYTHON_VERSION must be the image's CPython as X.Y" in r.stderr
    assert r.stderr.rstrip().splitlines()[-1].startswith("hint: ") and not (tmp_path / "w").exists()
    r = script("3.12", PY="/bin/true", WHEELS=str(tmp_path / "w"))  # runs, but is no Python with m3fuse
    assert r.returncode == 2 and "cannot import m3fuse" in r.stderr and "-m venv .venv" in r.stderr
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    r = script("3.12", PY=str(venv), WHEELS=str(tmp_path / "w"))  # a venv folder: its bin/python, no m3fuse
    assert r.returncode == 2 and f"PY={venv}/bin/python cannot import m3fuse" in r.stderr


def test_fetch_for_a_release_leaves_out_the_pin_it_cannot_run(tmp_path):
    # A pin below the newest release's AITER floor is never installed there: not fetched.
    old, fly, aiter = local_lock(tmp_path / "old", aiter_version="0.1.15")
    dest = tmp_path / "dest"
    r = run_cli("fetch", "--all", "--python-version", "3.12", "--for-vllm", "0.34.0", "--lock", str(old),
                "--dest", str(dest), "--cache-dir", str(tmp_path / "cache"))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in dest.iterdir()) == [fly.name]
    assert "skipped amd-aiter 0.1.15: vLLM 0.34.0 cannot run with it" in r.stderr
    # At the floor, both are fetched; without --for-vllm every pin is.
    new, fly2, aiter2 = local_lock(tmp_path / "new", aiter_version="0.1.21.post2")
    r = run_cli("fetch", "--all", "--for-vllm", "0.34.0", "--lock", str(new), "--dest", str(tmp_path / "d2"),
                "--cache-dir", str(tmp_path / "cache"))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "d2").iterdir()) == sorted([fly2.name, aiter2.name])


def test_fetch_refuses_a_lock_with_no_wheel_for_the_images_python(tmp_path):
    lock, _, _ = local_lock(tmp_path, aiter_version="0.1.21.post2", fly_tag="cp312-cp312-manylinux_2_28_x86_64")
    dest = tmp_path / "dest"
    r = run_cli("fetch", "--all", "--python-version", "3.11", "--lock", str(lock), "--dest", str(dest))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "the lock pins no wheel that Python 3.11 can install for flydsl" in r.stderr
    assert "flydsl: cp312-cp312" in r.stderr and r.stderr.rstrip().splitlines()[-1].startswith("hint: ")
    assert not dest.exists()
    r = run_cli("fetch", "--python-version", "3.12", "--lock", str(lock), "--dest", str(dest))
    assert r.returncode == 2 and "--python-version goes with --all" in r.stderr
    r = run_cli("fetch", "--all", "--for-vllm", "0.9.0", "--lock", str(lock), "--dest", str(dest))
    assert r.returncode == 2 and "no shipped patch set covers that release" in r.stderr


def test_python_may_name_a_venv_folder(tmp_path, vllm_tree):
    tree = vllm_tree("0.26.0")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    r = run_cli("status", "--python", str(venv), "--vllm-root", str(tree), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["vllm"]["python"] == str(venv / "bin" / "python")
    r = run_cli("status", "--python", str(tmp_path), "--vllm-root", str(tree))
    assert r.returncode == 5 and f"--python {tmp_path} is a folder, not a Python interpreter" in r.stderr
    assert r.stderr.rstrip().splitlines()[-1] == "hint: give the interpreter's file, e.g. /path/to/venv/bin/python"
