"""`m3fuse port`: make a patch set for a vLLM tree that no set matches, by a three-way merge.

For each target file: base = the shipped set's own pristine file, ours = the new tree's
pristine file, theirs = the shipped set's patched file. The merge is merge3's (a pure-Python
port of the diff3 algorithm; no `git` binary is needed in a container build). The base files
are not in m3fuse (no upstream source is shipped): they come from `--base-root DIR`, from
m3fuse's content-addressed cache, or from the base release's wheel via the user's own pip, and
are accepted only when they hash to the set's pristine pins.

The flow is the engine's: inspect (refusals, nothing written) -> plan (merge in memory) ->
write (a staged folder renamed into place, so a killed run leaves no half-written set) ->
prove (the written set loads, and reproduces its pins from the tree's files).

A clean merge says only that the text merged. A ported set is reviewed only once the fusion
matrix passes on it; every message of this module says so.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import interrupt, ownedpaths, pysource, resources, safeio
from ..errors import EnvironmentProblem, IntegrityError, MergeConflict, UnsupportedError, UsageProblem
from ..fingerprint import record_hashes_for, sha256_bytes
from ..target import VllmTarget
from . import atomic, engine, mutex, portfs, readers, setwriter
from .hunks import apply_diff, split_lines
from .patchset import PatchSet, Target, check_relative_path, load_patchset, resolve_inside

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$")
# The patched helper names its set in exactly one line of this form; a ported set names itself.
SET_NAME_LINE = re.compile(r'^M3FUSE_SET = "[^"\n]*"$', re.MULTILINE)
# A port of a ported set says where it was ported once, not once per generation.
PORTED_NOTE = re.compile(r" \(ported with m3fuse port onto vLLM [^)]*\)$")
MARKERS = ("<<<<<<< ", "||||||| ", "=======", ">>>>>>> ")
WORK_FILE = "port.json"
NOT_REVIEWED = ("A clean merge is not a reviewed set: it proves only that the text merged. The set "
                "counts once m3fuse's fusion matrix (one row per set, in m3fuse's test suite) passes on "
                "it and it is reviewed against the release's own sources.")


@dataclass
class MergedFile:
    path: str
    ported_from: str
    pristine: bytes  # the new tree's file
    merged: bytes
    conflicts: list[int] = field(default_factory=list)  # 1-based lines of the merged file
    compile_error: str | None = None
    mode: int = 0o644  # permission bits of the file it was read from (the written set keeps no more)
    base: bytes | None = None  # the base release's pristine file (the work folder's base/, for review)

    @property
    def clean(self) -> bool:
        return not self.conflicts and self.compile_error is None


@dataclass
class PortResult:
    name: str
    versions: list[str]
    files: list[MergedFile]
    set_dir: Path | None = None  # written set (clean merge or resume)
    workdir: Path | None = None  # written work folder (conflicts or --edit)

    def reader_warnings(self) -> list[str]:
        """The written set's model against its readers.toml and upstream's loop (readers.review)."""
        if self.set_dir is None:
            return []
        return [w for f in self.files if f.path == readers.MODEL
                for w in readers.review(f.pristine, f.merged, self.set_dir)]

    def to_json(self) -> dict:
        return {"name": self.name, "versions": self.versions,
                "set_dir": str(self.set_dir) if self.set_dir else None,
                "workdir": str(self.workdir) if self.workdir else None,
                "reviewed": False, "note": NOT_REVIEWED, "warnings": self.reader_warnings(),
                "files": [{"path": f.path, "ported_from": f.ported_from, "conflicts": f.conflicts,
                           "compile_error": f.compile_error,
                           "pristine_sha256": sha256_bytes(f.pristine),
                           "patched_sha256": sha256_bytes(f.merged) if f.clean else None}
                          for f in self.files]}


# ----------------------------------------------------------------------------- inspect
def check_name(name: str, out: Path, sets: list[PatchSet]) -> None:
    if not NAME_RE.match(name):
        raise UsageProblem(f"--name {name!r}: a set name is a folder name of letters, digits and . _ + - "
                           f"(at most 100), starting with a letter or digit, e.g. 'vllm-0.28.0'.")
    if (out / name).exists() or (out / name).is_symlink():
        raise UsageProblem(f"{out / name}: a set named {name} already exists there. Pick another --name, "
                           f"or remove that folder first if it is a failed attempt.")
    if any(s.name == name for s in sets):
        raise UsageProblem(f"--name {name}: a loaded patch set already has that name; set names are unique.")


def choose_bases(sets: list[PatchSet], base: str, overrides: list[str]) -> tuple[PatchSet, dict[str, PatchSet]]:
    """The set whose files are ported, and for each of its targets the set its changes come from.
    `overrides` are 'FILE=SET' (FILE a target path or its unique file name)."""
    by_name = {s.name: s for s in sets}

    def known(name: str) -> PatchSet:
        if name not in by_name:
            raise UsageProblem(f"--from {name}: no such patch set. Known sets: {', '.join(sorted(by_name)) or 'none'}.")
        return by_name[name]

    primary = known(base)
    per_file = {t.path: primary for t in primary.targets}
    for item in overrides:
        file, sep, set_name = item.partition("=")
        if not sep or not file or not set_name:
            raise UsageProblem(f"--from {item!r}: a per-file base is FILE=SET, e.g. "
                               f"'fused_allreduce_gemma_rms_norm.py=vllm-0.33.0'.")
        hits = [p for p in per_file if p == file or p.rsplit("/", 1)[-1] == file]
        if len(hits) != 1:
            raise UsageProblem(f"--from {item!r}: {file!r} names {len(hits)} of {primary.name}'s targets "
                               f"({', '.join(per_file)}); name exactly one.")
        other = known(set_name)
        if not any(t.path == hits[0] for t in other.targets):
            raise UsageProblem(f"--from {item!r}: set {other.name} does not patch {hits[0]}.")
        per_file[hits[0]] = other
    return primary, per_file


def read_tree(vllm: VllmTarget, sets: list[PatchSet], paths: list[str]) -> dict[str, bytes]:
    """The tree's files, refused if any set already matches the tree or a file is missing or
    differs from vLLM's own RECORD (it is then not a release file and no merge base fits it)."""
    tree = engine.inspect(vllm, sets)
    if tree.state in (engine.PRISTINE, engine.PATCHED, engine.PARTIAL):
        assert tree.patch_set is not None
        raise UsageProblem(f"vLLM {tree.vllm.version or '(unknown version)'} at {vllm.root} already matches "
                           f"patch set {tree.patch_set.name} ({tree.state}); there is nothing to port. "
                           f"Use `m3fuse install` for it.")
    out: dict[str, bytes] = {}
    for rel in paths:
        path = resolve_inside(vllm.root, rel)
        try:
            out[rel] = safeio.read_under(Path(os.path.realpath(vllm.root)), rel, safeio.MAX_SOURCE)
        except (FileNotFoundError, safeio.NotRegular):
            raise UnsupportedError(f"{path}: missing (or not a file) in this vLLM tree, but the set ports "
                                   f"it. This vLLM does not ship the MiniMax M3 ROCm code m3fuse patches "
                                   f"(0.23.0 and older have none); nothing was written.") from None
        except safeio.Unsafe as exc:
            raise safeio.refusal(exc, nothing="nothing was written",
                                 hint="reinstall vLLM (pip install --force-reinstall --no-deps vllm==VERSION)") from None
    record = record_hashes_for(vllm.dist_info, set(paths)) if vllm.dist_info else None
    for rel, data in out.items():
        want = (record or {}).get(rel)
        if want is not None and want != sha256_bytes(data):
            raise UnsupportedError(
                f"{vllm.root / rel}: differs from the vLLM wheel's own RECORD (expected sha256 {want}, "
                f"got {sha256_bytes(data)}); it was edited after install, so it is not a release file "
                f"to port. Reinstall vLLM (pip install --force-reinstall --no-deps vllm==VERSION) and "
                f"port again.")
    return out


