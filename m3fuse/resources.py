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


def refuse_writing_into_package(path: Path, option: str) -> Path:
    """`path` back, unless it lies inside the installed m3fuse package (site-packages'
    m3fuse/_data): an edit there is lost on the next reinstall, so it needs `option` naming a
    file of the user's own. A checkout's own files are where they are edited, and allowed."""
    from .errors import UsageProblem

    shipped = _PKG / "_data"
    if shipped.is_dir() and Path(os.path.abspath(path)).resolve().is_relative_to(shipped.resolve()):
        raise UsageProblem(
            headline=f"refusing to write {path}: it is inside the installed m3fuse package",
            details=[("installed data", str(shipped))],
            hint=f"pass {option} with a path of your own (a copy of the shipped one to start from)")
    return path


def patches_dir() -> Path:
    return _data_root() / "patches"


LOCK_ENV = "M3FUSE_LOCK"


def default_lock() -> Path:
    """$M3FUSE_LOCK if set, else the shipped wheels.lock. An image built with its own lock sets
    it (Containerfile), so every later `m3fuse verify` in the image checks that lock."""
    chosen = os.environ.get(LOCK_ENV)
    return Path(chosen) if chosen else _data_root() / "wheels.lock"


def cache_dir() -> Path:
    """m3fuse's cache root: `$XDG_CACHE_HOME/m3fuse`, else `~/.cache/m3fuse`. A relative
    XDG_CACHE_HOME is taken against the current directory here, where it is read (users set it
    so; the pip run that installs from the cache happens in another folder); an empty one is
    unset. An empty or relative HOME (HOME="" in a container build) falls back to the user's
    home in the password database, never to `/.cache` or the current directory. With neither,
    the run is refused (pass --cache-dir)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg:
        return Path(os.path.abspath(xdg)) / "m3fuse"
    home = os.environ.get("HOME", "")
    if not os.path.isabs(home) or home == "/":
        try:
            import pwd

            home = pwd.getpwuid(os.geteuid()).pw_dir
        except (ImportError, KeyError):
            home = ""
    if not os.path.isabs(home) or home == "/":
        from .errors import EnvironmentProblem

        raise EnvironmentProblem(headline="m3fuse has no cache folder: HOME is empty or '/', and so is this "
                                          "user's home in the password database",
                                 details=[("HOME", repr(os.environ.get("HOME"))),
                                          ("XDG_CACHE_HOME", repr(os.environ.get("XDG_CACHE_HOME")))],
                                 hint="pass --cache-dir DIR, or set XDG_CACHE_HOME to an absolute folder")
    return Path(home) / ".cache" / "m3fuse"
