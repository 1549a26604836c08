"""The vllm.general_plugins guard, run by real vLLM releases' own plugin loader.

The loader tree holds the release's real `vllm/plugins/__init__.py`, `vllm/envs.py`,
`vllm/logger.py` and `vllm/logging_utils/` (so the line goes through vLLM's own logging set-up)
and the two patch targets; only `vllm/__init__.py` is a stub, because the real one imports
`vllm.env_override`, hence torch and most of vLLM. m3fuse is `pip install`ed (not editable)
into a real venv, so the entry point is the one pyproject.toml declares.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import realvllm
import venvs
from conftest import REPO, run_cli

pytestmark = pytest.mark.slow

LOADER = ("vllm/plugins/__init__.py", "vllm/envs.py", "vllm/logger.py")

DRIVER = r"""
import os, sys
import vllm.logger  # configures vLLM's logging on import up to 0.30.0
if os.environ.get("CONFIGURE_LOGGING"):
    # 0.31.0+: what configure_logging() does in the engine core and workers before plugins load
    vllm.logger._configure_vllm_root_logger()
from vllm.plugins import load_general_plugins
load_general_plugins()
print("STARTED torch=%s" % ("torch" in sys.modules), flush=True)
if os.environ.get("FORK_CHILD"):
    pid = os.fork()
    if pid == 0:
        load_general_plugins()  # what a worker forked from this process does
        print("CHILD RAN", flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
"""


@pytest.fixture(scope="module")
def guard_venv(tmp_path_factory):
    """A real venv with m3fuse pip-installed from a copy of this checkout's files."""
    base = tmp_path_factory.mktemp("guard-venv")
    src = base / "src"
    for rel in ("m3fuse", "patches"):
        shutil.copytree(REPO / rel, src / rel, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for rel in ("pyproject.toml", "README.md", "wheels.lock"):
        shutil.copy2(REPO / rel, src / rel)
    py = venvs.make_venv(base / "venv")
    venvs.pip(py, "install", str(src))
    return py


def loader_tree(vllm_tree, version: str) -> Path:
    root = vllm_tree(version)
    with zipfile.ZipFile(realvllm.wheel_path(version)) as zf:
        members = list(LOADER) + [n for n in zf.namelist() if n.startswith("vllm/logging_utils/")
                                  and n.endswith(".py")]
        for m in members:
            (root / m).parent.mkdir(parents=True, exist_ok=True)
            (root / m).write_bytes(zf.read(m))
    (root / "vllm" / "__init__.py").write_text("# stub: the real one imports torch via vllm.env_override\n")
    return root


def start(py: Path, root: Path, guard: str | None = None, *, configured: bool = True,
          **env: str) -> subprocess.CompletedProcess:
    """One vLLM-like process start: the release's loader runs every general plugin.
    `configured`: vLLM's logging is set up before the plugins load (engine core, workers;
    every process up to 0.30.0)."""
    full = {k: v for k, v in os.environ.items()
            if k not in ("M3FUSE_GUARD", "VLLM_PLUGINS", "PYTHONPATH", "CONFIGURE_LOGGING")}
    full.update(PYTHONPATH=str(root), VLLM_LOGGING_LEVEL="INFO", **env)
    if configured:
        full["CONFIGURE_LOGGING"] = "1"
    if guard is not None:
        full["M3FUSE_GUARD"] = guard
    return subprocess.run([str(py), "-c", DRIVER], capture_output=True, text=True, env=full, cwd=root.parent,
                          timeout=120)


def guard_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if "m3fuse guard:" in line]


@pytest.mark.parametrize("version", ["0.26.0", "0.33.0"])
def test_the_release_loader_runs_the_guard_in_each_state(guard_venv, vllm_tree, version):
    root = loader_tree(vllm_tree, version)
    where = f"vllm {version} at {root.resolve()}"

    r = start(guard_venv, root)
    assert r.returncode == 0 and "STARTED torch=False" in r.stdout, r.stdout + r.stderr
    (line,) = guard_lines(r)
    assert f"set vllm-{version}, state pristine, {where}" in line and "WARNING" in line
    assert "[guard.py:" in line  # vLLM's own log format: the line went through vLLM's handler
    r = start(guard_venv, root, "strict")
    assert r.returncode != 0 and "STARTED" not in r.stdout
    assert "GuardRefused" in r.stderr and "state pristine" in r.stderr and "m3fuse install" in r.stderr

    assert run_cli("install", "--no-wheels", "--vllm-root", str(root)).returncode == 0
    for mode in (None, "strict", "log"):
        r = start(guard_venv, root, mode)
        assert r.returncode == 0 and "STARTED torch=False" in r.stdout, r.stdout + r.stderr
        (line,) = guard_lines(r)
        assert f"set vllm-{version}, state patched, {where}" in line and "INFO" in line

    model = root / realvllm.MODEL
    model.write_bytes(model.read_bytes() + b"# rebuilt image\n")
    r = start(guard_venv, root)
    assert r.returncode == 0 and "STARTED" in r.stdout
    (line,) = guard_lines(r)
    assert "state drifted" in line and "WARNING" in line and "has drifted" in line
    r = start(guard_venv, root, "STRICT")
    assert r.returncode != 0 and "STARTED" not in r.stdout
    assert "state drifted" in r.stderr and "refuses to start" in r.stderr


def test_the_api_server_of_0_33_logs_before_vllm_configures_logging(guard_venv, vllm_tree):
    """0.31.0+: the API server loads plugins while building its parser, before vLLM sets up
    logging; the line must still appear, at its level."""
    root = loader_tree(vllm_tree, "0.33.0")
    r = start(guard_venv, root, configured=False)
    (line,) = guard_lines(r)
    assert line.startswith("WARNING m3fuse guard: set vllm-0.33.0, state pristine")
    assert run_cli("install", "--no-wheels", "--vllm-root", str(root)).returncode == 0
    (line,) = guard_lines(start(guard_venv, root, configured=False))
    assert line.startswith("INFO m3fuse guard: set vllm-0.33.0, state patched")


def test_guard_settings_off_misspelt_and_vllm_plugins_allowlist(guard_venv, vllm_tree):
    root = loader_tree(vllm_tree, "0.26.0")
    r = start(guard_venv, root, "off")
    assert r.returncode == 0 and "STARTED" in r.stdout and guard_lines(r) == []
    r = start(guard_venv, root, "strcit")
    assert r.returncode != 0 and "STARTED" not in r.stdout
    assert "M3FUSE_GUARD='strcit' is not one of log, strict, off" in r.stderr
    # vLLM's own allowlist: a VLLM_PLUGINS that does not name m3fuse skips the guard entirely.
    r = start(guard_venv, root, "strict", VLLM_PLUGINS="someone_else")
    assert r.returncode == 0 and guard_lines(r) == []
    r = start(guard_venv, root, None, VLLM_PLUGINS="m3fuse")
    assert len(guard_lines(r)) == 1


def test_a_forked_child_does_not_run_the_guard_again(guard_venv, vllm_tree):
    """vLLM issue #27940: the loader's `plugins_loaded` flag is inherited across fork."""
    root = loader_tree(vllm_tree, "0.26.0")
    r = start(guard_venv, root, None, FORK_CHILD="1")
    assert r.returncode == 0 and "CHILD RAN" in r.stdout, r.stdout + r.stderr
    assert len(guard_lines(r)) == 1


def test_the_guard_imports_nothing_heavy(vllm_tree):
    """No torch, no vllm, no click/requests/packaging: the check itself runs in a bare process."""
    root = vllm_tree("0.26.0")
    code = ("import sys\nfrom pathlib import Path\nimport m3fuse.runtime.guard as g\n"
            f"line, ok = g.check(Path({str(root)!r}))\n"
            "heavy = sorted(m for m in ('torch', 'vllm', 'click', 'requests', 'packaging') if m in sys.modules)\n"
            "print(ok, heavy)\nprint(line)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "False []"
    assert "set vllm-0.26.0, state pristine" in r.stdout


def test_a_failing_check_only_logs_by_default_and_refuses_under_strict(monkeypatch, caplog):
    import m3fuse.runtime.guard as g

    def broken(root=None):
        raise OSError("patch sets unreadable")

    monkeypatch.setattr(g, "_verdict", broken)
    caplog.set_level("INFO", logger="vllm.m3fuse.guard")
    monkeypatch.delenv("M3FUSE_GUARD", raising=False)
    g.guard()  # vLLM keeps starting
    assert "could not check the vLLM tree: patch sets unreadable" in caplog.text
    monkeypatch.setenv("M3FUSE_GUARD", " Strict ")
    with pytest.raises(g.GuardRefused, match="could not check .* refuses to start"):
        g.guard()
    assert g.mode({}) == "log" and g.mode({"M3FUSE_GUARD": "OFF"}) == "off"


def test_a_control_run_on_a_pristine_tree_is_logged_at_info(guard_venv, vllm_tree):
    """M3_AITER_AR_RMS_MODE=off on a pristine tree is the upstream arm `m3fuse revert` made on
    purpose: INFO, not a warning to install. A drifted tree under the same mode still warns."""
    root = loader_tree(vllm_tree, "0.26.0")
    r = start(guard_venv, root, None, M3_AITER_AR_RMS_MODE="off")
    assert r.returncode == 0 and "STARTED" in r.stdout, r.stdout + r.stderr
    (line,) = guard_lines(r)
    assert "INFO" in line and "WARNING" not in line and "state pristine" in line, line
    assert "control run" in line and "m3fuse install" not in line
    (line,) = guard_lines(start(guard_venv, root, None, M3_AITER_AR_RMS_MODE="fused"))
    assert "WARNING" in line and "state pristine" in line
    model = root / realvllm.MODEL
    model.write_bytes(model.read_bytes() + b"# rebuilt image\n")
    (line,) = guard_lines(start(guard_venv, root, None, M3_AITER_AR_RMS_MODE="off"))
    assert "WARNING" in line and "state drifted" in line
