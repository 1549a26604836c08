"""Checks on a verified wheel file before it may be installed, and the target's tag set.

The sha256 proves the file is the pinned one; these checks prove the pin is one the fusion
can use in *this* environment: tags fit the target interpreter, the metadata is the pinned
distribution, the archive cannot write outside site-packages, and (amd-aiter) the AITER API
the patched vLLM calls is really there.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Callable

from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from .. import pysource, safeio
from ..errors import EnvironmentProblem, IntegrityError
from .lock import LockedPackage
from ..target import query_interpreter

# ast, zipfile and email.parser are imported by the checks that use them: `m3fuse verify`
# imports this module (for target_tags) and must not pay for them.
if TYPE_CHECKING:
    import ast
    import zipfile


class WheelCheckError(IntegrityError):
    """A verified wheel failed a pre-install check (exit 4: bad wheel); nothing was installed."""

    kind = "bad-wheel"


# Runs inside the *target* interpreter. pip's vendored packaging is preferred: it is exactly
# what that pip will use to accept or refuse the wheel.
_TAGS_SCRIPT = r"""
import json, sys
try:
    from pip._vendor.packaging import tags
except Exception:
    from packaging import tags
print(json.dumps({"tags": [str(t) for t in tags.sys_tags()],
                  "version": "%d.%d.%d" % sys.version_info[:3],
                  "executable": sys.executable}))
"""


@lru_cache(maxsize=None)
def target_tags(python: str) -> tuple[str, ...]:
    """The target interpreter's supported tags, most preferred first."""
    tags = query_interpreter(python, _TAGS_SCRIPT, what="report its wheel tags", timeout=60).get("tags")
    if not isinstance(tags, list) or not tags:
        raise EnvironmentProblem(headline="the target Python printed no tag list", details=[("python", python)],
                                 hint=f"check its pip: `{python} -m pip --version`")
    return tuple(tags)


# ------------------------------------------------------------------------- file checks


def _fail(path: Path, check: str, detail: str, why: str) -> WheelCheckError:
    return WheelCheckError(headline=f"the wheel {path.name} failed the {check} check; nothing was installed",
                           details=[("file", str(path)), ("problem", detail)], hint=why)


def check_tags(path: Path, tags: tuple[str, ...], python: str) -> None:
    try:
        _, _, _, wtags = parse_wheel_filename(path.name)
    except InvalidWheelFilename as exc:
        raise _fail(path, "file name", str(exc), "pip could not install it.") from None
    if not {str(t) for t in wtags} & set(tags):
        raise _fail(path, "tag", f"its tags {sorted(str(t) for t in wtags)} do not fit the target Python "
                    f"{python} (best tag {tags[0] if tags else 'unknown'})",
                    "Its compiled parts would not load there; use the target interpreter the lock was "
                    "made for with --python.")


def dist_info_dir(zf: zipfile.ZipFile, path: Path) -> str:
    tops = {n.split("/", 1)[0] for n in zf.namelist()}
    infos = sorted(t for t in tops if t.endswith(".dist-info"))
    if len(infos) != 1:
        raise _fail(path, "metadata", f"it has {len(infos)} top-level .dist-info folders ({infos})",
                    "A wheel has exactly one; this one is malformed.")
    return infos[0]


def read_metadata(path: Path) -> tuple[str, str]:
    """(Name, Version) from the wheel's *.dist-info/METADATA."""
    with _open_zip(path) as zf:
        info = dist_info_dir(zf, path)
        try:
            raw = safeio.decode(read_member(zf, f"{info}/METADATA", path), f"{info}/METADATA")
        except safeio.NotText as exc:
            raise _fail(path, "metadata", f"{info}/METADATA {exc.reason}", "A wheel's METADATA is UTF-8 text.") from None
        except KeyError:
            raise _fail(path, "metadata", f"{info}/METADATA is missing", "A wheel without it is malformed.") from None
    from email.parser import HeaderParser

    msg = HeaderParser().parsestr(raw)
    name, version = msg.get("Name"), msg.get("Version")
    if not name or not version:
        raise _fail(path, "metadata", "METADATA has no Name or no Version", "A wheel without them is malformed.")
    return name.strip(), version.strip()


def check_metadata(path: Path, pkg: LockedPackage) -> None:
    name, version = read_metadata(path)
    try:
        same_version = Version(version) == Version(pkg.version)
    except InvalidVersion:
        same_version = False
    if canonicalize_name(name) != pkg.key or not same_version:
        raise _fail(path, "metadata", f"its METADATA says {name} {version}, the lock pins {pkg.name} {pkg.version}",
                    "The file name and the hash were right, so the pin itself points at another build; "
                    "re-pin it with `m3fuse lock add`.")


def unsafe_member(name: str) -> str | None:
    """Why an archive member path is unsafe to extract into site-packages, or None."""
    if "\x00" in name:
        return "contains a NUL byte"
    if name.startswith("/") or name.startswith("\\") or (len(name) > 1 and name[1] == ":"):
        return "is absolute"
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if ".." in parts:
        return "contains '..'"
    return None


MAX_MEMBER = safeio.MAX_MEMBER  # METADATA or one Python source: a few hundred KB in real wheels


