"""Replace one file atomically, keeping its mode and owner, and dropping its stale bytecode."""

from __future__ import annotations

import os
from pathlib import Path

from ..fingerprint import remove_bytecode

TMP_MARK = ".m3fuse-tmp-"


def _checkpoint(step: str) -> None:
    """Test-only: lets the crash suite stop this process at an exact point of the write
    sequence (M3FUSE_TEST_KILL_AT=N kills it at the N-th step). Unset, it costs a lookup."""
    log = os.environ.get("M3FUSE_TEST_CHECKPOINTS")
    if not log:
        return
    with open(log, "a") as f:
        f.write(step + "\n")
    kill_at = os.environ.get("M3FUSE_TEST_KILL_AT")
    if kill_at:
        with open(log) as f:
            if sum(1 for _ in f) == int(kill_at):
                import signal

                os.kill(os.getpid(), signal.SIGKILL)


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{os.urandom(4).hex()}")


def leftovers(directory: Path) -> list[Path]:
    """Temp files of an interrupted m3fuse write in `directory`."""
    try:
        return sorted(p for p in directory.iterdir() if p.name.startswith(".") and TMP_MARK in p.name)
    except OSError:
        return []


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stage(path: Path, data: bytes) -> Path:
    """Write `data` to a fresh temp file beside `path` with `path`'s mode and owner, fsynced.
    Nothing visible changes; on any error the temp file is removed and the error raised."""
    st = os.stat(path)
    tmp = temp_name(path)
    _checkpoint(f"tmp-create {path.name}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
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
        discard(tmp)
        raise
    return tmp


def discard(tmp: Path) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


class WriteFailed(Exception):
    """A write of `replace_files` failed; `replaced` lists the files already renamed into place
    (empty when the failure came while staging, i.e. nothing visible changed)."""

    def __init__(self, path: Path, cause: OSError, replaced: list[Path]) -> None:
        super().__init__(f"{path}: {cause.strerror or cause}")
        self.path = path
        self.cause = cause
        self.replaced = replaced


def replace_files(items: list[tuple[Path, bytes]]) -> None:
    """Replace several files as close to one step as a POSIX file system allows.

    Phase 1 stages every new file (all the writing, hence every ENOSPC, EDQUOT or EIO, happens
    here); if any staging fails, the staged ones are removed and nothing visible has changed.
    Phase 2 drops the bytecode of every target, then only renames, which needs no space. A
    crash during phase 2 leaves each file old or new whole (the "partial" state the engine
    finishes); a crash during phase 1 leaves only temp files, which the next run removes.
    Each rename gives the target a new inode, which also breaks hard links that some installers
    use to share one file between environments: another environment is never edited through us.
    Raises WriteFailed for an OSError.
    """
    staged: list[tuple[Path, Path]] = []
    replaced: list[Path] = []
    current = items[0][0] if items else Path()
    try:
        for path, data in items:
            current = path
            staged.append((path, stage(path, data)))
        for path, _ in staged:
            current = path
            _checkpoint(f"bytecode-1 {path.name}")
            remove_bytecode(path)
        for path, tmp in staged:
            current = path
            _checkpoint(f"replace {path.name}")
            os.replace(tmp, path)
            replaced.append(path)
    except BaseException as exc:
        for path, tmp in staged:
            if path not in replaced:
                discard(tmp)
        if isinstance(exc, OSError):
            raise WriteFailed(current, exc, replaced) from exc
        raise
    try:
        for directory in sorted({p.parent for p, _ in staged}):
            _checkpoint(f"fsync-dir {directory.name}")
            _fsync_dir(directory)
        # An import between the first removal and the rename may have cached the old text again.
        for path, _ in staged:
            current = path
            _checkpoint(f"bytecode-2 {path.name}")
            remove_bytecode(path)
    except OSError as exc:
        raise WriteFailed(current, exc, replaced) from exc
    _checkpoint("done")

