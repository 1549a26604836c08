"""Download pinned wheels into a content-addressed cache, verifying size and sha256.

Only bytes whose sha256 equals the pin ever reach the cache proper
(`<cache>/wheels/sha256/<aa>/<full-hash>/<wheel file name>`); a download in progress lives in
`<cache>/tmp/` and is deleted on any failure. A cached file is re-hashed before every use, so
a file damaged on disk is noticed, dropped and fetched again.

This module never imports `requests` itself before a network download: `m3fuse verify` and
an idempotent install never load it (an install with wheels to put in warms it in a thread
while it waits on the target interpreter, see wheels/step.py).
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None  # type: ignore[assignment]

from .. import resources
from .. import ownedpaths, safeio
from ..errors import EnvironmentProblem, IntegrityError, M3fuseError, RedirectRefused, Row
from ..fingerprint import hash_file
from .lock import LockedWheel

CHUNK = 1 << 20  # reads, hashing and writes
NET_CHUNK = 1 << 18  # the decoding fallback only (content-encoded bodies): a read cut short there
# loses its whole chunk (urllib3 raises instead of returning the partial read)
USER_AGENT = "m3fuse (wheel fetch)"
# A download whose lock entry pins no size stops here (docs/reliability.md). The largest wheel
# m3fuse pins (AITER for ROCm) is a few hundred MB; an endless body must not fill the disk.
MAX_WHEEL_BYTES = 2 << 30
CEILING_VAR = "M3FUSE_MAX_WHEEL_BYTES"  # raises (or lowers) it, for a wheel larger than that


DEFAULT_DEADLINE_S = 3600.0  # an hour: a few hundred MB even over a slow link
DEADLINE_VAR = "M3FUSE_DOWNLOAD_DEADLINE"


def deadline_seconds(given: float | None = None) -> float:
    """The overall deadline of one wheel's download: `given` (the option), else $M3FUSE_DOWNLOAD_DEADLINE,
    else an hour. A value that is not a positive number of seconds is a usage error."""
    if given is None:
        raw = os.environ.get(DEADLINE_VAR, "").strip()
        if not raw:
            return DEFAULT_DEADLINE_S
        try:
            given = float(raw)
        except ValueError:
            given = -1.0
        where = f"{DEADLINE_VAR}={raw!r}"
    else:
        where = f"--download-deadline {given:g}"
    if not (given > 0 and given != float("inf")):
        from ..errors import UsageProblem

        raise UsageProblem(f"{where}: the download deadline is a positive number of seconds (e.g. 1800).")
    return float(given)


def max_wheel_bytes() -> int:
    value = os.environ.get(CEILING_VAR, "")
    return int(value) if value.isdigit() and int(value) > 0 else MAX_WHEEL_BYTES


def _quiet(_: str) -> None:
    pass


@dataclass
class FetchConfig:
    cache_dir: Path | None = None
    find_links: list[Path] = field(default_factory=list)
    retries: int = 4  # extra attempts after the first
    backoff: float = 2.0  # seconds; doubles per attempt (2, 4, 8, ...), capped at backoff_max
    backoff_max: float = 30.0
    connect_timeout: float = 15.0
    read_timeout: float = 60.0  # longest silence tolerated mid-body
    # The whole download of one wheel, retries and waits included: a server trickling a byte
    # now and then never trips read_timeout, so this ends it (--download-deadline, DEADLINE_VAR).
    deadline: float | None = None  # None: deadline_seconds()
    progress: bool | None = None  # None: a bar when stderr is a terminal; False: never
    echo: Callable[[str], None] = _quiet

    def cache_root(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else default_cache_dir()

    def lock_stamps(self) -> Path | None:
        """Where the lock texts packaging's PEP 751 validator has passed are remembered: a
        checked folder of the cache, or None when the cache is refused (the lock is then
        validated in full; the refusal itself comes with the first wheel the cache is asked for)."""
        try:
            return self.owned("validated-locks")
        except M3fuseError:
            return None

    def owned(self, *parts: str) -> Path:
        """cache_root()/parts, created 0700 where missing, refused (UnsafePath) when any of
        its folders is a symlink, another user's, or writable by others (docs/reliability.md)."""
        root = self.cache_root()
        try:
            # Every folder from / down is checked, not only the cache's parent (ownedpaths.py).
            got = ownedpaths.own_dir(root, *parts)
            assert got is not None
            return got
        except safeio.Unsafe as exc:
            raise safeio.refusal(exc, nothing="nothing was downloaded or installed",
                                 hint=f"pass a folder only you can write with --cache-dir DIR, or set XDG_CACHE_HOME "
                                      f"(cache: {root})") from None


