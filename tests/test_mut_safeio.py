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


def test_an_entry_that_vanishes_while_its_refusal_is_examined_fails_as_it_did(tmp_path, monkeypatch):
    """open_dir_at's open fails (a symlink where a folder belongs: ENOTDIR) and the entry is gone
    by the time it is looked at: the open's own error is raised, not FileNotFoundError (which
    walk_down's callers would take for "missing, create it")."""
    import errno

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    real_lstat = os.lstat

    def remove_then_lstat(path, *a, **kw):
        if path == "link":
            os.unlink(tmp_path / "link")  # the racing writer removes it first
        return real_lstat(path, *a, **kw)

    fd = os.open(tmp_path, os.O_RDONLY)
    monkeypatch.setattr(safeio.os, "lstat", remove_then_lstat)
    try:
        with pytest.raises(OSError) as exc:
            open_dir_at(fd, "link", shown="S")
    finally:
        monkeypatch.undo()
        os.close(fd)
    assert exc.value.errno == errno.ENOTDIR and not (tmp_path / "link").exists()


# ----------------------------------------------------------------------------- text
def test_decode_is_strict_utf8_naming_the_first_bad_byte(tmp_path):
    assert safeio.decode("é ok".encode(), "S") == "é ok"
    with pytest.raises(safeio.NotText) as exc:
        safeio.decode(b"ab\xffc\xfe", "S")
    assert (exc.value.path, exc.value.reason) == (Path("S"), "is not UTF-8 text (byte 2 is b'\\xff')")
    with pytest.raises(safeio.NotText) as exc:
        safeio.decode(b"\xc3", "S")  # cut in the middle of a character: the byte is the last one
    assert exc.value.reason == "is not UTF-8 text (byte 0 is b'\\xc3')"


def test_read_text_names_the_file_or_what_it_is_shown_as(tmp_path):
    p = tmp_path / "f.toml"
    p.write_bytes(b"ok = 1\n")
    assert safeio.read_text(p, 7) == "ok = 1\n"
    p.write_bytes(b"\xff")
    with pytest.raises(safeio.NotText) as exc:
        safeio.read_text(p, 7)
    assert exc.value.path == p
    with pytest.raises(safeio.NotText) as exc:
        safeio.read_text(p, 7, shown="pkg/f.toml")
    assert exc.value.path == Path("pkg/f.toml")


# ----------------------------------------------------------------------------- zip archives
# Each archive is written by zipfile and then one header field or data byte is changed, the
# way a damaged or hostile wheel differs from a real one (field offsets: PKWARE APPNOTE 4.3.7,
# 4.3.12, 4.3.16).
DATA = b"x = 1\n" * 50  # 300 bytes


def _zip(tmp_path: Path, comp: int = 0, data: bytes = DATA, edit=None, name: str = "w.whl") -> Path:  # noqa: ANN001
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", comp) as z:
        z.writestr("a.py", data)
    b = bytearray(buf.getvalue())
    if edit:
        edit(b, b.index(b"PK\x03\x04"), b.index(b"PK\x01\x02"), b.rindex(b"PK\x05\x06"))
    p = tmp_path / name
    p.write_bytes(bytes(b))
    return p


def _put(b: bytearray, at: int, fmt: str, value: int) -> None:
    import struct

    b[at:at + struct.calcsize(fmt)] = struct.pack(fmt, value)


def _member(p: Path, limit: int = 1000, **kw) -> bytes:  # noqa: ANN003
    with safeio.open_zip(p) as zf:
        return safeio.read_member(zf, "a.py", limit, **kw)


def test_the_member_limit():
    assert safeio.MAX_MEMBER == 16 << 20 and safeio.read_member.__defaults__ == (safeio.MAX_MEMBER,)


@pytest.mark.parametrize("edit,why", [
    (None, "File is not a zip file"),
    (lambda b, lh, cd, end: b.__setitem__(cd + 6, 74), "zip file version 7.4"),
    (lambda b, lh, cd, end: (_put(b, cd + 8, "<H", 0x800), b.__setitem__(cd + 46 + 1, 0xFF)),
     "'utf-8' codec can't decode byte 0xff in position 1: invalid start byte"),
])
def test_open_zip_refuses_what_zipfile_cannot_open(tmp_path, edit, why):
    p = tmp_path / "w.whl"
    if edit is None:
        p.write_bytes(b"PK not a zip at all")
    else:
        p = _zip(tmp_path, edit=edit)
    with pytest.raises(safeio.BadArchive) as exc:
        safeio.open_zip(p)
    assert (exc.value.path, exc.value.reason) == (p, f"is not a zip archive m3fuse can read ({why})")