def read_member(zf: zipfile.ZipFile, name: str, path: Path, limit: int = MAX_MEMBER) -> bytes:
    """One archive member through safeio's bounded inflation, refused past `limit` bytes judged
    twice: by the size its header declares, and by the bytes actually inflated (a zip bomb may
    declare a small size). KeyError when absent."""
    info = zf.getinfo(name)
    if info.file_size > limit:
        raise _fail(path, "archive", f"member {name!r} declares {info.file_size} bytes, over the {limit}-byte limit "
                    f"for it", "A real wheel's file of this kind is far smaller; this one may be a zip bomb.")
    try:
        return safeio.read_member(zf, name, limit, shown=path)
    except safeio.TooLarge:
        raise _fail(path, "archive", f"member {name!r} inflates past the {limit}-byte limit",
                    "A real wheel's file of this kind is far smaller; this one may be a zip bomb.") from None
    except safeio.BadArchive as exc:
        raise _fail(path, "archive", f"member {name!r} {exc.reason}", "It cannot be a wheel.") from None


def _open_zip(path: Path) -> zipfile.ZipFile:
    """The wheel as a zip archive, opened as a regular file only (safeio.open_zip)."""
    try:
        return safeio.open_zip(path)
    except FileNotFoundError:
        raise _fail(path, "archive", "it does not exist", "It cannot be a wheel.") from None
    except safeio.BadArchive as exc:
        raise _fail(path, "archive", exc.reason.replace("is not", "it is not", 1), "It cannot be a wheel.") from None
    except safeio.Unsafe as exc:
        raise _fail(path, "archive", f"it {exc.reason}", "m3fuse reads a wheel only from a regular file.") from None
    except OSError as exc:
        raise _fail(path, "archive", f"it cannot be opened ({exc.strerror or exc})", "It cannot be a wheel.") from None


def check_members(path: Path) -> None:
    with _open_zip(path) as zf:
        for info in zf.infolist():
            why = unsafe_member(info.filename)
            if why is None and (info.external_attr >> 16) & 0o170000 == 0o120000:
                why = "is a symbolic link"
            if why:
                raise _fail(path, "archive path", f"member {info.filename!r} {why}",
                            "Installing it could write outside the environment's site-packages.")


# ------------------------------------------------------------------ content checks (aiter)

AITER_CAR = "aiter/dist/device_communicators/custom_all_reduce.py"


def _param_names(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    a = fn.args
    names = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs}
    return names


def aiter_problems(source: str) -> list[str]:
    """What the AITER source lacks that the fusion needs; empty when it is usable."""
    import ast

    try:
        tree = pysource.parse(source, AITER_CAR)  # bounded: hostile text gives a problem, not a traceback
    except pysource.Unparsable as exc:
        return [f"{AITER_CAR} {exc.reason}"]
    cls = next((n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "CustomAllreduce"), None)
    if cls is None:
        return [f"{AITER_CAR} defines no class CustomAllreduce"]
    problems = []
    fn = next((n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
               and n.name == "fused_ar_rms"), None)
    if fn is None:
        problems.append("CustomAllreduce has no fused_ar_rms method (the fused all-reduce + RMSNorm "
                        "kernel the patched vLLM calls)")
    elif "use_1stage" not in _param_names(fn):
        problems.append("CustomAllreduce.fused_ar_rms takes no use_1stage parameter: the fusion must "
                        "force the two-stage kernel (use_1stage=False), the only one safe under HIP "
                        "graph replay in this AITER line")
    uses_pool = any(isinstance(n, ast.Attribute) and n.attr == "_pool" for n in ast.walk(cls))
    if not uses_pool:
        problems.append("CustomAllreduce does not use the _pool IPC buffer pool (AITER >= 0.1.12): older "
                        "builds only all-reduce hidden sizes 512-4096 and cannot handle M3's 6144")
    return problems


def check_aiter(path: Path) -> None:
    with _open_zip(path) as zf:
        try:
            src = safeio.decode(read_member(zf, AITER_CAR, path, pysource.MAX_PARSE), AITER_CAR)
        except safeio.NotText as exc:
            raise _fail(path, "AITER API", f"{AITER_CAR} {exc.reason}", "Python could not import it.") from None
        except KeyError:
            raise _fail(path, "AITER API", f"it has no {AITER_CAR}",
                        "The fusion calls CustomAllreduce.fused_ar_rms from that module.") from None
    problems = aiter_problems(src)
    if problems:
        raise _fail(path, "AITER API", "; ".join(problems),
                    "Installing it would leave the patched vLLM calling an AITER that cannot run the "
                    "fusion; pin AITER >= 0.1.12 with use_1stage (the shipped lock pins 0.1.15.post1).")


CONTENT_CHECKS: dict[str, Callable[[Path], None]] = {"amd-aiter": check_aiter}


def check_wheel(path: Path, pkg: LockedPackage, tags: tuple[str, ...] | None, python: str) -> None:
    """All pre-install checks on one verified wheel file; raises WheelCheckError. With tags
    None (fetching for another machine) the tag check is left to install time."""
    if tags is not None:
        check_tags(path, tags, python)
    check_members(path)
    check_metadata(path, pkg)
    extra = CONTENT_CHECKS.get(pkg.key)
    if extra:
        extra(path)
