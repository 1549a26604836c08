"""What an AITER (or FlyDSL) build provides, and whether that meets a release's needs (needs.py).

A build's facts come from one of two places, in the same shape:

  the lock     `[packages.tool.m3fuse]` of the pinned package: read off the pinned build's
               source (ROCm/aiter at the pinned tag), so the plan can judge the pin before
               anything is downloaded (a pin without them is judged by its version alone);
  a tree       the installed distribution in site-packages (what `install` may keep).

A module is provided when `a/b.py`, `a/b/__init__.py`, an extension `a/b.*.so` or a folder
`a/b/` exists; an API when CustomAllreduce (aiter/dist/device_communicators/
custom_all_reduce.py) defines the method with every keyword the release passes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import pysource, safeio
from .check import AITER_CAR, aiter_problems
from .lock import LockedPackage, LockError
from .needs import AITER, DistNeeds, Needs

TOOL = "m3fuse"
MAX_SOURCE = pysource.MAX_PARSE  # AITER's custom_all_reduce.py is ~60 KB; anything this large is not it


@dataclass
class Provides:
    version: str | None  # None: the version could not be read
    source: str  # where the facts were read, for messages
    modules: dict[str, bool] | None = None  # module -> present; None: not known
    api: dict[str, tuple[str, ...]] | None = None  # "CustomAllreduce.m" -> parameter names; None: not known
    content_problems: list[str] = field(default_factory=list)  # the use_1stage / _pool checks


def _version(text: str | None) -> Any:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(text) if text else None
    except InvalidVersion:
        return None


def api_of(source: str) -> dict[str, tuple[str, ...]] | None:
    """Method -> parameter names of CustomAllreduce in `source`; None if it does not parse.
    A method taking **kwargs accepts any keyword: its names end with "**"."""
    import ast

    try:
        tree = pysource.parse(source, AITER_CAR)
    except pysource.Unparsable:
        return None
    cls = next((n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "CustomAllreduce"), None)
    if cls is None:
        return {}
    out = {}
    for fn in cls.body:
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = fn.args
            names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
            if a.kwarg is not None:
                names.append("**")
            out[f"CustomAllreduce.{fn.name}"] = tuple(names)
    return out


def _modules_from(exists: Callable[[str], bool], wanted: tuple[str, ...]) -> dict[str, bool]:
    return {m: exists(m.replace(".", "/")) for m in wanted}


# ------------------------------------------------------------------------------ three sources


def from_lock(pkg: LockedPackage, lock_path: Path) -> Provides | None:
    """The facts the lock records for its pin, validated; None when it records none (or
    records them for another version: an edited pin's old facts say nothing about the new one)."""
    facts = pkg.tool.get(TOOL) if pkg.tool else None
    if facts is None:
        return None
    where = f"package {pkg.name}, [packages.tool.{TOOL}]"

    def bad(problem: str) -> LockError:
        return LockError(headline=f"{lock_path}: {where} is malformed; nothing was downloaded or installed",
                         details=[("file", str(lock_path)), ("problem", problem)],
                         hint="fix or delete that table; `m3fuse lock add` writes a new pin without it")

    if not isinstance(facts, dict):
        raise bad("it is not a table")
    fv = facts.get("version")
    if not isinstance(fv, str) or _version(fv) is None:
        raise bad(f"version {fv!r} is not a PEP 440 version (the version these facts describe)")
    if _version(fv) != _version(pkg.version):
        return None
    modules = facts.get("modules", {})
    if not isinstance(modules, dict) or not all(isinstance(v, bool) for v in modules.values()):
        raise bad("modules must be a table of module name = true/false")
    api = facts.get("api", {})
    if not isinstance(api, dict) or not all(isinstance(v, list) and all(isinstance(x, str) for x in v)
                                            for v in api.values()):
        raise bad("api must be a table of \"Class.method\" = [parameter names]")
    source = facts.get("source")
    if not isinstance(source, str) or not source:
        raise bad("source (where these facts were read) is missing")
    return Provides(pkg.version, f"pinned in {lock_path.name} ({source})", dict(modules),
                    {k: tuple(v) for k, v in api.items()})


def from_tree(root: Path, version: str | None, dist: str, wanted: tuple[str, ...]) -> Provides:
    """An installed distribution in the site-packages folder `root`."""
    root = Path(root)

    def exists(rel: str) -> bool:
        p = root / rel
        if p.with_suffix(".py").is_file() or (p / "__init__.py").is_file() or p.is_dir():
            return True
        return p.parent.is_dir() and any(p.parent.glob(f"{p.name}.*.so"))

    prov = Provides(version, f"installed in {root}", _modules_from(exists, wanted))
    if dist == AITER:
        try:
            # A regular file only, bounded, strict UTF-8: a FIFO, device or link planted there is not read.
            src = safeio.read_text(root / AITER_CAR, MAX_SOURCE)
        except safeio.Unsafe as exc:
            prov.api = {}
            prov.content_problems = [f"{AITER_CAR} cannot be read ({exc.path} {exc.reason})"]
        except OSError as exc:
            prov.api = {}
            prov.content_problems = [f"{AITER_CAR} cannot be read ({exc.__class__.__name__}: {exc.strerror or exc})"]
        else:
            prov.api = api_of(src) or {}
            prov.content_problems = aiter_problems(src)
    return prov


def wheel_facts(path: Path, name: str, version: str, sha256: str, patches_root: Path) -> dict | None:
    """The `[packages.tool.m3fuse]` facts of a wheel `m3fuse lock add` pins: for every module
    a set under `patches_root` names for this distribution, whether the wheel has it, and (AITER)
    CustomAllreduce's fused-path parameters. None for a distribution no set has needs of."""
    from packaging.utils import canonicalize_name

    from .check import _fail, _open_zip, read_member
    from .needs import FUSED_PATH_API, known_modules

    dist = canonicalize_name(name)
    modules = known_modules(patches_root, dist)
    if not modules and dist != AITER:
        return None
    with _open_zip(path) as zf:
        names = zf.namelist()
        src = None
        if dist == AITER and AITER_CAR in names:
            # Bounded inflation (a zip bomb is refused, never inflated) and strict decoding.
            raw = read_member(zf, AITER_CAR, path, MAX_SOURCE)
            try:
                src = safeio.decode(raw, AITER_CAR)
            except safeio.NotText as exc:
                raise _fail(path, "AITER API", f"{AITER_CAR} {exc.reason}", "Python could not import it.") from None
    files = set(names)
    dirs = {n.rsplit("/", i)[0] for n in names for i in range(1, n.count("/") + 1)}

    def exists(rel: str) -> bool:
        return (f"{rel}.py" in files or f"{rel}/__init__.py" in files or rel in dirs
                or any(n.startswith(f"{rel}.") and n.endswith(".so") and "/" not in n[len(rel):] for n in names))

    facts: dict = {"version": version, "source": f"wheel {path.name} (sha256 {sha256}), read by m3fuse lock add",
                   "modules": _modules_from(exists, modules)}
    if dist == AITER:
        api = api_of(src) if src is not None else {}
        facts["api"] = {k: list(v) for k, v in (api or {}).items() if k.split(".")[-1] in FUSED_PATH_API}
    return facts


# ------------------------------------------------------------------------------------ judging


@dataclass
class Verdict:
    unmet: list[str]  # what the build lacks (empty: it meets every known need)
    unknown: list[str]  # needs the facts do not answer (the pin's facts are incomplete)

    @property
    def ok(self) -> bool:
        return not self.unmet


def judge(need: DistNeeds | None, prov: Provides, *, dist: str, vllm: str) -> Verdict:
    """Does the build `prov` meet `need` (one distribution's needs of release `vllm`)? The
    content checks of an installed or downloaded AITER count as unmet needs too."""
    unmet = list(prov.content_problems)
    unknown: list[str] = []
    if need is None:
        return Verdict(unmet, unknown)
    v = _version(prov.version)
    if need.min_version:
        if v is None:
            unmet.append(f"its version {prov.version!r} cannot be compared with {need.min_version}, the "
                         f"AITER vLLM {vllm}'s sources name ({need.min_version_source})")
        elif v < _version(need.min_version):
            unmet.append(f"it is older than {need.min_version}, the AITER vLLM {vllm}'s sources say they "
                         f"were built against ({need.min_version_source})")
    for m in need.modules:
        have = None if prov.modules is None else prov.modules.get(m)
        if have is None:
            unknown.append(f"module {m}")
        elif not have:
            unmet.append(f"it has no module {m} (vLLM {vllm}'s M3 model imports it)")
    for api, kws in need.calls.items():
        if prov.api is None:
            unknown.append(api)
            continue
        params = prov.api.get(api)
        if params is None:
            unmet.append(f"it has no {api} (vLLM {vllm} calls it)")
            continue
        if "**" in params:
            continue
        missing = [k for k in kws if k not in params]
        if missing:
            unmet.append(f"its {api} takes no {', '.join(missing)} (vLLM {vllm} passes it)")
    return Verdict(unmet, unknown)


def needs_of(needs: Needs | None, dist: str) -> DistNeeds | None:
    return needs.get(dist) if needs is not None else None


def wanted(needs: Needs | None, dist: str) -> tuple[str, ...]:
    n = needs_of(needs, dist)
    return n.modules if n else ()


def release_name(needs: Needs | None, fallback: str | None = None) -> str:
    if needs is not None and needs.vllm:
        return "/".join(needs.vllm)
    return fallback or "this release"