# ----------------------------------------------------------------------------- base files
def default_cache() -> Path:
    return resources.cache_dir() / "pristine"


def base_files(pset: PatchSet, targets: list[Target], *, base_roots: list[Path], cache: Path,
               echo: Callable[[str], None], store: bool = True) -> dict[str, bytes]:
    """The set's own pristine files, each proved by its pin: from the first --base-root that
    holds it, else the cache, else the base release's wheel. Without `store` nothing is
    written (the cache is read when it exists and passes the checks)."""
    want = {t.path: t.pristine_sha256 for t in targets}
    got: dict[str, bytes] = {}
    checked = portfs.own_folder(cache, "cache folder", create=store)
    for rel, pin in want.items():
        for root, name in [(root, rel) for root in base_roots] + ([(checked, pin)] if checked else []):
            data = portfs.read_cached(root, name)  # regular files only, no symlink followed
            if data is not None and sha256_bytes(data) == pin:
                got[rel] = data
                break
    missing = {rel: want[rel] for rel in want if rel not in got}
    if missing:
        got.update(_from_release_wheel(pset, missing, cache, echo, store=store))
    return got


def _check_pin(where: Path | str, data: bytes, pin: str, pset: PatchSet) -> None:
    actual = sha256_bytes(data)
    if actual != pin:
        raise IntegrityError(f"{where}: is not the pristine file set {pset.name} was made from "
                             f"(expected sha256 {pin}, got {actual}). The release wheel is not the one "
                             f"the set was made from; pass --base-root DIR holding vLLM "
                             f"{', '.join(pset.vllm_versions)} exactly as released.")


