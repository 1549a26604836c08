"""Content fingerprints: sha256 of files, the wheel RECORD's own hashes, and bytecode staleness."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import struct
from dataclasses import dataclass
from pathlib import Path

_CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_file(path: Path) -> tuple[str, int]:
    """sha256 hex and size of the bytes actually read: the size is of what was hashed, so a
    file that changes under us cannot pair one file's digest with another's length."""
    h = hashlib.sha256()
    n = 0
    buf = bytearray(_CHUNK)  # one buffer read into again and again: no new bytes object per chunk
    view = memoryview(buf)
    with open(path, "rb") as f:
        while k := f.readinto(buf):
            h.update(view[:k])
            n += k
    return h.hexdigest(), n


def sha256_file(path: Path) -> str:
    return hash_file(path)[0]


def is_sha256_hex(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def record_digest_to_hex(value: str) -> str | None:
    """RECORD stores `sha256=<urlsafe base64, unpadded>`; return the hex digest, or None."""
    algo, _, b64 = value.partition("=")
    if algo != "sha256" or not b64:
        return None
    try:
        return base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()
    except ValueError:
        return None


def read_record(dist_info: Path) -> dict[str, str]:
    """Map each RECORD path to its sha256 hex; files without a hash are left out."""
    try:
        text = (dist_info / "RECORD").read_text(encoding="utf-8")
    except OSError:
        return {}
    out: dict[str, str] = {}
    for row in csv.reader(io.StringIO(text)):
        if len(row) >= 2 and row[1]:
            digest = record_digest_to_hex(row[1])
            if digest:
                out[row[0]] = digest
    return out


def record_hashes_for(dist_info: Path, paths: set[str]) -> dict[str, str] | None:
    """read_record(dist_info) restricted to `paths`, or None where read_record would give {}
    (no RECORD, or no hashed row in it). vLLM's RECORD has thousands of rows and `verify`
    needs a few: only those are decoded."""
    try:
        text = (dist_info / "RECORD").read_text(encoding="utf-8")
    except OSError:
        return None
    out: dict[str, str] = {}
    any_hashed = False
    for row in csv.reader(io.StringIO(text)):
        if len(row) < 2 or not row[1]:
            continue
        if row[0] in paths:
            digest = record_digest_to_hex(row[1])
            if digest:
                out[row[0]] = digest
                any_hashed = True
        elif not any_hashed and record_digest_to_hex(row[1]):
            any_hashed = True
    return out if any_hashed else None


@dataclass(frozen=True)
class StaleBytecode:
    path: Path
    reason: str


def bytecode_files(source: Path) -> list[Path]:
    """Every cached bytecode file that belongs to `source`, for any interpreter tag
    (`<stem>.<tag>[.opt-N].pyc`; `<stem>.pyc` alone is not Python's cache layout)."""
    stem = source.stem + "."
    try:
        names = sorted(p for p in (source.parent / "__pycache__").iterdir())
    except OSError:
        return []
    return [p for p in names if p.name.startswith(stem) and p.suffix == ".pyc" and p.name[len(stem):].count(".") >= 1]


def stale_bytecode(source: Path) -> list[StaleBytecode]:
    """Bytecode an interpreter would load instead of recompiling `source`, although it was not
    compiled from the current text.

    Only hash-based pycs can be proven stale; a timestamp pyc whose recorded mtime and size
    equal the source's is trusted by Python, and so is reported when its mtime predates the
    source's current inode change (m3fuse replaces files, so a pyc that old is from before).
    """
    import importlib.util

    try:
        data = source.read_bytes()
        st = source.stat()
    except OSError:
        return []
    out: list[StaleBytecode] = []
    for pyc in bytecode_files(source):
        try:
            with open(pyc, "rb") as f:
                header = f.read(16)
        except OSError:
            continue
        if len(header) < 16:
            continue
        if header[:4] != importlib.util.MAGIC_NUMBER:
            # Another interpreter's bytecode: its hash key differs, so it cannot be judged
            # here; m3fuse removes such files whenever it writes the source.
            continue
        flags = struct.unpack("<I", header[4:8])[0]
        if flags & 0b1:
            checked = bool(flags & 0b10)
            if header[8:16] != importlib.util.source_hash(data) and not checked:
                out.append(StaleBytecode(pyc, "unchecked hash-based .pyc compiled from other source text; "
                                              "Python will run it without looking at the source"))
        else:
            mtime, size = struct.unpack("<II", header[8:16])
            if mtime == (int(st.st_mtime) & 0xFFFFFFFF) and size == (st.st_size & 0xFFFFFFFF):
                pyc_st = pyc.stat()
                if pyc_st.st_mtime_ns < st.st_ctime_ns - 1_000_000_000:
                    out.append(StaleBytecode(pyc, "timestamp .pyc whose recorded mtime and size equal the "
                                                  "source's but which is older than the source file itself"))
    return out


def remove_bytecode(source: Path) -> list[Path]:
    removed = []
    for pyc in bytecode_files(source):
        try:
            os.unlink(pyc)
            removed.append(pyc)
        except FileNotFoundError:
            pass
    return removed
