"""wheels.lock: parsing, validation refusals (m3fuse's own and packaging's PEP 751 validator),
tag selection, and the comment-keeping editor (tomlkit)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from m3fuse.errors import EXIT_USAGE
from m3fuse.wheels.lock import (LockedPackage, LockedWheel, LockError, add_wheel, load_lock, parse_lock,
                                select_wheel, url_problem)
from m3fuse.resources import default_lock

SHA = "a" * 64
WHL = "demo_pkg-1.0-py3-none-any.whl"


def lock(url: str = f"https://example.invalid/{WHL}", sha: str | None = SHA, extra: str = "",
         name: str | None = "demo-pkg", version: str = "1.0", wheel_name: str = WHL) -> str:
    hashes = f'hashes = {{ sha256 = "{sha}" }}' if sha is not None else ""
    nm = f'name = "{name}"' if name is not None else ""
    return (f'lock-version = "1.0"\ncreated-by = "tests"\n\n[[packages]]\n{nm}\nversion = "{version}"\n\n'
            f'[[packages.wheels]]\nname = "{wheel_name}"\nurl = "{url}"\n{hashes}\n{extra}\n')


def test_shipped_lock_pins_the_validated_builds():
    lk = load_lock(default_lock())
    assert [(p.name, p.version) for p in lk.packages] == [
        ("flydsl", "0.1.9.dev20260529+d7ae22d"),
        ("amd-aiter", "0.1.15.post1+rocm7.2.manylinux.2.28"),
    ]
    fly, aiter = (p.wheels[0] for p in lk.packages)
    assert fly.sha256 == "8f3de2a83c7f3775962edb4ac929612956c4b4bb358c0ea5fa97643d3397791d"
    assert aiter.sha256 == "c4ccc510f223f36d9ca69f70cd817e373869e2caac98465e6ab527d9b2cfc1e1"
    assert fly.url.endswith("/whl-staging/gfx942-gfx950/flydsl-0.1.9.dev20260529%2Bd7ae22d-cp312-cp312-manylinux_2_27_x86_64.whl")
    assert aiter.url.startswith("https://github.com/ROCm/aiter/releases/download/v0.1.15.post1/amd_aiter-0.1.15.post1%2Brocm7.2")
    assert fly.size is None and aiter.size is None
    assert "cp312-cp312-manylinux_2_28_x86_64" in aiter.tags


def test_shipped_lock_is_a_valid_pep751_document():
    from packaging.pylock import Pylock, is_valid_pylock_path

    from m3fuse import tomlread

    pylock = Pylock.from_dict(tomlread.loads(default_lock().read_text()))
    pylock.validate()
    assert pylock.created_by == "m3fuse" and [p.name for p in pylock.packages] == ["flydsl", "amd-aiter"]
    # The copy the docs tell people to make is a file name PEP 751 tools look for.
    assert is_valid_pylock_path(Path("pylock.m3fuse.toml"))
    # And packaging's own selection picks the same wheel as m3fuse for a CPython 3.12 target.
    from packaging.tags import cpython_tags

    tags = list(cpython_tags((3, 12), ["cp312"], [f"manylinux_2_{m}_x86_64" for m in range(28, 16, -1)]))
    chosen = {p.name: w.filename for p, w in pylock.select(tags=tags, environment={"python_full_version": "3.12.3"})}
    ours = {p.name: select_wheel(p, tags).name for p in load_lock(default_lock()).packages}
    assert chosen == ours


def test_lock_without_created_by_refused_by_the_pep751_validator(tmp_path):
    path = tmp_path / "old.lock"
    with pytest.raises(LockError) as ei:
        parse_lock(lock().replace('created-by = "tests"\n', ""), path)
    msg = ei.value.message
    assert msg.splitlines()[0].startswith("the wheel lock is refused: created-by is missing")
    assert f"file:  {path}" in msg and "entry: created-by" in msg and msg.splitlines()[-1].startswith("hint: ")
    # verify reads the pins without the spec validator (speed): the same text loads there.
    assert parse_lock(lock().replace('created-by = "tests"\n', ""), path, spec=False).packages


def test_spec_only_rule_is_enforced_with_its_key(tmp_path):
    # PEP 751 wants normalized names; m3fuse's own name rule would accept this one.
    text = lock(name="Demo_Pkg")
    with pytest.raises(LockError) as ei:
        parse_lock(text, tmp_path / "l")
    assert "not normalized" in ei.value.message and "packages[0].name" in ei.value.message
    assert ei.value.exit_code == EXIT_USAGE


def test_tag_selection_prefers_the_targets_best_tag():
    sha = "f" * 64
    wheels = tuple(LockedWheel(f"demo_pkg-1.0-{t}.whl", f"https://example.invalid/demo_pkg-1.0-{t}.whl", sha)
                   for t in ("py3-none-any", "cp311-cp311-manylinux_2_17_x86_64", "cp312-cp312-manylinux_2_17_x86_64"))
    pkg = LockedPackage("demo-pkg", "1.0", wheels)
    from packaging.tags import Tag

    t311 = [Tag("cp311", "cp311", "manylinux_2_17_x86_64"), Tag("py3", "none", "any")]
    assert select_wheel(pkg, t311).name.endswith("cp311-cp311-manylinux_2_17_x86_64.whl")
    assert select_wheel(pkg, [Tag("py3", "none", "any")]).name.endswith("py3-none-any.whl")
    assert select_wheel(pkg, [Tag("cp27", "cp27mu", "manylinux1_x86_64")]) is None


def test_valid_lock_parses(tmp_path):
    lk = parse_lock(lock(extra="size = 12"), tmp_path / "w.lock")
    (p,) = lk.packages
    assert p.name == "demo-pkg" and p.wheels[0].size == 12 and p.wheels[0].sha256 == SHA


@pytest.mark.parametrize("text, needle", [
    (lock(sha=None), "hashes.sha256 is missing"),
    (lock(sha="abc"), "not 64 hexadecimal"),
    (lock(sha="g" * 64), "not 64 hexadecimal"),
    (lock(name=None), "name is missing"),
    (lock(url="ftp://example.invalid/x.whl"), "scheme 'ftp'"),
    (lock(url=f"http://example.invalid/{WHL}"), "plain http"),
    (lock(url=f"http://10.0.0.1/{WHL}"), "plain http"),
    (lock(url=f"https://user:pw@example.invalid/{WHL}"), "credentials"),
    (lock(url=f"file://otherhost/{WHL}"), "remote host"),
    (lock(url=""), "url is missing"),
    (lock(version="not a version"), "not a valid PEP 440"),
    (lock(wheel_name="demo_pkg-2.0-py3-none-any.whl"), "but the package pins"),
    (lock(wheel_name="notawheel.zip"), "not a wheel file name"),
    (lock(extra="size = -1"), "non-negative"),
    (lock(extra='size = "12"'), "non-negative"),
    ('lock-version = "2.0"\n', "reads \"1.x\" only"),
    (lock().replace('name = "demo-pkg"', 'name = "demo-pkg"\nmarker = "python_version >="'), "(PEP 751)"),
    ("[[packages]]\nname='x'\n", "lock-version is missing"),
    ('lock-version = "1.0"\n[[packages]]\nname = "x"\nversion = "1"\n', "lists no wheels"),
    ("this is = = not toml", "not valid TOML"),
])
def test_refusals_name_the_file_and_the_problem(tmp_path, text, needle):
    path = tmp_path / "bad.lock"
    with pytest.raises(LockError) as ei:
        parse_lock(text, path)
    assert needle in ei.value.message
    assert str(path) in ei.value.message
    assert ei.value.exit_code == EXIT_USAGE


def test_duplicate_package_refused(tmp_path):
    text = lock() + lock().replace('lock-version = "1.0"\n', "")
    with pytest.raises(LockError, match="already pinned"):
        parse_lock(text, tmp_path / "l")


@pytest.mark.parametrize("url", [
    f"https://example.invalid/{WHL}", f"http://127.0.0.1:8080/{WHL}", f"http://127.5.6.7/{WHL}",
    f"http://localhost/{WHL}", f"http://[::1]:9/{WHL}", f"file:///srv/wheels/{WHL}", f"file://localhost/srv/{WHL}",
])
def test_accepted_urls(url):
    assert url_problem(url) is None


def test_missing_lock_file(tmp_path):
    with pytest.raises(LockError, match="does not exist"):
        load_lock(tmp_path / "nope.lock")


def test_add_to_new_lock_then_update_keeps_comments_and_order(tmp_path):
    path = tmp_path / "wheels.lock"
    w1 = LockedWheel("demo_pkg-1.0-py3-none-any.whl", "https://example.invalid/demo_pkg-1.0-py3-none-any.whl", SHA, 10)
    assert add_wheel(path, "demo-pkg", "1.0", w1) == "added"
    other = LockedWheel("other-2.0-py3-none-any.whl", "file:///w/other-2.0-py3-none-any.whl", "b" * 64, None)
    assert add_wheel(path, "other", "2.0", other) == "added"
    # A person adds comments; later edits must keep them.
    text = path.read_text()
    text = text.replace("[[packages]]\nname = \"demo-pkg\"", "# demo: keep this comment\n[[packages]]\nname = \"demo-pkg\"", 1)
    text = text.replace("[[packages]]\nname = \"other\"", "# other: and this one\n[[packages]]\nname = \"other\"", 1)
    path.write_text(text)
    # Same version, other tag: appended as a second wheel.
    w1b = LockedWheel("demo_pkg-1.0-cp311-cp311-linux_x86_64.whl", "https://example.invalid/demo_pkg-1.0-cp311-cp311-linux_x86_64.whl", "c" * 64)
    assert add_wheel(path, "demo-pkg", "1.0", w1b) == "added"
    # Same file name, new hash: updated in place.
    w1c = LockedWheel(w1.name, w1.url, "d" * 64, 11)
    assert add_wheel(path, "demo-pkg", "1.0", w1c) == "updated"
    assert add_wheel(path, "demo-pkg", "1.0", w1c) == "unchanged"
    lk = load_lock(path)
    assert [p.name for p in lk.packages] == ["demo-pkg", "other"]
    assert lk.packages[0].wheels == (w1c, w1b)
    text = path.read_text()
    assert "# demo: keep this comment" in text and "# other: and this one" in text
    assert text.index("# other: and this one") > text.index("demo_pkg-1.0-cp311")
    # New version: the package's wheels are replaced, its position and comment kept.
    w2 = LockedWheel("demo_pkg-2.0-py3-none-any.whl", "https://example.invalid/demo_pkg-2.0-py3-none-any.whl", "e" * 64, 5)
    assert add_wheel(path, "demo-pkg", "2.0", w2) == "updated"
    lk = load_lock(path)
    assert [(p.name, p.version) for p in lk.packages] == [("demo-pkg", "2.0"), ("other", "2.0")]
    assert lk.packages[0].wheels == (w2,)
    assert lk.packages[1].wheels == (other,)
    assert "# demo: keep this comment" in path.read_text()


def test_add_refuses_bad_url_and_leaves_file(tmp_path):
    path = tmp_path / "wheels.lock"
    path.write_text(lock())
    before = path.read_text()
    with pytest.raises(LockError, match="plain http"):
        add_wheel(path, "demo-pkg", "1.0", LockedWheel(WHL, f"http://example.invalid/{WHL}", SHA))
    assert path.read_text() == before


def test_add_keeps_comments_order_and_unrelated_entries(tmp_path):
    """tomlkit keeps the layout; the comment above a header stays with the entry it describes."""
    path = tmp_path / "wheels.lock"
    text = ('# top comment\nlock-version = "1.0"\ncreated-by = "me"  # who\n\n'
            '# about a\n[[packages]]\nname = "a"\nversion = "1.0"\n\n[[packages.wheels]]\n'
            'name = "a-1.0-py3-none-any.whl"\nurl = "https://example.invalid/a-1.0-py3-none-any.whl"  # mirror\n'
            f'hashes = {{ sha256 = "{SHA}" }}\n\n'
            '# about b\n# (two lines)\n[[packages]]\nname = "b"\nversion = "2.0"\n\n[[packages.wheels]]\n'
            'name = "b-2.0-py3-none-any.whl"\nurl = "https://example.invalid/b-2.0-py3-none-any.whl"\n'
            f'hashes = {{ sha256 = "{"b" * 64}" }}\n')
    path.write_text(text)
    # A second wheel for a: it goes under a's first wheel, above b's comments.
    w = LockedWheel("a-1.0-cp312-cp312-linux_x86_64.whl", "https://example.invalid/a-1.0-cp312-cp312-linux_x86_64.whl", "c" * 64)
    assert add_wheel(path, "a", "1.0", w) == "added"
    out = path.read_text()
    assert out.startswith(text[:text.index("# about b")])  # everything before b untouched
    assert out.index("a-1.0-cp312") < out.index("# about b") < out.index('name = "b"')
    assert out.endswith(text[text.index("# about b"):])  # b and its comments untouched
    # A new package goes at the end; a new version of a keeps a's place and comment.
    assert add_wheel(path, "c", "3.0", LockedWheel("c-3.0-py3-none-any.whl", "https://example.invalid/c.whl", "d" * 64)) == "added"
    w2 = LockedWheel("a-2.0-py3-none-any.whl", "https://example.invalid/a-2.0-py3-none-any.whl", "e" * 64, 7)
    assert add_wheel(path, "a", "2.0", w2) == "updated"
    out = path.read_text()
    assert [(p.name, p.version) for p in load_lock(path).packages] == [("a", "2.0"), ("b", "2.0"), ("c", "3.0")]
    for keep in ("# top comment", 'created-by = "me"  # who', "# about a", "# about b\n# (two lines)\n[[packages]]"):
        assert keep in out
    assert out.index("# about a") < out.index('name = "a"') < out.index("a-2.0") < out.index("# about b")
    assert "a-1.0" not in out and "\n\n\n" not in out


def test_add_repairs_a_lock_without_created_by(tmp_path):
    path = tmp_path / "wheels.lock"
    path.write_text(lock().replace('created-by = "tests"\n', ""))
    add_wheel(path, "demo-pkg", "1.0", LockedWheel(WHL, f"https://example.invalid/{WHL}", SHA, 5))
    text = path.read_text()
    assert text.startswith('lock-version = "1.0"\ncreated-by = "m3fuse"\n')
    assert load_lock(path).packages[0].wheels[0].size == 5


def test_add_to_shipped_lock_copy_round_trips(tmp_path):
    path = tmp_path / "wheels.lock"
    path.write_text(default_lock().read_text())
    orig = load_lock(default_lock())
    fly = orig.packages[0].wheels[0]
    add_wheel(path, "flydsl", orig.packages[0].version, LockedWheel(fly.name, fly.url, fly.sha256, 1234))
    lk = load_lock(path)
    assert lk.packages[0].wheels[0].size == 1234
    assert lk.packages[1] == orig.packages[1]
    # Only the one line was added; every comment is still there.
    old_lines, new_lines = default_lock().read_text().splitlines(), path.read_text().splitlines()
    assert [ln for ln in new_lines if ln not in old_lines] == ["size = 1234"]
    assert all(ln in new_lines for ln in old_lines)


def test_toml_string_escaping(tmp_path):
    path = tmp_path / "w.lock"
    url = 'file:///tmp/we"ird\\dir/' + WHL
    add_wheel(path, "demo-pkg", "1.0", LockedWheel(WHL, url, SHA))
    assert load_lock(path).packages[0].wheels[0].url == url


def test_a_validated_lock_text_is_not_validated_again(tmp_path):
    """The stamp cache: the second read of the same text skips packaging.pylock (its import is
    the costliest part of an idempotent install's wheel step); any other text is validated."""
    import subprocess

    path, stamps = tmp_path / "w.lock", tmp_path / "stamps"
    path.write_text(lock())
    code = ("import sys; from pathlib import Path; from m3fuse.wheels.lock import load_lock; "
            "load_lock(Path(sys.argv[1]), stamps=Path(sys.argv[2])); print('packaging.pylock' in sys.modules)")

    def imports_pylock() -> bool:
        out = subprocess.run([sys.executable, "-c", code, str(path), str(stamps)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip() == "True"

    assert imports_pylock() is True and len(list(stamps.iterdir())) == 1
    assert imports_pylock() is False
    # Another text (here: one the validator refuses) is validated, stamp or not.
    path.write_text(lock(name="Demo_Pkg"))
    with pytest.raises(LockError, match="not normalized"):
        load_lock(path, stamps=stamps)
    assert len(list(stamps.iterdir())) == 1


def test_reading_the_lock_does_not_import_requests():
    import subprocess

    code = ("import sys; from m3fuse.wheels.lock import load_lock; from m3fuse.resources import default_lock; "
            "import m3fuse.wheels.step; load_lock(default_lock()); print('requests' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=80, deadline=None)
@given(path=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=30),
       size=st.one_of(st.none(), st.integers(0, 2**40)),
       sha=st.text("0123456789abcdef", min_size=64, max_size=64))
def test_writer_round_trips_any_text(tmp_path_factory, path, size, sha):
    lockfile = tmp_path_factory.mktemp("rt") / "w.lock"
    url = "file:///" + path.replace("/", "_") + "/" + WHL
    w = LockedWheel(WHL, url, sha, size)
    add_wheel(lockfile, "demo-pkg", "1.0", w)
    assert load_lock(lockfile).packages[0].wheels == (w,)
    w2 = LockedWheel(WHL, url + "x/" + WHL, sha[::-1], None if size is None else size + 1)
    add_wheel(lockfile, "demo-pkg", "1.0", w2)
    assert load_lock(lockfile).packages[0].wheels == (w2,)
