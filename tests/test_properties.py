"""Issue 6, part 5: properties of the patch machinery on real vLLM files (hypothesis).

Random small edits of real release files (0.24.0 / 0.26.0 / 0.33.0) are turned into unified
diffs; then
- hunks: applying the diff gives the edited text, reverse-applying gives the original back,
  whatever the edited lines contain (diff-like prefixes, form feeds, Unicode separators,
  a missing final newline, any amount of context);
- engine: install then revert is the identity (bytes), install twice is install once (no
  write, same inode), and a one-byte change anywhere in a target (pristine or patched) is
  refused as drift with nothing written.
Examples are bounded (about 10 s in all); M3FUSE_STRESS=full runs more.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import realvllm
from faultkit import FULL
from m3fuse.patching import engine
from m3fuse.errors import DriftError, UnsupportedError
from m3fuse.patching.hunks import apply_patch, split_lines
from m3fuse.patching.patchset import load_all
from m3fuse.target import from_root

FILES = [(v, m) for v in ("0.24.0", "0.26.0", "0.33.0") for m in (realvllm.HELPER, realvllm.MODEL, realvllm.MTP)]
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
N_HUNKS = 3000 if FULL else 400
N_ENGINE = 1000 if FULL else 150


@functools.lru_cache(maxsize=None)
def real(version: str, member: str) -> str:
    return realvllm.read_member(version, member).decode("utf-8")


def unified(old: list[str], new: list[str], rel: str, context: int) -> str:
    """difflib's unified diff, plus the '\\ No newline at end of file' marker difflib omits."""
    out = []
    for line in difflib.unified_diff(old, new, f"a/{rel}", f"b/{rel}", n=context):
        out.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return "".join(out)


# Line content that stresses a diff parser: diff syntax at the start of a line, separators
# str.splitlines would split on, tabs, backslashes. Never CR (refused by design) or LF.
TRICKY = st.sampled_from(["--- a/x", "+++ b/x", "@@ -1,2 +1,2 @@", "-", "+", " ", "", "\\ No newline at end of file",
                          "\x0c", "a\x0cb", "\u2028", "\x85", "\x1c\x1d\x1e", "\t\t", "\\", "diff --git a/x b/x",
                          "Binary files a/x and b/x differ", "    return x  # m3fuse", "\x00"])
LINE_TEXT = st.one_of(TRICKY, st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)),
                                      max_size=30))


@st.composite
def edits(draw, text_lines=LINE_TEXT):
    """A real file and a list of 1-4 small edits of it."""
    version, member = draw(st.sampled_from(FILES))
    lines = split_lines(real(version, member))
    new = list(lines)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["insert", "delete", "replace", "eof"]))
        at = draw(st.integers(0, max(len(new) - 1, 0)))
        block = [t + "\n" for t in draw(st.lists(text_lines, min_size=1, max_size=3))]
        if op == "insert":
            new[at:at] = block
        elif op == "delete" and new:
            del new[at:at + draw(st.integers(1, 3))]
        elif op == "replace" and new:
            new[at:at + 1] = block
        elif op == "eof":  # touch the end: drop or add the final newline, or append a bare line
            choice = draw(st.sampled_from(["strip", "append-bare", "append"]))
            if choice == "strip" and new and new[-1].endswith("\n"):
                new[-1] = new[-1][:-1]
            elif choice == "append-bare":
                if new and not new[-1].endswith("\n"):
                    new[-1] += "\n"
                new.append(block[0].rstrip("\n"))
            else:
                if new and not new[-1].endswith("\n"):
                    new[-1] += "\n"
                new.extend(block)
    return version, member, lines, split_lines("".join(new))  # "" elements are not lines


@settings(max_examples=N_HUNKS, **SETTINGS)
@given(case=edits(), context=st.integers(0, 5))
def test_apply_then_revert_is_identity(case, context):
    version, member, old, new = case
    assume("\x00" not in "".join(new))  # NUL is refused as binary by design (see test_hostile)
    assume(old != new)
    diff = unified(old, new, member, context)
    old_b, new_b = "".join(old).encode(), "".join(new).encode()
    assert apply_patch(old_b, diff) == new_b
    assert apply_patch(new_b, diff, reverse=True) == old_b


# --- the engine, in-process, on a real tree --------------------------------------------------

COMMENT = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=25)
PY_LINE = st.one_of(COMMENT.map(lambda t: "# " + t), st.just(""), st.just("pass  # m3fuse"),
                    st.sampled_from(["-- a", "++ b", "x = 1  # ---", "\x0c"]))


def _write_tree_and_set(base: Path, version: str, member: str, old: bytes, new: bytes) -> tuple[Path, Path]:
    root = base / "sp"
    (root / member).parent.mkdir(parents=True)
    (root / member).write_bytes(old)
    (root / "vllm" / "__init__.py").touch()
    folder = base / "patches" / "prop"
    folder.mkdir(parents=True)
    diff = unified(split_lines(old.decode()), split_lines(new.decode()), member, 3)
    (folder / "t.diff").write_text(diff)
    (folder / "manifest.toml").write_text(
        f'format = 1\nname = "prop"\nvllm-versions = ["{version}"]\n\n[[files]]\npath = "{member}"\n'
        f'patch = "t.diff"\npristine-sha256 = "{hashlib.sha256(old).hexdigest()}"\n'
        f'patched-sha256 = "{hashlib.sha256(new).hexdigest()}"\n')
    return root, base / "patches"


def _goal(root: Path, patches: Path, goal: str) -> int:
    tree = engine.inspect(from_root(root, version=None), load_all(patches))
    changes = engine.plan(tree, goal)
    engine.execute(changes)
    return len(changes)


@settings(max_examples=N_ENGINE, **SETTINGS)
@given(case=edits(PY_LINE), drift_at=st.floats(0, 1, exclude_max=True), flip=st.integers(1, 255),
       drift_patched=st.booleans())
def test_engine_round_trip_idempotence_and_drift(case, drift_at, flip, drift_patched):
    version, member, old_lines, new_lines = case
    old, new = "".join(old_lines).encode(), "".join(new_lines).encode()
    assume(old != new)
    try:
        compile(new, member, "exec", dont_inherit=True)
    except (SyntaxError, ValueError):
        assume(False)
    with tempfile.TemporaryDirectory() as tmp:
        root, patches = _write_tree_and_set(Path(tmp), version, member, old, new)
        target = root / member

        assert _goal(root, patches, engine.PATCHED) == 1
        assert target.read_bytes() == new
        ino = target.stat().st_ino
        assert _goal(root, patches, engine.PATCHED) == 0  # apply twice == apply once
        assert target.read_bytes() == new and target.stat().st_ino == ino
        assert _goal(root, patches, engine.PRISTINE) == 1
        assert target.read_bytes() == old  # apply then revert == identity
        assert _goal(root, patches, engine.PRISTINE) == 0

        base = new if drift_patched else old
        if drift_patched:
            _goal(root, patches, engine.PATCHED)
        pos = int(drift_at * len(base))
        drifted = bytearray(base)
        drifted[pos] ^= flip
        target.write_bytes(bytes(drifted))
        ino = target.stat().st_ino
        for goal in (engine.PATCHED, engine.PRISTINE):
            with pytest.raises((DriftError, UnsupportedError)):
                _goal(root, patches, goal)
            assert target.read_bytes() == bytes(drifted) and target.stat().st_ino == ino
        assert [p.name for p in target.parent.iterdir() if ".m3fuse-tmp-" in p.name] == []
