"""Parse or compile Python text m3fuse does not own (vLLM and AITER sources), bounded.

`compile` and `ast.parse` cost about 500 bytes of memory per byte of dense source (measured:
2 MiB of `f(a)` lines, 1 GB and 5 s), and deeply nested input raises RecursionError or
MemoryError, not SyntaxError. So the text is refused past MAX_PARSE bytes before the parser
sees it, and every failure the parser can raise is turned into Unparsable, which each caller
reports as its own clean m3fuse error. The largest vLLM source file (0.33.0:
vllm/v1/worker/gpu_model_runner.py) is 319 KB, AITER's custom_all_reduce.py ~60 KB: 1 MiB
leaves room and bounds the worst case near 0.5 GB (527 MB measured) and a few seconds.
"""

from __future__ import annotations

import ast
from types import CodeType

MAX_PARSE = 1 << 20

# What the parser and compiler raise on hostile text besides SyntaxError: nesting past the
# recursion limit (RecursionError, or MemoryError/SystemError from the C parser), NUL bytes
# and undecodable text (ValueError, UnicodeDecodeError), literals past C limits (OverflowError).
PARSE_ERRORS = (SyntaxError, RecursionError, MemoryError, ValueError, SystemError, OverflowError)


class Unparsable(Exception):
    """The text is too large to parse, or does not parse; `reason` says which in a few words."""

    def __init__(self, reason: str, lineno: int | None = None, msg: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.lineno = lineno  # a SyntaxError's line (None: not a syntax error)
        self.short = f"line {lineno}: {msg}" if lineno is not None else reason


def _check_size(data: str | bytes, limit: int) -> None:
    if len(data) > limit:
        raise Unparsable(f"{len(data)} bytes, larger than the {limit}-byte limit m3fuse parses")


def _why(exc: BaseException) -> Unparsable:
    if isinstance(exc, SyntaxError):
        return Unparsable(f"does not parse as Python: {exc.msg}"
                          + (f" (line {exc.lineno})" if exc.lineno else ""), exc.lineno, exc.msg)
    if isinstance(exc, (RecursionError, MemoryError)):
        return Unparsable(f"nested too deeply or too large to parse ({exc.__class__.__name__})")
    return Unparsable(f"cannot be parsed ({exc.__class__.__name__}: {exc})")


def parse(data: str | bytes, filename: str = "<unknown>", *, limit: int = MAX_PARSE) -> ast.Module:
    _check_size(data, limit)
    try:
        return ast.parse(data, filename=filename)
    except PARSE_ERRORS as exc:
        raise _why(exc) from None


def compile_exec(data: str | bytes, filename: str, *, optimize: int = -1, limit: int = MAX_PARSE) -> CodeType:
    """compile(data, filename, "exec", dont_inherit=True, optimize=optimize), bounded."""
    _check_size(data, limit)
    try:
        return compile(data, filename, "exec", dont_inherit=True, optimize=optimize)
    except PARSE_ERRORS as exc:
        raise _why(exc) from None
