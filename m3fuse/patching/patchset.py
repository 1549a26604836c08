"""Patch sets: a folder of unified diffs plus `manifest.toml`, loaded and checked as plain data.

Every manifest is validated before m3fuse reads or writes a single file of the vLLM tree:
paths must be relative, inside the tree, unique; hashes well formed. A diff is read and parsed
(and must name the file the manifest says it patches) when it is first needed: `verify` and
`status` need only the matching set's diffs, so adding sets does not slow them down, while
`install` and `revert` parse every set (`load_all(parse=True)`) and refuse a malformed one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath

from .. import safeio
from ..errors import EnvironmentProblem, PatchSetError
from ..fingerprint import is_sha256_hex
from .hunks import FileDiff, parse_diff
from ..tomlread import TOMLDecodeError, loads

MANIFEST = "manifest.toml"
FORMAT = 1


@dataclass(eq=False)
class Target:
    path: str  # relative to the vLLM root (the directory that contains `vllm/`), POSIX form
    patch_file: Path
    pristine_sha256: str
    patched_sha256: str
    ported_from: str | None = None  # the shipped set this file's changes were merged from

    @cached_property
    def diff(self) -> FileDiff:
        """The parsed diff, read on first use; PatchSetError if it is unreadable or malformed."""
        return _read_diff(self.patch_file, self.path)


@dataclass(frozen=True)
class PatchSet:
    name: str
    folder: Path
    vllm_versions: tuple[str, ...]
    summary: str
    targets: tuple[Target, ...]
    ported_from: str | None = None

    def parse(self) -> "PatchSet":
        """Read and parse every diff now (raises PatchSetError on the first bad one)."""
        for t in self.targets:
            t.diff  # noqa: B018 - cached_property: the access is the parse
        return self


def _read_set_file(path: Path, a_kind: str, the_kind: str, unreadable_hint: str = "") -> bytes:
    """A set's file (diff or manifest), bounded and regular only; PatchSetError otherwise."""
    try:
        return safeio.read_regular(path, safeio.MAX_SET_FILE)
    except safeio.Unsafe as exc:
        raise PatchSetError(f"{path}: {exc.reason}; {a_kind} is a small text file. Restore it from the "
                            f"m3fuse release.") from None
    except OSError as exc:
        raise PatchSetError(f"{path}: cannot read {the_kind} ({exc.strerror}).{unreadable_hint}") from exc


def _read_diff(patch_path: Path, rel: str) -> FileDiff:
    raw_patch = _read_set_file(patch_path, "a patch file", "this patch file")
    try:
        text = raw_patch.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PatchSetError(f"{patch_path}: not UTF-8 text; it is binary or corrupted. Restore it "
                            f"from the m3fuse release.") from exc
    diff = parse_diff(text, name=str(patch_path))
    if diff.target_path != rel or diff.source_path != rel:
        raise PatchSetError(f"{patch_path}: the diff patches {diff.target_path!r} but the manifest says "
                            f"{rel!r}. Fix the manifest entry or the diff header.")
    return diff


def check_relative_path(rel: object, *, where: str) -> str:
    """Refuse any path that could leave the vLLM root before it is joined to anything."""
    if not isinstance(rel, str) or not rel:
        raise PatchSetError(f"{where}: a target path must be a non-empty string, got {rel!r}.")
    if "\\" in rel or "\x00" in rel:
        raise PatchSetError(f"{where}: target path {rel!r} contains a backslash or NUL; use POSIX "
                            f"paths relative to the vLLM root, like 'vllm/models/x.py'.")
    p = PurePosixPath(rel)
    if p.is_absolute() or rel.startswith("/"):
        raise PatchSetError(f"{where}: target path {rel!r} is absolute; it must be relative to the "
                            f"vLLM root (e.g. 'vllm/models/minimax_m3/amd/model.py'). Refusing the set.")
    if any(part in ("..", ".", "") for part in rel.split("/")):
        raise PatchSetError(f"{where}: target path {rel!r} contains '..' or '.' components and could "
                            f"point outside the vLLM tree. Refusing the set.")
    if not rel.startswith("vllm/") or not rel.endswith(".py"):
        # Anything else in site-packages (a .pth runs at every interpreter start, another
        # package's code) is not vLLM's source: no set may patch it.
        raise PatchSetError(f"{where}: target path {rel!r} is not a .py file under vllm/; a patch set "
                            f"only patches vLLM's Python sources. Refusing the set.")
    return rel


