"""Ported sets as data derived from their bases: `m3fuse port --refresh` and `--record-resolutions`.

A ported set names, per file, the set its changes were merged from (`ported-from` in its
manifest). What a maintainer changed by hand after the merge is kept next to the diffs as
`<file>.resolution.diff`: a unified diff from the merge's output (conflict markers and all,
with labels that do not depend on any path) to the set's final file. So a ported set is

    final = resolution(merge3(pristine(base), pristine(release), patched(base)))

and `--refresh` re-derives every ported set that way, bases before the sets made from them,
each set written whole or not at all (staged, proved, swapped in). A fix made in a base thus
reaches every set derived from it with one command; a resolution that no longer fits the new
merge stops the refresh with the conflict named, and nothing of that set is written.
`--record-resolutions` writes the resolution files from the sets as they are (after a port or
a hand re-derivation), so that a refresh reproduces them byte for byte.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .. import interrupt, safeio
from ..textsafe import one_line
from ..errors import EnvironmentProblem, IntegrityError, MergeConflict, PatchSetError
from ..fingerprint import sha256_bytes
from . import atomic, mutex, setwriter
from ..wheels.needs import NEEDS_FILE
from .basesource import BaseSource
from .hunks import FileDiff, apply_diff, parse_diff, split_lines
from .patchset import MANIFEST, PatchSet, Target, _read_set_file, load_all, load_patchset
from .port import MARKERS, MergedFile, _prove_set, merge_file
from .portfs import MARKER, STAGE_MARK, check_set_folder, clean_stages, mark, remove_stage, unmark, write_folder
from .readers import READERS_FILE

RESOLUTION_SUFFIX = ".resolution.diff"


def resolution_name(path: str) -> str:
    return PurePosixPath(path).name + RESOLUTION_SUFFIX


def merge_label(pset: PatchSet) -> str:
    # Conflict markers carry this label; it must not name a path, or the recorded resolutions
    # would only apply on the machine that recorded them.
    return f"vLLM {pset.vllm_versions[0]}"


@dataclass
class Outcome:
    name: str
    changed: bool
    files: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"set": self.name, "changed": self.changed, "files": self.files}


# ----------------------------------------------------------------------------- order and references
def derived_in_order(sets: list[PatchSet]) -> list[PatchSet]:
    """The ported sets, each after every set it names as a base. A reference that names no set,
    a set that does not patch the file, or a cycle is a tampered manifest: refused by name."""
    by_name = {s.name: s for s in sets}
    for s in sets:
        for t in s.targets:
            if t.ported_from is None:
                continue
            base = by_name.get(t.ported_from)
            where = f"{s.folder / MANIFEST} ({t.path})"
            if base is None:
                raise PatchSetError(headline=f"{where}: ported-from names a set that does not exist",
                                    details=[("expected", f"one of {', '.join(sorted(by_name))}"),
                                             ("got", repr(t.ported_from))],
                                    hint="restore the manifest from git; a ported set is refreshed from the "
                                         "base it was made from")
            if not any(b.path == t.path for b in base.targets):
                raise PatchSetError(headline=f"{where}: ported-from names a set that does not patch this file",
                                    details=[("expected", f"a set patching {t.path}"), ("got", base.name)],
                                    hint="restore the manifest from git")
    order: list[PatchSet] = []
    state: dict[str, str] = {}

    def visit(s: PatchSet, trail: list[str]) -> None:
        if state.get(s.name) == "done":
            return
        if state.get(s.name) == "open":
            raise PatchSetError(headline="ported-from references form a cycle; no set in it has a base",
                                details=[("cycle", " -> ".join(trail + [s.name]))],
                                hint="restore the manifests from git: a hand-written set has no ported-from")
        state[s.name] = "open"
        for t in s.targets:
            if t.ported_from is not None:
                visit(by_name[t.ported_from], trail + [s.name])
        state[s.name] = "done"
        if any(t.ported_from for t in s.targets):
            order.append(s)

    for s in sets:
        visit(s, [])
    return order


# ----------------------------------------------------------------------------- one file
def _patched(pset: PatchSet, target: Target, pristine: bytes) -> bytes:
    patched = apply_diff(pristine, target.diff, name=str(target.patch_file))
    if sha256_bytes(patched) != target.patched_sha256:
        raise IntegrityError(headline=f"{target.patch_file}: does not give its pinned patched file",
                             details=[("expected", target.patched_sha256), ("got", sha256_bytes(patched))],
                             hint=f"the set {pset.name} is inconsistent; restore it from git")
    return patched


def merged_from_base(s: PatchSet, t: Target, base: PatchSet, source: BaseSource) -> MergedFile:
    bt = next(b for b in base.targets if b.path == t.path)
    base_pristine = source.pristine(base, bt)
    return merge_file(t.path, base_pristine, source.pristine(s, t), _patched(base, bt, base_pristine),
                      tree_label=merge_label(s), set_name=base.name, new_name=s.name)


def apply_resolution(merged: bytes, diff: FileDiff, *, where: str) -> bytes:
    """Apply a resolution diff whose hunks may have moved (a base fix above a conflict shifts
    it): each hunk's old lines are looked for at their line, then ever further away, and must be
    found verbatim; the first that is not stops everything."""
    lines = split_lines(merged.decode("utf-8"))
    out: list[str] = []
    cursor = 0
    shift = 0
    for number, hunk in enumerate(diff.hunks, 1):
        old = hunk.old_lines
        want = (hunk.old_start if not old else hunk.old_start - 1) + shift
        at = None
        for delta in range(len(lines) + 1):
            for i in (want - delta, want + delta) if delta else (want,):
                if cursor <= i <= len(lines) - len(old) and tuple(lines[i:i + len(old)]) == old:
                    at = i
                    break
            if at is not None:
                break
        if at is None:
            first = next((ln for ln in old if ln.startswith(MARKERS)), old[0] if old else "")
            raise MergeConflict(
                headline=f"{where}: hand resolution {number} no longer fits the merge; nothing of this set was written",
                details=[("expected", f"near line {want + 1}: {first.rstrip()!r} (and its {len(old) - 1} "
                                      f"following line(s)) as recorded"),
                         ("got", "no such lines in the new merge: the base changed the resolved region")],
                hint="port it again (`m3fuse port --from BASE`), resolve by hand, then "
                     "`m3fuse port --record-resolutions`")
        shift = at - (hunk.old_start - (1 if old else 0))
        out += lines[cursor:at] + list(hunk.new_lines)
        cursor = at + len(old)
    return "".join(out + lines[cursor:]).encode("utf-8")


# ----------------------------------------------------------------------------- one set
def derive(s: PatchSet, by_name: dict[str, PatchSet], source: BaseSource) -> tuple[dict[str, bytes], list[MergedFile]]:
    """The files of set `s` as derived from its bases and its recorded resolutions."""
    changes: list[setwriter.FileChange] = []
    finals: list[MergedFile] = []
    extra: dict[str, bytes] = {}
    for t in s.targets:
        if t.ported_from is None:  # a hand-written file in a ported set: kept as it is
            pristine = source.pristine(s, t)
            final = MergedFile(t.path, "", pristine, _patched(s, t, pristine))
        else:
            final = merged_from_base(s, t, by_name[t.ported_from], source)
            res_path = s.folder / resolution_name(t.path)
            if os.path.lexists(res_path):
                # A regular file only, bounded, strict UTF-8 (a link, FIFO or huge file is refused unread).
                text = _read_set_file(res_path, "a resolution diff", "this resolution diff")
                extra[res_path.name] = text
                where = f"{s.name}: {t.path}"
                final.merged = apply_resolution(final.merged, parse_diff(_text(text, res_path), name=str(res_path)),
                                                where=where)
            left = [i for i, ln in enumerate(split_lines(final.merged.decode("utf-8")), 1) if ln.startswith(MARKERS)]
            if left:
                raise MergeConflict(
                    headline=f"{s.name}: the merge of {t.path} from {t.ported_from} has conflicts no recorded "
                             f"resolution covers; nothing of this set was written",
                    details=[("conflict", f"line {i}") for i in left],
                    hint=f"port {s.name} again from {t.ported_from}, resolve by hand, then "
                         f"`m3fuse port --record-resolutions`")
        finals.append(final)
        changes.append(setwriter.FileChange(t.path, final.pristine, final.merged, t.ported_from))
    files = setwriter.render(s.name, list(s.vllm_versions), s.summary, changes, ported_from=s.ported_from)
    return {**files, **extra}, finals


# A set's files that `m3fuse port` does not make; a refresh keeps them as they are.
CARRIED = frozenset({NEEDS_FILE, READERS_FILE})


def _text(data: bytes, path: Path) -> str:
    try:
        return safeio.decode(data, path)
    except safeio.NotText as exc:
        raise PatchSetError(f"{path}: {exc.reason}; a resolution diff is UTF-8 text. Record it again with "
                            f"`m3fuse port --record-resolutions`.") from None


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: _read_set_file(p, "a set's file", "this set file") for p in sorted(folder.iterdir())
            if p.is_file() and not p.is_symlink() and p.name != MARKER}


def _exchange(a: Path, b: Path) -> None:
    """Swap two directories in one step (Linux renameat2 RENAME_EXCHANGE, glibc 2.28+)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        raise EnvironmentProblem(f"{b}: this system's C library has no renameat2, which a refresh needs to "
                                 f"swap a set in whole; nothing was changed. Refresh on Linux (glibc 2.28+).") from None
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
        err = ctypes.get_errno()
        raise EnvironmentProblem(f"{b}: cannot swap the refreshed set in ({os.strerror(err)}); the set is "
                                 f"unchanged.")


