"""`wheels.lock`: read, validate and (for `m3fuse lock add`) rewrite the wheel pins.

The layout follows the package/wheel part of PEP 751 (`pylock.toml`) so it reads familiarly::

    lock-version = "1.0"

    [[packages]]
    name = "flydsl"
    version = "0.1.9.dev20260529+d7ae22d"

    [[packages.wheels]]
    name = "flydsl-0.1.9.dev20260529+d7ae22d-cp312-cp312-manylinux_2_27_x86_64.whl"
    url = "https://.../flydsl-0.1.9.dev20260529%2Bd7ae22d-cp312-cp312-manylinux_2_27_x86_64.whl"
    size = 123456            # optional
    hashes = { sha256 = "..." }

Packages install in file order. A package may list several wheels (one per Python version,
say); the one whose tags fit the target interpreter is chosen elsewhere (wheelcheck).

Reading never imports `requests`: `m3fuse verify` loads the lock and must stay fast.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from .errors import UsageProblem

if sys.version_info >= (3, 11):
    import tomllib as _toml
else:  # pragma: no cover - 3.10 only
    import tomli as _toml

LOCK_VERSION = "1.0"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# PEP 508 / core metadata name rule.
_NAME_RE = re.compile(r"^([A-Z0-9]|[A-Z0-9][A-Z0-9._-]*[A-Z0-9])$", re.IGNORECASE)


class LockError(UsageProblem):
    """The lock file itself is unreadable or unsafe. Exit 2: the input given to m3fuse is
    wrong, nothing was downloaded or installed."""

    kind = "bad-lock"


@dataclass(frozen=True)
class LockedWheel:
    name: str  # the wheel file name
    url: str
    sha256: str
    size: int | None = None

    @property
    def tags(self) -> frozenset[str]:
        _, _, _, tags = parse_wheel_filename(self.name)
        return frozenset(str(t) for t in tags)


@dataclass(frozen=True)
class LockedPackage:
    name: str
    version: str
    wheels: tuple[LockedWheel, ...]

    @property
    def key(self) -> str:
        return canonicalize_name(self.name)


@dataclass(frozen=True)
class Lock:
    path: Path
    packages: tuple[LockedPackage, ...] = field(default_factory=tuple)
    lock_version: str = LOCK_VERSION

    def package(self, name: str) -> LockedPackage | None:
        key = canonicalize_name(name)
        return next((p for p in self.packages if p.key == key), None)


# --------------------------------------------------------------------------------- reading


def load_lock(path: Path) -> Lock:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LockError(
            f"The wheel lock {path} does not exist. Pass an existing lock with --lock FILE, or "
            f"create one with `m3fuse lock add URL|FILE --lock {path}`.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LockError(f"The wheel lock {path} cannot be read ({exc}). Check the path and its "
                        f"permissions, or pass another lock with --lock FILE.") from None
    return parse_lock(text, path)


def parse_lock(text: str, path: Path) -> Lock:
    try:
        data = _toml.loads(text)
    except _toml.TOMLDecodeError as exc:
        raise LockError(f"The wheel lock {path} is not valid TOML ({exc}). Fix the file by hand or "
                        f"restore it from version control; nothing was downloaded or installed.") from None
    return _validate(data, Path(path))


def _bad(path: Path, where: str, problem: str) -> LockError:
    # One paragraph: file, the entry, what is wrong, what to do.
    return LockError(f"The wheel lock {path} is refused: {where}: {problem}. Fix that entry (or "
                     f"re-create it with `m3fuse lock add URL|FILE --lock {path}`); nothing was "
                     f"downloaded or installed.")


def _validate(data: dict, path: Path) -> Lock:
    lv = data.get("lock-version")
    if lv is None:
        raise _bad(path, "top level", 'the key lock-version is missing (expected lock-version = "1.0")')
    if not isinstance(lv, str) or lv.split(".")[0] != "1":
        raise _bad(path, "top level", f'lock-version is {lv!r}, this m3fuse reads "1.x" only')
    raw_pkgs = data.get("packages", [])
    if not isinstance(raw_pkgs, list):
        raise _bad(path, "top level", "packages must be an array of tables ([[packages]])")
    pkgs: list[LockedPackage] = []
    seen: dict[str, int] = {}
    for i, rp in enumerate(raw_pkgs, 1):
        where = f"package #{i}"
        if not isinstance(rp, dict):
            raise _bad(path, where, "is not a table")
        name, version = rp.get("name"), rp.get("version")
        if not isinstance(name, str) or not name:
            raise _bad(path, where, "name is missing")
        where = f"package #{i} ({name})"
        if not _NAME_RE.match(name):
            raise _bad(path, where, f"{name!r} is not a valid distribution name")
        if not isinstance(version, str) or not version:
            raise _bad(path, where, "version is missing")
        try:
            Version(version)
        except InvalidVersion:
            raise _bad(path, where, f"version {version!r} is not a valid PEP 440 version") from None
        key = canonicalize_name(name)
        if key in seen:
            raise _bad(path, where, f"the same distribution is already pinned by package #{seen[key]}")
        seen[key] = i
        raw_wheels = rp.get("wheels")
        if not isinstance(raw_wheels, list) or not raw_wheels:
            raise _bad(path, where, "it lists no wheels (expected one or more [[packages.wheels]])")
        wheels = tuple(_validate_wheel(path, f"{where}, wheel #{j}", rw, name, version)
                       for j, rw in enumerate(raw_wheels, 1))
        names = [w.name for w in wheels]
        if len(set(names)) != len(names):
            raise _bad(path, where, "the same wheel file name is listed twice")
        pkgs.append(LockedPackage(name=name, version=version, wheels=wheels))
    return Lock(path=path, packages=tuple(pkgs), lock_version=lv)


def _validate_wheel(path: Path, where: str, rw: object, pkg: str, version: str) -> LockedWheel:
    if not isinstance(rw, dict):
        raise _bad(path, where, "is not a table")
    fname, url, size, hashes = rw.get("name"), rw.get("url"), rw.get("size"), rw.get("hashes")
    if not isinstance(fname, str) or not fname:
        raise _bad(path, where, "name (the wheel file name) is missing")
    if "/" in fname or "\\" in fname or fname.startswith("."):
        raise _bad(path, where, f"name {fname!r} must be a bare file name")
    try:
        wname, wver, _, _ = parse_wheel_filename(fname)
    except InvalidWheelFilename as exc:
        raise _bad(path, where, f"name {fname!r} is not a wheel file name ({exc})") from None
    # The file name must describe the pinned distribution, or tag selection and the
    # METADATA check would be judging some other build.
    if wname != canonicalize_name(pkg) or wver != Version(version):
        raise _bad(path, where, f"wheel {fname!r} is {wname} {wver}, but the package pins {pkg} {version}")
    if not isinstance(url, str) or not url:
        raise _bad(path, where, "url is missing")
    problem = url_problem(url)
    if problem:
        raise _bad(path, where, problem)
    if not isinstance(hashes, dict) or "sha256" not in hashes:
        raise _bad(path, where, "hashes.sha256 is missing (every wheel must be pinned by sha256)")
    sha = hashes["sha256"]
    if not isinstance(sha, str) or not _SHA256_RE.match(sha.lower()):
        raise _bad(path, where, f"hashes.sha256 {sha!r} is not 64 hexadecimal digits")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise _bad(path, where, f"size {size!r} is not a non-negative integer")
    return LockedWheel(name=fname, url=url, sha256=sha.lower(), size=size)


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_problem(url: str) -> str | None:
    """Why `url` may not be pinned, or None. https anywhere; http only to this machine
    (a test server or a local mirror on loopback: plain http elsewhere is open to
    substitution, and although the hash would catch it, a clean refusal up front is clearer);
    file:// for air-gapped use."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError as exc:
        return f"url {url!r} is malformed ({exc})"
    scheme = parts.scheme.lower()
    if parts.username or parts.password:
        return (f"url {url!r} carries credentials; keep them out of the lock and let requests "
                f"read them from ~/.netrc")
    if scheme == "https":
        return None if host else f"url {url!r} has no host"
    if scheme == "http":
        if _is_loopback(host):
            return None
        return (f"url {url!r} uses plain http to a host other than this machine; use https "
                f"(plain http is only accepted for 127.0.0.1, ::1 or localhost)")
    if scheme == "file":
        if host and host != "localhost":
            return f"url {url!r} names a remote host in a file:// URL; use file:///absolute/path"
        if not parts.path.startswith("/"):
            return f"url {url!r} is not an absolute file:// URL"
        return None
    return f"url {url!r} has scheme {scheme or '(none)'!r}; only https, file and loopback http are accepted"


