"""Issue 25, V3-V9 and V11: every byte m3fuse does not own is read through safeio (regular
files only, no link followed, bounded, strict UTF-8) and parsed through pysource (size first,
every parser failure a clean error).

A FIFO planted where m3fuse reads would hang the old code forever: those cases run in a child
with a timeout, so a hang is a failure, not a stuck suite. Real artifacts throughout: real vLLM
release trees and wheel members, real wheels built with zipfile, the real CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

import realvllm
import wheelkit
from conftest import REPO, run_cli

AITER_CAR = "aiter/dist/device_communicators/custom_all_reduce.py"
# Source the parser cannot handle: RecursionError on Python 3.11-3.13 (MemoryError for the
# unary form), where only SyntaxError used to be caught. 400 KB: under the size limit.
DEEP = "x = " + "+".join(["a"] * 200000) + "\n"
DEEP_UNARY = "x = " + "-" * 200000 + "1\n"
HUGE = "x = 1\n" * ((1 << 20) // 6 + 4096)  # valid Python, just past pysource.MAX_PARSE


def in_child(code: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter with m3fuse importable; a hang fails the test."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})


def no_traceback(r: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in r.stderr, r.stderr[-2500:]


# ------------------------------------------------------------------------- V3: bounded parsing


@pytest.mark.parametrize("text", [DEEP, DEEP_UNARY, HUGE], ids=["deep", "deep-unary", "huge"])
def test_v3_stale_check_of_an_unparsable_source_reports_its_bytecode(text, tmp_path):
    """A source the check cannot compile within bounds: a .pyc Python runs without looking at it
    (unchecked hash) is reported as not judgeable, never a traceback, never a 5 GB compile."""
    import importlib.util
    import marshal

    from m3fuse.bytecode import stale_bytecode

    src = tmp_path / "m.py"
    src.write_text(text)
    pyc = src.parent / "__pycache__" / f"m.{sys.implementation.cache_tag}.pyc"
    pyc.parent.mkdir()
    pyc.write_bytes(importlib.util.MAGIC_NUMBER + struct.pack("<I", 0b01) + b"\0" * 8
                    + marshal.dumps(compile("x = 1\n", str(src), "exec")))
    found = stale_bytecode(src)
    assert len(found) == 1, found
    assert "cannot be judged" in found[0].reason, found[0].reason
    assert ("larger than" if text is HUGE else "nested too deeply") in found[0].reason, found[0].reason


@pytest.mark.parametrize("text", [DEEP, DEEP_UNARY], ids=["deep", "deep-unary"])
def test_v3_the_aiter_content_check_of_deep_source_is_a_problem_not_a_traceback(text):
    from m3fuse.wheels.check import aiter_problems
    from m3fuse.wheels.fit import api_of

    problems = aiter_problems(text)
    assert len(problems) == 1 and "nested too deeply" in problems[0], problems
    assert api_of(text) is None


def test_v3_an_installed_aiter_source_past_the_parse_limit_is_not_parsed(tmp_path):
    from m3fuse.wheels.fit import from_tree

    car = tmp_path / AITER_CAR
    car.parent.mkdir(parents=True)
    car.write_text(wheelkit.aiter_source() + "#" * (1 << 20) + "\n")  # the real API, then 1 MiB more
    prov = from_tree(tmp_path, "0.1.15.post1", "amd-aiter", ())
    assert prov.api == {} and len(prov.content_problems) == 1, prov
    assert "larger than" in prov.content_problems[0], prov.content_problems


def test_v3_env_with_a_deeply_nested_envs_py_is_a_clean_drift_error(vllm_tree):
    root = vllm_tree("0.26.0")
    (root / "vllm" / "envs.py").write_text(DEEP)
    r = run_cli("env", "off", "--vllm-root", str(root))
    no_traceback(r)
    assert r.returncode == 3 and "envs.py" in r.stderr and "nested too deeply" in r.stderr, r.stderr


def test_v3_needs_with_a_deeply_nested_release_source_is_refused_cleanly(vllm_tree, tmp_path):
    root = vllm_tree("0.26.0")
    (root / "vllm" / "models" / "minimax_m3" / "amd" / "deep.py").write_text(DEEP)
    sets = tmp_path / "sets"
    shutil.copytree(REPO / "patches" / "vllm-0.26.0", sets / "vllm-0.26.0")
    r = run_cli("needs", str(sets / "vllm-0.26.0"), "--vllm", str(root), "--check")
    no_traceback(r)
    assert r.returncode == 2 and "deep.py" in r.stderr and "nested too deeply" in r.stderr, r.stderr


@pytest.fixture
def work_folder(pristine_trees, vllm_tree, tmp_path) -> Path:
    """A real `m3fuse port --edit` work folder (0.28.0 from the 0.26.0 set)."""
    bases = tmp_path / "base-sets"
    shutil.copytree(REPO / "patches" / "vllm-0.26.0", bases / "vllm-0.26.0")
    root, out, work = vllm_tree("0.28.0"), tmp_path / "out", tmp_path / "w"
    out.mkdir()
    r = run_cli("port", "--vllm-root", str(root), "--from", "vllm-0.26.0", "--name", "p", "--out", str(out),
                "--workdir", str(work), "--edit", "--patches", str(bases), "--base-root", str(pristine_trees("0.26.0")))
    assert r.returncode == 0, r.stderr
    return work


def test_v3_port_resume_of_a_deeply_nested_merged_file_says_it_does_not_compile(work_folder, tmp_path):
    (work_folder / "merged" / realvllm.MODEL).write_text(DEEP)
    r = run_cli("port", "--resume", str(work_folder), "--out", str(tmp_path / "out"))
    no_traceback(r)
    assert r.returncode == 6 and "does not compile" in r.stderr and "nested too deeply" in r.stderr, r.stderr


def test_v3_port_resume_of_a_deeply_nested_work_file_is_refused(work_folder, tmp_path):
    (work_folder / "port.json").write_text("[" * 100000 + "]" * 100000)
    r = run_cli("port", "--resume", str(work_folder), "--out", str(tmp_path / "out"))
    no_traceback(r)
    assert r.returncode == 2 and "not a readable port work file" in r.stderr, r.stderr


# ------------------------------------------------------------------------- V4: installed AITER


@pytest.mark.parametrize("kind", ["fifo", "device", "symlink"])
def test_v4_the_installed_aiter_source_is_read_only_as_a_regular_file(kind, tmp_path):
    car = tmp_path / "site" / AITER_CAR
    car.parent.mkdir(parents=True)
    if kind == "fifo":
        os.mkfifo(car)
    elif kind == "device":
        os.mknod(car, 0o600 | 0o020000, os.makedev(1, 5))  # /dev/zero
    else:
        real = tmp_path / "elsewhere.py"
        real.write_text(wheelkit.aiter_source())
        car.symlink_to(real)
    r = in_child("""
        import json, sys
        from pathlib import Path
        from m3fuse.wheels.fit import from_tree
        print(json.dumps(from_tree(Path(sys.argv[1]), "0.1.15.post1", "amd-aiter", ()).content_problems))
    """, str(tmp_path / "site"))
    no_traceback(r)
    problems = json.loads(r.stdout)
    want = {"fifo": "a FIFO", "device": "a character device", "symlink": "a symbolic link"}[kind]
    assert len(problems) == 1 and "cannot be read" in problems[0] and want in problems[0], problems


# ------------------------------------------------------------------------- V5: dist-info


def fake_site(tmp_path: Path, record_size: int | str, *, metadata_fifo: bool = False) -> Path:
    """A site-packages holding amd-aiter whose RECORD lists a 20 GB sparse file."""
    site = tmp_path / "site"
    info = site / "amd_aiter-0.1.15.post1.dist-info"
    info.mkdir(parents=True)
    (site / "aiter").mkdir()
    big = site / "aiter" / "big.bin"
    with open(big, "wb") as f:
        f.truncate(20 << 30)  # sparse: no disk used, 45 s to hash
    if metadata_fifo:
        os.mkfifo(info / "METADATA")
    else:
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: amd-aiter\nVersion: 0.1.15.post1\n\n")
    (info / "RECORD").write_text(f"aiter/big.bin,sha256=AAAA,{record_size}\n"
                                 f"amd_aiter-0.1.15.post1.dist-info/RECORD,,\n")
    return site


PROBE = """
    import json, sys
    from m3fuse.wheels.install import _PROBE_CODE
    ns = {}
    exec(compile(_PROBE_CODE, "<probe>", "exec"), ns)
    print(json.dumps(ns["m3fuse_probe"](["amd-aiter"], ["amd-aiter"], [sys.argv[1]], False)["dists"]["amd-aiter"]))
