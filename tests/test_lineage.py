"""Ported sets are derived data: `m3fuse port --refresh` re-derives each from its base(s) and its
recorded hand resolutions (m3fuse/patching/lineage.py), on the real release files.

The shipped sets equal a fresh derivation byte for byte; a one-line fix in a base reaches every
set derived from it with one command; a resolution that no longer fits, a tampered base
reference and a refresh killed at any write step are handled like the rest of `port`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import realvllm
from conftest import REPO
from m3fuse.patching import portfs, setwriter
from m3fuse.patching.hunks import apply_patch
from m3fuse.patching.patchset import load_all, load_patchset

PATCHES = REPO / "patches"
BASE = "vllm-0.26.0"


def ported(patches: Path = PATCHES) -> list[str]:
    return [s.name for s in load_all(patches) if any(t.ported_from for t in s.targets)]


def snapshot_sets(patches: Path) -> dict[str, bytes]:
    return {str(p.relative_to(patches)): p.read_bytes() for p in sorted(patches.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def wheels() -> Path:
    """The folder of real release wheels (downloaded once per machine by realvllm)."""
    for s in load_all(PATCHES):
        realvllm.wheel_path(s.vllm_versions[0])
    return realvllm.cache_root() / "vllm"


@pytest.fixture
def patches(tmp_path) -> Path:
    d = tmp_path / "patches"
    shutil.copytree(PATCHES, d)
    return d


def refresh(patches: Path, wheels: Path, *extra: str, env: dict | None = None,
            cache: Path | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "XDG_CACHE_HOME": str(cache or patches.parent / "cache"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "m3fuse", "port", "--refresh", "--patches", str(patches),
                           "--wheels", str(wheels), *extra], capture_output=True, text=True, env=full, timeout=300)


def fix_base_line(patches: Path, old: bytes, new: bytes) -> None:
    """Change one line of the base set's patched model, as a maintainer editing the base does."""
    base = load_patchset(patches / BASE)
    changes = []
    for t in base.targets:
        pristine = realvllm.read_member("0.26.0", t.path)
        patched = apply_patch(pristine, t.patch_file.read_text())
        if t.path == realvllm.MODEL:
            assert patched.count(old) == 1, old
            patched = patched.replace(old, new)
        changes.append(setwriter.FileChange(t.path, pristine, patched, t.ported_from))
    for name, data in setwriter.render(base.name, list(base.vllm_versions), base.summary, changes,
                                       ported_from=base.ported_from).items():
        (patches / BASE / name).write_bytes(data)


def patched_model(patches: Path, name: str) -> bytes:
    s = load_patchset(patches / name)
    t = next(t for t in s.targets if t.path == realvllm.MODEL)
    return apply_patch(realvllm.read_member(s.vllm_versions[0], t.path), t.patch_file.read_text())


def test_every_shipped_ported_set_is_its_base_plus_its_resolutions(patches, wheels):
    names = ported(patches)
    assert len(names) >= 7, names
    before = snapshot_sets(patches)
    r = refresh(patches, wheels, "--check", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    body = json.loads(r.stdout)
    assert [o["set"] for o in body["sets"]] == [n for n in names if n in {o["set"] for o in body["sets"]}]
    assert sorted(o["set"] for o in body["sets"]) == sorted(names)
    assert not [o["set"] for o in body["sets"] if o["changed"]], "a shipped set differs from its derivation"
    # and a real (writing) refresh leaves every byte as shipped
    r = refresh(patches, wheels)
    assert r.returncode == 0, r.stderr
    assert snapshot_sets(patches) == before


def test_recording_resolutions_reproduces_them(patches, wheels):
    """Deleting the recorded resolutions and recording them again gives the same files."""
    recorded = {p.relative_to(patches): p.read_bytes() for p in patches.glob("*/*.resolution.diff")}
    assert recorded, "no shipped set records a hand resolution"
    for p in recorded:
        (patches / p).unlink()
    r = refresh(patches, wheels, "--check")
    assert r.returncode == 6 and "conflicts no recorded resolution covers" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "m3fuse", "port", "--record-resolutions", "--patches", str(patches),
                        "--wheels", str(wheels)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "XDG_CACHE_HOME": str(patches.parent / "cache")})
    assert r.returncode == 0, r.stderr
    assert {p.relative_to(patches): p.read_bytes() for p in patches.glob("*/*.resolution.diff")} == recorded