def url_filename(url: str) -> str:
    """The percent-decoded last path segment of a URL (what a wheel URL names)."""
    return unquote(urlsplit(url).path.rsplit("/", 1)[-1])


# --------------------------------------------------------------------------------- writing
#
# `m3fuse lock add` edits the file a person maintains, so it keeps that file's comments and
# order: the text is cut into a head and blocks (one per `[[packages]]` / `[[packages.wheels]]`
# header, each block taking the comment lines just above its header) and only the lines of
# the entries that change are rewritten. New entries are rendered by the tiny writer below,
# which only knows this fixed schema.

_PKG_HDR = re.compile(r"^\s*\[\[\s*packages\s*\]\]\s*(#.*)?$")
_WHL_HDR = re.compile(r"^\s*\[\[\s*packages\s*\.\s*wheels\s*\]\]\s*(#.*)?$")


def toml_str(s: str) -> str:
    # JSON string escapes (\", \\, \n, \uXXXX, ...) are all valid TOML basic-string escapes;
    # JSON leaves DEL raw, which TOML forbids (found by the round-trip property test).
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def render_wheel(w: LockedWheel) -> list[str]:
    lines = ["[[packages.wheels]]", f"name = {toml_str(w.name)}", f"url = {toml_str(w.url)}"]
    if w.size is not None:
        lines.append(f"size = {w.size}")
    lines.append(f"hashes = {{ sha256 = {toml_str(w.sha256)} }}")
    return lines


