"""File primitives for a process that runs as root among files others may have planted.

Every read here is of a regular file only (lstat first, then a non-blocking, no-follow open
checked again with fstat: a FIFO cannot block it, a device cannot feed it forever) and stops
at a byte limit. Every write, replace and unlink is made relative to a directory descriptor
that was opened one component at a time with O_NOFOLLOW|O_DIRECTORY, so a directory swapped
for a symlink after it was checked, or a symlinked `__pycache__`, cannot redirect it: the
descriptor keeps naming the directory that was checked.

Callers turn the small exceptions below into the M3fuseError of their context (a patch
set's diff too large is a bad patch set, a target that is a FIFO is an environment problem).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from .errors import UnsafePath

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
CHUNK = 1 << 20

# Ceilings (bytes). A vLLM source file is < 1 MB; a patch-set diff or manifest a few tens of KB;
# a wheel lock a few KB; a wheel's METADATA or one source member a few MB at most.
MAX_SOURCE = 16 << 20
MAX_SET_FILE = 4 << 20
MAX_LOCK = 4 << 20
MAX_RECORD = 64 << 20


class Unsafe(Exception):
    """A path m3fuse refuses to read or write through; `reason` says why in a few words."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


class NotRegular(Unsafe):
    """Something other than a regular file (FIFO, device, socket, directory, symlink)."""


class TooLarge(Unsafe):
    def __init__(self, path: Path | str, limit: int) -> None:
        super().__init__(path, f"larger than the {limit}-byte limit m3fuse reads")
        self.limit = limit


class Escapes(Unsafe):
    """A component on the way down is a symlink or not a directory, or a path leaves its root."""


class NotText(Unsafe):
    """The bytes are not the strict UTF-8 text the file must hold."""


class BadArchive(Unsafe):
    """A zip archive (a wheel) or one of its members cannot be read."""


def kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "of an unknown kind"


def split_relative(rel: str | PurePosixPath) -> list[str]:
    """The components of a relative POSIX path, refusing '..', '.', empty and absolute ones."""
    text = str(rel)
    if not text or text.startswith("/") or "\x00" in text:
        raise Escapes(text, "not a relative path")
    parts = text.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise Escapes(text, "holds '..', '.' or an empty component")
    return parts


# ------------------------------------------------------------------------------ directories


def open_root(root: Path) -> int:
    """A descriptor of `root` itself (the one place a symlink is followed: the user named it)."""
    return os.open(root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))


