from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess of the test interpreter (exit codes and output as users see them)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "m3fuse", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def pristine_trees(tmp_path_factory):
    """One extracted tree per release per session; tests copy it (extraction reads a 300 MB zip)."""
    import realvllm

    made: dict[str, Path] = {}

    def get(version: str) -> Path:
        if version not in made:
            made[version] = realvllm.extract(version, tmp_path_factory.mktemp(f"vllm-{version}") / "site-packages")
        return made[version]

    return get


@pytest.fixture
def vllm_tree(pristine_trees, tmp_path):
    """A private copy of a pristine release tree: vllm_tree("0.26.0") -> its root."""
    import shutil

    def make(version: str) -> Path:
        dest = tmp_path / f"sp-{version}"
        shutil.copytree(pristine_trees(version), dest)
        return dest

    return make


def snapshot(root: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file's bytes, mode and inode below root: the 'nothing was written' witness."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            out[str(p.relative_to(root))] = (p.read_bytes(), st.st_mode, st.st_ino)
    return out
