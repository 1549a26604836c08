"""Patch-set loading (m3fuse/patching/patchset.py) check by check, in process: the tests that kill
its mutants (`make mutation MODULE=m3fuse/patching/patchset.py`).

Every case starts from a copy of a real shipped set (patches/vllm-0.26.0) and changes one thing,
as a hostile or broken set would; tests/test_hostile.py runs the same refusals through the CLI."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import REPO
from m3fuse import safeio
from m3fuse.errors import EnvironmentProblem, PatchSetError
from m3fuse.patching import patchset
from m3fuse.patching.patchset import (FORMAT, MANIFEST, check_relative_path, load_all, load_patchset,
                                      resolve_inside)

SHIPPED = REPO / "patches" / "vllm-0.26.0"


@pytest.fixture
def setdir(tmp_path) -> Path:
    d = tmp_path / "patches" / "vllm-0.26.0"
    shutil.copytree(SHIPPED, d)
    return d


def manifest(d: Path) -> str:
    return (d / MANIFEST).read_text()


def edit(d: Path, old: str, new: str, count: int = 1) -> None:
    text = manifest(d)
    assert old in text, old
    (d / MANIFEST).write_text(text.replace(old, new, count))


def refused(d: Path, pattern: str) -> str:
    with pytest.raises(PatchSetError) as exc:
        load_patchset(d).parse()
    assert re.search(pattern, exc.value.message), exc.value.message
    return exc.value.message


def first(d: Path, key: str) -> str:
    return re.search(rf'^{key} = "([^"]*)"', manifest(d), re.M).group(1)


def test_the_shipped_set_loads_with_every_field(setdir):
    s = load_patchset(setdir).parse()
    assert s.name == "vllm-0.26.0" and s.folder == setdir and s.vllm_versions == ("0.26.0",)
    assert s.summary and s.ported_from is None and FORMAT == 1
    assert [t.path for t in s.targets] == re.findall(r'^path = "([^"]*)"', manifest(setdir), re.M)
    for t in s.targets:
        assert t.patch_file.parent == setdir and len(t.pristine_sha256) == 64 and t.ported_from is None
        assert t.diff.target_path == t.path and t.diff.source_path == t.path
        assert t.diff is t.diff  # parsed once


def test_a_ported_set_names_its_bases():
    s = load_patchset(REPO / "patches" / "vllm-0.28.0")
    assert s.ported_from == "vllm-0.26.0" and {t.ported_from for t in s.targets} == {"vllm-0.26.0"}


# ----------------------------------------------------------------------------- the manifest
def test_manifest_not_toml(setdir):
    (setdir / MANIFEST).write_text("format = = 1\n")
    refused(setdir, rf"^{re.escape(str(setdir / MANIFEST))}: not valid TOML \(.*\)\. Restore it")


@pytest.mark.parametrize("value", ["2", '"1"', "0"])
def test_manifest_of_another_format(setdir, value):
    edit(setdir, "format = 1", f"format = {value}")
    refused(setdir, rf"format is {re.escape(repr(eval(value)))}, this m3fuse reads format 1\.")


def test_manifest_without_format(setdir):
    edit(setdir, "format = 1\n", "")
    refused(setdir, r"format is None, this m3fuse reads format 1")


def test_manifest_missing_is_named(tmp_path):
    (tmp_path / "s").mkdir()
    refused(tmp_path / "s", r"cannot read the manifest \(.*\)\. Every folder under patches/ needs a manifest\.toml\.")


@pytest.mark.parametrize("old,new,pattern", [
    ('name = "vllm-0.26.0"', 'name = ""', r"'name' must be a non-empty string, got ''"),
    ('name = "vllm-0.26.0"', "name = 3", r"'name' must be a non-empty string, got 3"),
    ('vllm-versions = ["0.26.0"]', "vllm-versions = []", r"'vllm-versions' must be a non-empty list"),
    ('vllm-versions = ["0.26.0"]', 'vllm-versions = "0.26.0"', r"'vllm-versions' must be a non-empty list"),
    ('vllm-versions = ["0.26.0"]', 'vllm-versions = ["0.26.0", ""]', r"'vllm-versions' must be"),
    ('vllm-versions = ["0.26.0"]', 'vllm-versions = ["0.26.0", 26]', r"'vllm-versions' must be"),
])
def test_manifest_header_fields(setdir, old, new, pattern):
    edit(setdir, old, new)
    refused(setdir, pattern)


def test_manifest_without_files(setdir):
    text = manifest(setdir)
    (setdir / MANIFEST).write_text(text[:text.index("[[files]]")])
    refused(setdir, r"no \[\[files\]\] entries; a patch set must patch at least one file\.")
    (setdir / MANIFEST).write_text(text[:text.index("[[files]]")] + "files = []\n")
    refused(setdir, r"no \[\[files\]\] entries")
    (setdir / MANIFEST).write_text(text[:text.index("[[files]]")] + "files = 3\n")
    refused(setdir, r"no \[\[files\]\] entries")


def test_a_files_entry_that_is_not_a_table(setdir):
    text = manifest(setdir)
    (setdir / MANIFEST).write_text(text[:text.index("[[files]]")] + 'files = ["x"]\n')
    refused(setdir, r"\[\[files\]\] #1: must be a table\.")


def test_a_target_listed_twice(setdir):
    text = manifest(setdir)
    entry = text[text.index("[[files]]"):]
    entry = entry[:entry.index("[[files]]", 1)] if "[[files]]" in entry[1:] else entry
    (setdir / MANIFEST).write_text(text + "\n" + entry)
    n = text.count("[[files]]") + 1
    refused(setdir, rf"\[\[files\]\] #{n}: target '.*' is listed twice; each file may be patched by one diff only")


@pytest.mark.parametrize("bad", ["a/b.diff", "a\\b.diff", ".", ".."])
def test_a_patch_name_that_is_not_a_file_name_in_the_set(setdir, bad):
    edit(setdir, f'patch = "{first(setdir, "patch")}"', f"patch = {bad!r}".replace("'", '"').replace("\\", "\\\\"))
    refused(setdir, r"\[\[files\]\] #1: patch .* must be a file name inside ")


def test_a_patch_name_that_is_empty(setdir):
    edit(setdir, f'patch = "{first(setdir, "patch")}"', 'patch = ""')
    refused(setdir, r"#1: 'patch' must be a non-empty string, got ''")


@pytest.mark.parametrize("key", ["pristine-sha256", "patched-sha256"])
@pytest.mark.parametrize("bad", ["F" * 64, "f" * 63, "f" * 65, "g" * 64])
def test_a_pin_that_is_not_64_lowercase_hex(setdir, key, bad):
    edit(setdir, f'{key} = "{first(setdir, key)}"', f'{key} = "{bad}"')
    refused(setdir, rf"#1: '{key}' must be 64 lowercase hex digits, got '{bad}'\. Regenerate the manifest")


def test_equal_pins(setdir):
    edit(setdir, f'patched-sha256 = "{first(setdir, "patched-sha256")}"',
         f'patched-sha256 = "{first(setdir, "pristine-sha256")}"')
    refused(setdir, r"#1: pristine and patched sha256 are equal; the state of .* could never be told\.")


def test_a_missing_patch_file(setdir):
    (setdir / first(setdir, "patch")).unlink()
    refused(setdir, r"#1: patch file .* does not exist \(or is not a file\)\. Restore the patch set")


def test_a_patch_file_that_is_a_directory(setdir):
    p = setdir / first(setdir, "patch")
    p.unlink()
    p.mkdir()
    refused(setdir, r"does not exist \(or is not a file\)")


def test_optional_ported_from_must_be_a_string(setdir):
    edit(setdir, 'summary = ', 'ported-from = 3\nsummary = ')
    refused(setdir, r"'ported-from' must be a non-empty string, got 3")


def test_summary_is_optional(setdir):
    text = manifest(setdir)
    (setdir / MANIFEST).write_text(re.sub(r"^summary = .*\n", "", text, flags=re.M))
    assert load_patchset(setdir).summary == ""


# ----------------------------------------------------------------------------- target paths
@pytest.mark.parametrize("rel,pattern", [
    ("", r"a target path must be a non-empty string, got ''"),
    (None, r"a target path must be a non-empty string, got None"),
    (3, r"a target path must be a non-empty string, got 3"),
    ("vllm\\x.py", r"contains a backslash or NUL"),
    ("vllm/x\x00.py", r"contains a backslash or NUL"),
    ("/vllm/x.py", r"is absolute; it must be relative to the vLLM root"),
    ("vllm/../x.py", r"contains '\.\.' or '\.' components"),
    ("vllm/./x.py", r"contains '\.\.' or '\.' components"),
    ("vllm//x.py", r"contains '\.\.' or '\.' components"),
    ("vllm/x.py/", r"contains '\.\.' or '\.' components"),
    ("other/x.py", r"is not a \.py file under vllm/"),
    ("vllm/x.pth", r"is not a \.py file under vllm/"),
    ("vllmx/x.py", r"is not a \.py file under vllm/"),
])
def test_check_relative_path_refuses(rel, pattern):
    with pytest.raises(PatchSetError) as exc:
        check_relative_path(rel, where="W")
    assert exc.value.message.startswith("W: ") and re.search(pattern, exc.value.message), exc.value.message


def test_check_relative_path_accepts_a_vllm_source():
    assert check_relative_path("vllm/a/b.py", where="W") == "vllm/a/b.py"


# ----------------------------------------------------------------------------- the bounded reader
def test_a_diff_that_names_another_file(setdir):
    p = setdir / first(setdir, "patch")
    text = p.read_text()
    rel = first(setdir, "path")
    p.write_text(text.replace(f"+++ b/{rel}", "+++ b/vllm/other.py", 1))
    refused(setdir, rf"the diff patches 'vllm/other\.py' but the manifest says '{re.escape(rel)}'")
    p.write_text(text.replace(f"--- a/{rel}", "--- a/vllm/other.py", 1))
    refused(setdir, r"the diff patches .* but the manifest says")


def test_a_diff_that_is_not_utf8(setdir):
    p = setdir / first(setdir, "patch")
    p.write_bytes(p.read_bytes() + b"\xff\xfe")
    refused(setdir, rf"^{re.escape(str(p))}: not UTF-8 text; it is binary or corrupted")


def test_a_diff_past_the_bound_is_refused_unread(setdir):
    p = setdir / first(setdir, "patch")
    with open(p, "ab") as f:
        f.truncate(safeio.MAX_SET_FILE + 1)
    msg = refused(setdir, rf"^{re.escape(str(p))}: larger than the {safeio.MAX_SET_FILE}-byte limit")
    assert "a patch file is a small text file. Restore it from the m3fuse release." in msg


def test_a_diff_at_the_bound_is_read(setdir):
    """Exactly MAX_SET_FILE bytes is allowed: padded with a trailing comment-free blank tail the
    parser refuses for what it is, not for its size."""
    p = setdir / first(setdir, "patch")
    with open(p, "ab") as f:
        f.truncate(safeio.MAX_SET_FILE)
    with pytest.raises(PatchSetError) as exc:
        load_patchset(setdir).parse()
    assert "limit" not in exc.value.message


def test_a_manifest_past_the_bound_is_refused(setdir):
    with open(setdir / MANIFEST, "ab") as f:
        f.write(b"\n" + b"#" * safeio.MAX_SET_FILE)
    refused(setdir, r"manifest\.toml: larger than the .*-byte limit m3fuse reads; a manifest is a small text file")


def test_a_diff_that_is_a_fifo_is_refused_without_blocking(setdir):
    p = setdir / first(setdir, "patch")
    p.unlink()
    os.mkfifo(p)
    # is_file() is False for a FIFO: refused when loading, never opened.
    refused(setdir, r"does not exist \(or is not a file\)")


def test_a_diff_that_is_a_symlink_is_refused(setdir, tmp_path):
    p = setdir / first(setdir, "patch")
    outside = tmp_path / "outside.diff"
    shutil.move(p, outside)
    p.symlink_to(outside)
    refused(setdir, rf"^{re.escape(str(p))}: .*; a patch file is a small text file")


def test_a_manifest_that_is_a_symlink_is_refused(setdir, tmp_path):
    outside = tmp_path / "m.toml"
    shutil.move(setdir / MANIFEST, outside)
    (setdir / MANIFEST).symlink_to(outside)
    refused(setdir, r"manifest\.toml: .*; a manifest is a small text file")


def test_an_unreadable_diff_says_why(setdir):
    if os.getuid() == 0:
        # root reads mode-000 files: make the read fail with EISDIR-like errors instead.
        p = setdir / first(setdir, "patch")
        s = load_patchset(setdir)
        p.unlink()
        with pytest.raises(PatchSetError, match=r"cannot read this patch file \(No such file or directory\)\.\n"
                                                r"hint: use the shipped sets \(drop --patches\), or fix the set file "
                                                r"named above$"):
            s.parse()
    else:
        p = setdir / first(setdir, "patch")
        p.chmod(0)
        refused(setdir, r"cannot read this patch file \(Permission denied\)")


def test_diffs_are_read_when_first_needed(setdir):
    s = load_patchset(setdir)
    (setdir / s.targets[0].patch_file.name).write_bytes(b"\xff")
    with pytest.raises(PatchSetError, match="not UTF-8"):
        s.targets[0].diff
    assert s.targets[0].path  # loading itself read no diff


# ----------------------------------------------------------------------------- load_all
def test_load_all_takes_every_set_folder_and_skips_work_in_progress(tmp_path):
    root = tmp_path / "patches"
    for name in ("vllm-0.26.0", "vllm-0.24.0"):
        shutil.copytree(REPO / "patches" / name, root / name)
    shutil.copytree(REPO / "patches" / "vllm-0.28.0", root / ".stage-x")
    (root / "notes").mkdir()
    (root / "README").write_text("x")
    assert [s.name for s in load_all(root)] == ["vllm-0.24.0", "vllm-0.26.0"]


def test_load_all_parse_refuses_a_broken_diff_up_front(tmp_path):
    root = tmp_path / "patches"
    shutil.copytree(SHIPPED, root / "a")
    first_patch = first(root / "a", "patch")
    (root / "a" / first_patch).write_bytes(b"\xff")
    assert [s.name for s in load_all(root)] == ["vllm-0.26.0"]
    with pytest.raises(PatchSetError, match="not UTF-8"):
        load_all(root, parse=True)


def test_load_all_refuses_two_folders_with_one_name(tmp_path):
    root = tmp_path / "patches"
    shutil.copytree(SHIPPED, root / "a")
    shutil.copytree(SHIPPED, root / "b")
    shutil.copytree(REPO / "patches" / "vllm-0.24.0", root / "c")
    with pytest.raises(PatchSetError) as exc:
        load_all(root)
    assert exc.value.message == (f"{root}: patch-set names ['vllm-0.26.0'] are used by more than one folder.\n"
                                 f"hint: use the shipped sets (drop --patches), or fix the set file named above")


def test_load_all_of_a_missing_folder(tmp_path):
    with pytest.raises(PatchSetError, match=r"the patch-set folder does not exist\. Reinstall m3fuse or pass --patches DIR"):
        load_all(tmp_path / "nope")
    (tmp_path / "file").write_text("")
    with pytest.raises(PatchSetError, match="does not exist"):
        load_all(tmp_path / "file")


# ----------------------------------------------------------------------------- resolve_inside
def test_resolve_inside_keeps_paths_inside_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "vllm" / "a").mkdir(parents=True)
    assert resolve_inside(root, "vllm/a/x.py") == Path(os.path.realpath(root)) / "vllm/a/x.py"
    assert resolve_inside(root, ".") == Path(os.path.realpath(root)) / "."
    # A symlink that stays inside is fine.
    (root / "vllm" / "b").symlink_to(root / "vllm" / "a")
    assert resolve_inside(root, "vllm/b/x.py") == Path(os.path.realpath(root)) / "vllm/b/x.py"


def test_resolve_inside_refuses_a_link_out_of_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "vllm").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (root / "vllm" / "a").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PatchSetError) as exc:
        resolve_inside(root, "vllm/a/x.py")
    assert f"resolves through a symlink to {tmp_path / 'elsewhere' / 'x.py'}, outside the vLLM root" in exc.value.message
    # A sibling whose name starts with the root's is outside too.
    (tmp_path / "root2").mkdir()
    (root / "vllm" / "c").symlink_to(tmp_path / "root2")
    with pytest.raises(PatchSetError):
        resolve_inside(root, "vllm/c/x.py")


def test_resolve_inside_reports_a_loop_as_a_changing_path(tmp_path):
    root = tmp_path / "root"
    (root / "vllm").mkdir(parents=True)
    (root / "vllm" / "loop").symlink_to(root / "vllm" / "loop")
    try:
        got = resolve_inside(root, "vllm/loop/x.py")
    except EnvironmentProblem as exc:
        assert "its path changed while m3fuse was resolving it" in exc.message
    else:  # Python < 3.13's realpath returns the loop unresolved; it stays inside the root
        assert got == Path(os.path.realpath(root)) / "vllm/loop/x.py"


def test_module_constants():
    assert patchset.MANIFEST == "manifest.toml" and patchset.FORMAT == 1


def test_resolve_inside_reports_a_link_removed_while_it_was_followed(tmp_path, monkeypatch):
    """The link is removed at the instant realpath reads it (what a process renaming folders in
    the tree does): the error names the path and the cause, never a traceback."""
    root = tmp_path / "root"
    (root / "vllm" / "real").mkdir(parents=True)
    link = root / "vllm" / "a"
    link.symlink_to(root / "vllm" / "real")
    real_readlink = os.readlink

    def readlink_after_removal(path, *a, **kw):
        if Path(path) == link and link.is_symlink():
            link.unlink()
        return real_readlink(path, *a, **kw)

    monkeypatch.setattr(os, "readlink", readlink_after_removal)
    with pytest.raises(EnvironmentProblem) as exc:
        resolve_inside(root, "vllm/a/x.py")
    monkeypatch.undo()
    assert exc.value.message.startswith(f"{root / 'vllm/a/x.py'}: its path changed while m3fuse was resolving it "
                                        f"(No such file or directory)")


def test_sets_are_immutable_and_each_target_is_its_own(setdir):
    import dataclasses

    s = load_patchset(setdir)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.name = "other"  # type: ignore[misc]
    again = load_patchset(setdir)
    # Targets compare by identity: two sets naming one file keep their own parsed diffs.
    assert s.targets[0] != again.targets[0] and len({s.targets[0], again.targets[0]}) == 2
