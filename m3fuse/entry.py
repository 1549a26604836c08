"""The console entry point (`m3fuse`, `python -m m3fuse`): SIGINT/SIGTERM handlers first, then
the command line.

Importing the CLI loads click and the patch engine (100-300 ms on a cold start). A signal in
that time used to meet Python's default handling: a KeyboardInterrupt traceback, or death by
SIGTERM. So this module imports nothing heavy: it installs m3fuse's handlers (interrupt.py
needs only os and signal) before the first heavy import, and an interrupt that lands while the
CLI is still loading is reported in the same one line as any other, exit 130. Nothing has been
read or written by then.
"""

from __future__ import annotations

import sys


def main() -> None:
    from . import interrupt

    try:
        interrupt.install()
        from .cli import main as cli_main

        cli_main()  # click's main reports a signal itself from here on (cli._Group.main)
    except interrupt.Signalled as sig:  # while the CLI was still loading
        _interrupted(interrupt, sig)
    except KeyboardInterrupt:  # Python's own handler, a moment before install() replaced it
        _interrupted(interrupt, interrupt.Signalled(2))


def _interrupted(interrupt, sig) -> None:  # noqa: ANN001 - the interrupt module, a Signalled
    from .errors import EXIT_INTERRUPTED

    interrupt.ignore()
    try:
        sys.stderr.write(f"m3fuse: {interrupt.report(sig)}\n")
        sys.stderr.flush()
    finally:
        sys.exit(EXIT_INTERRUPTED)
