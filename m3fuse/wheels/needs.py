"""What AITER (and FlyDSL) a vLLM release's MiniMax M3 needs, read off the release's own sources.

`derive` reads a release (its wheel, or an installed tree) and a patch set, and returns what
`m3fuse needs` writes to the set's `aiter-needs.toml`; `load_needs` reads that file back for
the wheel plan. Three facts per distribution, each found in the release itself:

  modules      every `aiter.*` / `flydsl.*` module the M3 model (vllm/models/minimax_m3/amd/**,
               patched as the set patches it) imports, at module level or inside a function
               (those imports only fail when the function runs, so a missing one breaks the
               model at run time, in every mode);
  calls        the keyword arguments the release and the patch pass to AITER's
               CustomAllreduce methods on the fused path (e.g. gemma_norm on 0.30+);
  min-version  the lowest AITER vLLM's sources say they were built against ("Pinned AITER vX").

The file lives beside the set's manifest (and not in it) because the manifest is rewritten by
the set writer; this file has one writer, `m3fuse needs`, and a test that regenerates it from
the real release wheels.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .. import pysource, safeio
from ..errors import PatchSetError, UsageProblem

if TYPE_CHECKING:
    import ast

    from ..patching.patchset import PatchSet

NEEDS_FILE = "aiter-needs.toml"
FORMAT = 1
AITER = "amd-aiter"
FLYDSL = "flydsl"
# top-level import name -> distribution
DISTS = {"aiter": AITER, "flydsl": FLYDSL}
M3_MODEL = "vllm/models/minimax_m3/amd/"
# AITER CustomAllreduce methods the fused path calls (the fused all-reduce + RMSNorm, and the
# TP all-gather vLLM 0.34 routes to AITER). Other methods are reached behind hasattr guards.
FUSED_PATH_API = ("fused_ar_rms", "custom_fused_ar_rms", "all_gather_unreg")
_PINNED_RE = re.compile(rb"[Pp]inned AITER v(\d+(?:\.\d+)*(?:\.post\d+)?)")
_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
# A release's Python sources are read through one inflation budget: vLLM 0.34.0's come to 53 MiB
# (3604 files, the largest 319 KB), so a wheel whose sources inflate past this is no release.
MAX_RELEASE_SOURCES = 512 << 20
HEADERS_MAX = 1 << 20


@dataclass
class DistNeeds:
    modules: tuple[str, ...] = ()
    calls: dict[str, tuple[str, ...]] = field(default_factory=dict)  # "CustomAllreduce.m" -> keywords
    min_version: str | None = None
    min_version_source: str | None = None  # "path:line" where the release names it


@dataclass
class Needs:
    path: Path | None  # the file read (None: derived, not yet written)
    vllm: tuple[str, ...]  # the releases it was derived from
    dists: dict[str, DistNeeds]

    def get(self, dist: str) -> DistNeeds | None:
        return self.dists.get(dist)


# ----------------------------------------------------------------------------- reading a release


class Release:
    """The files of one vLLM release: a wheel (zip) or a folder that contains `vllm/`."""

    def __init__(self, source: Path) -> None:
        self.source = Path(source)
        self._zip = None
        self._budget = safeio.Inflation(MAX_RELEASE_SOURCES)
        # The path the user named may be a link (followed, as for any argument); below it, nothing is.
        real = Path(os.path.realpath(self.source))
        try:
            mode = os.stat(real).st_mode
        except OSError:
            mode = 0
        if stat.S_ISREG(mode):
            try:
                self._zip = safeio.open_zip(real)
            except (OSError, safeio.Unsafe) as exc:
                raise self._refuse(f"it cannot be read as a wheel ({getattr(exc, 'reason', None) or exc})") from None
        elif not (stat.S_ISDIR(mode) and (real / "vllm").is_dir()):
            raise self._refuse("it is neither a wheel nor a folder holding vllm/")
        self._root = real
        self._names: list[str] | None = None

    def _refuse(self, problem: str) -> UsageProblem:
        return UsageProblem(headline=f"{self.source} is not a vLLM release", details=[("problem", problem)],
                            hint="pass the release wheel (vllm-X-*.whl) or the site-packages folder of an install")

    def names(self) -> list[str]:
        if self._names is None:
            if self._zip is not None:
                self._names = [n for n in self._zip.namelist() if n.startswith("vllm/")]
            else:
                found = []
                for here, dirs, files in os.walk(self._root / "vllm"):  # never into a linked folder
                    dirs.sort()
                    rel = Path(here).relative_to(self._root).as_posix()
                    found += [f"{rel}/{f}" for f in files if f.endswith(".py")]
                self._names = sorted(found)
        return self._names

    def read(self, name: str) -> bytes:
        """One source of the release: bounded (each file, and all of them together), a regular
        file only, never through a link."""
        try:
            if self._zip is not None:
                return safeio.read_member(self._zip, name, safeio.MAX_MEMBER, shown=self.source, budget=self._budget)
            data = safeio.read_under(self._root, name, min(safeio.MAX_MEMBER, self._budget.left))
            self._budget.left -= len(data)
            return data
        except safeio.TooLarge as exc:
            raise self._refuse(f"{name} is larger than the {exc.limit}-byte limit m3fuse reads (each source "
                               f"at most {safeio.MAX_MEMBER}, all of them {MAX_RELEASE_SOURCES}); a real release's "
                               f"are far smaller") from None
        except safeio.Unsafe as exc:
            raise self._refuse(f"{name}: {exc.reason}") from None
        except OSError as exc:
            raise self._refuse(f"{name} cannot be read ({exc.strerror or exc})") from None

    def version(self) -> str:
        from email.parser import HeaderParser

        found: str | None = None
        if self._zip is not None:
            meta = next((n for n in self._zip.namelist()
                         if n.count("/") == 1 and n.endswith(".dist-info/METADATA") and n.startswith("vllm-")), None)
            if meta:
                try:
                    text = safeio.decode(safeio.read_member(self._zip, meta, HEADERS_MAX, shown=self.source), meta)
                except safeio.Unsafe as exc:
                    raise self._refuse(f"{meta}: {exc.reason}") from None
                found = HeaderParser().parsestr(text)["Version"]
        else:
            from ..target import dist_info

            found = dist_info(self._root, "vllm")[1]
        if not found:
            raise self._refuse("no vllm-*.dist-info/METADATA names its version")
        return str(found).strip()


def _imports(tree: ast.AST) -> Iterable[str]:
    import ast

    for node in ast.walk(tree):  # every import, also those inside functions
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def _calls(tree: ast.AST) -> Iterable[tuple[str, set[str]]]:
    import ast

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FUSED_PATH_API:
            yield f"CustomAllreduce.{node.func.attr}", {k.arg for k in node.keywords if k.arg}


def _version_key(v: str):  # noqa: ANN202 - a packaging Version
    from packaging.version import Version

    return Version(v)


def derive(releases: Sequence[Path], patch_set: PatchSet) -> Needs:
    """Needs of `patch_set`'s release(s), read from the release files (each a wheel or tree)
    with the set's patches applied to the files it patches."""
    from ..patching.hunks import apply_diff

    dists: dict[str, DistNeeds] = {AITER: DistNeeds(), FLYDSL: DistNeeds()}
    modules: dict[str, set[str]] = {d: set() for d in dists}
    calls: dict[str, set[str]] = {}
    versions = []
    pins: list[tuple[str, str]] = []
    for source in releases:
        rel = Release(source)
        versions.append(rel.version())
        patched = {t.path: t for t in patch_set.targets}
        for name in rel.names():
            if not name.endswith(".py"):
                continue
            data = rel.read(name)
            in_model = name.startswith(M3_MODEL)
            if name in patched:
                data = apply_diff(data, patched[name].diff, name=name)
            for m in _PINNED_RE.finditer(data):
                line = data.count(b"\n", 0, m.start()) + 1
                pins.append((m.group(1).decode(), f"{name}:{line}"))
            if not in_model and b"aiter" not in data:
                continue
            try:
                tree = pysource.parse(data, name)  # bounded: too large or too deep is refused, never a traceback
            except pysource.Unparsable as exc:
                if exc.lineno is not None:
                    continue  # a syntax error: vLLM ships no such file; nothing of it could run either
                raise rel._refuse(f"{name} {exc.reason}") from None
            if in_model:
                for mod in _imports(tree):
                    dist = DISTS.get(mod.split(".")[0])
                    if dist:
                        modules[dist].add(mod)
            for api, kws in _calls(tree):
                calls.setdefault(api, set()).update(kws)
    for d in dists:
        dists[d].modules = tuple(sorted(modules[d]))
    dists[AITER].calls = {k: tuple(sorted(v)) for k, v in sorted(calls.items())}
    if pins:
        low = min(pins, key=lambda p: (_version_key(p[0]), p[1]))
        dists[AITER].min_version, dists[AITER].min_version_source = low
    return Needs(None, tuple(versions), dists)