def test_a_one_line_base_fix_reaches_every_derived_set_with_one_command(patches, wheels):
    old = b"        defer_ffn_all_reduce: bool = False,\n"
    marker = b"    # m3fuse: a one-line fix made in the base\n"
    # A line added above the resolved conflicts, so each derived set's resolution must move with it.
    anchor = b"class MiniMaxM3DecoderLayer(nn.Module):\n"
    fix_base_line(patches, anchor, marker.strip(b" ") + anchor)
    derived = [s.name for s in load_all(patches) if any(t.ported_from == BASE for t in s.targets)]
    untouched = {n: snapshot_sets(patches / n) for n in ("vllm-0.24.0", "vllm-0.26.0", "vllm-0.33.0")}
    # Files another command derives from the release (`m3fuse needs`) are carried, not dropped.
    carried = {n: (patches / n / "aiter-needs.toml").read_bytes() for n in derived}
    r = refresh(patches, wheels, "--json")
    assert r.returncode == 0, r.stderr
    changed = {o["set"] for o in json.loads(r.stdout)["sets"] if o["changed"]}
    assert changed == set(derived) and len(derived) >= 7
    for name in derived:
        model = patched_model(patches, name)
        assert model.count(marker.strip(b" ")) == 1, name
        assert model.count(old) == 1, name  # the resolutions still applied
        compile(model, name, "exec")
    assert {n: snapshot_sets(patches / n) for n in untouched} == untouched
    assert {n: (patches / n / "aiter-needs.toml").read_bytes() for n in derived} == carried
    again = refresh(patches, wheels, "--check")
    assert again.returncode == 0, again.stderr