def default_cache_dir() -> Path:
    return resources.cache_dir()


def cache_path(root: Path, wheel: LockedWheel) -> Path:
    # Content-addressed by the pin; the file keeps its wheel name because pip reads the tags
    # and the distribution from the file name.
    return root / "wheels" / "sha256" / wheel.sha256[:2] / wheel.sha256 / wheel.name


MISMATCH_HEADLINE = "THESE FILES DO NOT MATCH THE HASHES IN THE LOCK"  # pip's words for the same failure


def mismatch_rows(wheel: LockedWheel, source: str, got_sha: str, got_size: int, *, reveal: bool = True) -> list[Row]:
    """One wheel's expected/got rows, and what the size says about the difference. With
    reveal=False (a local file outside m3fuse's own folders) its hash and size are not shown:
    a lock entry must not turn m3fuse into a reader of other files' fingerprints."""
    if not reveal:
        # One sentence whatever the file is: neither its hash nor its size, nor how its size
        # compares with the pin (a lock naming /etc/shadow would otherwise learn its length).
        return [("", wheel.name), ("from", source), ("expected", f"sha256 {wheel.sha256}"),
                ("got", "another file (its hash, its size and how that compares with the pin are not shown: it is "
                        "not named like the wheel, so it is not m3fuse's to describe)")]
    if wheel.size is not None and got_size != wheel.size:
        size = (f"expected {wheel.size} bytes, got {got_size}: "
                + ("the file is truncated, so the transfer was cut short" if got_size < wheel.size
                   else "the file is larger than pinned, so it is a different file"))
    elif wheel.size is not None:
        size = f"right ({got_size} bytes): the size is right, so the content itself differs (a different or tampered file)"
    else:
        size = f"the lock pins no size; {got_size} bytes were received"
    return [("", wheel.name), ("from", source), ("expected", f"sha256 {wheel.sha256}"),
            ("got", f"sha256 {got_sha}"), ("size", size)]


def mismatch_error(rows: list[Row], *, removed: bool = True) -> IntegrityError:
    return IntegrityError(
        headline=MISMATCH_HEADLINE + ("; the bad file was deleted and nothing was installed" if removed
                                      else "; nothing was installed"),
        details=rows,
        hint="do not install it; fetch it from a trusted source, or re-pin an intended build: `m3fuse lock add`")


def _bar(label: str, total: int | None, have: int, show: bool | None):  # noqa: ANN202 - click's bar or None
    """click's progress bar when stderr is a terminal; None when it is not or show is False
    (the caller echoes plain lines)."""
    if show is False or not sys.stderr.isatty():
        return None
    import click

    # click needs a length or an iterable: with neither size known (no Content-Length, no pinned
    # size) an empty generator, which has no length hint, gets its bar of unknown length.
    bar = click.progressbar(None if total is not None else (_ for _ in ()), length=total, label=f"  {label[:40]}",
                            file=sys.stderr, show_pos=False,
                            show_percent=total is not None, width=30)
    bar.__enter__()
    if have:
        bar.update(have)
    return bar


class _Pump:
    """Reads a response body into rotating buffers while a worker thread hashes and writes
    the buffer read before (sha256 and file writes release the GIL, so on two cores the
    three overlap). `done` counts the bytes hashed and written, also after a failed read,
    so a retry resumes exactly there."""

    BUFFERS = 4

    def __init__(self, f, h) -> None:  # noqa: ANN001 - a binary file, a hashlib object
        import queue
        import threading

        self.f, self.h, self.done = f, h, 0
        self.free: queue.Queue = queue.Queue()
        self.full: queue.Queue = queue.Queue()
        for _ in range(self.BUFFERS):
            self.free.put(bytearray(CHUNK))
        self.error: BaseException | None = None
        self.worker = threading.Thread(target=self._work, name="m3fuse-hash-write", daemon=True)
        self.worker.start()

    def _work(self) -> None:
        while (item := self.full.get()) is not None:
            buf, n = item
            if self.error is None:
                try:
                    mv = memoryview(buf)[:n]
                    self.h.update(mv)
                    self.f.write(mv)
                    self.done += n
                except BaseException as exc:  # noqa: BLE001 - re-raised by run()
                    self.error = exc
            self.free.put(buf)

    def run(self, readinto, limit: int | None, progress) -> None:  # noqa: ANN001
        """Read until EOF (or past `limit` bytes in all); re-raises a read error only after
        every byte read before it is hashed and written."""
        read = 0
        try:
            while self.error is None:
                buf = self.free.get()
                n = readinto(buf)
                if not n:
                    self.free.put(buf)
                    break
                self.full.put((buf, n))
                read += n
                if progress is not None:
                    progress.update(n)
                if limit is not None and read > limit:
                    break
        finally:
            self.full.put(None)
            self.worker.join()
        if self.error is not None:
            raise self.error


