"""Apply one unified diff to one file's bytes, exactly.

No fuzz and no offset search: the file's pristine hash is pinned before a patch is ever
applied, so a hunk that does not sit at its stated line with its stated context means the
patch set itself is broken, and guessing would only hide that.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import PatchSetError


@dataclass(frozen=True)
class Hunk:
    """One hunk as plain data: 1-based start lines and the exact old/new line texts."""

    old_start: int
    new_start: int
    old_lines: tuple[str, ...]
    new_lines: tuple[str, ...]


@dataclass(frozen=True)
class FileDiff:
    source_path: str  # as written after "--- ", with its a/ prefix stripped
    target_path: str
    hunks: tuple[Hunk, ...]


def _strip_prefix(path: str) -> str:
    for prefix in ("a/", "b/"):
        if path.startswith(prefix):
            return path[len(prefix):]
    return path


def parse_diff(patch_text: str, *, name: str = "") -> FileDiff:
    """Parse a diff that must touch exactly one file. `name` labels errors (the patch file)."""
    label = name or "<patch>"
    if "\r" in patch_text:
        raise PatchSetError(
            f"{label} contains carriage returns (CRLF line endings). The target files use LF, so "
            f"the hunks could never match byte for byte. Re-create the patch with LF endings "
            f"(e.g. `git config core.autocrlf false` before checking it out).")
    if "\x00" in patch_text:
        raise PatchSetError(f"{label} contains NUL bytes: it is binary, not a unified diff. "
                            f"Replace it with the text diff of the patch set.")
    if not patch_text.strip():
        raise PatchSetError(f"{label} is empty: no diff header and no hunks, so it was truncated or "
                            f"never written. Restore the patch file from the m3fuse release.")
    # Imported here: verify, status and the guard parse no diff at all on a matching tree.
    from unidiff import PatchSet as _UnidiffPatchSet
    from unidiff.errors import UnidiffParseError

    try:
        parsed = _UnidiffPatchSet(patch_text)
    except UnidiffParseError as exc:
        raise PatchSetError(
            f"{label} is not a well-formed unified diff ({exc}); it may be truncated. "
            f"Restore the patch file from the m3fuse release.") from exc
    if len(parsed) != 1:
        raise PatchSetError(
            f"{label} must change exactly one file but names {len(parsed)}. "
            f"Split it into one diff per target file, each listed in manifest.toml.")
    pf = parsed[0]
    if pf.is_binary_file:
        raise PatchSetError(f"{label} is a binary patch; m3fuse applies text hunks only.")
    hunks = []
    for h in pf:
        old: list[str] = []
        new: list[str] = []
        last: list[list[str]] = []
        for line in h:
            if line.line_type == "\\":
                # "\ No newline at end of file" qualifies the line just before it.
                for side in last:
                    side[-1] = side[-1][:-1] if side[-1].endswith("\n") else side[-1]
                continue
            value = line.value
            if line.line_type == " ":
                old.append(value)
                new.append(value)
                last = [old, new]
            elif line.line_type == "-":
                old.append(value)
                last = [old]
            elif line.line_type == "+":
                new.append(value)
                last = [new]
        hunks.append(Hunk(h.source_start, h.target_start, tuple(old), tuple(new)))
    if not hunks:
        raise PatchSetError(f"{label} has no hunks; an empty patch cannot be told apart from a "
                            f"truncated one. Restore the patch file.")
    return FileDiff(_strip_prefix(pf.source_file), _strip_prefix(pf.target_file), tuple(hunks))


def split_lines(text: str) -> list[str]:
    """Split on LF only, keeping ends: str.splitlines would also split on form feeds and
    Unicode separators that unified diffs treat as ordinary characters."""
    parts = text.split("\n")
    lines = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def apply_diff(original: bytes, diff: FileDiff, *, reverse: bool = False, name: str = "") -> bytes:
    """Return `original` with every hunk of `diff` applied (or un-applied with `reverse`).

    Raises PatchSetError if any hunk's old side is not found verbatim at its stated line.
    """
    label = name or diff.target_path
    try:
        text = original.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PatchSetError(f"{label}: the file is not UTF-8 text ({exc}); the patch cannot apply.") from exc
    lines = split_lines(text)
    out: list[str] = []
    cursor = 0  # index into `lines` of the first line not yet copied
    for number, hunk in enumerate(diff.hunks, 1):
        start, old, new = ((hunk.new_start, hunk.new_lines, hunk.old_lines) if reverse
                           else (hunk.old_start, hunk.old_lines, hunk.new_lines))
        # A hunk with no old lines inserts after line `start`; otherwise `start` is its first line.
        index = start if not old else start - 1
        if index < cursor:
            raise PatchSetError(f"{label}: hunk {number} starts at line {start}, inside or before the "
                                f"previous hunk; the patch is malformed.")
        found = tuple(lines[index:index + len(old)])
        if found != old:
            first_bad = next((i for i, (a, b) in enumerate(zip(found, old)) if a != b), min(len(found), len(old)))
            want = old[first_bad] if first_bad < len(old) else "<end of hunk>"
            got = found[first_bad] if first_bad < len(found) else "<end of file>"
            raise PatchSetError(
                f"{label}: hunk {number} does not match at line {index + first_bad + 1}: expected "
                f"{want!r}, found {got!r}. The patch was not made from this file; the patch set is "
                f"inconsistent with its own pinned hash.")
        out.extend(lines[cursor:index])
        out.extend(new)
        cursor = index + len(old)
    out.extend(lines[cursor:])
    return "".join(out).encode("utf-8")


def apply_patch(original: bytes, patch_text: str, *, reverse: bool = False, name: str = "") -> bytes:
    """Parse `patch_text` (one file's unified diff) and apply it to `original`."""
    return apply_diff(original, parse_diff(patch_text, name=name), reverse=reverse, name=name)
