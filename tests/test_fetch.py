"""fetch: verified downloads into the content-addressed cache, against a loopback server
with injected faults. Every fault must end in the right bytes in the cache, or a clean
refusal (IntegrityError / EnvironmentProblem) that leaves no unverified file behind."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from m3fuse.errors import EXIT_ENVIRONMENT, EXIT_INTEGRITY, EnvironmentProblem, IntegrityError
from m3fuse.wheels.fetch import FetchConfig, cache_path, default_cache_dir, obtain
from m3fuse.wheels.lock import LockedWheel

from wheelkit import FaultServer, build_wheel, cache_is_clean

NAME = "demo_pkg-1.0+local-py3-none-any.whl"  # '+' travels as %2B in the URL


@pytest.fixture(scope="module")
def payload(tmp_path_factory) -> bytes:
    # A real wheel padded to ~600 kB so "half the body" is many chunks away from the end.
    d = tmp_path_factory.mktemp("payload")
    p = build_wheel(d, "demo-pkg", "1.0+local", {"demo_pkg/__init__.py": "", "demo_pkg/blob.bin": os.urandom(600_000)})
    return p.read_bytes()


def cfg_for(tmp_path: Path, **kw) -> FetchConfig:
    lines: list[str] = []
    kw.setdefault("retries", 3)
    kw.setdefault("progress", False)
    cfg = FetchConfig(cache_dir=tmp_path / "cache", backoff=0.01, connect_timeout=2, read_timeout=0.5,
                      echo=lines.append, **kw)
    cfg.lines = lines  # type: ignore[attr-defined]
    return cfg


def pin(data: bytes, url: str, size: bool = True) -> LockedWheel:
    return LockedWheel(NAME, url, hashlib.sha256(data).hexdigest(), len(data) if size else None)


# fault plan -> expected outcome: "ok", "integrity" (exit 4) or "environment" (exit 5).
# With retries=3 there are 4 attempts in all.
MATRIX = [
    (["ok"], "ok"),
    (["drop"], "ok"),  # resumed with Range (or restarted without)
    (["drop", "drop", "drop"], "ok"),
    (["drop"] * 4, "environment"),  # retries exhausted
    (["500"], "ok"),
    (["503-then-ok"], "ok"),
    (["500"] * 4, "environment"),
    (["stall"], "ok"),  # read timeout, then retry
    (["slow"], "ok"),  # trickles but within the timeout
    (["nolength"], "ok"),
    (["drop", "500", "stall"], "ok"),
    (["wrong"], "integrity"),  # same size, other bytes: refused, never retried into success
    (["short"], "integrity"),  # a consistently truncated file: refused, the size tells why
    (["bigger"], "integrity"),
    (["404"], "environment"),
]


@pytest.mark.parametrize("range_ok", [True, False], ids=["range", "norange"])
@pytest.mark.parametrize("plan, outcome", MATRIX, ids=["+".join(p) for p, _ in MATRIX])
def test_fault_matrix(tmp_path, payload, range_ok, plan, outcome):
    with FaultServer(range_ok=range_ok, stall_s=1.0) as srv:
        url = srv.add(NAME, payload, plan)
        assert "%2B" in url
        w = pin(payload, url)
        cfg = cfg_for(tmp_path)
        if outcome == "ok":
            path = obtain(w, cfg)
            assert path == cache_path(cfg.cache_root(), w)
            assert path.read_bytes() == payload
        else:
            exc = IntegrityError if outcome == "integrity" else EnvironmentProblem
            with pytest.raises(exc) as ei:
                obtain(w, cfg)
            assert ei.value.exit_code == (EXIT_INTEGRITY if outcome == "integrity" else EXIT_ENVIRONMENT)
            assert NAME in ei.value.message
            assert not cache_path(cfg.cache_root(), w).exists()
            if outcome == "integrity":
                msg = ei.value.message
                assert msg.startswith("THESE FILES DO NOT MATCH THE HASHES IN THE LOCK")
                assert f"    expected: sha256 {w.sha256}\n" in msg and re.search(r"^    got: +sha256 [0-9a-f]{64}$", msg, re.M)
                assert msg.splitlines()[-1].startswith("hint: ")
        assert cache_is_clean(cfg.cache_root()) == []
        log = list(srv.log)
    if plan[0] == "drop" and outcome == "ok" and plan[1:2] in ([], ["drop"]):
        # The second request resumes when the server honours Range, and starts over otherwise.
        assert log[1][1] is not None and log[1][1].startswith("bytes=")
        assert log[1][3] == (206 if range_ok else 200)


def test_truncation_and_tampering_are_told_apart(tmp_path, payload):
    with FaultServer() as srv:
        url = srv.add(NAME, payload, ["short"])
        with pytest.raises(IntegrityError) as short:
            obtain(pin(payload, url), cfg_for(tmp_path))
        srv.set_plan(NAME, ["wrong"])
        with pytest.raises(IntegrityError) as wrong:
            obtain(pin(payload, url), cfg_for(tmp_path))
    assert "truncated" in short.value.message and f"expected {len(payload)} bytes, got {len(payload) // 2}" in short.value.message
    assert "size is right" in wrong.value.message and "tampered" in wrong.value.message


def test_unsized_pin_still_hash_checked(tmp_path, payload):
    with FaultServer() as srv:
        url = srv.add(NAME, payload, ["short"])
        with pytest.raises(IntegrityError, match="pins no size"):
            obtain(pin(payload, url, size=False), cfg_for(tmp_path))
        srv.set_plan(NAME, ["drop"])
        assert obtain(pin(payload, url, size=False), cfg_for(tmp_path)).read_bytes() == payload


def test_resume_transfers_only_the_rest(tmp_path, payload):
    with FaultServer(range_ok=True) as srv:
        url = srv.add(NAME, payload, ["drop"])
        cfg = cfg_for(tmp_path)
        obtain(pin(payload, url), cfg)
        (_, _, _, s1), (_, rng, _, s2) = srv.log
    start = int(rng[len("bytes="):-1])
    assert s1 == 200 and s2 == 206 and 0 < start < len(payload)
    assert any("resuming at byte" in ln for ln in cfg.lines)


def test_cached_file_rehashed_and_replaced_when_damaged(tmp_path, payload):
    with FaultServer() as srv:
        url = srv.add(NAME, payload)
        w = pin(payload, url)
        cfg = cfg_for(tmp_path)
        p = obtain(w, cfg)
        assert len(srv.log) == 1
        assert obtain(w, cfg) == p and len(srv.log) == 1  # cache hit, no request
        p.write_bytes(b"rot" + payload[3:])  # bit rot / tampering on disk
        assert obtain(w, cfg).read_bytes() == payload
        assert len(srv.log) == 2
        assert any("no longer matches" in ln for ln in cfg.lines)


def test_no_network_when_cached_or_offline(tmp_path, payload):
    w = pin(payload, "https://unreachable.invalid/" + NAME)
    cfg = cfg_for(tmp_path)
    assert obtain(w, cfg, allow_network=False) is None


def test_find_links_and_file_url(tmp_path, payload):
    links = tmp_path / "links"
    links.mkdir()
    (links / NAME).write_bytes(payload)
    w = pin(payload, "https://unreachable.invalid/" + NAME)
    cfg = cfg_for(tmp_path, find_links=[links])
    assert obtain(w, cfg).read_bytes() == payload
    # file:// URL, with the '+' percent-encoded
    src = tmp_path / "srv" / NAME
    src.parent.mkdir()
    src.write_bytes(payload)
    w2 = pin(payload, src.parent.as_uri() + "/" + NAME.replace("+", "%2B"))
    assert obtain(w2, cfg_for(tmp_path / "c2")).read_bytes() == payload


def test_find_links_with_wrong_file_refused(tmp_path, payload):
    links = tmp_path / "links"
    links.mkdir()
    (links / NAME).write_bytes(payload[:-10])
    cfg = cfg_for(tmp_path, find_links=[links])
    with pytest.raises(IntegrityError, match="truncated"):
        obtain(pin(payload, "https://unreachable.invalid/" + NAME), cfg)
    assert cache_is_clean(cfg.cache_root()) == []
    assert (links / NAME).exists()  # the user's file is theirs: reported, not deleted


def test_missing_file_url(tmp_path, payload):
    w = pin(payload, (tmp_path / "absent" / NAME).as_uri())
    with pytest.raises(EnvironmentProblem, match="does not exist"):
        obtain(w, cfg_for(tmp_path))


def test_connection_refused_retries_then_fails(tmp_path, payload):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    cfg = cfg_for(tmp_path, retries=2)
    with pytest.raises(EnvironmentProblem, match="failed after 3 attempts"):
        obtain(pin(payload, f"http://127.0.0.1:{port}/{NAME}"), cfg)
    assert sum("retry" in ln for ln in cfg.lines) == 2
    assert cache_is_clean(cfg.cache_root()) == []


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "m3fuse"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "m3fuse"


def test_unwritable_cache_is_an_environment_problem(tmp_path, payload):
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("")
        cache = blocker / "cache"  # a path below a regular file can never be created
    else:  # pragma: no cover
        cache = Path("/proc/m3fuse-cache")
    cfg = FetchConfig(cache_dir=cache, backoff=0.01)
    with pytest.raises(EnvironmentProblem, match="--cache-dir"):
        obtain(pin(payload, "http://127.0.0.1:9/" + NAME), cfg)


def test_cached_install_path_does_not_import_requests(tmp_path, payload):
    links = tmp_path / "links"
    links.mkdir()
    (links / NAME).write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()
    code = (
        "import sys; from pathlib import Path\n"
        "from m3fuse.wheels.fetch import FetchConfig, obtain\nfrom m3fuse.wheels.lock import LockedWheel\n"
        f"w = LockedWheel({NAME!r}, 'https://unreachable.invalid/x.whl', {sha!r}, {len(payload)})\n"
        f"obtain(w, FetchConfig(cache_dir=Path({str(tmp_path / 'c')!r}), find_links=[Path({str(links)!r})]))\n"
        "print('requests' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_leftover_partial_files_are_dropped(tmp_path, payload):
    """A run killed mid-download leaves a .part in tmp/; the next run drops every partial
    file that no live run holds (flock), and keeps one that is being written."""
    import fcntl

    cfg = cfg_for(tmp_path)
    tmp = cfg.cache_root() / "tmp"
    tmp.mkdir(parents=True)
    dead, alive = tmp / "dead.part", tmp / "alive.part"
    dead.write_bytes(b"x")
    alive.write_bytes(b"y")
    fd = os.open(alive, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a concurrent m3fuse holds the file it writes
    try:
        with FaultServer() as srv:
            obtain(pin(payload, srv.add(NAME, payload)), cfg)
        assert not dead.exists() and alive.exists()
    finally:
        os.close(fd)


def _fetch_cli(tmp_path, srv, payload, stderr_tty: bool) -> str:
    """`m3fuse fetch` as a user runs it, stderr on a real terminal (a pty) or on a pipe."""
    import pty
    import subprocess

    from wheelkit import build_wheel, lock_text

    whl = build_wheel(tmp_path / "w", "demo-pkg", "1.0", {"demo_pkg/blob.bin": payload})
    lock = tmp_path / "p.lock"
    lock.write_text(lock_text([srv.pin("demo-pkg", "1.0", whl)]))
    cmd = [sys.executable, "-m", "m3fuse", "fetch", "--dest", str(tmp_path / "d"), "--lock", str(lock),
           "--cache-dir", str(tmp_path / "c"), "--python", sys.executable]
    if not stderr_tty:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    master, slave = pty.openpty()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=slave, check=True)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other side is closed and everything was read
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.returncode == 0
    return out.decode("utf-8", "replace")


def test_progress_bar_on_a_terminal_plain_lines_otherwise(tmp_path, payload):
    with FaultServer() as srv:
        tty = _fetch_cli(tmp_path / "tty", srv, payload, stderr_tty=True)
        assert "\r" in tty and "100%" in tty  # click's bar, redrawn in place
        plain = _fetch_cli(tmp_path / "pipe", srv, payload, stderr_tty=False)
    assert "\r" not in plain and "%" not in plain
    assert "downloading http://127.0.0.1" in plain and "sha256 ok" in plain


def test_progress_off_prints_nothing(tmp_path, payload, capsys):
    with FaultServer() as srv:
        obtain(pin(payload, srv.add(NAME, payload)), cfg_for(tmp_path / "b", progress=False))
    assert capsys.readouterr().err == ""


def test_a_name_that_does_not_resolve_fails_at_once_through_the_cli(tmp_path):
    """Issue 16: a DNS failure is printed once, with its cause; no four retries with backoff.
    `.invalid` never resolves (RFC 6761), with or without a network."""
    import subprocess
    import sys

    from wheelkit import build_wheel, lock_text

    whl = build_wheel(tmp_path / "w", "flydsl", "0.1.9")
    lock = tmp_path / "dns.lock"
    lock.write_text(lock_text([("flydsl", "0.1.9", [(whl, f"https://m3fuse-test.invalid/{whl.name}")])]))
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("https_proxy", "http_proxy", "all_proxy")}
    r = subprocess.run([sys.executable, "-m", "m3fuse", "fetch", "--dest", str(tmp_path / "d"), "--lock", str(lock),
                        "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 5, r.stdout + r.stderr
    assert "does not resolve" in r.stderr and "m3fuse-test.invalid" in r.stderr
    assert "retry" not in r.stderr and r.stderr.count("does not resolve") == 1
    assert "Traceback" not in r.stderr
