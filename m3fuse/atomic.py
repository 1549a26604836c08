"""Replace one file atomically, keeping its mode and owner, and dropping its stale bytecode."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from .fingerprint import remove_bytecode

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
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


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


def replace_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that any reader, or a crash at any instant, sees either the old
    file or the new one whole. A new inode also breaks hard links that some installers use to
    share one file between environments, so another environment is never edited through us."""
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
        _checkpoint(f"bytecode-1 {path.name}")
        remove_bytecode(path)
        _checkpoint(f"replace {path.name}")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _checkpoint(f"fsync-dir {path.name}")
    _fsync_dir(path.parent)
    # An import between the first removal and the rename may have cached the old text again.
    _checkpoint(f"bytecode-2 {path.name}")
    remove_bytecode(path)
