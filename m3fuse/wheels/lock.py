"""`wheels.lock`: read, validate and (for `m3fuse lock add`) edit the wheel pins.

The file is a PEP 751 lock (`pylock.toml`); a copy named `pylock.m3fuse.toml` installs with
pip 26.1+ (`pip install -r`) or uv (`uv pip install -r`)::

    lock-version = "1.0"
    created-by = "m3fuse"

    [[packages]]
    name = "flydsl"
    version = "0.1.9.dev20260529+d7ae22d"

    [[packages.wheels]]
    name = "flydsl-0.1.9.dev20260529+d7ae22d-cp312-cp312-manylinux_2_27_x86_64.whl"
    url = "https://.../flydsl-0.1.9.dev20260529%2Bd7ae22d-cp312-cp312-manylinux_2_27_x86_64.whl"
    size = 123456            # optional
    hashes = { sha256 = "..." }

Packages install in file order. A package may list several wheels (one per Python version,
say); `select_wheel` picks the one the target interpreter's tags rank best.

A lock passes two gates: packaging's own PEP 751 validator (`Pylock.from_dict`), and the
checks the spec does not make (sha256 on every wheel and of the right shape, the URL policy,
one pin per distribution). Refusals are m3fuse's errors: file, entry, what is wrong, what to
do. Reading never imports `requests`, and `m3fuse verify --no-wheels` never imports this module.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from .. import safeio
from .. import tomlread as _toml
from ..errors import UsageProblem

if TYPE_CHECKING:
    from packaging.tags import Tag

LOCK_VERSION = "1.0"
CREATED_BY = "m3fuse"
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
    # [packages.tool] as read (tool name -> its table); m3fuse's own facts about the pinned
    # build live under "m3fuse" (wheels/fit.py reads and validates them).
    tool: dict = field(default_factory=dict, compare=False, hash=False)

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


def select_wheel(pkg: LockedPackage, tags: Sequence[Tag]) -> LockedWheel | None:
    """The wheel of `pkg` that `tags` (the target's, most preferred first) rank best, chosen
    by packaging's own tag selector (what `Pylock.select` uses); None when none fits."""
    from packaging.tags import create_compatible_tags_selector

    best = create_compatible_tags_selector(tags)((w, parse_wheel_filename(w.name)[-1]) for w in pkg.wheels)
    return next(best, None)


# --------------------------------------------------------------------------------- reading


def load_lock(path: Path, *, spec: bool = True, stamps: Path | None = None) -> Lock:
    """Read and validate a lock. spec=False skips packaging's PEP 751 validator (only
    `verify`, which reads the pins and must stay fast, does that; install, fetch and lock
    always validate). With `stamps` (a folder in the wheel cache), a text the validator has
    passed before, under the same packaging version, is not validated again: importing
    packaging.pylock costs more than the rest of an idempotent install's wheel step."""
    path = Path(path)
    text = read_lock_text(path)
    return parse_lock(text, path, spec=spec, stamps=stamps)


def read_lock_text(path: Path) -> str:
    """The lock's text: a regular UTF-8 file of at most safeio.MAX_LOCK bytes (a device, a FIFO
    or a huge file is refused before it is read)."""
    try:
        return safeio.read_regular(path, safeio.MAX_LOCK).decode("utf-8")
    except FileNotFoundError:
        raise LockError(headline="the wheel lock does not exist", details=[("file", str(path))],
                        hint=f"pass an existing lock with --lock FILE, or create one with "
                             f"`m3fuse lock add URL|FILE --lock {path}`") from None
    except safeio.Unsafe as exc:
        raise LockError(headline="the wheel lock is refused", details=[("file", str(path)), ("problem", exc.reason)],
                        hint="a lock is a small TOML text file; pass one with --lock FILE") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LockError(headline="the wheel lock cannot be read", details=[("file", str(path)), ("error", str(exc))],
                        hint="check the path and its permissions, or pass another lock with --lock FILE") from None


def parse_lock(text: str, path: Path, *, spec: bool = True, stamps: Path | None = None) -> Lock:
    path = Path(path)
    try:
        data = _toml.loads(text)
    except _toml.TOMLDecodeError as exc:
        raise LockError(headline="the wheel lock is not valid TOML", details=[("file", str(path)), ("error", str(exc))],
                        hint="fix the file by hand or restore it from version control; nothing was "
                             "downloaded or installed") from None
    lock = _validate(data, path)
    if spec:
        stamp = _stamp(stamps, text)
        if stamp is None or not stamp.is_file():
            _validate_spec(data, path)
            _write_stamp(stamp)
    return lock


def _stamp(folder: Path | None, text: str) -> Path | None:
    if folder is None:
        return None
    import hashlib

    import packaging  # the package's __init__ only: its version

    key = hashlib.sha256(f"{packaging.__version__}\0{text}".encode()).hexdigest()
    return Path(folder) / key


def _write_stamp(stamp: Path | None) -> None:
    if stamp is None:
        return
    from .. import ownedpaths, safeio

    try:  # best effort: an unwritable or refused cache only means validating again next time
        # m3fuse passes a folder checked as the cache's own (FetchConfig.lock_stamps); it is
        # checked again from / down and the stamp written relative to it, no link followed.
        ownedpaths.write_into(stamp.parent, stamp.name, b"")
    except (OSError, safeio.Unsafe):
        pass


def _bad(path: Path, where: str, problem: str) -> LockError:
    return LockError(headline=f"the wheel lock is refused: {problem}; nothing was downloaded or installed",
                     details=[("file", str(path)), ("entry", where)],
                     hint=f"fix that entry, or re-create it: `m3fuse lock add URL|FILE --lock {path}`")


def _validate_spec(data: dict, path: Path) -> None:
    """packaging's PEP 751 validator, its findings worded as m3fuse's."""
    from packaging.pylock import Pylock, PylockValidationError

    try:
        Pylock.from_dict(data)
    except PylockValidationError as exc:
        key = exc.context or "top level"
        problem = f"{exc.message} (PEP 751)"
        if key == "created-by":
            problem = f'created-by is missing; PEP 751 requires it (add created-by = "{CREATED_BY}" at the top level)'
        raise _bad(path, key, problem) from None


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
        tool = rp.get("tool", {})
        if not isinstance(tool, dict):
            raise _bad(path, where, "tool must be a table ([packages.tool])")
        pkgs.append(LockedPackage(name=name, version=version, wheels=wheels, tool=tool))
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
    import ipaddress  # only plain-http URLs need it

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
# `m3fuse lock add` edits the file a person maintains. tomlkit keeps its comments, order and
# layout; the one thing it gets wrong here is ownership of the comment lines just above a
# `[[packages]]` header: it files them at the end of the table before, so a key or table
# appended there would land below the comment that describes the *next* entry. _Trailer moves
# those lines out of the way during an edit and puts them back after it.


class _Trailer:
    """The comment/blank lines at the end of a table's body (they describe the next header)."""

    def __init__(self, table: object) -> None:
        body = table.value.body  # type: ignore[attr-defined]
        self.items = []
        while body and body[-1][0] is None:
            self.items.insert(0, body.pop()[1])

    def restore(self, table: object) -> None:
        for item in self.items:
            table.add(item)  # type: ignore[attr-defined]


def _append_table(seq, new, prev, last_of) -> None:  # noqa: ANN001 - tomlkit objects
    """Append `new` to the array of tables `seq`, after `prev` (the table whose body ends
    where seq ends), with prev's trailing comments moved below it (they describe whatever
    header comes next)."""
    trailer = _Trailer(prev) if prev is not None else None
    seq.append(new)
    if trailer:
        trailer.restore(last_of(new))


def _new_doc():  # noqa: ANN202 - a tomlkit document
    import tomlkit

    doc = tomlkit.document()
    doc.add(tomlkit.comment("Pinned wheels for m3fuse; see docs/wheels.md."))
    doc["lock-version"] = LOCK_VERSION
    doc["created-by"] = CREATED_BY
    return doc


_HEADER = re.compile(r"^\s*\[\[")
_LOCK_VERSION_LINE = re.compile(r"^lock-version\s*=.*$", re.MULTILINE)


def _tidy(text: str) -> str:
    """One blank line before each entry (its header, or the comment block just above it):
    tomlkit writes new tables flush against the previous one."""
    lines = text.rstrip("\n").split("\n")
    out: list[str] = []
    for line in lines:
        if _HEADER.match(line):
            k = len(out)
            while k > 0 and out[k - 1].lstrip().startswith("#"):
                k -= 1
            if k > 0 and out[k - 1].strip():
                out.insert(k, "")
        out.append(line)
    return "\n".join(out) + "\n"


def _wheel_table(w: LockedWheel):  # noqa: ANN202 - a tomlkit table
    import tomlkit

    t = tomlkit.table()
    t["name"] = w.name
    t["url"] = w.url
    if w.size is not None:
        t["size"] = w.size
    t["hashes"] = _hashes(w.sha256)
    return t


def _hashes(sha: str):  # noqa: ANN202
    import tomlkit

    # Parsed rather than built, so the inline table keeps the file's `{ sha256 = "..." }` spacing.
    return tomlkit.parse(f'h = {{ sha256 = "{sha}" }}')["h"]


def _last_table(pkg):  # noqa: ANN001,ANN202 - the table whose body ends where pkg's entry ends
    wheels = pkg.get("wheels")
    return wheels[-1] if wheels is not None and len(wheels) else pkg


def _package_table(name: str, version: str, wheels: Sequence[LockedWheel]):  # noqa: ANN202
    import tomlkit

    t = tomlkit.table()
    t["name"] = name
    t["version"] = version
    aot = tomlkit.aot()
    for w in wheels:
        aot.append(_wheel_table(w))
    t["wheels"] = aot
    return t


def add_wheel(path: Path, name: str, version: str, wheel: LockedWheel, *, facts: dict | None = None) -> str:
    """Add or update the pin of `name` to `version` with `wheel`; returns what was done
    ("added", "updated", "unchanged"). Same version: the wheel with this file name is
    replaced or a new one appended (several wheels per package are allowed). Another version:
    the package's wheels are replaced by this one. `facts` (wheels/fit.py) replace the
    package's [packages.tool.m3fuse]. The result is re-validated before it replaces the file,
    so a bad edit never lands."""
    import tomlkit

    path = Path(path)
    problem = url_problem(wheel.url)
    if problem:
        raise _bad(path, f"new wheel {wheel.name}", problem)
    text = read_lock_text(path) if os.path.lexists(path) else ""
    if text.strip():
        # Refuse to edit a lock that is already broken; a missing created-by (locks written
        # before m3fuse followed PEP 751 fully) is the one thing an edit repairs.
        before = parse_lock(text, path, spec=False)
        if "created-by" not in _toml.loads(text):
            text = _LOCK_VERSION_LINE.sub(lambda m: f'{m.group(0)}\ncreated-by = "{CREATED_BY}"', text, count=1)
        doc = tomlkit.parse(text)
    else:
        before, doc = Lock(path=path), _new_doc()
    key = canonicalize_name(name)
    pkgs = doc.get("packages")
    target = next((p for p in (pkgs or []) if canonicalize_name(str(p.get("name", ""))) == key), None)
    old = before.package(name)
    if target is None:
        if pkgs is None:
            doc["packages"] = pkgs = tomlkit.aot()
        _append_table(pkgs, _package_table(name, version, [wheel]), _last_table(pkgs[-1]) if len(pkgs) else None,
                      _last_table)
        action = "added"
    elif old is None or Version(old.version) != Version(version):
        trailer = _Trailer(_last_table(target))
        target["version"] = version
        target["wheels"].clear()
        _append_table(target["wheels"], _wheel_table(wheel), None, lambda t: t)
        trailer.restore(_last_table(target))
        action = "updated"
    else:
        wheels = target["wheels"]
        wt = next((w for w in wheels if w.get("name") == wheel.name), None)
        if wt is None:
            _append_table(wheels, _wheel_table(wheel), wheels[-1], lambda t: t)
            action = "added"
        else:
            if old.wheels[[w.name for w in old.wheels].index(wheel.name)] == wheel:
                return "unchanged"
            wt["url"] = wheel.url
            hashes = wt["hashes"]
            if wheel.size is None:
                wt.pop("size", None)
            elif "size" in wt:
                wt["size"] = wheel.size
            else:
                # size goes above hashes (the order the spec's examples use): take hashes
                # out, add size, put hashes back, with the lines around it where they were.
                trailer = _Trailer(wt)
                del wt["hashes"]
                wt["size"] = wheel.size
                wt["hashes"] = hashes
                trailer.restore(wt)
            wt["hashes"] = _hashes(wheel.sha256)
            action = "updated"
    if facts is not None:
        pkg_table = next(p for p in doc["packages"] if canonicalize_name(str(p.get("name", ""))) == key)
        tool = pkg_table.get("tool")
        if tool is None:
            pkg_table["tool"] = tool = tomlkit.table(is_super_table=True)
        tool["m3fuse"] = facts
    out = _tidy(tomlkit.dumps(doc))
    after = parse_lock(out, path)
    got = after.package(name)
    if got is None or wheel not in got.wheels:  # pragma: no cover - guards the edit itself
        raise _bad(path, name, "internal error: the edited lock does not hold the new pin; the file was left as it was")
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
    import tempfile

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
