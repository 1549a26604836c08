"""Finding vLLM through --python: read off the disk for a plain venv, asked of the interpreter
otherwise, and the same answer both ways on every layout (venv, system-like Python, editable
install, include-system-site-packages, a .pth hook, relative and bare --python)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from m3fuse.errors import EnvironmentProblem
from m3fuse.target import _from_disk, locate, resolve_python
from wheelkit import build_wheel, make_system_python, make_venv

pytestmark = pytest.mark.slow

V = "0.26.0"


@pytest.fixture(scope="module")
def vllm_wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("w"), "vllm", V, {"vllm/__init__.py": "", "vllm/envs.py": "X = 1\n"})


def pip_install(py: Path, *args: str) -> None:
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--disable-pip-version-check", *args], check=True)


def same_both_ways(python: str, *, from_disk: bool, cwd: Path | None = None) -> None:
    """locate() gives what asking the interpreter gives, and took the path it should."""
    old = os.getcwd()
    os.chdir(cwd or old)
    try:
        fast, asked = locate(python=python), locate(python=python, ask=True)
        assert (_from_disk(resolve_python(python)) is not None) == from_disk
    finally:
        os.chdir(old)
    assert (Path(fast.root).resolve(), fast.version, fast.python, fast.dist_info) == \
        (Path(asked.root).resolve(), asked.version, asked.python, asked.dist_info)


def test_plain_venv_is_read_off_the_disk(tmp_path, vllm_wheel):
    py = make_venv(tmp_path / "venv")
    pip_install(py, str(vllm_wheel))
    same_both_ways(str(py), from_disk=True)
    t = locate(python=str(py))
    assert t.version == V and t.root.name == "site-packages" and t.python == str(py)


def test_relative_and_bare_python(tmp_path, vllm_wheel):
    py = make_venv(tmp_path / "venv")
    pip_install(py, str(vllm_wheel))
    (tmp_path / "vllm").mkdir()  # a decoy in the caller's directory must not count
    same_both_ways("venv/bin/python", from_disk=True, cwd=tmp_path)
    old = os.environ["PATH"]
    os.environ["PATH"] = f"{py.parent}{os.pathsep}{old}"
    try:
        same_both_ways("python", from_disk=True, cwd=tmp_path)
        assert locate(python="python").python == str(py)
    finally:
        os.environ["PATH"] = old


def test_system_like_python_is_asked(tmp_path, vllm_wheel):
    py = make_system_python(tmp_path / "usr", externally_managed=False)
    pip_install(py, str(vllm_wheel))
    assert _from_disk(str(py)) is None
    same_both_ways(str(py), from_disk=False)
    assert locate(python=str(py)).version == V


def test_editable_install_is_asked(tmp_path):
    src = tmp_path / "src"
    (src / "vllm").mkdir(parents=True)
    (src / "vllm" / "__init__.py").write_text("")
    editable = build_wheel(tmp_path / "w", "vllm", "0.27.0.dev1", {"__editable__.vllm-0.27.0.dev1.pth": f"{src}\n"})
    py = make_venv(tmp_path / "venv")
    pip_install(py, str(editable))
    assert _from_disk(str(py)) is None
    same_both_ways(str(py), from_disk=False)
    t = locate(python=str(py))
    assert t.root == src and t.version == "0.27.0.dev1"


def test_a_pth_naming_vllm_or_system_site_packages_is_asked(tmp_path, vllm_wheel):
    py = make_venv(tmp_path / "venv")
    pip_install(py, str(vllm_wheel))
    site = next((tmp_path / "venv" / "lib").glob("python*/site-packages"))
    hook = site / "zz_hook.pth"
    hook.write_text("# points vllm elsewhere\n/nonexistent/vllm-src\n")
    assert _from_disk(str(py)) is None
    same_both_ways(str(py), from_disk=False)
    hook.unlink()
    cfg = tmp_path / "venv" / "pyvenv.cfg"
    cfg.write_text(cfg.read_text().replace("include-system-site-packages = false", "include-system-site-packages = true"))
    assert _from_disk(str(py)) is None
    same_both_ways(str(py), from_disk=False)


def test_pythonpath_means_asking(tmp_path, vllm_wheel, monkeypatch):
    py = make_venv(tmp_path / "venv")
    pip_install(py, str(vllm_wheel))
    other = tmp_path / "other"
    (other / "vllm").mkdir(parents=True)
    (other / "vllm" / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(other))
    assert _from_disk(str(py)) is None
    assert locate(python=str(py)).root == other  # PYTHONPATH wins, as it does for the interpreter


def test_venv_without_vllm_and_broken_python_still_fail_cleanly(tmp_path):
    py = make_venv(tmp_path / "venv")
    with pytest.raises(EnvironmentProblem, match="vLLM is not installed"):
        locate(python=str(py))
    (tmp_path / "venv" / "bin" / "python").unlink()
    (tmp_path / "venv" / "bin" / "python").symlink_to(tmp_path / "gone")
    with pytest.raises(EnvironmentProblem, match="does not exist"):
        locate(python=str(py))
