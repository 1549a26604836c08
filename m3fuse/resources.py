"""Where the shipped patch sets and wheel lock live (installed or in a checkout), and where
m3fuse caches what it downloads."""

from __future__ import annotations

import os
from pathlib import Path

_PKG = Path(__file__).resolve().parent


def _data_root() -> Path:
    # A built wheel carries them under m3fuse/_data; a checkout or an editable install
    # reads them from the repository top, where they are edited.
    shipped = _PKG / "_data"
    if shipped.is_dir():
        return shipped
    return _PKG.parent


def patches_dir() -> Path:
    return _data_root() / "patches"


def default_lock() -> Path:
    return _data_root() / "wheels.lock"


def cache_dir() -> Path:
    """m3fuse's cache root: `$XDG_CACHE_HOME/m3fuse` (wheels, validated locks, port's base files)."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "m3fuse"
