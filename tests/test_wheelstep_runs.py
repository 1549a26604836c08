"""Issue 25, part B: one m3fuse run at a time per environment, pip included, and an
interrupted wheel step that says what pip left and names the repair.

Real venvs, real pip, a real wheel of a few thousand files (so pip takes long enough for a
second run to start while it works), pinned in a lock by a file:// URL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from m3fuse.wheels.step import verify_pinned
from wheelkit import build_wheel, lock_text, make_venv

pytestmark = pytest.mark.slow

FILES = 3000


def _big_lock(tmp_path: Path) -> Path:
    files = {f"demo_big/m{i:04d}.py": f"X = {i}\n" + "# padding\n" * 40 for i in range(FILES)}
    files["demo_big/__init__.py"] = "X = 0\n"
    wheel = build_wheel(tmp_path / "wheels", "demo-big", "1.0.0", files)
    lock = tmp_path / "test.lock"
    lock.write_text(lock_text([("demo-big", "1.0.0", [(wheel, wheel.as_uri())])]))
    return lock


def _cmd(lock: Path, py: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "m3fuse", "install", "--no-patches", "--lock", str(lock), "--python", str(py),
            "--cache-dir", str(cache)]


def test_two_concurrent_installs_run_one_pip(tmp_path):
    lock = _big_lock(tmp_path)
    py = make_venv(tmp_path / "venv")
    # Each run its own cache: the two runs share nothing but the environment.
    procs = [subprocess.Popen(_cmd(lock, py, tmp_path / f"cache{i}"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    assert [code for code, _, _ in results] == [0, 0], results
    pips = [out for _, out, _ in results if "installing 1 wheel(s) with" in out]
    assert len(pips) == 1, results  # the second run waited, then found the pin installed
    assert all(r["ok"] for r in verify_pinned(lock, str(py), exact=True))


def test_an_interrupted_wheel_step_says_what_pip_left_and_install_again_repairs_it(tmp_path):
    lock = _big_lock(tmp_path)
    py = make_venv(tmp_path / "venv")
    cache = tmp_path / "cache"
    # A Ctrl-C at the terminal reaches the whole foreground group: m3fuse and its pip.
    proc = subprocess.Popen(_cmd(lock, py, cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "installing 1 wheel(s) with" in line:
            break
    time.sleep(0.4)  # pip is unpacking by now
    assert proc.poll() is None, "pip finished before the signal; make the wheel larger"
    os.killpg(proc.pid, signal.SIGINT)
    code = proc.wait(timeout=300)
    err = proc.stderr.read() if proc.stderr else ""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 130 and len(lines) == 1, (code, err)
    assert "Traceback" not in err
    assert lines[0].startswith("m3fuse: interrupted by SIGINT: the wheel step was stopped while pip installed "
                               "demo-big"), lines
    assert "Run `m3fuse install` again to repair it" in lines[0], lines
    # What the line says pip left is what verify finds.
    state = verify_pinned(lock, str(py), exact=True)[0]
    assert (state["state"] == "ok") == ("pip had finished" in lines[0]), (state, lines)
    # The repair it names works.
    r = subprocess.run(_cmd(lock, py, cache), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert all(s["ok"] for s in verify_pinned(lock, str(py), exact=True))