def _str(table: dict, key: str, where: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value:
        raise PatchSetError(f"{where}: '{key}' must be a non-empty string, got {value!r}.")
    return value


def _optional_str(table: dict, key: str, where: str) -> str | None:
    if key not in table:
        return None
    return _str(table, key, where)


def load_patchset(folder: Path) -> PatchSet:
    manifest_path = folder / MANIFEST
    where = str(manifest_path)
    raw = _read_set_file(manifest_path, "a manifest", "the manifest",
                         " Every folder under patches/ needs a manifest.toml.")
    try:
        data = loads(raw)
    except TOMLDecodeError as exc:
        raise PatchSetError(f"{where}: not valid TOML ({exc}). Restore it from the m3fuse release.") from exc
    if data.get("format") != FORMAT:
        raise PatchSetError(f"{where}: format is {data.get('format')!r}, this m3fuse reads format {FORMAT}. "
                            f"Use the m3fuse release that ships this patch set.")
    name = _str(data, "name", where)
    versions = data.get("vllm-versions")
    if not isinstance(versions, list) or not versions or not all(isinstance(v, str) and v for v in versions):
        raise PatchSetError(f"{where}: 'vllm-versions' must be a non-empty list of version strings, got {versions!r}.")
    files = data.get("files")
    if not isinstance(files, list) or not files:
        raise PatchSetError(f"{where}: no [[files]] entries; a patch set must patch at least one file.")
    targets: list[Target] = []
    seen: set[str] = set()
    for i, entry in enumerate(files, 1):
        ewhere = f"{where} [[files]] #{i}"
        if not isinstance(entry, dict):
            raise PatchSetError(f"{ewhere}: must be a table.")
        rel = check_relative_path(entry.get("path"), where=ewhere)
        if rel in seen:
            raise PatchSetError(f"{ewhere}: target {rel!r} is listed twice; each file may be patched by one "
                                f"diff only (two would depend on their order). Merge the diffs.")
        seen.add(rel)
        patch_name = _str(entry, "patch", ewhere)
        if "/" in patch_name or "\\" in patch_name or patch_name in (".", ".."):
            raise PatchSetError(f"{ewhere}: patch {patch_name!r} must be a file name inside {folder}.")
        hashes = {}
        for key in ("pristine-sha256", "patched-sha256"):
            value = entry.get(key)
            if not is_sha256_hex(value):
                raise PatchSetError(f"{ewhere}: '{key}' must be 64 lowercase hex digits, got {value!r}. "
                                    f"Regenerate the manifest with tools/mkpatch.py.")
            hashes[key] = value
        if hashes["pristine-sha256"] == hashes["patched-sha256"]:
            raise PatchSetError(f"{ewhere}: pristine and patched sha256 are equal; the state of {rel} "
                                f"could never be told.")
        patch_path = folder / patch_name
        if not patch_path.is_file():
            raise PatchSetError(f"{ewhere}: patch file {patch_path} does not exist (or is not a file). "
                                f"Restore the patch set from the m3fuse release.")
        targets.append(Target(rel, patch_path, hashes["pristine-sha256"], hashes["patched-sha256"],
                              _optional_str(entry, "ported-from", ewhere)))
    return PatchSet(name, folder, tuple(versions), str(data.get("summary", "")), tuple(targets),
                    _optional_str(data, "ported-from", where))


def load_all(patches_root: Path, *, parse: bool = False) -> list[PatchSet]:
    """Every patch set under `patches_root` (one per sub-folder holding a manifest; folders
    whose name starts with '.' are work in progress of `m3fuse port` and never a set).
    `parse` reads and parses every diff now, as install and revert want."""
    if not patches_root.is_dir():
        raise PatchSetError(f"{patches_root}: the patch-set folder does not exist. Reinstall m3fuse or "
                            f"pass --patches DIR.")
    sets = [load_patchset(d) for d in sorted(patches_root.iterdir())
            if not d.name.startswith(".") and (d / MANIFEST).is_file()]
    if parse:
        for s in sets:
            s.parse()
    names = [s.name for s in sets]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise PatchSetError(f"{patches_root}: patch-set names {dupes} are used by more than one folder.")
    return sets


def resolve_inside(root: Path, rel: str) -> Path:
    """`root/rel`, refusing it if symlinks anywhere on the way lead outside `root`."""
    try:
        base = Path(os.path.realpath(root))
        candidate = Path(os.path.realpath(base / rel))
    except OSError as exc:  # a link on the way removed or renamed while it was being followed
        raise EnvironmentProblem(
            f"{Path(root) / rel}: its path changed while m3fuse was resolving it ({exc.strerror}); another "
            f"process is renaming folders in the vLLM tree. Stop it, then run the command again: it finishes or "
            f"repairs the tree from whatever state it is in.") from None
    if candidate != base and base not in candidate.parents:
        raise PatchSetError(
            f"{base / rel}: resolves through a symlink to {candidate}, outside the vLLM root {base}. "
            f"m3fuse only edits files inside the tree it was pointed at; replace the link with the "
            f"real file (reinstall vLLM) and retry.")
    return base / rel
