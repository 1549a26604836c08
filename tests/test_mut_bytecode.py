"""Stale-bytecode judgement (m3fuse/bytecode.py) header field by header field: the tests that kill
its mutants (`make mutation MODULE=m3fuse/bytecode.py`), beside tests/test_bytecode.py's runs on
real release files. Every .pyc here is written by py_compile, as Python itself writes them, and
then its header or the source is changed the way a stale cache arises."""

from __future__ import annotations

import importlib.util
import os
import py_compile
import struct
from pathlib import Path

import pytest

from m3fuse import bytecode
from m3fuse.bytecode import stale_bytecode

SRC = b'"""doc"""\n\ndef f(x):\n    assert x\n    return x + 1\n'
OTHER = b'"""doc"""\n\ndef f(x):\n    assert x\n    return x + 2\n'  # same size, other code
T = 1_000_000


def source(tmp_path: Path, text: bytes = SRC, mtime: int = T) -> Path:
    p = tmp_path / "mod.py"
    p.write_bytes(text)
    os.utime(p, (mtime, mtime))
    return p


def pyc(src: Path, *, opt: int | str = "", mode: py_compile.PycInvalidationMode = py_compile.PycInvalidationMode.TIMESTAMP
        ) -> Path:
    out = Path(importlib.util.cache_from_source(str(src), optimization=opt))
    py_compile.compile(str(src), cfile=str(out), doraise=True, optimize=-1 if opt == "" else int(opt),
                       invalidation_mode=mode)
    return out


def reasons(src: Path) -> list[tuple[str, str]]:
    return [(b.path.name, b.reason) for b in stale_bytecode(src)]


# ----------------------------------------------------------------------------- timestamp .pyc
def test_a_pyc_of_the_current_text_is_not_stale(tmp_path):
    src = source(tmp_path)
    pyc(src)
    assert stale_bytecode(src) == []


def test_same_mtime_and_size_but_other_text_is_stale(tmp_path):
    src = source(tmp_path)
    c = pyc(src)
    source(tmp_path, OTHER)
    assert reasons(src) == [(c.name, "timestamp .pyc whose recorded source mtime and size match, but it was "
                                     "compiled from other source text")]


def test_another_mtime_makes_python_recompile(tmp_path):
    src = source(tmp_path)
    pyc(src)
    for delta in (1, -1, 1 << 32 - 1):
        source(tmp_path, OTHER, T + delta)
        assert stale_bytecode(src) == [], delta


def test_another_size_makes_python_recompile(tmp_path):
    src = source(tmp_path)
    pyc(src)
    source(tmp_path, OTHER + b"\n")
    assert stale_bytecode(src) == []
    source(tmp_path, OTHER[:-1])
    assert stale_bytecode(src) == []


def test_the_mtime_is_compared_modulo_2_to_the_32(tmp_path):
    """Python records the low 32 bits of the mtime: a source dated after 2106 still matches."""
    big = (1 << 32) + T
    src = source(tmp_path, SRC, big)
    c = pyc(src)
    assert struct.unpack("<I", c.read_bytes()[8:12])[0] == T
    source(tmp_path, OTHER, big)
    assert [r for _, r in reasons(src)] == ["timestamp .pyc whose recorded source mtime and size match, but it "
                                            "was compiled from other source text"]
    source(tmp_path, OTHER, T)  # equal low bits: also what Python loads
    assert len(stale_bytecode(src)) == 1


def test_a_header_that_records_the_size_only_matches_that_size(tmp_path):
    src = source(tmp_path)
    c = pyc(src)
    source(tmp_path, OTHER)
    blob = bytearray(c.read_bytes())
    for size in (len(OTHER) + 1, len(OTHER) - 1, len(OTHER) + (1 << 16)):
        blob[12:16] = struct.pack("<I", size)
        c.write_bytes(bytes(blob))
        assert stale_bytecode(src) == [], size
    blob[12:16] = struct.pack("<I", len(OTHER))
    c.write_bytes(bytes(blob))
    assert len(stale_bytecode(src)) == 1


# ----------------------------------------------------------------------------- hash-based .pyc (PEP 552)
def test_a_checked_hash_pyc_is_judged_only_while_its_hash_matches(tmp_path):
    src = source(tmp_path)
    c = pyc(src, mode=py_compile.PycInvalidationMode.CHECKED_HASH)
    assert stale_bytecode(src) == []
    source(tmp_path, OTHER)
    assert stale_bytecode(src) == []  # Python sees the hash differ and recompiles
    # A checked pyc whose hash matches the current text but whose code is not its code.
    blob = bytearray(c.read_bytes())
    blob[8:16] = importlib.util.source_hash(OTHER)
    c.write_bytes(bytes(blob))
    assert reasons(src) == [(c.name, "checked hash-based .pyc whose recorded source hash matches, but it was "
                                     "compiled from other source text")]