def open_dir_at(dir_fd: int, name: str, *, shown: Path | str, create_mode: int | None = None) -> int:
    """Open the directory `name` inside `dir_fd` without following a symlink; with
    `create_mode`, create it (that mode, before umask) when missing."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        if create_mode is None:
            raise
        try:
            os.mkdir(name, create_mode, dir_fd=dir_fd)
        except FileExistsError:
            pass
        return open_dir_at(dir_fd, name, shown=shown)
    except OSError as exc:
        try:
            st = os.lstat(name, dir_fd=dir_fd)
        except OSError:
            raise exc from None
        if not stat.S_ISDIR(st.st_mode):
            raise Escapes(shown, f"is {kind_of(st.st_mode)}, not a directory; m3fuse does not go through it") from None
        raise


@contextmanager
def walk_down(root: Path, parts: Sequence[str], *, create_mode: int | None = None) -> Iterator[int]:
    """A descriptor of root/parts[0]/..., every component below `root` checked to be a real
    directory on the way down (Escapes otherwise). Closed on exit."""
    fd = open_root(root)
    here = Path(root)
    try:
        for part in parts:
            here = here / part
            nxt = open_dir_at(fd, part, shown=here, create_mode=create_mode)
            os.close(fd)
            fd = nxt
        yield fd
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ reads


def open_regular(name: str | Path, *, dir_fd: int | None = None, shown: Path | str | None = None) -> tuple[int, os.stat_result]:
    """(fd, fstat) of a regular file, opened without following a symlink and without blocking
    on a FIFO; NotRegular for anything else, FileNotFoundError when absent."""
    shown = shown if shown is not None else name
    st = os.lstat(name, dir_fd=dir_fd)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegular(shown, f"is {kind_of(st.st_mode)}, not a regular file")
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):  # swapped for a symlink, or for a socket
            raise NotRegular(shown, "was replaced by something other than a regular file") from None
        raise
    fst = os.fstat(fd)
    if not stat.S_ISREG(fst.st_mode):  # swapped between lstat and open
        os.close(fd)
        raise NotRegular(shown, f"is {kind_of(fst.st_mode)}, not a regular file")
    return fd, fst


def read_fd(fd: int, limit: int, shown: Path | str) -> bytes:
    """Up to `limit` bytes from `fd` (TooLarge past it: the file may grow while it is read)."""
    chunks = []
    total = 0
    while True:
        b = os.read(fd, min(CHUNK, limit + 1 - total))
        if not b:
            return b"".join(chunks)
        chunks.append(b)
        total += len(b)
        if total > limit:
            raise TooLarge(shown, limit)


def read_regular(path: str | Path, limit: int, *, dir_fd: int | None = None, shown: Path | str | None = None) -> bytes:
    """The bytes of a regular file of at most `limit` bytes."""
    shown = shown if shown is not None else path
    fd, st = open_regular(path, dir_fd=dir_fd, shown=shown)
    try:
        if st.st_size > limit:
            raise TooLarge(shown, limit)
        return read_fd(fd, limit, shown)
    finally:
        os.close(fd)


def read_head(path: str | Path, n: int, *, dir_fd: int | None = None) -> bytes:
    """The first `n` bytes (or fewer) of a regular file."""
    fd, _ = open_regular(path, dir_fd=dir_fd)
    try:
        return os.read(fd, n)
    finally:
        os.close(fd)


def read_under(root: Path, rel: str, limit: int) -> bytes:
    """root/rel, every directory below `root` and the file itself checked (no symlink followed)."""
    parts = split_relative(rel)
    with walk_down(root, parts[:-1]) as fd:
        return read_regular(parts[-1], limit, dir_fd=fd, shown=Path(root) / rel)


def decode(data: bytes, shown: Path | str) -> str:
    """Strict UTF-8 (NotText otherwise, naming the first bad byte)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NotText(shown, f"is not UTF-8 text (byte {exc.start} is {data[exc.start:exc.start + 1]!r})") from None


def read_text(path: str | Path, limit: int, *, dir_fd: int | None = None, shown: Path | str | None = None) -> str:
    """A regular file of at most `limit` bytes, decoded as strict UTF-8."""
    shown = shown if shown is not None else path
    return decode(read_regular(path, limit, dir_fd=dir_fd, shown=shown), shown)


# ------------------------------------------------------------------------------ zip archives

# A zip archive's members are inflated through a bound, judged twice: by the size the member's
# header declares and by the bytes actually inflated (a zip bomb may declare a small size).
MAX_MEMBER = 16 << 20


def open_zip(path: Path):  # noqa: ANN201 - a zipfile.ZipFile; zipfile is imported here only
    """A zip archive that is a regular file (lstat first, no symlink followed, a FIFO never
    blocks), read from the descriptor that was checked. BadArchive when it is not a zip."""
    import zipfile

    fd, _ = open_regular(path)
    f = os.fdopen(fd, "rb")
    try:
        zf = zipfile.ZipFile(f)
        zf.filename = os.fspath(path)  # not the descriptor number fdopen names it by (read_member's messages)
        return zf
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
        f.close()
        raise BadArchive(path, f"is not a zip archive m3fuse can read ({exc})") from None
    except BaseException:
        f.close()
        raise


def _lzma_error() -> tuple[type[Exception], ...]:
    """lzma's error type, or none on a Python built without lzma (zipfile then refuses an LZMA
    member with RuntimeError)."""
    try:
        import lzma
    except ImportError:
        return ()
    return (lzma.LZMAError,)


class Inflation:
    """A budget of inflated bytes shared by several member reads (a release's thousands of
    sources: each is bounded, and so is their sum)."""

    def __init__(self, limit: int) -> None:
        self.limit = self.left = limit