def render_package(p: LockedPackage) -> list[str]:
    lines = ["[[packages]]", f"name = {toml_str(p.name)}", f"version = {toml_str(p.version)}"]
    for w in p.wheels:
        lines += [""] + render_wheel(w)
    return lines


def render_lock(packages: list[LockedPackage] | tuple[LockedPackage, ...], header: str = "") -> str:
    out = [ln for ln in header.splitlines()] + [f"lock-version = {toml_str(LOCK_VERSION)}"]
    for p in packages:
        out += [""] + render_package(p)
    return "\n".join(out) + "\n"


@dataclass
class _Block:
    kind: str  # "pkg" | "whl"
    lines: list[str]


def _split(text: str) -> tuple[list[str], list[_Block]]:
    head: list[str] = []
    blocks: list[_Block] = []
    # Split on "\n" only: str.splitlines() also breaks at U+0085, U+2028 ..., which TOML
    # allows raw inside strings (found by the round-trip property test).
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for line in lines:
        line = line[:-1] if line.endswith("\r") else line
        kind = "pkg" if _PKG_HDR.match(line) else "whl" if _WHL_HDR.match(line) else None
        if kind is None:
            (blocks[-1].lines if blocks else head).append(line)
            continue
        prev = blocks[-1].lines if blocks else head
        # Comment lines directly above a header describe the entry that follows.
        k = len(prev)
        while k > 0 and prev[k - 1].lstrip().startswith("#"):
            k -= 1
        lead = prev[k:]
        del prev[k:]
        blocks.append(_Block(kind, lead + [line]))
    return head, blocks


def _key_of(line: str) -> str | None:
    m = re.match(r"^\s*([A-Za-z0-9_-]+)\s*=", line)
    return m.group(1) if m else None


def _set_key(block: _Block, key: str, value_toml: str | None) -> None:
    """Set (or with None, drop) a simple `key = value` line in a block, in place."""
    idx = next((i for i, ln in enumerate(block.lines) if _key_of(ln) == key), None)
    if value_toml is None:
        if idx is not None:
            del block.lines[idx]
        return
    new = f"{key} = {value_toml}"
    if idx is not None:
        block.lines[idx] = new
        return
    # A new size goes above the hashes line (the order render_wheel uses); anything else
    # after the last key line, before trailing blank/comment lines.
    hashes = next((i for i, ln in enumerate(block.lines) if _key_of(ln) == "hashes"), None)
    if key == "size" and hashes is not None:
        block.lines.insert(hashes, new)
        return
    last = max((i for i, ln in enumerate(block.lines) if _key_of(ln) or ln.strip().startswith("[[")), default=0)
    block.lines.insert(last + 1, new)


