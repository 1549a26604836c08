"""The entry point of the `m3fuse` command (bin/m3fuse) and of `python -m m3fuse`:
SIGINT/SIGTERM handled from the moment this module is imported, then the command line.

Importing the CLI loads click and the patch engine (100-300 ms on a cold start). A signal in
that time used to meet Python's default handling: a KeyboardInterrupt traceback, or death by
SIGTERM. So the first statements of this module, run as the command imports it, point
both signals at `_early`, which only notes them (it uses the builtin `_signal`: importing
`signal` builds its enums, time in which a Ctrl-C would still be Python's). `main()` then
installs m3fuse's real handlers (interrupt.py) before the first heavy import, and a signal
noted or raised while the CLI is still loading is reported in the same one line as any other,
exit 130. Nothing has been read or written by then.

Before this module, the `m3fuse` command has noted signals from its own first statement and
passes one on to `main`. What remains is the interpreter's own start (its streams, `site`): a
signal there is Python's (docs/reliability.md).
"""

from __future__ import annotations

import _signal
import sys

_pending = 0


def _early(signum: int, frame: object) -> None:
    global _pending
    _pending = _pending or signum


# As early as the module allows: from here a signal is noted, never raised.
try:
    _signal.signal(_signal.SIGINT, _early)
    _signal.signal(_signal.SIGTERM, _early)
except ValueError:  # imported outside the main thread (not as the command): leave signals be
    pass


def main(noted: int = 0) -> None:
    """`noted`: a signal the `m3fuse` launcher (bin/m3fuse) noted before this module took over."""
    global _pending
    _pending = _pending or noted
    from . import interrupt  # os and signal only; a signal meanwhile is noted by _early

    try:
        if _pending:
            raise interrupt.Signalled(_pending)
        interrupt.install()
        if _pending:  # came between the check above and install()
            raise interrupt.Signalled(_pending)
        from .cli import main as cli_main

        cli_main()  # click's main reports a signal itself from here on (cli._Group.main)
    except interrupt.Signalled as sig:  # while the CLI was still loading
        _interrupted(sig.signum)
    except KeyboardInterrupt:  # only where _early could not be installed (not the main thread)
        _interrupted(int(_signal.SIGINT))


def _interrupted(signum: int) -> None:
    """The one line for a signal that came while the CLI was loading, and exit 130."""
    for s in (_signal.SIGINT, _signal.SIGTERM):
        _signal.signal(s, _signal.SIG_IGN)  # a second Ctrl-C must not interrupt the report of the first
    from .errors import EXIT_INTERRUPTED  # errors.py imports nothing heavy

    try:
        from . import interrupt
        from .textsafe import one_line

        sys.stderr.write(f"m3fuse: {one_line(interrupt.report(interrupt.Signalled(signum)))}\n")
        sys.stderr.flush()
    finally:
        sys.exit(EXIT_INTERRUPTED)
