"""Ported sets as derived data (m3fuse/patching/lineage.py), in process where it can be: the tests
that kill its mutants (`make mutation MODULE=m3fuse/patching/lineage.py`), beside
tests/test_lineage.py's CLI runs. The sets are the shipped ones (copied), the release files come
out of the real release wheels."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import realvllm
from test_lineage import BASE, PATCHES, fix_base_line, patches, ported, snapshot_sets, wheels  # noqa: F401 (fixtures)
from m3fuse import interrupt
from m3fuse.errors import MergeConflict, PatchSetError, UnsafePath
from m3fuse.patching import lineage, portfs, setwriter
from m3fuse.patching.basesource import BaseSource
from m3fuse.patching.hunks import FileDiff, Hunk, parse_diff, split_lines
from m3fuse.patching.lineage import (Outcome, apply_resolution, derived_in_order, describe, folder_files, merge_label,
                                     refresh, resolution_name)
from m3fuse.patching.patchset import load_all, load_patchset


@pytest.fixture
def source(wheels, tmp_path) -> BaseSource:
    return BaseSource(wheel_dirs=[wheels], cache=tmp_path / "cache")


def derived_from_base(patches: Path) -> list[str]:
    return [s.name for s in load_all(patches) if any(t.ported_from == BASE for t in s.targets)]


# ----------------------------------------------------------------------------- --check
def test_check_on_a_stale_set_reports_it_and_writes_nothing(patches, source):
    fix_base_line(patches, b"class MiniMaxM3DecoderLayer(nn.Module):\n",
                  b"# a base fix\nclass MiniMaxM3DecoderLayer(nn.Module):\n")
    before = snapshot_sets(patches)
    outcomes = refresh(patches, source, check=True)
    changed = sorted(o.name for o in outcomes if o.changed)
    assert changed == sorted(derived_from_base(patches)) and len(changed) >= 7
    assert not [o.name for o in outcomes if not o.changed and o.name in changed]
    assert snapshot_sets(patches) == before
    assert not [p for p in patches.iterdir() if p.name.startswith(".")]
    # A marker a killed refresh left in a live set: --check leaves it (it writes nothing), a refresh drops it.
    portfs.mark(patches / BASE)
    refresh(patches, source, check=True)
    assert (patches / BASE / portfs.MARKER).exists()
    outcomes = refresh(patches, source)
    assert sorted(o.name for o in outcomes if o.changed) == changed
    assert not (patches / BASE / portfs.MARKER).exists()
    from test_lineage import patched_model

    assert all(b"# a base fix\n" in patched_model(patches, n) for n in changed)  # re-derived, not re-recorded
    assert not [o.name for o in refresh(patches, source, check=True) if o.changed]


def test_check_through_the_cli_exits_4_naming_the_stale_sets(patches, wheels, tmp_path):
    fix_base_line(patches, b"class MiniMaxM3DecoderLayer(nn.Module):\n",
                  b"# a base fix\nclass MiniMaxM3DecoderLayer(nn.Module):\n")
    before = snapshot_sets(patches)
    r = subprocess.run([sys.executable, "-m", "m3fuse", "port", "--refresh", "--check", "--patches", str(patches),
                        "--wheels", str(wheels)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert r.returncode == 4, r.stderr
    assert "ported sets differ from what their bases and resolutions give" in r.stderr
    for name in derived_from_base(patches):
        assert name in r.stderr
    assert snapshot_sets(patches) == before


def test_refresh_of_shipped_sets_changes_nothing_and_says_so(patches, source):
    before = snapshot_sets(patches)
    outcomes = refresh(patches, source)
    assert [o.name for o in outcomes] == [s.name for s in derived_in_order(load_all(patches))]
    assert not [o for o in outcomes if o.changed] and snapshot_sets(patches) == before
    o = next(o for o in outcomes if any(f["resolution"] for f in o.files))
    f = next(f for f in o.files if f["resolution"])
    assert f["ported_from"] and len(f["patched_sha256"]) == 64
    s = load_patchset(patches / o.name)
    assert f["patched_sha256"] == next(t.patched_sha256 for t in s.targets if t.path == f["path"])


def test_record_writes_only_the_resolutions_a_merge_needs(patches, source):
    recorded = sorted(p.relative_to(patches) for p in patches.glob("*/*.resolution.diff"))
    for p in recorded:
        (patches / p).unlink()
    (patches / BASE / "model.py.resolution.diff").write_text("stale\n")  # a base is no ported set: left alone
    outcomes = refresh(patches, source, record=True)
    assert sorted(p.relative_to(patches) for p in patches.glob("*/*.resolution.diff")) == \
        sorted(recorded + [Path(BASE) / "model.py.resolution.diff"])
    assert {o.name for o in outcomes if o.changed} == {str(p.parent) for p in recorded}
    bases = {f["ported_from"] for o in outcomes for f in o.files}
    assert BASE in bases and "" not in bases
    # Recording again changes nothing; a resolution no longer needed is removed.
    assert not [o for o in refresh(patches, source, record=True) if o.changed]


# ----------------------------------------------------------------------------- order
def test_bases_come_before_the_sets_made_from_them():
    sets = load_all(PATCHES)
    order = [s.name for s in derived_in_order(sets)]
    assert sorted(order) == sorted(ported(PATCHES))
    for s in derived_in_order(sets):
        for t in s.targets:
            if t.ported_from in order:
                assert order.index(t.ported_from) < order.index(s.name)
    assert derived_in_order(list(reversed(sets))) != [] and \
        sorted(s.name for s in derived_in_order(list(reversed(sets)))) == sorted(order)


def test_a_chain_is_ordered_whatever_the_listing_order(patches):
    # Make vllm-0.30.0's model come from vllm-0.28.0 (itself from vllm-0.26.0).
    m = patches / "vllm-0.30.0" / "manifest.toml"
    text = m.read_text()
    cut = text.rindex('ported-from = "vllm-0.26.0"')
    m.write_text(text[:cut] + 'ported-from = "vllm-0.28.0"\n')
    sets = load_all(patches)
    for listing in (sets, list(reversed(sets))):
        order = [s.name for s in derived_in_order(listing)]
        assert order.index("vllm-0.28.0") < order.index("vllm-0.30.0")


def point_model_at(patches: Path, base: str) -> tuple[Path, str]:
    """vllm-0.30.0's model file says it was ported from `base` (its last `ported-from`);
    returns the manifest and its text before."""
    m = patches / "vllm-0.30.0" / "manifest.toml"
    text = m.read_text()
    cut = text.rindex('ported-from = "vllm-0.26.0"')
    m.write_text(text[:cut] + f'ported-from = "{base}"\n')
    return m, text


def test_tampered_references_are_refused_by_name(patches):
    m, text = point_model_at(patches, "vllm-9")
    with pytest.raises(PatchSetError) as exc:
        derived_in_order(load_all(patches))
    e = exc.value
    assert e.headline == f"{m} ({realvllm.MODEL}): ported-from names a set that does not exist"
    assert e.details[1] == ("got", "'vllm-9'") and e.details[0][1].startswith("one of vllm-0.24.0, ")
    m.write_text(text)
    # A cycle: the base names a set made from it.
    b = patches / BASE / "manifest.toml"
    bt = b.read_text()
    pin = load_patchset(patches / BASE).targets[-1].patched_sha256
    b.write_text(bt.replace(f'patched-sha256 = "{pin}"\n', f'patched-sha256 = "{pin}"\nported-from = "vllm-0.30.0"\n'))
    with pytest.raises(PatchSetError) as exc:
        derived_in_order(load_all(patches))
    assert exc.value.headline.startswith("ported-from references form a cycle")
    cycle = exc.value.details[0][1].split(" -> ")
    assert cycle[-1] in cycle[:-1] and {BASE, "vllm-0.30.0"} <= set(cycle)


def test_a_reference_to_a_set_without_the_file(patches):
    other = patches / "vllm-0.24.0" / "manifest.toml"
    t = other.read_text()
    other.write_text(t[:t.index('[[files]]\npath = "vllm/models')])
    point_model_at(patches, "vllm-0.24.0")
    with pytest.raises(PatchSetError) as exc:
        derived_in_order(load_all(patches))
    assert exc.value.details == (("expected", f"a set patching {realvllm.MODEL}"), ("got", "vllm-0.24.0"))


# ----------------------------------------------------------------------------- resolutions
def _res(before: str, after: str) -> object:
    text = setwriter.unified_diff(setwriter.FileChange("vllm/x.py", before.encode(), after.encode()))
    return parse_diff(text, name="r")


LINES = "".join(f"line {i}\n" for i in range(1, 21))


def test_a_resolution_applies_where_recorded_and_where_it_moved():
    after = LINES.replace("line 5\n", "five\n").replace("line 15\n", "fifteen\n")
    diff = _res(LINES, after)
    assert apply_resolution(LINES.encode(), diff, where="w") == after.encode()
    # Three lines added at the top and one removed between the hunks: both hunks still found.
    moved = "a\nb\nc\n" + LINES.replace("line 10\n", "")
    assert apply_resolution(moved.encode(), diff, where="w") == \
        ("a\nb\nc\n" + after.replace("line 10\n", "")).encode()
    # Lines removed above: found earlier than recorded.
    up = LINES.replace("line 1\n", "")
    assert apply_resolution(up.encode(), diff, where="w") == after.replace("line 1\n", "").encode()


def test_a_resolution_that_inserts_only():
    after = LINES.replace("line 10\n", "line 10\nnew\n")
    diff = _res(LINES, after)
    assert apply_resolution(LINES.encode(), diff, where="w") == after.encode()
    assert apply_resolution(("x\n" + LINES).encode(), diff, where="w") == ("x\n" + after).encode()


def test_a_resolution_that_no_longer_fits_names_the_hunk():
    after = LINES.replace("line 5\n", "five\n").replace("line 15\n", "fifteen\n")
    diff = _res(LINES, after)
    gone = LINES.replace("line 15\n", "changed\n")
    with pytest.raises(MergeConflict) as exc:
        apply_resolution(gone.encode(), diff, where="S: f")
    e = exc.value
    assert e.headline == "S: f: hand resolution 2 no longer fits the merge; nothing of this set was written"
    assert e.details[0] == ("expected", "near line 12: 'line 12' (and its 6 following line(s)) as recorded")
    # A conflict marker in the recorded lines is the line named.
    merged = LINES.replace("line 10\n", "<<<<<<< tree\nline 10\n=======\nten\n>>>>>>> base\n")
    diff = _res(merged, LINES.replace("line 10\n", "TEN\n"))
    with pytest.raises(MergeConflict) as exc:
        apply_resolution(LINES.encode(), diff, where="w")
    assert "'<<<<<<< tree'" in exc.value.details[0][1]


def test_hunks_are_found_in_order_never_before_the_last_one():
    text = "a\nx\nb\nc\nd\ne\nf\ng\nh\ni\nx\nj\n"
    diff = _res(text, text.replace("e\n", "E\n").replace("\nx\nj\n", "\nX\nj\n"))
    assert apply_resolution(text.encode(), diff, where="w") == text.replace("e\n", "E\n").replace("\nx\nj\n", "\nX\nj\n").encode()


def _at(start: int, old: str, new: str) -> Hunk:
    return Hunk(old_start=start, new_start=start, old_lines=tuple(split_lines(old)), new_lines=tuple(split_lines(new)))


def _apply(merged: str, *hunks: Hunk) -> str:
    return apply_resolution(merged.encode(), FileDiff("vllm/x.py", "vllm/x.py", hunks), where="w").decode()


def test_a_hunk_whose_lines_recur_takes_the_nearest_copy_and_the_earlier_of_two():
    # Six equal lines: only the recorded position tells which one the resolution meant.
    assert _apply("a\n" * 6, _at(3, "a\n", "B\n")) == "a\na\nB\na\na\na\n"
    # Not at its line, one away on both sides: the earlier copy.
    assert _apply("a\nb\na\n", _at(2, "a\n", "A\n")) == "A\nb\na\n"
    assert _apply("b\na\nb\na\n", _at(1, "a\n", "A\n")) == "b\nA\nb\na\n"


def test_how_far_one_hunk_moved_is_where_the_next_is_looked_for():
    # Three lines came in above the first hunk: the second, whose line recurs all the way
    # down, is taken three lines below its recorded line too.
    merged = "x\nx\nx\nh\n" + "a\n" * 8
    got = _apply(merged, _at(1, "h\n", "H\n"), _at(6, "a\n", "A\n"))
    assert got == "x\nx\nx\nH\n" + "a\n" * 4 + "A\n" + "a\n" * 3
    # Three lines went away above it: found three lines higher.
    merged = "h\n" + "a\n" * 11
    got = _apply(merged, _at(4, "h\n", "H\n"), _at(9, "a\n", "A\n"))
    assert got == "H\n" + "a\n" * 4 + "A\n" + "a\n" * 6
    # An insertion (its start is the line it follows) matches where recorded and moves nothing.
    got = _apply("a\n" * 8, _at(0, "", "new\n"), _at(4, "a\n", "A\n"))
    assert got == "new\n" + "a\n" * 3 + "A\n" + "a\n" * 4
    # ... and passes the move of the hunks before it on.
    got = _apply("x\nh\n" + "a\n" * 8, _at(1, "h\n", "H\n"), _at(3, "", "new\n"), _at(6, "a\n", "A\n"))
    assert got == "x\nH\na\na\nnew\na\na\nA\na\na\na\n"


def test_the_search_reaches_the_whole_merge_and_no_further():
    # Recorded four lines down, the merge now four lines long with the line at its top.
    assert _apply("e\nx\ny\nz\n", _at(5, "e\n", "E\n")) == "E\nx\ny\nz\n"
    # A hunk recorded further past the end of the merge than the merge is long is not its hunk.
    with pytest.raises(MergeConflict):
        _apply("e\nx\ny\n", _at(5, "e\n", "E\n"))


# ----------------------------------------------------------------------------- small parts
def test_the_merge_label_names_a_sets_first_release():
    import dataclasses

    s = dataclasses.replace(load_patchset(PATCHES / "vllm-0.28.0"), vllm_versions=("0.28.0", "0.28.1"))
    assert merge_label(s) == "vLLM 0.28.0"


def test_exchange_with_relative_paths(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    lineage._exchange(Path("a"), Path("b"))  # resolved from the current folder (AT_FDCWD)
    assert (tmp_path / "b" / "x").exists()


def test_names_labels_and_outcomes():
    assert resolution_name("vllm/a/b/model.py") == "model.py.resolution.diff" == "model.py" + lineage.RESOLUTION_SUFFIX
    s = load_patchset(PATCHES / "vllm-0.28.0")
    assert merge_label(s) == "vLLM 0.28.0"
    o = Outcome("n", True, [{"path": "a"}])
    assert o.to_json() == {"set": "n", "changed": True, "files": [{"path": "a"}]}
    assert lineage.CARRIED == frozenset({"aiter-needs.toml", "readers.toml"})  # readers.toml: issue 24


def test_describe():
    outs = [Outcome("vllm-0.30.0", True, [{"path": "vllm/a/model.py", "resolution": True},
                                         {"path": "vllm/b/h.py", "resolution": False}]),
            Outcome("vllm-0.28.0", False, [{"path": "vllm/a/model.py", "resolution": False}])]
    assert describe(outs, record=False, check=False) == [
        "port: 2 ported set(s), 1 re-derived",
        "  vllm-0.30.0      re-derived   resolutions: model.py",
        "  vllm-0.28.0      unchanged    resolutions: none"]
    assert describe(outs, record=False, check=True)[0] == "port: 2 ported set(s), 1 would change"
    assert describe(outs, record=True, check=False)[1].startswith("  vllm-0.30.0      recorded ")
    assert describe(outs[1:], record=False, check=True) == [
        "port: 1 ported set(s), 0 changed", "  vllm-0.28.0      unchanged    resolutions: none"]


def test_folder_files_takes_regular_files_only(tmp_path):
    (tmp_path / "a").write_bytes(b"1")
    (tmp_path / "sub").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a")
    (tmp_path / portfs.MARKER).write_bytes(b"")
    (tmp_path / "b").write_bytes(b"2")
    assert folder_files(tmp_path) == {"a": b"1", "b": b"2"}
    assert list(folder_files(tmp_path)) == ["a", "b"]


def test_replace_set_swaps_whole_and_a_failed_proof_keeps_the_old(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "old").write_bytes(b"o")
    lineage.replace_set(folder, {"new": b"n"}, lambda _p: None)
    assert folder_files(folder) == {"new": b"n"} and sorted(p.name for p in tmp_path.iterdir()) == ["s"]

    def bad(_p: Path) -> None:
        raise RuntimeError("proof failed")

    with pytest.raises(RuntimeError):
        lineage.replace_set(folder, {"other": b"x"}, bad)
    assert folder_files(folder) == {"new": b"n"} and sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_exchange_of_a_missing_folder_says_so(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(Exception) as exc:
        lineage._exchange(tmp_path / "a", tmp_path / "missing")
    assert "cannot swap the refreshed set in (No such file or directory)" in str(exc.value)
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").write_bytes(b"")
    lineage._exchange(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b" / "x").exists() and not (tmp_path / "a" / "x").exists()


def test_the_cli_json_of_a_refresh(patches, wheels, tmp_path):
    r = subprocess.run([sys.executable, "-m", "m3fuse", "port", "--refresh", "--check", "--json", "--patches",
                        str(patches), "--wheels", str(wheels)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    assert body["mode"] == "refresh" and all(not o["changed"] for o in body["sets"])


def test_a_swap_that_fails_leaves_the_old_set_unmarked_and_no_stage(tmp_path, monkeypatch):
    from m3fuse.errors import EnvironmentProblem

    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "old").write_bytes(b"o")

    def no_swap(a, b):
        raise EnvironmentProblem("no renameat2 here")

    monkeypatch.setattr(lineage, "_exchange", no_swap)
    with pytest.raises(EnvironmentProblem):
        lineage.replace_set(folder, {"new": b"n"}, lambda _p: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    assert sorted(p.name for p in folder.iterdir()) == ["old"]  # no marker left in the live set


def test_unresolved_conflicts_are_named_by_their_line(patches, source):
    (patches / "vllm-0.30.0" / "model.py.resolution.diff").unlink()
    sets = load_all(patches, parse=True)
    by_name = {s.name: s for s in sets}
    s = by_name["vllm-0.30.0"]
    t = next(t for t in s.targets if t.path == realvllm.MODEL)
    merged = lineage.merged_from_base(s, t, by_name[t.ported_from], source).merged.decode().splitlines()
    with pytest.raises(MergeConflict) as exc:
        lineage.derive(s, by_name, source)
    lines = [int(v.split()[1]) for k, v in exc.value.details]
    assert lines and all(merged[n - 1].startswith(("<<<<<<<", "|||||||", "=======", ">>>>>>>")) for n in lines)


def test_a_bad_reference_after_a_hand_written_file_is_still_refused(patches):
    m = patches / "vllm-0.30.0" / "manifest.toml"
    text = m.read_text()
    first = text.index('ported-from = "', text.index("[[files]]"))
    end = text.index("\n", first) + 1
    text = text[:first] + text[end:]  # the first file: hand-written in this set
    cut = text.rindex('ported-from = "vllm-0.26.0"')
    m.write_text(text[:cut] + 'ported-from = "vllm-9"\n')
    with pytest.raises(PatchSetError, match="ported-from names a set that does not exist"):
        derived_in_order(load_all(patches))


def test_a_kill_before_the_swap_leaves_a_marked_stage_the_next_run_removes(tmp_path, monkeypatch):
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "old").write_bytes(b"o")

    class Killed(BaseException):
        pass

    def stop(step: str) -> None:
        if step.startswith("refresh-swap "):
            raise Killed

    monkeypatch.setattr(lineage.atomic, "_checkpoint", stop)
    with pytest.raises(Killed):
        lineage.replace_set(folder, {"new": b"n"}, lambda _p: None)
    stages = [p for p in tmp_path.iterdir() if p.name != "s"]
    assert len(stages) == 1 and (stages[0] / portfs.MARKER).is_file()
    assert portfs.clean_stages(tmp_path) == stages
    assert folder_files(folder) == {"old": b"o"}


def test_a_refresh_unmarks_only_real_folders_of_the_patches_folder(patches, source, tmp_path):
    (patches / "NOTES").write_text("a file beside the sets\n")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / portfs.MARKER).write_bytes(b"not ours to drop")
    (patches / "linked").symlink_to(outside)
    portfs.mark(patches / BASE)
    assert not [o for o in refresh(patches, source) if o.changed]
    assert (outside / portfs.MARKER).read_bytes() == b"not ours to drop"
    assert not (patches / BASE / portfs.MARKER).exists()


def test_recording_goes_past_a_hand_written_file(patches, source):
    s = patches / "vllm-0.30.0"
    m = s / "manifest.toml"
    text = m.read_text()
    first = text.index('ported-from = "', text.index("[[files]]"))
    m.write_text(text[:first] + text[text.index("\n", first) + 1:])  # its first file: hand-written
    before = snapshot_sets(patches)
    outcomes = {o.name: o for o in refresh(patches, source, record=True)}
    assert not outcomes["vllm-0.30.0"].changed and snapshot_sets(patches) == before
    assert [f["resolution"] for f in outcomes["vllm-0.30.0"].files] == [False, True]


def test_a_corrupt_diff_in_any_set_is_refused_before_a_set_is_written(patches, source):
    fix_base_line(patches, b"class MiniMaxM3DecoderLayer(nn.Module):\n",
                  b"# a base fix\nclass MiniMaxM3DecoderLayer(nn.Module):\n")
    (patches / "vllm-0.34.0" / "model.py.diff").write_text("not a diff\n")
    before = snapshot_sets(patches)
    with pytest.raises(PatchSetError, match="vllm-0.34.0"):
        refresh(patches, source)
    assert snapshot_sets(patches) == before


def test_a_check_writes_not_even_the_pristine_cache_and_a_refresh_fills_it(patches, source):
    cache = source.cache
    assert not [o for o in refresh(patches, source, check=True) if o.changed]
    assert not cache.exists() or not list(cache.iterdir())
    fresh = BaseSource(wheel_dirs=source.wheel_dirs, cache=cache)  # nothing read yet, nothing held in memory
    assert not [o for o in refresh(patches, fresh) if o.changed]
    assert cache.is_dir() and list(cache.iterdir())


def test_a_linked_set_folder_anywhere_refuses_the_refresh_before_a_set_is_written(patches, source, tmp_path):
    fix_base_line(patches, b"class MiniMaxM3DecoderLayer(nn.Module):\n",
                  b"# a base fix\nclass MiniMaxM3DecoderLayer(nn.Module):\n")
    # The last set in order, and one the base fix does not touch: only the check up front sees it.
    last = patches / "vllm-0.34.0"
    last.rename(tmp_path / "moved")
    last.symlink_to(tmp_path / "moved")
    before = snapshot_sets(patches)
    with pytest.raises(UnsafePath):
        refresh(patches, source)
    assert snapshot_sets(patches) == before


def test_a_refresh_removes_the_stage_folders_a_killed_one_left_and_says_so(patches, source):
    stage = patches / f".vllm-0.30.0{portfs.STAGE_MARK}123-abcd-new"
    stage.mkdir(mode=0o700)
    portfs.mark(stage)
    said: list[str] = []
    assert not [o for o in refresh(patches, source, echo=said.append) if o.changed]
    assert not stage.exists()
    assert said == [f"port: removed {stage.name}, a stage folder an interrupted refresh left behind"]


def test_an_interrupted_refresh_says_what_it_left(patches, source, monkeypatch):
    monkeypatch.setattr(interrupt, "_describe", None)  # the describer a refresh sets outlives it on a signal
    stage = patches / f".vllm-0.30.0{portfs.STAGE_MARK}123-abcd-new"
    stage.mkdir(mode=0o700)
    portfs.mark(stage)

    def ctrl_c(_line: str) -> None:
        raise interrupt.Signalled(signal.SIGINT)

    with pytest.raises(interrupt.Signalled) as exc:
        refresh(patches, source, echo=ctrl_c)
    assert interrupt.report(exc.value) == (
        f"interrupted by SIGINT: `m3fuse port --refresh` on {patches} left each ported set whole (its old files or "
        f"its new ones) and no stage folder; run it again to finish")


def test_a_resolution_diff_that_is_not_utf8_is_refused_by_name(patches, source):
    res = patches / "vllm-0.30.0" / "model.py.resolution.diff"
    res.write_bytes(res.read_bytes() + b"\xff\n")
    before = snapshot_sets(patches)
    with pytest.raises(PatchSetError) as exc:
        refresh(patches, source)
    assert exc.value.message.startswith(f"{res}: is not UTF-8 text (byte ")
    assert ("; a resolution diff is UTF-8 text. Record it again with `m3fuse port --record-resolutions`."
            in exc.value.message)
    assert snapshot_sets(patches) == before


def test_an_old_set_that_cannot_be_removed_after_the_swap_does_not_fail_the_refresh(tmp_path, monkeypatch):
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "stuck").write_bytes(b"o")
    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):  # a file this user may not remove (EPERM), as on a read-only or immutable file
        if os.fspath(path).endswith("stuck"):
            raise PermissionError(1, "Operation not permitted", os.fspath(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    lineage.replace_set(folder, {"new": b"n"}, lambda _p: None)  # the swap is done: no error for the leftover
    monkeypatch.setattr(os, "unlink", real_unlink)
    assert sorted(p.name for p in folder.iterdir()) == ["new"]
    left = [p for p in tmp_path.iterdir() if p.name != "s"]
    assert len(left) == 1 and (left[0] / "stuck").read_bytes() == b"o"
    # The leftover keeps its marker (removed last), so the next run finds it and removes it.
    assert (left[0] / portfs.MARKER).read_bytes() == portfs.MARKER_TEXT
    assert portfs.clean_stages(tmp_path) == left and sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_a_stage_is_removed_whole_marker_last_and_never_through_a_link(tmp_path):
    stage = tmp_path / ".s.port-1-new"
    (stage / "base" / "vllm").mkdir(parents=True)
    (stage / portfs.MARKER).write_bytes(portfs.MARKER_TEXT)
    (stage / "base" / "vllm" / "f.py").write_text("x")
    (stage / "model.py.diff").write_text("d")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("k")
    (stage / "link").symlink_to(outside)
    portfs.remove_stage(stage)
    assert not os.path.lexists(stage) and (outside / "keep").read_text() == "k"
    portfs.remove_stage(stage)  # already gone: nothing to do, no error