def _block_value(block: _Block, key: str) -> object:
    try:
        d = _toml.loads("\n".join(ln for ln in block.lines if _key_of(ln)))
    except _toml.TOMLDecodeError:
        return None
    return d.get(key)


def add_wheel(path: Path, name: str, version: str, wheel: LockedWheel) -> str:
    """Add or update the pin of `name` to `version` with `wheel`; returns what was done
    ("added", "updated", "unchanged"). Same version: the wheel with this file name is
    replaced or a new one appended (several wheels per package are allowed). Another version:
    the package's wheels are replaced by this one. The result is re-parsed before it replaces
    the file, so a bad edit never lands."""
    path = Path(path)
    problem = url_problem(wheel.url)
    if problem:
        raise _bad(path, f"new wheel {wheel.name}", problem)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if text.strip():
        before = parse_lock(text, path)  # refuse to edit a lock that is already broken
    else:
        before = Lock(path=path)
        text = render_lock([], header="# Pinned wheels for m3fuse; see docs/wheels.md.")
    head, blocks = _split(text)

    # Group blocks into packages: a pkg block followed by its whl blocks.
    groups: list[list[_Block]] = []
    for b in blocks:
        if b.kind == "pkg" or not groups:
            groups.append([b])
        else:
            groups[-1].append(b)
    key = canonicalize_name(name)
    target = next((g for g in groups if g[0].kind == "pkg" and isinstance(_block_value(g[0], "name"), str)
                   and canonicalize_name(_block_value(g[0], "name")) == key), None)  # type: ignore[arg-type]
    new_wblock = _Block("whl", render_wheel(wheel))
    old = before.package(name)
    if target is None:
        pkg_lines = ["[[packages]]", f"name = {toml_str(name)}", f"version = {toml_str(version)}"]
        groups.append([_Block("pkg", pkg_lines), new_wblock])
        action = "added"
    else:
        same_version = old is not None and Version(old.version) == Version(version)
        if not same_version:
            _set_key(target[0], "version", toml_str(version))
            del target[1:]
            target.append(new_wblock)
            action = "updated"
        else:
            idx = next((i for i, b in enumerate(target) if b.kind == "whl" and _block_value(b, "name") == wheel.name), None)
            if idx is None:
                target.append(new_wblock)
                action = "added"
            else:
                wb = target[idx]
                prior = old.wheels[[w.name for w in old.wheels].index(wheel.name)] if old else None
                if prior == wheel:
                    return "unchanged"
                _set_key(wb, "url", toml_str(wheel.url))
                _set_key(wb, "size", None if wheel.size is None else str(wheel.size))
                _set_key(wb, "hashes", f"{{ sha256 = {toml_str(wheel.sha256)} }}")
                action = "updated"
    lines = list(head)
    for g in groups:
        for b in g:
            # Keep a blank line between entries (new blocks carry none of their own).
            if lines and lines[-1].strip() and b.lines[0].strip():
                lines.append("")
            lines.extend(b.lines)
    out = "\n".join(lines).rstrip("\n") + "\n"
    after = parse_lock(out, path)
    got = after.package(name)
    if got is None or wheel not in got.wheels:  # pragma: no cover - guards the writer itself
        raise _bad(path, name, "internal error: the rewritten lock does not hold the new pin; the file was left as it was")
    _atomic_write(path, out)
    return action


def set_size(path: Path, wheel_name: str, size: int) -> None:
    """Record a verified size for a wheel already in the lock (used by `lock check --write-sizes`)."""
    lock = load_lock(path)
    for p in lock.packages:
        for w in p.wheels:
            if w.name == wheel_name:
                add_wheel(path, p.name, p.version, LockedWheel(w.name, w.url, w.sha256, size))
                return
    raise _bad(Path(path), wheel_name, "no such wheel in the lock")


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