def _readinto(resp):  # noqa: ANN001,ANN202
    """The lowest-level reader of the body that still gets it right: http.client's readinto
    straight into our buffer (no copy, and a dropped connection keeps its partial read) when
    the body is not content-encoded; otherwise requests' decoding iterator."""
    fp = getattr(resp.raw, "_fp", None)
    if fp is not None and hasattr(fp, "readinto") and resp.headers.get("Content-Encoding", "identity") == "identity":
        return fp.readinto
    chunks = resp.iter_content(NET_CHUNK)

    def from_iter(buf: bytearray) -> int:
        for chunk in chunks:
            if chunk:
                buf[:len(chunk)] = chunk
                return len(chunk)
        return 0

    return from_iter


class _Retry(Exception):
    """A transient failure: the attempt may be repeated (resuming where possible)."""


def local_source(wheel: LockedWheel, cfg: FetchConfig) -> Path | None:
    """A local file to read the wheel from: a --find-links folder first, then a file:// URL."""
    for d in cfg.find_links:
        cand = Path(d) / wheel.name
        if cand.is_file():
            return cand
    parts = urlsplit(wheel.url)
    if parts.scheme.lower() == "file":
        from urllib.request import url2pathname  # imports http.client: only for file:// pins

        return Path(url2pathname(parts.path))
    return None


def cached(wheel: LockedWheel, cfg: FetchConfig) -> Path | None:
    """The cached file if present and still matching its pin (re-hashed now); a damaged one
    is deleted so it is fetched again."""
    folder = cfg.owned("wheels", "sha256", wheel.sha256[:2], wheel.sha256)
    path = folder / wheel.name
    try:
        sha, size = hash_file(path, wheel.size if wheel.size is not None else max_wheel_bytes())
    except FileNotFoundError:
        return None
    except (OSError, safeio.Unsafe):
        sha, size = "(unreadable or not a regular file)", -1
    if sha == wheel.sha256 and (wheel.size is None or size == wheel.size):
        return path
    cfg.echo(f"cached {path} no longer matches its pin (sha256 {sha}, {size} bytes); deleting it and fetching again")
    _unlink(path)
    return None


def obtain(wheel: LockedWheel, cfg: FetchConfig, *, allow_network: bool = True) -> Path | None:
    """Return the path of a verified copy of `wheel` in the cache, fetching it if needed.
    With allow_network=False a wheel that is neither cached nor local yields None."""
    hit = cached(wheel, cfg)
    if hit:
        cfg.echo(f"{wheel.name}: cached, sha256 ok")
        return hit
    local = local_source(wheel, cfg)
    if local is not None:
        return _from_local(wheel, local, cfg)
    if not allow_network:
        return None
    return _download_verified(wheel, cfg)


STALE_PART_S = 24 * 3600
# Each partial download is flock'ed by the run writing it, for as long as it exists. The
# kernel drops the lock when that run ends, killed or not, so any .part nobody holds is a
# leftover and is removed at once; STALE_PART_S remains as a fallback where flock is absent.
_HELD: dict[str, int] = {}


def _writer_alive(p: Path) -> bool:
    """True if another process holds the flock of this partial download (it is writing it)."""
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # also releases the probe's own lock
    return False


def _tmp_dir(cfg: FetchConfig) -> Path:
    tmp = cfg.owned("tmp")  # m3fuse's own folder (checked): no link can point the cleanup elsewhere
    # A killed run cannot clean up after itself: drop every partial file no live run holds.
    # Only regular files are touched, each unlinked relative to the checked folder.
    now = time.time()
    try:
        with safeio.walk_down(tmp, []) as dfd:
            for name in os.listdir(dfd):
                p = tmp / name
                if not name.endswith(".part") or str(p) in _HELD:
                    continue
                try:
                    st = os.lstat(name, dir_fd=dfd)
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    if fcntl is not None:
                        if not _writer_alive(p):
                            safeio.unlink_at(dfd, name)
                    elif now - st.st_mtime > STALE_PART_S:
                        safeio.unlink_at(dfd, name)
                except OSError:
                    pass
    except OSError:
        pass
    return tmp


