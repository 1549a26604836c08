"""`m3fuse port`'s file handling under the threat model (docs/reliability.md): its work folder
and cache are its own, it reads only regular files inside them, its cleanup removes only
folders it marked, and a written set is never more readable than what it was made from."""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from .. import ownedpaths, safeio
from ..errors import UsageProblem

STAGE_MARK = ".port-"
# Written first into every folder port stages; cleanup removes a hidden `.port-` folder only
# when this file, as m3fuse writes it, is inside (never by its name alone).
MARKER = ".m3fuse-port-stage"
MARKER_TEXT = b"m3fuse port: staged folder, removed by the next port run if left behind\n"
MAX_WORK_FILE = safeio.MAX_SOURCE


def refuse_inside_tree(what: str, folder: Path, tree_root: Path) -> None:
    """port writes only beside the tree, never into it (the tree is pip's, and install's)."""
    where = Path(os.path.realpath(folder))
    root = Path(os.path.realpath(tree_root))
    if where == root or root in where.parents:
        raise UsageProblem(headline=f"{what} {folder} is inside the vLLM tree {root}; nothing was written",
                           hint=f"point {what} at a folder outside the vLLM install (e.g. under your home)")


def own_folder(folder: Path, what: str, *, create: bool = True, parent_only: bool = False) -> Path | None:
    """`folder` checked (and created 0700) as one only this user controls, every folder above
    it included (ownedpaths.py); without `create`, None when it does not exist. `parent_only`:
    a folder port stages its own folders in (root's or ours, shared only if sticky, as /tmp)."""
    try:
        return ownedpaths.own_dir(folder, create=create, parent_only=parent_only)
    except safeio.Unsafe as exc:
        raise safeio.refusal(exc, nothing="nothing was read or written",
                             hint=f"use a {what} only you can write (a new folder under your home), "
                                  f"as pip demands of its cache") from None


def _folder_problem(st: os.stat_result, what: str) -> str | None:
    """Why a folder m3fuse is about to use is not one of this user's own, or None."""
    if not stat.S_ISDIR(st.st_mode):
        return f"is {safeio.kind_of(st.st_mode)}, not {what}"
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    if safeio.others_can_write(st):
        return f"is writable by other users (mode {stat.filemode(st.st_mode)})"
    return None


def check_workdir(workdir: Path) -> None:
    """A work folder to resume: a real directory (no symlink) of this user, no one else may write."""
    try:
        st = os.lstat(workdir)
    except FileNotFoundError:
        raise UsageProblem(f"{workdir}: no such work folder; --resume takes a folder written by "
                           f"`m3fuse port`.") from None
    reason = _folder_problem(st, "a work folder m3fuse made")
    if reason:
        raise safeio.refusal(safeio.Unsafe(workdir, reason), nothing="nothing was read or written",
                             hint="resume only a work folder `m3fuse port` wrote for you; start again with "
                                  "`m3fuse port` into a new --workdir")


def read_work_file(workdir: Path, rel: str) -> tuple[bytes, int]:
    """(bytes, mode) of workdir/rel: a regular file inside the work folder, reached without
    following any symlink (a link to a secret is refused, never read)."""
    parts = safeio.split_relative(rel)
    try:
        with safeio.walk_down(workdir, parts[:-1]) as fd:
            fd2, st = safeio.open_regular(parts[-1], dir_fd=fd, shown=workdir / rel)
            try:
                if st.st_size > MAX_WORK_FILE:
                    raise safeio.TooLarge(workdir / rel, MAX_WORK_FILE)
                return safeio.read_fd(fd2, MAX_WORK_FILE, workdir / rel), st.st_mode
            finally:
                os.close(fd2)
    except safeio.Unsafe as exc:
        raise safeio.refusal(exc, nothing="nothing was written",
                             hint="the work folder holds only the regular files port wrote; restore them "
                                  "or start again with `m3fuse port`") from None


def load_work_json(workdir: Path, name: str) -> dict:
    """The work folder's JSON file, every string in it valid text (a lone surrogate refused)."""
    raw, _ = read_work_file(workdir, name)
    meta = json.loads(raw.decode("utf-8"))  # ValueError (UnicodeDecodeError, JSONDecodeError): caller's

    def check(value: object) -> None:
        if isinstance(value, str):
            value.encode("utf-8")  # UnicodeEncodeError (a ValueError) on a lone surrogate
        elif isinstance(value, dict):
            for k, v in value.items():
                check(k)
                check(v)
        elif isinstance(value, list):
            for v in value:
                check(v)

    check(meta)
    if not isinstance(meta, dict):
        raise ValueError("not a JSON object")
    return meta


def read_cached(cache: Path, name: str, limit: int = safeio.MAX_SOURCE) -> bytes | None:
    """cache/name when it is a regular file of the (checked) cache, else None."""
    try:
        return safeio.read_under(cache, name, limit)
    except (OSError, safeio.Unsafe):
        return None


