"""`m3fuse port` on real release trees: clean merges, conflicts and --resume, every refusal,
a killed port at each step, and the base files fetched through the user's own pip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import realvllm
from conftest import REPO, run_cli, snapshot
from m3fuse.fingerprint import sha256_bytes
from m3fuse.patching.hunks import apply_patch
from m3fuse.patching.patchset import load_all, load_patchset

HELPER_FROM_033 = "fused_allreduce_gemma_rms_norm.py=vllm-0.33.0"


@pytest.fixture
def out(tmp_path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


@pytest.fixture
def shipped_bases(tmp_path) -> Path:
    """Only the shipped sets ports start from, as a maintainer has them before the new set exists."""
    d = tmp_path / "base-sets"
    for name in ("vllm-0.26.0", "vllm-0.33.0"):
        shutil.copytree(REPO / "patches" / name, d / name)
    return d


@pytest.fixture
def bases(pristine_trees, shipped_bases) -> list[str]:
    return ["--patches", str(shipped_bases)] + [
        a for v in ("0.26.0", "0.33.0") for a in ("--base-root", str(pristine_trees(v)))]


def port(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "m3fuse", "port", *args], capture_output=True, text=True,
                          cwd=cwd, env=full, timeout=300)


def keep_both(path: Path) -> None:
    """Resolve additive conflicts by keeping the tree's lines, then the set's."""
    out, state = [], None
    for line in path.read_text().splitlines(keepends=True):
        if line.startswith("<<<<<<< "):
            state = "ours"
        elif line.startswith("||||||| ") and state:
            state = "base"
        elif line.startswith("=======") and state:
            state = "theirs"
        elif line.startswith(">>>>>>> ") and state:
            state = None
        elif state != "base":
            out.append(line)
    path.write_text("".join(out))


def test_clean_port_writes_a_complete_set_that_installs(vllm_tree, out, bases, tmp_path):
    root = vllm_tree("0.28.0")
    before = snapshot(root)
    r = port("--vllm-root", str(root), "--from", "vllm-0.26.0", "--name", "vllm-0.28.0-test", "--out", str(out),
             *bases, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "not a reviewed set" in r.stdout
    assert snapshot(root) == before, "port wrote into the vLLM tree"
    pset = load_patchset(out / "vllm-0.28.0-test").parse()
    assert pset.vllm_versions == ("0.28.0",) and pset.ported_from == "vllm-0.26.0"
    for t in pset.targets:
        pristine = (root / t.path).read_bytes()
        assert t.pristine_sha256 == sha256_bytes(pristine) and t.ported_from == "vllm-0.26.0"
        patched = apply_patch(pristine, (t.patch_file).read_text())
        assert sha256_bytes(patched) == t.patched_sha256
        compile(patched, t.path, "exec")
    assert sorted(p.name for p in out.iterdir()) == ["vllm-0.28.0-test"]  # no stage folder left
    r = run_cli("install", "--no-wheels", "--vllm-root", str(root), "--patches", str(out))
    assert r.returncode == 0, r.stderr
    assert run_cli("revert", "--vllm-root", str(root), "--patches", str(out)).returncode == 0
    assert snapshot(root) == before or {k: v[:2] for k, v in snapshot(root).items()} == \
        {k: v[:2] for k, v in before.items()}


@pytest.mark.parametrize("version,name", [("0.25.1", "vllm-0.25.x"), ("0.28.0", "vllm-0.28.0"),
                                          ("0.29.0", "vllm-0.29.0")])
def test_port_reproduces_the_shipped_set_made_with_it(version, name, vllm_tree, out, bases, tmp_path):
    """The shipped sets of these releases were made by `m3fuse port` from vllm-0.26.0: a port
    today gives the same patched files, so the sets are what the tool makes."""
    shipped = {t.path: t for t in load_patchset(REPO / "patches" / name).targets}
    if any(t.ported_from != "vllm-0.26.0" for t in shipped.values()):
        pytest.fail(f"{name} is no longer a pure port of vllm-0.26.0; update this test's expectation")
    root = vllm_tree(version)
    # Same name: the helper names its set (M3FUSE_SET), so the name is part of the bytes.
    r = port("--vllm-root", str(root), "--from", "vllm-0.26.0", "--name", name, "--out", str(out), *bases,
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f'M3FUSE_SET = "{name}"' in (out / name / "fused_allreduce_gemma_rms_norm.py.diff").read_text()
    for t in load_patchset(out / name).targets:
        assert (t.pristine_sha256, t.patched_sha256) == (shipped[t.path].pristine_sha256,
                                                         shipped[t.path].patched_sha256)


def test_conflicts_write_nothing_under_out_then_resume_finishes(vllm_tree, out, bases, tmp_path):
    root = vllm_tree("0.31.0")
    work = tmp_path / "work"
    before = snapshot(root)
    r = port("--vllm-root", str(root), "--from", "vllm-0.26.0", "--from", HELPER_FROM_033, "--name", "p031",
             "--out", str(out), "--workdir", str(work), *bases, cwd=tmp_path)
    assert r.returncode == 6, r.stderr
    assert list(out.iterdir()) == []
    merged = work / "merged" / realvllm.MODEL
    marks = [i for i, line in enumerate(merged.read_text().splitlines(), 1) if line.startswith("<<<<<<< ")]
    assert len(marks) == 2
    assert f"{merged} (merged from vllm-0.26.0)" in r.stderr
    for line in marks:
        assert f"conflict: line {line}" in r.stderr
    assert "--resume" in r.stderr and snapshot(root) == before

    # A half-resolved folder is refused, naming what is left.
    text = merged.read_text().splitlines(keepends=True)
    first = marks[0] - 1
    end = next(i for i in range(first, len(text)) if text[i].startswith(">>>>>>> "))
    merged.write_text("".join(text[:first] + [ln for ln in text[first + 1:end] if not ln.startswith(("|||||||", "======="))] + text[end + 1:]))
    r = port("--resume", str(work), "--out", str(out))
    assert r.returncode == 6 and "conflict marker left" in r.stderr and list(out.iterdir()) == []

    keep_both(merged)
    r = port("--resume", str(work), "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["reviewed"] is False and res["set_dir"] == str(out / "p031")
    assert {f["path"]: f["ported_from"] for f in res["files"]} == {
        realvllm.HELPER: "vllm-0.33.0", realvllm.MODEL: "vllm-0.26.0"}
    assert run_cli("install", "--no-wheels", "--vllm-root", str(root), "--patches", str(out)).returncode == 0
    model = (root / realvllm.MODEL).read_text()
    assert "sparse_table_buffers=sparse_table_buffers" in model and "defer_ffn_all_reduce=self.defer_ffn_all_reduce" in model
    r = port("--resume", str(work), "--out", str(out))
    assert r.returncode == 2 and "already exists" in r.stderr  # a finished work folder is not reused


def test_conflict_json_names_each_conflict(vllm_tree, out, bases, tmp_path):
    root = vllm_tree("0.30.0")
    r = port("--vllm-root", str(root), "--from", "vllm-0.26.0", "--from", HELPER_FROM_033, "--name", "p030",
             "--out", str(out), "--workdir", str(tmp_path / "w"), "--json", *bases, cwd=tmp_path)
    body = json.loads(r.stdout)
    assert r.returncode == 6 and body["ok"] is False and body["error"]["kind"] == "merge-conflict"
    files = {f["path"]: f for f in body["port"]["files"]}
    assert files[realvllm.HELPER]["conflicts"] == [] and len(files[realvllm.MODEL]["conflicts"]) == 2


def test_resume_refuses_a_tampered_work_folder(vllm_tree, out, bases, tmp_path):
    root = vllm_tree("0.28.0")
    work = tmp_path / "w"
    r = port("--vllm-root", str(root), "--from", "vllm-0.26.0", "--name", "p", "--out", str(out),
             "--workdir", str(work), "--edit", *bases, cwd=tmp_path)
    assert r.returncode == 0 and "--resume" in r.stdout and list(out.iterdir()) == []
    pristine = work / "pristine" / realvllm.MODEL
    saved = pristine.read_bytes()
    pristine.write_bytes(saved + b"\n")
    r = port("--resume", str(work), "--out", str(out))
    assert r.returncode == 4 and "expected sha256" in r.stderr and list(out.iterdir()) == []
    pristine.write_bytes(saved)
    merged = work / "merged" / realvllm.MODEL
    good = merged.read_bytes()
    merged.write_bytes(good.replace(b"def forward(", b"def forward((", 1))
    r = port("--resume", str(work), "--out", str(out))
    assert r.returncode == 6 and "does not compile" in r.stderr and list(out.iterdir()) == []
    merged.write_bytes(good)
    meta = work / "port.json"
    saved_meta = meta.read_bytes()
    for bad in (b"{not json", b"[]", json.dumps({"name": 1}).encode()):
        meta.write_bytes(bad)
        r = port("--resume", str(work), "--out", str(out))
        assert r.returncode == 2 and "port.json" in r.stderr, r.stderr
    meta.write_bytes(saved_meta.replace(b'"vllm/models', b'"../vllm/models'))
    r = port("--resume", str(work), "--out", str(out))
    assert r.returncode == 3 and ".." in r.stderr and list(out.iterdir()) == []
    meta.write_bytes(saved_meta)
    assert port("--resume", str(work), "--out", str(out)).returncode == 0
    assert load_patchset(out / "p").parse().name == "p"


@pytest.mark.parametrize("case", ["matches-a-set", "unknown-set", "name-exists", "bad-name", "override-without-set",
                                  "missing-target", "record-differs", "override-unknown-file"])
def test_refusals_write_nothing(case, vllm_tree, out, bases, tmp_path):
    root = vllm_tree("0.26.0" if case == "matches-a-set" else "0.28.0")
    args = ["--vllm-root", str(root), "--from", "vllm-0.26.0", "--name", "n", "--out", str(out), *bases]
    want, words = 2, ""
    if case == "matches-a-set":
        words = "already matches patch set vllm-0.26.0"
    elif case == "unknown-set":
        args[3], words = "vllm-9.9.9", "no such patch set"
    elif case == "name-exists":
        (out / "n").mkdir()
        words = "already exists"
    elif case == "bad-name":
        args[5], words = "../escape", "a set name is a folder name"
    elif case == "override-without-set":
        args[3], words = HELPER_FROM_033, "at most one --from SET"
    elif case == "missing-target":
        (root / realvllm.MODEL).unlink()
        want, words = 3, "missing"
    elif case == "record-differs":
        p = root / realvllm.MODEL
        p.write_bytes(p.read_bytes() + b"# local edit\n")
        want, words = 3, "RECORD"
    elif case == "override-unknown-file":
        args += ["--from", "nosuch.py=vllm-0.33.0"]
        words = "names 0 of"
    before, out_before = snapshot(root), snapshot(out)
    r = port(*args, cwd=tmp_path)
    assert r.returncode == want, (r.returncode, r.stderr)
    assert words in r.stderr
    assert snapshot(root) == before and snapshot(out) == out_before
    assert not (tmp_path / "m3fuse-port-n").exists()


def test_base_files_come_through_pip_then_from_the_cache(vllm_tree, out, shipped_bases, tmp_path):
    """No --base-root: the base release's wheel through the user's pip (here a local
    find-links folder holding the real wheel), each file proved by its pin, then cached."""
    root = vllm_tree("0.27.0")
    links = tmp_path / "links"
    links.mkdir()
    os.symlink(realvllm.wheel_path("0.26.0"), links / realvllm.wheel_path("0.26.0").name)
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(links)}
    r = port("--vllm-root", str(root), "--from", "vllm-0.26.0", "--name", "a", "--out", str(out), "--patches", str(shipped_bases), cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    # It says that it downloads, and through which pip configuration (by name, never an address).
    assert "downloading vLLM 0.26.0's wheel" in r.stderr
    assert "PIP_FIND_LINKS (environment)" in r.stderr and "PIP_NO_INDEX (environment)" in r.stderr
    cached = sorted(p.name for p in (tmp_path / "cache" / "m3fuse" / "pristine").iterdir())
    assert cached == sorted(t.pristine_sha256 for t in load_patchset(REPO / "patches" / "vllm-0.26.0").targets)
    shutil.rmtree(links)
    links.mkdir()  # pip would now find nothing: the second port must not need it
    r = port("--vllm-root", str(root), "--from", "vllm-0.26.0", "--name", "b", "--out", str(out), "--patches", str(shipped_bases), cwd=tmp_path, env=env)
    assert r.returncode == 0 and "downloading" not in r.stderr, r.stderr
    # With neither cache nor a reachable wheel: an environment error that says what to pass.
    env["XDG_CACHE_HOME"] = str(tmp_path / "empty-cache")
    r = port("--vllm-root", str(root), "--from", "vllm-0.26.0", "--name", "c", "--out", str(out), "--patches", str(shipped_bases), cwd=tmp_path, env=env)
    assert r.returncode == 5 and "--base-root" in r.stderr and not (out / "c").exists()


def test_a_wrong_base_root_is_not_trusted(vllm_tree, out, pristine_trees, shipped_bases, tmp_path):
    """A --base-root whose files are not the set's pristine files is passed over (pins decide),
    so with nothing else to use the port stops instead of merging against the wrong base."""
    root = vllm_tree("0.27.0")
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path)}
    r = port("--vllm-root", str(root), "--from", "vllm-0.26.0", "--name", "w", "--out", str(out),
             "--patches", str(shipped_bases), "--base-root", str(pristine_trees("0.24.0")), cwd=tmp_path, env=env)
    assert r.returncode == 5 and not (out / "w").exists()


def checkpoints(tmp_path: Path, args: list[str]) -> list[str]:
    log = tmp_path / "steps.log"
    r = port(*args, env={"M3FUSE_TEST_CHECKPOINTS": str(log)}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    steps = log.read_text().splitlines()
    log.unlink()
    return steps


def test_a_killed_port_leaves_no_half_set(vllm_tree, out, bases, tmp_path):
    root = vllm_tree("0.29.0")
    args = ["--vllm-root", str(root), "--from", "vllm-0.26.0", "--name", "k", "--out", str(out), *bases]
    steps = checkpoints(tmp_path, args)
    assert any(s.startswith("port-stage") for s in steps) and steps[-1].startswith("port-rename")
    reference = {p.name: p.read_bytes() for p in (out / "k").iterdir()}
    shutil.rmtree(out / "k")
    for n in range(1, len(steps) + 1):
        log = tmp_path / f"kill-{n}.log"
        r = port(*args, env={"M3FUSE_TEST_CHECKPOINTS": str(log), "M3FUSE_TEST_KILL_AT": str(n)}, cwd=tmp_path)
        assert r.returncode == -9, (n, r.returncode, r.stderr)
        assert not (out / "k").exists(), f"killed at step {n} ({steps[n - 1]}) but a set folder is visible"
        assert [s.name for s in load_all(out)] == []  # a stage folder is never taken for a set
        r = port(*args, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert {p.name: p.read_bytes() for p in (out / "k").iterdir()} == reference
        assert sorted(p.name for p in out.iterdir()) == ["k"], "the killed run's stage folder was not removed"
        shutil.rmtree(out / "k")
