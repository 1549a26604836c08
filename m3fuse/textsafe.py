"""Text for a terminal: control characters made visible.

Set names, versions and summaries come from manifests, distribution METADATA, wheel file names
and paths others may have chosen. Printed raw, an escape sequence in one of them can recolour,
hide or rewrite what the terminal shows (a forged `verify: OK`, a cleared screen, a changed
window title), a carriage return can overwrite a line, and a bidirectional override can reorder
it. Every line the CLI prints goes through `visible()` (cli/term.py); a value that must stay on
one line (a name, a version, a path in a table) goes through `one_line()` where it is put in.
`--json` output is left exact: JSON escapes every control character itself.
"""

from __future__ import annotations

import re

# C0 controls but tab and newline, DEL, C1 controls (U+0080-U+009F: 8-bit CSI and friends), the
# bidirectional embeddings, overrides and isolates, and the Unicode line/paragraph separators.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_UNSAFE_LINE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _show(m: re.Match[str]) -> str:
    c = ord(m.group(0))
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def visible(text: str) -> str:
    """`text` with every control character but newline and tab shown as an escape (\\x1b, \\u202e)."""
    return _UNSAFE.sub(_show, text)


def one_line(value: object) -> str:
    """`str(value)` on one line: newlines and tabs are escaped too."""
    return _UNSAFE_LINE.sub(_show, str(value))
