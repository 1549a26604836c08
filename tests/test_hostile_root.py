"""Issue 17: m3fuse runs as root (container builds, CI, shared caches). Each defect U1-U10 and
each traceback of the issue's probe is planted here for real (symlinks, FIFOs, a character
device, a real HTTP server that redirects or never ends, zip bombs, hostile work folders), and
every test asserts three things: the refusal (or the safe outcome) with its exit code, that
nothing outside the intended place changed (hash and listing), and that it ends: each test
runs under a deadline that fails it, and every CLI call under its own timeout.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import random
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

import faultkit
import realvllm
import samplesets
import wheelkit
from conftest import REPO

VERSION = "0.26.0"
HELPER, MODEL = realvllm.HELPER, realvllm.MODEL
SET = f"sample-{VERSION}"
CLI_TIMEOUT = 90
DEADLINE_S = 300
RACE_RUNS = 200
PYC = f"model.{sys.implementation.cache_tag}.pyc"


@pytest.fixture(autouse=True)
def deadline():
    """A test that blocks (a FIFO read, an endless body) fails here instead of hanging the suite."""
    def expire(signum, frame):  # noqa: ANN001
        raise TimeoutError(f"the test ran past its {DEADLINE_S} s deadline: something blocked")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, DEADLINE_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def listing(top: Path) -> dict[str, tuple]:
    """Every entry below (and of) `top` without following links: kind, mode, and the sha256 of
    a regular file or the target of a link. The 'nothing changed here' witness."""
    out: dict[str, tuple] = {}

    def one(p: Path) -> None:
        st = os.lstat(p)
        rel = str(p.relative_to(top)) if p != top else "."
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("link", os.readlink(p))
        elif stat.S_ISREG(st.st_mode):
            out[rel] = ("file", stat.S_IMODE(st.st_mode), hashlib.sha256(p.read_bytes()).hexdigest())
        else:
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode))

    one(top)
    for d, dirs, files in os.walk(top):
        for n in dirs + files:
            one(Path(d) / n)
    return out


def cli(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    r = subprocess.run(faultkit.cli_cmd(*args), capture_output=True, text=True, env=faultkit.cli_env(**env),
                       timeout=CLI_TIMEOUT, cwd=cwd)
    assert "Traceback" not in r.stderr, r.stderr
    return r


@pytest.fixture
def world(vllm_tree, tmp_path):
    root = vllm_tree(VERSION)
    sets = samplesets.sample_set(tmp_path / "sets", VERSION)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not m3fuse's\n")
    return root, sets, outside


def patch_args(command: str, root: Path, sets: Path) -> list[str]:
    return [command, "--vllm-root", str(root), "--patches", str(sets)] + (["--no-wheels"] if command == "install" else [])


# ---------------------------------------------------------------- temp files: by shape and owner

def test_only_m3fuse_shaped_temp_files_of_its_targets_are_removed(world):
    """An interrupted run's temp file (`.model.py.m3fuse-tmp-PID-8HEX`, regular, ours) is
    removed; files merely resembling one -- another file's name, another shape, a symlink with
    the exact name -- are left as they are."""
    root, sets, outside = world
    amd = (root / MODEL).parent
    real = amd / ".model.py.m3fuse-tmp-4242-0badc0de"
    real.write_bytes(b"half a file")
    lookalikes = {amd / ".notes.txt.m3fuse-tmp-1-deadbeef": b"a user's file",
                  amd / ".model.py.m3fuse-tmp-keep": b"a user's file",
                  amd / ".model.py.m3fuse-tmp-1-DEADBEEF": b"a user's file"}
    for p, data in lookalikes.items():
        p.write_bytes(data)
    target = outside / "victim"
    target.write_bytes(b"precious")
    link = amd / ".model.py.m3fuse-tmp-7-0123abcd"
    link.symlink_to(target)
    r = cli(*patch_args("install", root, sets))
    assert r.returncode == 0, r.stderr
    assert not real.exists() and f"removed {real}" in r.stderr + r.stdout
    assert all(p.read_bytes() == data for p, data in lookalikes.items())
    assert link.is_symlink() and target.read_bytes() == b"precious"


# ---------------------------------------------------------------- U1: symlinked __pycache__

@pytest.mark.parametrize("command", ["install", "revert"])
def test_u1_symlinked_pycache_deletes_nothing_outside(command, world):
    root, sets, outside = world
    if command == "revert":
        assert cli(*patch_args("install", root, sets)).returncode == 0
    amd = (root / MODEL).parent
    shutil.rmtree(amd / "__pycache__", ignore_errors=True)
    victims = outside / "pyc"
    victims.mkdir()
    for name in (PYC, "model.cpython-312.opt-1.pyc", "model.other.pyc"):
        (victims / name).write_bytes(b"someone else's bytecode")
    (amd / "__pycache__").symlink_to(victims)
    before_out, before_tree = listing(outside), listing(root)
    r = cli(*patch_args(command, root, sets))
    assert r.returncode == 5, (r.returncode, r.stderr)
    assert "__pycache__" in r.stderr and "symbolic link" in r.stderr and "nothing was changed" in r.stderr, r.stderr
    assert listing(outside) == before_out
    assert listing(root) == before_tree


def test_u1_bytecode_removal_never_follows_a_swapped_pycache(tmp_path):
    """Below the preflight: remove_bytecode itself refuses a __pycache__ that became a link."""
    from m3fuse import safeio
    from m3fuse.fingerprint import remove_bytecode

    src = tmp_path / "pkg" / "model.py"
    src.parent.mkdir()
    src.write_text("x = 1\n")
    victims = tmp_path / "victims"
    victims.mkdir()
    (victims / PYC).write_bytes(b"victim")
    (src.parent / "__pycache__").symlink_to(victims)
    before = listing(victims)
    with pytest.raises(safeio.Escapes, match="symbolic link"):
        remove_bytecode(src)
    assert listing(victims) == before


# ---------------------------------------------------------------- U2: FIFOs and devices

@pytest.mark.parametrize("command", ["status", "verify", "install"])
def test_u2_fifo_in_place_of_a_target_does_not_block(command, world):
    root, sets, outside = world
    (root / MODEL).unlink()
    os.mkfifo(root / MODEL)
    before = listing(root)
    args = patch_args(command, root, sets) if command == "install" else [command, "--vllm-root", str(root), "--patches", str(sets)]
    if command == "verify":
        args.append("--no-wheels")
    r = cli(*args)
    if command == "status":  # a report, not a check: it names the file's state and exits 0
        assert r.returncode == 0 and f"not-a-file {MODEL}" in r.stdout, (r.returncode, r.stdout, r.stderr)
    else:
        assert r.returncode == 5, (r.returncode, r.stdout, r.stderr)
        assert "not a regular file" in r.stderr, r.stderr
    assert listing(root) == before
    if command == "install":  # the tree lock was not left held: a second run takes it at once
        again = cli(*args, "--lock-timeout", "1")
        assert again.returncode == 5 and "not a regular file" in again.stderr, again.stderr


@pytest.mark.parametrize("command", ["status", "verify", "install"])
def test_u2_fifo_in_place_of_a_pyc_does_not_block(command, world):
    root, sets, outside = world
    cache = (root / MODEL).parent / "__pycache__"
    cache.mkdir(exist_ok=True)
    fifo = cache / PYC
    if fifo.exists():
        fifo.unlink()
    os.mkfifo(fifo)
    args = patch_args(command, root, sets) if command == "install" else [command, "--vllm-root", str(root), "--patches", str(sets)]
    if command == "verify":
        args += ["--no-wheels", "--expect", "pristine"]
    r = cli(*args)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    if command == "install":
        assert not os.path.lexists(fifo), "the tree's own bytecode entry is replaced with the source"
        assert faultkit.verify_json(root, sets)[0] == 0


@pytest.mark.parametrize("command", ["verify", "install"])
def test_u2_character_device_in_place_of_a_target_is_refused_unread(command, world):
    root, sets, outside = world
    (root / MODEL).unlink()
    os.mknod(root / MODEL, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero
    before = listing(root)
    r = cli(*patch_args(command, root, sets), *(["--no-wheels"] if command == "verify" else []))
    assert r.returncode == 5, (r.returncode, r.stderr)
    assert str(root / MODEL) in r.stderr and "not a regular file" in r.stderr, r.stderr
    assert listing(root) == before


@pytest.mark.parametrize("name", ["RECORD", "METADATA"])
def test_u2_fifo_in_the_vllm_dist_info_is_not_read(name, world):
    root, sets, outside = world
    planted = next(root.glob("vllm-*.dist-info")) / name
    planted.unlink()
    os.mkfifo(planted)
    r = cli("verify", "--no-wheels", "--expect", "pristine", "--vllm-root", str(root), "--patches", str(sets))
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------- U3: directory swapped mid-install

def test_u3_directory_swapped_for_a_symlink_during_install_never_writes_outside(world):
    """amd/ is swapped for a symlink to an outside copy, again and again, while install and
    revert run: RACE_RUNS installs, 0 writes outside (checked by hash and listing after each)."""
    from m3fuse.errors import M3fuseError
    from m3fuse.patching import engine
    from m3fuse.patching.patchset import load_all
    from m3fuse.target import from_root

    root, sets, outside = world
    vllm = from_root(root)
    loaded = load_all(sets, parse=True)
    amd = (root / MODEL).parent
    aside = amd.with_name("amd.aside")
    shutil.copytree(amd, outside / "amd", symlinks=True)
    before = listing(outside)
    racing, idle, stop = threading.Event(), threading.Event(), threading.Event()
    swaps = [0]
    rng = random.Random(17)

    def racer() -> None:
        while not stop.is_set():
            idle.set()
            if not racing.wait(0.05):
                continue
            idle.clear()
            # A random head start: some runs pass inspect and plan before the first swap, so
            # the swaps land on every step (reads, staging, renames, bytecode removal).
            time.sleep(rng.uniform(0, 0.04))
            while racing.is_set():
                os.rename(amd, aside)
                os.symlink(outside / "amd", amd)
                time.sleep(0)
                os.unlink(amd)
                os.rename(aside, amd)
                swaps[0] += 1

    t = threading.Thread(target=racer, daemon=True)
    t.start()
    outcomes = {"patched": 0, "refused": 0}
    writes_outside = 0
    try:
        for _ in range(RACE_RUNS):
            racing.set()
            try:
                engine.converge(vllm, loaded, engine.PATCHED, lock_timeout=5)
                outcomes["patched"] += 1
            except M3fuseError:
                outcomes["refused"] += 1
            racing.clear()
            idle.clear()
            assert idle.wait(10), "the racer did not stop"
            assert amd.is_dir() and not amd.is_symlink()
            writes_outside += listing(outside) != before
            engine.converge(vllm, loaded, engine.PRISTINE, lock_timeout=5)
    finally:
        stop.set()
        racing.clear()
        t.join(10)
    faultkit.record("u3-directory-swap-race", runs=RACE_RUNS, swaps=swaps[0], writes_outside=writes_outside, **outcomes)
    assert writes_outside == 0, (writes_outside, outcomes)
    assert listing(outside) == before
    assert swaps[0] > 0 and sum(outcomes.values()) == RACE_RUNS, (swaps, outcomes)
    assert faultkit.temp_files(root) == []


# ---------------------------------------------------------------- U4: zip bomb in the AITER check

AITER_CAR = "aiter/dist/device_communicators/custom_all_reduce.py"
AITER_V = "0.1.15.post1+test"


def _aiter_bomb(directory: Path, inflated: int) -> Path:
    source = wheelkit.aiter_source() + "#" * inflated + "\n"
    return wheelkit.build_wheel(directory, "amd-aiter", AITER_V, {
        "aiter/__init__.py": "", "aiter/dist/__init__.py": "", "aiter/dist/device_communicators/__init__.py": "",
        AITER_CAR: source})


def _lie_about_size(wheel: Path, member: str, declared: int) -> None:
    """Rewrite the member's uncompressed size in its local and central headers."""
    data = bytearray(wheel.read_bytes())
    with zipfile.ZipFile(wheel) as zf:
        info = zf.getinfo(member)
    struct.pack_into("<I", data, info.header_offset + 22, declared)
    central = data.find(b"PK\x01\x02" + bytes(0))
    while central != -1:
        n = struct.unpack_from("<H", data, central + 28)[0]
        if data[central + 46:central + 46 + n] == member.encode():
            struct.pack_into("<I", data, central + 24, declared)
            break
        central = data.find(b"PK\x01\x02", central + 4)
    wheel.write_bytes(bytes(data))


