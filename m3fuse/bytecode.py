"""Is a cached .pyc of a source file stale? Only what can be proven is reported.

A .pyc is stale when the interpreter would load it instead of compiling the source, and its
code is not what compiling the current source gives. Both halves are checked the way Python
itself does them (importlib._bootstrap_external, PEP 552):

- which .pyc Python loads: a timestamp .pyc whose recorded source mtime and size equal the
  source's; a checked hash-based .pyc whose recorded hash equals the source's; an unchecked
  hash-based .pyc always. Any other .pyc is recompiled, so it can never run old text.
- what it runs: its code object, unmarshalled and compared with `compile(current source)` at
  the .pyc's optimization level. Code objects compare by their bytecode, constants, names and
  line table, not by file name, so `py_compile`/`compileall` output of the current text passes
  wherever it was compiled.

No file metadata other than what Python reads enters the verdict: chmod, chown, a tar or image
layer round trip (which reset the inode change time) leave a valid .pyc valid, and `touch -m`
makes Python recompile. A .pyc of another interpreter (other magic number) cannot be judged
with this one and is not reported; m3fuse removes all of a file's bytecode whenever it writes
the file.
"""

from __future__ import annotations

import importlib.util
import marshal
import struct
from dataclasses import dataclass
from pathlib import Path
from types import CodeType

from . import safeio
from .fingerprint import bytecode_files

_HEADER = 16
_FLAG_HASH, _FLAG_CHECKED = 0b01, 0b10


@dataclass(frozen=True)
class StaleBytecode:
    path: Path
    reason: str


def _optimization(pyc: Path) -> int:
    """The -O level a cache file was written for: `<stem>.<tag>.opt-N.pyc` → N, else 0."""
    parts = pyc.name.split(".")
    opt = parts[-2] if len(parts) >= 4 else ""
    return int(opt[4:]) if opt.startswith("opt-") and opt[4:].isdigit() else 0


def _loads(pyc: Path, text: bytes, mtime: int, size: int) -> tuple[str, bytes] | None:
    """(why Python would load it, its marshalled body) when this interpreter would load `pyc`
    for a source with `text`, `mtime` and `size`; None when it would recompile instead."""
    try:
        blob = safeio.read_regular(pyc, safeio.MAX_SOURCE)  # a FIFO or device planted as a .pyc is never read
    except (OSError, safeio.Unsafe):
        return None
    if len(blob) < _HEADER or blob[:4] != importlib.util.MAGIC_NUMBER:
        return None
    flags = struct.unpack("<I", blob[4:8])[0]
    if flags & _FLAG_HASH:
        if not flags & _FLAG_CHECKED:
            return "unchecked hash-based .pyc (Python runs it without looking at the source)", blob[_HEADER:]
        if blob[8:16] == importlib.util.source_hash(text):
            return "checked hash-based .pyc whose recorded source hash matches", blob[_HEADER:]
        return None
    recorded_mtime, recorded_size = struct.unpack("<II", blob[8:16])
    if recorded_mtime == mtime & 0xFFFFFFFF and recorded_size == size & 0xFFFFFFFF:
        return "timestamp .pyc whose recorded source mtime and size match", blob[_HEADER:]
    return None


def stale_bytecode(source: Path) -> list[StaleBytecode]:
    """Every cached .pyc of `source` that this interpreter would run although its code is not
    the current source's."""
    try:
        text = safeio.read_regular(source, safeio.MAX_SOURCE)
        st = source.stat()
    except (OSError, safeio.Unsafe):
        return []
    compiled: dict[int, CodeType | None] = {}
    out: list[StaleBytecode] = []
    for pyc in bytecode_files(source):
        loaded = _loads(pyc, text, int(st.st_mtime), st.st_size)
        if loaded is None:
            continue
        why, body = loaded
        level = _optimization(pyc)
        if level not in compiled:
            try:
                compiled[level] = compile(text, str(source), "exec", dont_inherit=True, optimize=level)
            except (SyntaxError, ValueError):
                compiled[level] = None  # Python would run the .pyc rather than fail: it is not the source
        try:
            code = marshal.loads(body)
        except (EOFError, ValueError, TypeError):
            out.append(StaleBytecode(pyc, f"{why}, but its body is not valid marshalled code"))
            continue
        if code != compiled[level]:
            out.append(StaleBytecode(pyc, f"{why}, but it was compiled from other source text"))
    return out
