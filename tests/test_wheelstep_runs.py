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
    # Signal once pip has begun to unpack (its package folder appears), as the new user did.
    site = next((tmp_path / "venv" / "lib").glob("python*/site-packages"))
    deadline = time.monotonic() + 120
    while not (site / "demo_big").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
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


def _rewrite_record(wheel: Path, extra_rows: str) -> None:
    """Add rows to the wheel's own RECORD (what a tampered or careless build carries)."""
    import zipfile

    members = {}
    with zipfile.ZipFile(wheel) as zf:
        for n in zf.namelist():
            members[n] = zf.read(n)
    rec = next(n for n in members if n.endswith(".dist-info/RECORD"))
    members[rec] = members[rec] + extra_rows.encode()
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for n, data in members.items():
            zf.writestr(n, data)


def _small_lock(tmp_path: Path, version: str, extra_rows: str = "") -> Path:
    wheel = build_wheel(tmp_path / f"wheels-{version}", "demo-rec", version)
    if extra_rows:
        _rewrite_record(wheel, extra_rows)
    lock = tmp_path / f"rec-{version}.lock"
    lock.write_text(lock_text([("demo-rec", version, [(wheel, wheel.as_uri())])]))
    return lock


def _install(lock: Path, py: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(lock, py, tmp_path / "cache"), capture_output=True, text=True, timeout=300)


def test_an_installed_record_naming_files_outside_site_packages_is_refused_before_pip(tmp_path):
    """V13: pip's --force-reinstall deletes what the installed RECORD lists (inside the venv's
    prefix in a venv; anything with a system Python). The rows are named and pip is not run."""
    py = make_venv(tmp_path / "venv")
    old = _small_lock(tmp_path, "0.9.0")
    assert _install(old, py, tmp_path).returncode == 0
    precious = tmp_path / "venv" / "precious.txt"
    precious.write_text("keep me\n")
    site = next((tmp_path / "venv" / "lib").glob("python*/site-packages"))
    record = next(site.glob("demo_rec-0.9.0.dist-info")) / "RECORD"
    with record.open("a") as f:
        f.write("../../../precious.txt,,\n")
    r = _install(_small_lock(tmp_path, "1.0.0"), py, tmp_path)
    assert r.returncode == 5, (r.stdout, r.stderr)
    assert "RECORD names files outside" in r.stderr and "../../../precious.txt" in r.stderr, r.stderr
    assert str(record) in r.stderr and "pip was not run" in r.stderr, r.stderr
    assert precious.read_text() == "keep me\n"
    assert verify_pinned(old, str(py), exact=True)[0]["installed_version"] == "0.9.0"


def test_a_wheel_whose_record_climbs_out_is_refused_before_pip(tmp_path):
    """V13, the pinned wheel's side: pip keeps a wheel's RECORD rows that name no member in the
    installed RECORD, for the next uninstall to delete."""
    py = make_venv(tmp_path / "venv")
    r = _install(_small_lock(tmp_path, "1.0.0", "../../../precious.txt,,\n/etc/hostname,,\n"), py, tmp_path)
    assert r.returncode == 4, (r.stdout, r.stderr)
    assert "../../../precious.txt" in r.stderr and "/etc/hostname" in r.stderr, r.stderr
    assert "pip was not run" in r.stderr
    assert verify_pinned(_small_lock(tmp_path / "again", "1.0.0"), str(py), exact=True)[0]["state"] == "missing"


def test_console_scripts_in_the_environments_bin_are_not_refused(tmp_path):
    """The one legitimate row outside site-packages: pip's `../../../bin/NAME` for a script."""
    from m3fuse.wheels.recordcheck import outside_rows

    root = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    text = ("demo/__init__.py,sha256=x,1\n../../../bin/demo-cli,sha256=y,2\n../../../bin/sub/x,,\n"
            "../../../precious.txt,,\n/etc/passwd,,\n")
    assert outside_rows(text, root) == ["../../../bin/sub/x", "../../../precious.txt", "/etc/passwd"]


def test_two_concurrent_full_installs_run_one_pip_and_patch_once(tmp_path):
    """The whole `install` (wheels, then patches) on a real venv holding the real vLLM 0.26.0:
    the tree's run lock is held over the wheel step too, so the second run waits, then finds
    the wheels installed and the tree patched."""
    import realvllm
    import venvs
    from m3fuse.fingerprint import sha256_file
    from wheelkit import FaultServer, aiter_wheel

    py = venvs.make_venv(tmp_path / "venv")
    venvs.pip(py, "install", "--no-deps", "--no-index", str(realvllm.wheel_path("0.26.0")))
    sp = venvs.site_packages(py)
    fly_files = {f"flydsl/m{i:04d}.py": "X = 1\n" + "# padding\n" * 40 for i in range(FILES)}
    fly_files["flydsl/__init__.py"] = "X = 1\n"
    fly = build_wheel(tmp_path / "w", "flydsl", "0.1.9.dev1+e2e", fly_files)
    aiter = aiter_wheel(tmp_path / "w", "0.1.15.post1+rocm7.2.e2e")
    with FaultServer() as srv:
        lock = tmp_path / "test.lock"
        lock.write_text(lock_text([srv.pin("flydsl", "0.1.9.dev1+e2e", fly),
                                   srv.pin("amd-aiter", "0.1.15.post1+rocm7.2.e2e", aiter)]))
        cmds = [[sys.executable, "-m", "m3fuse", "install", "--lock", str(lock), "--python", str(py), "--cache-dir",
                 str(tmp_path / f"cache{i}")] for i in range(2)]
        procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
        results = [(p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for p in procs]
    assert [code for code, _, _ in results] == [0, 0], results
    assert len([out for _, out, _ in results if "installing 2 wheel(s) with" in out]) == 1, results
    assert len([out for _, out, _ in results if "patched: " in out]) == 1, results
    r = subprocess.run([sys.executable, "-m", "m3fuse", "verify", "--lock", str(lock), "--python", str(py)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sha256_file(sp / realvllm.MODEL)  # the tree is there and readable after both runs
