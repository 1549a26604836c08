"""Every failure class m3fuse reports, and the one table that maps them to exit codes.

Each error carries a single paragraph for the user: what is wrong, which file, the expected
and the actual value, and what to do next.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_DRIFT = 3
EXIT_INTEGRITY = 4
EXIT_ENVIRONMENT = 5
EXIT_CONFLICT = 6

EXIT_CODES_HELP = """\
\b
Exit codes:
  0  ok (or nothing to do)
  2  usage error (bad option, bad value)
  3  source drift or unsupported vLLM (files match no known fingerprint)
  4  artifact integrity failure (hash or size mismatch of a download or wheel, bad wheel)
  5  environment problem (vLLM not found, lock busy, permission denied, pip failed)
  6  `port` needs a hand: merge conflicts (or a merged file that does not compile)"""


class M3fuseError(Exception):
    """Base class; `exit_code` is the one place a failure class meets its exit status."""

    exit_code: int = EXIT_ENVIRONMENT
    kind: str = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageProblem(M3fuseError):
    exit_code = EXIT_USAGE
    kind = "usage"


class DriftError(M3fuseError):
    """Installed files match neither the pristine nor the patched fingerprint."""

    exit_code = EXIT_DRIFT
    kind = "drift"


class UnsupportedError(M3fuseError):
    """The vLLM found has no patch set."""

    exit_code = EXIT_DRIFT
    kind = "unsupported"


class PatchSetError(M3fuseError):
    """A patch set or manifest is malformed or unsafe (it is refused before anything is read
    from or written to the vLLM tree)."""

    exit_code = EXIT_DRIFT
    kind = "bad-patch-set"


class IntegrityError(M3fuseError):
    """A downloaded or cached artifact is not the pinned one."""

    exit_code = EXIT_INTEGRITY
    kind = "integrity"


class EnvironmentProblem(M3fuseError):
    exit_code = EXIT_ENVIRONMENT
    kind = "environment"


class LockBusy(EnvironmentProblem):
    kind = "lock-busy"


class MergeConflict(M3fuseError):
    """`m3fuse port` merged with conflicts; the work folder holds the files to resolve."""

    exit_code = EXIT_CONFLICT
    kind = "merge-conflict"
    details: dict | None = None


class NotPatched(M3fuseError):
    """The tree is readable and recognised but not patched, where the command needs it patched
    (`m3fuse env fused|control`)."""

    exit_code = EXIT_DRIFT
    kind = "not-patched"
