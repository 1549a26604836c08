"""End to end: real pip, real venvs, the CLI driven through --python, and a non-editable
install of m3fuse that must find its shipped patch sets and lock."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

import realvllm
import samplesets
import venvs
from conftest import REPO, run_cli
from m3fuse.fingerprint import read_record, sha256_file


@pytest.fixture(scope="module")
def vllm_venv(tmp_path_factory):
    """vllm 0.26.0 installed with `pip install --no-deps` (as in an image), no torch needed."""
    py = venvs.make_venv(tmp_path_factory.mktemp("vllm-venv") / "venv")
    venvs.pip(py, "install", "--no-deps", "--no-index", str(realvllm.wheel_path("0.26.0")))
    return py


@pytest.fixture
def fresh_vllm_venv(vllm_venv, tmp_path):
    """Tests here change files; give each one pristine target files back."""
    sp = venvs.site_packages(vllm_venv)
    for rel in realvllm.BASE_MEMBERS:
        (sp / rel).write_bytes(realvllm.read_member("0.26.0", rel))
    return vllm_venv


def test_cli_through_python_on_a_pip_installed_vllm(fresh_vllm_venv, tmp_path):
    py = fresh_vllm_venv
    sp = venvs.site_packages(py)
    sets = samplesets.sample_set(tmp_path / "patches", "0.26.0")
    record = read_record(next(sp.glob("vllm-0.26.0.dist-info")))
    # pip compiled bytecode for the pristine files at install time.
    helper_pycs = list((sp / realvllm.HELPER).parent.glob("__pycache__/fused_allreduce_gemma_rms_norm.*.pyc"))
    assert helper_pycs

    r = run_cli("status", "--json", "--python", str(py), "--patches", str(sets))
    st = json.loads(r.stdout)
    assert r.returncode == 0 and st["vllm"]["version"] == "0.26.0"
    assert Path(st["vllm"]["root"]).resolve() == sp.resolve() and st["state"] == "pristine"

    r = run_cli("install", "--no-wheels", "--python", str(py), "--patches", str(sets))
    assert r.returncode == 0, r.stderr
    assert not any(p.exists() for p in helper_pycs)
    assert run_cli("verify", "--no-wheels", "--python", str(py), "--patches", str(sets)).returncode == 0
    r = run_cli("verify", "--no-wheels", "--expect", "pristine", "--python", str(py), "--patches", str(sets))
    assert r.returncode == 3 and "expected pristine" in r.stderr

    assert run_cli("revert", "--python", str(py), "--patches", str(sets)).returncode == 0
    for rel in (realvllm.HELPER, realvllm.MODEL):
        assert sha256_file(sp / rel) == record[rel]  # RECORD-identical
    r = run_cli("verify", "--no-wheels", "--expect", "pristine", "--python", str(py), "--patches", str(sets))
    assert r.returncode == 0, r.stdout + r.stderr


def test_python_without_vllm_is_an_environment_error(tmp_path):
    py = venvs.make_venv(tmp_path / "empty")
    r = run_cli("status", "--python", str(py))
    assert r.returncode == 5 and "vLLM is not installed" in r.stderr and str(tmp_path / "empty") in r.stderr


def test_non_editable_install_ships_patch_sets_and_lock(tmp_path, vllm_venv):
    src = tmp_path / "src"
    # Build from a copy of what git tracks: what a clean clone would build.
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
    for rel in filter(None, files.stdout.split("\0")):
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    py = venvs.make_venv(tmp_path / "tool-venv")
    venvs.pip(py, "install", str(src))
    shipped = json.loads(subprocess.run(
        [str(py), "-c", "import json, m3fuse.resources as r; print(json.dumps("
         "[str(r.patches_dir()), str(r.default_lock())]))"],
        capture_output=True, text=True, check=True, cwd=tmp_path).stdout)
    patches, lock = map(Path, shipped)
    assert "site-packages" in str(patches) and patches.is_dir() and lock.is_file()
    repo_sets = sorted(p.name for p in (REPO / "patches").iterdir() if (p / "manifest.toml").is_file())
    assert repo_sets, "the repo ships no patch set"
    assert sorted(p.name for p in patches.iterdir() if (p / "manifest.toml").is_file()) == repo_sets
    assert lock.read_bytes() == (REPO / "wheels.lock").read_bytes()
    for name in repo_sets:
        for f in (REPO / "patches" / name).iterdir():
            assert (patches / name / f.name).read_bytes() == f.read_bytes()
    # The installed tool, with no --patches, recognises a real vllm 0.26.0 by its shipped sets.
    m3fuse = tmp_path / "tool-venv" / "bin" / "m3fuse"
    r = subprocess.run([str(m3fuse), "status", "--json", "--python", str(vllm_venv)],
                       capture_output=True, text=True, cwd=tmp_path)
    st = json.loads(r.stdout)
    assert st["vllm"]["version"] == "0.26.0"
    if "vllm-0.26.0" in repo_sets:
        assert r.returncode == 0 and st["set"] == "vllm-0.26.0" and st["state"] == "pristine"
    else:  # until the real set lands, an unsupported report is the right answer
        assert st["state"] == "unsupported"


def test_relative_and_bare_python_paths_resolve_from_the_callers_directory(vllm_venv, tmp_path):
    """The interpreter is queried from "/" so that a vllm/ folder in the caller's directory
    cannot shadow the installed one; a relative --python must still mean what the user typed."""
    import os
    import subprocess
    import sys

    env_dir = vllm_venv.parent.parent
    rel = os.path.relpath(vllm_venv, env_dir.parent)
    (env_dir.parent / "vllm").mkdir(exist_ok=True)  # a decoy package dir in the caller's cwd
    r = subprocess.run([sys.executable, "-m", "m3fuse", "status", "--json", "--python", rel],
                       capture_output=True, text=True, cwd=env_dir.parent)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["vllm"]["version"] == "0.26.0"
    assert Path(st["vllm"]["root"]).resolve() == venvs.site_packages(vllm_venv).resolve()
    path = str(vllm_venv.parent) + os.pathsep + os.environ.get("PATH", "")
    r = subprocess.run([sys.executable, "-m", "m3fuse", "status", "--json", "--python", "python"],
                       capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PATH": path})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["vllm"]["version"] == "0.26.0"
    # The wheel half asks the same interpreter through the same path resolution.
    r = subprocess.run([sys.executable, "-c", "import sys; from m3fuse.wheels.check import target_tags; "
                        "print(target_tags(sys.argv[1])[0])", rel],
                       capture_output=True, text=True, cwd=env_dir.parent)
    assert r.returncode == 0 and r.stdout.startswith("cp3"), r.stderr