def _from_release_wheel(pset: PatchSet, want: dict[str, str], cache: Path,
                        echo: Callable[[str], None], *, store: bool = True) -> dict[str, bytes]:
    version = pset.vllm_versions[0]
    from .basesource import pip_config_sources
    echo(f"port: downloading vLLM {version}'s wheel (about 300 MB) for the base files of {pset.name}, "
         f"with {pip_config_sources()}; --base-root or --wheels DIR avoid the download")
    with tempfile.TemporaryDirectory(prefix="m3fuse-port-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--disable-pip-version-check", f"vllm=={version}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("vllm-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise EnvironmentProblem(
                f"pip could not download vllm=={version} (exit {proc.returncode}: "
                f"{(proc.stderr or proc.stdout).strip()[-800:] or 'no output'}), which holds the base files "
                f"of {pset.name} (no --base-root or cache entry held them). Run where pip reaches the "
                f"index, or pass --base-root DIR holding vLLM {version}'s files (e.g. an unpacked "
                f"`pip download --no-deps vllm=={version}`).")
        from ..wheels.check import _open_zip, read_member

        got: dict[str, bytes] = {}
        with _open_zip(wheels[0]) as zf:  # pip's download into our own folder; still read through safeio
            for rel, pin in want.items():
                try:
                    data = read_member(zf, rel, wheels[0], safeio.MAX_SOURCE)  # bounded: not verified yet
                except KeyError:
                    raise IntegrityError(f"{wheels[0].name}: has no {rel}; set {pset.name} cannot have been "
                                         f"made from it.") from None
                _check_pin(f"{wheels[0].name}:{rel}", data, pin, pset)
                got[rel] = data
    if not store:
        return got
    portfs.own_folder(cache, "cache folder")
    for rel, data in got.items():
        # Content-addressed: a file under its own sha256 is either whole or absent; written
        # relative to the checked folder, never through a link.
        ownedpaths.write_into(cache, want[rel], data, mode=0o644)
    return got


# ----------------------------------------------------------------------------- plan
def merge_file(rel: str, base: bytes, ours: bytes, theirs: bytes, *, tree_label: str, set_name: str,
               new_name: str) -> MergedFile:
    import merge3  # only `port` needs it

    def lines(data: bytes) -> list[str]:
        return split_lines(data.decode("utf-8"))

    m = merge3.Merge3(lines(base), lines(ours), lines(theirs))
    merged = list(m.merge_lines(name_a=f"{tree_label} (pristine)", name_b=f"{set_name} (patched)",
                                name_base=f"{set_name} (pristine)", base_marker="|||||||"))
    text = "".join(merged)
    renamed, count = SET_NAME_LINE.subn(f'M3FUSE_SET = "{new_name}"', text)
    if count == 1:
        text = renamed
    conflicts = [i for i, line in enumerate(split_lines(text), 1) if line.startswith("<<<<<<< ")]
    out = MergedFile(rel, set_name, ours, text.encode("utf-8"), conflicts, base=base)
    out.compile_error = _compile_error(rel, out.merged) if not conflicts else None
    return out


def _compile_error(rel: str, data: bytes) -> str | None:
    if not rel.endswith(".py"):
        return None
    try:
        pysource.compile_exec(data, rel)  # bounded: too large or too deep is an answer, not a traceback
    except pysource.Unparsable as exc:
        return exc.short
    return None


# ----------------------------------------------------------------------------- write
def _prove_set(files: list[MergedFile]) -> Callable[[Path], None]:
    def prove(folder: Path) -> None:
        pset = load_patchset(folder).parse()
        for t, f in zip(pset.targets, files):
            if apply_diff(f.pristine, t.diff, name=str(t.patch_file)) != f.merged:
                raise EnvironmentProblem(f"{t.patch_file}: the written set does not reproduce its file; "
                                         f"the disk may be failing. Nothing was put in place.")
    return prove


def write_set(out: Path, name: str, versions: list[str], summary: str, files: list[MergedFile],
              ported_from: str, *, lock_timeout: float, extra: dict[str, bytes] | None = None) -> Path:
    changes = [setwriter.FileChange(f.path, f.pristine, f.merged, f.ported_from) for f in files]
    rendered = {**setwriter.render(name, versions, summary, changes, ported_from=ported_from), **(extra or {})}
    portfs.own_folder(out, "--out folder", parent_only=True)  # every folder from / down checked before the first write
    # No more readable than what it was made from (a work folder's 0600 file stays private).
    mode = 0o644
    for f in files:
        mode &= f.mode
    with mutex.hold(out, timeout=lock_timeout, what=f"the patches folder {out}"), interrupt.deferred():
        portfs.clean_stages(out)
        return portfs.write_folder(out / name, rendered, _prove_set(files), mode=mode,
                                   checkpoint=atomic._checkpoint)


def write_workdir(workdir: Path, result: PortResult, summary: str, ported_from: str,
                  tree: VllmTarget) -> Path:
    if workdir.exists() or workdir.is_symlink():
        raise UsageProblem(f"{workdir}: already exists. Name a new work folder with --workdir DIR, or "
                           f"finish that one with `m3fuse port --resume {workdir}`.")
    meta = {"format": 1, "name": result.name, "versions": result.versions, "summary": summary,
            "ported-from": ported_from, "tree": {"root": str(tree.root), "version": tree.version},
            "files": [{"path": f.path, "ported-from": f.ported_from,
                       "pristine-sha256": sha256_bytes(f.pristine), "conflicts": f.conflicts,
                       "compile-error": f.compile_error} for f in result.files]}
    files = {WORK_FILE: (json.dumps(meta, indent=2) + "\n").encode()}
    for f in result.files:
        files[f"pristine/{f.path}"] = f.pristine
        files[f"merged/{f.path}"] = f.merged
        if f.base is not None:  # the review's release-to-release diff: `diff -ru base pristine`
            files[f"base/{f.path}"] = f.base
    portfs.own_folder(workdir.parent, "work folder", parent_only=True)
    with mutex.hold(workdir.parent, timeout=mutex.DEFAULT_TIMEOUT, what=f"the folder {workdir.parent}"), \
            interrupt.deferred():
        portfs.clean_stages(workdir.parent)
        return portfs.write_folder(workdir, files, lambda _: None, private=True, checkpoint=atomic._checkpoint)


# ----------------------------------------------------------------------------- commands
@dataclass
class PortRequest:
    vllm: VllmTarget
    sets: list[PatchSet]
    base: str
    overrides: list[str]
    name: str
    versions: list[str]
    out: Path
    workdir: Path
    base_roots: list[Path] = field(default_factory=list)
    cache: Path = field(default_factory=default_cache)
    edit: bool = False
    lock_timeout: float = mutex.DEFAULT_TIMEOUT


def port(req: PortRequest, echo: Callable[[str], None] = lambda _: None) -> PortResult:
    # inspect: every refusal before anything is fetched or written
    portfs.refuse_inside_tree("--out", req.out, req.vllm.root)
    portfs.refuse_inside_tree("--workdir", req.workdir, req.vllm.root)
    check_name(req.name, req.out, req.sets)
    primary, per_file = choose_bases(req.sets, req.base, req.overrides)
    versions = req.versions or ([req.vllm.version] if req.vllm.version else [])
    if not versions:
        raise UsageProblem(f"{req.vllm.root}: no vllm dist-info tells this tree's version; pass --version V.")
    ours = read_tree(req.vllm, req.sets, list(per_file))
    # plan: merge every file in memory
    files: list[MergedFile] = []
    label = f"vLLM {req.vllm.version or '?'} at {req.vllm.root}"
    for rel, pset in per_file.items():
        target = next(t for t in pset.targets if t.path == rel)
        theirs_base = base_files(pset, [target], base_roots=req.base_roots, cache=req.cache, echo=echo)[rel]
        theirs = apply_diff(theirs_base, target.diff, name=str(target.patch_file))
        if sha256_bytes(theirs) != target.patched_sha256:
            raise IntegrityError(f"{target.patch_file}: applied to its own pristine file it does not give "
                                 f"the pinned patched file; the set {pset.name} is inconsistent.")
        files.append(merge_file(rel, theirs_base, ours[rel], theirs, tree_label=label,
                                set_name=pset.name, new_name=req.name))
    result = PortResult(req.name, versions, files)
    ported_from = primary.name
    summary = f"{PORTED_NOTE.sub('', primary.summary)} (ported with m3fuse port onto vLLM {', '.join(versions)})"
    # write: the set when every file is clean, else the work folder
    if req.edit or not all(f.clean for f in files):
        result.workdir = write_workdir(req.workdir, result, summary, ported_from, req.vllm)
        if not all(f.clean for f in files):
            raise conflict_error(result)
        return result
    # The base's reader declarations come along; the tests check them against this release.
    result.set_dir = write_set(req.out, req.name, versions, summary, files, ported_from,
                               lock_timeout=req.lock_timeout, extra=readers.base_copy(primary.folder))
    return result


def conflict_error(result: PortResult) -> MergeConflict:
    rows: list[tuple[str, str]] = []
    for f in result.files:
        merged = result.workdir / "merged" / f.path if result.workdir else Path(f.path)
        if f.conflicts or f.compile_error:
            rows.append(("", f"{merged} (merged from {f.ported_from})"))
        rows += [("conflict", f"line {line}") for line in f.conflicts]
        if f.compile_error:
            rows.append(("does not compile", f.compile_error))
    n = sum(len(f.conflicts) for f in result.files)
    bad = sum(bool(f.compile_error) for f in result.files)
    err = MergeConflict(
        headline=(f"port of {result.name} needs a hand: {n} conflict(s), {bad} file(s) that do not "
                  f"compile; nothing was written under the patches folder"),
        details=rows,
        hint=(f"resolve them in {result.workdir}/merged/ (remove every conflict marker), then run "
              f"`m3fuse port --resume {result.workdir}`"))
    err.payload = {"port": result.to_json()}
    return err


def resume(workdir: Path, out: Path, sets: list[PatchSet], *,
           lock_timeout: float = mutex.DEFAULT_TIMEOUT) -> PortResult:
    meta_path = workdir / WORK_FILE
    portfs.check_workdir(workdir)
    try:
        meta = portfs.load_work_json(workdir, WORK_FILE)
        name, versions, summary = meta["name"], list(meta["versions"]), meta["summary"]
        ported_from, entries = meta["ported-from"], list(meta["files"])
        if not (isinstance(name, str) and isinstance(summary, str) and isinstance(ported_from, str)
                and versions and all(isinstance(v, str) for v in versions)):
            raise TypeError("bad field types")
    except FileNotFoundError:
        raise UsageProblem(f"{meta_path}: missing; --resume takes a work folder written by `m3fuse port`.") from None
    except (OSError, ValueError, KeyError, TypeError, RecursionError, MemoryError) as exc:  # nested too deeply too
        raise UsageProblem(f"{meta_path}: not a readable port work file ({exc.__class__.__name__}: {exc}); "
                           f"start again with "
                           f"`m3fuse port` into a new --workdir.") from exc
    check_name(name, out, sets)
    files: list[MergedFile] = []
    problems: list[str] = []
    for e in entries:
        try:
            rel, base_set, pin = e["path"], e["ported-from"], e["pristine-sha256"]
        except (KeyError, TypeError):
            raise UsageProblem(f"{meta_path}: a file entry lacks path/ported-from/pristine-sha256.") from None
        check_relative_path(rel, where=str(meta_path))
        try:
            pristine, pristine_mode = portfs.read_work_file(workdir, f"pristine/{rel}")
        except FileNotFoundError:
            raise UsageProblem(f"{workdir / 'pristine' / rel}: missing; start again with `m3fuse port`.") from None
        if sha256_bytes(pristine) != pin:
            raise IntegrityError(f"{workdir / 'pristine' / rel}: changed since port wrote it (expected sha256 "
                                 f"{pin}, got {sha256_bytes(pristine)}). Only merged/ is yours to edit; "
                                 f"start again with `m3fuse port`.")
        merged_path = workdir / "merged" / rel
        try:
            merged, merged_mode = portfs.read_work_file(workdir, f"merged/{rel}")
        except OSError as exc:
            raise UsageProblem(f"{merged_path}: cannot read the resolved file ({exc.strerror}).") from exc
        marks = [i for i, line in enumerate(split_lines(merged.decode("utf-8", "replace")), 1)
                 if line.startswith(MARKERS)]
        problems += [f"{merged_path}:{i}: conflict marker left" for i in marks]
        f = MergedFile(rel, base_set, pristine, merged, mode=pristine_mode & merged_mode)
        f.compile_error = None if marks else _compile_error(rel, merged)
        if f.compile_error:
            problems.append(f"{merged_path}: does not compile ({f.compile_error})")
        if merged == pristine:
            problems.append(f"{merged_path}: equals the pristine file; the set would change nothing here")
        files.append(f)
    if problems:
        raise MergeConflict(headline=f"{workdir}: not resolved yet; nothing was written",
                            details=[("left", p) for p in problems],
                            hint=f"fix these in {workdir}/merged/, then run `m3fuse port --resume {workdir}` again")
    result = PortResult(name, versions, files, workdir=workdir)
    base = next((s for s in sets if s.name == ported_from), None)
    result.set_dir = write_set(out, name, versions, summary, files, ported_from, lock_timeout=lock_timeout,
                               extra=readers.base_copy(base.folder) if base else {})
    return result


def next_steps(result: PortResult, patches: Path) -> str:
    """What a maintainer runs after a written port (docs/releases.md's steps 5-6, in order)."""
    v = result.versions[0] if result.versions else "V"
    return (f"next: `m3fuse port --record-resolutions --patches {patches}` keeps its hand resolutions, "
            f"`m3fuse needs {result.set_dir} --vllm <the vllm-{v} wheel>` derives what it needs of AITER, "
            f"`python tools/release_facts.py --write` its facts; then review it (every reader the tests derive "
            f"must be declared in {result.set_dir}/{readers.READERS_FILE}; edit the manifest's summary if the "
            f"set's behaviour changed) (docs/releases.md)")


def describe(result: PortResult) -> list[str]:
    """Human lines for a finished port."""
    lines = [f"port: wrote {result.set_dir} ({len(result.files)} file(s), vLLM {', '.join(result.versions)})"]
    width = max(len(f.path) for f in result.files)
    for f in result.files:
        lines.append(f"  {f.path:<{width}}  from {f.ported_from}  pristine {sha256_bytes(f.pristine)[:12]}  "
                     f"patched {sha256_bytes(f.merged)[:12]}")
    lines += [f"warning: {w}" for w in result.reader_warnings()]
    lines.append(f"note: {NOT_REVIEWED}")
    return lines

