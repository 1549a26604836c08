"""One m3fuse run at a time per vLLM tree.

The lock is an flock on the `vllm/` package directory itself: nothing is written to take it,
it works on a tree m3fuse may not write to yet, and the kernel drops it when a run dies, so a
killed run never leaves a stale lock behind.
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


@contextmanager
def hold(package_dir: Path, *, timeout: float = DEFAULT_TIMEOUT) -> Iterator[None]:
    try:
        fd = os.open(package_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise EnvironmentProblem(f"{package_dir}: cannot open it to take m3fuse's run lock "
                                 f"({exc.strerror}).") from exc
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
                        f"{package_dir}: another m3fuse run holds the lock on this vLLM tree; waited "
                        f"{timeout:g} s. Let it finish (or find it with `fuser -v {package_dir}`) and run "
                        f"again; raise the wait with --lock-timeout SECONDS.") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock
