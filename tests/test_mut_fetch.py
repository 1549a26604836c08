"""Downloads (m3fuse/wheels/fetch.py): redirects hop by hop, the size ceiling and the mismatch
report, against a real HTTP server on 127.0.0.1: the tests that kill its mutants
(`make mutation MODULE=m3fuse/wheels/fetch.py`), beside tests/test_fetch.py's fault matrix."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
import time
from pathlib import Path

import pytest

from m3fuse.errors import EnvironmentProblem, IntegrityError, RedirectRefused, UnsafePath
from m3fuse.wheels import fetch
from m3fuse.wheels.fetch import FetchConfig, cache_path, download, mismatch_error, mismatch_rows
from m3fuse.wheels.lock import LockedWheel

BODY = b"wheel bytes " * 1000


class RedirectServer:
    """/file serves BODY; /r/<code>/<location> answers <code> with that Location, verbatim
    (relative, absolute-path, scheme-relative or absolute)."""

    def __init__(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *a):
                pass

            def do_GET(self):  # noqa: N802
                if self.path == "/file" or self.path == "/dir/file":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(BODY)))
                    self.end_headers()
                    self.wfile.write(BODY)
                    return
                if self.path.startswith("/r/"):
                    code, _, loc = self.path[3:].partition("/")
                    self.send_response(int(code))
                    self.send_header("Location", loc.replace("~", "/"))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path == "/loop":
                    self.send_response(302)
                    self.send_header("Location", "/loop")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_error(404)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server():
    s = RedirectServer()
    yield s
    s.close()


def cfg(tmp_path: Path) -> FetchConfig:
    return FetchConfig(cache_dir=tmp_path / "cache", retries=0, backoff=0.01, connect_timeout=2, read_timeout=2,
                       progress=False)


SHA = hashlib.sha256(BODY).hexdigest()


@pytest.mark.parametrize("location", ["~file", "..~..~file", "..~..~dir~file", ".~..~..~file", "~r~302~~file"])
def test_relative_redirects_are_resolved_against_the_url_they_came_from(server, tmp_path, location):
    """`Location: ../../file` from /r/302/… is /file on the same loopback server: followed, as the
    lock would accept that URL; the policy judges the resolved URL, not the raw header."""
    dest = tmp_path / "d"
    sha, size = download(f"{server.base}/r/302/{location}", dest, cfg(tmp_path), expected_size=len(BODY),
                         expected_sha256=SHA)
    assert (sha, size) == (SHA, len(BODY)) and dest.read_bytes() == BODY


def test_an_absolute_redirect_to_this_machine_is_followed(server, tmp_path):
    loc = server.base.replace("/", "~") + "~dir~file"
    assert download(f"{server.base}/r/302/{loc}", tmp_path / "d", cfg(tmp_path)) == (SHA, len(BODY))


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_every_redirect_code_is_followed_on_this_machine(server, tmp_path, code):
    dest = tmp_path / "d"
    assert download(f"{server.base}/r/{code}/~file", dest, cfg(tmp_path)) == (SHA, len(BODY))


@pytest.mark.parametrize("location,problem", [
    ("~~10.255.255.1~evil.whl", "plain http to a host other than this machine"),  # scheme-relative: http, elsewhere
    ("http:~~10.255.255.1~evil.whl", "plain http to a host other than this machine"),
    ("file:~~~etc~passwd", "leaves http(s) (scheme 'file')"),
    ("ftp:~~example.invalid~x.whl", "leaves http(s) (scheme 'ftp')"),
    ("https:~~u:p@example.invalid~x.whl", "carries credentials"),
])
def test_a_redirect_the_lock_policy_refuses_is_not_followed(server, tmp_path, location, problem):
    url = f"{server.base}/r/302/{location}"
    dest = tmp_path / "d"
    with pytest.raises(RedirectRefused) as exc:
        download(url, dest, cfg(tmp_path), label="demo.whl")
    e = exc.value
    assert e.headline == ("downloading demo.whl: the server redirected to a URL the lock policy refuses; nothing was "
                          "downloaded or installed")
    rows = dict(e.details)
    assert rows["from"] == url and problem in rows["problem"], rows
    assert rows["to"] == location.replace("~", "/") if ":" in location else rows["to"].startswith("http://10.255")
    assert isinstance(e, IntegrityError)
    assert not dest.exists() or dest.read_bytes() == b""


def test_a_redirect_loop_is_named(server, tmp_path):
    with pytest.raises(EnvironmentProblem) as exc:
        download(f"{server.base}/loop", tmp_path / "d", cfg(tmp_path), label="L")
    assert exc.value.headline == "downloading L failed: the server redirects in a loop"
    assert exc.value.details == (("url", f"{server.base}/loop"),)


def test_a_404_is_not_retried(server, tmp_path):
    c = cfg(tmp_path)
    c.retries = 3
    with pytest.raises(EnvironmentProblem) as exc:
        download(f"{server.base}/nope", tmp_path / "d", c, label="N")
    assert exc.value.headline == "downloading N failed with HTTP 404 (Not Found)"


# ----------------------------------------------------------------------------- small parts
def test_max_wheel_bytes(monkeypatch):
    monkeypatch.delenv(fetch.CEILING_VAR, raising=False)
    assert fetch.max_wheel_bytes() == fetch.MAX_WHEEL_BYTES == 2 << 30
    for value, want in [("12", 12), ("0", 2 << 30), ("-5", 2 << 30), ("x", 2 << 30), ("", 2 << 30), ("1", 1)]:
        monkeypatch.setenv(fetch.CEILING_VAR, value)
        assert fetch.max_wheel_bytes() == want, value


def test_the_ceiling_stops_an_unsized_download(server, tmp_path, monkeypatch):
    monkeypatch.setenv(fetch.CEILING_VAR, "100")
    with pytest.raises(IntegrityError) as exc:
        download(f"{server.base}/file", tmp_path / "d", cfg(tmp_path), label="B")
    assert exc.value.headline.startswith("downloading B stopped at the 100-byte ceiling")
    monkeypatch.setenv(fetch.CEILING_VAR, str(len(BODY)))
    assert download(f"{server.base}/file", tmp_path / "d", cfg(tmp_path)) == (SHA, len(BODY))


def test_cache_path_is_content_addressed():
    w = LockedWheel("a-1-py3-none-any.whl", "https://e/a", "ab" + "c" * 62)
    assert cache_path(Path("/c"), w) == Path("/c/wheels/sha256/ab") / w.sha256 / w.name


def test_mismatch_rows():
    w = LockedWheel("a.whl", "u", "e" * 64, 10)
    assert mismatch_rows(w, "S", "f" * 64, 5) == [
        ("", "a.whl"), ("from", "S"), ("expected", f"sha256 {'e' * 64}"), ("got", f"sha256 {'f' * 64}"),
        ("size", "expected 10 bytes, got 5: the file is truncated, so the transfer was cut short")]
    assert mismatch_rows(w, "S", "f" * 64, 11)[-1][1] == \
        "expected 10 bytes, got 11: the file is larger than pinned, so it is a different file"
    assert mismatch_rows(w, "S", "f" * 64, 10)[-1][1].startswith("right (10 bytes): the size is right")
    w0 = LockedWheel("a.whl", "u", "e" * 64)
    assert mismatch_rows(w0, "S", "f" * 64, 7)[-1] == ("size", "the lock pins no size; 7 bytes were received")
    hidden = mismatch_rows(w, "S", "f" * 64, 5, reveal=False)
    assert hidden == [("", "a.whl"), ("from", "S"), ("expected", f"sha256 {'e' * 64}"),
                      ("got", "another file (its hash, its size and how that compares with the pin are not shown: it "
                              "is not named like the wheel, so it is not m3fuse's to describe)")]
    # V19: a foreign file's rows are the same whatever its size or hash (shorter, larger, equal,
    # or no pinned size): comparing them must not tell its length.
    for lock_entry, got_sha, got_size in ((w, "x", 11), (w, "x", 10), (w0, "x", 3), (w, "f" * 64, 0)):
        assert mismatch_rows(lock_entry, "S", got_sha, got_size, reveal=False) == hidden, (got_sha, got_size)
    assert all("f" * 64 not in v and "7" not in v for _, v in mismatch_rows(w, "S", "f" * 64, 7, reveal=False))
    e = mismatch_error(hidden)
    assert e.headline == fetch.MISMATCH_HEADLINE + "; the bad file was deleted and nothing was installed"
    assert mismatch_error(hidden, removed=False).headline.endswith("; nothing was installed")


# ---------------------------------------------------------------- the cache and local files
WHEEL = "mutf-1.0-py3-none-any.whl"
OFFLINE = "https://unreachable.invalid/" + WHEEL


def pinned(data: bytes = BODY, url: str = OFFLINE, size: int | None | bool = True) -> LockedWheel:
    n = len(data) if size is True else (None if size is False else size)
    return LockedWheel(WHEEL, url, hashlib.sha256(data).hexdigest(), n)


def logged(tmp_path: Path, **kw) -> FetchConfig:
    c = cfg(tmp_path)
    c.lines = []  # type: ignore[attr-defined]
    c.echo = c.lines.append
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def test_the_documented_defaults():
    """docs/wheels.md: 4 retries, backoff 2, 4, 8, 16 s, 15 s to connect, 60 s without data."""
    c = FetchConfig()
    assert (c.retries, c.backoff, c.backoff_max, c.connect_timeout, c.read_timeout) == (4, 2.0, 30.0, 15.0, 60.0)
    assert c.deadline is None and c.progress is None and c.find_links == [] and c.cache_dir is None


def test_a_refused_cache_folder(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    c = FetchConfig(cache_dir=tmp_path / "link")
    assert c.lock_stamps() is None
    with pytest.raises(UnsafePath) as exc:
        c.owned("tmp")
    assert exc.value.headline.endswith("m3fuse refuses it and nothing was downloaded or installed")
    assert exc.value.hint == ("pass a folder only you can write with --cache-dir DIR, or set XDG_CACHE_HOME "
                              f"(cache: {tmp_path / 'link'})")
    good = FetchConfig(cache_dir=tmp_path / "c")
    assert good.lock_stamps() == tmp_path / "c" / "validated-locks"
    assert (tmp_path / "c" / "validated-locks").stat().st_mode & 0o777 == 0o700


def _cache(c: FetchConfig, w: LockedWheel, data: bytes) -> Path:
    p = cache_path(c.cache_root(), w)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def test_a_cached_file_is_used_without_the_network(tmp_path):
    c = logged(tmp_path)
    w = pinned()
    assert fetch.obtain(w, c, allow_network=False) is None  # neither cached nor local
    p = _cache(c, w, BODY)
    assert fetch.obtain(w, c, allow_network=False) == p
    assert c.lines == [f"{WHEEL}: cached, sha256 ok"]
    unsized = pinned(size=False)
    assert fetch.obtain(unsized, c, allow_network=False) == p


@pytest.mark.parametrize("what,content,size,said", [
    ("pin one byte longer", BODY, len(BODY) + 1, f"sha256 {SHA}, {len(BODY)} bytes"),
    ("longer than the pin", BODY + b"x", len(BODY), "sha256 (unreadable or not a regular file), -1 bytes"),
    ("other bytes", b"y" * len(BODY), len(BODY), f"sha256 {hashlib.sha256(b'y' * len(BODY)).hexdigest()}, {len(BODY)} bytes"),
])
def test_a_cached_file_no_longer_matching_its_pin_is_dropped(tmp_path, what, content, size, said):
    c = logged(tmp_path)
    w = LockedWheel(WHEEL, OFFLINE, SHA, size)
    p = _cache(c, w, content)
    assert fetch.obtain(w, c, allow_network=False) is None, what
    assert not p.exists()
    assert c.lines == [f"cached {p} no longer matches its pin ({said}); deleting it and fetching again"]


def test_a_cached_symlink_is_not_trusted(tmp_path):
    c = logged(tmp_path)
    w = pinned()
    target = tmp_path / "elsewhere"
    target.write_bytes(BODY)
    p = cache_path(c.cache_root(), w)
    p.parent.mkdir(parents=True)
    p.symlink_to(target)
    assert fetch.obtain(w, c, allow_network=False) is None
    assert not p.is_symlink() and target.read_bytes() == BODY
    assert "(unreadable or not a regular file)" in c.lines[0]


def test_an_unsized_cached_file_past_the_ceiling_is_dropped(tmp_path, monkeypatch):
    c = logged(tmp_path)
    w = pinned(size=False)
    p = _cache(c, w, BODY)
    monkeypatch.setenv(fetch.CEILING_VAR, str(len(BODY) - 1))
    assert fetch.obtain(w, c, allow_network=False) is None and not p.exists()
    p = _cache(c, w, BODY)
    monkeypatch.setenv(fetch.CEILING_VAR, str(len(BODY)))
    assert fetch.obtain(w, c, allow_network=False) == p


def test_local_sources_in_order(tmp_path):
    a, b, empty = tmp_path / "a", tmp_path / "b", tmp_path / "empty"
    for d in (a, b, empty):
        d.mkdir()
    (a / WHEEL).write_bytes(b"a")
    (b / WHEEL).write_bytes(b"b")
    (empty / WHEEL).mkdir()  # not a file: skipped
    w = pinned(url=(tmp_path / "pinned" / WHEEL).as_uri())
    assert fetch.local_source(w, FetchConfig(find_links=[empty, b, a])) == b / WHEEL
    assert fetch.local_source(w, FetchConfig(find_links=[empty])) == tmp_path / "pinned" / WHEEL
    assert fetch.local_source(pinned(), FetchConfig(find_links=[empty])) is None


def _local(tmp_path: Path, data: bytes, name: str = WHEEL) -> str:
    src = tmp_path / "src" / name
    src.parent.mkdir(exist_ok=True)
    src.write_bytes(data)
    return src.as_uri()


def test_a_local_file_is_copied_into_the_cache(tmp_path):
    c = logged(tmp_path)
    url = _local(tmp_path, BODY)
    got = fetch.obtain(pinned(url=url), c)
    assert got == cache_path(c.cache_root(), pinned()) and got.read_bytes() == BODY
    assert got.stat().st_mode & 0o777 == 0o644
    assert c.lines == [f"{WHEEL}: read from {tmp_path / 'src' / WHEEL}, sha256 ok"]
    assert list((c.cache_root() / "tmp").iterdir()) == []


def test_a_local_file_longer_than_its_pin_is_read_one_byte_past_it(tmp_path):
    with pytest.raises(IntegrityError) as exc:
        fetch.obtain(pinned(url=_local(tmp_path, BODY + b"z" * 5000)), logged(tmp_path))
    assert dict(exc.value.details)["size"] == (f"expected {len(BODY)} bytes, got {len(BODY) + 1}: the file is larger "
                                               "than pinned, so it is a different file")
    assert exc.value.headline == fetch.MISMATCH_HEADLINE + "; nothing was installed"


def test_a_local_file_past_a_pin_of_more_than_a_chunk_is_read_one_byte_past_it(tmp_path):
    big = os.urandom(fetch.CHUNK + 10)
    w = LockedWheel(WHEEL, _local(tmp_path, big + b"z" * 5000), hashlib.sha256(big).hexdigest(), len(big))
    with pytest.raises(IntegrityError) as exc:
        fetch.obtain(w, logged(tmp_path))
    assert dict(exc.value.details)["size"].startswith(f"expected {len(big)} bytes, got {len(big) + 1}: ")


def test_a_local_file_of_other_bytes_is_refused(tmp_path):
    other = bytes(len(BODY))
    with pytest.raises(IntegrityError) as exc:
        fetch.obtain(pinned(url=_local(tmp_path, other)), logged(tmp_path))
    assert dict(exc.value.details)["got"] == f"sha256 {hashlib.sha256(other).hexdigest()}"
    shorter = BODY[:-1]
    with pytest.raises(IntegrityError):
        fetch.obtain(LockedWheel(WHEEL, _local(tmp_path, shorter), hashlib.sha256(shorter).hexdigest(), len(BODY)),
                     logged(tmp_path))


def test_an_unsized_local_file_and_the_ceiling(tmp_path, monkeypatch):
    url = _local(tmp_path, BODY)
    monkeypatch.setenv(fetch.CEILING_VAR, str(len(BODY)))
    assert fetch.obtain(pinned(url=url, size=False), logged(tmp_path)).read_bytes() == BODY
    monkeypatch.setenv(fetch.CEILING_VAR, str(len(BODY) - 1))
    with pytest.raises(IntegrityError) as exc:
        fetch.obtain(pinned(url=url, size=False), logged(tmp_path / "2"))
    src = tmp_path / "src" / WHEEL
    assert exc.value.headline == (f"{src} is larger than the {len(BODY) - 1}-byte ceiling for a wheel whose lock entry "
                                  "pins no size; nothing was installed")
    # A file not named like the wheel gets the one fixed sentence, not the ceiling's.
    foreign = _local(tmp_path, b"z" + BODY, name="secret")
    with pytest.raises(IntegrityError) as exc:
        fetch.obtain(pinned(url=foreign, size=False), logged(tmp_path / "3"))
    assert exc.value.headline.startswith(fetch.MISMATCH_HEADLINE) and "ceiling" not in exc.value.message


def test_local_files_that_cannot_be_read(tmp_path):
    fifo = tmp_path / WHEEL
    os.mkfifo(fifo)
    with pytest.raises(UnsafePath) as exc:
        fetch.obtain(pinned(url=fifo.as_uri()), logged(tmp_path))
    assert exc.value.headline.endswith("m3fuse refuses it and nothing was read or installed")
    assert exc.value.hint == (f"fix the lock's url for {WHEEL} (a wheel file), or pass its folder with "
                              "--find-links DIR")
    blocker = tmp_path / "plain"
    blocker.write_text("")
    with pytest.raises(EnvironmentProblem) as exc:
        fetch.obtain(pinned(url=(blocker / WHEEL).as_uri()), logged(tmp_path))
    assert exc.value.headline == f"cannot read the wheel {WHEEL}"
    assert exc.value.details == (("file", str(blocker / WHEEL)), ("error", f"[Errno 20] Not a directory: '{WHEEL}'")) \
        or exc.value.details[0] == ("file", str(blocker / WHEEL))
    missing = (tmp_path / "absent" / WHEEL).as_uri()
    with pytest.raises(EnvironmentProblem) as exc:
        fetch.obtain(pinned(url=missing), logged(tmp_path))
    assert exc.value.headline == f"the pinned wheel {WHEEL} does not exist"
    assert exc.value.details == (("pinned", missing), ("looked at", str(tmp_path / "absent" / WHEEL)))
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


def test_a_download_into_the_cache(server, tmp_path):
    c = logged(tmp_path)
    got = fetch.obtain(pinned(url=f"{server.base}/file"), c)
    assert got.read_bytes() == BODY and got.stat().st_mode & 0o777 == 0o644
    assert c.lines[-1] == f"{WHEEL}: downloaded {len(BODY)} bytes, sha256 ok"
    assert list((c.cache_root() / "tmp").iterdir()) == [] and not fetch._HELD


@pytest.mark.parametrize("pin", [LockedWheel(WHEEL, "", "0" * 64, len(BODY)), LockedWheel(WHEEL, "", SHA, 100),
                                 LockedWheel(WHEEL, "", "0" * 64)])
def test_a_downloaded_mismatch_is_refused_and_deleted(server, tmp_path, pin):
    c = logged(tmp_path)
    w = LockedWheel(pin.name, f"{server.base}/file", pin.sha256, pin.size)
    with pytest.raises(IntegrityError) as exc:
        fetch.obtain(w, c)
    assert exc.value.headline == fetch.MISMATCH_HEADLINE + "; the bad file was deleted and nothing was installed"
    assert dict(exc.value.details)["from"] == w.url
    assert list((c.cache_root() / "tmp").iterdir()) == [] and not fetch._HELD
    assert not cache_path(c.cache_root(), w).exists()


@pytest.mark.parametrize("swap", ["removed", "another file", "a symlink"])
@pytest.mark.parametrize("source", ["download", "local"])
def test_a_part_file_swapped_before_it_is_published_is_refused(server, tmp_path, swap, source):
    """The name of the partial file must still be the file the verified bytes went into."""
    target = tmp_path / "target"
    target.write_bytes(BODY)
    seen = []

    def echo(line: str) -> None:
        if "sha256 ok" not in line:
            return
        (part,) = (tmp_path / "cache" / "tmp").iterdir()
        seen.append(part.name)
        part.unlink()
        if swap == "another file":
            part.write_bytes(BODY)
        elif swap == "a symlink":
            part.symlink_to(target)

    url = f"{server.base}/file" if source == "download" else _local(tmp_path, BODY)
    with pytest.raises(UnsafePath) as exc:
        fetch.obtain(pinned(url=url), FetchConfig(cache_dir=tmp_path / "cache", progress=False, echo=echo))
    assert "was replaced while the download was written into it" in exc.value.headline
    assert seen[0].startswith(SHA[:16] + "-") and seen[0].endswith(".part")
    assert not cache_path(tmp_path / "cache", pinned()).exists() and target.read_bytes() == BODY
    assert list((tmp_path / "cache" / "tmp").iterdir()) == [] and not fetch._HELD


def test_leftover_partial_files(tmp_path, monkeypatch):
    """A .part no live run holds (flock) is dropped; a held one, one this run holds, a folder
    and other names are kept."""
    import fcntl

    tmp = tmp_path / "cache" / "tmp"
    tmp.mkdir(parents=True)
    for name in ("alive.part", "ours.part", "notes.txt"):
        (tmp / name).write_bytes(b"x")
    for i in range(10):  # interleaved: whatever order the folder lists them in, a file follows a folder
        (tmp / f"dead{i}.part").write_bytes(b"x")
        (tmp / f"dir{i}.part").mkdir()
    alive = os.open(tmp / "alive.part", os.O_RDONLY)
    ours = os.open(tmp / "ours.part", os.O_RDONLY)
    fcntl.flock(alive, fcntl.LOCK_EX)
    try:
        monkeypatch.setitem(fetch._HELD, str(tmp / "ours.part"), ours)
        assert fetch._tmp_dir(FetchConfig(cache_dir=tmp_path / "cache")) == tmp
        assert sorted(p.name for p in tmp.iterdir()) == sorted(["alive.part", "notes.txt", "ours.part",
                                                                *(f"dir{i}.part" for i in range(10))])
        # The probe's own lock is gone with it: the holder still holds, another probe still fails.
        assert fetch._writer_alive(tmp / "alive.part") and not fetch._writer_alive(tmp / "notes.txt")
        assert not fetch._writer_alive(tmp / "absent.part")
    finally:
        os.close(alive)
        os.close(ours)


def test_the_writer_probe_opens_neither_a_link_nor_a_fifo(tmp_path):
    """The probe follows no symlink (a link to a held file is not a live download of ours) and
    does not block on a FIFO with no writer."""
    import fcntl

    held = tmp_path / "held"
    held.write_bytes(b"x")
    fd = os.open(held, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        (tmp_path / "link.part").symlink_to(held)
        assert fetch._writer_alive(held) and not fetch._writer_alive(tmp_path / "link.part")
    finally:
        os.close(fd)
    os.mkfifo(tmp_path / "fifo.part")
    assert not fetch._writer_alive(tmp_path / "fifo.part")


def test_without_flock_old_partial_files_go(tmp_path, monkeypatch, server):
    """Where flock is absent, a .part untouched for a day is a leftover; a younger one may be a
    live run's. The whole download then writes and publishes by name."""
    monkeypatch.setattr(fetch, "fcntl", None)
    tmp = tmp_path / "cache" / "tmp"
    tmp.mkdir(parents=True)
    now = time.time()
    for name, age in (("old.part", fetch.STALE_PART_S + 10), ("young.part", fetch.STALE_PART_S - 10)):
        (tmp / name).write_bytes(b"x")
        os.utime(tmp / name, (now - age, now - age))
    assert fetch.STALE_PART_S == 24 * 3600
    c = logged(tmp_path)
    got = fetch.obtain(pinned(url=f"{server.base}/file"), c)
    assert got.read_bytes() == BODY and got.stat().st_mode & 0o777 == 0o644 and not fetch._HELD
    assert sorted(p.name for p in tmp.iterdir()) == ["young.part"]
    assert fetch.obtain(pinned(url=_local(tmp_path, BODY)), logged(tmp_path / "2")).read_bytes() == BODY


def test_an_empty_local_file_stays_empty(tmp_path):
    """A zero-byte source is copied as zero bytes (the partial file is cut to 0 before the copy)."""
    w = LockedWheel(WHEEL, _local(tmp_path, b""), hashlib.sha256(b"").hexdigest(), 0)
    assert fetch.obtain(w, logged(tmp_path)).read_bytes() == b""
