"""The engine's decisions (m3fuse/patching/engine.py) one by one, in process: the tests that kill
its mutants (`make mutation MODULE=m3fuse/patching/engine.py`).

The sets are real set folders written by setwriter around small Python files, the trees real
folders (with a real RECORD where the case needs one); tests/test_engine.py runs the same engine
through the CLI on real release files."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import pytest

from m3fuse.errors import (EXIT_DRIFT, EXIT_ENVIRONMENT, EXIT_OK, DriftError, EnvironmentProblem,
                           PatchSetError, UnsupportedError)
from m3fuse.patching import atomic, engine
from m3fuse.patching.engine import (DRIFTED, MISSING, NOT_A_FILE, PARTIAL, PATCHED, PRISTINE, UNSUPPORTED, converge,
                                    inspect, judge, plan, refuse_unless_known)
from m3fuse.patching.patchset import PatchSet, load_patchset
from m3fuse.patching.setwriter import FileChange, render
from m3fuse.target import VllmTarget

A, B, C = "vllm/m/a.py", "vllm/m/b.py", "vllm/n/c.py"


def src(tag: str, n: int = 0) -> bytes:
    return f"# {tag}\nx = {n}\ny = 1\nz = 2\n".encode()


def write_set(root: Path, name: str, versions: list[str], files: dict[str, tuple[bytes, bytes]]) -> PatchSet:
    folder = root / name
    folder.mkdir(parents=True)
    changes = [FileChange(p, pristine, patched) for p, (pristine, patched) in files.items()]
    for fname, data in render(name, versions, f"set {name}", changes).items():
        (folder / fname).write_bytes(data)
    return load_patchset(folder)


def tree(tmp_path: Path, files: dict[str, bytes], version: str | None = "0.30.0", name: str = "sp",
         record: dict[str, bytes] | None = None) -> VllmTarget:
    root = tmp_path / name
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "vllm").mkdir(parents=True, exist_ok=True)
    dist = None
    if record is not None:
        dist = root / f"vllm-{version}.dist-info"
        dist.mkdir()
        rows = [f"{rel},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},{len(d)}"
                for rel, d in record.items()]
        (dist / "RECORD").write_text("\n".join(rows + [f"{dist.name}/RECORD,,"]) + "\n")
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
    return VllmTarget(root=root, version=version, python=None, dist_info=dist)


@pytest.fixture
def s30(tmp_path) -> PatchSet:
    return write_set(tmp_path / "sets", "s30", ["0.30.0"], {A: (src("a"), src("a", 1)), B: (src("b"), src("b", 1))})


# ----------------------------------------------------------------------------- states
def test_summarise_every_mix():
    fs = lambda *states: [engine.FileState(None, Path("p"), s, None) for s in states]  # noqa: E731
    assert engine._summarise(fs(PRISTINE, PRISTINE)) == PRISTINE
    assert engine._summarise(fs(PATCHED, PATCHED)) == PATCHED
    assert engine._summarise(fs(PRISTINE, PATCHED)) == PARTIAL
    assert engine._summarise(fs(PATCHED, DRIFTED)) == DRIFTED
    assert engine._summarise(fs(PRISTINE, MISSING)) == DRIFTED
    assert engine._summarise(fs(NOT_A_FILE)) == DRIFTED


def test_inspect_reads_each_state(tmp_path, s30):
    t = inspect(tree(tmp_path, {A: src("a"), B: src("b")}), [s30])
    assert (t.state, t.patch_set, [f.state for f in t.files]) == (PRISTINE, s30, [PRISTINE, PRISTINE])
    assert t.files[0].sha256 == hashlib.sha256(src("a")).hexdigest() and t.files[0].record is None
    assert t.problems == [] and t.leftovers == [] and t.closest is None and not t.no_model
    t = inspect(tree(tmp_path, {A: src("a", 1), B: src("b", 1)}, name="p"), [s30])
    assert t.state == PATCHED
    t = inspect(tree(tmp_path, {A: src("a", 1), B: src("b")}, name="q"), [s30])
    assert (t.state, [f.state for f in t.files]) == (PARTIAL, [PATCHED, PRISTINE])


def test_a_moved_file_is_missing_and_a_directory_is_not_a_file(tmp_path, s30):
    v = tree(tmp_path, {A: src("a"), "vllm/m/moved/b.py": src("b")})
    t = inspect(v, [s30])
    assert t.state == DRIFTED and [f.state for f in t.files] == [PRISTINE, MISSING] and t.files[1].sha256 is None
    with pytest.raises(DriftError) as exc:
        refuse_unless_known(t)
    assert ("got", MISSING) in exc.value.details
    (v.root / B).mkdir()
    t = inspect(v, [s30])
    assert [f.state for f in t.files] == [PRISTINE, NOT_A_FILE]
    with pytest.raises(EnvironmentProblem) as exc:
        refuse_unless_known(t)
    assert exc.value.message.startswith(f"{v.root / B}: not a regular file (a directory or a device sits where the "
                                        f"s30 set expects")
    assert "nothing was changed" in exc.value.message and "vllm==0.30.0" in exc.value.message


def test_drift_names_the_set_and_each_files_pins(tmp_path, s30):
    v = tree(tmp_path, {A: src("a"), B: b"changed\n"})
    t = inspect(v, [s30])
    assert t.state == DRIFTED and t.patch_set is s30
    with pytest.raises(DriftError) as exc:
        refuse_unless_known(t)
    e = exc.value
    assert e.headline == f"vLLM 0.30.0 at {v.root} has drifted from patch set s30; nothing was changed"
    tb = s30.targets[1]
    assert e.details == (("", A), ("state", "pristine (matches)"), ("", B),
                         ("expected", f"{tb.pristine_sha256} (pristine)"), ("or", f"{tb.patched_sha256} (patched)"),
                         ("got", hashlib.sha256(b"changed\n").hexdigest()))
    assert "pip install --force-reinstall --no-deps vllm==0.30.0" in e.hint
    with pytest.raises(DriftError) as exc:
        refuse_unless_known(t, read_only=True)
    assert exc.value.headline.endswith("s30") and "nothing was changed" not in exc.value.message
    failures, code = judge(t, PATCHED)
    assert code == EXIT_DRIFT == e.exit_code and failures == [exc.value.message]


def test_overlapping_sets_are_refused_unless_the_version_tells(tmp_path, s30):
    twin = write_set(tmp_path / "sets", "twin", ["0.31.0"], {A: (src("a"), src("a", 1))})
    v = tree(tmp_path, {A: src("a"), B: src("b")}, version="0.29.0")
    with pytest.raises(PatchSetError) as exc:
        inspect(v, [s30, twin])
    assert exc.value.message.startswith(f"the files under {v.root} match 2 patch sets (s30, twin);")
    assert inspect(tree(tmp_path, {A: src("a"), B: src("b")}, "0.31.0", "t31"), [s30, twin]).patch_set is twin
    assert inspect(tree(tmp_path, {A: src("a"), B: src("b")}, "0.30.0", "t30"), [s30, twin]).patch_set is s30
    with pytest.raises(PatchSetError, match="match 2 patch sets"):
        inspect(tree(tmp_path, {A: src("a"), B: src("b")}, None, "tn"), [s30, twin])


def test_a_tree_of_a_sets_version_that_matches_another_set_is_drift_from_its_own(tmp_path, s30):
    other = write_set(tmp_path / "sets", "other", ["0.20.0"], {A: (src("A"), src("A", 1))})
    v = tree(tmp_path, {A: src("A"), B: src("b")}, version="0.30.0")
    t = inspect(v, [s30, other])
    assert t.state == PRISTINE and t.patch_set is other  # content wins where a set matches fully
    v = tree(tmp_path, {A: src("A", 5), B: src("b")}, version="0.30.0", name="d")
    t = inspect(v, [other, s30])
    assert t.state == DRIFTED and t.patch_set is s30 and t.closest is None


# ----------------------------------------------------------------------------- the closest set
def test_unsupported_tree_names_the_set_with_most_matching_files(tmp_path, s30):
    one = write_set(tmp_path / "sets", "one", ["0.40.0"], {A: (src("a"), src("a", 1)), C: (src("c"), src("c", 1)),
                                                           "vllm/n/d.py": (src("d"), src("d", 1))})
    v = tree(tmp_path, {A: src("a"), B: src("b", 7), C: src("c"), "vllm/n/d.py": src("d", 7)}, version="0.35.0")
    t = inspect(v, [s30, one])
    assert t.state == UNSUPPORTED and t.patch_set is None and t.closest is one and not t.no_model
    assert [f.target.path for f in t.files] == [A, C, "vllm/n/d.py"]
    with pytest.raises(UnsupportedError) as exc:
        refuse_unless_known(t)
    e = exc.value
    assert e.headline == (f"vLLM 0.35.0 at {v.root} is not supported: no patch set matches its files; nothing "
                          f"was changed")
    assert e.details[:2] == (("supported sets", "s30 (0.30.0), one (0.40.0)"), ("closest set", "one"))
    assert e.hint == ("install a release `m3fuse sets` lists, or make a set: "
                      "`m3fuse port --from one --name NAME --out DIR`")
    assert judge(t, PATCHED)[1] == e.exit_code == UnsupportedError("x").exit_code


@pytest.mark.parametrize("have,want", [("0.35.0", "s33"), ("0.33.5", "s33"), ("0.32.0", "s31"), ("0.30.5", "s30"),
                                       ("0.29.0", "s30"), ("0.20.0", "s30"), ("0.30.0", "s30")])
def test_a_tie_in_matches_goes_to_the_newest_release_at_or_below_then_the_oldest_above(tmp_path, have, want):
    sets = [write_set(tmp_path / "sets", n, vs, {A: (src("a"), src("a", 1)), B: (src(n), src(n, 1))})
            for n, vs in [("s33", ["0.33.0"]), ("s30", ["0.30.0", "0.24.0"]), ("s31", ["0.31.0", "0.38.0"])]]
    # Not the version of any set (a set for the version would make it drift, not unsupported).
    v = tree(tmp_path, {A: src("a"), B: src("other")}, version=have)
    if have in ("0.30.0",):
        t = inspect(v, sets)
        assert t.state == DRIFTED and t.patch_set.name == want
        return
    t = inspect(v, sets)
    assert t.state == UNSUPPORTED and t.closest.name == want


def test_the_closest_set_of_a_tree_of_no_known_version_is_the_one_with_most_matches(tmp_path):
    sets = [write_set(tmp_path / "sets", n, ["0.30.0"], {A: (src("a"), src("a", 1)), B: (src(n), src(n, 1))})
            for n in ("first", "second")]
    v = tree(tmp_path, {A: src("a"), B: src("second")}, version=None)
    assert inspect(v, [sets[0], write_set(tmp_path / "sets", "third", ["junk"], {A: (src("q"), src("q", 1))})]
                   ).closest.name == "first"
    # "second" matches both files: it is the set, pristine.
    assert inspect(v, sets).patch_set.name == "second"
    v = tree(tmp_path, {A: src("a"), B: src("x")}, version=None, name="t2")
    t = inspect(v, sets)
    assert t.state == UNSUPPORTED and t.closest.name in ("first", "second")
    with pytest.raises(UnsupportedError) as exc:
        refuse_unless_known(t)
    assert exc.value.headline.startswith(f"vLLM unknown (no vllm dist-info) at {v.root}")


def test_a_tree_without_the_model_says_which_release_first_has_it(tmp_path, s30):
    old = write_set(tmp_path / "sets", "old", ["0.24.0"], {A: (src("a"), src("a", 1))})
    v = tree(tmp_path, {"vllm/other.py": b"x\n"}, version="0.20.0")
    t = inspect(v, [s30, old])
    assert t.state == UNSUPPORTED and t.no_model and t.closest is None and t.patch_set is None
    with pytest.raises(UnsupportedError) as exc:
        refuse_unless_known(t, read_only=True)
    e = exc.value
    assert e.headline == (f"vLLM 0.20.0 at {v.root} has no MiniMax M3 model: none of the files m3fuse patches "
                          f"exists")
    assert e.details == (("supported sets", "s30 (0.30.0), old (0.24.0)"), ("first release with M3", "0.24.0"))
    assert e.hint == ("M3 needs vLLM 0.24.0 or newer; install one of the supported releases (`m3fuse sets` lists "
                      "them)")
    assert engine.first_model_release([]) is None and engine.first_model_release([s30, old]) == "0.24.0"


def test_no_sets_at_all(tmp_path):
    t = inspect(tree(tmp_path, {A: src("a")}), [])
    assert t.state == UNSUPPORTED and t.files == [] and t.patch_set is None


# ----------------------------------------------------------------------------- RECORD and leftovers
def test_each_file_is_compared_with_vllms_record(tmp_path, s30):
    v = tree(tmp_path, {A: src("a"), B: src("b")}, record={A: src("a"), "vllm/x.py": b"x"})
    t = inspect(v, [s30])
    assert [f.record for f in t.files] == ["match", "unlisted"]
    v = tree(tmp_path, {A: src("a"), B: src("b")}, record={A: src("zz"), B: src("b")}, name="r2")
    assert [f.record for f in inspect(v, [s30]).files] == ["differs", "match"]


def test_stale_bytecode_and_leftover_temp_files_are_problems(tmp_path, s30):
    v = tree(tmp_path, {A: src("a"), B: src("b")})
    tmp = atomic.temp_name(v.root / A)
    tmp.write_bytes(b"half")
    (v.root / "vllm/m" / ".a.py.unrelated").write_bytes(b"x")
    t = inspect(v, [s30])
    assert t.leftovers == [tmp] and t.problems == [f"{tmp}: temp file left by an interrupted m3fuse run"]
    failures, code = judge(t, PRISTINE)
    assert code == EXIT_DRIFT and failures == t.problems
    assert engine.clean_leftovers(t) == [tmp] and not tmp.exists()
    assert (v.root / "vllm/m" / ".a.py.unrelated").exists()


# ----------------------------------------------------------------------------- judge
def test_judge(tmp_path, s30):
    v = tree(tmp_path, {A: src("a"), B: src("b")})
    assert judge(inspect(v, [s30]), PRISTINE) == ([], EXIT_OK)
    failures, code = judge(inspect(v, [s30]), PATCHED)
    assert code == EXIT_DRIFT and failures == [f"vLLM at {v.root} is pristine, expected patched: run `m3fuse install`."]
    v = tree(tmp_path, {A: src("a", 1), B: src("b", 1)}, name="p")
    assert judge(inspect(v, [s30]), PRISTINE)[0] == [
        f"vLLM at {v.root} is patched, expected pristine: run `m3fuse revert`."]
    v = tree(tmp_path, {A: src("a", 1), B: src("b")}, name="h")
    failures, code = judge(inspect(v, [s30]), PATCHED)
    assert code == EXIT_DRIFT and failures == [
        f"vLLM at {v.root} is partial, expected patched: an interrupted run left it half done; run `m3fuse "
        f"install` or `m3fuse revert` to finish."]


# ----------------------------------------------------------------------------- plan
def test_plan_computes_only_the_files_that_change(tmp_path, s30):
    v = tree(tmp_path, {A: src("a", 1), B: src("b")})
    changes = plan(inspect(v, [s30]), PATCHED)
    assert [(c.file.target.path, c.new_data) for c in changes] == [(B, src("b", 1))]
    changes = plan(inspect(v, [s30]), PRISTINE)
    assert [(c.file.target.path, c.new_data) for c in changes] == [(A, src("a"))]


def test_plan_refuses_a_file_changed_since_it_was_read(tmp_path, s30):
    v = tree(tmp_path, {A: src("a"), B: src("b")})
    t = inspect(v, [s30])
    (v.root / B).write_bytes(src("b", 9))
    with pytest.raises(DriftError) as exc:
        plan(t, PATCHED)
    assert exc.value.message.startswith(f"{v.root / B}: changed while m3fuse was reading the tree")
    (v.root / B).unlink()
    with pytest.raises(EnvironmentProblem, match="cannot read it"):
        plan(t, PATCHED)


def test_plan_refuses_a_set_whose_pins_disagree_with_its_diff(tmp_path):
    s = write_set(tmp_path / "sets", "s", ["0.30.0"], {A: (src("a"), src("a", 1))})
    text = (s.folder / "manifest.toml").read_text().replace(s.targets[0].patched_sha256, "e" * 64)
    (s.folder / "manifest.toml").write_text(text)
    s = load_patchset(s.folder)
    v = tree(tmp_path, {A: src("a")})
    with pytest.raises(PatchSetError) as exc:
        plan(inspect(v, [s]), PATCHED)
    assert exc.value.message == (f"{s.targets[0].patch_file}: applying it to {A} gives sha256 "
                                 f"{hashlib.sha256(src('a', 1)).hexdigest()}, but the manifest pins {'e' * 64} for "
                                 f"the patched file. The patch set is inconsistent; nothing was changed. Restore "
                                 f"the patch set from the m3fuse release.\n"
                                 f"hint: use the shipped sets (drop --patches), or fix the set file named above")


def test_plan_refuses_a_result_that_does_not_compile(tmp_path):
    s = write_set(tmp_path / "sets", "s", ["0.30.0"], {A: (src("a"), src("a").replace(b"y = 1", b"y = (1"))})
    v = tree(tmp_path, {A: src("a")})
    with pytest.raises(PatchSetError) as exc:
        plan(inspect(v, [s]), PATCHED)
    # The reason comes from m3fuse/pysource.py (bounded parse); the parser's own words sit between.
    assert exc.value.message.startswith(f"{s.targets[0].patch_file}: the patched {A} does not compile (does not "
                                        f"parse as Python: ")
    assert exc.value.message.endswith(" (line 3)); nothing was changed.\nhint: use the shipped sets (drop "
                                      "--patches), or fix the set file named above")
    # Reverting out of such a file is planned (the pristine file compiles).
    v = tree(tmp_path, {A: src("a").replace(b"y = 1", b"y = (1")}, name="b")
    assert [c.new_data for c in plan(inspect(v, [s]), PRISTINE)] == [src("a")]


def test_plan_refuses_a_locked_pycache_link(tmp_path, s30):
    v = tree(tmp_path, {A: src("a"), B: src("b")})
    (tmp_path / "elsewhere").mkdir()
    (v.root / "vllm/m/__pycache__").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(Exception) as exc:
        plan(inspect(v, [s30]), PATCHED)
    assert "__pycache__" in str(exc.value) and "rm " in str(exc.value)
    (v.root / "vllm/m/__pycache__").unlink()
    (v.root / "vllm/m/__pycache__").write_bytes(b"")
    with pytest.raises(Exception, match="not a directory"):
        plan(inspect(v, [s30]), PATCHED)


# ----------------------------------------------------------------------------- converge
def test_converge_round_trip_dry_run_and_nothing_to_do(tmp_path, s30):
    v = tree(tmp_path, {A: src("a"), B: src("b", 1)})
    said: list[str] = []
    t, actions = converge(v, [s30], PATCHED, dry_run=True, echo=said.append)
    assert actions == {"changed": [A], "dry_run": True} and t.state == PARTIAL
    assert said == [f"would make {A} patched (now pristine)"]
    assert (v.root / A).read_bytes() == src("a")
    said.clear()
    t, actions = converge(v, [s30], PATCHED, echo=said.append)
    assert t.state == PATCHED and actions["changed"] == [A] and actions["removed_temp_files"] == []
    assert said == [f"patched: {A}"] and (v.root / A).read_bytes() == src("a", 1)
    said.clear()
    t, actions = converge(v, [s30], PATCHED, echo=said.append)
    assert actions["changed"] == [] and said == ["nothing to do: already patched"]
    said.clear()
    t, actions = converge(v, [s30], PRISTINE, echo=said.append)
    assert t.state == PRISTINE and said == [f"pristine: {A}", f"pristine: {B}"]
    assert [(v.root / p).read_bytes() for p in (A, B)] == [src("a"), src("b")]


def test_converge_removes_temp_files_and_bytecode_of_replaced_sources(tmp_path, s30):
    import py_compile

    v = tree(tmp_path, {A: src("a"), B: src("b")})
    pyc = Path(py_compile.compile(str(v.root / A), doraise=True))
    tmp = atomic.temp_name(v.root / B)
    tmp.write_bytes(b"half")
    said: list[str] = []
    t, actions = converge(v, [s30], PATCHED, echo=said.append)
    assert actions["removed_temp_files"] == [str(tmp)] and not tmp.exists() and not pyc.exists()
    assert said[0] == f"removed {tmp}: temp file of an interrupted m3fuse run"
    assert f"removed {pyc}: bytecode of the replaced source" in said
    # Nothing to write, only a leftover: it is removed and no "nothing to do" is said.
    tmp.write_bytes(b"half")
    said.clear()
    t, actions = converge(v, [s30], PATCHED, echo=said.append)
    assert said == [f"removed {tmp}: temp file of an interrupted m3fuse run"]


def test_converge_removes_stale_bytecode_left_by_another_tool(tmp_path, s30):
    import py_compile

    v = tree(tmp_path, {A: src("a"), B: src("b", 1)})
    os.utime(v.root / A, (1_000_000, 1_000_000))
    pyc = Path(py_compile.compile(str(v.root / A), doraise=True))
    # Same size, same mtime, other text: Python would run the old code.
    (v.root / A).write_bytes(src("a", 1))
    os.utime(v.root / A, (1_000_000, 1_000_000))
    t0 = inspect(v, [s30])
    assert t0.state == PATCHED and t0.problems and "a.py" in t0.problems[0]
    assert judge(t0, PATCHED)[1] == EXIT_DRIFT
    said: list[str] = []
    t, actions = converge(v, [s30], PATCHED, echo=said.append)
    assert actions["removed_stale_bytecode"] == [str(pyc)] and not pyc.exists() and t.problems == []
    assert said[0].startswith(f"removed {v.root / 'vllm/m/__pycache__'}/") and "nothing to do" not in said[-1]


def test_execute_nothing_is_a_no_op():
    engine.execute([])


def test_tree_root_of_a_file_state(tmp_path, s30):
    v = tree(tmp_path, {A: src("a"), B: src("b")})
    t = inspect(v, [s30])
    assert engine._tree_root(t.files[0]) == Path(os.path.realpath(v.root))
    assert EXIT_ENVIRONMENT == EnvironmentProblem("x").exit_code


# ----------------------------------------------------------------------------- survivors of the mutation run
def test_a_target_past_the_read_bound_is_refused_as_unsafe(tmp_path, s30):
    from m3fuse import safeio
    from m3fuse.errors import UnsafePath

    v = tree(tmp_path, {A: src("a"), B: src("b")})
    with open(v.root / B, "ab") as f:
        f.truncate(safeio.MAX_SOURCE + 1)
    with pytest.raises(UnsafePath) as exc:
        inspect(v, [s30])
    assert "larger than the" in exc.value.message and "reinstall vLLM" in exc.value.message


def test_the_first_of_several_odd_files_is_named(tmp_path, s30):
    v = tree(tmp_path, {"vllm/m/x.py": b""})
    (v.root / A).mkdir()
    (v.root / B).mkdir()
    t = inspect(v, [s30])
    with pytest.raises(EnvironmentProblem) as exc:
        refuse_unless_known(t)
    assert exc.value.message.startswith(f"{v.root / A}: not a regular file")


def test_a_release_at_or_below_beats_one_above_even_when_its_numbers_are_shorter(tmp_path):
    """Tree 0.0.1: set "0" is at or below it, "0.0.2" above. As tuples, (0,) < (0, 0, -2): only the
    at-or-below rank keeps the order right."""
    sets = [write_set(tmp_path / "sets", n, [ver], {A: (src("a"), src("a", 1)), B: (src(n), src(n, 1))})
            for n, ver in [("zero", "0"), ("above", "0.0.2")]]
    t = inspect(tree(tmp_path, {A: src("a"), B: src("other")}, version="0.0.1"), sets)
    assert t.state == UNSUPPORTED and t.closest.name == "zero"


def _chattr(flag: str, *paths: Path) -> None:
    import subprocess

    subprocess.run(["chattr", flag, *map(str, paths)], check=True, capture_output=True)


@pytest.mark.parametrize("flag,word", [("+i", "immutable"), ("+a", "append-only")])
@pytest.mark.parametrize("which", ["file", "dir", "pyc"])
def test_a_file_system_lock_on_a_target_its_folder_or_its_bytecode_is_refused_before_writing(
        tmp_path, s30, flag, word, which):
    import py_compile

    v = tree(tmp_path, {A: src("a"), B: src("b")})
    pyc = Path(py_compile.compile(str(v.root / B), doraise=True))
    locked = {"file": v.root / B, "dir": v.root / B.rsplit("/", 1)[0], "pyc": pyc}[which]
    _chattr(flag, locked)
    try:
        with pytest.raises(EnvironmentProblem) as exc:
            converge(v, [s30], PATCHED)
        # An immutable folder is not even writable for root: that check speaks first.
        said = "not writable by this user" if (which, flag) == ("dir", "+i") else f"the file system marks it {word} (chattr)"
        assert exc.value.message.startswith(f"{locked}: {said}")
        assert (v.root / A).read_bytes() == src("a") and (v.root / B).read_bytes() == src("b")
    finally:
        _chattr(flag.replace("+", "-"), locked)


def test_other_inode_flags_are_no_lock(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"")
    _chattr("+s", p)  # FS_SECRM_FL (0x1): a flag next to the ones that lock
    try:
        assert engine._locked_flags(p) is None
    finally:
        _chattr("-s", p)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert engine._locked_flags(fifo) is None  # no such ioctl on a FIFO: unknown, not locked
    assert engine._locked_flags(tmp_path / "missing") is None


def test_ro_hint_of_a_path_that_cannot_be_examined():
    assert engine._ro_hint(Path("/nonexistent/x")) == ""


def test_a_temp_file_replaced_by_a_folder_before_cleanup_is_reported(tmp_path, s30):
    v = tree(tmp_path, {A: src("a"), B: src("b")})
    tmp = atomic.temp_name(v.root / A)
    tmp.write_bytes(b"half")
    t = inspect(v, [s30])
    tmp.unlink()
    tmp.mkdir()
    with pytest.raises(EnvironmentProblem) as exc:
        engine.clean_leftovers(t)
    assert exc.value.message.startswith(f"{tmp}: cannot remove this temp file of an interrupted run (")


def test_a_folder_that_vanishes_before_the_write_changes_nothing(tmp_path, s30):
    import shutil

    v = tree(tmp_path, {A: src("a"), B: src("b")})
    changes = plan(inspect(v, [s30]), PATCHED)
    shutil.move(v.root / "vllm" / "m", tmp_path / "moved")
    with pytest.raises(EnvironmentProblem) as exc:
        engine.execute(changes)
    assert type(exc.value) is EnvironmentProblem
    assert exc.value.message.startswith(f"{v.root / A}: writing it failed (No such file or directory). Nothing was "
                                        f"changed")
    assert sorted(p.name for p in (tmp_path / "moved").iterdir()) == ["a.py", "b.py"]


def test_a_folder_swapped_for_a_symlink_before_the_write_is_refused_as_unsafe(tmp_path, s30):
    from m3fuse.errors import UnsafePath

    v = tree(tmp_path, {A: src("a"), B: src("b")})
    changes = plan(inspect(v, [s30]), PATCHED)
    (v.root / "vllm" / "m").rename(tmp_path / "real")
    (v.root / "vllm" / "m").symlink_to(tmp_path / "real")
    with pytest.raises(UnsafePath) as exc:
        engine.execute(changes)
    assert "Nothing was changed" in exc.value.message
    assert (tmp_path / "real" / "a.py").read_bytes() == src("a")


def test_ro_hint_of_a_writable_file_system_is_empty(tmp_path):
    assert engine._ro_hint(tmp_path) == ""


def test_another_writer_right_after_the_write_is_reported(tmp_path, s30, monkeypatch):
    """Another process rewrites a target between m3fuse's writes and its proof: the run says so
    instead of claiming the goal."""
    v = tree(tmp_path, {A: src("a"), B: src("b")})
    real_execute = engine.execute

    def execute_then_other_writer(changes):
        real_execute(changes)
        (v.root / B).write_bytes(b"another writer\n")

    monkeypatch.setattr(engine, "execute", execute_then_other_writer)
    with pytest.raises(EnvironmentProblem) as exc:
        converge(v, [s30], PATCHED)
    assert exc.value.message.startswith(f"after writing, {v.root} is drifted, not patched (no other detail); "
                                        f"another process may be writing to the tree")


def test_summarise_a_mix_with_drift_is_drift():
    fs = [engine.FileState(None, Path("p"), s, None) for s in (PRISTINE, PATCHED, DRIFTED)]
    assert engine._summarise(fs) == DRIFTED


def test_an_unreadable_target_path_says_why(tmp_path):
    long_dir = "d" * 300  # longer than a file name may be: the read fails with ENAMETOOLONG
    rel = f"vllm/{long_dir}/a.py"
    s = write_set(tmp_path / "sets", "s", ["0.30.0"], {rel: (src("a"), src("a", 1))})
    v = tree(tmp_path, {A: src("a")})
    with pytest.raises(EnvironmentProblem) as exc:
        inspect(v, [s])
    assert exc.value.message.endswith(": cannot read it (File name too long).\nhint: fix the cause named above "
                                      "and run the same command again")


def test_a_set_of_unknown_release_does_not_beat_one_above(tmp_path):
    sets = [write_set(tmp_path / "sets", n, [ver], {A: (src("a"), src("a", 1)), B: (src(n), src(n, 1))})
            for n, ver in [("junk", "nightly"), ("above", "0.31.0")]]
    t = inspect(tree(tmp_path, {A: src("a"), B: src("other")}, version="0.30.0"), sets)
    assert t.closest.name == "above"
    t = inspect(tree(tmp_path, {A: src("a"), B: src("other")}, version="0.30.0", name="t2"), sets[::-1])
    assert t.closest.name == "above"


def test_a_local_build_of_the_trees_release_counts_as_at_or_below(tmp_path):
    """Tree 0.30.0; set "0.30.0+rocm7" is the same release (not the same version string, so the
    tree is unsupported, not drifted): it is nearer than 0.29.0."""
    sets = [write_set(tmp_path / "sets", n, [ver], {A: (src("a"), src("a", 1)), B: (src(n), src(n, 1))})
            for n, ver in [("older", "0.29.0"), ("local", "0.30.0+rocm7")]]
    t = inspect(tree(tmp_path, {A: src("a"), B: src("other")}, version="0.30.0"), sets)
    assert t.state == UNSUPPORTED and t.closest.name == "local"


def test_the_patched_file_is_compiled_as_its_own_module(tmp_path):
    """m3fuse's own `from __future__ import annotations` must not leak into the check: code valid
    on its own (a yield inside an annotation) is planned, not refused."""
    patched = src("a") + b"def g():\n    def f(x: (yield)):\n        pass\n"
    s = write_set(tmp_path / "sets", "s", ["0.30.0"], {A: (src("a"), patched)})
    v = tree(tmp_path, {A: src("a")})
    assert [c.new_data for c in plan(inspect(v, [s]), PATCHED)] == [patched]
