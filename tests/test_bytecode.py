"""Issue 16, part 2: stale bytecode is reported only where it is proven.

On a real patched release tree with real `compileall` / `py_compile` output, a .pyc that
Python would load and whose code is the current source's passes after chmod, chown, `touch -m`
and a tar round trip (Python's tarfile: new inodes, new ctimes, as an image layer gives). A .pyc
compiled from other text with the same size and mtime is still caught, and `install` names
each file it removes and why.
"""

from __future__ import annotations

import compileall
import json
import os
import py_compile
import subprocess
import sys
import tarfile
from pathlib import Path

import realvllm
from conftest import run_cli

VERSION = "0.26.0"
SOURCES = (realvllm.HELPER, realvllm.MODEL, realvllm.MTP)


def verify(root: Path) -> tuple[int, dict]:
    r = run_cli("verify", "--no-wheels", "--vllm-root", str(root), "--json")
    return r.returncode, json.loads(r.stdout)


def patched_tree_with_bytecode(vllm_tree) -> Path:
    root = vllm_tree(VERSION)
    r = run_cli("install", "--no-wheels", "--vllm-root", str(root))
    assert r.returncode == 0, r.stderr
    for rel in SOURCES:
        src = root / rel
        # What pip and an image build leave: timestamp .pycs of every level, and PEP 552 ones.
        assert compileall.compile_file(str(src), quiet=1, optimize=[0, 1, 2])
    py_compile.compile(str(root / realvllm.HELPER),
                       cfile=str(root / realvllm.HELPER).replace("fused_allreduce_gemma_rms_norm.py",
                                                                 "__pycache__/fused_allreduce_gemma_rms_norm."
                                                                 "other-99.pyc"),
                       invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
    return root


def pycs(root: Path) -> list[Path]:
    return sorted((root / "vllm").rglob("*.pyc"))


def test_valid_bytecode_passes_after_chmod_chown_touch_and_a_tar_round_trip(vllm_tree, tmp_path):
    root = patched_tree_with_bytecode(vllm_tree)
    assert len(pycs(root)) >= 9
    # The image was built an hour ago: its .pycs' own mtimes say so (Python never reads them).
    for p in pycs(root):
        os.utime(p, (p.stat().st_atime - 3600, p.stat().st_mtime - 3600))
    assert verify(root)[0] == 0

    for rel in SOURCES:
        src = root / rel
        os.chmod(src, 0o600)
        os.chmod(src, 0o644)
        st = src.stat()
        os.chown(src, st.st_uid, st.st_gid)  # resets ctime, as `chown -R` in a Containerfile does
        assert src.stat().st_ctime_ns > min(p.stat().st_mtime_ns for p in pycs(root))
    code, out = verify(root)
    assert code == 0 and out["problems"] == [], out["problems"]

    # A tar round trip (an image layer): every file new, mtimes kept, ctimes now.
    archive = tmp_path / "layer.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(root, arcname="sp")
    unpacked = tmp_path / "unpacked"
    with tarfile.open(archive) as tf:
        tf.extractall(unpacked, filter="tar")
    moved = unpacked / "sp"
    assert len(pycs(moved)) == len(pycs(root))
    code, out = verify(moved)
    assert code == 0 and out["problems"] == [], out["problems"]
    # Python itself loads those .pycs (no recompile), so passing them is not a blind spot.
    probe = subprocess.run([sys.executable, "-c",
                            "import importlib.util\n"
                            f"s=importlib.util.spec_from_file_location('h',{str(moved / realvllm.HELPER)!r})\n"
                            "def no(*a, **k): raise SystemExit('recompiled')\n"
                            "s.loader.source_to_code=no;s.loader.get_code('h');print('from cache')"],
                           capture_output=True, text=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert probe.stdout.strip() == "from cache", probe.stderr

    # `touch -m`: the recorded mtime no longer matches, Python recompiles, nothing is stale.
    os.utime(moved / realvllm.MODEL)
    code, out = verify(moved)
    assert code == 0 and out["problems"] == [], out["problems"]
    r = run_cli("install", "--no-wheels", "--vllm-root", str(moved))
    assert r.returncode == 0 and "nothing to do: already patched" in r.stdout and "removed" not in r.stdout


def _same_size_other_text(src: Path) -> bytes:
    text = src.read_bytes()
    assert text.count(f'M3FUSE_SET = "vllm-{VERSION}"'.encode()) == 1
    other = text.replace(f'M3FUSE_SET = "vllm-{VERSION}"'.encode(), b'M3FUSE_SET = "vllm-9.99.9"')
    assert len(other) == len(text) and other != text
    return other


def test_a_pyc_of_other_text_with_the_same_size_and_mtime_is_caught_and_removed_by_name(vllm_tree, tmp_path):
    root = patched_tree_with_bytecode(vllm_tree)
    src = root / realvllm.HELPER
    st = src.stat()
    pyc = Path(py_compile.compile(str(src), optimize=0))  # the interpreter's own cache path
    decoy = tmp_path / src.name
    decoy.write_bytes(_same_size_other_text(src))
    os.utime(decoy, ns=(st.st_atime_ns, st.st_mtime_ns))
    py_compile.compile(str(decoy), cfile=str(pyc), dfile=str(src))
    assert pyc.read_bytes()[8:16] == Path(py_compile.compile(str(decoy), cfile=str(tmp_path / "x.pyc"))
                                          ).read_bytes()[8:16]  # header: same mtime, same size
    # Python really would run the other text from it:
    probe = subprocess.run([sys.executable, "-c",
                            "import importlib.util;"
                            f"s=importlib.util.spec_from_file_location('h',{str(src)!r});"
                            "print([c for c in s.loader.get_code('h').co_consts if c == 'vllm-9.99.9'])"],
                           capture_output=True, text=True)
    assert probe.stdout.strip() == "['vllm-9.99.9']", probe.stderr

    code, out = verify(root)
    assert code == 3
    (problem,) = out["problems"]
    assert pyc.name in problem and "timestamp .pyc" in problem and "compiled from other source text" in problem
    (f,) = [f for f in out["files"] if f["path"] == realvllm.HELPER]
    assert f["stale_bytecode"] and not any(g["stale_bytecode"] for g in out["files"] if g is not f)

    r = run_cli("install", "--no-wheels", "--vllm-root", str(root))
    assert r.returncode == 0, r.stderr
    assert f"removed {pyc}: timestamp .pyc" in r.stdout and "compiled from other source text" in r.stdout
    assert "nothing to do" not in r.stdout
    assert not pyc.exists()
    assert verify(root)[0] == 0


def test_hash_based_pycs_follow_pep_552(vllm_tree, tmp_path):
    root = vllm_tree(VERSION)
    src = root / realvllm.HELPER
    pyc = Path(py_compile.compile(str(src), invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH))
    assert verify(root)[0] == 3  # pristine tree, expected patched: the pyc is not the issue
    code, out = verify(root)
    assert out["problems"] == []  # a checked pyc of the current text: valid
    # A checked pyc of other text: Python checks the hash, recompiles, never runs it.
    decoy = tmp_path / src.name
    decoy.write_bytes(src.read_bytes() + b"\nX = 1\n")
    py_compile.compile(str(decoy), cfile=str(pyc), invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
    assert verify(root)[1]["problems"] == []
    # An unchecked one of other text: Python runs it without looking. Proven stale.
    py_compile.compile(str(decoy), cfile=str(pyc), invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    problems = verify(root)[1]["problems"]
    assert len(problems) == 1 and "unchecked hash-based" in problems[0] and "other source text" in problems[0]
    # An unchecked one of the current text runs the current code: valid.
    py_compile.compile(str(src), cfile=str(pyc), invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    assert verify(root)[1]["problems"] == []
    # A header Python accepts over a body that is not code: refused by name.
    pyc.write_bytes(pyc.read_bytes()[:16] + b"\x00garbage")
    problems = verify(root)[1]["problems"]
    assert len(problems) == 1 and "not valid marshalled code" in problems[0]