@pytest.mark.parametrize("lie", ["declared-huge", "declared-small"])
def test_u4_zip_bomb_in_the_aiter_content_check(lie, tmp_path):
    wheel = _aiter_bomb(tmp_path / "w", 64 << 20)  # 64 MiB of source, ~64 KB compressed
    if lie == "declared-huge":
        _lie_about_size(wheel, AITER_CAR, 0xFFFFFFF0)  # ~4 GiB declared
    else:
        _lie_about_size(wheel, AITER_CAR, 4096)
    lock = tmp_path / "bomb.lock"
    lock.write_text(wheelkit.lock_text([("amd-aiter", AITER_V, [(wheel, wheel.as_uri())])]))
    dest, cache = tmp_path / "dest", tmp_path / "cache"
    r = cli("fetch", "--all", "--dest", str(dest), "--lock", str(lock), "--cache-dir", str(cache))
    assert r.returncode == 4, (r.returncode, r.stderr)
    assert "nothing was installed" in r.stderr, r.stderr
    if lie == "declared-huge":
        assert "declares" in r.stderr and "zip bomb" in r.stderr, r.stderr
    assert not dest.exists() or list(dest.iterdir()) == []


def test_u4_member_over_the_limit_by_its_real_size(tmp_path):
    from m3fuse.wheels.check import MAX_MEMBER, WheelCheckError, check_aiter

    wheel = _aiter_bomb(tmp_path / "w", MAX_MEMBER + 1)
    with pytest.raises(WheelCheckError, match="over the .*-byte limit"):
        check_aiter(wheel)


