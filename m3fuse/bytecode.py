"""Is a cached .pyc of a source file stale? Only what can be proven is reported.

A .pyc is stale when the interpreter would load it instead of compiling the source, and its
code is not what compiling the current source gives. Both halves are checked the way Python
itself does them (importlib._bootstrap_external, PEP 552):

- which .pyc Python loads: a timestamp .pyc whose recorded source mtime and size equal the
  source's; a checked hash-based .pyc whose recorded hash equals the source's; an unchecked
  hash-based .pyc always. Any other .pyc is recompiled, so it can never run old text.
- what it runs: its body compared with `compile(current source)` at the .pyc's optimization
  level. The body is never unmarshalled (marshal is not safe on untrusted bytes: a 21-byte
  .pyc can make it allocate 2.1 GB); m3fuse.marshalcanon walks both streams, bounded, into a
  canonical form holding every field of every code object except the file name (so
  `py_compile`/`compileall` output of the current text passes wherever it was compiled, and a
  change of co_stacksize or of a local variable's kind does not).

No file metadata other than what Python reads enters the verdict: chmod, chown, a tar or image
layer round trip (which reset the inode change time) leave a valid .pyc valid, and `touch -m`
makes Python recompile. A .pyc of another interpreter (other magic number) cannot be judged
with this one and is not reported; m3fuse removes all of a file's bytecode whenever it writes
the file.

What Python would run but m3fuse cannot judge is reported, never skipped: a .pyc that is a
symbolic link (Python follows it, m3fuse reads through no link), one past the size limit, one
that cannot be read, a `__pycache__` that is a link, a body the canonical walk cannot follow,
a source too large to compile within bounds. A FIFO or device planted as a .pyc is not read
and not reported: Python cannot run code from it (a device gives no valid header; a FIFO
blocks the import instead).
"""

from __future__ import annotations

import importlib.util
import marshal
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from . import marshalcanon, pysource, safeio
from .fingerprint import PYCACHE, bytecode_files

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


class _Unjudged(Exception):
    """A .pyc Python may run that m3fuse cannot read; the message says why."""


def _loads(pyc: Path, text: bytes, mtime: int, size: int) -> tuple[str, bytes] | None:
    """(why Python would load it, its marshalled body) when this interpreter would load `pyc`
    for a source with `text`, `mtime` and `size`; None when it would recompile instead (or the
    file is gone, or is a FIFO or device Python cannot run code from). _Unjudged for a file
    Python may run but m3fuse will not read."""
    try:
        blob = safeio.read_regular(pyc, safeio.MAX_SOURCE)  # a FIFO or device planted as a .pyc is never read
    except FileNotFoundError:
        return None
    except safeio.TooLarge:
        raise _Unjudged(f"larger than the {safeio.MAX_SOURCE}-byte limit m3fuse judges; Python would still "
                        f"load it") from None
    except safeio.NotRegular as exc:
        try:
            link = stat.S_ISLNK(os.lstat(pyc).st_mode)
        except OSError:
            return None
        if link:
            raise _Unjudged("a symbolic link: Python follows it and may run what it names; m3fuse reads through "
                            "no link") from None
        if "replaced" in exc.reason:
            raise _Unjudged(f"{exc.reason} while m3fuse read it") from None
        return None
    except (OSError, safeio.Unsafe) as exc:
        raise _Unjudged(f"cannot be read by m3fuse ({getattr(exc, 'strerror', None) or exc}); Python may load "
                        f"it") from None
    if len(blob) < _HEADER or blob[:4] != importlib.util.MAGIC_NUMBER:
        return None
    flags = struct.unpack("<I", blob[4:8])[0]
    if flags & ~(_FLAG_HASH | _FLAG_CHECKED):
        return None  # Python refuses unknown flags (ImportError) and recompiles
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


def _canonical_of_source(text: bytes, source: Path, level: int) -> bytes | str:
    """The canonical form of what compiling `text` gives at -O `level`, or why it cannot be had."""
    try:
        code = pysource.compile_exec(text, str(source), optimize=level)
    except pysource.Unparsable as exc:
        return f"the current source {exc.reason}, so its bytecode cannot be judged"
    try:
        return marshalcanon.canonical(marshal.dumps(code), whole=True)  # our own compile: no budget needed
    except marshalcanon.Bad as exc:  # a Python whose code layout m3fuse does not know: nothing can be judged
        return f"m3fuse cannot read this Python's code layout ({exc}), so no bytecode can be judged"


def stale_bytecode(source: Path) -> list[StaleBytecode]:
    """Every cached .pyc of `source` that this interpreter would run although its code is not
    the current source's, or that it may run and m3fuse cannot judge."""
    try:
        fd, st = safeio.open_regular(source)
        try:
            text = safeio.read_fd(fd, safeio.MAX_SOURCE, source)
        finally:
            os.close(fd)
    except (OSError, safeio.Unsafe):
        return []  # the target itself is refused (or reported) by the fingerprint check
    out: list[StaleBytecode] = []
    cache = source.parent / PYCACHE
    try:
        if stat.S_ISLNK(os.lstat(cache).st_mode):
            out.append(StaleBytecode(cache, "a symbolic link: Python loads this folder's bytecode through it; "
                                            "m3fuse does not follow it to judge what it holds"))
    except OSError:
        pass
    trusted: dict[int, bytes | str] = {}
    for pyc in bytecode_files(source):
        try:
            loaded = _loads(pyc, text, int(st.st_mtime), st.st_size)
        except _Unjudged as exc:
            out.append(StaleBytecode(pyc, str(exc)))
            continue
        if loaded is None:
            continue
        why, body = loaded
        level = _optimization(pyc)
        if level not in trusted:
            trusted[level] = _canonical_of_source(text, source, level)
        want = trusted[level]
        if isinstance(want, str):
            out.append(StaleBytecode(pyc, f"{why}, but {want}"))
            continue
        try:
            got = marshalcanon.canonical(body, budget=len(want))
        except marshalcanon.OverBudget:
            got = None
        except marshalcanon.Bad as exc:
            out.append(StaleBytecode(pyc, f"{why}, but its body is not valid marshalled code m3fuse can judge "
                                          f"({exc})"))
            continue
        if got != want:
            out.append(StaleBytecode(pyc, f"{why}, but it was compiled from other source text"))
    return out