def test_an_unchecked_hash_pyc_is_always_what_python_runs(tmp_path):
    src = source(tmp_path)
    c = pyc(src, mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    assert stale_bytecode(src) == []
    source(tmp_path, OTHER + b"# any size, any mtime\n", T + 99)
    assert reasons(src) == [(c.name, "unchecked hash-based .pyc (Python runs it without looking at the source), "
                                     "but it was compiled from other source text")]


# ----------------------------------------------------------------------------- levels and bodies
@pytest.mark.parametrize("opt", [1, 2])
def test_an_optimized_pyc_is_compared_at_its_own_level(tmp_path, opt):
    src = source(tmp_path)
    c = pyc(src, opt=opt)
    assert ".opt-" in c.name and stale_bytecode(src) == []
    source(tmp_path, OTHER)
    assert reasons(src) == [(c.name, "timestamp .pyc whose recorded source mtime and size match, but it was "
                                     "compiled from other source text")]


def test_every_level_of_one_source_is_judged(tmp_path):
    src = source(tmp_path)
    made = {pyc(src).name, pyc(src, opt=1).name, pyc(src, opt=2).name}
    source(tmp_path, OTHER)
    assert {n for n, _ in reasons(src)} == made


def test_the_optimization_level_of_a_cache_name():
    o = bytecode._optimization
    assert o(Path("m.cpython-311.pyc")) == 0
    assert o(Path("m.cpython-311.opt-1.pyc")) == 1 and o(Path("m.cpython-311.opt-2.pyc")) == 2
    assert o(Path("m.cpython-311.opt-12.pyc")) == 12
    assert o(Path("m.cpython-311.opt-x.pyc")) == 0 and o(Path("m.cpython-311.opt-.pyc")) == 0
    assert o(Path("opt-1.pyc")) == 0 and o(Path("m.opt-1.pyc")) == 0


def test_a_body_that_is_not_marshalled_code(tmp_path):
    src = source(tmp_path)
    c = pyc(src)
    head = c.read_bytes()[:16]
    # Each reason names where the bounded walk (m3fuse/marshalcanon.py) lost the stream.
    for body, where in ((b"", "truncated at byte 0"), (b"\xff\xff", "type code '\\x7f' at byte 0"),
                        (b"not marshal", "type code 'n' at byte 0")):
        c.write_bytes(head + body)
        assert reasons(src) == [(c.name, "timestamp .pyc whose recorded source mtime and size match, but its body "
                                         f"is not valid marshalled code m3fuse can judge ({where})")], body


def test_headers_python_would_not_load(tmp_path):
    src = source(tmp_path)
    c = pyc(src)
    good = c.read_bytes()
    source(tmp_path, OTHER)
    for blob in (good[:15], b"\0\0\0\0" + good[4:], good[:4]):
        c.write_bytes(blob)
        assert stale_bytecode(src) == [], blob[:8]
    c.write_bytes(good[:16])  # a bare header: loaded, with no code
    assert len(stale_bytecode(src)) == 1


def test_a_pyc_of_a_source_that_no_longer_compiles_is_stale(tmp_path):
    src = source(tmp_path)
    c = pyc(src)
    broken = SRC.replace(b"x + 1", b"x +(1")
    assert len(broken) == len(SRC)
    source(tmp_path, broken)
    # Python would load the .pyc (mtime and size match) and run code the current text cannot
    # give; the reason says the source does not parse (the parser's own words sit between).
    [(name, why)] = reasons(src)
    assert name == c.name
    assert why.startswith("timestamp .pyc whose recorded source mtime and size match, but the current source does "
                          "not parse as Python: "), why
    assert why.endswith(" (line 5), so its bytecode cannot be judged"), why


def test_a_missing_source_or_pycache(tmp_path):
    assert stale_bytecode(tmp_path / "nope.py") == []
    assert stale_bytecode(source(tmp_path)) == []


def test_a_pyc_python_would_not_load_does_not_hide_the_next_one(tmp_path):
    src = source(tmp_path)
    first = pyc(src, opt=1)  # sorts before the plain .pyc
    plain = pyc(src)
    first.write_bytes(b"\0\0\0\0" + first.read_bytes()[4:])  # another magic: Python recompiles it
    source(tmp_path, OTHER)
    assert reasons(src) == [(plain.name, "timestamp .pyc whose recorded source mtime and size match, but it was "
                                         "compiled from other source text")]


def test_every_pyc_with_a_bad_body_is_reported(tmp_path):
    src = source(tmp_path)
    made = [pyc(src, opt=1), pyc(src)]
    for c in made:
        c.write_bytes(c.read_bytes()[:16] + b"\xff\xff")
    assert [n for n, _ in reasons(src)] == [c.name for c in made]


# ----------------------------------------------------------------------------- what Python may run, m3fuse cannot judge
# A race is planted for real at its instant: the test wraps the call that opens the window
# (os.lstat, the folder listing) and does what a concurrent writer would do right after it.
LINK = "a symbolic link: Python follows it and may run what it names; m3fuse reads through no link"
STALE = "timestamp .pyc whose recorded source mtime and size match, but it was compiled from other source text"


def test_an_unjudged_pyc_does_not_hide_the_next_one(tmp_path):
    src = source(tmp_path)
    first = pyc(src, opt=1)  # sorts before the plain .pyc
    plain = pyc(src)
    elsewhere = tmp_path / "elsewhere.pyc"
    first.rename(elsewhere)
    first.symlink_to(elsewhere)
    source(tmp_path, OTHER)
    assert reasons(src) == [(first.name, LINK), (plain.name, STALE)]


def test_every_pyc_of_a_source_that_does_not_parse_is_reported(tmp_path):
    src = source(tmp_path)
    made = [pyc(src, opt=1), pyc(src)]
    source(tmp_path, SRC.replace(b"x + 1", b"x +(1"))
    got = reasons(src)
    assert [n for n, _ in got] == [c.name for c in made]
    assert all("the current source does not parse as Python" in why for _, why in got), got


def test_a_fifo_planted_as_a_pyc_is_neither_read_nor_reported(tmp_path, monkeypatch):
    """Python cannot run code from a FIFO (the import blocks instead): not reported, and
    m3fuse does not block on it either. Gone by the time m3fuse looks at what it was: the same."""
    src = source(tmp_path)
    c = pyc(src)
    c.unlink()
    os.mkfifo(c)
    assert stale_bytecode(src) == []
    real_lstat = os.lstat

    def lstat_then_remove(path, *a, **kw):
        st = real_lstat(path, *a, **kw)
        if Path(path) == c and c.exists():
            c.unlink()  # after safeio's check refused it, before bytecode asks whether it was a link
        return st

    monkeypatch.setattr(os, "lstat", lstat_then_remove)
    assert stale_bytecode(src) == []
    assert not c.exists()


def test_a_pyc_replaced_while_read_is_reported(tmp_path, monkeypatch):
    """Swapped for a socket between safeio's lstat and its open: the open is refused (ENXIO),
    and what Python would find there is not known, so it is reported."""
    import socket

    src = source(tmp_path)
    c = pyc(src)
    real_lstat = os.lstat
    socks = []
    monkeypatch.chdir(c.parent)  # a socket's path must fit 108 bytes: bind it by its bare name

    def lstat_then_swap(path, *a, **kw):
        st = real_lstat(path, *a, **kw)
        if Path(path) == c and c.is_file():
            c.unlink()
            sock = socket.socket(socket.AF_UNIX)
            sock.bind(c.name)
            socks.append(sock)
        return st

    monkeypatch.setattr(os, "lstat", lstat_then_swap)
    try:
        got = reasons(src)
    finally:
        monkeypatch.undo()
        for sock in socks:
            sock.close()
    assert socks and got == [(c.name, "was replaced by something other than a regular file while m3fuse read it")]


def test_a_pyc_that_cannot_be_read_is_reported_with_the_reason(tmp_path, monkeypatch):
    """The `__pycache__` listed a moment ago is now a file: reading the .pyc fails with
    ENOTDIR, which is reported with the system's words (not skipped, not a traceback)."""
    src = source(tmp_path)
    c = pyc(src)
    real_listing = bytecode.bytecode_files

    def list_then_swap(source_path):
        listed = real_listing(source_path)
        c.parent.rename(tmp_path / "moved")
        c.parent.write_bytes(b"")
        return listed

    monkeypatch.setattr(bytecode, "bytecode_files", list_then_swap)
    assert reasons(src) == [(c.name, "cannot be read by m3fuse (Not a directory); Python may load it")]


def test_an_unknown_code_layout_is_reported_not_guessed(tmp_path, monkeypatch):
    """Stand-in for a Python whose code objects hold one field more than m3fuse knows (a
    layout that cannot be had on the interpreter running the tests): marshalcanon's layout is
    cut by its last field, so the walk of m3fuse's own compile ends before the dump does.
    Every .pyc is then reported with the reason, none is passed on a guess."""
    from m3fuse import marshalcanon

    flat = b"x = 1\n"  # no nested code: the walk ends cleanly, one field early
    src = source(tmp_path, flat)
    c = pyc(src)
    assert stale_bytecode(src) == []
    ints, fields = marshalcanon._LAYOUT
    monkeypatch.setattr(marshalcanon, "_LAYOUT", (ints, fields[:-1]))
    [(name, why)] = reasons(src)
    assert name == c.name
    assert why.startswith("timestamp .pyc whose recorded source mtime and size match, but m3fuse cannot read this "
                          "Python's code layout ("), why
    assert why.endswith(" bytes left after the object), so no bytecode can be judged"), why


def test_a_finding_is_an_immutable_value(tmp_path):
    import dataclasses

    finding = bytecode.StaleBytecode(tmp_path, "r")
    with pytest.raises(dataclasses.FrozenInstanceError):
        finding.reason = "other"  # type: ignore[misc]