def test_lzma_errors_are_caught_where_lzma_exists(monkeypatch):
    """On a Python built without lzma (stand-in: the module made unimportable) there is no
    LZMA error to catch; zipfile refuses such a member with RuntimeError, caught anyway."""
    import lzma
    import sys

    assert safeio._lzma_error() == (lzma.LZMAError,)
    monkeypatch.setitem(sys.modules, "lzma", None)
    assert safeio._lzma_error() == ()


@pytest.mark.parametrize("raised", [OSError(5, "Input/output error"), EOFError("cut"), KeyboardInterrupt()])
def test_open_zip_closes_its_descriptor_whatever_stops_it(tmp_path, monkeypatch, raised):
    """Stand-in for a disk error (EIO), a file cut while read, and a Ctrl-C while the central
    directory is read, none of which a file on a sane disk produces on demand: zipfile.ZipFile
    raises them. The descriptor is closed each time; the first two are a BadArchive."""
    import zipfile

    p = _zip(tmp_path)

    def fail(_f):  # noqa: ANN001
        raise raised

    before = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(zipfile, "ZipFile", fail)
    with pytest.raises(type(raised) if isinstance(raised, KeyboardInterrupt) else safeio.BadArchive) as exc:
        safeio.open_zip(p)
    monkeypatch.undo()
    assert len(os.listdir("/proc/self/fd")) == before
    if not isinstance(raised, KeyboardInterrupt):
        assert exc.value.reason == f"is not a zip archive m3fuse can read ({raised})"


def test_read_member_at_and_past_its_limit(tmp_path):
    p = _zip(tmp_path, 8)  # deflated
    assert _member(p, len(DATA)) == DATA and _member(p, len(DATA) + 1) == DATA
    with pytest.raises(TooLarge) as exc:
        _member(p, len(DATA) - 1)
    assert exc.value.limit == len(DATA) - 1 and exc.value.path == Path(f"{p}:a.py")  # named by the archive's path
    with pytest.raises(TooLarge) as exc:
        _member(p, 10, shown="pkg.whl")
    assert exc.value.path == Path("pkg.whl:a.py")


def test_read_member_shares_an_inflation_budget(tmp_path):
    p = _zip(tmp_path)
    budget = safeio.Inflation(len(DATA) * 2 - 1)
    assert budget.limit == budget.left == len(DATA) * 2 - 1
    assert _member(p, budget=budget) == DATA and budget.left == len(DATA) - 1
    with pytest.raises(TooLarge) as exc:
        _member(p, budget=budget)  # the member limit (1000) would pass it; what is left of the budget does not
    assert exc.value.limit == len(DATA) - 1 and budget.left == len(DATA) - 1


@pytest.mark.parametrize("comp,edit,why", [
    (0, lambda b, lh, cd, end: b.__setitem__(lh + 30 + 4, b[lh + 30 + 4] ^ 1), "Bad CRC-32 for file 'a.py'"),
    (0, lambda b, lh, cd, end: _put(b, cd + 10, "<H", 99), "That compression method is not supported"),
    (0, lambda b, lh, cd, end: _put(b, cd + 8, "<H", 1),
     "File <ZipInfo filename='a.py' filemode='?rw-------' file_size=300> is encrypted, password required for "
     "extraction"),
    (0, lambda b, lh, cd, end: (_put(b, cd + 20, "<I", 5000), _put(b, cd + 24, "<I", 5000)), "its data ends early"),
    # the central directory says it starts 1000 bytes later: every member's offset is then negative
    (0, lambda b, lh, cd, end: _put(b, end + 16, "<I", cd + 1000), "[Errno 22] Invalid argument"),
    (0, lambda b, lh, cd, end: (_put(b, lh + 6, "<H", 0x800), _put(b, cd + 8, "<H", 0x800),
                                b.__setitem__(lh + 30 + 1, 0xFF)),
     "'utf-8' codec can't decode byte 0xff in position 1: invalid start byte"),
    (12, lambda b, lh, cd, end: b.__setitem__(slice(lh + 34, lh + 37), b"XXX"), "Invalid data stream"),  # bzip2
    (8, lambda b, lh, cd, end: b.__setitem__(lh + 34, 0xFF), "Error -3 while decompressing data: invalid block type"),
    (14, lambda b, lh, cd, end: b.__setitem__(slice(lh + 43, lh + 47), b"\xff" * 4), "Corrupt input data"),  # lzma
])
def test_a_member_that_cannot_be_inflated_is_a_bad_archive(tmp_path, comp, edit, why):
    """zipfile's own errors and the decompressors' (zlib.error, lzma.LZMAError, bz2's OSError)
    alike: one BadArchive naming the member, never a traceback."""
    p = _zip(tmp_path, comp, edit=edit)
    with pytest.raises(safeio.BadArchive) as exc:
        _member(p, 10_000, shown="pkg.whl")
    assert (exc.value.path, exc.value.reason) == (Path("pkg.whl:a.py"), f"cannot be inflated ({why})")


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
