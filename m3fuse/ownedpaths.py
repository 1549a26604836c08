"""Folders m3fuse writes into: checked all the way down before the first byte is written.

m3fuse may run as root and write into a cache, a pristine-file cache, a port work folder or a
patch set folder. A folder is only as safe as the folders above it: anyone who can rename an
entry of any ancestor can swap the folder (or the ancestor) for a symlink between the check and
the write. So every ancestor, from `/` down, is opened one component at a time without
following a symlink and must be owned by root or by this user, and writable by no one else
unless it is sticky (as /tmp is: there only an entry's owner may rename it, and the entry below
must itself be root's or ours). The folder itself and everything m3fuse creates below it must
be this user's and writable by no one else. Creating what is missing (mode 0700) happens only
when asked: `port --refresh --check` and other read-only runs check without creating.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import safeio

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _ancestor_problem(st: os.stat_result, here: Path) -> str | None:
    if st.st_uid not in (0, os.geteuid()):
        return f"is owned by uid {st.st_uid} (neither root nor this user), who could replace what lies below it"
    if safeio.others_can_write(st) and not st.st_mode & stat.S_ISVTX:
        return (f"is writable by other users (mode {stat.filemode(st.st_mode)}, not sticky), who could replace "
                f"what lies below it with a symlink")
    return None


def _own_problem(st: os.stat_result) -> str | None:
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    if safeio.others_can_write(st):
        return f"is writable by other users (mode {stat.filemode(st.st_mode)})"
    return None


def _open_below(fd: int, name: str, here: Path, create: bool) -> int | None:
    """`name` in `fd` as a directory, never through a symlink; created 0700 when missing and
    `create`, else None when missing."""
    try:
        return safeio.open_dir_at(fd, name, shown=here, create_mode=0o700 if create else None)
    except FileNotFoundError:
        if create:
            raise
        return None
    except safeio.Escapes as exc:
        raise safeio.Unsafe(exc.path, exc.reason + " (m3fuse did not make it)") from None


@contextmanager
def owned_fd(path: Path, *parts: str, create: bool = True, parent_only: bool = False) -> Iterator[int | None]:
    """A descriptor of `path/parts...`, checked as described above (Unsafe otherwise); None
    when it does not exist and `create` is False. Closed on exit. `parent_only`: the folder
    only holds what m3fuse writes in folders of its own (a stage renamed into place), so it is
    held to the ancestors' rule (root's or ours, shared only if sticky)."""
    path = Path(os.path.abspath(path))
    # The ancestors as the kernel finds them: a symlink the user put in the path (/home ->
    # /data/home) is theirs to choose; what it leads to is checked like any other folder.
    existing = path.parent
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    # Each folder named on the way, as written (a symlink followed): one another user can
    # write could have the next name swapped, whatever the real path turns out to be.
    for prefix in (*reversed(existing.parents), existing):
        try:
            problem = _ancestor_problem(os.stat(prefix), prefix)
        except OSError as exc:
            raise safeio.Unsafe(prefix, f"cannot be examined ({exc.strerror})") from None
        if problem:
            raise safeio.Unsafe(prefix, problem)
    real = Path(os.path.realpath(existing))
    missing = path.parent.relative_to(existing).parts
    fd = os.open("/", _DIR_FLAGS)
    here = Path("/")
    try:
        problem = _ancestor_problem(os.fstat(fd), here)
        if problem:
            raise safeio.Unsafe(here, problem)
        # The real ancestors and the missing ones are held to the ancestors' rule; the folder
        # itself and what lies below it to the owner's rule (unless parent_only).
        steps = [(name, False) for name in (*real.parts[1:], *missing)]
        steps += [(name, not parent_only) for name in (path.name, *parts)]
        for name, own in steps:
            here = here / name
            nxt = _open_below(fd, name, here, create)
            os.close(fd)
            fd = nxt  # type: ignore[assignment]
            if fd is None:
                yield None
                return
            st = os.fstat(fd)
            problem = _own_problem(st) if own else _ancestor_problem(st, here)
            if problem:
                raise safeio.Unsafe(here, problem)
        yield fd
    except OSError as exc:
        raise safeio.Unsafe(here, f"cannot be created or opened ({exc.strerror})") from None
    finally:
        if fd is not None:
            os.close(fd)


def own_dir(path: Path, *parts: str, create: bool = True, parent_only: bool = False) -> Path | None:
    """`path/parts...` checked (and, with `create`, made 0700 where missing) as a folder only
    this user controls, all the way down; None when it is missing and `create` is False.
    Raises safeio.Unsafe with the reason."""
    with owned_fd(path, *parts, create=create, parent_only=parent_only) as fd:
        if fd is None:
            return None
    return Path(os.path.abspath(path)).joinpath(*parts)


def write_into(folder: Path, name: str, data: bytes, *, mode: int = 0o600) -> Path:
    """`folder/name` replaced whole by `data`: written to a new temporary name and renamed, both
    relative to the checked folder's descriptor (so no symlink anywhere on the way is followed)."""
    with owned_fd(folder) as fd:
        assert fd is not None
        tmp = f".{name}.{os.getpid()}-{os.urandom(4).hex()}.tmp"
        wfd = safeio.write_new_at(fd, tmp, data, mode)
        try:
            os.fsync(wfd)
        finally:
            os.close(wfd)
        try:
            safeio.replace_at(fd, tmp, name)
        except BaseException:
            safeio.unlink_at(fd, tmp)
            raise
    return Path(folder) / name
