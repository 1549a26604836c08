"""SIGINT and SIGTERM for the CLI: deferred while files are being put in place, reported in
one line otherwise.

Python's default turns SIGINT into a KeyboardInterrupt wherever the main thread is (click then
prints `Aborted!` and exits 1) and SIGTERM into death by signal: either can land between two
renames of a transaction, and neither says what state the tree is in. Here both raise
`Signalled` (a BaseException, so no `except Exception` swallows it and click does not turn it
into `Aborted!`) unless the run is inside `deferred()`: then the signal is held and raised when
the block ends, with the block's writes complete. The CLI turns it into exit 130 and one line
naming the tree's state and the command that finishes or undoes it.

Only the CLI installs the handlers (`install()`): the guard runs inside vLLM's processes and
must leave their signals alone.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_depth = 0
_pending: int | None = None
# What the interrupted command was doing, for the one line: set by the command once it knows
# its vLLM tree (see `describe_with`).
_describe: Callable[[], str] | None = None


class Signalled(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def _handler(signum: int, frame: FrameType | None) -> None:
    global _pending
    if _depth:
        _pending = _pending or signum
        return
    ignore()  # a second Ctrl-C must not interrupt the report of the first
    raise Signalled(signum)


def install() -> None:
    """Route SIGINT and SIGTERM through `_handler` (main thread only; elsewhere a no-op)."""
    try:
        for s in SIGNALS:
            signal.signal(s, _handler)
    except ValueError:  # not the main thread (an embedding host): leave its signals alone
        return
    ready = os.environ.get("M3FUSE_TEST_SIGNALS_READY")
    if ready:  # test-only: lets the interrupt suite signal once the handlers are in place
        open(ready, "a").close()


def ignore() -> None:
    try:
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)
    except ValueError:
        pass


@contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends; then raise the first one that came."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    if not _depth and _pending is not None:
        signum, _pending = _pending, None
        ignore()
        raise Signalled(signum)


def describe_with(fn: Callable[[], str] | None) -> None:
    global _describe
    _describe = fn


@contextmanager
def describing(fn: Callable[[], str]) -> Iterator[None]:
    """`fn` describes an interrupt inside the block (and one deferred to its end); the
    describer before it is back afterwards."""
    global _describe
    before = _describe
    _describe = fn
    try:
        yield
    except Signalled:
        raise  # reported (by the CLI) with `fn`: the block is where it came from
    except BaseException:
        _describe = before
        raise
    _describe = before


def report(sig: Signalled) -> str:
    """The one line printed for an interrupted run."""
    # No describer yet: the command had not started its work (each writing command sets one
    # before it reads or writes the tree), so the tree is as it was.
    what = "it came before the command touched the vLLM tree; run the command again"
    if _describe is not None:
        try:
            what = _describe()
        except Exception as exc:  # the report must not end in a traceback either
            what = f"the vLLM tree's state could not be read ({exc}); run `m3fuse verify`"
    return f"interrupted by {sig.name}: {what}"
