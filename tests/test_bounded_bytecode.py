"""Issue 25, V1 and V2: stale bytecode that Python would run is reported, and judging it is
bounded (a .pyc's body is never unmarshalled).

The sources are real vLLM 0.33.0 files; the .pycs are what `py_compile` writes, edited the way
an attacker who can write `__pycache__` would.
"""

from __future__ import annotations

import importlib.util
import json
import marshal
import os
import py_compile
import random
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import realvllm
from conftest import REPO, run_cli

VERSION = "0.33.0"
SMALL = "vllm/models/minimax_m3/amd/model_state.py"  # 1.7 KB: a quick compile per fuzz case
TAG = sys.implementation.cache_tag


def source(tmp_path: Path, member: str = realvllm.MODEL) -> Path:
    src = tmp_path / "pkg" / Path(member).name
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(realvllm.read_member(VERSION, member))
    return src


def pyc_of(src: Path) -> Path:
    return src.parent / "__pycache__" / f"{src.stem}.{TAG}.pyc"


def timestamp_header(src: Path) -> bytes:
    st = src.stat()
    return importlib.util.MAGIC_NUMBER + struct.pack("<III", 0, int(st.st_mtime) & 0xFFFFFFFF, st.st_size & 0xFFFFFFFF)


def write_pyc(src: Path, code, *, where: Path | None = None, tail: bytes = b"") -> Path:
    """A timestamp .pyc Python would load for `src` (its recorded mtime and size are src's)."""
    out = where or pyc_of(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(timestamp_header(src) + marshal.dumps(code) + tail)
    return out


def stale(src: Path) -> list[str]:
    from m3fuse.bytecode import stale_bytecode

    return [f"{b.path.name}: {b.reason}" for b in stale_bytecode(src)]


def compiled(src: Path):
    return compile(src.read_bytes(), str(src), "exec", dont_inherit=True)


def other_code(src: Path):
    return compile(src.read_bytes() + b"\nimport os as _planted\n", str(src), "exec", dont_inherit=True)


# ------------------------------------------------------------------------------------ V1


def test_v1_valid_pyc_of_the_current_text_passes(tmp_path):
    src = source(tmp_path)
    py_compile.compile(str(src), dfile="/somewhere/else/model.py")  # compiled under another path
    assert stale(src) == []


def test_v1_a_small_module_compiled_under_a_long_path_passes(tmp_path):
    """The file name is not part of the comparison, nor of its size budget."""
    src = tmp_path / "pkg" / "tiny.py"
    src.parent.mkdir()
    src.write_text("X = 1\n")
    py_compile.compile(str(src), dfile="/" + "d" * 300 + "/site-packages/pkg/tiny.py")
    assert stale(src) == []


def test_v1_a_pyc_that_is_a_symlink_is_reported_not_skipped(tmp_path):
    src = tmp_path / "pkg" / "plain.py"  # imports nothing, so Python can be shown running it
    src.parent.mkdir()
    src.write_text("VALUE = 'source'\n")
    foreign = compile("VALUE = 'foreign'\n", str(src), "exec", dont_inherit=True)
    elsewhere = write_pyc(src, foreign, where=tmp_path / "outside" / "foreign.pyc")
    link = pyc_of(src)
    link.parent.mkdir()
    link.symlink_to(elsewhere)
    # Python itself runs the foreign code through the link:
    probe = subprocess.run([sys.executable, "-c", "import plain; print(plain.VALUE)"], cwd=src.parent,
                           capture_output=True, text=True)
    assert probe.stdout.strip() == "foreign", probe.stderr[-800:]
    found = stale(src)
    assert len(found) == 1 and link.name in found[0] and "symbolic link" in found[0], found


def test_v1_a_symlinked_pycache_is_reported(tmp_path):
    src = source(tmp_path)
    outside = tmp_path / "outside"
    write_pyc(src, other_code(src), where=outside / pyc_of(src).name)
    (src.parent / "__pycache__").symlink_to(outside)
    found = stale(src)
    assert any("__pycache__" in f and "symbolic link" in f for f in found), found


def test_v1_a_pyc_past_the_read_limit_is_reported_not_skipped(tmp_path):
    from m3fuse import safeio

    src = source(tmp_path)
    # marshal.loads ignores what follows the code object: Python runs this 17 MiB file's code.
    pyc = write_pyc(src, other_code(src), tail=b"\0" * (safeio.MAX_SOURCE + (1 << 20)))
    assert pyc.stat().st_size > safeio.MAX_SOURCE
    found = stale(src)
    assert len(found) == 1 and "larger than" in found[0] and "Python would still load it" in found[0], found


def test_v1_a_different_co_stacksize_is_caught(tmp_path):
    src = source(tmp_path)
    code = compiled(src)
    fn = next(c for c in code.co_consts if hasattr(c, "co_code") and c.co_stacksize > 0)
    changed = code.replace(co_consts=tuple(fn.replace(co_stacksize=fn.co_stacksize + 1) if c is fn else c
                                           for c in code.co_consts))
    assert changed == code  # the code object's own == does not see it: that was the hole
    write_pyc(src, changed)
    found = stale(src)
    assert len(found) == 1 and "other source text" in found[0], found


def test_v1_a_different_local_variable_kind_is_caught(tmp_path):
    src = tmp_path / "pkg" / "kinds.py"
    src.parent.mkdir()
    src.write_text("def f(x):\n    return x\n")
    code = compiled(src)
    fn = code.co_consts[0]
    # x becomes a cell variable as well: same names, same bytecode, another local kind.
    celled = fn.replace(co_cellvars=("x",))
    assert celled.co_varnames == fn.co_varnames and celled.co_code == fn.co_code
    changed = code.replace(co_consts=(celled, *code.co_consts[1:]))
    assert changed == code
    write_pyc(src, changed)
    found = stale(src)
    assert len(found) == 1 and "other source text" in found[0], found


def test_v1_verify_fails_on_a_stacksize_edit_in_a_real_tree(vllm_tree):
    root = vllm_tree("0.26.0")
    src = root / realvllm.HELPER
    code = compiled(src)
    write_pyc(src, code.replace(co_stacksize=code.co_stacksize + 7))
    r = run_cli("verify", "--no-wheels", "--expect", "pristine", "--vllm-root", str(root), "--json")
    out = json.loads(r.stdout)
    assert r.returncode != 0 and any("other source text" in p for p in out["problems"]), (r.returncode, out)


# ------------------------------------------------------------------------------------ V2

BOUNDED = textwrap.dedent("""
    import json, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # 1 GiB of address space in all
    sys.path.insert(0, sys.argv[1])
    from m3fuse.bytecode import stale_bytecode
    from pathlib import Path
    print(json.dumps([b.reason for b in stale_bytecode(Path(sys.argv[2]))]))
""")


def run_bounded(src: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BOUNDED, str(REPO), str(src)], capture_output=True, text=True,
                          timeout=120)


