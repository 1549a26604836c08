"""Replace one file atomically, keeping its mode and owner, and dropping its stale bytecode."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path

from .. import safeio
from ..fingerprint import remove_bytecode

TMP_MARK = ".m3fuse-tmp-"
_TEMP_NAME = re.compile(r"\.(.+)" + re.escape(TMP_MARK) + r"\d+-[0-9a-f]{8}")


def _checkpoint(step: str) -> None:
    """Test-only: lets the crash suite stop this process at an exact point of the write
    sequence (M3FUSE_TEST_KILL_AT=N kills it at the N-th step; M3FUSE_TEST_SIGNAL_AT=N sends it
    SIGINT there). Unset, it costs a lookup."""
    log = os.environ.get("M3FUSE_TEST_CHECKPOINTS")
    if not log:
        return
    with open(log, "a") as f:
        f.write(step + "\n")
    for var, sig in (("M3FUSE_TEST_KILL_AT", "SIGKILL"), ("M3FUSE_TEST_SIGNAL_AT", "SIGINT")):
        at = os.environ.get(var)
        if at:
            with open(log) as f:
                if sum(1 for _ in f) == int(at):
                    import signal

                    os.kill(os.getpid(), getattr(signal, sig))


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{os.urandom(4).hex()}")


def leftovers(directory: Path, targets: Iterable[str]) -> list[Path]:
    """Temp files of an interrupted m3fuse write in `directory`: named exactly as temp_name()
    names them, for one of `targets` (file names m3fuse writes there), regular files owned by
    this user. A file merely resembling one is never listed (nor removed)."""
    wanted = set(targets)
    found = []
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    for name in names:
        m = _TEMP_NAME.fullmatch(name)
        if not m or m.group(1) not in wanted:
            continue
        try:
            st = os.lstat(directory / name)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
            found.append(directory / name)
    return sorted(found)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stage(path: Path, data: bytes, dir_fd: int | None = None) -> Path:
    """Write `data` to a fresh temp file beside `path` with `path`'s mode and owner, fsynced.
    Nothing visible changes; on any error the temp file is removed and the error raised.
    `dir_fd` (path's directory, see replace_files) is where the temp file is created: never
    through a symlink, never over an existing file."""
    own = dir_fd is None
    dfd = safeio.open_root(path.parent) if own else dir_fd
    try:
        st = os.lstat(path.name, dir_fd=dfd)
        if not stat.S_ISREG(st.st_mode):
            raise safeio.NotRegular(path, f"is {safeio.kind_of(st.st_mode)}, not a regular file")
        tmp = temp_name(path)
        _checkpoint(f"tmp-create {path.name}")
        fd = safeio.write_new_at(dfd, tmp.name, b"")
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                _checkpoint(f"tmp-written {path.name}")
                os.fchmod(fd, st.st_mode & 0o7777)
                try:
                    os.fchown(fd, st.st_uid, st.st_gid)
                except PermissionError:
                    pass  # not root: the file becomes ours, as any reinstall would make it
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            safeio.unlink_at(dfd, tmp.name)
            raise
        return tmp
    finally:
        if own:
            os.close(dfd)


def discard(tmp: Path, dir_fd: int | None = None) -> None:
    if dir_fd is None:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    else:
        safeio.unlink_at(dir_fd, tmp.name)


class WriteFailed(Exception):
    """A write of `replace_files` failed; `replaced` lists the files already renamed into place
    (empty when the failure came while staging, i.e. nothing visible changed)."""

    def __init__(self, path: Path, cause: OSError | safeio.Unsafe, replaced: list[Path]) -> None:
        super().__init__(f"{path}: {getattr(cause, 'strerror', None) or cause}")
        self.path = path
        self.cause = cause
        self.replaced = replaced


def replace_files(items: list[tuple[Path, bytes]], root: Path | None = None) -> None:
    """Replace several files as close to one step as a POSIX file system allows.

    Phase 1 stages every new file (all the writing, hence every ENOSPC, EDQUOT or EIO, happens
    here); if any staging fails, the staged ones are removed and nothing visible has changed.
    Phase 2 drops the bytecode of every target, then only renames, which needs no space. A
    crash during phase 2 leaves each file old or new whole (the "partial" state the engine
    finishes); a crash during phase 1 leaves only temp files, which the next run removes.
    Each rename gives the target a new inode, which also breaks hard links that some installers
    use to share one file between environments: another environment is never edited through us.

    With `root` (every path lies below it), each target's directory is opened once, first,
    one component at a time without following a symlink, and every create, rename and unlink
    goes through that descriptor: a directory swapped for a symlink during the run cannot
    redirect a write outside the tree (the swap is refused, or the write lands in the
    directory that was checked). Raises WriteFailed for an OSError, safeio.Unsafe for a path
    that is not what it must be.
    """
    staged: list[tuple[Path, Path]] = []
    replaced: list[Path] = []
    current = items[0][0] if items else Path()
    fds: dict[Path, int] = {}
    try:
        try:
            for path, _ in items:
                current = path
                if path.parent not in fds:
                    fds[path.parent] = _open_parent(path, root)
            for path, data in items:
                current = path
                staged.append((path, stage(path, data, fds[path.parent])))
            for path, _ in staged:
                current = path
                _checkpoint(f"bytecode-1 {path.name}")
                remove_bytecode(path, fds[path.parent])
            for path, tmp in staged:
                current = path
                _checkpoint(f"replace {path.name}")
                safeio.replace_at(fds[path.parent], tmp.name, path.name)
                replaced.append(path)
        except BaseException as exc:
            for path, tmp in staged:
                if path not in replaced:
                    discard(tmp, fds[path.parent])
            if isinstance(exc, (OSError, safeio.Unsafe)):
                raise WriteFailed(current, exc, replaced) from exc
            raise
        try:
            for directory in sorted(fds):
                _checkpoint(f"fsync-dir {directory.name}")
                os.fsync(fds[directory])
            # An import between the first removal and the rename may have cached the old text again.
            for path, _ in staged:
                current = path
                _checkpoint(f"bytecode-2 {path.name}")
                remove_bytecode(path, fds[path.parent])
        except (OSError, safeio.Unsafe) as exc:
            raise WriteFailed(current, exc, replaced) from exc
    finally:
        for fd in fds.values():
            os.close(fd)
    _checkpoint("done")


def _open_parent(path: Path, root: Path | None) -> int:
    if root is None:
        return safeio.open_root(path.parent)
    rel = path.parent.relative_to(root)
    with safeio.walk_down(root, rel.parts) as fd:
        return os.dup(fd)
