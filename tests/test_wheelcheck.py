"""Pre-install checks on the wheel file: tags for the target interpreter, METADATA, member
paths, and the AITER API check (on built wheels and on the real public amd-aiter 0.1.7)."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import pytest

from m3fuse.errors import EXIT_ENVIRONMENT, EXIT_INTEGRITY, EnvironmentProblem
from m3fuse.wheels.lock import LockedPackage, LockedWheel
from m3fuse.wheels.check import (AITER_CAR, WheelCheckError, aiter_problems, check_wheel, read_metadata,
                                 target_tags, unsafe_member)
from m3fuse.wheels.lock import Lock
from m3fuse.wheels.plan import INSTALL, Step, choose_wheels

from wheelkit import aiter_source, aiter_wheel, build_wheel, real_old_aiter

PY = sys.executable
TAGS = target_tags(PY)


def pkg(name: str, version: str, *files: str) -> LockedPackage:
    return LockedPackage(name, version, tuple(LockedWheel(f, f"https://example.invalid/{f}", "0" * 64) for f in files))


def test_target_tags_are_what_the_target_pip_accepts():
    # pip's own vendored packaging decides what it installs, so that is the reference.
    from pip._vendor.packaging.tags import sys_tags

    assert list(TAGS) == [str(t) for t in sys_tags()]
    assert any(t.startswith(f"cp{sys.version_info[0]}{sys.version_info[1]}-") for t in TAGS)
    assert "py3-none-any" in TAGS


def _other_python() -> str | None:
    import glob
    import subprocess

    me = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for cand in sorted(glob.glob("/root/.pyenv/versions/3.1[0-9]*/bin/python3.1[0-9]")) + \
            sorted(glob.glob("/usr/bin/python3.1[0-9]")):
        if not cand.endswith(me):
            ok = subprocess.run([cand, "-m", "pip", "--version"], capture_output=True).returncode == 0
            if ok:
                return cand
    return None


def test_target_tags_of_another_interpreter():
    # The target may be another Python than the one running m3fuse: it answers for itself.
    import subprocess

    other = _other_python()
    if other is None:
        pytest.skip("no second CPython 3.10+ with pip on this machine")
    tags = target_tags(other)
    ver = subprocess.run([other, "-c", "import sys; print('cp%d%d' % sys.version_info[:2])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert tags[0].startswith(ver + "-") and ver != f"cp{sys.version_info[0]}{sys.version_info[1]}"
    w = build_wheel(Path(__import__("tempfile").mkdtemp()), "demo-pkg", "1.0", tag=f"{ver}-{ver}-linux_x86_64")
    p = pkg("demo-pkg", "1.0", w.name)
    check_wheel(w, p, tags, other)  # fits the other interpreter ...
    with pytest.raises(WheelCheckError, match="tag check"):
        check_wheel(w, p, TAGS, PY)  # ... not this one


def test_missing_interpreter():
    with pytest.raises(EnvironmentProblem, match="does not exist") as ei:
        target_tags("/nonexistent/python")
    assert ei.value.exit_code == EXIT_ENVIRONMENT


def test_select_prefers_the_best_fitting_wheel(tmp_path):
    cp = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    p = pkg("demo", "1.0", "demo-1.0-py3-none-any.whl", f"demo-1.0-{cp}-{cp}-manylinux_2_17_x86_64.whl",
            "demo-1.0-cp27-cp27mu-manylinux1_x86_64.whl")
    if sys.platform == "linux" and __import__("platform").machine() == "x86_64":
        steps = [Step(p, None, INSTALL)]
        choose_wheels(steps, lambda: TAGS, Lock(tmp_path / "x.lock", (p,)), PY)
        assert steps[0].wheel.name.startswith(f"demo-1.0-{cp}")
    only_other = pkg("demo", "1.0", "demo-1.0-cp27-cp27mu-manylinux1_x86_64.whl")
    with pytest.raises(EnvironmentProblem, match="no wheel pinned for demo 1.0") as ei:
        choose_wheels([Step(only_other, None, INSTALL)], lambda: TAGS, Lock(tmp_path / "x.lock", (only_other,)), PY)
    assert "cp27-cp27mu-manylinux1_x86_64" in ei.value.message and str(tmp_path / "x.lock") in ei.value.message


def test_good_wheel_passes(tmp_path):
    w = build_wheel(tmp_path, "demo-pkg", "1.0")
    check_wheel(w, pkg("demo-pkg", "1.0", w.name), TAGS, PY)
    assert read_metadata(w) == ("demo-pkg", "1.0")


def test_good_aiter_passes(tmp_path):
    w = aiter_wheel(tmp_path, "0.1.15.post1+rocm7.2.manylinux.2.28")
    check_wheel(w, pkg("amd-aiter", "0.1.15.post1+rocm7.2.manylinux.2.28", w.name), TAGS, PY)


def refused(w: Path, p: LockedPackage) -> str:
    with pytest.raises(WheelCheckError) as ei:
        check_wheel(w, p, TAGS, PY)
    assert ei.value.exit_code == EXIT_INTEGRITY
    assert w.name in ei.value.message and "nothing was installed" in ei.value.message.splitlines()[0]
    assert ei.value.message.splitlines()[-1].startswith("hint: ")
    return ei.value.message


def test_tag_mismatch_refused(tmp_path):
    w = build_wheel(tmp_path, "demo-pkg", "1.0", tag="cp27-cp27mu-manylinux1_x86_64")
    msg = refused(w, pkg("demo-pkg", "1.0", w.name))
    assert "tag check" in msg and "cp27-cp27mu-manylinux1_x86_64" in msg


@pytest.mark.parametrize("meta_name, meta_version", [("other-pkg", None), (None, "1.1"), ("demo-pkg", "1.0.post1")])
def test_metadata_mismatch_refused(tmp_path, meta_name, meta_version):
    w = build_wheel(tmp_path, "demo-pkg", "1.0", meta_name=meta_name, meta_version=meta_version)
    msg = refused(w, pkg("demo-pkg", "1.0", w.name))
    assert "metadata check" in msg and "the lock pins demo-pkg 1.0" in msg


def test_metadata_name_normalisation_accepted(tmp_path):
    w = build_wheel(tmp_path, "demo-pkg", "1.0", meta_name="Demo_Pkg", meta_version="1.0.0")
    check_wheel(w, pkg("demo-pkg", "1.0", w.name), TAGS, PY)


@pytest.mark.parametrize("member, why", [
    ("../evil.py", "contains '..'"), ("demo_pkg/../../evil.py", "contains '..'"),
    ("/etc/evil.py", "is absolute"), ("C:/evil.py", "is absolute"), ("demo_pkg\\..\\..\\x", "contains '..'"),
])
def test_unsafe_members_refused(tmp_path, member, why):
    assert unsafe_member(member) == why
    w = build_wheel(tmp_path, "demo-pkg", "1.0", raw_members={member: b"x"})
    msg = refused(w, pkg("demo-pkg", "1.0", w.name))
    assert "archive path check" in msg and why in msg


def test_symlink_member_refused(tmp_path):
    w = build_wheel(tmp_path, "demo-pkg", "1.0")
    with zipfile.ZipFile(w, "a") as zf:
        zi = zipfile.ZipInfo("demo_pkg/link")
        zi.external_attr = (0o120777 << 16)
        zf.writestr(zi, "/etc/passwd")
    assert "symbolic link" in refused(w, pkg("demo-pkg", "1.0", w.name))


def test_two_dist_infos_refused(tmp_path):
    w = build_wheel(tmp_path, "demo-pkg", "1.0", raw_members={"torch-9.dist-info/METADATA": b"Name: torch\nVersion: 9\n"})
    assert "2 top-level .dist-info" in refused(w, pkg("demo-pkg", "1.0", w.name))


def test_not_a_zip_refused(tmp_path):
    w = tmp_path / "demo_pkg-1.0-py3-none-any.whl"
    w.write_bytes(b"not a zip")
    assert "not a zip" in refused(w, pkg("demo-pkg", "1.0", w.name))


@pytest.mark.parametrize("use_1stage, pool, needles", [
    (False, True, ["use_1stage", "two-stage", "HIP graph"]),
    (True, False, ["_pool", "6144", "0.1.12"]),
    (False, False, ["use_1stage", "_pool"]),
])
def test_aiter_api_check_on_built_wheels(tmp_path, use_1stage, pool, needles):
    w = aiter_wheel(tmp_path, "0.1.15.post1+test", use_1stage=use_1stage, pool=pool)
    msg = refused(w, pkg("amd-aiter", "0.1.15.post1+test", w.name))
    assert "AITER API check" in msg
    for n in needles:
        assert n in msg


def test_aiter_without_the_module_refused(tmp_path):
    w = aiter_wheel(tmp_path, "0.1.15.post1+test", include_module=False)
    msg = refused(w, pkg("amd-aiter", "0.1.15.post1+test", w.name))
    assert AITER_CAR in msg


def test_aiter_ast_details():
    assert aiter_problems(aiter_source()) == []
    # use_1stage as a positional parameter counts too; a comment mentioning it does not.
    src = aiter_source(use_1stage=False).replace("registered: bool = False,", "registered: bool = False,  # use_1stage")
    assert any("use_1stage" in p for p in aiter_problems(src))
    assert any("no class CustomAllreduce" in p for p in aiter_problems("class Other: pass"))
    assert any("does not parse" in p for p in aiter_problems("def (:"))
    # _pool used outside the class does not count.
    src = aiter_source(pool=False) + "\n_pool = None\nx = object()._pool\n"
    assert any("_pool" in p for p in aiter_problems(src))


def test_real_public_aiter_0_1_7_is_refused():
    w = real_old_aiter()
    with zipfile.ZipFile(w) as zf:
        assert AITER_CAR in zf.namelist()  # it has the module, only not the API
    msg = refused(w, pkg("amd-aiter", "0.1.7.post2.dev18", w.name))
    assert "fused_ar_rms takes no use_1stage" in msg
    assert "does not use the _pool IPC buffer pool" in msg
    assert "AITER API check" in msg