# ------------------------------------------------------------------------------- the file


def render(needs: Needs, set_name: str) -> str:
    q = json.dumps  # a JSON string of ASCII text is a TOML basic string

    def key(k: str) -> str:
        return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else q(k)

    out = [f"# Generated by `m3fuse needs patches/{set_name} --vllm <release wheel>`: what the MiniMax M3",
           "# model of these releases needs of AITER and FlyDSL, read off the release's own sources and",
           "# this set's patches (m3fuse/wheels/needs.py). Do not edit; regenerate.",
           f"format = {FORMAT}",
           f"vllm = [{', '.join(q(v) for v in needs.vllm)}]"]
    for dist, dn in needs.dists.items():
        out += ["", f"[{key(dist)}]"]
        if dn.min_version:
            out += [f"min-version = {q(dn.min_version)}", f"min-version-source = {q(dn.min_version_source)}"]
        out.append("modules = [" + "".join(f"\n  {q(m)}," for m in dn.modules) + ("\n]" if dn.modules else "]"))
        if dn.calls:
            out += ["", f"[{key(dist)}.calls]"]
            out += [f"{q(k)} = [{', '.join(q(a) for a in v)}]" for k, v in dn.calls.items()]
    return "\n".join(out) + "\n"


def write_needs(path: Path, text: str) -> None:
    from .lock import _atomic_write

    _atomic_write(path, text)


