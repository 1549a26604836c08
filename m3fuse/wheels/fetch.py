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
from ..errors import EnvironmentProblem, IntegrityError, Row
from ..fingerprint import hash_file
from .lock import LockedWheel

CHUNK = 1 << 20  # reads, hashing and writes
NET_CHUNK = 1 << 18  # the decoding fallback only (content-encoded bodies): a read cut short there
# loses its whole chunk (urllib3 raises instead of returning the partial read)
USER_AGENT = "m3fuse (wheel fetch)"


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
    progress: bool | None = None  # None: a bar when stderr is a terminal; False: never
    echo: Callable[[str], None] = _quiet

    def cache_root(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else default_cache_dir()

    def lock_stamps(self) -> Path:
        """Where the lock texts packaging's PEP 751 validator has passed are remembered."""
        return self.cache_root() / "validated-locks"


def default_cache_dir() -> Path:
    return resources.cache_dir()


def cache_path(root: Path, wheel: LockedWheel) -> Path:
    # Content-addressed by the pin; the file keeps its wheel name because pip reads the tags
    # and the distribution from the file name.
    return root / "wheels" / "sha256" / wheel.sha256[:2] / wheel.sha256 / wheel.name


def _fmt_size(n: int | None) -> str:
    if n is None:
        return "unknown size"
    return f"{n} bytes"


MISMATCH_HEADLINE = "THESE FILES DO NOT MATCH THE HASHES IN THE LOCK"  # pip's words for the same failure


def mismatch_rows(wheel: LockedWheel, source: str, got_sha: str, got_size: int) -> list[Row]:
    """One wheel's expected/got rows, and what the size says about the difference."""
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
        hint="if the lock is right, someone may have changed the file at its source: do not install it; "
             "fetch it again from a trusted source, or, if the new build is intended, re-pin it with `m3fuse lock add`")