def replace_set(folder: Path, files: dict[str, bytes], prove: Callable[[Path], None]) -> None:
    """Put `files` in place of the set folder: staged and proved by port's writer under a
    stage name, then swapped with the old folder in one rename. A kill leaves the old set or
    the new one, plus at most a marked stage folder that the next run removes."""
    check_set_folder(folder)  # never through a symlinked set folder or an unsafe patches folder
    new = folder.parent / f".{folder.name}{STAGE_MARK}{os.getpid()}-{os.urandom(4).hex()}-new"
    write_folder(new, files, prove, keep_marker=True)
    # The old set leaves under the stage name, so it must carry the marker before the swap;
    # a kill in between leaves the marker in a live set, which the next refresh drops.
    mark(folder)
    atomic._checkpoint(f"refresh-swap {folder.name}")
    try:
        _exchange(new, folder)
    except BaseException:
        unmark(folder)
        remove_stage(new)
        raise
    unmark(folder)
    atomic._fsync_dir(folder.parent)
    atomic._checkpoint(f"refresh-swapped {folder.name}")  # the old set now sits under the stage name
    remove_stage(new)


# ----------------------------------------------------------------------------- commands
def refresh(patches: Path, source: BaseSource, *, record: bool = False, check: bool = False,
            lock_timeout: float = mutex.DEFAULT_TIMEOUT, echo: Callable[[str], None] = lambda _: None) -> list[Outcome]:
    """Re-derive (or with `record`, record the resolutions of) every ported set under `patches`.
    `check` writes nothing at all, not even to the pristine cache: the outcomes say which sets
    differ from a fresh derivation."""
    outcomes: list[Outcome] = []
    if check:
        source.read_only = True
    what = "wrote nothing" if check else ("left each ported set whole (its old files or its new ones) and no stage "
                                          "folder; run it again to finish")
    with interrupt.describing(lambda: f"`m3fuse port --refresh` on {patches} {what}"), \
            mutex.hold(patches, timeout=lock_timeout, what=f"the patches folder {patches}"):
        if not check:
            # Every set folder a refresh may replace is checked before anything is written,
            # so a refusal (a symlinked set folder, say) leaves every set as it was.
            for s in derived_in_order(load_all(patches)):
                check_set_folder(s.folder)
            # A run stopped by SIGKILL (a signal is held until a swap is done) left these.
            for gone in clean_stages(patches):
                echo(f"port: removed {gone.name}, a stage folder an interrupted refresh left behind")
            for folder in sorted(p for p in patches.iterdir() if p.is_dir() and not p.is_symlink()):
                unmark(folder)
        sets = load_all(patches, parse=True)
        by_name = {s.name: s for s in sets}
        for s in derived_in_order(sets):
            s = by_name[s.name]
            current = folder_files(s.folder)
            if record:
                files, finals = _recorded(s, by_name, source, current)
            else:
                files, finals = derive(s, by_name, source)
                # Written by another command from the release itself, not from the base.
                files.update({k: v for k, v in current.items() if k in CARRIED})
            outcome = Outcome(s.name, files != current,
                              [{"path": f.path, "ported_from": f.ported_from or None,
                                "patched_sha256": sha256_bytes(f.merged),
                                "resolution": resolution_name(f.path) in files} for f in finals])
            outcomes.append(outcome)
            if outcome.changed and not check:
                # A signal waits until the set is swapped and its stage removed: a refresh
                # stopped by SIGINT/SIGTERM leaves no stage folder.
                with interrupt.deferred():
                    replace_set(s.folder, files, _prove_set(finals))
                by_name[s.name] = load_patchset(s.folder).parse()
    return outcomes


