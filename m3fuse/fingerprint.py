"""Content fingerprints: sha256 of files, the wheel RECORD's own hashes, and the bytecode files of a source."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
from pathlib import Path

from . import safeio

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_file(path: Path, limit: int | None = None) -> tuple[str, int]:
    """sha256 hex and size of the bytes actually read: the size is of what was hashed, so a
    file that changes under us cannot pair one file's digest with another's length. Regular
    files only (safeio.NotRegular for a FIFO or a device), at most `limit` bytes."""
    return safeio.hash_regular(path, limit)


def sha256_file(path: Path) -> str:
    return hash_file(path, safeio.MAX_SOURCE)[0]


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


def _record_text(dist_info: Path) -> str | None:
    """The RECORD's text: a regular file of bounded size, else None (as if it were absent)."""
    try:
        return safeio.read_regular(dist_info / "RECORD", safeio.MAX_RECORD).decode("utf-8")
    except (OSError, safeio.Unsafe, UnicodeDecodeError):
        return None


def record_path_ok(rel: str) -> bool:
    """A RECORD row m3fuse may follow: relative, inside site-packages (no '..')."""
    return bool(rel) and not rel.startswith("/") and ".." not in rel.replace("\\", "/").split("/")


def read_record(dist_info: Path) -> dict[str, str]:
    """Map each RECORD path to its sha256 hex; files without a hash are left out."""
    text = _record_text(dist_info)
    if text is None:
        return {}
    out: dict[str, str] = {}
    for row in csv.reader(io.StringIO(text)):
        if len(row) >= 2 and row[1] and record_path_ok(row[0]):
            digest = record_digest_to_hex(row[1])
            if digest:
                out[row[0]] = digest
    return out


def record_hashes_for(dist_info: Path, paths: set[str]) -> dict[str, str] | None:
    """read_record(dist_info) restricted to `paths`, or None where read_record would give {}
    (no RECORD, or no hashed row in it). vLLM's RECORD has thousands of rows and `verify`
    needs a few: only those are decoded."""
    text = _record_text(dist_info)
    if text is None:
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


PYCACHE = "__pycache__"


def _pyc_names(source: Path, names: list[str]) -> list[str]:
    stem = source.stem + "."
    return sorted(n for n in names if n.startswith(stem) and n.endswith(".pyc") and n[len(stem):].count(".") >= 1)


def bytecode_files(source: Path) -> list[Path]:
    """Every cached bytecode file that belongs to `source`, for any interpreter tag
    (`<stem>.<tag>[.opt-N].pyc`; `<stem>.pyc` alone is not Python's cache layout). A
    `__pycache__` that is a symlink is not looked into (it is not the tree's own)."""
    try:
        with safeio.walk_down(source.parent, [PYCACHE]) as fd:
            names = os.listdir(fd)
    except (OSError, safeio.Unsafe):
        return []
    return [source.parent / PYCACHE / n for n in _pyc_names(source, names)]


def remove_bytecode(source: Path, dir_fd: int | None = None) -> list[Path]:
    """Unlink `source`'s bytecode files. `dir_fd` (a descriptor of source's directory, opened
    by the caller without following symlinks) pins the directory; `__pycache__` is opened
    below it without following a symlink (safeio.Escapes if it is one), and each file is
    unlinked relative to that descriptor, so nothing outside the tree can be removed."""
    own = dir_fd is None
    parent_fd = safeio.open_root(source.parent) if own else dir_fd
    try:
        try:
            fd = safeio.open_dir_at(parent_fd, PYCACHE, shown=source.parent / PYCACHE)
        except FileNotFoundError:
            return []
        try:
            return [source.parent / PYCACHE / n for n in _pyc_names(source, os.listdir(fd))
                    if safeio.unlink_at(fd, n)]
        finally:
            os.close(fd)
    finally:
        if own:
            os.close(parent_fd)
