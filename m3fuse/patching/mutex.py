"""One m3fuse run at a time per vLLM tree.

The lock is an flock on the `vllm/` package directory itself: nothing is written to take it,
it works on a tree m3fuse may not write to yet, and the kernel drops it when a run dies, so a
killed run never leaves a stale lock behind.

`install` holds it from before the wheel step until the patches are in place (one run at a
time, pip included), and the patch step takes it again inside: a folder this process already
holds is held again without a second flock (an flock on a second descriptor of the same folder
would wait for the first, that is for ever).
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import EnvironmentProblem, LockBusy

DEFAULT_TIMEOUT = 60.0

# (st_dev, st_ino) of every folder this process holds, and how many times.
_held: dict[tuple[int, int], int] = {}


@contextmanager
def hold(package_dir: Path, *, timeout: float = DEFAULT_TIMEOUT, what: str = "this vLLM tree") -> Iterator[None]:
    try:
        fd = os.open(package_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise EnvironmentProblem(f"{package_dir}: cannot open it to take m3fuse's run lock "
                                 f"({exc.strerror}).") from exc
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    if _held.get(key):
        os.close(fd)
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    try:
        deadline = time.monotonic() + max(timeout, 0.0)
        delay = 0.05
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise EnvironmentProblem(f"{package_dir}: cannot take the run lock ({exc.strerror}).") from exc
                if time.monotonic() >= deadline:
                    raise LockBusy(
                        f"{package_dir}: another m3fuse run holds the lock on {what}; waited "
                        f"{timeout:g} s. Let it finish (or find it with `fuser -v {package_dir}`) and run "
                        f"again; raise the wait with --lock-timeout SECONDS.") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
    finally:
        os.close(fd)  # closing the descriptor releases the flock