def test_a_resolution_that_no_longer_fits_stops_naming_the_conflict(patches, wheels):
    # The base changes a line inside the region 0.30.0-0.32.0 resolved by hand.
    fix_base_line(patches, b"        defer_ffn_all_reduce: bool = False,\n",
                  b"        defer_ffn_all_reduce: bool = False,  # changed in the base\n")
    before = {n: snapshot_sets(patches / n) for n in ("vllm-0.30.0", "vllm-0.31.0", "vllm-0.32.0")}
    r = refresh(patches, wheels)
    assert r.returncode == 6, r.stderr
    assert "vllm-0.30.0" in r.stderr and "hand resolution 1 no longer fits" in r.stderr
    assert "defer_ffn_all_reduce" in r.stderr or "<<<<<<<" in r.stderr
    assert "--record-resolutions" in r.stderr and "Traceback" not in r.stderr
    assert {n: snapshot_sets(patches / n) for n in before} == before
    assert not [p for p in patches.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("case", ["no-such-set", "set-without-the-file", "cycle", "wrong-base", "garbage-resolution"])
def test_a_tampered_lineage_is_refused_and_nothing_is_written(case, patches, wheels):
    manifest = patches / "vllm-0.30.0" / "manifest.toml"
    text = manifest.read_text()

    def model_base(name: str) -> None:  # the model file's own ported-from is the manifest's last line
        cut = text.rindex('ported-from = "vllm-0.26.0"')
        manifest.write_text(text[:cut] + f'ported-from = "{name}"\n')

    want, words = 3, ""
    if case == "no-such-set":
        model_base("vllm-9.9.9")
        words = "ported-from names a set that does not exist"
    elif case == "set-without-the-file":
        other = patches / "vllm-0.24.0" / "manifest.toml"
        t = other.read_text()
        other.write_text(t[:t.index("[[files]]\npath = \"vllm/models")])
        model_base("vllm-0.24.0")
        words = "does not patch this file"
    elif case == "cycle":
        base = patches / BASE / "manifest.toml"
        t = base.read_text()
        pin = load_patchset(patches / BASE).targets[1].patched_sha256
        base.write_text(t.replace(f'patched-sha256 = "{pin}"\n', f'patched-sha256 = "{pin}"\nported-from = "vllm-0.30.0"\n'))
        words = "cycle"
    elif case == "wrong-base":
        model_base("vllm-0.24.0")
        want, words = 6, "vllm-0.30.0"
    elif case == "garbage-resolution":
        (patches / "vllm-0.30.0" / "model.py.resolution.diff").write_text("not a diff\n")
        words = "model.py.resolution.diff"
    before = snapshot_sets(patches)
    r = refresh(patches, wheels)
    assert r.returncode == want, (r.returncode, r.stderr)
    assert words in r.stderr and "Traceback" not in r.stderr, r.stderr
    if case != "wrong-base":  # sets ordered before the refused one may be refreshed: none changes here
        assert snapshot_sets(patches) == before
    else:
        assert snapshot_sets(patches / "vllm-0.30.0") == {k[len("vllm-0.30.0/"):]: v for k, v in before.items()
                                                           if k.startswith("vllm-0.30.0/")}


def test_a_killed_refresh_leaves_no_half_set(patches, wheels, tmp_path):
    """SIGKILL at every write step of a refresh that changes every derived set: each set folder
    is whole (its old bytes or its new ones), never half, and the next refresh finishes."""
    fix_base_line(patches, b"class MiniMaxM3DecoderLayer(nn.Module):\n",
                  b"# base fix\nclass MiniMaxM3DecoderLayer(nn.Module):\n")
    start = tmp_path / "start"
    shutil.copytree(patches, start)
    cache = tmp_path / "cache"
    log = tmp_path / "steps.log"
    r = refresh(patches, wheels, env={"M3FUSE_TEST_CHECKPOINTS": str(log)}, cache=cache)
    assert r.returncode == 0, r.stderr
    steps = log.read_text().splitlines()
    final = snapshot_sets(patches)
    # The sets that take a file from the changed base (vllm-0.34.0 takes both of its from 0.33.0).
    derived = [s.name for s in load_all(start) if any(t.ported_from == BASE for t in s.targets)]
    old_sets = {n: snapshot_sets(start / n) for n in derived}
    new_sets = {n: snapshot_sets(patches / n) for n in derived}
    assert all(old_sets[n] != new_sets[n] for n in old_sets)
    assert sum(s.startswith("refresh-swap ") for s in steps) == len(old_sets)
    # Every step of the first set's write, and the last step of every later set's.
    first_swap = next(i for i, s in enumerate(steps) if s.startswith("refresh-swap"))
    points = list(range(1, first_swap + 4)) + [i + 1 for i, s in enumerate(steps) if s.startswith("refresh-swap ")]
    points = sorted(set(p for p in points if p <= len(steps)))
    assert any(steps[p - 1].startswith("refresh-swapped") for p in points)  # old set under a stage name
    for n in points:
        shutil.rmtree(patches)
        shutil.copytree(start, patches)
        klog = tmp_path / f"kill-{n}.log"
        r = refresh(patches, wheels, env={"M3FUSE_TEST_CHECKPOINTS": str(klog), "M3FUSE_TEST_KILL_AT": str(n)},
                    cache=cache)
        assert r.returncode == -9, (n, r.returncode, r.stderr)
        for name in old_sets:
            # A stage marker a kill leaves in a live set is not set content; the next refresh drops it.
            got = {k: v for k, v in snapshot_sets(patches / name).items() if k != portfs.MARKER}
            assert got in (old_sets[name], new_sets[name]), f"killed at {steps[n - 1]}: {name} is half written"
        assert sorted(s.name for s in load_all(patches)) == sorted(p.name for p in start.iterdir())
        r = refresh(patches, wheels, cache=cache)
        assert r.returncode == 0, r.stderr
        assert snapshot_sets(patches) == final, f"after a kill at {steps[n - 1]} the next refresh did not finish"


# ============================================================== port without --from
def choose(root: Path, sets: list[str], name: str, out: Path, wheels: Path, cache: Path) -> tuple[int, dict, str]:
    d = out.parent / f"sets-{name}"
    for s in sets:
        shutil.copytree(PATCHES / s, d / s)
    r = subprocess.run([sys.executable, "-m", "m3fuse", "port", "--vllm-root", str(root), "--name", name,
                        "--out", str(out), "--patches", str(d), "--wheels", str(wheels), "--json",
                        "--workdir", str(out.parent / f"work-{name}")],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "XDG_CACHE_HOME": str(cache)})
    return r.returncode, json.loads(r.stdout), r.stderr


HAND_WRITTEN = ["vllm-0.24.0", "vllm-0.26.0", "vllm-0.33.0"]


