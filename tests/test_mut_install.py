"""pip runs and installed-state checks (m3fuse/wheels/install.py): the tests that kill its mutants
(`make mutation MODULE=m3fuse/wheels/install.py`), on a real venv, real pip and a real wheel.

A signal that reaches m3fuse while pip is putting files in place waits for pip: the wheel is
installed whole, then the signal is raised (the CLI turns it into exit 130)."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from pathlib import Path

import pytest

import wheelkit
from m3fuse import interrupt
from m3fuse.wheels import install
from m3fuse.wheels.install import PipFailed, pip_install, probe, state_of, verify_wheels, versions
from m3fuse.wheels.lock import parse_lock


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    return wheelkit.make_venv(tmp_path_factory.mktemp("v") / "venv")


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_a_signal_during_pip_waits_for_pip_then_is_raised(venv, tmp_path):
    whl = wheelkit.build_wheel(tmp_path, "sig-demo", "1.0", {"sig_demo/__init__.py": "x = 1\n" * 20000})
    saved = {s: signal.getsignal(s) for s in interrupt.SIGNALS}
    interrupt.install()
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        timer.start()
        with pytest.raises(interrupt.Signalled) as exc:
            pip_install(str(venv), [(whl, _sha(whl))])
    finally:
        timer.cancel()
        for s, h in saved.items():
            signal.signal(s, h)
    assert exc.value.signum == signal.SIGTERM
    assert wheelkit.installed(venv, "sig-demo") == "1.0"  # pip finished before the signal was raised
    info = probe(str(venv), ["sig-demo"])["dists"]["sig-demo"]
    assert info["problems"] == [] and info["files"] >= 4


def test_pip_install_then_probe_versions_and_record(venv, tmp_path):
    whl = wheelkit.build_wheel(tmp_path, "probe-demo", "2.0", {"probe_demo/__init__.py": "y = 2\n"})
    pip_install(str(venv), [(whl, _sha(whl))])
    assert versions(str(venv), ["probe-demo", "not-there"]) == {"probe-demo": "2.0", "not-there": None}
    res = probe(str(venv), ["probe-demo"])
    assert res["externally_managed"] is None
    info = res["dists"]["probe-demo"]
    assert info["version"] == "2.0" and info["problems"] == [] and info["files"] >= 4
    site = Path(info["root"])
    (site / "probe_demo" / "__init__.py").write_text("y = 3\n")
    assert probe(str(venv), ["probe-demo"])["dists"]["probe-demo"]["problems"] == ["modified: probe_demo/__init__.py"]
    assert probe(str(venv), ["probe-demo"], record=[])["dists"]["probe-demo"]["problems"] == []
    (site / "probe_demo" / "__init__.py").unlink()
    assert probe(str(venv), ["probe-demo"])["dists"]["probe-demo"]["problems"] == ["missing: probe_demo/__init__.py"]


def test_a_wheel_pip_refuses_names_pips_exit(venv, tmp_path):
    whl = wheelkit.build_wheel(tmp_path, "bad-demo", "1.0")
    with pytest.raises(PipFailed) as exc:
        pip_install(str(venv), [(whl, "0" * 64)])  # pip checks the hash itself
    assert exc.value.code != 0 and "hash" in exc.value.output.lower() and exc.value.order == []


def test_state_of():
    assert state_of(None, "1.0") == "missing"
    assert state_of({"version": "1.0.0", "problems": []}, "1.0") == "ok"
    assert state_of({"version": "1.1", "problems": []}, "1.0") == "wrong-version"
    assert state_of({"version": None, "problems": []}, "1.0") == "wrong-version"
    assert state_of({"version": "not a version", "problems": []}, "1.0") == "wrong-version"
    assert state_of({"version": "1.0", "problems": ["modified: x"]}, "1.0") == "record-mismatch"


def test_verify_wheels_reports_each_pin(tmp_path):
    text = ('lock-version = "1.0"\ncreated-by = "t"\n'
            + "".join(f'[[packages]]\nname = "{n}"\nversion = "1.0"\n[[packages.wheels]]\n'
                      f'name = "{n.replace("-", "_")}-1.0-py3-none-any.whl"\nurl = "https://e.invalid/x.whl"\n'
                      f'hashes = {{ sha256 = "{"a" * 64}" }}\n' for n in ("a-pkg", "b-pkg", "c-pkg", "d-pkg")))
    lock = parse_lock(text, tmp_path / "w.lock", spec=False)
    info = {"a-pkg": None, "b-pkg": {"version": "2.0", "problems": [], "files": 3},
            "c-pkg": {"version": "1.0", "problems": ["modified: c"], "files": 5},
            "d-pkg": {"version": "1.0", "problems": [], "files": 7}}
    rows = verify_wheels(lock, "/py", info)
    assert [(r["name"], r["state"], r["ok"], r["installed_version"], r["record_files"]) for r in rows] == [
        ("a-pkg", "missing", False, None, 0), ("b-pkg", "wrong-version", False, "2.0", 3),
        ("c-pkg", "record-mismatch", False, "1.0", 5), ("d-pkg", "ok", True, "1.0", 7)]
    assert rows[0]["problems"] == ["a-pkg is not installed in /py"]
    assert rows[1]["problems"] == [f"installed b-pkg is 2.0, the lock {tmp_path / 'w.lock'} pins 1.0"]
    assert rows[2]["problems"] == ["modified: c"] and rows[3]["problems"] == []
    assert all(r["expected_version"] == "1.0" for r in rows)


def test_the_import_path_of_this_interpreter_and_of_a_venv(venv):
    import sys

    path, own = install._import_path(sys.executable)
    # The child would run in "/": the caller's first entry (script folder or cwd) is left out.
    assert own and path == (list(sys.path) if sys.flags.safe_path else sys.path[1:])
    vpath, vown = install._import_path(str(venv))
    assert not vown and vpath[0].endswith("site-packages") and Path(vpath[0]).is_dir()


def test_a_venvs_import_path_follows_its_pth_files(tmp_path):
    py = wheelkit.make_venv(tmp_path / "venv")
    site = Path(install._import_path(str(py))[0][0])
    (tmp_path / "extra1").mkdir()
    (tmp_path / "extra2").mkdir()
    (site / "#c").mkdir()  # a comment line is never a folder, even where one has that name
    (site / "a.pth").write_text(f"#c\n\n{tmp_path / 'extra1'}\nimport os\n{tmp_path / 'missing'}\n"
                                f"{tmp_path / 'extra1'}\n{tmp_path / 'extra2'}\n")
    path, own = install._import_path(str(py))
    assert not own and path == [str(site), str(tmp_path / "extra1"), str(tmp_path / "extra2")]


def test_break_system_packages_only_when_asked(tmp_path):
    py = wheelkit.make_system_python(tmp_path / "sys", externally_managed=True)
    whl = wheelkit.build_wheel(tmp_path / "w", "managed-demo", "1.0")
    with pytest.raises(PipFailed) as exc:
        pip_install(str(py), [(whl, _sha(whl))])
    assert "externally" in exc.value.output.lower()
    pip_install(str(py), [(whl, _sha(whl))], break_system_packages=True)
    assert wheelkit.installed(py, "managed-demo") == "1.0"


def test_a_pip_failure_mid_install_names_what_it_got_through(venv, tmp_path):
    whl = wheelkit.build_wheel(tmp_path, "conflict-demo", "1.0", {"conflict_demo.py": "x = 1\n"})
    site = Path(probe(str(venv), ["pip"])["dists"]["pip"]["root"])
    (site / "conflict_demo.py").mkdir()  # a folder where the wheel puts its module: pip fails writing it
    try:
        with pytest.raises(PipFailed) as exc:
            pip_install(str(venv), [(whl, _sha(whl))])
    finally:
        (site / "conflict_demo.py").rmdir()
    assert exc.value.order == ["conflict-demo"]


def test_a_pth_that_vanishes_while_read_sends_the_probe_to_the_interpreter(tmp_path, monkeypatch):
    py = wheelkit.make_venv(tmp_path / "venv")
    site = Path(install._import_path(str(py))[0][0])
    (site / "gone.pth").write_text(str(tmp_path) + "\n")
    real = install.read_pth

    def vanish_then_read(p):
        p.unlink()  # another process removes it between the listing and the read
        return real(p)

    monkeypatch.setattr(install, "read_pth", vanish_then_read)
    assert install._import_path(str(py)) is None


def test_probe_of_a_python_that_is_neither_this_nor_a_venv_asks_it(tmp_path):
    py = wheelkit.make_system_python(tmp_path / "sys", externally_managed=True)
    assert install._import_path(str(py)) is None
    res = probe(str(py), ["not-there"])
    assert res["dists"] == {"not-there": None}
    assert res["externally_managed"] and res["externally_managed"].endswith("EXTERNALLY-MANAGED")


def test_the_users_pip_index_settings_cannot_reach_the_run(venv, tmp_path, monkeypatch):
    whl = wheelkit.build_wheel(tmp_path, "env-demo", "1.0")
    for k in ("PIP_FIND_LINKS", "PIP_CONSTRAINT", "PIP_REQUIREMENT", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL"):
        monkeypatch.setenv(k, str(tmp_path / "does-not-exist"))
    pip_install(str(venv), [(whl, _sha(whl))])
    assert wheelkit.installed(venv, "env-demo") == "1.0"


def test_pips_output_is_kept_to_its_last_2000_characters(venv, tmp_path):
    deep = tmp_path.joinpath(*[c * 200 for c in "abcdefghijkl"])  # pip names the file: a long report
    whl = wheelkit.build_wheel(deep, "long-demo", "1.0")
    with pytest.raises(PipFailed) as exc:
        pip_install(str(venv), [(whl, "0" * 64)])
    assert len(exc.value.output) == 2000 and exc.value.output.rstrip().endswith(_sha(whl))


def test_the_folder_pip_installs_into_for_this_python_a_venv_and_another(venv, tmp_path):
    import subprocess
    import sys
    import sysconfig

    # The wheel step locks this folder: it must be the one pip writes, whichever Python is named.
    assert install.install_dir(sys.executable) == Path(sysconfig.get_path("purelib"))
    assert install.install_dir(str(venv)) == Path(install._import_path(str(venv))[0][0])
    assert install.install_dir(str(venv)) != Path(sysconfig.get_path("purelib"))
    py = wheelkit.make_system_python(tmp_path / "sys", externally_managed=True)
    want = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert install.install_dir(str(py)) == Path(want) != Path(sysconfig.get_path("purelib"))