# ---------------------------------------------------------------- U5/U6: a hostile server

class HostileServer:
    """A real HTTP server on 127.0.0.1: /endless streams zeros forever (no Content-Length),
    /wheel/NAME serves registered bytes, /to?u=URL answers 302 to URL."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.hits: list[str] = []
        server = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *a):  # noqa: ANN002
                pass

            def do_GET(self):  # noqa: N802
                from urllib.parse import parse_qs, unquote, urlsplit

                parts = urlsplit(self.path)
                server.hits.append(parts.path)
                if parts.path.startswith("/endless/"):
                    self.send_response(200)
                    self.end_headers()
                    chunk = b"\0" * (1 << 16)
                    try:
                        while True:
                            self.wfile.write(chunk)
                    except (BrokenPipeError, ConnectionResetError):
                        return
                if parts.path == "/to":
                    self.send_response(302)
                    self.send_header("Location", parse_qs(parts.query)["u"][0])
                    self.end_headers()
                    return
                data = server.files.get(unquote(parts.path))
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def add(self, wheel: Path) -> str:
        self.files[f"/wheel/{wheel.name}"] = wheel.read_bytes()
        from urllib.parse import quote

        return f"{self.base}/wheel/{quote(wheel.name)}"

    def redirect(self, to: str) -> str:
        from urllib.parse import quote

        return f"{self.base}/to?u={quote(to, safe='')}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = HostileServer()
    yield s
    s.close()


FLY_V = "0.1.9.dev1+abc"
FLY_NAME = f"demo_fly-{FLY_V}-py3-none-any.whl"


def _entry(url: str, sha: str = "0" * 64, size: int | None = None, name: str = FLY_NAME) -> str:
    return (f'lock-version = "1.0"\ncreated-by = "m3fuse-tests"\n\n[[packages]]\nname = "demo-fly"\nversion = "{FLY_V}"\n\n'
            f'[[packages.wheels]]\nname = "{name}"\nurl = "{url}"\n' + (f"size = {size}\n" if size is not None else "")
            + f'hashes = {{ sha256 = "{sha}" }}\n')


def _fetch(tmp_path: Path, lock_text: str, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    lock = tmp_path / "t.lock"
    lock.write_text(lock_text)
    cache = tmp_path / "cache"
    r = cli("fetch", "--all", "--dest", str(tmp_path / "dest"), "--lock", str(lock), "--cache-dir", str(cache), **env)
    return r, cache


def _no_partials(cache: Path) -> None:
    tmp = cache / "tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == [], list(tmp.iterdir())


@pytest.mark.parametrize("size", [1000, None])
def test_u5_file_dev_zero_is_refused_unread(size, tmp_path):
    r, cache = _fetch(tmp_path, _entry("file:///dev/zero", size=size))
    assert r.returncode == 5, (r.returncode, r.stderr)
    assert "/dev/zero" in r.stderr and "character device" in r.stderr, r.stderr
    assert "ermission" not in r.stderr, r.stderr
    _no_partials(cache)


def test_u5_endless_body_without_a_pinned_size_stops_at_the_ceiling(server, tmp_path):
    r, cache = _fetch(tmp_path, _entry(f"{server.base}/endless/{FLY_NAME}"), M3FUSE_MAX_WHEEL_BYTES=str(4 << 20))
    assert r.returncode == 4, (r.returncode, r.stderr)
    assert f"{4 << 20}-byte ceiling" in r.stderr and "M3FUSE_MAX_WHEEL_BYTES" in r.stderr, r.stderr
    _no_partials(cache)


def test_u5_endless_body_stops_at_the_pinned_size(server, tmp_path):
    r, cache = _fetch(tmp_path, _entry(f"{server.base}/endless/{FLY_NAME}", size=100_000))
    assert r.returncode == 4, (r.returncode, r.stderr)
    assert "larger than pinned" in r.stderr, r.stderr
    _no_partials(cache)


def test_u5_lock_add_of_an_endless_url_stops(server, tmp_path):
    lock, tmpdir = tmp_path / "new.lock", tmp_path / "tmpdir"
    tmpdir.mkdir()
    r = cli("lock", "add", f"{server.base}/endless/{FLY_NAME}", "--lock", str(lock), "--cache-dir", str(tmp_path / "c"),
            M3FUSE_MAX_WHEEL_BYTES=str(4 << 20), TMPDIR=str(tmpdir))
    assert r.returncode == 4, (r.returncode, r.stderr)
    assert "ceiling" in r.stderr
    assert not lock.exists() and list(tmpdir.iterdir()) == []


@pytest.mark.parametrize("source", ["file:///dev/zero", "/dev/zero", "file-link", "path-link"])
def test_u5_lock_add_never_hashes_a_device(source, tmp_path):
    lock = tmp_path / "new.lock"
    link = tmp_path / "zero.whl"
    link.symlink_to("/dev/zero")
    arg = {"file-link": link.as_uri(), "path-link": str(link)}.get(source, source)
    r = cli("lock", "add", arg, "--lock", str(lock))
    assert r.returncode in (2, 5), (r.returncode, r.stderr)
    assert re.search(r"does not name a \.whl file|neither a URL nor an existing wheel file|not a regular file", r.stderr), r.stderr
    assert not lock.exists()


def test_u6_redirect_to_a_refused_url_is_not_followed(server, tmp_path):
    target = "http://10.255.255.1/evil.whl"  # plain http off this machine: the lock itself refuses it
    r, cache = _fetch(tmp_path, _entry(server.redirect(target)))
    assert r.returncode == 4, (r.returncode, r.stderr)
    assert "redirected to a URL the lock policy refuses" in r.stderr and target in r.stderr, r.stderr
    _no_partials(cache)


def test_u6_redirect_to_file_is_refused_cleanly(server, tmp_path):
    secret = tmp_path / "secret.whl"
    secret.write_bytes(b"s3cret")
    r, cache = _fetch(tmp_path, _entry(server.redirect(secret.as_uri())))
    assert r.returncode == 4, (r.returncode, r.stderr)
    assert "leaves http(s)" in r.stderr, r.stderr
    assert hashlib.sha256(b"s3cret").hexdigest() not in r.stderr + r.stdout
    _no_partials(cache)


def test_u6_redirect_within_the_policy_still_works(server, tmp_path):
    wheel = wheelkit.build_wheel(tmp_path / "w", "demo-fly", FLY_V)
    r, cache = _fetch(tmp_path, _entry(server.redirect(server.add(wheel)), wheelkit.sha256_of(wheel),
                                       wheel.stat().st_size))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "dest" / wheel.name).read_bytes() == wheel.read_bytes()


# ---------------------------------------------------------------- U7: the cache is m3fuse's own

@pytest.fixture
def served_wheel(tmp_path):
    wheel = wheelkit.build_wheel(tmp_path / "w", "demo-fly", FLY_V)
    return wheel, _entry(wheel.as_uri(), wheelkit.sha256_of(wheel), wheel.stat().st_size)


def test_u7_symlinked_tmp_deletes_no_part_file_elsewhere(served_wheel, tmp_path):
    _, text = served_wheel
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "a.part").write_text("someone's download")
    (victim / "b.part").write_text("another")
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    (cache / "tmp").symlink_to(victim)
    before = listing(victim)
    r, _ = _fetch(tmp_path, text)
    assert r.returncode == 5, (r.returncode, r.stderr)
    assert "symbolic link" in r.stderr and "--cache-dir" in r.stderr, r.stderr
    assert listing(victim) == before


def test_u7_symlinked_hash_folder_neither_deletes_nor_replaces(served_wheel, tmp_path):
    wheel, text = served_wheel
    sha = wheelkit.sha256_of(wheel)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / wheel.name).write_text("a victim file named like the wheel")
    cache = tmp_path / "cache"
    (cache / "wheels" / "sha256" / sha[:2]).mkdir(parents=True)
    for d in (cache, cache / "wheels", cache / "wheels" / "sha256", cache / "wheels" / "sha256" / sha[:2]):
        d.chmod(0o700)
    (cache / "wheels" / "sha256" / sha[:2] / sha).symlink_to(victim)
    before = listing(victim)
    r, _ = _fetch(tmp_path, text)
    assert r.returncode == 5, (r.returncode, r.stderr)
    assert "symbolic link" in r.stderr, r.stderr
    assert listing(victim) == before


def test_u7_symlinked_m3fuse_folder_in_a_shared_xdg_cache(served_wheel, tmp_path):
    _, text = served_wheel
    shared, victim = tmp_path / "shared", tmp_path / "victim"
    shared.mkdir()
    victim.mkdir()
    (victim / "keep").write_text("x")
    (shared / "m3fuse").symlink_to(victim)
    before = listing(victim)
    lock = tmp_path / "t.lock"
    lock.write_text(text)
    r = cli("fetch", "--all", "--dest", str(tmp_path / "dest"), "--lock", str(lock), XDG_CACHE_HOME=str(shared))
    assert r.returncode == 5, (r.returncode, r.stderr)
    assert str(shared / "m3fuse") in r.stderr and "symbolic link" in r.stderr, r.stderr
    assert listing(victim) == before


@pytest.mark.parametrize("how", ["world-writable", "other-owner", "shared-parent"])
def test_u7_cache_another_user_can_write_is_refused(how, served_wheel, tmp_path):
    _, text = served_wheel
    cache = tmp_path / "cache"
    cache.mkdir()
    if how == "world-writable":
        cache.chmod(0o777)
        want = "writable by other users"
    elif how == "other-owner":
        os.chown(cache, 65534, 65534)
        want = "owned by uid 65534"
    else:
        shared = tmp_path / "shared"
        shared.mkdir()
        shared.chmod(0o777)  # not sticky: anyone could swap the cache for a link
        cache = shared / "cache"
        want = "not sticky"
    lock = tmp_path / "t.lock"
    lock.write_text(text)
    r = cli("fetch", "--all", "--dest", str(tmp_path / "dest"), "--lock", str(lock), "--cache-dir", str(cache))
    assert r.returncode == 5, (r.returncode, r.stderr)
    assert want in r.stderr and "--cache-dir" in r.stderr, r.stderr
    assert not (tmp_path / "dest").exists()


def test_u7_a_new_cache_is_private(served_wheel, tmp_path):
    wheel, text = served_wheel
    r, cache = _fetch(tmp_path, text)
    assert r.returncode == 0, r.stderr
    for d in [cache, *(p for p in cache.rglob("*") if p.is_dir())]:
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


# ---------------------------------------------------------------- U8: '..' in an installed RECORD

def test_u8_record_paths_outside_site_packages_are_never_read(tmp_path):
    """A plain venv layout (read in-process, as m3fuse does for one) whose dist-info RECORD
    lists ../ paths to /dev/zero, a FIFO and a symlink out: the probe ends, none is read."""
    from m3fuse.fingerprint import read_record
    from m3fuse.wheels.install import probe

    venv = tmp_path / "venv"
    site = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    (venv / "bin").mkdir(parents=True)
    site.mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\ninclude-system-site-packages = false\n")
    (venv / "bin" / "python").symlink_to(sys.executable)
    info = site / f"demo_fly-{FLY_V}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: demo-fly\nVersion: {FLY_V}\n")
    (site / "demo_fly").mkdir()
    os.mkfifo(site / "demo_fly" / "fifo.py")
    (site / "demo_fly" / "link.py").symlink_to("/dev/zero")
    depth = "/".join([".."] * len(site.parts))
    h = "sha256=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    (info / "RECORD").write_text(f"{depth}/dev/zero,{h},1\n/dev/zero,{h},1\ndemo_fly/fifo.py,{h},1\n"
                                 f"demo_fly/link.py,{h},1\n{info.name}/RECORD,,\n")
    got = probe(str(venv / "bin" / "python"), ["demo-fly"])["dists"]["demo-fly"]
    assert got["version"] == FLY_V
    assert sorted(got["problems"]) == ["unreadable: demo_fly/fifo.py (not a regular file)",
                                       "unreadable: demo_fly/link.py (not a regular file)"], got
    assert read_record(info).keys() == {"demo_fly/fifo.py", "demo_fly/link.py"}


# ---------------------------------------------------------------- U9: port --resume

def _work_folder(tmp_path: Path, merged: bytes | None = None) -> Path:
    work = tmp_path / "work"
    pristine = realvllm.read_member(VERSION, MODEL)
    (work / "pristine" / Path(MODEL).parent).mkdir(parents=True)
    (work / "merged" / Path(MODEL).parent).mkdir(parents=True)
    (work / "pristine" / MODEL).write_bytes(pristine)
    (work / "merged" / MODEL).write_bytes(merged if merged is not None else samplesets.patched_bytes(VERSION, MODEL))
    meta = {"format": 1, "name": "ported-test", "versions": [VERSION], "summary": "test", "ported-from": SET,
            "files": [{"path": MODEL, "ported-from": SET, "pristine-sha256": hashlib.sha256(pristine).hexdigest(),
                       "conflicts": [], "compile-error": None}]}
    (work / "port.json").write_text(json.dumps(meta))
    work.chmod(0o700)
    return work


def _resume(work: Path, out: Path, sets: Path) -> subprocess.CompletedProcess:
    return cli("port", "--resume", str(work), "--out", str(out), "--patches", str(sets))


@pytest.mark.parametrize("plant", ["merged-file-link", "merged-dir-link", "port-json-link", "pristine-link"])
def test_u9_resume_follows_no_symlink(plant, world, tmp_path):
    root, sets, outside = world
    secret = outside / "secret.py"
    secret.write_text("TOKEN = 'hunter2-very-secret'\n")
    secret.chmod(0o600)
    work = _work_folder(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    if plant == "merged-file-link":
        (work / "merged" / MODEL).unlink()
        (work / "merged" / MODEL).symlink_to(secret)
    elif plant == "merged-dir-link":
        shutil.rmtree(work / "merged")
        (work / "merged").symlink_to(outside)
    elif plant == "port-json-link":
        (work / "port.json").unlink()
        (work / "port.json").symlink_to("/etc/shadow" if Path("/etc/shadow").exists() else secret)
    else:
        (work / "pristine" / MODEL).unlink()
        (work / "pristine" / MODEL).symlink_to(secret)
    before = listing(outside)
    r = _resume(work, out, sets)
    assert r.returncode == 5, (r.returncode, r.stderr)
    assert "symbolic link" in r.stderr and "nothing was written" in r.stderr, r.stderr
    assert list(out.iterdir()) == []
    assert "hunter2" not in r.stdout + r.stderr
    assert listing(outside) == before


def test_u9_resume_refuses_a_work_folder_others_can_write(world, tmp_path):
    root, sets, outside = world
    work = _work_folder(tmp_path)
    work.chmod(0o777)
    out = tmp_path / "out"
    out.mkdir()
    r = _resume(work, out, sets)
    assert r.returncode == 5 and "writable by other users" in r.stderr, r.stderr
    assert list(out.iterdir()) == []


def test_u9_written_set_keeps_no_more_than_the_sources_permissions(world, tmp_path):
    root, sets, outside = world
    work = _work_folder(tmp_path)
    (work / "merged" / MODEL).chmod(0o600)
    out = tmp_path / "out"
    out.mkdir()
    r = _resume(work, out, sets)
    assert r.returncode == 0, r.stderr
    written = out / "ported-test"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in written.iterdir()}
    assert modes and all(m & 0o077 == 0 for m in modes.values()), modes
    assert stat.S_IMODE(written.stat().st_mode) & 0o077 == 0


def test_traceback_lone_surrogate_in_port_json(world, tmp_path):
    root, sets, outside = world
    work = _work_folder(tmp_path)
    meta = json.loads((work / "port.json").read_text())
    (work / "port.json").write_text(json.dumps(meta).replace('"ported-test"', '"bad\\ud800name"'))
    out = tmp_path / "out"
    out.mkdir()
    r = _resume(work, out, sets)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "not a readable port work file" in r.stderr, r.stderr
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------- U10: port's cleanup

def test_u10_cleanup_removes_only_marked_stage_folders(pristine_trees, vllm_tree, tmp_path):
    """A work folder in the current directory (the old default): a hidden folder merely named
    like a stage (~/.ssh.port-forwards) survives; a marked stage of a killed run is removed."""
    from m3fuse.patching import portfs

    root = vllm_tree("0.28.0")
    sets = tmp_path / "sets"
    for name in ("vllm-0.26.0", "vllm-0.33.0"):
        shutil.copytree(REPO / "patches" / name, sets / name)
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    out.mkdir()
    for d in (cwd, out):
        keep = d / ".ssh.port-forwards"
        keep.mkdir()
        (keep / "config").write_text("precious\n")
        odd = d / ".x.port-1-abcd"
        odd.mkdir()
        (odd / portfs.MARKER).write_text("not the marker text\n")
    stale = cwd / ".old.port-999-dead"
    stale.mkdir()
    (stale / portfs.MARKER).write_bytes(portfs.MARKER_TEXT)
    kept = {d: listing(d / ".ssh.port-forwards") for d in (cwd, out)}
    r = cli("port", "--vllm-root", str(root), "--from", "vllm-0.26.0", "--name", "vllm-0.28.0-t", "--edit",
            "--out", str(out), "--patches", str(sets), "--base-root", str(pristine_trees("0.26.0")),
            "--base-root", str(pristine_trees("0.33.0")), "--workdir", "m3fuse-port-vllm-0.28.0-t", cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert (cwd / "m3fuse-port-vllm-0.28.0-t" / "port.json").is_file()
    assert stat.S_IMODE((cwd / "m3fuse-port-vllm-0.28.0-t").stat().st_mode) == 0o700
    assert not (cwd / "m3fuse-port-vllm-0.28.0-t" / portfs.MARKER).exists()
    assert not stale.exists(), "a marked stage of a killed run is cleaned"
    for d in (cwd, out):
        assert listing(d / ".ssh.port-forwards") == kept[d]
        assert (d / ".x.port-1-abcd").is_dir()


def test_port_refuses_out_or_workdir_inside_the_vllm_tree(world):
    root, sets, outside = world
    before = listing(root)
    for flag in ("--out", "--workdir"):
        r = cli("port", "--vllm-root", str(root), "--from", SET, "--name", "x", flag, str(root / "vllm" / "ported"),
                "--patches", str(sets))
        assert r.returncode == 2, (r.returncode, r.stderr)
        assert "inside the vLLM tree" in r.stderr, r.stderr
    assert listing(root) == before


# ---------------------------------------------------------------- traceback cases and the rest

def test_traceback_deeply_nested_toml_manifest_and_lock(world, tmp_path):
    root, sets, outside = world
    manifest = sets / SET / "manifest.toml"
    manifest.write_text(manifest.read_text() + "deep = " + "[" * 5000 + "]" * 5000 + "\n")
    before = listing(root)
    r = cli(*patch_args("install", root, sets))
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert "not valid TOML" in r.stderr and "nested" in r.stderr, r.stderr
    lock = tmp_path / "deep.lock"
    lock.write_text('lock-version = "1.0"\nx = ' + "{a = " * 3000 + "1" + "}" * 3000 + "\n")
    r = cli("fetch", "--all", "--dest", str(tmp_path / "d"), "--lock", str(lock), "--cache-dir", str(tmp_path / "c"))
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "not valid TOML" in r.stderr and "nested" in r.stderr, r.stderr
    assert listing(root) == before


def test_traceback_manifest_with_non_utf8_bytes(world):
    root, sets, outside = world
    manifest = sets / SET / "manifest.toml"
    manifest.write_bytes(manifest.read_bytes().replace(b"test sample set", b"test \xff\xfe set"))
    before = listing(root)
    r = cli(*patch_args("install", root, sets))
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert "not UTF-8" in r.stderr, r.stderr
    assert listing(root) == before


@pytest.mark.parametrize("command", ["install", "fetch", "lock-add"])
def test_traceback_lock_dev_zero(command, world, tmp_path):
    root, sets, outside = world
    args = {"install": ["install", "--vllm-root", str(root), "--patches", str(sets), "--no-patches"],
            "fetch": ["fetch", "--all", "--dest", str(tmp_path / "d")],
            "lock-add": ["lock", "add", str(wheelkit.build_wheel(tmp_path / "w", "demo-fly", FLY_V))]}[command]
    r = cli(*args, "--lock", "/dev/zero", "--cache-dir", str(tmp_path / "c"))
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "/dev/zero" in r.stderr and "character device" in r.stderr, r.stderr


def test_a_set_may_patch_only_py_files_under_vllm(world):
    root, sets, outside = world
    manifest = sets / SET / "manifest.toml"
    manifest.write_text(manifest.read_text().replace(f'path = "{MODEL}"', 'path = "distutils-precedence.pth"'))
    before = listing(root)
    r = cli(*patch_args("install", root, sets))
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert "not a .py file under vllm/" in r.stderr, r.stderr
    assert listing(root) == before


def test_home_empty_never_puts_the_cache_at_root(monkeypatch):
    import pwd

    from m3fuse import resources

    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    for home in ("", "/", "relative/dir"):
        monkeypatch.setenv("HOME", home)
        got = resources.cache_dir()
        assert got == Path(pwd.getpwuid(os.geteuid()).pw_dir) / ".cache" / "m3fuse", (home, got)
        assert got != Path("/.cache/m3fuse")
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", "")
    assert resources.cache_dir().is_absolute()


def test_integrity_error_shows_no_hash_or_size_of_a_file_outside(tmp_path):
    secret = tmp_path / "shadow"
    secret.write_bytes(b"root:$6$salt$hash:19000:0:99999:7:::\n")
    secret.chmod(0o600)
    leaks = [hashlib.sha256(secret.read_bytes()).hexdigest(), str(secret.stat().st_size)]
    texts = [_entry(secret.as_uri(), size=4096)]
    if Path("/etc/shadow").is_file():
        real = Path("/etc/shadow").read_bytes()
        leaks += [hashlib.sha256(real).hexdigest()]
        texts.append(_entry("file:///etc/shadow"))
    for text in texts:
        r, _ = _fetch(tmp_path, text)
        assert r.returncode == 4, (r.returncode, r.stderr)
        assert "not shown" in r.stderr, r.stderr
        for leak in leaks:
            assert leak not in r.stdout + r.stderr.replace(str(tmp_path), ""), leak


def test_a_path_renamed_while_it_is_resolved_is_a_clean_refusal(tmp_path, monkeypatch):
    """os.path.realpath itself fails when a link on the way goes away mid-walk (found by the
    U3 race under load): that is an EnvironmentProblem naming the file, not a traceback."""
    from m3fuse.errors import EnvironmentProblem
    from m3fuse.patching import patchset

    def vanishing(path, *a, **k):
        raise FileNotFoundError(2, "No such file or directory", str(path))

    monkeypatch.setattr(patchset.os.path, "realpath", vanishing)
    with pytest.raises(EnvironmentProblem, match=r"vllm/models/minimax_m3/amd/model.py: its path changed"):
        patchset.resolve_inside(tmp_path, MODEL)