def _bar(label: str, total: int | None, have: int, show: bool | None):  # noqa: ANN202 - click's bar or None
    """click's progress bar when stderr is a terminal; None when it is not or show is False
    (the caller echoes plain lines)."""
    if show is False or not sys.stderr.isatty():
        return None
    import click

    bar = click.progressbar(length=total, label=f"  {label[:40]}", file=sys.stderr, show_pos=False,
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
    path = cache_path(cfg.cache_root(), wheel)
    if not path.is_file():
        return None
    sha, size = hash_file(path)
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
        fd = os.open(p, os.O_RDONLY)
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
    root = cfg.cache_root()
    tmp = root / "tmp"
    try:
        tmp.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EnvironmentProblem(headline="the wheel cache cannot be created",
                                 details=[("folder", str(root)), ("error", str(exc))],
                                 hint="pass a writable folder with --cache-dir DIR, or set XDG_CACHE_HOME") from None
    # A killed run cannot clean up after itself: drop every partial file no live run holds.
    now = time.time()
    for p in tmp.glob("*.part"):
        if str(p) in _HELD:
            continue
        try:
            if fcntl is not None:
                if not _writer_alive(p):
                    p.unlink()
            elif now - p.stat().st_mtime > STALE_PART_S:
                p.unlink()
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


def _publish(tmp: Path, wheel: LockedWheel, cfg: FetchConfig) -> Path:
    final = cache_path(cfg.cache_root(), wheel)
    final.parent.mkdir(parents=True, exist_ok=True)
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
    tmp = _new_temp(cfg, wheel)
    try:
        h = hashlib.sha256()
        n = 0
        try:
            with open(src, "rb") as fi, open(tmp, "wb") as fo:
                while True:
                    b = fi.read(CHUNK)
                    if not b:
                        break
                    h.update(b)
                    fo.write(b)
                    n += len(b)
        except FileNotFoundError:
            raise EnvironmentProblem(
                headline=f"the pinned wheel {wheel.name} does not exist",
                details=[("pinned", wheel.url), ("looked at", str(src))],
                hint="put the file there (for example with `m3fuse fetch --dest DIR` on a connected machine) "
                     "or pass its folder with --find-links DIR") from None
        except OSError as exc:
            raise EnvironmentProblem(headline=f"cannot read the wheel {wheel.name}",
                                     details=[("file", str(src)), ("error", str(exc))],
                                     hint="check its permissions") from None
        sha = h.hexdigest()
        if sha != wheel.sha256 or (wheel.size is not None and n != wheel.size):
            raise mismatch_error(mismatch_rows(wheel, str(src), sha, n), removed=False)
        cfg.echo(f"{wheel.name}: read from {src}, sha256 ok")
        return _publish(tmp, wheel, cfg)
    finally:
        _unlink(tmp)


def _download_verified(wheel: LockedWheel, cfg: FetchConfig) -> Path:
    tmp = _new_temp(cfg, wheel)
    try:
        sha, size = download(wheel.url, tmp, cfg, expected_size=wheel.size, label=wheel.name,
                             expected_sha256=wheel.sha256)
        if sha != wheel.sha256 or (wheel.size is not None and size != wheel.size):
            raise mismatch_error(mismatch_rows(wheel, wheel.url, sha, size))
        cfg.echo(f"{wheel.name}: downloaded {size} bytes, sha256 ok")
        return _publish(tmp, wheel, cfg)
    finally:
        _unlink(tmp)


def download(url: str, dest: Path, cfg: FetchConfig, *, expected_size: int | None = None,
             label: str = "", expected_sha256: str | None = None) -> tuple[str, int]:
    """Stream `url` into `dest` (created or overwritten) while hashing it; return (sha256,
    size). Retries with exponential backoff on connection errors, timeouts, 5xx/429 and
    truncated bodies, resuming with a Range request when the server honours it (otherwise
    starting over). A resumed download whose hash is wrong is tried once more from byte 0
    before it is reported, since the server may have changed the file between attempts."""
    import requests  # lazily: only real downloads pay for it (see module doc)

    label = label or url
    with requests.Session() as session:  # proxies and ~/.netrc come from requests' defaults
        session.headers["User-Agent"] = USER_AGENT
        return _download(session, requests, url, dest, cfg, expected_size, label, expected_sha256)


def _download(session, requests, url: str, dest: Path, cfg: FetchConfig, expected_size: int | None,  # noqa: ANN001
              label: str, expected_sha256: str | None) -> tuple[str, int]:
    from http.client import HTTPException  # requests has imported it already

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
            try:
                resp = session.get(url, stream=True, headers=headers,
                                   timeout=(cfg.connect_timeout, cfg.read_timeout), allow_redirects=True)
            except (requests.ConnectionError, requests.Timeout) as exc:
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
                        hint="check the URL in the lock, your proxy settings and ~/.netrc credentials, or "
                             "download the file elsewhere and pass its folder with --find-links DIR")
                mode = "ab"
                if status == 206 and have:
                    cr = resp.headers.get("Content-Range", "")
                    if not cr.startswith(f"bytes {have}-"):
                        h, have, mode = hashlib.sha256(), 0, "wb"
                        raise _Retry(f"unexpected Content-Range {cr!r} on resume; starting over")
                    resumed = True
                else:
                    # 200: the server sent the whole file (no Range support): start over.
                    if have:
                        cfg.echo(f"{label}: server ignored the Range request; restarting from byte 0")
                    h, have, mode = hashlib.sha256(), 0, "wb"
                clen = resp.headers.get("Content-Length")
                body_len = int(clen) if clen and clen.isdigit() else None
                total = (have + body_len) if body_len is not None else expected_size
                bar = _bar(label, total, have, show)
                start = have
                try:
                    with open(dest, mode) as f:
                        pump = _Pump(f, h)
                        try:
                            pump.run(_readinto(resp), None if expected_size is None else expected_size - start, bar)
                        finally:
                            have = start + pump.done
                except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                        requests.exceptions.ContentDecodingError, HTTPException, OSError) as exc:
                    if isinstance(exc, OSError) and not isinstance(exc, (ConnectionError, TimeoutError)):
                        raise EnvironmentProblem(headline=f"writing the download of {label} failed",
                                                 details=[("file", str(dest)), ("error", str(exc))],
                                                 hint="check the cache folder's disk space and permissions, "
                                                      "or pass another with --cache-dir DIR") from None
                    raise _Retry(f"transfer broke after {have} bytes: {exc}") from None
                finally:
                    if bar is not None:
                        bar.__exit__(None, None, None)
                got_this = have - start
                if body_len is not None and got_this < body_len:
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
            if attempt >= cfg.retries:
                raise EnvironmentProblem(
                    headline=f"downloading {label} failed after {attempt + 1} attempts; the partial file was "
                             f"deleted and nothing was installed",
                    details=[("url", url), ("last error", last_error)],
                    hint="check the network or proxy (requests reads HTTPS_PROXY and ~/.netrc), retry later, or "
                         "download the file elsewhere and pass its folder with --find-links DIR") from None
            delay = min(cfg.backoff * (2 ** attempt), cfg.backoff_max)
            attempt += 1
            how = f"resuming at byte {have}" if have else "from the start"
            cfg.echo(f"{label}: {last_error}; retry {attempt}/{cfg.retries} in {delay:g}s, {how}")
            time.sleep(delay)
