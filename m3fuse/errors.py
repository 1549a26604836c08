"""Every failure class m3fuse reports, and the one table that maps them to exit codes.

Each error tells the user what is wrong, which file, the expected and the actual value, and
what to do next. Errors built with `headline=` are laid out the way pip and cargo print theirs,
so they can be scanned::

    headline: one line saying what failed
      amd-aiter:
        installed: 0.1.21
        pinned:    0.1.15.post1
    hint: one line saying what to do

`.message` is always the whole text (the --json error object carries it unchanged). Every
error ends with one `hint:` line: the one given where it is raised, else its class's
`next_step` (tests/test_hints.py walks the catalogue and every raise site). A hint is one
line of at most HINT_COLUMNS columns with its `hint: ` prefix, counting each value filled in
at run time as 8 columns.
"""

from __future__ import annotations

from collections.abc import Sequence

# A details row: (label, value). A row with an empty label is a sub-heading (a file or a
# wheel); the rows below it are indented under it and the labels of a group align.
Row = tuple[str, str]

# 120, not 80: the hints name the command to run with its options and the file or version it
# is about (`pip install --force-reinstall --no-deps vllm==0.34.0`), which 80 columns cannot
# hold together with the `hint: ` prefix; 120 is the width of a terminal split in two panes
# on a laptop screen and what the CLI's --help wraps at plus margin.
HINT_COLUMNS = 120

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_DRIFT = 3
EXIT_INTEGRITY = 4
EXIT_ENVIRONMENT = 5
EXIT_CONFLICT = 6
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C; SIGTERM gives it too

EXIT_CODES_HELP = """\
\b
Exit codes:
  0  ok (or nothing to do)
  2  usage error (bad option, bad value)
  3  source drift or unsupported vLLM (files match no known fingerprint)
  4  artifact integrity failure (hash or size mismatch of a download or wheel, bad wheel)
  5  environment problem (vLLM not found, lock busy, permission denied, pip failed, the
     release needs a newer AITER than the lock pins and none is installed)
  6  `port` needs a hand: merge conflicts (or a merged file that does not compile)
  130 interrupted (SIGINT or SIGTERM): a write in progress is finished first; one line
      names the tree's state and the command that finishes or undoes the job"""


class M3fuseError(Exception):
    """Base class; `exit_code` is the one place a failure class meets its exit status."""

    exit_code: int = EXIT_ENVIRONMENT
    kind: str = "error"
    # The next step when the raise site gives none: true of every error of the class.
    next_step: str | None = "fix the cause named above and run the same command again"

    def __init__(self, message: str | None = None, *, headline: str | None = None,
                 details: Sequence[Row] = (), hint: str | None = None) -> None:
        self.headline = headline if headline is not None else (message or "")
        self.details: tuple[Row, ...] = tuple(details)
        given = message is not None and "\nhint: " in message
        self.hint = hint if hint is not None or given else self.next_step
        if message is None:
            message = render(self.headline, self.details, self.hint)
        elif self.hint and not given:
            message = f"{message}\nhint: {self.hint}"
        super().__init__(message)
        self.message = message
        # Extra keys for the --json error object (e.g. the wheel plan a refusal was judged on).
        self.payload: dict = {}


def render(headline: str, details: Sequence[Row] = (), hint: str | None = None) -> str:
    """The scannable layout: headline, aligned label/value rows (grouped under sub-headings
    where given), one `hint:` line."""
    lines = [headline]
    group: list[Row] = []
    pad = "  "  # rows under a sub-heading are indented one step further

    def flush() -> None:
        width = max((len(label) for label, _ in group), default=0) + 1
        for label, value in group:
            lines.append(f"{pad}{label + ':':<{width}} {value}")
        group.clear()

    for label, value in details:
        if label:
            group.append((label, value))
            continue
        flush()
        lines.append(f"  {value}")
        pad = "    "
    flush()
    if hint:
        lines.append(f"hint: {hint}")
    return "\n".join(lines)


class UsageProblem(M3fuseError):
    exit_code = EXIT_USAGE
    kind = "usage"
    next_step = "correct the option or file named above; `m3fuse COMMAND --help` lists the options"


class DriftError(M3fuseError):
    """Installed files match neither the pristine nor the patched fingerprint."""

    exit_code = EXIT_DRIFT
    kind = "drift"
    next_step = "reinstall that vLLM release (pip --force-reinstall --no-deps), or `m3fuse port` an edit you meant"


class UnsupportedError(M3fuseError):
    """The vLLM found has no patch set."""

    exit_code = EXIT_DRIFT
    kind = "unsupported"
    next_step = "install a release `m3fuse sets` lists, or make a set: `m3fuse port --name NAME --out DIR`"


class PatchSetError(M3fuseError):
    """A patch set or manifest is malformed or unsafe (it is refused before anything is read
    from or written to the vLLM tree)."""

    exit_code = EXIT_DRIFT
    kind = "bad-patch-set"
    next_step = "use the shipped sets (drop --patches), or fix the set file named above"


class IntegrityError(M3fuseError):
    """A downloaded or cached artifact is not the pinned one."""

    exit_code = EXIT_INTEGRITY
    kind = "integrity"
    next_step = "fetch the file again from a trusted source; re-pin with `m3fuse lock add` only if intended"


class RedirectRefused(IntegrityError):
    """A server redirected a download to a URL the lock's URL policy refuses (a host or scheme
    the lock could not pin, or out of http(s)); nothing was downloaded."""

    kind = "redirect-refused"


class EnvironmentProblem(M3fuseError):
    exit_code = EXIT_ENVIRONMENT
    kind = "environment"


class DowngradeRefused(EnvironmentProblem):
    """Installing the pins would replace an installed distribution with an older version."""

    kind = "downgrade"


class AiterNeedsUnmet(EnvironmentProblem):
    """The vLLM release needs more of AITER (modules, APIs, a version) than the pinned build
    has, and no installed build has it; refused before any download (exit 5: the environment
    cannot be set up from this lock)."""

    kind = "aiter-needs-unmet"


class ExternallyManaged(EnvironmentProblem):
    """The target Python is marked externally managed (PEP 668) and no override was given."""

    kind = "externally-managed"


class UnsafePath(EnvironmentProblem):
    """A file or folder m3fuse would read or write through is not what it must be: a FIFO, a
    device or a symlink where a regular file belongs, a directory swapped for a symlink, a
    cache or work folder another user can write, a file past its size limit. Refused before
    anything is written (docs/reliability.md, threat model)."""

    kind = "unsafe-path"
    next_step = "put a regular file or a folder only you can write at the path named above"


class LockBusy(EnvironmentProblem):
    kind = "lock-busy"
    next_step = "wait for the other m3fuse run to finish (or raise --lock-timeout), then run again"


class MergeConflict(M3fuseError):
    """`m3fuse port` merged with conflicts; the work folder holds the files to resolve."""

    exit_code = EXIT_CONFLICT
    kind = "merge-conflict"
    next_step = "resolve the files in the work folder, then run `m3fuse port --resume WORKDIR`"


class NotPatched(M3fuseError):
    """The tree is readable and recognised but not patched, where the command needs it patched
    (`m3fuse env fused|control`)."""

    exit_code = EXIT_DRIFT
    kind = "not-patched"
    next_step = "run `m3fuse install` first"


class Interrupted(M3fuseError):
    """SIGINT or SIGTERM stopped the run (after the write in progress, if any, was finished)."""

    exit_code = EXIT_INTERRUPTED
    kind = "interrupted"
    next_step = None  # its one line ends with the command that finishes or undoes the job