def write_folder(final: Path, files: dict[str, bytes], prove: Callable[[Path], None], *, mode: int = 0o644,
                 private: bool = False, checkpoint: Callable[[str], None] = lambda _: None,
                 keep_marker: bool = False) -> Path:
    """Stage `files` (relative paths -> bytes) in a hidden, marked sibling of `final`, prove
    the staged copy, then rename it into place: `final` is either absent or complete. Files
    get `mode` (at most 0644), folders the matching read/search bits (0700 when `private`).
    `keep_marker` leaves the marker in `final`, for a caller that renames it on as a stage."""
    mode &= 0o644
    dir_mode = 0o700 if private else 0o700 | (0o050 if mode & 0o040 else 0) | (0o005 if mode & 0o004 else 0)
    parent = final.parent
    stage_dir = parent / f".{final.name}{STAGE_MARK}{os.getpid()}-{os.urandom(4).hex()}"
    os.mkdir(stage_dir, 0o700)
    try:
        mark(stage_dir)
        for rel, data in files.items():
            dest = stage_dir / rel
            os.makedirs(dest.parent, 0o700, exist_ok=True)  # inside our own 0700 stage folder
            checkpoint(f"port-stage {rel}")
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fchmod(f.fileno(), mode)
                os.fsync(f.fileno())
        for d in [p for p in stage_dir.rglob("*") if p.is_dir() and not p.is_symlink()] + [stage_dir]:
            os.chmod(d, dir_mode)
        prove(stage_dir)
        checkpoint(f"port-rename {final.name}")
        if final.exists() or final.is_symlink():
            raise UsageProblem(f"{final}: appeared while m3fuse was writing; nothing was written. Run again.")
        os.rename(stage_dir, final)
    except BaseException:
        remove_stage(stage_dir)
        raise
    if not keep_marker:
        os.unlink(final / MARKER)
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return final


def mark(folder: Path) -> None:
    """Mark a folder of ours as a stage, so a kill right after leaves it removable. The folder
    is opened without following a link (a symlinked set folder is refused, never written into)."""
    try:
        with safeio.walk_down(folder.parent, [folder.name]) as dfd:
            fd = os.open(MARKER, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600, dir_fd=dfd)
    except safeio.Unsafe as exc:
        raise safeio.refusal(exc, nothing="nothing was written",
                             hint="a set folder is a real folder of yours; replace the link with the folder") from None
    with os.fdopen(fd, "wb") as f:
        f.write(MARKER_TEXT)


def check_set_folder(folder: Path) -> None:
    """A set folder about to be replaced: a real folder of this user's that no one else may
    write, in a patches folder checked all the way down (UnsafePath before anything is written)."""
    own_folder(folder.parent, "patches folder", create=False, parent_only=True)
    try:
        st = os.lstat(folder)
    except OSError as exc:
        raise safeio.refusal(safeio.Unsafe(folder, f"cannot be examined ({exc.strerror})"),
                             nothing="nothing was written", hint="restore the set folder from git") from None
    reason = _folder_problem(st, "a set folder m3fuse writes into")
    if reason:
        raise safeio.refusal(safeio.Unsafe(folder, reason), nothing="nothing was written",
                             hint="a refresh replaces only real set folders of yours; put the set itself there "
                                  "(not a link to it) and run again")


def unmark(folder: Path) -> None:
    """Drop a marker a kill left inside a live folder (only the exact name m3fuse writes)."""
    try:
        os.unlink(folder / MARKER)
    except FileNotFoundError:
        pass


def _is_our_stage(directory: Path, name: str) -> bool:
    if not (name.startswith(".") and STAGE_MARK in name):
        return False
    p = directory / name
    try:
        st = os.lstat(p)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            return False
        return safeio.read_under(p, MARKER, len(MARKER_TEXT)) == MARKER_TEXT
    except (OSError, safeio.Unsafe):
        return False


def remove_stage(stage: Path) -> None:
    """Remove a stage folder, its marker last: a removal cut short (a file this user may not
    delete, a kill) leaves a folder that still carries the marker, which the next run's
    `clean_stages` finds and removes, never an unmarked leftover no run would touch again."""
    try:
        names = os.listdir(stage)
    except OSError:
        return
    for name in names:
        if name == MARKER:
            continue
        p = stage / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)  # fd-based: never follows a link
        else:
            try:
                os.unlink(p)
            except OSError:
                pass
    try:
        if os.listdir(stage) in ([MARKER], []):
            if os.path.lexists(stage / MARKER):
                os.unlink(stage / MARKER)
            os.rmdir(stage)
    except OSError:
        pass


def clean_stages(directory: Path) -> list[Path]:
    """Staged folders a killed port left in `directory`: only those holding m3fuse's marker
    (a folder merely named like one is never touched). Call under the lock."""
    removed = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return removed
    for name in names:
        if _is_our_stage(directory, name):
            remove_stage(directory / name)
            removed.append(directory / name)
    return removed