"""


def test_v5_a_record_row_whose_size_differs_is_judged_before_a_byte_is_hashed(tmp_path):
    site = fake_site(tmp_path, 1024)
    r = in_child(PROBE, str(site), timeout=15)
    no_traceback(r)
    info = json.loads(r.stdout)
    assert info["version"] == "0.1.15.post1"
    assert len(info["problems"]) == 1 and info["problems"][0].startswith("modified: aiter/big.bin"), info


def test_v5_a_huge_file_listed_with_its_true_size_is_not_hashed(tmp_path):
    site = fake_site(tmp_path, 20 << 30)
    r = in_child(PROBE, str(site), timeout=15)
    no_traceback(r)
    info = json.loads(r.stdout)
    assert len(info["problems"]) == 1 and "larger than" in info["problems"][0], info


def test_v5_a_fifo_as_metadata_is_not_read(tmp_path):
    site = fake_site(tmp_path, 1024, metadata_fifo=True)
    r = in_child(PROBE, str(site), timeout=15)
    no_traceback(r)
    assert json.loads(r.stdout)["version"] is None


# ------------------------------------------------------------------------- V6: aiter-needs.toml


@pytest.mark.parametrize("kind", ["fifo", "symlink", "huge", "not-utf8"])
def test_v6_the_needs_file_is_read_only_as_a_small_regular_utf8_file(kind, tmp_path):
    folder = tmp_path / "vllm-0.33.0"
    shutil.copytree(REPO / "patches" / "vllm-0.33.0", folder)
    needs = folder / "aiter-needs.toml"
    good = needs.read_bytes()
    needs.unlink()
    if kind == "fifo":
        os.mkfifo(needs)
    elif kind == "symlink":
        (tmp_path / "copy.toml").write_bytes(good)
        needs.symlink_to(tmp_path / "copy.toml")
    elif kind == "huge":
        needs.write_bytes(good + b"#" * (5 << 20))
    else:
        needs.write_bytes(good.replace(b"format", b"# \xff\nformat", 1))
    r = in_child("""
        import sys
        from pathlib import Path
        from m3fuse.errors import PatchSetError
        from m3fuse.wheels.needs import load_needs
        try:
            load_needs(Path(sys.argv[1]))
        except PatchSetError as exc:
            print(exc.message)
        else:
            print("read")
    """, str(folder))
    no_traceback(r)
    want = {"fifo": "a FIFO", "symlink": "a symbolic link", "huge": "larger than", "not-utf8": "not UTF-8"}[kind]
    assert "aiter-needs.toml" in r.stdout and want in r.stdout, r.stdout


# ------------------------------------------------------------------------- V7: envs.py and the helper


def test_v7_a_fifo_as_envs_py_is_refused_unread(vllm_tree):
    root = vllm_tree("0.26.0")
    envs = root / "vllm" / "envs.py"
    envs.unlink(missing_ok=True)
    os.mkfifo(envs)
    r = subprocess.run([sys.executable, "-m", "m3fuse", "env", "off", "--vllm-root", str(root)],
                       capture_output=True, text=True, timeout=60)
    no_traceback(r)
    assert r.returncode == 5 and str(envs) in r.stderr and "a FIFO" in r.stderr, r.stderr


def test_v7_a_fifo_as_the_helper_is_not_read_by_env(tmp_path):
    helper = tmp_path / "vllm" / "model_executor" / "layers" / "fused_allreduce_gemma_rms_norm.py"
    helper.parent.mkdir(parents=True)
    os.mkfifo(helper)
    r = in_child("""
        import sys
        from pathlib import Path
        from m3fuse.runtime.env import has_one_stage_branch
        print(has_one_stage_branch(Path(sys.argv[1])))
    """, str(tmp_path))
    no_traceback(r)
    assert r.stdout.strip() == "None"


# ------------------------------------------------------------------------- V8: the release in `needs`


def release_wheel(tmp_path: Path, extra: dict[str, int]) -> Path:
    """A small 'release' wheel: vLLM 0.26.0's METADATA and M3 model files, plus members of
    the given sizes (highly compressible: a few KB each on disk)."""
    wheel = tmp_path / "vllm-0.26.0-cp38-abi3-linux_x86_64.whl"
    src = realvllm.wheel_path("0.26.0")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zout:
        for n in zin.namelist():
            if n.startswith("vllm/models/minimax_m3/") or n == realvllm.HELPER or n.endswith(".dist-info/METADATA"):
                zout.writestr(n, zin.read(n))
        for name, size in extra.items():
            zout.writestr(name, b"#" * size)
    return wheel


def set_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "sets" / "vllm-0.26.0"
    shutil.copytree(REPO / "patches" / "vllm-0.26.0", folder)
    return folder


def test_v8_a_release_member_past_the_limit_is_refused_uninflated(tmp_path):
    from m3fuse import safeio

    wheel = release_wheel(tmp_path, {"vllm/bomb.py": safeio.MAX_MEMBER + 1})
    assert wheel.stat().st_size < 2 << 20
    r = run_cli("needs", str(set_copy(tmp_path)), "--vllm", str(wheel), "--check")
    no_traceback(r)
    assert r.returncode == 2 and "vllm/bomb.py" in r.stderr and "larger than" in r.stderr, r.stderr


def test_v8_a_release_whose_sources_inflate_past_the_budget_is_refused(tmp_path, monkeypatch):
    from m3fuse.errors import UsageProblem
    from m3fuse.patching.patchset import load_patchset
    from m3fuse.wheels import needs

    monkeypatch.setattr(needs, "MAX_RELEASE_SOURCES", 8 << 20)  # the mechanism, at a test's scale
    wheel = release_wheel(tmp_path, {f"vllm/part{i}.py": 3 << 20 for i in range(4)})
    with pytest.raises(UsageProblem, match="all of them"):
        needs.derive([wheel], load_patchset(set_copy(tmp_path)).parse())


def test_v8_a_fifo_in_a_release_tree_is_refused_unread(vllm_tree, tmp_path):
    root = vllm_tree("0.26.0")
    os.mkfifo(root / "vllm" / "planted.py")
    r = subprocess.run([sys.executable, "-m", "m3fuse", "needs", str(set_copy(tmp_path)), "--vllm", str(root),
                        "--check"], capture_output=True, text=True, timeout=120)
    no_traceback(r)
    assert r.returncode == 2 and "planted.py" in r.stderr and "a FIFO" in r.stderr, r.stderr


# ------------------------------------------------------------------------- V9: lock add


def test_v9_lock_add_never_inflates_an_oversized_aiter_source(tmp_path):
    wheel = wheelkit.build_wheel(tmp_path / "w", "amd-aiter", "0.1.15.post1+bomb", {
        "aiter/__init__.py": "", "aiter/dist/__init__.py": "", "aiter/dist/device_communicators/__init__.py": "",
        AITER_CAR: wheelkit.aiter_source() + "#" * (64 << 20) + "\n"})  # 64 MiB inflated, ~64 KB on disk
    assert wheel.stat().st_size < 1 << 20
    lock = tmp_path / "wheels.lock"
    r = run_cli("lock", "add", str(wheel), "--url", "https://example.invalid/" + wheel.name, "--lock", str(lock))
    no_traceback(r)
    assert r.returncode == 4 and AITER_CAR in r.stderr and "zip bomb" in r.stderr, (r.returncode, r.stderr)
    assert not lock.exists()


# ------------------------------------------------------------------------- V11: resolution diffs


@pytest.fixture(scope="module")
def wheels() -> Path:
    for v in ("0.26.0", "0.30.0", "0.31.0", "0.32.0", "0.33.0", "0.34.0"):
        realvllm.wheel_path(v)
    return realvllm.cache_root() / "vllm"


@pytest.mark.parametrize("kind", ["symlink", "fifo", "not-utf8", "huge"])
def test_v11_a_resolution_diff_is_read_only_as_a_small_regular_utf8_file(kind, wheels, tmp_path):
    patches = tmp_path / "patches"
    shutil.copytree(REPO / "patches", patches)
    res = patches / "vllm-0.30.0" / "model.py.resolution.diff"
    good = res.read_bytes()
    res.unlink()
    if kind == "symlink":  # to an exact copy: only following the link could make it pass
        (tmp_path / "copy.diff").write_bytes(good)
        res.symlink_to(tmp_path / "copy.diff")
    elif kind == "fifo":
        os.mkfifo(res)
    elif kind == "not-utf8":
        res.write_bytes(good + b"\xff\n")
    else:
        res.write_bytes(good + b" " * (5 << 20))
    r = subprocess.run([sys.executable, "-m", "m3fuse", "port", "--refresh", "--check", "--patches", str(patches),
                        "--wheels", str(wheels)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    no_traceback(r)
    want = {"symlink": "a symbolic link", "fifo": "a FIFO", "not-utf8": "not UTF-8", "huge": "larger than"}[kind]
    assert r.returncode == 3 and str(res) in r.stderr and want in r.stderr, (r.returncode, r.stderr[-1500:])