def test_v2_a_21_byte_pyc_declaring_a_huge_list_is_reported_within_a_small_memory_limit(tmp_path):
    src = source(tmp_path)
    pyc = pyc_of(src)
    pyc.parent.mkdir()
    pyc.write_bytes(timestamp_header(src) + b"[" + struct.pack("<i", 1 << 28))  # marshal would allocate 2.1 GB
    assert pyc.stat().st_size == 21
    r = run_bounded(src)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-1500:]
    reasons = json.loads(r.stdout)
    assert len(reasons) == 1 and "not valid marshalled code" in reasons[0] and "declares" in reasons[0], reasons


FUZZ = textwrap.dedent("""
    import json, random, resource, struct, sys
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    sys.path.insert(0, sys.argv[1])
    from pathlib import Path
    from m3fuse.bytecode import stale_bytecode
    src, pyc, seed, n = Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    good = pyc.read_bytes()
    head, body = good[:16], good[16:]
    rng = random.Random(seed)
    big = [b"[", b"(", b"<", b">", b"l", b"s", b"u", b"r", b"c", b"{", b"\\xdb", b"\\xa8"]
    counts = {"reported": 0, "passed": 0}
    for i in range(n):
        b = bytearray(body)
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(4)
            at = rng.randrange(len(b))
            if op == 0:
                b[at] = rng.randrange(256)
            elif op == 1:
                b[at:at] = rng.choice(big) + struct.pack("<i", rng.choice([1 << 28, -1, 2**31 - 1, rng.randrange(1 << 20)]))
            elif op == 2:
                del b[at:]
                b += bytes([rng.randrange(256)])
            else:
                b[at:at] = bytes(b[rng.randrange(len(b)):][:rng.randrange(64)])
        pyc.write_bytes(head + bytes(b))
        found = stale_bytecode(src)  # any exception is a failure: it escapes and exits 1
        counts["reported" if found else "passed"] += 1
    print(json.dumps(counts))
""")


def test_v2_fuzzed_pyc_bodies_never_raise_and_stay_within_a_memory_limit(tmp_path):
    src = source(tmp_path, SMALL)
    pyc = Path(py_compile.compile(str(src), invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH))
    assert stale(src) == []
    r = subprocess.run([sys.executable, "-c", FUZZ, str(REPO), str(src), str(pyc), "2025", "600"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    counts = json.loads(r.stdout)
    assert counts["reported"] + counts["passed"] == 600
    assert counts["reported"] >= 500, counts  # nearly every edit changes the code; all were judged


def test_the_canonical_walk_follows_real_vllm_code_on_this_python():
    """80 real vLLM 0.33.0 sources: the walk consumes each dump whole, ignores the file name and
    reference flags (a load and re-dump, as the import system writes it, compares equal), and
    sees a one-field change anywhere."""
    import zipfile

    from m3fuse import marshalcanon

    with zipfile.ZipFile(realvllm.wheel_path(VERSION)) as zf:
        names = sorted(n for n in zf.namelist() if n.startswith("vllm/") and n.endswith(".py"))[::40][:80]
        sources = {n: zf.read(n) for n in names}
    changed = 0
    for name, text in sources.items():
        here = compile(text, "/here/" + name, "exec", dont_inherit=True)
        there = compile(text, "/elsewhere/much/longer/" + name, "exec", dont_inherit=True)
        want = marshalcanon.canonical(marshal.dumps(here), whole=True)
        assert marshalcanon.canonical(marshal.dumps(there), budget=len(want)) == want, name
        redumped = marshal.dumps(marshal.loads(marshal.dumps(there)))
        assert marshalcanon.canonical(redumped, budget=len(want)) == want, name
        for field in ("co_stacksize", "co_firstlineno", "co_flags"):
            edited = marshal.dumps(here.replace(**{field: getattr(here, field) + 1}))
            try:
                assert marshalcanon.canonical(edited, budget=len(want)) != want, (name, field)
            except marshalcanon.OverBudget:
                pass
            changed += 1
    assert len(sources) == 80 and changed == 240
