"""Downloads (m3fuse/wheels/fetch.py): redirects hop by hop, the size ceiling and the mismatch
report, against a real HTTP server on 127.0.0.1: the tests that kill its mutants
(`make mutation MODULE=m3fuse/wheels/fetch.py`), beside tests/test_fetch.py's fault matrix."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest

from m3fuse.errors import EnvironmentProblem, IntegrityError, RedirectRefused
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
    assert fetch._fmt_size(None) == "unknown size" and fetch._fmt_size(3) == "3 bytes"
