"""Base choice (m3fuse/patching/basechoice.py) rule by rule, in process: the tests that kill its
mutants (`make mutation MODULE=m3fuse/patching/basechoice.py`).

The sets are real set folders written by setwriter (as `port` and tools/mkpatch.py write them)
around small Python files made to merge cleanly, conflict, or merge cleanly into code that does
not compile; their pristine files come through a real BaseSource (a --base-root tree and a
content-addressed cache). tests/test_lineage.py runs the same choice on the real releases."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from m3fuse.errors import MergeConflict, UsageProblem
from m3fuse.patching import basechoice
from m3fuse.patching.basechoice import Candidate, Choice, choose, nearness, port_with_bases
from m3fuse.patching.basesource import BaseSource
from m3fuse.patching.patchset import PatchSet, load_patchset
from m3fuse.patching.port import PortRequest
from m3fuse.patching.setwriter import FileChange, render
from m3fuse.target import VllmTarget

F1, F2, F3 = "vllm/a/one.py", "vllm/a/two.py", "vllm/b/three.py"

# Five lines with common lines between 1, 3 and 5, so changes to them merge independently.
PRISTINE = b"x = 1\na = 0\ny = 2\nb = 0\nz = 3\n"
# The tree (the new release) turns lines 1..5 into one string: it compiles.
TREE_STRING = b'x = """\na = 0\ny = 2\nb = 0\n"""\n'


def write_set(root: Path, name: str, versions: list[str], files: dict[str, bytes],
              pristine: dict[str, bytes] | None = None) -> PatchSet:
    changes = [FileChange(p, (pristine or {}).get(p, PRISTINE), data) for p, data in files.items()]
    folder = root / name
    folder.mkdir(parents=True)
    for fname, data in render(name, versions, f"test set {name}", changes).items():
        (folder / fname).write_bytes(data)
    return load_patchset(folder)


@pytest.fixture
def source(tmp_path) -> BaseSource:
    """Pristine files from a --base-root tree holding every PRISTINE variant the tests use."""
    return BaseSource(base_roots=[tmp_path / "base"], cache=tmp_path / "cache")


def base_tree(tmp_path: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = tmp_path / "base" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def bare(name: str, *versions: str) -> PatchSet:
    return PatchSet(name, Path("/nonexistent") / name, tuple(versions), "", ())


# ----------------------------------------------------------------------------- nearness
def test_nearness_orders_at_or_below_nearest_first_then_above_nearest_first():
    sets = [bare(n, v) for n, v in [("s33", "0.33.0"), ("s24", "0.24.0"), ("s30", "0.30.0"), ("s34", "0.34.0"),
                                     ("s26", "0.26.0"), ("s301", "0.30.1")]]
    ordered = [s.name for s in sorted(sets, key=lambda s: nearness(s, "0.30.0"))]
    assert ordered == ["s30", "s26", "s24", "s301", "s33", "s34"]


def test_nearness_takes_a_sets_nearest_version_on_each_side():
    # At or below: the highest version at or below; above (none below): the lowest.
    assert nearness(bare("m", "0.22.0", "0.29.0", "0.31.0"), "0.30.0") == (0, (0, -29, 0))
    assert nearness(bare("m", "0.29.0", "0.22.0"), "0.30.0") == (0, (0, -29, 0))
    assert nearness(bare("m", "0.35.0", "0.31.0"), "0.30.0") == (1, (0, 31, 0))
    assert nearness(bare("m", "0.30.0"), "0.30.0") == (0, (0, -30, 0))


def test_nearness_of_unparseable_versions_sorts_last_by_name():
    assert nearness(bare("zz", "0.30.0"), "not a version") == (2, "zz")
    assert nearness(bare("yy", "garbage"), "0.30.0") == (2, "yy")
    # One parseable version is enough.
    assert nearness(bare("xx", "garbage", "0.25.0"), "0.30.0") == (0, (0, -25, 0))
    assert nearness(bare("xx", "garbage", "0.25.0"), "0.30.0") < nearness(bare("aa", "junk"), "0.30.0")
    assert nearness(bare("ww", "0.40.0"), "0.30.0") < nearness(bare("aa", "junk"), "0.30.0")


# ----------------------------------------------------------------------------- choose
def test_fewest_conflicts_wins_over_nearness(tmp_path, source):
    base_tree(tmp_path, {F1: PRISTINE})
    # The tree changes line 1; "near" (the nearest release) changes it too: one conflict.
    near = write_set(tmp_path / "sets", "near", ["0.30.0"], {F1: PRISTINE.replace(b"x = 1", b"x = 5")})
    far = write_set(tmp_path / "sets", "far", ["0.20.0"], {F1: PRISTINE.replace(b"z = 3", b"z = 4")})
    tree = {F1: PRISTINE.replace(b"x = 1", b"x = 2")}
    c = choose([near, far], tree, "0.30.0", source, "new")
    assert c.per_file == {F1: "far"} and c.primary == "far" and c.overrides == [] and c.warnings == []
    got = [(x.set_name, x.conflicts, x.compiles, x.chosen) for x in c.candidates]
    assert got == [("far", 0, True, True), ("near", 1, True, False)]


def test_a_merge_that_does_not_compile_is_worse_than_any_conflict_count(tmp_path, source):
    """The docstring's rule: a clean merge into code that does not compile loses even to a set
    whose merge conflicts (a conflict is shown and resolved; broken code is silent)."""
    base_tree(tmp_path, {F1: PRISTINE})
    # Alone each compiles; merged into the tree's string, the ''' ... ''' closes it early.
    broken = write_set(tmp_path / "sets", "broken", ["0.30.0"], {F1: PRISTINE.replace(b"y = 2", b"y = '\"\"\"'")})
    conflicting = write_set(tmp_path / "sets", "conflicting", ["0.20.0"],
                            {F1: PRISTINE.replace(b"x = 1", b"x = 7").replace(b"z = 3", b"z = 8")})
    c = choose([broken, conflicting], {F1: TREE_STRING}, "0.30.0", source, "new")
    got = {x.set_name: (x.conflicts, x.compiles, x.chosen) for x in c.candidates}
    assert got == {"broken": (0, False, False), "conflicting": (2, True, True)}
    assert c.per_file == {F1: "conflicting"}
    assert [x.set_name for x in c.candidates] == ["conflicting", "broken"]  # best first
    lines = c.table()
    assert any("broken" in ln and "0 conflict(s) (does not compile)" in ln and "chosen" not in ln for ln in lines)
    assert any("conflicting" in ln and "2 conflict(s)  <- chosen" in ln for ln in lines)


def test_a_tie_goes_to_the_nearest_release_at_or_below_then_above(tmp_path, source):
    base_tree(tmp_path, {F1: PRISTINE})
    patched = PRISTINE.replace(b"z = 3", b"z = 4")
    above = write_set(tmp_path / "sets", "above", ["0.31.0"], {F1: patched})
    far_below = write_set(tmp_path / "sets", "far-below", ["0.20.0"], {F1: patched})
    below = write_set(tmp_path / "sets", "below", ["0.29.0"], {F1: patched})
    tree = {F1: PRISTINE.replace(b"x = 1", b"x = 2")}
    c = choose([above, far_below, below], tree, "0.30.0", source, "new")
    assert [x.set_name for x in c.candidates] == ["below", "far-below", "above"]
    assert [x.chosen for x in c.candidates] == [True, False, False]
    c = choose([above, far_below], tree, "0.30.0", source, "new")
    assert c.primary == "far-below"
    c = choose([above, write_set(tmp_path / "sets", "higher", ["0.40.0"], {F1: patched})], tree, "0.30.0",
               source, "new")
    assert c.primary == "above"


def test_the_set_chosen_for_most_files_names_the_port_the_rest_are_overrides(tmp_path, source):
    base_tree(tmp_path, {F1: PRISTINE, F2: PRISTINE, F3: PRISTINE})
    good, bad = PRISTINE.replace(b"z = 3", b"z = 4"), PRISTINE.replace(b"x = 1", b"x = 9")
    tree = {F1: PRISTINE.replace(b"x = 1", b"x = 2"), F2: PRISTINE.replace(b"x = 1", b"x = 2"),
            F3: PRISTINE.replace(b"x = 1", b"x = 2")}
    # "near" is nearer but wins one file; "far" wins two: far names the port.
    near = write_set(tmp_path / "sets", "near", ["0.30.0"], {F1: good, F2: bad, F3: bad})
    far = write_set(tmp_path / "sets", "far", ["0.10.0"], {F1: bad, F2: good, F3: good})
    c = choose([near, far], tree, "0.30.0", source, "new")
    assert c.per_file == {F1: "near", F2: "far", F3: "far"}
    assert c.primary == "far" and c.overrides == [f"{F1}=near"]
    lines = c.table()
    assert lines[0].startswith("port: candidate bases")
    assert lines[-1] == f"port: took --from far --from {F1}=near"
    assert f"  {F2}" in lines and f"  {F3}" in lines
    body = c.to_json()
    assert body["primary"] == "far" and body["per_file"] == c.per_file and body["warnings"] == []
    assert {"path": F1, "set": "near", "conflicts": 0, "compiles": True, "chosen": True} in body["candidates"]
    assert {"path": F1, "set": "far", "conflicts": 1, "compiles": True, "chosen": False} in body["candidates"]
    # A tie in file counts goes to the nearer set.
    c = choose([near, far], {F1: tree[F1], F2: tree[F2]}, "0.30.0", source, "new")
    assert c.primary == "near" and c.overrides == [f"{F2}=far"]


def test_a_set_that_does_not_patch_a_file_is_no_candidate_for_it(tmp_path, source):
    base_tree(tmp_path, {F1: PRISTINE, F2: PRISTINE})
    patched = PRISTINE.replace(b"z = 3", b"z = 4")
    only1 = write_set(tmp_path / "sets", "only1", ["0.30.0"], {F1: patched})
    both = write_set(tmp_path / "sets", "both", ["0.20.0"], {F1: PRISTINE.replace(b"x = 1", b"x = 9"),
                                                               F2: patched})
    tree = {F1: PRISTINE.replace(b"x = 1", b"x = 2"), F2: PRISTINE}
    c = choose([only1, both], tree, "0.30.0", source, "new")
    assert sorted((x.path, x.set_name) for x in c.candidates) == [(F1, "both"), (F1, "only1"), (F2, "both")]
    assert c.per_file == {F1: "only1", F2: "both"}


MARKER = b"def _can_use_aiter_fused_ar_rms():\n    return True\n"


def test_a_base_older_than_the_files_generation_is_warned_about(tmp_path, source):
    new_pristine = PRISTINE + MARKER
    base_tree(tmp_path, {F1: PRISTINE, F2: new_pristine})
    old = write_set(tmp_path / "sets", "old", ["0.26.0"], {F1: PRISTINE.replace(b"z = 3", b"z = 4")})
    tree = {F1: new_pristine}
    (w,) = choose([old], tree, "0.34.0", source, "new").warnings
    assert w.startswith(f"{F1}: the chosen base old predates this release's generation")
    assert "`_can_use_aiter_fused_ar_rms`" in w and "--from one.py=SET" in w
    assert choose([old], tree, "0.34.0", source, "new").table()[-1] == f"warning: {w}"
    # A base whose own pristine file has the branch: no warning.
    new = write_set(tmp_path / "sets2", "new", ["0.33.0"], {F1: new_pristine.replace(b"z = 3", b"z = 4")},
                    pristine={F1: new_pristine})
    base_tree(tmp_path, {F1: new_pristine})
    assert choose([new], tree, "0.34.0", source, "new").warnings == []
    # A tree without the branch: no warning either.
    base_tree(tmp_path, {F1: PRISTINE})
    assert choose([old], {F1: PRISTINE.replace(b"x = 1", b"x = 2")}, "0.34.0", source, "new").warnings == []


def test_candidate_and_choice_render_every_field():
    c = Candidate("p", "s", 3, False, chosen=True)
    assert c.to_json() == {"path": "p", "set": "s", "conflicts": 3, "compiles": False, "chosen": True}
    ch = Choice("a", {"p": "a", "q": "b"}, [Candidate("p", "a", 0, True, True), Candidate("p", "bbbbbb", 1, True),
                                            Candidate("q", "b", 0, True, True)])
    assert ch.overrides == ["q=b"]
    t = ch.table()
    assert t == ["port: candidate bases (conflicts of a three-way merge onto this tree):",
                 "  p", "    a       0 conflict(s)  <- chosen", "    bbbbbb  1 conflict(s)",
                 "  q", "    b       0 conflict(s)  <- chosen", "port: took --from a --from q=b"]


# ----------------------------------------------------------------------------- port_with_bases
def _vllm(tmp_path: Path, files: dict[str, bytes], version: str | None) -> VllmTarget:
    root = tmp_path / "tree"
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return VllmTarget(root=root, version=version, python=None, dist_info=None)


def test_port_with_bases_refuses_a_tree_of_no_known_version(tmp_path, source):
    base_tree(tmp_path, {F1: PRISTINE})
    s = write_set(tmp_path / "sets", "s", ["0.30.0"], {F1: PRISTINE.replace(b"z = 3", b"z = 4")})
    req = PortRequest(vllm=_vllm(tmp_path, {F1: PRISTINE.replace(b"x = 1", b"x = 2")}, None), sets=[s],
                      base="", overrides=[], versions=[], cache=tmp_path / "cache", base_roots=[tmp_path / "base"], name="n", out=tmp_path / "out", workdir=tmp_path / "w")
    with pytest.raises(UsageProblem, match="pass --version V"):
        port_with_bases(req, source, lambda _: None)
    assert not (tmp_path / "out").exists()


def test_port_with_bases_names_its_choice_in_a_merge_conflict(tmp_path, source):
    base_tree(tmp_path, {F1: PRISTINE})
    s = write_set(tmp_path / "sets", "s", ["0.20.0"], {F1: PRISTINE.replace(b"x = 1", b"x = 9")})
    said: list[str] = []
    (tmp_path / "out").mkdir()
    req = PortRequest(vllm=_vllm(tmp_path, {F1: PRISTINE.replace(b"x = 1", b"x = 2")}, "0.30.0"), sets=[s],
                      base="", overrides=[], versions=[], cache=tmp_path / "cache", base_roots=[tmp_path / "base"], name="n", out=tmp_path / "out", workdir=tmp_path / "w")
    with pytest.raises(MergeConflict) as exc:
        port_with_bases(req, source, said.append)
    assert exc.value.payload["base_choice"]["primary"] == "s"
    assert said[-1] == "port: took --from s" and req.base == "s"
    assert list((tmp_path / "out").iterdir()) == []
    # --version stands in for a tree without dist-info.
    req.vllm, req.versions, req.base = dataclasses.replace(req.vllm, version=None), ["0.30.0"], ""
    req.workdir = tmp_path / "w2"
    with pytest.raises(MergeConflict) as exc:
        port_with_bases(req, source, said.append)
    assert exc.value.payload["base_choice"]["per_file"] == {F1: "s"}


def test_port_with_bases_ports_cleanly_with_the_chosen_base(tmp_path, source):
    base_tree(tmp_path, {F1: PRISTINE})
    s = write_set(tmp_path / "sets", "s", ["0.20.0"], {F1: PRISTINE.replace(b"z = 3", b"z = 4")})
    (tmp_path / "out").mkdir()
    tree = PRISTINE.replace(b"x = 1", b"x = 2")
    req = PortRequest(vllm=_vllm(tmp_path, {F1: tree}, "0.30.0"), sets=[s], base="", overrides=[], versions=[], cache=tmp_path / "cache", base_roots=[tmp_path / "base"], name="n",
                      out=tmp_path / "out", workdir=tmp_path / "w")
    result, choice = port_with_bases(req, source, lambda _: None)
    assert choice is not None and choice.primary == "s"
    made = load_patchset(tmp_path / "out" / "n")
    (t,) = made.targets
    assert t.path == F1 and t.ported_from == "s"
    # With --from given, no choice is made and the named set's base files are primed.
    (tmp_path / "out2").mkdir()
    req = PortRequest(vllm=_vllm(tmp_path, {F1: tree}, "0.30.0"), sets=[s], base="s", overrides=[], versions=[], cache=tmp_path / "cache", base_roots=[tmp_path / "base"], name="n",
                      out=tmp_path / "out2", workdir=tmp_path / "w2")
    assert port_with_bases(req, source, lambda _: None)[1] is None
    assert load_patchset(tmp_path / "out2" / "n").targets[0].patched_sha256 == t.patched_sha256


def test_generation_markers_name_vllms_own_fused_branch():
    assert basechoice.GENERATION_MARKERS == {
        "_can_use_aiter_fused_ar_rms": "vLLM's own one-stage AITER fused all-reduce + RMSNorm branch"}


def _wheel(d: Path, version: str, files: dict[str, bytes]) -> None:
    """A release wheel as --wheels DIR holds it (only the members a set's pins name)."""
    import zipfile

    d.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(d / f"vllm-{version}-py3-none-any.whl", "w") as zf:
        for rel, data in files.items():
            zf.writestr(rel, data)


def test_with_from_given_every_named_sets_base_files_come_from_the_wheels(tmp_path):
    """--from SET --from FILE=SET: both sets' pristine files are read out of --wheels into the
    cache before port looks there (no download: these releases exist nowhere else)."""
    other = PRISTINE.replace(b"a = 0", b"a = 1")
    s = write_set(tmp_path / "sets", "s", ["0.1.998"], {F1: PRISTINE.replace(b"z = 3", b"z = 4"),
                                                         F2: PRISTINE.replace(b"z = 3", b"z = 5")})
    t = write_set(tmp_path / "sets", "t", ["0.1.999"], {F2: other.replace(b"z = 3", b"z = 6")}, pristine={F2: other})
    _wheel(tmp_path / "wheels", "0.1.998", {F1: PRISTINE, F2: PRISTINE})
    _wheel(tmp_path / "wheels", "0.1.999", {F2: other})
    source = BaseSource(wheel_dirs=[tmp_path / "wheels"], cache=tmp_path / "cache")
    (tmp_path / "out").mkdir()
    tree = {F1: PRISTINE.replace(b"x = 1", b"x = 2"), F2: PRISTINE.replace(b"x = 1", b"x = 2")}
    req = PortRequest(vllm=_vllm(tmp_path, tree, "0.30.0"), sets=[s, t], base="s", overrides=[f"{F2}=t"],
                      versions=[], cache=tmp_path / "cache", name="n", out=tmp_path / "out", workdir=tmp_path / "w")
    result, choice = port_with_bases(req, source, lambda _: None)
    assert choice is None
    made = {x.path: x.ported_from for x in load_patchset(tmp_path / "out" / "n").targets}
    assert made == {F1: "s", F2: "t"}


def test_the_first_of_several_versions_is_the_target(tmp_path, source):
    base_tree(tmp_path, {F1: PRISTINE})
    patched = PRISTINE.replace(b"z = 3", b"z = 4")
    lo = write_set(tmp_path / "sets", "lo", ["0.25.0"], {F1: patched})
    hi = write_set(tmp_path / "sets", "hi", ["0.35.0"], {F1: patched})
    (tmp_path / "out").mkdir()
    req = PortRequest(vllm=_vllm(tmp_path, {F1: PRISTINE.replace(b"x = 1", b"x = 2")}, None), sets=[hi, lo],
                      base="", overrides=[], versions=["0.30.0", "0.40.0"], cache=tmp_path / "cache",
                      base_roots=[tmp_path / "base"], name="n", out=tmp_path / "out", workdir=tmp_path / "w")
    assert port_with_bases(req, source, lambda _: None)[1].primary == "lo"