def _bad(path: Path, problem: str) -> PatchSetError:
    return PatchSetError(headline=f"{path} is malformed; nothing was downloaded or installed",
                         details=[("file", str(path)), ("problem", problem)],
                         hint="restore it from the m3fuse release, or regenerate it with `m3fuse needs SET_DIR "
                              "--vllm RELEASE_WHEEL`")


def _strings(value: object, path: Path, where: str, check: re.Pattern[str] | None = None) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _bad(path, f"{where} must be a list of non-empty strings, got {value!r}")
    for v in value:
        if check is not None and not check.match(v):
            raise _bad(path, f"{where}: {v!r} is not a dotted Python name")
    return tuple(value)


def load_needs(folder: Path) -> Needs | None:
    """The set's needs file, validated; None when the set has none (then the plan judges the
    pins by version and content checks only, as before)."""
    from packaging.version import InvalidVersion, Version

    from ..tomlread import TOMLDecodeError, loads

    path = Path(folder) / NEEDS_FILE
    try:
        text = safeio.read_text(path, safeio.MAX_SET_FILE)  # a regular file only, bounded, strict UTF-8
    except FileNotFoundError:
        return None
    except safeio.Unsafe as exc:
        raise _bad(path, exc.reason) from None
    except OSError as exc:
        raise _bad(path, f"cannot be read ({exc.strerror or exc})") from None
    try:
        data = loads(text)
    except TOMLDecodeError as exc:
        raise _bad(path, f"not valid TOML ({exc})") from None
    if data.get("format") != FORMAT:
        raise _bad(path, f"format is {data.get('format')!r}, this m3fuse reads format {FORMAT}")
    vllm = _strings(data.get("vllm"), path, "vllm")
    dists: dict[str, DistNeeds] = {}
    for dist in (AITER, FLYDSL):
        t = data.get(dist, {})
        if not isinstance(t, dict):
            raise _bad(path, f"[{dist}] must be a table")
        unknown = sorted(set(t) - {"modules", "calls", "min-version", "min-version-source"})
        if unknown:
            raise _bad(path, f"[{dist}] has unknown keys {unknown}")
        dn = DistNeeds(modules=_strings(t.get("modules", []), path, f"{dist}.modules", _MODULE_RE))
        raw_calls = t.get("calls", {})
        if not isinstance(raw_calls, dict):
            raise _bad(path, f"[{dist}.calls] must be a table")
        for api, kws in raw_calls.items():
            if not _MODULE_RE.match(api):
                raise _bad(path, f"{dist}.calls: {api!r} is not Class.method")
            dn.calls[api] = _strings(kws, path, f"{dist}.calls.{api}", _MODULE_RE) if kws else ()
        mv = t.get("min-version")
        if mv is not None:
            try:
                Version(str(mv)) if isinstance(mv, str) else Version("!")
            except InvalidVersion:
                raise _bad(path, f"{dist}.min-version {mv!r} is not a PEP 440 version") from None
            dn.min_version = mv
            src = t.get("min-version-source")
            dn.min_version_source = src if isinstance(src, str) else None
        dists[dist] = dn
    return Needs(path, vllm, dists)


def known_modules(patches_root: Path, dist: str) -> tuple[str, ...]:
    """Every module any set under `patches_root` needs of `dist` (what `lock add` records a
    new pin's answer for)."""
    out: set[str] = set()
    for folder in sorted(Path(patches_root).iterdir()) if Path(patches_root).is_dir() else ():
        if folder.name.startswith(".") or not os.path.lexists(folder / NEEDS_FILE):
            continue
        needs = load_needs(folder)
        dn = needs.get(dist) if needs else None
        if dn:
            out.update(dn.modules)
    return tuple(sorted(out))
