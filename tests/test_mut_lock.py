"""The wheel lock's checks (m3fuse/wheels/lock.py) one by one: the tests that kill its mutants
(`make mutation MODULE=m3fuse/wheels/lock.py`), beside tests/test_lock.py."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from m3fuse import safeio
from m3fuse.wheels import lock as lockmod
from m3fuse.wheels.lock import (LockedPackage, LockedWheel, LockError, add_wheel, load_lock, parse_lock,
                                read_lock_text, select_wheel, set_size, url_filename, url_problem)

SHA = "a" * 64
WHL = "demo_pkg-1.0-py3-none-any.whl"


def lock(url: str = f"https://example.invalid/{WHL}", extra: str = "", head: str = 'lock-version = "1.0"\n',
         pkg_extra: str = "", wheel_name: str = WHL, sha: str = SHA) -> str:
    return (f'{head}created-by = "tests"\n\n[[packages]]\nname = "demo-pkg"\nversion = "1.0"\n{pkg_extra}\n'
            f'[[packages.wheels]]\nname = "{wheel_name}"\nurl = "{url}"\nhashes = {{ sha256 = "{sha}" }}\n{extra}\n')


# Every refusal of a lock's content says in its headline that nothing happened; its hint names
# the fix and the command that re-creates the lock (m3fuse/wheels/lock.py, _bad).
NOTHING = "; nothing was downloaded or installed"


def refused(text: str, tmp_path: Path, *, spec: bool = False) -> LockError:
    with pytest.raises(LockError) as exc:
        parse_lock(text, tmp_path / "w.lock", spec=spec)
    e = exc.value
    assert e.details[0] == ("file", str(tmp_path / "w.lock"))
    assert e.headline.endswith(NOTHING), e.headline
    assert e.hint == f"fix that entry, or re-create it: `m3fuse lock add URL|FILE --lock {tmp_path / 'w.lock'}`"
    return e


# ----------------------------------------------------------------------------- the URL policy
@pytest.mark.parametrize("url", [
    "http://example.invalid/x.whl",
    "http://10.0.0.1/x.whl",
    "http://192.168.1.1/x.whl",
    "http://0.0.0.0/x.whl",
    "http://[::]/x.whl",
    "http://[fe80::1]/x.whl",
    "http://localhost.evil.example/x.whl",
    "http://127.0.0.1.evil.example/x.whl",
    "http://evil.example/127.0.0.1/x.whl",
    "http://evil.example/?host=localhost",
    "http://evil.example#@127.0.0.1/x.whl",
    "http:///x.whl",
    "HTTP://example.invalid/x.whl",
])
def test_plain_http_is_refused_to_any_host_but_this_machine(url):
    assert url_problem(url) == (f"url {url!r} uses plain http to a host other than this machine; use https "
                                f"(plain http is only accepted for 127.0.0.1, ::1 or localhost)")


@pytest.mark.parametrize("url", ["http://127.0.0.1/x.whl", "http://127.255.255.254:81/x.whl", "http://[::1]/x.whl",
                                 "http://localhost:8/x.whl", "http://LOCALHOST/x.whl",
                                 "http://localhost.localdomain/x.whl", "HTTP://127.0.0.1/x.whl"])
def test_plain_http_to_this_machine_is_accepted(url):
    assert url_problem(url) is None


def test_is_loopback():
    assert lockmod._is_loopback("localhost") and lockmod._is_loopback("LocalHost")
    assert lockmod._is_loopback("127.0.0.2") and lockmod._is_loopback("::1")
    assert not lockmod._is_loopback("") and not lockmod._is_loopback("10.0.0.1")
    assert not lockmod._is_loopback("localhost.evil") and not lockmod._is_loopback("::2")


@pytest.mark.parametrize("url,problem", [
    ("https://u:p@example.invalid/x.whl", "carries credentials; keep them out of the lock and let requests read them "
                                          "from ~/.netrc"),
    ("https://u@example.invalid/x.whl", "carries credentials"),
    ("https://:p@example.invalid/x.whl", "carries credentials"),
    ("http://u:p@127.0.0.1/x.whl", "carries credentials"),
    ("https:///x.whl", "has no host"),
    ("file://example.invalid/srv/x.whl", "names a remote host in a file:// URL; use file:///absolute/path"),
    ("file:x.whl", "is not an absolute file:// URL"),
    ("ftp://example.invalid/x.whl", "has scheme 'ftp'; only https, file and loopback http are accepted"),
    ("example.invalid/x.whl", "has scheme '(none)'; only https"),
    ("https://example.invalid:99999/x.whl", "is malformed ("),
    ("https://[::1/x.whl", "is malformed ("),
])
def test_other_url_refusals(url, problem):
    got = url_problem(url)
    assert got is not None and got.startswith(f"url {url!r} ") and problem in got, got


@pytest.mark.parametrize("url", ["https://example.invalid/x.whl", "HTTPS://example.invalid/x.whl", "file:///x.whl",
                                 "file://localhost/x.whl", "FILE:///x.whl"])
def test_accepted(url):
    assert url_problem(url) is None


def test_url_filename_is_the_decoded_last_segment():
    assert url_filename("https://h/a/b/flydsl-0.1%2Bd7-py3-none-any.whl?x=1") == "flydsl-0.1+d7-py3-none-any.whl"
    assert url_filename("https://h/plain.whl") == "plain.whl"
    assert url_filename("file:///a/b/c%20d.whl") == "c d.whl"


# ----------------------------------------------------------------------------- reading the file
def test_read_lock_text_refusals(tmp_path):
    with pytest.raises(LockError) as exc:
        read_lock_text(tmp_path / "nope")
    assert exc.value.headline == "the wheel lock does not exist" and exc.value.details == (("file", str(tmp_path / "nope")),)
    assert f"--lock {tmp_path / 'nope'}" in exc.value.hint
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(LockError) as exc:
        read_lock_text(fifo)
    assert exc.value.headline == "the wheel lock is refused" and exc.value.details[1][0] == "problem"
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(safeio.MAX_LOCK + 1)
    with pytest.raises(LockError, match="limit"):
        read_lock_text(big)
    at = tmp_path / "at"
    at.write_bytes(b"#" * safeio.MAX_LOCK)
    assert len(read_lock_text(at)) == safeio.MAX_LOCK
    bad = tmp_path / "bad"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(LockError) as exc:
        read_lock_text(bad)
    assert exc.value.headline == "the wheel lock cannot be read" and exc.value.details[1][0] == "error"
    link = tmp_path / "link"
    link.symlink_to(at)
    with pytest.raises(LockError, match="refused"):
        read_lock_text(link)


# ----------------------------------------------------------------------------- validation
def test_a_valid_lock_reads_every_field(tmp_path):
    text = lock(extra="size = 0", pkg_extra='[packages.tool.m3fuse]\nk = "v"\n')
    lk = parse_lock(text, tmp_path / "w.lock")
    (p,) = lk.packages
    assert lk.path == tmp_path / "w.lock" and lk.lock_version == "1.0"
    assert (p.name, p.version, p.tool, p.key) == ("demo-pkg", "1.0", {"m3fuse": {"k": "v"}}, "demo-pkg")
    assert p.wheels == (LockedWheel(WHL, f"https://example.invalid/{WHL}", SHA, 0),)
    assert lk.package("Demo_Pkg") is p and lk.package("other") is None
    assert parse_lock(lock(head='lock-version = "1.7"\n'), tmp_path / "w.lock", spec=False).lock_version == "1.7"
    # An upper-case hash is stored lower-case.
    assert parse_lock(lock(sha="A" * 64), tmp_path / "w").packages[0].wheels[0].sha256 == SHA


@pytest.mark.parametrize("head,problem", [
    ("", 'the key lock-version is missing (expected lock-version = "1.0")'),
    ("lock-version = 1\n", 'lock-version is 1, this m3fuse reads "1.x" only'),
    ('lock-version = "2.0"\n', "lock-version is '2.0', this m3fuse reads \"1.x\" only"),
    ('lock-version = "10.0"\n', "lock-version is '10.0'"),
])
def test_lock_version(tmp_path, head, problem):
    e = refused(lock(head=head), tmp_path)
    assert e.headline.startswith(f"the wheel lock is refused: {problem}") and e.details[1] == ("entry", "top level")


@pytest.mark.parametrize("text,where,problem", [
    ('lock-version = "1.0"\npackages = 3\n', "top level", "packages must be an array of tables ([[packages]])"),
    ('lock-version = "1.0"\npackages = [3]\n', "package #1", "is not a table"),
    ('lock-version = "1.0"\n[[packages]]\nversion = "1"\n', "package #1", "name is missing"),
    ('lock-version = "1.0"\n[[packages]]\nname = ""\n', "package #1", "name is missing"),
    ('lock-version = "1.0"\n[[packages]]\nname = "-x"\n', "package #1 (-x)", "'-x' is not a valid distribution name"),
    ('lock-version = "1.0"\n[[packages]]\nname = "x"\n', "package #1 (x)", "version is missing"),
    ('lock-version = "1.0"\n[[packages]]\nname = "x"\nversion = 1\n', "package #1 (x)", "version is missing"),
    ('lock-version = "1.0"\n[[packages]]\nname = "x"\nversion = "1"\nwheels = []\n', "package #1 (x)",
     "it lists no wheels (expected one or more [[packages.wheels]])"),
    ('lock-version = "1.0"\n[[packages]]\nname = "x"\nversion = "1"\nwheels = 3\n', "package #1 (x)",
     "it lists no wheels"),
])
def test_package_entries(tmp_path, text, where, problem):
    e = refused(text, tmp_path)
    assert e.headline.startswith(f"the wheel lock is refused: {problem}") and e.details[1] == ("entry", where)


def test_no_packages_is_an_empty_lock(tmp_path):
    assert parse_lock('lock-version = "1.0"\n', tmp_path / "w", spec=False).packages == ()


def test_the_same_distribution_twice_names_both_entries(tmp_path):
    second = lock().split("\n\n", 1)[1].replace('name = "demo-pkg"', 'name = "Demo_Pkg"')
    e = refused(lock() + "\n" + second, tmp_path)
    assert e.details[1] == ("entry", "package #2 (Demo_Pkg)")
    assert e.headline.endswith("the same distribution is already pinned by package #1" + NOTHING)


def test_the_same_wheel_twice(tmp_path):
    text = lock() + f'[[packages.wheels]]\nname = "{WHL}"\nurl = "https://e.invalid/{WHL}"\nhashes = {{ sha256 = "{SHA}" }}\n'
    e = refused(text, tmp_path)
    assert e.headline.endswith("the same wheel file name is listed twice" + NOTHING)


def test_tool_must_be_a_table(tmp_path):
    e = refused(lock(pkg_extra="tool = 3\n"), tmp_path)
    assert e.headline.endswith("tool must be a table ([packages.tool])" + NOTHING)


@pytest.mark.parametrize("wheel,problem", [
    ("wheels = [3]", "is not a table"),
    ('[[packages.wheels]]\nurl = "https://e.invalid/x"', "name (the wheel file name) is missing"),
    ('[[packages.wheels]]\nname = ""', "name (the wheel file name) is missing"),
    ('[[packages.wheels]]\nname = "a/demo_pkg-1.0-py3-none-any.whl"', "must be a bare file name"),
    ('[[packages.wheels]]\nname = "a\\\\demo_pkg-1.0-py3-none-any.whl"', "must be a bare file name"),
    ('[[packages.wheels]]\nname = ".demo_pkg-1.0-py3-none-any.whl"', "must be a bare file name"),
    ('[[packages.wheels]]\nname = "x.zip"', "is not a wheel file name"),
    ('[[packages.wheels]]\nname = "other-1.0-py3-none-any.whl"', "is other 1.0, but the package pins demo-pkg 1.0"),
    ('[[packages.wheels]]\nname = "demo_pkg-1.1-py3-none-any.whl"', "is demo-pkg 1.1, but the package pins"),
    (f'[[packages.wheels]]\nname = "{WHL}"', "url is missing"),
    (f'[[packages.wheels]]\nname = "{WHL}"\nurl = 3', "url is missing"),
    (f'[[packages.wheels]]\nname = "{WHL}"\nurl = "http://e.invalid/x"', "plain http"),
    (f'[[packages.wheels]]\nname = "{WHL}"\nurl = "https://e.invalid/x"', "hashes.sha256 is missing (every wheel"),
    (f'[[packages.wheels]]\nname = "{WHL}"\nurl = "https://e.invalid/x"\nhashes = 3', "hashes.sha256 is missing"),
    (f'[[packages.wheels]]\nname = "{WHL}"\nurl = "https://e.invalid/x"\nhashes = {{ md5 = "x" }}',
     "hashes.sha256 is missing"),
    (f'[[packages.wheels]]\nname = "{WHL}"\nurl = "https://e.invalid/x"\nhashes = {{ sha256 = 3 }}',
     "hashes.sha256 3 is not 64 hexadecimal digits"),
    (f'[[packages.wheels]]\nname = "{WHL}"\nurl = "https://e.invalid/x"\nhashes = {{ sha256 = "{SHA}0" }}',
     "is not 64 hexadecimal digits"),
    (f'[[packages.wheels]]\nname = "{WHL}"\nurl = "https://e.invalid/x"\nhashes = {{ sha256 = "{SHA}" }}\nsize = true',
     "size True is not a non-negative integer"),
    (f'[[packages.wheels]]\nname = "{WHL}"\nurl = "https://e.invalid/x"\nhashes = {{ sha256 = "{SHA}" }}\nsize = 1.5',
     "size 1.5 is not a non-negative integer"),
    (f'[[packages.wheels]]\nname = "{WHL}"\nurl = "https://e.invalid/x"\nhashes = {{ sha256 = "{SHA}" }}\nsize = -1',
     "size -1 is not"),
])
def test_wheel_entries(tmp_path, wheel, problem):
    text = 'lock-version = "1.0"\n[[packages]]\nname = "demo-pkg"\nversion = "1.0"\n' + wheel + "\n"
    e = refused(text, tmp_path)
    assert problem in e.headline, e.headline
    assert e.details[1][1].startswith("package #1 (demo-pkg)")
    if not wheel.startswith("wheels ="):
        assert e.details[1] == ("entry", "package #1 (demo-pkg), wheel #1")
    assert e.hint == f"fix that entry, or re-create it: `m3fuse lock add URL|FILE --lock {tmp_path / 'w.lock'}`"


# ----------------------------------------------------------------------------- PEP 751 and stamps
def test_spec_validation_and_its_stamp(tmp_path):
    no_created_by = lock().replace('created-by = "tests"\n', "")
    e = refused(no_created_by, tmp_path, spec=True)
    assert "created-by is missing; PEP 751 requires it" in e.headline and e.details[1] == ("entry", "created-by")
    assert parse_lock(no_created_by, tmp_path / "w.lock", spec=False).packages  # m3fuse's own gate passes it
    stamps = tmp_path / "cache" / "stamps"
    good = lock()
    parse_lock(good, tmp_path / "w.lock", stamps=stamps)
    (stamp,) = stamps.iterdir()
    assert stat.S_IMODE(stamps.stat().st_mode) == 0o700 & ~_umask()
    assert stamp.stat().st_size == 0 and stat.S_IMODE(stamp.stat().st_mode) == 0o600
    assert lockmod._stamp(stamps, good) == stamp and lockmod._stamp(stamps, good + " ") != stamp
    assert lockmod._stamp(None, good) is None
    # Another text validated later leaves its own stamp beside the first (the folder exists by then).
    parse_lock(good + "\n", tmp_path / "w.lock", stamps=stamps)
    assert sorted(stamps.iterdir()) == sorted([stamp, lockmod._stamp(stamps, good + "\n")])
    # A stamp for a text is what lets it skip the validator: planted for a text the validator refuses, it passes.
    bad_stamp = lockmod._stamp(stamps, no_created_by)
    with pytest.raises(LockError):
        parse_lock(no_created_by, tmp_path / "w.lock", stamps=stamps)
    assert not bad_stamp.exists()
    bad_stamp.touch()
    assert parse_lock(no_created_by, tmp_path / "w.lock", stamps=stamps).packages


def test_a_stamp_folder_that_cannot_be_written_only_costs_time(tmp_path):
    (tmp_path / "file").write_text("")
    parse_lock(lock(), tmp_path / "w.lock", stamps=tmp_path / "file" / "stamps")
    lockmod._write_stamp(None)


def test_pep751_findings_name_the_key(tmp_path):
    bad = lock().replace('name = "demo-pkg"', 'name = "demo-pkg"\nmarker = "python_version >="', 1)
    e = refused(bad, tmp_path, spec=True)
    assert e.headline.endswith("(PEP 751)" + NOTHING) and e.details[1][0] == "entry" and e.details[1][1] != "top level"


# ----------------------------------------------------------------------------- selection
def test_select_wheel_takes_the_best_ranked_tag():
    from packaging.tags import Tag

    w_any = LockedWheel("p-1.0-py3-none-any.whl", "https://e/a", SHA)
    w_311 = LockedWheel("p-1.0-cp311-cp311-linux_x86_64.whl", "https://e/b", SHA)
    pkg = LockedPackage("p", "1.0", (w_any, w_311))
    tags = [Tag("cp311", "cp311", "linux_x86_64"), Tag("py3", "none", "any")]
    assert select_wheel(pkg, tags) == w_311
    assert select_wheel(pkg, tags[1:]) == w_any
    assert select_wheel(pkg, [Tag("cp312", "cp312", "win_amd64")]) is None
    assert w_311.tags == frozenset({"cp311-cp311-linux_x86_64"})


# ----------------------------------------------------------------------------- editing
def test_add_to_a_missing_file_creates_a_valid_lock(tmp_path):
    path = tmp_path / "sub" / "deeper" / "w.lock"
    w = LockedWheel(WHL, f"https://example.invalid/{WHL}", SHA)
    assert add_wheel(path, "demo-pkg", "1.0", w) == "added"
    text = path.read_text()
    assert text.startswith("# Pinned wheels for m3fuse; see docs/wheels.md.\n")
    assert 'lock-version = "1.0"\ncreated-by = "m3fuse"' in text and "size" not in text
    assert load_lock(path).packages[0].wheels == (w,)
    assert [p.name for p in path.parent.iterdir()] == ["w.lock"]  # no temp file left


def test_add_to_an_empty_file(tmp_path):
    path = tmp_path / "w.lock"
    path.write_text("\n")
    assert add_wheel(path, "demo-pkg", "1.0", LockedWheel(WHL, f"file:///w/{WHL}", SHA)) == "added"


def test_add_repairs_a_missing_created_by_and_keeps_the_mode(tmp_path):
    path = tmp_path / "w.lock"
    path.write_text(lock().replace('created-by = "tests"\n', ""))
    path.chmod(0o640)
    w2 = LockedWheel("other-1.0-py3-none-any.whl", "https://example.invalid/other-1.0-py3-none-any.whl", "b" * 64)
    assert add_wheel(path, "other", "1.0", w2) == "added"
    text = path.read_text()
    assert text.startswith('lock-version = "1.0"\ncreated-by = "m3fuse"\n')
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in load_lock(path).packages] == ["demo-pkg", "other"]


def test_add_refuses_a_broken_lock_and_leaves_it(tmp_path):
    path = tmp_path / "w.lock"
    path.write_text(lock(sha="xyz"))
    with pytest.raises(LockError, match="not 64 hexadecimal"):
        add_wheel(path, "other", "1.0", LockedWheel("other-1.0-py3-none-any.whl", "https://e.invalid/o", SHA))
    assert path.read_text() == lock(sha="xyz")
    with pytest.raises(LockError) as exc:
        add_wheel(path, "x", "1.0", LockedWheel("x-1.0-py3-none-any.whl", "ftp://e/x", SHA))
    assert exc.value.details[1] == ("entry", "new wheel x-1.0-py3-none-any.whl")


def test_add_size_and_facts(tmp_path):
    path = tmp_path / "w.lock"
    path.write_text(lock())
    w = LockedWheel(WHL, f"https://example.invalid/{WHL}", SHA)
    assert add_wheel(path, "demo-pkg", "1.0", w) == "unchanged"
    # A size is added above hashes; then changed; then dropped.
    assert add_wheel(path, "demo-pkg", "1.0", LockedWheel(w.name, w.url, SHA, 7)) == "updated"
    text = path.read_text()
    assert text.index("size = 7") < text.index("hashes = { sha256")
    set_size(path, WHL, 9)
    assert load_lock(path).packages[0].wheels[0].size == 9
    assert add_wheel(path, "demo-pkg", "1.0", LockedWheel(w.name, w.url, SHA, None)) == "updated"
    assert "size" not in path.read_text()
    # A new url for the same file is an update too.
    assert add_wheel(path, "demo-pkg", "1.0", LockedWheel(w.name, f"file:///m/{WHL}", SHA)) == "updated"
    assert load_lock(path).packages[0].wheels[0].url == f"file:///m/{WHL}"
    assert add_wheel(path, "demo-pkg", "1.0", LockedWheel(w.name, f"file:///m/{WHL}", "b" * 64),
                     facts={"abi": "x"}) == "updated"
    p = load_lock(path).packages[0]
    assert p.wheels[0].sha256 == "b" * 64 and p.tool == {"m3fuse": {"abi": "x"}}
    assert "[packages.tool.m3fuse]" in path.read_text() and "[packages.tool]\n" not in path.read_text()
    with pytest.raises(LockError) as exc:
        set_size(path, "nope.whl", 1)
    assert exc.value.headline.endswith("no such wheel in the lock" + NOTHING)


def test_add_new_version_replaces_all_wheels(tmp_path):
    path = tmp_path / "w.lock"
    path.write_text(lock() + f'[[packages.wheels]]\nname = "demo_pkg-1.0-cp311-cp311-linux_x86_64.whl"\n'
                             f'url = "https://e.invalid/b.whl"\nhashes = {{ sha256 = "{SHA}" }}\n')
    w = LockedWheel("demo_pkg-1.0.0-py3-none-any.whl", "https://e.invalid/c.whl", SHA)
    # 1.0.0 == 1.0: the same version, so the wheel is appended, not a replacement.
    assert add_wheel(path, "demo-pkg", "1.0", w) == "added"
    assert len(load_lock(path).packages[0].wheels) == 3
    w2 = LockedWheel("demo_pkg-2.0-py3-none-any.whl", "https://e.invalid/d.whl", SHA)
    assert add_wheel(path, "demo-pkg", "2.0", w2) == "updated"
    assert load_lock(path).packages[0].wheels == (w2,) and load_lock(path).packages[0].version == "2.0"


def test_tidy_puts_one_blank_line_before_each_entry():
    assert lockmod._tidy('a = 1\n[[p]]\nx = 1\n# about q\n[[q]]\n\n\n') == 'a = 1\n\n[[p]]\nx = 1\n\n# about q\n[[q]]\n'
    assert lockmod._tidy('[[p]]\n') == '[[p]]\n'
    assert lockmod._tidy('# top\n[[p]]\n') == '# top\n[[p]]\n'
    assert lockmod._tidy('a = 1\n\n[[p]]\n') == 'a = 1\n\n[[p]]\n'


def test_atomic_write_leaves_no_temp_file_on_failure(tmp_path):
    path = tmp_path / "w.lock"
    path.write_text("old")
    os.chmod(path, 0o645)  # every bit, other-execute included, is kept
    lockmod._atomic_write(path, "new")
    assert path.read_text() == "new" and stat.S_IMODE(path.stat().st_mode) == 0o645
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.lock"]
    with pytest.raises(TypeError):
        lockmod._atomic_write(path, b"bytes")  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.lock"] and path.read_text() == "new"


def test_atomic_write_reports_the_write_error_even_when_its_temp_file_is_gone(tmp_path, monkeypatch):
    """The disk fails (EIO at fsync) after another process removed the temp file: the error the
    user sees is the disk's, not the cleanup's FileNotFoundError, and the old lock is untouched."""
    import errno

    path = tmp_path / "w.lock"
    path.write_text("old")

    def fsync_fails(fd):
        for p in tmp_path.iterdir():
            if p.name != "w.lock":
                p.unlink()
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(lockmod.os, "fsync", fsync_fails)
    with pytest.raises(OSError) as exc:
        lockmod._atomic_write(path, "new")
    monkeypatch.undo()
    assert exc.value.errno == errno.EIO and path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.lock"]


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_a_package_with_facts_is_still_hashable(tmp_path):
    p = parse_lock(lock(pkg_extra='[packages.tool.m3fuse]\nk = "v"\n'), tmp_path / "w", spec=False).packages[0]
    # The facts table takes no part in what a pin is: not in its hash, not in its equality.
    assert hash(p) == hash(LockedPackage(p.name, p.version, p.wheels)) and p == LockedPackage(p.name, p.version, p.wheels)


def test_a_wheel_appended_to_a_package_of_several_goes_below_the_last_one(tmp_path):
    path = tmp_path / "w.lock"
    w2 = "demo_pkg-1.0-cp311-cp311-linux_x86_64.whl"
    w3 = "demo_pkg-1.0-cp312-cp312-linux_x86_64.whl"
    path.write_text(lock() + f'\n[[packages.wheels]]\nname = "{w2}"\nurl = "https://e.invalid/{w2}"\n'
                             f'hashes = {{ sha256 = "{SHA}" }}\n\n# about other\n[[packages]]\nname = "other"\n'
                             f'version = "2.0"\n\n[[packages.wheels]]\nname = "other-2.0-py3-none-any.whl"\n'
                             f'url = "https://e.invalid/o.whl"\nhashes = {{ sha256 = "{SHA}" }}\n')
    assert add_wheel(path, "demo-pkg", "1.0", LockedWheel(w3, f"https://e.invalid/{w3}", SHA)) == "added"
    text = path.read_text()
    assert text.index(w2) < text.index(w3) < text.index("# about other") < text.index('name = "other"')
    assert "\n# about other\n[[packages]]\nname = \"other\"" in text
    assert [w.name for w in load_lock(path).packages[0].wheels] == [WHL, w2, w3]


def test_repairing_created_by_touches_only_the_top_level_key(tmp_path):
    """A multi-line string in a tool table may hold a line that looks like the key: it is text, kept."""
    path = tmp_path / "w.lock"
    note = 'note = """\nlock-version = "9"\n"""\n'
    path.write_text(lock(pkg_extra="[packages.tool.m3fuse]\n" + note).replace('created-by = "tests"\n', ""))
    add_wheel(path, "other", "1.0", LockedWheel("other-1.0-py3-none-any.whl", "https://e.invalid/o.whl", SHA))
    assert path.read_text().count('created-by = "m3fuse"') == 1
    assert load_lock(path).packages[0].tool == {"m3fuse": {"note": 'lock-version = "9"\n'}}


def test_a_lock_is_an_immutable_value(tmp_path):
    import dataclasses

    lk = parse_lock(lock(), tmp_path / "w", spec=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        lk.path = tmp_path  # type: ignore[misc]
