"""The bounded reader and the owned-folder check (m3fuse/safeio.py), case by case on real files,
FIFOs, sockets and symlinks: the tests that kill its mutants (`make mutation MODULE=m3fuse/safeio.py`).

A path swapped between the check and the open is planted for real at that instant: the test
wraps `os.lstat` so the swap happens right after safeio's lstat returned, which is the window a
racing writer has."""

from __future__ import annotations

import hashlib
import os
import socket
import stat
from pathlib import Path

import pytest

from m3fuse import safeio
from m3fuse.errors import UnsafePath
from m3fuse.safeio import (CHUNK, Escapes, NotRegular, TooLarge, Unsafe, hash_regular, kind_of, open_dir_at,
                           open_regular, own_dir, read_fd, read_head, read_regular, read_under, split_relative,
                           walk_down)


def _sock(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    return s


# ----------------------------------------------------------------------------- kinds and paths
def test_kind_of_every_file_type(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    os.mkfifo(tmp_path / "p")
    (tmp_path / "l").symlink_to(tmp_path / "f")
    s = _sock(tmp_path / "s")
    try:
        kinds = {n: kind_of(os.lstat(tmp_path / n).st_mode) for n in ("f", "p", "l", "s")}
    finally:
        s.close()
    assert kinds == {"f": "a regular file", "p": "a FIFO", "l": "a symbolic link", "s": "a socket"}
    assert kind_of(os.lstat(tmp_path).st_mode) == "a directory"
    assert kind_of(os.lstat("/dev/null").st_mode) == "a character device"
    assert kind_of(stat.S_IFBLK) == "a block device" and kind_of(0) == "of an unknown kind"


@pytest.mark.parametrize("rel,reason", [("", "not a relative path"), ("/a", "not a relative path"),
                                        ("a\x00b", "not a relative path"), ("a/../b", "holds '..', '.' or an empty"),
                                        ("./a", "holds"), ("a//b", "holds"), ("a/", "holds"), ("..", "holds")])
def test_split_relative_refuses(rel, reason):
    with pytest.raises(Escapes) as exc:
        split_relative(rel)
    assert exc.value.reason.startswith(reason) and exc.value.path == Path(rel)


def test_split_relative_splits():
    assert split_relative("a/b/c.py") == ["a", "b", "c.py"] and split_relative("x") == ["x"]


# ----------------------------------------------------------------------------- reads
def test_read_regular_at_and_past_the_limit(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"x" * 10)
    assert read_regular(p, 10) == b"x" * 10
    with pytest.raises(TooLarge) as exc:
        read_regular(p, 9)
    assert exc.value.limit == 9 and exc.value.reason == "larger than the 9-byte limit m3fuse reads"
    assert str(exc.value) == f"{p}: larger than the 9-byte limit m3fuse reads"
    assert read_regular(tmp_path / "f", 10, shown="S") == b"x" * 10


def test_read_fd_reads_across_chunks_and_stops_past_the_limit(tmp_path):
    p = tmp_path / "f"
    data = os.urandom(CHUNK * 2 + 5)
    p.write_bytes(data)
    fd = os.open(p, os.O_RDONLY)
    try:
        assert read_fd(fd, len(data), "s") == data
        os.lseek(fd, 0, 0)
        with pytest.raises(TooLarge):
            read_fd(fd, len(data) - 1, "s")  # a file that grew after its size was checked
        os.lseek(fd, 0, 0)
        assert read_fd(fd, len(data) + CHUNK * 3, "s") == data
    finally:
        os.close(fd)
    assert CHUNK == 1 << 20


@pytest.mark.parametrize("kind", ["fifo", "dir", "symlink", "socket", "device"])
def test_anything_but_a_regular_file_is_refused_unopened(tmp_path, kind):
    p = tmp_path / "x"
    s = None
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "dir":
        p.mkdir()
    elif kind == "symlink":
        (tmp_path / "t").write_bytes(b"t")
        p.symlink_to(tmp_path / "t")
    elif kind == "socket":
        s = _sock(p)
    else:
        p = Path("/dev/zero")
    try:
        with pytest.raises(NotRegular) as exc:
            read_regular(p, 100)
        assert exc.value.reason.endswith(", not a regular file") and exc.value.reason.startswith("is a")
        with pytest.raises(NotRegular):
            read_head(p, 1)
        with pytest.raises(NotRegular):
            hash_regular(p)
    finally:
        if s:
            s.close()


def test_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_regular(tmp_path / "nope", 10)


@pytest.mark.parametrize("swap", ["symlink", "fifo", "dir", "socket"])
def test_a_file_swapped_between_the_check_and_the_open_is_refused(tmp_path, monkeypatch, swap):
    p = tmp_path / "f"
    p.write_bytes(b"regular")
    (tmp_path / "secret").write_bytes(b"secret")
    real_lstat = os.lstat
    socks = []

    def lstat_then_swap(path, *a, **kw):
        st = real_lstat(path, *a, **kw)
        if Path(path) == p and p.exists() and not p.is_symlink() and p.is_file():
            p.unlink()
            if swap == "symlink":
                p.symlink_to(tmp_path / "secret")
            elif swap == "fifo":
                os.mkfifo(p)
            elif swap == "dir":
                p.mkdir()
            else:
                socks.append(_sock(p))
        return st

    monkeypatch.setattr(safeio.os, "lstat", lstat_then_swap)
    try:
        with pytest.raises(NotRegular) as exc:
            read_regular(p, 100)
    finally:
        monkeypatch.undo()
        for s in socks:
            s.close()
    if swap in ("symlink", "socket"):
        assert exc.value.reason == "was replaced by something other than a regular file"
    else:
        assert exc.value.reason == f"is {'a FIFO' if swap == 'fifo' else 'a directory'}, not a regular file"


def test_read_head_and_hash_regular(tmp_path):
    p = tmp_path / "f"
    data = os.urandom(CHUNK + 3)
    p.write_bytes(data)
    assert read_head(p, 4) == data[:4]
    assert hash_regular(p) == (hashlib.sha256(data).hexdigest(), len(data))
    assert hash_regular(p, len(data)) == (hashlib.sha256(data).hexdigest(), len(data))
    with pytest.raises(TooLarge):
        hash_regular(p, len(data) - 1)


def test_read_under_checks_every_folder_on_the_way(tmp_path):
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f.py").write_bytes(b"ok")
    assert read_under(root, "a/b/f.py", 10) == b"ok"
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "f.py").write_bytes(b"evil")
    (root / "a" / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(Escapes) as exc:
        read_under(root, "a/link/f.py", 10)
    assert exc.value.reason == "is a symbolic link, not a directory; m3fuse does not go through it"
    assert exc.value.path == root / "a" / "link"
    with pytest.raises(TooLarge) as exc:
        read_under(root, "a/b/f.py", 1)
    assert exc.value.path == root / "a/b/f.py"
    with pytest.raises(Escapes):
        read_under(root, "a/../a/b/f.py", 10)
    with pytest.raises(FileNotFoundError):
        read_under(root, "a/nope/f.py", 10)


def test_walk_down_creates_only_when_asked(tmp_path):
    with pytest.raises(FileNotFoundError):
        with walk_down(tmp_path, ["x", "y"]):
            pass
    with walk_down(tmp_path, ["x", "y"], create_mode=0o700) as fd:
        assert stat.S_ISDIR(os.fstat(fd).st_mode)
    assert stat.S_IMODE((tmp_path / "x" / "y").stat().st_mode) == 0o700 & ~_umask()
    (tmp_path / "file").write_bytes(b"")
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        with pytest.raises(Escapes) as exc:
            open_dir_at(fd, "file", shown="S", create_mode=0o700)
        assert exc.value.reason == "is a regular file, not a directory; m3fuse does not go through it"
    finally:
        os.close(fd)


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


# ----------------------------------------------------------------------------- writes
def test_write_new_at_never_overwrites_nor_follows(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        wfd = safeio.write_new_at(fd, "n", b"data" * 1000)
        os.close(wfd)
        assert (tmp_path / "n").read_bytes() == b"data" * 1000
        assert stat.S_IMODE((tmp_path / "n").stat().st_mode) == 0o600 & ~_umask()
        with pytest.raises(FileExistsError):
            safeio.write_new_at(fd, "n", b"x")
        (tmp_path / "l").symlink_to(tmp_path / "target")
        with pytest.raises(FileExistsError):
            safeio.write_new_at(fd, "l", b"x")
        assert not (tmp_path / "target").exists()
        assert safeio.unlink_at(fd, "l") and not safeio.unlink_at(fd, "l")
        safeio.replace_at(fd, "n", "m")
        assert (tmp_path / "m").read_bytes() == b"data" * 1000 and not (tmp_path / "n").exists()
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- owned folders
def test_own_dir_creates_private_folders(tmp_path):
    got = own_dir(tmp_path / "cache", "a", "b")
    assert got == tmp_path / "cache" / "a" / "b"
    for p in (tmp_path / "cache", got):
        assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0
    assert own_dir(tmp_path / "cache") == tmp_path / "cache"


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o720, 0o702])
def test_own_dir_refuses_a_folder_others_can_write(tmp_path, mode):
    d = tmp_path / "cache"
    d.mkdir()
    d.chmod(mode)
    with pytest.raises(Unsafe) as exc:
        own_dir(d)
    assert exc.value.reason == f"is writable by other users (mode {stat.filemode(d.stat().st_mode)})"
    d.chmod(0o755)
    assert own_dir(d) == d


def test_own_dir_refuses_a_symlink_anywhere(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "cache").symlink_to(tmp_path / "real")
    with pytest.raises(Unsafe) as exc:
        own_dir(tmp_path / "cache", "x")
    assert exc.value.reason.endswith(" (m3fuse did not make it)") and "symbolic link" in exc.value.reason
    (tmp_path / "c2").mkdir()
    (tmp_path / "c2" / "x").symlink_to(tmp_path / "real")
    with pytest.raises(Unsafe) as exc:
        own_dir(tmp_path / "c2", "x")
    assert exc.value.path == tmp_path / "c2" / "x"


def test_own_dir_under_a_shared_parent_needs_the_sticky_bit(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(Unsafe) as exc:
        own_dir(shared / "cache")
    assert exc.value.path == shared and "not sticky" in exc.value.reason and "cache with a symlink" in exc.value.reason
    shared.chmod(0o1777)
    assert own_dir(shared / "cache") == shared / "cache"


def test_own_dir_refuses_a_folder_of_another_user(tmp_path):
    if os.geteuid() == 0:
        d = tmp_path / "cache"
        d.mkdir(mode=0o700)
        os.chown(d, 12345, -1)
        owner = 12345
    else:  # a folder root owns
        d, owner = Path("/usr"), 0
    with pytest.raises(Unsafe) as exc:
        own_dir(d)
    assert exc.value.reason == f"is owned by uid {owner}, not by this user (uid {os.geteuid()})"


def test_own_dir_that_cannot_be_created(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(Unsafe) as exc:
        own_dir(tmp_path / "file" / "cache")
    assert exc.value.path == tmp_path / "file" and "cannot be created or examined" in exc.value.reason


def test_others_can_write():
    assert safeio.others_can_write(os.stat_result((0o100020,) + (0,) * 9))
    assert safeio.others_can_write(os.stat_result((0o100002,) + (0,) * 9))
    assert not safeio.others_can_write(os.stat_result((0o100755,) + (0,) * 9))


def test_refusal_names_the_path_the_reason_and_what_to_do():
    r = safeio.refusal(Unsafe("/p", "is odd"), hint="do X")
    assert isinstance(r, UnsafePath)
    assert r.headline == "/p: is odd; m3fuse refuses it and nothing was changed"
    assert r.details == (("path", "/p"), ("problem", "is odd")) and r.hint == "do X"
    assert safeio.refusal(Unsafe("/p", "r"), hint="h", nothing="N").headline.endswith("refuses it and N")


def test_limits():
    assert (safeio.MAX_SOURCE, safeio.MAX_SET_FILE, safeio.MAX_LOCK, safeio.MAX_RECORD) == \
        (16 << 20, 4 << 20, 4 << 20, 64 << 20)


# ----------------------------------------------------------------------------- survivors of the mutation run
def test_a_root_that_is_not_a_directory_is_refused(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        with walk_down(tmp_path / "file", []):
            pass


def test_a_folder_created_by_someone_else_in_the_window_is_used(tmp_path, monkeypatch):
    """Another process makes the folder between safeio's open (missing) and its mkdir: the
    mkdir's FileExistsError is the race, and the folder is then opened like any other."""
    real_mkdir = os.mkdir

    def mkdir_raced(name, mode=0o777, *, dir_fd=None):
        real_mkdir(name, 0o700, dir_fd=dir_fd)  # the other process wins
        return real_mkdir(name, mode, dir_fd=dir_fd)

    monkeypatch.setattr(safeio.os, "mkdir", mkdir_raced)
    with walk_down(tmp_path, ["made"], create_mode=0o700) as fd:
        assert stat.S_ISDIR(os.fstat(fd).st_mode)
    monkeypatch.undo()
    assert (tmp_path / "made").is_dir()


def test_a_failed_write_closes_its_descriptor(tmp_path):
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    d = os.open(tmp_path, os.O_RDONLY)
    try:
        before = open_fds()
        with pytest.raises(TypeError):
            safeio.write_new_at(d, "n", "text, not bytes")  # type: ignore[arg-type]
        assert open_fds() == before
    finally:
        os.close(d)


def test_own_dir_creates_missing_parents_private(tmp_path):
    got = own_dir(tmp_path / "a" / "b" / "cache")
    assert got == tmp_path / "a" / "b" / "cache"
    # The folder holding the cache is made 0700 (pathlib gives the folders above it the default mode).
    assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o700 & ~_umask()