def _new_temp(cfg: FetchConfig, wheel: LockedWheel) -> Path:
    fd, name = tempfile.mkstemp(prefix=f"{wheel.sha256[:16]}-", suffix=".part", dir=_tmp_dir(cfg))
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when this run ends, however it ends
        _HELD[name] = fd
    else:
        os.close(fd)
    return Path(name)


def _release(tmp: Path) -> None:
    fd = _HELD.pop(str(tmp), None)
    if fd is not None:
        os.close(fd)


def _writer(tmp: Path):  # noqa: ANN202 - a binary file object
    """A file object writing the partial download through the descriptor it was created with
    (never reopened by name: a name swapped for a symlink cannot redirect the bytes)."""
    fd = _HELD.get(str(tmp))
    if fd is not None:
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        return open(fd, "wb", closefd=False)
    return os.fdopen(os.open(tmp, os.O_WRONLY | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)), "wb")


def _publish(tmp: Path, wheel: LockedWheel, cfg: FetchConfig) -> Path:
    final = cfg.owned("wheels", "sha256", wheel.sha256[:2], wheel.sha256) / wheel.name
    fd = _HELD.get(str(tmp))
    if fd is not None:
        # The name must still be the file the verified bytes went into (the folder is ours,
        # but another process of this user could have swapped the name).
        fst = os.fstat(fd)
        try:
            lst = os.lstat(tmp)
        except FileNotFoundError:
            lst = None
        if lst is None or not stat.S_ISREG(lst.st_mode) or (lst.st_dev, lst.st_ino) != (fst.st_dev, fst.st_ino):
            raise safeio.refusal(safeio.Unsafe(tmp, "was replaced while the download was written into it"),
                                 nothing="nothing was cached or installed",
                                 hint="something else writes into m3fuse's cache folder; stop it, then run again")
        os.fchmod(fd, 0o644)
    else:
        os.chmod(tmp, 0o644)
    os.replace(tmp, final)  # same filesystem: atomic; a concurrent run writes identical bytes
    return final


def _unlink(p: Path) -> None:
    try:
        p.unlink()
    except FileNotFoundError:
        pass
    _release(p)


def _from_local(wheel: LockedWheel, src: Path, cfg: FetchConfig) -> Path:
    """Copy a local file into the cache, hashing in the same pass (so what is verified is
    exactly what gets installed, even if the source changes afterwards)."""
    limit = wheel.size if wheel.size is not None else max_wheel_bytes()
    tmp = _new_temp(cfg, wheel)
    try:
        h = hashlib.sha256()
        n = 0
        try:
            # A regular file only (a device or FIFO is refused unread), read up to one byte past
            # the pinned size (or the ceiling): more is already a mismatch, so reading stops.
            fdi, _ = safeio.open_regular(src)
            with os.fdopen(fdi, "rb") as fi, _writer(tmp) as fo:
                while n <= limit:
                    b = fi.read(min(CHUNK, limit + 1 - n))
                    if not b:
                        break
                    h.update(b)
                    fo.write(b)
                    n += len(b)
        except FileNotFoundError:
            raise EnvironmentProblem(
                headline=f"the pinned wheel {wheel.name} does not exist",
                details=[("pinned", wheel.url), ("looked at", str(src))],
                hint="put the file there (`m3fuse fetch --dest DIR` on a connected machine), or --find-links DIR") from None
        except safeio.Unsafe as exc:
            raise safeio.refusal(exc, nothing="nothing was read or installed",
                                 hint=f"fix the lock's url for {wheel.name} (a wheel file), or pass its folder with "
                                      f"--find-links DIR") from None
        except OSError as exc:
            raise EnvironmentProblem(headline=f"cannot read the wheel {wheel.name}",
                                     details=[("file", str(src)), ("error", str(exc))],
                                     hint="check its permissions") from None
        sha = h.hexdigest()
        reveal = src.name == wheel.name
        if n > limit and wheel.size is None and reveal:
            raise IntegrityError(headline=f"{src} is larger than the {limit}-byte ceiling for a wheel "
                                          f"whose lock entry pins no size; nothing was installed",
                                 details=[("", wheel.name), ("from", str(src))],
                                 hint=f"pin its size in the lock (`m3fuse lock add` records it), or raise {CEILING_VAR}")
        if sha != wheel.sha256 or (wheel.size is not None and n != wheel.size):
            raise mismatch_error(mismatch_rows(wheel, str(src), sha, n, reveal=reveal), removed=False)
        cfg.echo(f"{wheel.name}: read from {src}, sha256 ok")
        return _publish(tmp, wheel, cfg)
    finally:
        _unlink(tmp)


