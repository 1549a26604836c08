"""Issue 25, part B, the download's own surfaces: one descriptor across retries (V14), an
overall deadline (V16), and a file:// lock entry that learns nothing about a foreign file by
comparison (V19). A real loopback HTTP server, real files."""

from __future__ import annotations

import hashlib
import http.server
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from m3fuse.errors import EnvironmentProblem, IntegrityError, UnsafePath, UsageProblem
from m3fuse.wheels.fetch import DEADLINE_VAR, FetchConfig, deadline_seconds, obtain
from m3fuse.wheels.lock import LockedWheel

from wheelkit import FaultServer

NAME = "demo_fly-0.1.0-py3-none-any.whl"
DATA = os.urandom(3 << 20)


def _wheel(url: str, data: bytes = DATA, size: bool = True) -> LockedWheel:
    return LockedWheel(NAME, url, hashlib.sha256(data).hexdigest(), len(data) if size else None)


def test_a_part_file_swapped_for_a_symlink_between_retries_is_never_written_through(tmp_path):
    """V14: the first attempt breaks half-way; before the retry another process of this user
    swaps the .part for a symlink to a file of root's. The retry writes through the descriptor
    it had, the victim is untouched, and the swapped name is refused, not published."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"root's file\n")
    swapped = []

    def echo(line: str) -> None:
        if "retry 1/" in line:
            for part in (tmp_path / "cache" / "tmp").glob("*.part"):
                part.unlink()
                part.symlink_to(victim)
                swapped.append(part)

    with FaultServer() as srv:
        url = srv.add(NAME, DATA, ["drop"])
        cfg = FetchConfig(cache_dir=tmp_path / "cache", backoff=0.01, read_timeout=2, progress=False, echo=echo)
        with pytest.raises(UnsafePath) as exc:
            obtain(_wheel(url), cfg)
    assert swapped, "the retry never came"
    assert victim.read_bytes() == b"root's file\n"
    assert "was replaced while the download was written into it" in exc.value.message
    assert not list((tmp_path / "cache" / "wheels").rglob("*.whl"))


class _Drip(http.server.BaseHTTPRequestHandler):
    """One byte every 0.2 s: each read returns well inside any read timeout, the file never ends."""

    def log_message(self, *a):  # noqa: ANN002
        pass

    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", str(len(DATA)))
        self.end_headers()
        try:
            for b in DATA:
                self.wfile.write(bytes([b]))
                self.wfile.flush()
                time.sleep(0.2)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture
def drip_url():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Drip)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/wheels/{NAME}"
    httpd.shutdown()
    httpd.server_close()


def test_a_trickling_server_is_stopped_by_the_overall_deadline(tmp_path, drip_url, monkeypatch):
    """V16: with a read timeout of 1 s no single read ever times out; the deadline ends it."""
    monkeypatch.delenv(DEADLINE_VAR, raising=False)
    cfg = FetchConfig(cache_dir=tmp_path / "cache", backoff=0.01, read_timeout=1.0, progress=False, deadline=1.5)
    t0 = time.monotonic()
    with pytest.raises(EnvironmentProblem) as exc:
        obtain(_wheel(drip_url), cfg)
    took = time.monotonic() - t0
    assert took < 6, took
    assert "did not finish within its 1.5-second deadline" in exc.value.message, exc.value.message
    assert "--download-deadline" in exc.value.message and DEADLINE_VAR in exc.value.message
    assert not list((tmp_path / "cache" / "tmp").glob("*.part"))


def test_the_deadline_comes_from_the_option_else_the_variable(tmp_path, drip_url, monkeypatch):
    monkeypatch.setenv(DEADLINE_VAR, "1")
    assert deadline_seconds() == 1.0 and deadline_seconds(7) == 7.0
    monkeypatch.delenv(DEADLINE_VAR)
    assert deadline_seconds() == 3600.0
    for bad in ("0", "-3", "soon", "inf", "nan"):
        monkeypatch.setenv(DEADLINE_VAR, bad)
        with pytest.raises(UsageProblem, match=DEADLINE_VAR):
            deadline_seconds()
    # Through the command line: the variable bounds `m3fuse fetch` as a user runs it.
    lock = tmp_path / "test.lock"
    w = _wheel(drip_url)
    lock.write_text(f'lock-version = "1.0"\ncreated-by = "t"\n\n[[packages]]\nname = "demo-fly"\nversion = "0.1.0"\n\n'
                    f'[[packages.wheels]]\nname = "{w.name}"\nurl = "{w.url}"\nsize = {w.size}\n'
                    f'hashes = {{ sha256 = "{w.sha256}" }}\n')
    env = {**os.environ, DEADLINE_VAR: "1", "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "m3fuse", "fetch", "--all", "--dest", str(tmp_path / "d"), "--lock",
                        str(lock)], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 5 and "1-second deadline" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 20
    r = subprocess.run([sys.executable, "-m", "m3fuse", "fetch", "--all", "--dest", str(tmp_path / "d"), "--lock",
                        str(lock), "--download-deadline", "0"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "--download-deadline 0" in r.stderr, r.stderr


def test_a_file_url_to_a_foreign_file_says_the_same_whatever_its_size(tmp_path):
    """V19: a lock entry pinning a size cannot learn, from the message, whether a file it names
    (not named like the wheel) is shorter, longer or as long as that size."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 1000)
    messages = []
    for size in (10, 1000, 5000, None):
        w = LockedWheel(NAME, secret.as_uri(), "0" * 64, size)
        with pytest.raises(IntegrityError) as exc:
            obtain(w, FetchConfig(cache_dir=tmp_path / f"cache{size}", progress=False))
        messages.append(exc.value.message.replace(f"cache{size}", "cache"))
        assert "1000" not in exc.value.message and "truncated" not in exc.value.message
        assert "shorter" not in exc.value.message and "larger" not in exc.value.message
    assert len(set(messages)) == 1, messages