def read_member(zf, name: str, limit: int = MAX_MEMBER, *, shown: Path | str | None = None,  # noqa: ANN001
                budget: Inflation | None = None) -> bytes:
    """One archive member, refused past `limit` bytes (declared or inflated) with TooLarge,
    past the shared `budget` too; BadArchive when it cannot be inflated; KeyError when absent."""
    import zipfile
    import zlib

    where = f"{shown if shown is not None else zf.filename}:{name}"
    info = zf.getinfo(name)
    cap = limit if budget is None else min(limit, budget.left)
    if info.file_size > cap:
        raise TooLarge(where, cap)
    try:
        with zf.open(info) as f:
            data = f.read(cap + 1)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError, zlib.error,
            *_lzma_error()) as exc:  # zipfile passes the decompressors' own errors through unwrapped
        raise BadArchive(where, f"cannot be inflated ({str(exc) or 'its data ends early'})") from None
    if len(data) > cap:
        raise TooLarge(where, cap)
    if budget is not None:
        budget.left -= len(data)
    return data


def hash_regular(path: Path, limit: int | None = None) -> tuple[str, int]:
    """sha256 hex and size of a regular file, reading at most `limit` bytes (TooLarge past it)."""
    import hashlib

    fd, _ = open_regular(path)
    h = hashlib.sha256()
    n = 0
    try:
        while b := os.read(fd, CHUNK):
            n += len(b)
            if limit is not None and n > limit:
                raise TooLarge(path, limit)
            h.update(b)
    finally:
        os.close(fd)
    return h.hexdigest(), n


# ------------------------------------------------------------------------------ writes


def write_new_at(dir_fd: int, name: str, data: bytes, mode: int = 0o600) -> int:
    """Create `name` in `dir_fd` (never an existing file, never through a symlink), write and
    fsync `data`; returns the still-open descriptor (the caller sets mode/owner and closes)."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode,
                 dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        raise
    return fd


def unlink_at(dir_fd: int, name: str) -> bool:
    """Remove the directory entry `name` (a symlink itself, never what it points at)."""
    try:
        os.unlink(name, dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return False


def replace_at(dir_fd: int, src: str, dst: str) -> None:
    os.replace(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


# ------------------------------------------------------------------------------ own folders


def others_can_write(st: os.stat_result) -> bool:
    return bool(st.st_mode & 0o022)


def own_dir(path: Path, *parts: str) -> Path:
    """Make sure `path` (and `path/parts...` below it) is a folder only this user controls,
    creating what is missing with mode 0700: each of them must be a real directory (no
    symlink m3fuse did not make), owned by this user and writable by no one else, as pip
    demands of its cache. The folder holding `path` may be shared only if it is sticky (as
    /tmp is), else another user could swap `path` for a symlink. Raises Unsafe with the
    reason; returns the checked folder (absolute)."""
    path = Path(os.path.abspath(path))
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        pst = os.stat(parent)
    except OSError as exc:
        raise Unsafe(parent, f"cannot be created or examined ({exc.strerror})") from None
    if others_can_write(pst) and not pst.st_mode & stat.S_ISVTX:
        raise Unsafe(parent, f"is writable by other users (mode {stat.filemode(pst.st_mode)}, not sticky), "
                             f"who could replace {path.name} with a symlink")
    fd = open_root(parent)
    here = parent
    try:
        for part in (path.name, *parts):
            here = here / part
            nxt = open_dir_at(fd, part, shown=here, create_mode=0o700)
            os.close(fd)
            fd = nxt
            st = os.fstat(fd)
            if st.st_uid != os.geteuid():
                raise Unsafe(here, f"is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})")
            if others_can_write(st):
                raise Unsafe(here, f"is writable by other users (mode {stat.filemode(st.st_mode)})")
    except Escapes as exc:
        raise Unsafe(exc.path, exc.reason + " (m3fuse did not make it)") from None
    except OSError as exc:
        raise Unsafe(here, f"cannot be created or opened ({exc.strerror})") from None
    finally:
        os.close(fd)
    return here


def refusal(exc: Unsafe, *, hint: str, nothing: str = "nothing was changed") -> UnsafePath:
    """The user-facing refusal for `exc`: which path, why, that nothing was changed, what to do."""
    return UnsafePath(headline=f"{exc.path}: {exc.reason}; m3fuse refuses it and {nothing}",
                      details=[("path", str(exc.path)), ("problem", exc.reason)], hint=hint)