def _download_verified(wheel: LockedWheel, cfg: FetchConfig) -> Path:
    tmp = _new_temp(cfg, wheel)
    try:
        sha, size = download(wheel.url, tmp, cfg, expected_size=wheel.size, label=wheel.name,
                             expected_sha256=wheel.sha256,  # stops past the pinned size or the ceiling
                             fd=_HELD.get(str(tmp)))
        if sha != wheel.sha256 or (wheel.size is not None and size != wheel.size):
            raise mismatch_error(mismatch_rows(wheel, wheel.url, sha, size))
        cfg.echo(f"{wheel.name}: downloaded {size} bytes, sha256 ok")
        return _publish(tmp, wheel, cfg)
    finally:
        _unlink(tmp)


def download(url: str, dest: Path, cfg: FetchConfig, *, expected_size: int | None = None,
             label: str = "", expected_sha256: str | None = None, fd: int | None = None) -> tuple[str, int]:
    """Stream `url` into `dest` (created or overwritten) while hashing it; return (sha256,
    size). Retries with exponential backoff on connection errors, timeouts, 5xx/429 and
    truncated bodies, resuming with a Range request when the server honours it (otherwise
    starting over). A resumed download whose hash is wrong is tried once more from byte 0
    before it is reported, since the server may have changed the file between attempts.

    Every attempt writes through one descriptor (`fd`, else `dest` opened once without
    following a symlink), so a retry never reopens the file by name. The whole download,
    retries included, ends at the deadline (cfg.deadline, else deadline_seconds())."""
    import requests  # lazily: only real downloads pay for it (see module doc)

    limit_s = deadline_seconds(cfg.deadline)
    own = fd is None
    if own:
        try:
            fd = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
                         | getattr(os, "O_CLOEXEC", 0), 0o600)
        except OSError as exc:
            raise EnvironmentProblem(headline=f"cannot write the download of {label or url}",
                                     details=[("file", str(dest)), ("error", exc.strerror or str(exc))],
                                     hint="name a regular file in a folder of yours") from None
    try:
        return _download_at(requests, url, dest, cfg, expected_size, label or url, expected_sha256, fd, limit_s)
    finally:
        if own:
            os.close(fd)


def _download_at(requests, url: str, dest: Path, cfg: FetchConfig, expected_size: int | None,  # noqa: ANN001
                 label: str, expected_sha256: str | None, fd: int, limit_s: float) -> tuple[str, int]:
    with _policy_session(requests, label)() as session:  # proxies and ~/.netrc come from requests' defaults
        session.headers["User-Agent"] = USER_AGENT
        try:
            return _download(session, requests, url, dest, cfg, expected_size, label, expected_sha256, fd, limit_s)
        except requests.TooManyRedirects:
            raise EnvironmentProblem(headline=f"downloading {label} failed: the server redirects in a loop",
                                     details=[("url", url)], hint="check the URL in the lock") from None
        except requests.RequestException as exc:  # an invalid URL or scheme after all checks
            raise EnvironmentProblem(headline=f"downloading {label} failed", details=[("url", url), ("error", str(exc))],
                                     hint="check the URL in the lock") from None


def _policy_session(requests, label: str):  # noqa: ANN001,ANN202 - the requests module, a Session subclass
    """A Session that applies the lock's URL policy to every redirect hop: a server may move
    a download elsewhere only over http(s) to a place the lock itself would accept."""
    from urllib.parse import urljoin

    from .lock import url_problem

    class PolicySession(requests.Session):
        def get_redirect_target(self, resp):  # noqa: ANN001,ANN202 - requests' own signature
            target = super().get_redirect_target(resp)
            if target is None:
                return None
            nxt = urljoin(resp.url, target)
            scheme = urlsplit(nxt).scheme.lower()
            problem = url_problem(nxt) if scheme in ("http", "https") else (
                f"url {nxt!r} leaves http(s) (scheme {scheme or '(none)'!r})")
            if problem:
                raise RedirectRefused(
                    headline=f"downloading {label}: the server redirected to a URL the lock policy refuses; "
                             f"nothing was downloaded or installed",
                    details=[("from", resp.url), ("to", nxt), ("problem", problem)],
                    hint="pin the final https URL in the lock, or fetch the wheel elsewhere and pass its "
                         "folder with --find-links DIR")
            return target

    return PolicySession


