"""Decide what state a vLLM tree is in, and move it to patched or pristine as one transaction.

The state is read from content alone (every target's sha256 against the set's pins), so a run
that was killed at any point is recognised by the next one: each file is replaced atomically,
hence always pristine or patched, and a mix of the two is the "partial" state that `install`
and `revert` both know how to finish.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from . import atomic, mutex
from .. import interrupt, pysource, safeio
from ..errors import (EXIT_DRIFT, EXIT_OK, DriftError, EnvironmentProblem, M3fuseError, PatchSetError,
                     UnsafePath, UnsupportedError)
from ..bytecode import stale_bytecode
from ..catalog import release, supported_releases
from ..fingerprint import bytecode_files, record_hashes_for, remove_bytecode, sha256_bytes
from .hunks import apply_diff
from .patchset import PatchSet, Target, resolve_inside
from ..target import VllmTarget

PRISTINE, PATCHED, DRIFTED, MISSING, NOT_A_FILE = "pristine", "patched", "drifted", "missing", "not-a-file"
PARTIAL, UNSUPPORTED = "partial", "unsupported"


@dataclass
class FileState:
    target: Target
    path: Path
    state: str
    sha256: str | None
    record: str | None = None  # "match" / "differs" / "unlisted" against the vLLM wheel's RECORD
    stale_bytecode: list[str] = field(default_factory=list)


@dataclass
class TreeState:
    vllm: VllmTarget
    patch_set: PatchSet | None
    files: list[FileState]
    state: str  # pristine / patched / partial / drifted / unsupported
    supported: list[PatchSet]
    leftovers: list[Path] = field(default_factory=list)
    # For an unsupported tree (patch_set None): the set its files come closest to, and whether
    # it holds none of the files any set patches (a vLLM without the MiniMax M3 model).
    closest: PatchSet | None = None
    no_model: bool = False

    @property
    def problems(self) -> list[str]:
        out = [f"{f.path}: {s}" for f in self.files for s in f.stale_bytecode]
        out += [f"{p}: temp file left by an interrupted m3fuse run" for p in self.leftovers]
        return out


def _file_state(root: Path, t: Target, cache: dict[str, tuple[Path, str, str | None]]) -> FileState:
    # Sets share target paths: each file is resolved and hashed once however many sets name it.
    if t.path not in cache:
        path = resolve_inside(root, t.path)
        try:
            # Regular files only, every directory on the way checked: a FIFO or a device in a
            # target's place is "not a file" (refused, exit 5), never read.
            data = safeio.read_under(Path(os.path.realpath(root)), t.path, safeio.MAX_SOURCE)
        except FileNotFoundError:
            cache[t.path] = (path, MISSING, None)
        except safeio.NotRegular:
            cache[t.path] = (path, NOT_A_FILE, None)
        except safeio.Unsafe as exc:
            raise safeio.refusal(exc, hint=_REINSTALL_HINT) from None
        except OSError as exc:
            raise EnvironmentProblem(f"{path}: cannot read it ({exc.strerror}).") from exc
        else:
            cache[t.path] = (path, "", sha256_bytes(data))
    path, kind, digest = cache[t.path]
    if not kind:
        kind = PRISTINE if digest == t.pristine_sha256 else PATCHED if digest == t.patched_sha256 else DRIFTED
    return FileState(t, path, kind, digest)


_REINSTALL_HINT = ("something other than pip has rearranged this install; reinstall vLLM "
                   "(pip install --force-reinstall --no-deps vllm==VERSION) and run m3fuse again")


def _summarise(files: list[FileState]) -> str:
    states = {f.state for f in files}
    if states == {PRISTINE}:
        return PRISTINE
    if states == {PATCHED}:
        return PATCHED
    if states <= {PRISTINE, PATCHED}:
        return PARTIAL
    return DRIFTED


def inspect(vllm: VllmTarget, sets: list[PatchSet]) -> TreeState:
    """Read-only: fingerprint the tree against every set and pick the one it matches."""
    cache: dict[str, tuple[Path, str, str | None]] = {}
    per_set = [(s, [_file_state(vllm.root, t, cache) for t in s.targets]) for s in sets]
    matching = [(s, fs) for s, fs in per_set if all(f.state in (PRISTINE, PATCHED) for f in fs)]
    if len(matching) > 1 and vllm.version:
        by_version = [(s, fs) for s, fs in matching if vllm.version in s.vllm_versions]
        matching = by_version or matching
    if len(matching) > 1:
        raise PatchSetError(
            f"the files under {vllm.root} match {len(matching)} patch sets "
            f"({', '.join(s.name for s, _ in matching)}); the sets overlap and m3fuse cannot choose. "
            f"Remove the extra set or pass --patches with only the one you mean.")
    if matching:
        pset, files = matching[0]
        state = _summarise(files)
    else:
        for_version = [(s, fs) for s, fs in per_set if vllm.version and vllm.version in s.vllm_versions]
        # With no set for this version, show the set it comes closest to: that is what a user
        # comparing "which files differ" wants to see first.
        pool = for_version or per_set
        if not pool:
            return TreeState(vllm, None, [], UNSUPPORTED, sets)
        pset, files = _closest(pool, vllm.version)
        state = DRIFTED if for_version else UNSUPPORTED
    tree = TreeState(vllm, pset, files, state, sets)
    if state == UNSUPPORTED:
        tree.no_model = all(f.state == MISSING for _, fs in per_set for f in fs)
        tree.patch_set, tree.closest = None, None if tree.no_model else pset
    record = (record_hashes_for(vllm.dist_info, {f.target.path for f in files}) if vllm.dist_info else None)
    for f in files:
        if record is not None:
            want = record.get(f.target.path)
            f.record = "unlisted" if want is None else "match" if want == f.sha256 else "differs"
        f.stale_bytecode = [f"{b.path.name}: {b.reason}" for b in stale_bytecode(f.path)]
    dirs = sorted({f.path.parent for f in files})
    tree.leftovers = [p for d in dirs for p in atomic.leftovers(d, {f.path.name for f in files if f.path.parent == d})]
    return tree


def _closest(pool: list[tuple[PatchSet, list[FileState]]], version: str | None
             ) -> tuple[PatchSet, list[FileState]]:
    """The set a tree comes closest to: most files matching by content, then the newest release
    at or below the tree's (a 0.34 tree is nearest the newest set, not the first listed), then
    the oldest set above it."""
    have = release(version)

    def key(sf: tuple[PatchSet, list[FileState]]) -> tuple:
        matches = sum(f.state in (PRISTINE, PATCHED) for f in sf[1])
        releases = [r for r in map(release, sf[0].vllm_versions) if r is not None]
        if have is None or not releases:
            return (matches, 0, ())
        below = [r for r in releases if r <= have]
        if below:
            return (matches, 1, max(below))
        return (matches, 0, tuple(-n for n in min(releases)))

    return max(pool, key=key)


def first_model_release(sets: list[PatchSet]) -> str | None:
    """The oldest vLLM release any set is for: the first that has the MiniMax M3 model m3fuse
    patches."""
    releases = supported_releases(sets)
    return releases[0] if releases else None


def _file_rows(tree: TreeState) -> list[tuple[str, str]]:
    """Per target file: its state, or the expected pins against what it is (pip's layout)."""
    rows: list[tuple[str, str]] = []
    for f in tree.files:
        rows.append(("", f.target.path))
        if f.state in (PRISTINE, PATCHED):
            rows.append(("state", f"{f.state} (matches)"))
        else:
            rows += [("expected", f"{f.target.pristine_sha256} (pristine)"),
                     ("or", f"{f.target.patched_sha256} (patched)"),
                     ("got", f.sha256 or f.state)]
    return rows


def refuse_unless_known(tree: TreeState, *, read_only: bool = False) -> None:
    """Raise the drift / unsupported error for a tree no set recognises. `read_only` (verify,
    status) leaves out "nothing was changed": those commands never change anything."""
    unchanged = "" if read_only else "; nothing was changed"
    odd = [f for f in tree.files if f.state == NOT_A_FILE]
    pset = tree.patch_set or tree.closest
    if tree.state in (DRIFTED, UNSUPPORTED) and odd and pset:
        raise EnvironmentProblem(
            headline=(f"{odd[0].path}: not a regular file (a directory or a device sits where the "
                      f"{pset.name} set expects a source file of vLLM){unchanged}"),
            hint=(f"reinstall vLLM: pip install --force-reinstall --no-deps "
                  f"vllm=={tree.vllm.version or 'X'}, then run m3fuse again"))
    version = tree.vllm.version or "unknown (no vllm dist-info)"
    if tree.state == DRIFTED:
        raise DriftError(
            headline=(f"vLLM {version} at {tree.vllm.root} has drifted from patch set "
                      f"{tree.patch_set.name}{unchanged}"),
            details=_file_rows(tree),
            hint=(f"pip install --force-reinstall --no-deps vllm=={version}, or for a custom build: "
                  f"`m3fuse port --name N --out DIR`"))
    if tree.state == UNSUPPORTED:
        supported = ", ".join(f"{s.name} ({', '.join(s.vllm_versions)})" for s in tree.supported) or "none"
        rows = [("supported sets", supported)]
        if tree.no_model:
            first = first_model_release(tree.supported)
            raise UnsupportedError(
                headline=(f"vLLM {version} at {tree.vllm.root} has no MiniMax M3 model: none of the files "
                          f"m3fuse patches exists{unchanged}"),
                details=rows + [("first release with M3", first or "unknown (no patch set)")],
                hint=(f"M3 needs vLLM {first} or newer; install one of the supported releases "
                      f"(`m3fuse sets` lists them)" if first else "install a vLLM release that has M3"))
        if tree.closest:
            rows += [("closest set", tree.closest.name)] + _file_rows(tree)
        raise UnsupportedError(
            headline=(f"vLLM {version} at {tree.vllm.root} is not supported: no patch set matches its "
                      f"files{unchanged}"),
            details=rows,
            hint=("install a release `m3fuse sets` lists, or make a set: `m3fuse port --from "
                  f"{tree.closest.name if tree.closest else 'SET'} --name NAME --out DIR`"))


def judge(tree: TreeState, expect: str) -> tuple[list[str], int]:
    """What `verify` reports for `tree` when it must be `expect`: the failures and the exit code
    (0 when there are none)."""
    failures: list[str] = []
    code = EXIT_OK
    if tree.state in (DRIFTED, UNSUPPORTED):
        try:
            refuse_unless_known(tree, read_only=True)
        except M3fuseError as exc:
            failures.append(exc.message)
            code = exc.exit_code
    elif tree.state != expect:
        hint = ("an interrupted run left it half done; run `m3fuse install` or `m3fuse revert` to finish"
                if tree.state == PARTIAL else
                f"run `m3fuse {'install' if expect == PATCHED else 'revert'}`")
        failures.append(f"vLLM at {tree.vllm.root} is {tree.state}, expected {expect}: {hint}.")
        code = EXIT_DRIFT
    if tree.problems:
        failures += tree.problems
        code = code or EXIT_DRIFT
    return failures, code


@dataclass
class Change:
    file: FileState
    new_data: bytes


def plan(tree: TreeState, goal: str) -> list[Change]:
    """Compute every file's new bytes in memory and prove them against the pins before any
    write: a broken patch set is caught here, with the tree untouched."""
    refuse_unless_known(tree)
    assert tree.patch_set is not None
    changes = []
    for f in tree.files:
        if f.state == goal:
            continue
        t = f.target
        try:
            current = safeio.read_under(Path(os.path.realpath(tree.vllm.root)), t.path, safeio.MAX_SOURCE)
        except safeio.Unsafe as exc:
            raise safeio.refusal(exc, hint=_REINSTALL_HINT) from None
        except OSError as exc:
            raise EnvironmentProblem(f"{f.path}: cannot read it ({exc.strerror}).") from exc
        if sha256_bytes(current) != f.sha256:
            raise DriftError(f"{f.path}: changed while m3fuse was reading the tree (another process is "
                             f"writing to it). Nothing was changed; run again when it is quiet.")
        new = apply_diff(current, t.diff, reverse=(goal == PRISTINE), name=str(t.patch_file))
        want = t.patched_sha256 if goal == PATCHED else t.pristine_sha256
        got = sha256_bytes(new)
        if got != want:
            raise PatchSetError(
                f"{t.patch_file}: applying it to {t.path} gives sha256 {got}, but the manifest pins "
                f"{want} for the {goal} file. The patch set is inconsistent; nothing was changed. "
                f"Restore the patch set from the m3fuse release.")
        if t.path.endswith(".py"):
            try:
                pysource.compile_exec(new, str(f.path))  # bounded: never a RecursionError traceback
            except pysource.Unparsable as exc:
                raise PatchSetError(f"{t.patch_file}: the {goal} {t.path} does not compile ({exc.reason}); "
                                    f"nothing was changed.") from None
        changes.append(Change(f, new))
    _preflight(changes)
    return changes


_FS_IOC_GETFLAGS = 0x80086601  # _IOR('f', 1, long) on 64-bit Linux
_FS_IMMUTABLE_FL, _FS_APPEND_FL = 0x10, 0x20


def _locked_flags(path: Path) -> str | None:
    """'immutable' / 'append-only' when the file system flags forbid replacing `path` (even for
    root), else None. Unknown (non-Linux, unsupported file system): None."""
    import fcntl
    import struct

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        buf = fcntl.ioctl(fd, _FS_IOC_GETFLAGS, struct.pack("l", 0))
        flags = struct.unpack("l", buf)[0]
    except (OSError, OverflowError):
        return None
    finally:
        os.close(fd)
    if flags & _FS_IMMUTABLE_FL:
        return "immutable"
    if flags & _FS_APPEND_FL:
        return "append-only"
    return None


def _preflight(changes: list[Change]) -> None:
    """Refuse, before anything is written, a change that could not be completed: a directory
    this user cannot write (permissions, read-only mount) or a file the file system locks."""
    for c in changes:
        d = c.file.path.parent
        pycache = d / "__pycache__"
        if pycache.is_symlink() or (os.path.lexists(pycache) and not pycache.is_dir()):
            # Its bytecode would be removed through it: a link out of the tree would make
            # m3fuse delete files elsewhere.
            raise safeio.refusal(safeio.Escapes(pycache, "is a symbolic link or not a directory where "
                                                         "Python keeps this folder's bytecode"),
                                 hint="remove it (rm " + str(pycache) + "); Python recreates it")
        for where in (d, pycache):
            if where.exists() and not os.access(where, os.W_OK | os.X_OK):
                raise EnvironmentProblem(
                    f"{where}: not writable by this user (uid {os.getuid()}){_ro_hint(where)}, so "
                    f"{c.file.path.name} cannot be replaced. Nothing was changed. Run m3fuse as the owner "
                    f"of the vLLM install (in a container build, as root) or make the tree writable.")
        for where in (c.file.path, d, *bytecode_files(c.file.path)):
            flag = _locked_flags(where)
            if flag:
                raise EnvironmentProblem(
                    f"{where}: the file system marks it {flag} (chattr), so {c.file.path.name} cannot be "
                    f"replaced, not even by root. Nothing was changed. Clear the flag (chattr -i / -a) "
                    f"or leave this tree alone.")


def _ro_hint(where: Path) -> str:
    try:
        return "; the file system is mounted read-only" if os.statvfs(where).f_flag & os.ST_RDONLY else ""
    except OSError:
        return ""


@contextmanager
def _dir_of(root: Path, path: Path) -> Iterator[int]:
    """A descriptor of `path`'s directory, opened from the resolved vLLM `root` down without
    following a symlink; anything unsafe on the way is the UnsafePath refusal."""
    try:
        with safeio.walk_down(root, path.parent.relative_to(root).parts) as fd:
            yield fd
    except safeio.Unsafe as exc:
        raise safeio.refusal(exc, hint=_REINSTALL_HINT) from None


def clean_leftovers(tree: TreeState) -> list[Path]:
    """Remove the temp files of an interrupted run, each relative to its directory opened
    without following a symlink (a swapped directory cannot redirect the unlink)."""
    removed = []
    root = Path(os.path.realpath(tree.vllm.root))
    for p in tree.leftovers:
        try:
            with _dir_of(root, p) as fd:
                if safeio.unlink_at(fd, p.name):
                    removed.append(p)
        except OSError as exc:
            raise EnvironmentProblem(f"{p}: cannot remove this temp file of an interrupted run "
                                     f"({exc.strerror}).") from exc
    return removed


def _tree_root(f: FileState) -> Path:
    """The (resolved) vLLM root a file state's path was joined to."""
    return f.path.parents[len(PurePosixPath(f.target.path).parts) - 1]


def execute(changes: list[Change]) -> None:
    """Write every change: all new files are staged first, then renamed into place."""
    if not changes:
        return
    try:
        atomic.replace_files([(c.file.path, c.new_data) for c in changes], root=_tree_root(changes[0].file))
    except atomic.WriteFailed as exc:
        why = getattr(exc.cause, "strerror", None) or str(exc.cause)
        cls = UnsafePath if isinstance(exc.cause, safeio.Unsafe) else EnvironmentProblem
        if not exc.replaced:
            raise cls(
                f"{exc.path}: writing it failed ({why}). Nothing was changed: every new file is "
                f"written beside its target before any is put in place, and those temp files were "
                f"removed. Fix the cause and run the same command again.") from exc
        done = ", ".join(c.file.target.path for c in changes if c.file.path in exc.replaced)
        raise cls(
            f"{exc.path}: replacing it failed ({why}) after {done} had been replaced. Every file is "
            f"whole (pristine or patched) and `m3fuse verify` reports the tree as partial. Fix the "
            f"cause and run the same command again to finish.") from exc


def converge(vllm: VllmTarget, sets: list[PatchSet], goal: str, *, dry_run: bool = False,
             lock_timeout: float = mutex.DEFAULT_TIMEOUT,
             echo: Callable[[str], None] = lambda _: None) -> tuple[TreeState, dict[str, Any]]:
    """Bring the tree to `goal` (patched or pristine) as one locked transaction and prove it.

    Returns the state after, and what was done. Finishes a partial tree, removes temp files
    of an interrupted run and stale bytecode, and is a no-op on a tree already at `goal`."""
    # Decide under the lock: a state read before waiting for another run would be stale.
    with mutex.hold(vllm.root / "vllm", timeout=lock_timeout):
        tree = inspect(vllm, sets)
        changes = plan(tree, goal)
        actions: dict[str, Any] = {"changed": [c.file.target.path for c in changes], "dry_run": dry_run}
        if dry_run:
            for c in changes:
                echo(f"would make {c.file.target.path} {goal} (now {c.file.state})")
            return tree, actions
        with interrupt.deferred():  # SIGINT/SIGTERM wait until every file is in place
            return _write(vllm, sets, goal, tree, changes, actions, echo)


def _write(vllm: VllmTarget, sets: list[PatchSet], goal: str, tree: TreeState, changes: list[Change],
           actions: dict[str, Any], echo: Callable[[str], None]) -> tuple[TreeState, dict[str, Any]]:
    """converge()'s write phase, under its lock with signals deferred."""
    actions["removed_temp_files"] = [str(p) for p in clean_leftovers(tree)]
    for p in actions["removed_temp_files"]:
        echo(f"removed {p}: temp file of an interrupted m3fuse run")
    old_bytecode = [p for c in changes for p in bytecode_files(c.file.path)]
    execute(changes)
    for c in changes:
        echo(f"{goal}: {c.file.target.path}")
    dropped = [p for p in old_bytecode if not p.exists()]
    for p in dropped:
        echo(f"removed {p}: bytecode of the replaced source")
    after = inspect(vllm, sets)
    # Bytecode an earlier tool left behind is repaired even when no file needed writing.
    stale = [f for f in after.files if f.stale_bytecode]
    actions["removed_stale_bytecode"] = []
    root = Path(os.path.realpath(vllm.root))
    for f in stale:
        for line in f.stale_bytecode:
            echo(f"removed {f.path.parent / '__pycache__'}/{line}")
        with _dir_of(root, f.path) as fd:  # a __pycache__ swapped for a symlink is refused, never followed
            actions["removed_stale_bytecode"] += [str(p) for p in remove_bytecode(f.path, fd)]
    if stale:
        after = inspect(vllm, sets)
    if after.state != goal or after.problems:
        raise EnvironmentProblem(
            f"after writing, {vllm.root} is {after.state}, not {goal} "
            f"({'; '.join(after.problems) or 'no other detail'}); another process may be writing "
            f"to the tree. Run the command again.")
    if not (changes or stale or actions["removed_temp_files"]):
        echo(f"nothing to do: already {goal}")
    return after, actions