def test_without_from_each_file_takes_the_base_with_fewest_conflicts(vllm_tree, wheels, tmp_path):
    out = tmp_path / "out"
    code, body, _ = choose(vllm_tree("0.30.0"), HAND_WRITTEN, "c030", out, wheels, tmp_path / "cache")
    assert code == 6 and body["error"]["kind"] == "merge-conflict"
    choice = body["base_choice"]
    got = {(c["path"], c["set"]): c["conflicts"] for c in choice["candidates"]}
    # merge3's counts (git merge-file finds 1 helper conflict from 0.24.0/0.26.0 and 6 model ones from 0.24.0)
    assert got == {(realvllm.HELPER, "vllm-0.33.0"): 0, (realvllm.HELPER, "vllm-0.26.0"): 0,
                   (realvllm.HELPER, "vllm-0.24.0"): 0, (realvllm.MODEL, "vllm-0.26.0"): 2,
                   (realvllm.MODEL, "vllm-0.33.0"): 4, (realvllm.MODEL, "vllm-0.24.0"): 5}
    # The helper's three-way tie goes to the nearest release at or below 0.30.0, which predates
    # 0.30.0's helper generation: that is said, naming the branch it does not know.
    assert choice["per_file"] == {realvllm.HELPER: "vllm-0.26.0", realvllm.MODEL: "vllm-0.26.0"}
    assert choice["primary"] == "vllm-0.26.0"
    (warning,) = choice["warnings"]
    assert realvllm.HELPER in warning and "_can_use_aiter_fused_ar_rms" in warning and "=SET" in warning
    assert [c["set"] for c in choice["candidates"] if c["path"] == realvllm.MODEL] == \
        ["vllm-0.26.0", "vllm-0.33.0", "vllm-0.24.0"]  # best first


def test_a_tie_goes_to_the_nearest_release_at_or_below(vllm_tree, wheels, tmp_path):
    """0.28.0's helper merges cleanly from all three hand-written sets: 0.26.0 is nearest; the result is
    the shipped vllm-0.28.0, which was made from 0.26.0."""
    out = tmp_path / "out"
    out.mkdir()
    code, body, err = choose(vllm_tree("0.28.0"), HAND_WRITTEN, "vllm-0.28.0", out, wheels, tmp_path / "cache")
    assert code == 0, err
    assert body["base_choice"]["per_file"] == {realvllm.HELPER: "vllm-0.26.0", realvllm.MODEL: "vllm-0.26.0"}
    ties = [c for c in body["base_choice"]["candidates"] if c["path"] == realvllm.HELPER and c["conflicts"] == 0]
    # three clean merges: 0.26.0 (nearest at or below) over 0.24.0 (further below) and 0.33.0 (above)
    assert [c["set"] for c in ties] == ["vllm-0.26.0", "vllm-0.24.0", "vllm-0.33.0"] and ties[0]["chosen"]
    shipped = {t.path: t.patched_sha256 for t in load_patchset(PATCHES / "vllm-0.28.0").targets}
    assert {t.path: t.patched_sha256 for t in load_patchset(out / "vllm-0.28.0").targets} == shipped


def test_an_older_helper_generation_is_warned_about(vllm_tree, wheels, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    root = vllm_tree("0.34.0")
    code, body, _ = choose(root, ["vllm-0.24.0", "vllm-0.26.0"], "old", out, wheels, tmp_path / "cache")
    assert code == 6
    (warning,) = body["base_choice"]["warnings"]
    assert realvllm.HELPER in warning and "_can_use_aiter_fused_ar_rms" in warning and "vllm-0.26.0" in warning
    r = subprocess.run([sys.executable, "-m", "m3fuse", "port", "--vllm-root", str(root), "--name", "old2",
                        "--out", str(out), "--patches", str(out.parent / "sets-old"), "--wheels", str(wheels),
                        "--workdir", str(tmp_path / "w2")], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert r.returncode == 6 and "warning: " in r.stderr and "<- chosen" in r.stderr
    assert "port: took --from vllm-0.26.0" in r.stderr
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("extra", [["--from", "vllm-0.26.0"], ["--name", "x"], ["--check", "--record-resolutions"]])
def test_refresh_takes_no_port_arguments(extra, patches, wheels):
    before = snapshot_sets(patches)
    r = refresh(patches, wheels, *extra)
    assert r.returncode == 2 and "work on every ported set" in r.stderr, r.stderr
    assert snapshot_sets(patches) == before
