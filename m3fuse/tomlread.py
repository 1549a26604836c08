"""tomllib where the standard library has it (3.11+), tomli before; hostile input refused as
TOMLDecodeError (never a RecursionError or a UnicodeDecodeError escaping as a traceback)."""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    import tomllib as _toml
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as _toml

TOMLDecodeError = _toml.TOMLDecodeError
MAX_DEPTH = 32  # m3fuse's own files nest 3 levels; tomllib recurses per level


def _depth(text: str) -> int:
    """An upper bound of the nesting of arrays and inline tables (brackets inside strings
    count too: only ever an overestimate, so it can only refuse, never let a deep one pass)."""
    depth = deepest = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth = max(depth - 1, 0)
    return deepest


def loads(text: str | bytes) -> dict:
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TOMLDecodeError(f"not UTF-8 text (byte {exc.start} is {text[exc.start:exc.start + 1]!r})") from None
    if _depth(text) > MAX_DEPTH:
        raise TOMLDecodeError(f"arrays or inline tables nested deeper than {MAX_DEPTH} levels")
    try:
        return _toml.loads(text)
    except RecursionError:
        raise TOMLDecodeError(f"nested too deeply to parse") from None
