"""The plan of the wheel step on real interpreters, through the real CLI: no silent downgrade,
PEP 668 targets refused before any download, and one pip run whose failure says what changed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import wheelkit

from conftest import run_cli
from m3fuse.errors import EXIT_ENVIRONMENT
from wheelkit import FaultServer, aiter_wheel, build_wheel, installed, make_system_python, make_venv

pytestmark = pytest.mark.slow

AITER_PIN = "0.1.15.post1+rocm7.2.test"
AITER_NEWER = "0.1.21.post2"  # what newer ROCm vLLM images ship
FLY_V = "0.1.9.dev1+abc"


@pytest.fixture
def server():
    with FaultServer() as srv:
        yield srv


def served_lock(tmp_path: Path, srv: FaultServer) -> Path:
    return wheelkit.served_lock(tmp_path, srv, fly=("demo-fly", FLY_V, {"demo_fly/__init__.py": "X = 1\n"}),
                                aiter=AITER_PIN)


def install(lock: Path, py: Path, tmp_path: Path, *extra: str):
    return run_cli("install", "--no-patches", "--lock", str(lock), "--python", str(py),
                   "--cache-dir", str(tmp_path / "cache"), *extra)


def test_newer_installed_aiter_is_kept_and_with_exact_pins_not_silently_downgraded(tmp_path, server):
    py = make_venv(tmp_path / "venv")
    newer = aiter_wheel(tmp_path / "image", AITER_NEWER)
    import subprocess  # the image's own AITER, installed by pip as the image build would

    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(newer)], check=True)
    lock = served_lock(tmp_path, server)

    # By default a newer build that passes the content checks is kept (docs/wheels.md).
    r = install(lock, py, tmp_path, "--dry-run", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert [(w["name"], w["action"], w["reason"]) for w in json.loads(r.stdout)["wheels"]] == [
        ("demo-fly", "install", None), ("amd-aiter", "keep", f"installed {AITER_NEWER} is newer and sound")]

    # --exact-pins: the pins decide alone, as before.
    r = install(lock, py, tmp_path, "--exact-pins")
    assert r.returncode == EXIT_ENVIRONMENT, r.stdout + r.stderr
    err = r.stderr
    assert "would downgrade 1 distribution" in err and "nothing was changed" in err
    assert re.search(rf"^    installed: +{re.escape(AITER_NEWER)}$", err, re.M), err
    assert re.search(rf"^    pinned: +{re.escape(AITER_PIN)}$", err, re.M), err
    assert "--allow-downgrade" in err.splitlines()[-1] and err.splitlines()[-1].startswith("hint: ")
    assert installed(py, "amd-aiter") == AITER_NEWER and installed(py, "demo-fly") is None
    assert server.log == []  # refused before any download

    # --dry-run --json: the same refusal, with the plan it was judged on.
    r = install(lock, py, tmp_path, "--dry-run", "--json", "--exact-pins")
    assert r.returncode == EXIT_ENVIRONMENT
    out = json.loads(r.stdout)
    assert out["error"]["kind"] == "downgrade" and out["error"]["exit_code"] == EXIT_ENVIRONMENT
    assert [(w["name"], w["installed_version"], w["pinned_version"], w["action"]) for w in out["wheels"]] == [
        ("demo-fly", None, FLY_V, "install"), ("amd-aiter", AITER_NEWER, AITER_PIN, "downgrade")]

    # With --allow-downgrade the dry run shows the plan and changes nothing ...
    r = install(lock, py, tmp_path, "--dry-run", "--json", "--allow-downgrade", "--exact-pins")
    assert r.returncode == 0, r.stderr
    assert [(w["action"], w["result"]) for w in json.loads(r.stdout)["wheels"]] == [("install", "dry-run"),
                                                                                 ("downgrade", "dry-run")]
    assert installed(py, "amd-aiter") == AITER_NEWER
    # ... and the real run replaces it.
    r = install(lock, py, tmp_path, "--allow-downgrade", "--json", "--exact-pins")
    assert r.returncode == 0, r.stderr
    assert [(w["action"], w["result"]) for w in json.loads(r.stdout)["wheels"]] == [("install", "installed"),
                                                                                 ("downgrade", "installed")]
    assert installed(py, "amd-aiter") == AITER_PIN and installed(py, "demo-fly") == FLY_V
    # Now at the pins: a plain run keeps both.
    r = install(lock, py, tmp_path, "--dry-run")
    assert r.returncode == 0
    assert f"amd-aiter: installed {AITER_PIN}, pinned {AITER_PIN}: keep" in r.stdout


def test_externally_managed_python_refused_before_any_download(tmp_path, server):
    py = make_system_python(tmp_path / "usr")
    lock = served_lock(tmp_path, server)
    r = install(lock, py, tmp_path)
    assert r.returncode == EXIT_ENVIRONMENT, r.stdout + r.stderr
    err = r.stderr
    assert "externally managed (PEP 668)" in err and "nothing was downloaded or installed" in err
    assert str(tmp_path / "usr" / "lib") in err and "EXTERNALLY-MANAGED" in err
    hint = err.splitlines()[-1]
    assert hint.startswith("hint: ") and "-m venv" in hint and "--break-system-packages" in hint
    assert server.log == [] and not (tmp_path / "cache" / "wheels").exists() and not (tmp_path / "cache" / "tmp").exists()
    assert installed(py, "demo-fly") is None
    # CI=true changes nothing.
    r2 = run_cli("install", "--no-patches", "--lock", str(lock), "--python", str(py), "--cache-dir",
                 str(tmp_path / "cache"), env={"CI": "true"})
    assert (r2.returncode, r2.stderr) == (r.returncode, r.stderr) and server.log == []
    # The real pip agrees it is externally managed (our probe follows the spec as pip does).
    import subprocess

    p = subprocess.run([str(py), "-m", "pip", "install", "--no-index", str(next((tmp_path / "wheels").glob("demo_fly-*.whl")))],
                       capture_output=True, text=True)
    assert p.returncode != 0 and "externally-managed-environment" in p.stderr
    # --break-system-packages: m3fuse installs, passing the flag on to pip.
    r = install(lock, py, tmp_path, "--break-system-packages")
    assert r.returncode == 0, r.stdout + r.stderr
    assert installed(py, "demo-fly") == FLY_V and installed(py, "amd-aiter") == AITER_PIN
    site = tmp_path / "usr" / "lib" / f"python{__import__('sys').version_info[0]}.{__import__('sys').version_info[1]}"
    assert (site / "site-packages" / "demo_fly" / "__init__.py").is_file()


def test_a_venv_is_never_externally_managed(tmp_path, server):
    """The marker of the base Python does not apply inside a venv (PEP 668): a venv made from
    the pretend system Python installs without the flag."""
    base = make_system_python(tmp_path / "usr")
    import subprocess

    subprocess.run([str(base), "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    py = tmp_path / "venv" / "bin" / "python3"
    # pip for the venv: the base's (linked, not installed, so the base stays untouched).
    sp = next((tmp_path / "venv" / "lib").glob("python*/site-packages"))
    (sp / "pip").symlink_to((next((tmp_path / "usr" / "lib").glob("python*/site-packages")) / "pip").resolve())
    lock = served_lock(tmp_path, server)
    r = install(lock, py, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert installed(py, "amd-aiter") == AITER_PIN


def test_one_pip_run_and_a_failure_that_says_what_changed(tmp_path, server):
    py = make_venv(tmp_path / "venv")
    lock = served_lock(tmp_path, server)
    sp = next((tmp_path / "venv" / "lib").glob("python*/site-packages"))
    # A plain file where AITER's package directory must go: pip fails on that wheel only.
    (sp / "aiter").write_text("in the way\n")
    r = install(lock, py, tmp_path)
    assert r.returncode == EXIT_ENVIRONMENT, r.stdout + r.stderr
    err = r.stderr
    assert r.stdout.count("-m pip: ") == 1  # one pip run for both wheels
    assert f"pip failed installing amd-aiter {AITER_PIN}" in err.splitlines()[0]
    assert re.search(r"^  failed on: +amd_aiter-", err, re.M), err
    changed = err[err.index("changed by this run"):err.index("pip said")]
    fly_now = installed(py, "demo-fly")
    if fly_now:  # pip keeps the wheels it installed before the failing one: reported exactly
        assert re.search(rf"^    demo-fly: +not installed -> {re.escape(FLY_V)}$", changed, re.M), err
    else:
        assert "demo-fly" not in changed
    assert "amd-aiter" not in changed and installed(py, "amd-aiter") is None
    # Out of the way, the same command completes from the verified cache.
    (sp / "aiter").unlink()
    n = len(server.log)
    r = install(lock, py, tmp_path)
    assert r.returncode == 0, r.stderr
    assert installed(py, "amd-aiter") == AITER_PIN and installed(py, "demo-fly") == FLY_V
    assert len(server.log) == n
    # A repair (same version, edited file) that pip gets through before the failing wheel is
    # reported too, though no version moved.
    (sp / "demo_fly" / "__init__.py").write_text("X = 2\n")
    import subprocess

    subprocess.run([str(py), "-m", "pip", "uninstall", "-q", "-y", "amd-aiter"], check=True)
    (sp / "aiter").write_text("in the way\n")
    r = install(lock, py, tmp_path)
    assert r.returncode == EXIT_ENVIRONMENT, r.stdout + r.stderr
    assert "demo-fly: installed " + FLY_V + ", pinned " + FLY_V + ": repair" in r.stdout
    assert f"pip failed installing amd-aiter {AITER_PIN}" in r.stderr
    changed = r.stderr[r.stderr.index("changed by this run"):r.stderr.index("pip said")]
    if (sp / "demo_fly" / "__init__.py").read_text() == "X = 1\n":  # pip repaired it before failing
        assert re.search(rf"^    demo-fly: +reinstalled at {re.escape(FLY_V)}$", changed, re.M), r.stderr
    else:
        assert "demo-fly" not in changed


def test_probe_read_in_process_matches_the_interpreters_own_answer(tmp_path):
    """The probe reads a plain venv (and this interpreter) in-process; it must say exactly what
    the interpreter itself says: versions, RECORD problems, dists reached through a .pth folder."""
    import subprocess
    import sys

    from m3fuse.target import query_interpreter
    from m3fuse.wheels.install import _PROBE_SCRIPT, _import_path, probe

    py = make_venv(tmp_path / "venv")
    fly = build_wheel(tmp_path / "w", "demo-fly", FLY_V, {"demo_fly/__init__.py": "X = 1\n"})
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(fly)], check=True)
    sp = next((tmp_path / "venv" / "lib").glob("python*/site-packages"))
    (sp / "demo_fly" / "__init__.py").write_text("X = 2\n")  # a RECORD mismatch
    extra = tmp_path / "extra"  # a dist reached only through a .pth folder line
    other = build_wheel(tmp_path / "w2", "demo-other", "2.0")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(extra),
                    str(other)], check=True)
    (sp / "zz_extra.pth").write_text(f"# a comment\n{extra}\nimport os\n")
    names = ["demo-fly", "demo-other", "amd-aiter", "torch"]

    def asked(python: str) -> dict:
        return query_interpreter(python, _PROBE_SCRIPT, what="probe", args=[json.dumps(names),
                                                                            json.dumps(names[:3])])

    assert _import_path(str(py)) is not None  # read in-process, not by a second interpreter
    fast = probe(str(py), names, record=names[:3])
    assert fast == asked(str(py))
    assert fast["dists"]["demo-fly"]["problems"] == ["modified: demo_fly/__init__.py"]
    assert fast["dists"]["demo-other"]["version"] == "2.0" and fast["dists"]["amd-aiter"] is None
    assert fast["externally_managed"] is None
    # This interpreter, in-process too.
    assert _import_path(sys.executable)[1] is True
    assert probe(sys.executable, names, record=names[:3]) == asked(sys.executable)


def test_a_copy_named_pylock_m3fuse_toml_installs_with_pip(tmp_path, server):
    """What docs/wheels.md promises: pip >= 26.1 installs a copy of an m3fuse lock as a PEP 751
    lock file (`pip install -r pylock.m3fuse.toml`), the same pinned files, hash-checked."""
    import shutil
    import subprocess

    from wheelkit import real_wheel

    py = make_venv(tmp_path / "venv")
    newer_pip = real_wheel("pip==26.3", "pip-26.3-*.whl")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-index", "--disable-pip-version-check",
                    str(newer_pip)], check=True)
    lock = served_lock(tmp_path, server)
    copy = tmp_path / "pylock.m3fuse.toml"
    shutil.copy(lock, copy)
    r = subprocess.run([str(py), "-m", "pip", "install", "--no-index", "--disable-pip-version-check",
                        "-r", str(copy)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert installed(py, "demo-fly") == FLY_V and installed(py, "amd-aiter") == AITER_PIN
    assert {p for p, *_ in server.log} == {f"/wheels/{n}" for n in (p.name for p in (tmp_path / "wheels").glob("*.whl"))}
    # pip checks the pinned sha256 too: wrong bytes from the server are refused.
    subprocess.run([str(py), "-m", "pip", "uninstall", "-q", "-y", "amd-aiter"], check=True)
    aiter_name = next(p.name for p in (tmp_path / "wheels").glob("amd_aiter-*.whl"))
    server.set_plan(aiter_name, ["wrong"])
    r = subprocess.run([str(py), "-m", "pip", "install", "--no-index", "--no-cache-dir", "--disable-pip-version-check",
                        "-r", str(copy)], capture_output=True, text=True)
    assert r.returncode != 0 and "HASH" in r.stderr.upper(), r.stderr
    assert installed(py, "amd-aiter") is None


def test_a_copy_named_pylock_m3fuse_toml_installs_with_uv(tmp_path, server):
    """The same promise for uv (`uv pip install -r pylock.m3fuse.toml`)."""
    import os
    import shutil
    import subprocess

    from wheelkit import real_wheel

    tool = make_venv(tmp_path / "uv-venv")
    uv_wheel = real_wheel("uv==0.13.8", "uv-0.13.8-*.whl", "--only-binary=:all:")
    subprocess.run([str(tool), "-m", "pip", "install", "-q", "--no-index", "--disable-pip-version-check",
                    str(uv_wheel)], check=True)
    py = make_venv(tmp_path / "venv")
    copy = tmp_path / "pylock.m3fuse.toml"
    shutil.copy(served_lock(tmp_path, server), copy)
    r = subprocess.run([str(tool.parent / "uv"), "pip", "install", "--python", str(py), "-r", str(copy)],
                       capture_output=True, text=True, env={**os.environ, "UV_NO_CACHE": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert installed(py, "demo-fly") == FLY_V and installed(py, "amd-aiter") == AITER_PIN
