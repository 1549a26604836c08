"""End to end on real venvs with real pip: install_pinned / verify_pinned / fetch_only and the
click commands, from a test lock served by the loopback server. Includes the real public
flydsl 0.5.0 wheel (installed) and amd-aiter 0.1.7.post2.dev18 (refused)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import m3fuse.wheels.step as wheels_mod
from m3fuse.cli.wheels import fetch_command, lock_group
from m3fuse.errors import EXIT_ENVIRONMENT, EXIT_INTEGRITY, EnvironmentProblem, IntegrityError
from m3fuse.wheels.lock import load_lock
from m3fuse.wheels.check import WheelCheckError
from m3fuse.wheels.step import WheelOptions, install_pinned, verify_pinned

from wheelkit import (FaultServer, aiter_wheel, build_wheel, cache_is_clean, clone_venv, installed, lock_text,
                      make_venv, real_flydsl, real_old_aiter, sha256_of)

pytestmark = pytest.mark.slow

AITER_V = "0.1.15.post1+rocm7.2.test"


@pytest.fixture(scope="session")
def template_venv(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("template") / "venv"
    make_venv(d)
    return d


@pytest.fixture
def venv(template_venv, tmp_path) -> str:
    return str(clone_venv(template_venv, tmp_path / "venv"))


@pytest.fixture(scope="module")
def wheels_dir(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("wheels")
    return {
        "fly": build_wheel(d, "demo-fly", "0.1.9.dev1+abc", {"demo_fly/__init__.py": "X = 1\n",
                                                              "demo_fly/data.txt": "payload " * 5000}),
        "fly-old": build_wheel(d / "old", "demo-fly", "0.0.1"),
        "aiter": aiter_wheel(d, AITER_V),
        "aiter-no1stage": aiter_wheel(d / "bad", AITER_V, use_1stage=False),
        "torch-a": build_wheel(d / "ta", "torch", "2.0.0+rocm"),
        "torch-b": build_wheel(d / "tb", "torch", "2.1.0"),
    }


@pytest.fixture
def server():
    with FaultServer(stall_s=1.0) as srv:
        yield srv


def make_lock(tmp_path: Path, srv: FaultServer, fly: Path, aiter: Path, plans: dict[str, list[str]] | None = None,
              sizes: bool = True) -> Path:
    plans = plans or {}
    fly_url = srv.add(fly.name, fly.read_bytes(), plans.get("fly"))
    aiter_url = srv.add(aiter.name, aiter.read_bytes(), plans.get("aiter"))
    path = tmp_path / "test.lock"
    path.write_text(lock_text([("demo-fly", "0.1.9.dev1+abc", [(fly, fly_url)]),
                               ("amd-aiter", AITER_V, [(aiter, aiter_url)])], sizes=sizes))
    return path


def opts(lock: Path, tmp_path: Path, python: str, **kw) -> WheelOptions:
    kw.setdefault("backoff", 0.01)
    kw.setdefault("read_timeout", 0.5)
    return WheelOptions(lock_path=lock, cache_dir=tmp_path / "cache", find_links=kw.pop("find_links", []),
                        python=python, progress=False, **kw)


def states(lock: Path, python: str) -> dict[str, str]:
    return {r["name"]: r["state"] for r in verify_pinned(lock, python)}


def pip(python: str, *args: str) -> None:
    subprocess.run([python, "-m", "pip", "--disable-pip-version-check", *args], check=True, capture_output=True)


def site_file(python: str, rel: str) -> Path:
    out = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    return Path(out) / rel


def test_install_verify_fast_path_and_repair(tmp_path, venv, server, wheels_dir):
    lock = make_lock(tmp_path, server, wheels_dir["fly"], wheels_dir["aiter"])
    assert states(lock, venv) == {"demo-fly": "missing", "amd-aiter": "missing"}
    lines: list[str] = []
    res = install_pinned(opts(lock, tmp_path, venv), echo=lines.append)
    assert [(r["name"], r["action"], r["result"]) for r in res] == [("demo-fly", "install", "installed"),
                                                                   ("amd-aiter", "install", "installed")]
    assert all(Path(r["file"]).is_file() and sha256_of(Path(r["file"])) == r["sha256"] for r in res)
    assert installed(venv, "demo-fly") == "0.1.9.dev1+abc" and installed(venv, "amd-aiter") == AITER_V
    v = verify_pinned(lock, venv)
    assert [(r["name"], r["state"], r["installed_version"], r["expected_version"], r["ok"]) for r in v] == [
        ("demo-fly", "ok", "0.1.9.dev1+abc", "0.1.9.dev1+abc", True), ("amd-aiter", "ok", AITER_V, AITER_V, True)]
    assert v[0]["record_files"] >= 4 and v[0]["problems"] == []
    import json

    json.dumps(v)  # JSON-able for `verify --json`

    # Second run: nothing to do, no download, no pip.
    n_requests = len(server.log)
    res = install_pinned(opts(lock, tmp_path, venv), echo=lines.append)
    assert [(r["action"], r["result"]) for r in res] == [("keep", "unchanged"), ("keep", "unchanged")]
    assert len(server.log) == n_requests

    # An edited installed file is a RECORD mismatch; install repairs it (from the cache).
    f = site_file(venv, "demo_fly/__init__.py")
    f.write_text("X = 2\n")
    v = verify_pinned(lock, venv)
    assert v[0]["state"] == "record-mismatch" and any("modified: demo_fly/__init__.py" in p for p in v[0]["problems"])
    res = install_pinned(opts(lock, tmp_path, venv), echo=lines.append)
    assert [(r["action"], r["result"]) for r in res] == [("repair", "installed"), ("keep", "unchanged")]
    assert f.read_text() == "X = 1\n" and len(server.log) == n_requests
    # A deleted file too.
    site_file(venv, "demo_fly/data.txt").unlink()
    v = verify_pinned(lock, venv)
    assert v[0]["state"] == "record-mismatch" and any(p.startswith("missing: demo_fly/data.txt") for p in v[0]["problems"])
    assert states(lock, venv)["amd-aiter"] == "ok"


def test_reinstall_over_another_version(tmp_path, venv, server, wheels_dir):
    pip(venv, "install", "--no-deps", "--no-index", str(wheels_dir["fly-old"]))
    lock = make_lock(tmp_path, server, wheels_dir["fly"], wheels_dir["aiter"])
    v = verify_pinned(lock, venv)
    assert v[0]["state"] == "wrong-version" and v[0]["installed_version"] == "0.0.1"
    assert "pins 0.1.9.dev1+abc" in v[0]["problems"][0]
    res = install_pinned(opts(lock, tmp_path, venv), echo=lambda s: None)
    assert res[0]["installed_version"] == "0.0.1" and res[0]["action"] == "upgrade" and res[0]["result"] == "installed"
    assert states(lock, venv) == {"demo-fly": "ok", "amd-aiter": "ok"}


# fault on (fly, aiter) -> outcome. The aiter wheel is second in lock order, so a refusal
# there proves the first wheel was not installed either ("fetch and check all first").
INSTALL_FAULTS = [
    ({"fly": ["drop"], "aiter": ["500", "drop"]}, "ok"),
    ({"fly": ["stall"], "aiter": ["503-then-ok", "slow"]}, "ok"),
    ({"aiter": ["wrong"]}, "integrity"),
    ({"aiter": ["short"]}, "integrity"),
    ({"aiter": ["500"] * 5}, "environment"),
    ({"aiter": ["404"]}, "environment"),
]


@pytest.mark.parametrize("plans, outcome", INSTALL_FAULTS, ids=[str(p) for p, _ in INSTALL_FAULTS])
def test_install_faults_end_clean(tmp_path, venv, server, wheels_dir, plans, outcome):
    lock = make_lock(tmp_path, server, wheels_dir["fly"], wheels_dir["aiter"], plans)
    o = opts(lock, tmp_path, venv, retries=3)
    if outcome == "ok":
        install_pinned(o, echo=lambda s: None)
        assert states(lock, venv) == {"demo-fly": "ok", "amd-aiter": "ok"}
    else:
        exc = IntegrityError if outcome == "integrity" else EnvironmentProblem
        with pytest.raises(exc) as ei:
            install_pinned(o, echo=lambda s: None)
        assert ei.value.exit_code == (EXIT_INTEGRITY if outcome == "integrity" else EXIT_ENVIRONMENT)
        assert states(lock, venv) == {"demo-fly": "missing", "amd-aiter": "missing"}
    assert cache_is_clean(tmp_path / "cache") == []


def test_bad_aiter_build_refused_before_anything_is_installed(tmp_path, venv, server, wheels_dir):
    lock = make_lock(tmp_path, server, wheels_dir["fly"], wheels_dir["aiter-no1stage"])
    with pytest.raises(WheelCheckError) as ei:
        install_pinned(opts(lock, tmp_path, venv), echo=lambda s: None)
    assert ei.value.exit_code == EXIT_INTEGRITY and "use_1stage" in ei.value.message
    assert states(lock, venv) == {"demo-fly": "missing", "amd-aiter": "missing"}


def test_dry_run_changes_nothing(tmp_path, venv, server, wheels_dir):
    lock = make_lock(tmp_path, server, wheels_dir["fly"], wheels_dir["aiter"])
    res = install_pinned(opts(lock, tmp_path, venv), dry_run=True, echo=lambda s: None)
    assert [(r["action"], r["result"]) for r in res] == [("install", "dry-run"), ("install", "dry-run")]
    assert all(r["file"] is None for r in res) and server.log == []
    assert states(lock, venv) == {"demo-fly": "missing", "amd-aiter": "missing"}
    # With the wheels cached, a dry run verifies and checks them (still offline).
    install_pinned(opts(lock, tmp_path, venv), echo=lambda s: None)
    pip(venv, "uninstall", "-y", "demo-fly")
    n = len(server.log)
    res = install_pinned(opts(lock, tmp_path, venv), dry_run=True, echo=lambda s: None)
    assert [(r["action"], r["result"]) for r in res] == [("install", "dry-run"), ("keep", "unchanged")]
    assert res[0]["file"] and len(server.log) == n
    assert states(lock, venv)["demo-fly"] == "missing"


def test_torch_must_not_move(tmp_path, venv, server, wheels_dir, monkeypatch):
    pip(venv, "install", "--no-deps", "--no-index", str(wheels_dir["torch-a"]))
    lock = make_lock(tmp_path, server, wheels_dir["fly"], wheels_dir["aiter"])
    real = wheels_mod.pip_install

    def evil_pip_install(python, wheels, **kw):  # a wheel step that drags torch along
        real(python, wheels, **kw)
        pip(python, "install", "--no-deps", "--no-index", str(wheels_dir["torch-b"]))

    monkeypatch.setattr(wheels_mod, "pip_install", evil_pip_install)
    with pytest.raises(EnvironmentProblem) as ei:
        install_pinned(opts(lock, tmp_path, venv), echo=lambda s: None)
    assert re.search(r"^  before: +2\.0\.0\+rocm$", ei.value.message, re.M)
    assert re.search(r"^  after: +2\.1\.0$", ei.value.message, re.M)
    assert ei.value.exit_code == EXIT_ENVIRONMENT
    monkeypatch.setattr(wheels_mod, "pip_install", real)
    pip(venv, "install", "--no-deps", "--no-index", "--force-reinstall", str(wheels_dir["torch-a"]))
    pip(venv, "uninstall", "-y", "demo-fly", "amd-aiter")
    install_pinned(opts(lock, tmp_path, venv), echo=lambda s: None)  # torch untouched: fine
    assert installed(venv, "torch") == "2.0.0+rocm"


def test_target_without_pip_is_an_environment_problem(tmp_path, server, wheels_dir):
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "nopip")], check=True)
    lock = make_lock(tmp_path, server, wheels_dir["fly"], wheels_dir["aiter"])
    with pytest.raises(EnvironmentProblem, match="target Python") as ei:
        install_pinned(opts(lock, tmp_path, str(tmp_path / "nopip" / "bin" / "python")), echo=lambda s: None)
    assert ei.value.exit_code == EXIT_ENVIRONMENT


def test_air_gapped_fetch_then_find_links_install(tmp_path, venv, server, wheels_dir):
    lock = make_lock(tmp_path, server, wheels_dir["fly"], wheels_dir["aiter"])
    dest = tmp_path / "dest"
    r = CliRunner().invoke(fetch_command, ["--dest", str(dest), "--lock", str(lock), "--cache-dir",
                                           str(tmp_path / "c1"), "--python", venv])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in dest.iterdir()) == sorted([wheels_dir["fly"].name, wheels_dir["aiter"].name])
    # Now the "air-gapped" side: the server is gone (URLs unreachable), only --find-links.
    server.files.clear()
    res = install_pinned(opts(lock, tmp_path, venv, find_links=[dest]), echo=lambda s: None)
    assert [r["result"] for r in res] == ["installed", "installed"]
    assert states(lock, venv) == {"demo-fly": "ok", "amd-aiter": "ok"}


def test_file_urls_lock(tmp_path, venv, wheels_dir):
    lock = tmp_path / "file.lock"
    lock.write_text(lock_text([("demo-fly", "0.1.9.dev1+abc", [(wheels_dir["fly"], wheels_dir["fly"].as_uri())]),
                               ("amd-aiter", AITER_V, [(wheels_dir["aiter"], wheels_dir["aiter"].as_uri().replace("+", "%2B"))])]))
    install_pinned(opts(lock, tmp_path, venv), echo=lambda s: None)
    assert states(lock, venv) == {"demo-fly": "ok", "amd-aiter": "ok"}


def test_lock_add_and_check_commands(tmp_path, server, wheels_dir):
    runner = CliRunner()
    lock = tmp_path / "new.lock"
    url = server.add(wheels_dir["fly"].name, wheels_dir["fly"].read_bytes())
    r = runner.invoke(lock_group, ["add", url, "--lock", str(lock), "--cache-dir", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(lock_group, ["add", str(wheels_dir["aiter"]), "--lock", str(lock),
                                   "--url", "https://example.invalid/" + wheels_dir["aiter"].name.replace("+", "%2B")])
    assert r.exit_code == 0, r.output
    lk = load_lock(lock)
    assert [(p.name, p.version) for p in lk.packages] == [("demo-fly", "0.1.9.dev1+abc"), ("amd-aiter", AITER_V)]
    fly = lk.packages[0].wheels[0]
    assert fly.sha256 == sha256_of(wheels_dir["fly"]) and fly.size == wheels_dir["fly"].stat().st_size
    assert fly.url == url
    # check: only the reachable pin can be checked; the example.invalid one is reported unreachable.
    lock2 = tmp_path / "reachable.lock"
    lock2.write_text(lock_text([("demo-fly", "0.1.9.dev1+abc", [(wheels_dir["fly"], url)])], sizes=False))
    r = runner.invoke(lock_group, ["check", "--lock", str(lock2), "--write-sizes"])
    assert r.exit_code == 0, r.output
    assert load_lock(lock2).packages[0].wheels[0].size == wheels_dir["fly"].stat().st_size
    server.set_plan(wheels_dir["fly"].name, ["wrong"])
    r = runner.invoke(lock_group, ["check", "--lock", str(lock2)])
    assert isinstance(r.exception, IntegrityError) and "MISMATCH" in r.output
    r = runner.invoke(lock_group, ["add", "/nonexistent/x.whl", "--lock", str(lock2)])
    assert r.exception is not None and r.exception.exit_code == 2


def test_verify_does_not_import_requests(tmp_path, venv, wheels_dir):
    lock = tmp_path / "file.lock"
    lock.write_text(lock_text([("demo-fly", "0.1.9.dev1+abc", [(wheels_dir["fly"], wheels_dir["fly"].as_uri())])]))
    code = (f"import sys; from pathlib import Path; from m3fuse.wheels.step import verify_pinned; "
            f"r = verify_pinned(Path({str(lock)!r}), {venv!r}); print(r[0]['state'], 'requests' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["missing", "False"]


# ------------------------------------------------------------------ real public wheels


def test_real_flydsl_installed_from_loopback(tmp_path, venv, server):
    fly = real_flydsl()
    url = server.add(fly.name, fly.read_bytes(), ["drop"])  # and survive a dropped transfer
    lock = tmp_path / "real.lock"
    lock.write_text(lock_text([("flydsl", "0.5.0", [(fly, url)])]))
    res = install_pinned(opts(lock, tmp_path, venv, read_timeout=10), echo=lambda s: None)
    assert res[0]["result"] == "installed" and res[0]["sha256"] == sha256_of(fly)
    assert installed(venv, "flydsl") == "0.5.0"
    v = verify_pinned(lock, venv)
    assert v[0]["state"] == "ok" and v[0]["record_files"] > 100
    assert cache_is_clean(tmp_path / "cache") == []


def test_real_old_aiter_refused_through_install(tmp_path, venv, server, wheels_dir):
    old = real_old_aiter()
    fly = wheels_dir["fly"]
    lock = tmp_path / "real.lock"
    lock.write_text(lock_text([
        server.pin("demo-fly", "0.1.9.dev1+abc", fly),
        server.pin("amd-aiter", "0.1.7.post2.dev18", old)]))
    with pytest.raises(WheelCheckError) as ei:
        install_pinned(opts(lock, tmp_path, venv, read_timeout=10), echo=lambda s: None)
    assert "use_1stage" in ei.value.message and "_pool" in ei.value.message and old.name in ei.value.message
    assert states(lock, venv) == {"demo-fly": "missing", "amd-aiter": "missing"}


def test_no_fitting_wheel(tmp_path, venv, server, wheels_dir):
    # Pinned only for another interpreter: refused before any download (exit 5) ...
    other = build_wheel(tmp_path / "w", "demo-fly", "0.1.9.dev1+abc", tag="cp27-cp27mu-manylinux1_x86_64")
    lock = tmp_path / "other.lock"
    lock.write_text(lock_text([server.pin("demo-fly", "0.1.9.dev1+abc", other)]))
    with pytest.raises(EnvironmentProblem, match="no wheel pinned for demo-fly") as ei:
        install_pinned(opts(lock, tmp_path, venv), echo=lambda s: None)
    assert ei.value.exit_code == EXIT_ENVIRONMENT and server.log == []
    # ... unless the pinned version is already installed intact: then no wheel is needed.
    pip(venv, "install", "--no-deps", "--no-index", str(wheels_dir["fly"]))
    res = install_pinned(opts(lock, tmp_path, venv), echo=lambda s: None)
    assert res[0]["action"] == "keep"
    # `fetch --all` takes every wheel of the lock, whatever the interpreter.
    r = CliRunner().invoke(fetch_command, ["--dest", str(tmp_path / "d"), "--lock", str(lock), "--all",
                                           "--cache-dir", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "d" / other.name).is_file()
    r = CliRunner().invoke(fetch_command, ["--dest", str(tmp_path / "d2"), "--lock", str(lock),
                                           "--cache-dir", str(tmp_path / "c"), "--python", venv])
    assert isinstance(r.exception, EnvironmentProblem)


def test_real_cli_install_no_patches_from_loopback(tmp_path, venv, server, wheels_dir, cli):
    """`m3fuse install --no-patches` with a test lock, as a user runs it (exit codes included)."""
    import json

    bad = make_lock(tmp_path, server, wheels_dir["fly"], wheels_dir["aiter"], {"aiter": ["wrong"]})
    base = ["install", "--no-patches", "--lock", str(bad), "--python", venv, "--cache-dir", str(tmp_path / "cache")]
    r = cli(*base)
    assert r.returncode == EXIT_INTEGRITY, r.stdout + r.stderr
    assert "THESE FILES DO NOT MATCH THE HASHES IN THE LOCK" in r.stderr and "    expected: sha256 " in r.stderr
    assert states(bad, venv) == {"demo-fly": "missing", "amd-aiter": "missing"}
    assert cache_is_clean(tmp_path / "cache") == []
    r = cli(*base, "--json")  # the server now serves the right bytes
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert [(w["name"], w["action"], w["result"]) for w in out["wheels"]] == [("demo-fly", "install", "installed"),
                                                                               ("amd-aiter", "install", "installed")]
    assert states(bad, venv) == {"demo-fly": "ok", "amd-aiter": "ok"}
    r = cli("lock", "check", "--lock", str(bad))
    assert r.returncode == 0, r.stdout + r.stderr
    # (Exit codes of failing `fetch` / `lock` commands are mapped centrally in cli.py; their
    # errors are checked above through CliRunner as the raised M3fuseError.)


def test_a_wheel_changed_after_its_checks_is_refused_by_pip_as_integrity(tmp_path, venv, server, wheels_dir,
                                                                       monkeypatch):
    """m3fuse does not hash each wheel again before pip: pip's --require-hashes checks the bytes it
    actually installs. A file swapped after m3fuse's checks is refused there, reported as an
    integrity failure (exit 4), and nothing is installed."""
    lock = make_lock(tmp_path, server, wheels_dir["fly"], wheels_dir["aiter"])
    real = wheels_mod.check_wheel

    def check_then_swap(path, pkg, tags, python):  # the swap lands between our check and pip
        real(path, pkg, tags, python)
        if pkg.name == "amd-aiter":
            with open(path, "ab") as f:
                f.write(b"\0")

    monkeypatch.setattr(wheels_mod, "check_wheel", check_then_swap)
    with pytest.raises(IntegrityError) as ei:
        install_pinned(opts(lock, tmp_path, venv), echo=lambda s: None)
    assert ei.value.exit_code == EXIT_INTEGRITY and "changed after it was verified" in ei.value.message
    assert states(lock, venv) == {"demo-fly": "missing", "amd-aiter": "missing"}
    # The next run notices the damaged cache entry, fetches it again and installs.
    monkeypatch.setattr(wheels_mod, "check_wheel", real)
    install_pinned(opts(lock, tmp_path, venv), echo=lambda s: None)
    assert states(lock, venv) == {"demo-fly": "ok", "amd-aiter": "ok"}
