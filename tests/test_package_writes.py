"""Issue 16, part 4: `lock add`, `lock check --write-sizes` and `port` never write inside an
installed m3fuse (site-packages' m3fuse/_data: lost on reinstall); from a checkout they write
its files and name them. `lock add` warns on a file:// pin and on a distribution the lock does
not pin yet.

A real non-editable install of a clean copy of the repository into a real venv, and that copy
run as a checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import venvs
from conftest import REPO
from wheelkit import build_wheel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clean_copy(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("checkout") / "m3fuse"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
    for rel in filter(None, files.stdout.split("\0")):
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    return src


@pytest.fixture(scope="module")
def installed_tool(clean_copy, tmp_path_factory) -> tuple[Path, Path]:
    """(the venv's m3fuse script, its _data folder)."""
    py = venvs.make_venv(tmp_path_factory.mktemp("tool") / "venv")
    venvs.pip(py, "install", str(clean_copy))
    data = subprocess.run([str(py), "-c", "import m3fuse.resources as r; print(r.default_lock().parent)"],
                          capture_output=True, text=True, check=True, cwd="/").stdout.strip()
    assert data.endswith("_data") and "site-packages" in data
    return py.parent / "m3fuse", Path(data)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_an_installed_m3fuse_refuses_to_edit_its_own_data(installed_tool, tmp_path):
    m3fuse, data = installed_tool
    before = tree_bytes(data)
    whl = build_wheel(tmp_path / "w", "amd-aiter", "0.1.99")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(m3fuse), *args], capture_output=True, text=True, cwd=tmp_path, timeout=300)

    for args in (["lock", "add", str(whl)], ["lock", "add", str(whl), "--lock", str(data / "wheels.lock")],
                 ["lock", "check", "--write-sizes"],
                 ["port", "--from", "vllm-0.26.0", "--name", "vllm-9.9.9", "--vllm-root", str(tmp_path)],
                 ["port", "--from", "vllm-0.26.0", "--name", "vllm-9.9.9", "--vllm-root", str(tmp_path),
                  "--patches", str(data / "patches")]):
        r = run(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "inside the installed m3fuse package" in r.stderr and "Traceback" not in r.stderr, args
        assert ("--out DIR" if args[0] == "port" else "--lock FILE") in r.stderr
    assert tree_bytes(data) == before

    # A lock of the user's own is edited, and the file:// pin is pointed out.
    mine = tmp_path / "mine.lock"
    shutil.copy(data / "wheels.lock", mine)
    r = run("lock", "add", str(whl), "--lock", "mine.lock")
    assert r.returncode == 0, r.stderr
    assert f"in {mine}" in r.stdout and "0.1.99" in mine.read_text()
    assert "file:// URL" in r.stderr and "--url" in r.stderr and "pins no" not in r.stderr
    assert tree_bytes(data) == before


def test_a_checkout_writes_its_own_files_and_names_them(clean_copy, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(clean_copy)}
    probe = subprocess.run([sys.executable, "-c", "import m3fuse.resources as r; print(r.default_lock())"],
                           capture_output=True, text=True, env=env, cwd=work, check=True)
    lock = Path(probe.stdout.strip())
    assert lock == clean_copy / "wheels.lock"
    whl = build_wheel(tmp_path / "w", "unrelated-thing", "1.0")
    r = subprocess.run([sys.executable, "-m", "m3fuse", "lock", "add", str(whl), "--url",
                        f"https://example.invalid/{whl.name}"], capture_output=True, text=True, env=env, cwd=work)
    assert r.returncode == 0, r.stderr
    assert f"in {lock}" in r.stdout and "unrelated-thing" in lock.read_text()
    assert "pins no unrelated-thing yet" in r.stderr and "file://" not in r.stderr
    assert "unrelated-thing" in [p["name"] for p in tomllib.loads(lock.read_text())["packages"]]