def _recorded(s: PatchSet, by_name: dict[str, PatchSet], source: BaseSource,
              current: dict[str, bytes]) -> tuple[dict[str, bytes], list[MergedFile]]:
    """The set's folder as it is, with one resolution file per file whose final text differs
    from the merge of its base (and none where the merge alone gives it)."""
    files = {k: v for k, v in current.items() if not k.endswith(RESOLUTION_SUFFIX)}
    finals: list[MergedFile] = []
    for t in s.targets:
        pristine = source.pristine(s, t)
        final = MergedFile(t.path, t.ported_from or "", pristine, _patched(s, t, pristine))
        finals.append(final)
        if t.ported_from is None:
            continue
        merged = merged_from_base(s, t, by_name[t.ported_from], source).merged
        if merged != final.merged:
            files[resolution_name(t.path)] = setwriter.unified_diff(
                setwriter.FileChange(t.path, merged, final.merged)).encode("utf-8")
    return files, finals


def describe(outcomes: list[Outcome], *, record: bool, check: bool) -> list[str]:
    verb = "recorded" if record else "would change" if check else "re-derived"
    lines = []
    for o in outcomes:
        res = [f["path"].rsplit("/", 1)[-1] for f in o.files if f["resolution"]]
        state = (verb if o.changed else "unchanged")
        lines.append(f"  {one_line(o.name):<16} {state:<12} resolutions: {one_line(', '.join(res)) or 'none'}")
    changed = sum(o.changed for o in outcomes)
    head = f"port: {len(outcomes)} ported set(s), {changed} {verb if changed else 'changed'}"
    return [head] + lines
