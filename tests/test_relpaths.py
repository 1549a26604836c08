"""Issue 16, part 2: every path option, and XDG_CACHE_HOME, may be relative to the directory
m3fuse is started in, also where m3fuse runs a child elsewhere (pip in a temp folder).

Real venv holding the real vllm 0.26.0, real pip, wheels from a loopback server and from a
--find-links folder; each command run from the folder the relative paths are relative to,
which is never the folder of the test process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import realvllm
import venvs
from conftest import REPO
from wheelkit import FaultServer, aiter_wheel, build_wheel, installed, lock_text

AITER_V = "0.1.15.post1+rocm7.2.rel"
FLY_V = "0.1.9.dev1+rel"

pytestmark = pytest.mark.slow


def m3fuse(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "XDG_CACHE_HOME"}
    full.update(env)
    return subprocess.run([sys.executable, "-m", "m3fuse", *args], capture_output=True, text=True, cwd=cwd,
                          env=full, timeout=600)


@pytest.fixture
def rig(tmp_path):
    """tmp/work: venv/ (vllm 0.26.0), wheels/ (the two pinned wheels); the test runs from tmp/work."""
    work = tmp_path / "work"
    py = venvs.make_venv(work / "venv")
    venvs.pip(py, "install", "--no-deps", "--no-index", str(realvllm.wheel_path("0.26.0")))
    fly = build_wheel(work / "wheels", "flydsl", FLY_V, {"flydsl/__init__.py": "X = 1\n"})
    aiter = aiter_wheel(work / "wheels", AITER_V)
    return work, py, fly, aiter


def test_install_verify_fetch_with_relative_paths_and_find_links(rig):
    work, py, fly, aiter = rig
    # Pins whose URLs no one serves: the wheels come from the relative --find-links folder.
    (work / "test.lock").write_text(lock_text([("flydsl", FLY_V, [(fly, f"https://127.0.0.1:9/{fly.name}")]),
                                               ("amd-aiter", AITER_V, [(aiter, f"https://127.0.0.1:9/{aiter.name}")])]))
    rel = ["--python", "venv/bin/python", "--lock", "test.lock"]
    r = m3fuse(work, "install", *rel, "--find-links", "wheels", "--cache-dir", "cache")
    assert r.returncode == 0, r.stdout + r.stderr
    assert installed(py, "flydsl") == FLY_V and installed(py, "amd-aiter") == AITER_V
    assert (work / "cache").is_dir() and not (Path.cwd() / "cache").exists()
    r = m3fuse(work, "verify", *rel, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    sp = os.path.relpath(venvs.site_packages(py), work)
    r = m3fuse(work, "status", "--vllm-root", sp, "--patches", os.path.relpath(REPO / "patches", work), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "patched", r.stderr
    r = m3fuse(work, "revert", "--vllm-root", sp)
    assert r.returncode == 0, r.stderr
    r = m3fuse(work, "fetch", "--dest", "fetched", "--lock", "test.lock", "--find-links", "wheels",
               "--cache-dir", "cache", "--python", "venv/bin/python")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (work / "fetched").iterdir()) == sorted([fly.name, aiter.name])
    assert all(Path(line).is_absolute() for line in r.stdout.split())


def test_a_relative_xdg_cache_home_reaches_the_pip_run(rig):
    work, py, fly, aiter = rig
    with FaultServer() as srv:
        (work / "test.lock").write_text(lock_text([srv.pin("flydsl", FLY_V, fly),
                                                   srv.pin("amd-aiter", AITER_V, aiter)]))
        shutil.rmtree(work / "wheels")  # nothing to fall back on: the downloads must be used
        r = m3fuse(work, "install", "--python", "venv/bin/python", "--lock", "test.lock", XDG_CACHE_HOME="xdg")
    assert r.returncode == 0, r.stdout + r.stderr
    assert installed(py, "amd-aiter") == AITER_V
    assert sorted(p.name for p in (work / "xdg" / "m3fuse").rglob("*.whl")) == sorted([fly.name, aiter.name])


def test_port_out_workdir_and_base_root_relative(pristine_trees, vllm_tree, tmp_path):
    root = vllm_tree("0.28.0")
    work = tmp_path / "work"
    (work / "bases").mkdir(parents=True)
    shutil.copytree(REPO / "patches" / "vllm-0.26.0", work / "bases" / "vllm-0.26.0")
    shutil.copytree(pristine_trees("0.26.0"), work / "base-0.26.0")
    shutil.copytree(root, work / "tree")
    args = ["--vllm-root", "tree", "--patches", "bases", "--base-root", "base-0.26.0", "--from", "vllm-0.26.0",
            "--name", "vllm-0.28.0-rel", "--out", "out", "--workdir", "wip", "--edit"]
    r = m3fuse(work, "port", *args)
    assert r.returncode == 0, r.stderr
    assert (work / "wip" / "merged" / realvllm.MODEL).is_file() and not (work / "out").exists()
    r = m3fuse(work, "port", "--resume", "wip", "--out", "out", "--patches", "bases")
    assert r.returncode == 0, r.stderr
    assert (work / "out" / "vllm-0.28.0-rel" / "manifest.toml").is_file()
    r = m3fuse(work, "install", "--no-wheels", "--vllm-root", "tree", "--patches", "out")
    assert r.returncode == 0, r.stderr