def _name_resolution_error(exc: BaseException) -> str | None:
    """The resolver's own message when `exc` (requests' ConnectionError, wrapping urllib3's
    errors) comes from a host name that does not resolve (socket.gaierror); else None."""
    import socket

    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, socket.gaierror):
            return str(e)
        todo += [e.__cause__, e.__context__, getattr(e, "reason", None), *e.args]
    return None


def _cut(resp, cut) -> None:  # noqa: ANN001 - requests' Response, a threading.Event
    """The deadline passed mid-body: end the blocked read by shutting the socket down (a read
    stuck in a trickle returns at once)."""
    import socket

    cut.set()
    raw = getattr(resp, "raw", None)
    for sock in (getattr(getattr(raw, "_connection", None), "sock", None),
                 getattr(getattr(getattr(getattr(raw, "_fp", None), "fp", None), "raw", None), "_sock", None)):
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
                return
            except OSError:
                pass
    try:
        resp.close()
    except Exception:  # noqa: BLE001 - best effort from a timer thread
        pass


def _download(session, requests, url: str, dest: Path, cfg: FetchConfig, expected_size: int | None,  # noqa: ANN001
              label: str, expected_sha256: str | None, fd: int, limit_s: float) -> tuple[str, int]:
    import threading
    from http.client import HTTPException  # requests has imported it already

    t_end = time.monotonic() + limit_s
    cut = threading.Event()

    def past_deadline() -> EnvironmentProblem:
        return EnvironmentProblem(
            headline=f"downloading {label} did not finish within its {limit_s:g}-second deadline; the partial "
                     f"file was deleted and nothing was installed",
            details=[("url", url), ("received", f"{have} bytes"), *([("last error", last_error)] if last_error else [])],
            hint=f"check the network; raise --download-deadline (or {DEADLINE_VAR}), or use --find-links DIR")

    h = hashlib.sha256()
    have = 0
    resumed = False
    restarted_for_hash = False
    last_error = ""
    show = cfg.progress
    cfg.echo(f"{label}: downloading {url}")
    attempt = 0
    while True:
        try:
            headers = {"Accept-Encoding": "identity"}
            if have:
                headers["Range"] = f"bytes={have}-"
            left = t_end - time.monotonic()
            if left <= 0:
                raise past_deadline()
            try:
                resp = session.get(url, stream=True, headers=headers,
                                   timeout=(min(cfg.connect_timeout, left), min(cfg.read_timeout, left)),
                                   allow_redirects=True)
            except (requests.ConnectionError, requests.Timeout) as exc:
                unresolved = _name_resolution_error(exc)
                if unresolved:
                    # A name that does not resolve now will not resolve in 30 s: say so once.
                    raise EnvironmentProblem(
                        headline=f"downloading {label} failed: the host name in its URL does not resolve",
                        details=[("url", url), ("error", unresolved)],
                        hint="check the lock's URL and this machine's DNS (or HTTPS_PROXY), or download it "
                             "elsewhere: --find-links DIR") from None
                raise _Retry(f"connection failed: {exc}") from None
            with resp:
                status = resp.status_code
                if status >= 500 or status == 429:
                    raise _Retry(f"HTTP {status} from the server")
                if status == 416 and have:
                    # The range starts at or past the end: start over rather than guess.
                    h, have = hashlib.sha256(), 0
                    raise _Retry("HTTP 416 on resume; starting over")
                if status not in (200, 206):
                    raise EnvironmentProblem(
                        headline=f"downloading {label} failed with HTTP {status} ({resp.reason})",
                        details=[("url", url)],
                        hint="check the lock's URL, the proxy and ~/.netrc, or download it elsewhere: --find-links DIR")
                if status == 206 and have:
                    cr = resp.headers.get("Content-Range", "")
                    if not cr.startswith(f"bytes {have}-"):
                        h, have = hashlib.sha256(), 0
                        raise _Retry(f"unexpected Content-Range {cr!r} on resume; starting over")
                    resumed = True
                else:
                    # 200: the server sent the whole file (no Range support): start over.
                    if have:
                        cfg.echo(f"{label}: server ignored the Range request; restarting from byte 0")
                    h, have = hashlib.sha256(), 0
                clen = resp.headers.get("Content-Length")
                # A content-encoded body's Content-Length counts its encoded bytes, not the file's:
                # a gzipped wheel (already compressed) decodes to fewer bytes than that.
                encoded = resp.headers.get("Content-Encoding", "identity") != "identity"
                body_len = int(clen) if clen and clen.isdigit() and not encoded else None
                total = (have + body_len) if body_len is not None else expected_size
                bar = _bar(label, total, have, show)
                start = have
                ceiling = expected_size if expected_size is not None else max_wheel_bytes()
                # The same descriptor every attempt: cut back to the bytes already hashed.
                os.ftruncate(fd, start)
                os.lseek(fd, start, os.SEEK_SET)
                timer = threading.Timer(max(t_end - time.monotonic(), 0.0), _cut, args=(resp, cut))
                timer.daemon = True
                timer.start()
                try:
                    with open(fd, "wb", closefd=False) as f:
                        pump = _Pump(f, h)
                        try:
                            pump.run(_readinto(resp), ceiling - start, bar)
                        finally:
                            have = start + pump.done
                except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                        requests.exceptions.ContentDecodingError, HTTPException, OSError) as exc:
                    if cut.is_set():
                        raise past_deadline() from None
                    # requests' own errors are OSErrors too (RequestException derives from IOError):
                    # a broken content-encoded body is the network's fault, not the disk's.
                    if isinstance(exc, OSError) and not isinstance(exc, (ConnectionError, TimeoutError,
                                                                        requests.RequestException)):
                        raise EnvironmentProblem(headline=f"writing the download of {label} failed",
                                                 details=[("file", str(dest)), ("error", str(exc))],
                                                 hint="check the cache folder's disk space and permissions, "
                                                      "or pass another with --cache-dir DIR") from None
                    raise _Retry(f"transfer broke after {have} bytes: {exc}") from None
                finally:
                    timer.cancel()
                    if bar is not None:
                        bar.__exit__(None, None, None)
                if cut.is_set():
                    raise past_deadline()
                got_this = have - start
                if expected_size is None and have > ceiling:
                    raise IntegrityError(
                        headline=f"downloading {label} stopped at the {ceiling}-byte ceiling for a wheel "
                                 f"whose lock entry pins no size; the partial file was deleted",
                        details=[("url", url)],
                        hint=f"pin its size in the lock (`m3fuse lock add` records it), raise {CEILING_VAR}, or check the server")
                if have > ceiling:
                    pass  # past the pinned size: a different file, reported by the caller, no retry
                elif body_len is not None and got_this < body_len:
                    raise _Retry(f"truncated body: {got_this} of {body_len} bytes")
                if expected_size is not None and have < expected_size and body_len is None:
                    raise _Retry(f"truncated body: {have} of {expected_size} bytes")
            sha = h.hexdigest()
            if expected_sha256 and sha != expected_sha256 and resumed and not restarted_for_hash:
                restarted_for_hash = True
                resumed = False
                h, have = hashlib.sha256(), 0
                raise _Retry("hash mismatch after a resumed transfer; downloading once more from byte 0")
            return sha, have
        except _Retry as r:
            last_error = str(r)
            if cut.is_set() or time.monotonic() >= t_end:
                raise past_deadline() from None
            if attempt >= cfg.retries:
                raise EnvironmentProblem(
                    headline=f"downloading {label} failed after {attempt + 1} attempts; the partial file was "
                             f"deleted and nothing was installed",
                    details=[("url", url), ("last error", last_error)],
                    hint="check the network, HTTPS_PROXY and ~/.netrc, retry later, or download it elsewhere: "
                         "--find-links DIR") from None
            delay = min(cfg.backoff * (2 ** attempt), cfg.backoff_max)
            attempt += 1
            how = f"resuming at byte {have}" if have else "from the start"
            cfg.echo(f"{label}: {last_error}; retry {attempt}/{cfg.retries} in {delay:g}s, {how}")
            time.sleep(max(min(delay, t_end - time.monotonic()), 0.0))
