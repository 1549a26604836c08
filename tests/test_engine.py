"""The patch engine on real vLLM release files, driven through the real CLI."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest

import realvllm
import samplesets
from conftest import run_cli, snapshot
from m3fuse.patching.patchset import load_all

RELEASES = ["0.24.0", "0.26.0", "0.33.0"]
# Every release the shipped sets name, and the set that names it.
SET_OF = {v: s.name for s in load_all(Path(__file__).resolve().parent.parent / "patches") for v in s.vllm_versions}
SHIPPED_RELEASES = sorted(SET_OF)
TARGETS = (realvllm.HELPER, realvllm.MODEL)


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def cli_json(*args: str) -> tuple[int, dict]:
    r = run_cli(*args, "--json")
    return r.returncode, json.loads(r.stdout)


@pytest.fixture
def sets_dir(tmp_path):
    d = tmp_path / "patches"
    for v in RELEASES:
        samplesets.sample_set(d, v)
    return d


@pytest.mark.parametrize("version", RELEASES)
def test_round_trip_is_byte_identical(version, vllm_tree, sets_dir):
    root = vllm_tree(version)
    before = snapshot(root)
    code, st = cli_json("status", "--vllm-root", str(root), "--patches", str(sets_dir))
    assert code == 0 and st["state"] == "pristine" and st["set"] == f"sample-{version}"
    assert st["vllm"]["version"] == version
    assert all(f["record"] == "match" for f in st["files"])  # the wheel's own RECORD agrees

    code, out = cli_json("install", "--no-wheels", "--vllm-root", str(root), "--patches", str(sets_dir))
    assert code == 0, out
    assert out["state"] == "patched" and sorted(out["actions"]["changed"]) == sorted(TARGETS)
    for rel in TARGETS:
        assert (root / rel).read_bytes() == samplesets.patched_bytes(version, rel)
        assert (root / rel).stat().st_ino != before[rel][2]  # replaced, not edited in place
    r = run_cli("verify", "--no-wheels", "--vllm-root", str(root), "--patches", str(sets_dir))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verify: OK" in r.stdout

    r = run_cli("revert", "--vllm-root", str(root), "--patches", str(sets_dir))
    assert r.returncode == 0, r.stderr
    after = snapshot(root)
    assert {k: v[:2] for k, v in after.items()} == {k: v[:2] for k, v in before.items()}
    code, st = cli_json("verify", "--expect", "pristine", "--vllm-root", str(root), "--patches", str(sets_dir))
    assert code == 0 and all(f["record"] == "match" for f in st["files"])


def test_install_and_revert_are_idempotent(vllm_tree, sets_dir):
    root = vllm_tree("0.26.0")
    r = run_cli("revert", "--vllm-root", str(root), "--patches", str(sets_dir))
    assert r.returncode == 0 and "nothing to do: already pristine" in r.stdout
    assert run_cli("install", "--no-wheels", "--vllm-root", str(root), "--patches", str(sets_dir)).returncode == 0
    inodes = {rel: (root / rel).stat().st_ino for rel in TARGETS}
    r = run_cli("install", "--no-wheels", "--vllm-root", str(root), "--patches", str(sets_dir))
    assert r.returncode == 0 and "nothing to do: already patched" in r.stdout
    assert {rel: (root / rel).stat().st_ino for rel in TARGETS} == inodes


def test_drift_is_refused_with_nothing_written(vllm_tree, sets_dir):
    root = vllm_tree("0.26.0")
    model = root / realvllm.MODEL
    data = bytearray(model.read_bytes())
    data[1000] ^= 0x01  # a one-byte drift
    model.write_bytes(bytes(data))
    before = snapshot(root)
    r = run_cli("install", "--no-wheels", "--vllm-root", str(root), "--patches", str(sets_dir))
    assert r.returncode == 3
    msg = r.stderr
    assert realvllm.MODEL in msg and sha(model) in msg and "vLLM 0.26.0" in msg
    assert hashlib.sha256(realvllm.read_member("0.26.0", realvllm.MODEL)).hexdigest() in msg  # expected
    assert "reinstall" in msg.lower()
    assert snapshot(root) == before
    r = run_cli("verify", "--no-wheels", "--vllm-root", str(root), "--patches", str(sets_dir))
    assert r.returncode == 3 and "drifted" in r.stdout.lower()
    assert run_cli("revert", "--vllm-root", str(root), "--patches", str(sets_dir)).returncode == 3
    assert snapshot(root) == before


def test_release_without_a_set_is_unsupported(vllm_tree, sets_dir):
    # 0.25.1 ships the same helper as 0.24.0/0.26.0 but its own model file.
    root = vllm_tree("0.25.1")
    before = snapshot(root)
    r = run_cli("install", "--no-wheels", "--vllm-root", str(root), "--patches", str(sets_dir))
    assert r.returncode == 3
    assert "0.25.1" in r.stderr and "not supported" in r.stderr
    for v in RELEASES:
        assert f"sample-{v}" in r.stderr
    assert realvllm.MODEL in r.stderr
    assert snapshot(root) == before


@pytest.mark.parametrize("goal", ["install", "revert"])
def test_partial_tree_is_reported_and_finished(goal, vllm_tree, sets_dir):
    """As after a crash between the two renames: one file patched, one pristine."""
    root = vllm_tree("0.24.0")
    (root / realvllm.HELPER).write_bytes(samplesets.patched_bytes("0.24.0", realvllm.HELPER))
    code, out = cli_json("verify", "--no-wheels", "--vllm-root", str(root), "--patches", str(sets_dir))
    assert code == 3 and out["state"] == "partial"
    assert any("interrupted run" in f for f in out["failures"])
    args = [goal, "--vllm-root", str(root), "--patches", str(sets_dir)] + (["--no-wheels"] if goal == "install" else [])
    code, out = cli_json(*args)
    assert code == 0, out
    want = "patched" if goal == "install" else "pristine"
    assert out["state"] == want
    assert out["actions"]["changed"] == [realvllm.MODEL if goal == "install" else realvllm.HELPER]
    for rel in TARGETS:
        expected = (samplesets.patched_bytes("0.24.0", rel) if goal == "install"
                    else realvllm.read_member("0.24.0", rel))
        assert (root / rel).read_bytes() == expected


def test_second_run_waits_then_gives_up_on_lock(vllm_tree, sets_dir):
    root = vllm_tree("0.26.0")
    before = snapshot(root)
    fd = os.open(root / "vllm", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        r = run_cli("install", "--no-wheels", "--lock-timeout", "0.5", "--vllm-root", str(root),
                    "--patches", str(sets_dir))
    finally:
        os.close(fd)
    assert r.returncode == 5
    assert "another m3fuse run holds the lock" in r.stderr and "--lock-timeout" in r.stderr
    assert snapshot(root) == before
    # Released: the same command now goes through.
    assert run_cli("install", "--no-wheels", "--vllm-root", str(root), "--patches", str(sets_dir)).returncode == 0


@pytest.mark.parametrize("bad_path,needle", [
    ("../outside.py", "'..'"),
    ("/etc/passwd", "absolute"),
    ("vllm/../../outside.py", "'..'"),
])
def test_escaping_manifest_paths_are_refused(bad_path, needle, vllm_tree, sets_dir):
    root = vllm_tree("0.26.0")
    manifest = sets_dir / "sample-0.26.0" / "manifest.toml"
    manifest.write_text(manifest.read_text().replace(f'path = "{realvllm.HELPER}"', f'path = "{bad_path}"', 1))
    before = snapshot(root)
    r = run_cli("install", "--no-wheels", "--vllm-root", str(root), "--patches", str(sets_dir))
    assert r.returncode == 3 and needle in r.stderr and str(manifest) in r.stderr
    assert snapshot(root) == before


def test_symlink_out_of_the_tree_is_refused(vllm_tree, sets_dir, tmp_path):
    root = vllm_tree("0.26.0")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    real_dir = root / "vllm/models/minimax_m3/amd"
    for f in real_dir.iterdir():
        (outside / f.name).write_bytes(f.read_bytes())
    import shutil

    shutil.rmtree(real_dir)
    real_dir.symlink_to(outside)
    before = snapshot(outside)
    r = run_cli("install", "--no-wheels", "--vllm-root", str(root), "--patches", str(sets_dir))
    assert r.returncode == 3 and "outside the vLLM root" in r.stderr and str(outside) in r.stderr
    assert snapshot(outside) == before
    assert (root / realvllm.HELPER).read_bytes() == realvllm.read_member("0.26.0", realvllm.HELPER)


def test_inconsistent_patch_set_is_refused_before_writing(vllm_tree, sets_dir):
    root = vllm_tree("0.26.0")
    manifest = sets_dir / "sample-0.26.0" / "manifest.toml"
    good = hashlib.sha256(samplesets.patched_bytes("0.26.0", realvllm.MODEL)).hexdigest()
    manifest.write_text(manifest.read_text().replace(good, "0" * 64))
    before = snapshot(root)
    r = run_cli("install", "--no-wheels", "--vllm-root", str(root), "--patches", str(sets_dir))
    # The model file now matches neither pin of a set, yet applying would give `good`: refused.
    assert r.returncode == 3
    assert snapshot(root) == before
    # A diff that does not produce the pinned hash (but whose pins are well formed).
    samplesets.sample_set(sets_dir, "0.26.0")  # restore
    diff = sets_dir / "sample-0.26.0" / "model.py.diff"
    diff.write_text(diff.read_text().replace("+M3FUSE_SAMPLE = True", "+M3FUSE_SAMPLE = False"))
    r = run_cli("install", "--no-wheels", "--vllm-root", str(root), "--patches", str(sets_dir))
    assert r.returncode == 3 and "gives sha256" in r.stderr and good in r.stderr and "model.py.diff" in r.stderr
    assert snapshot(root) == before


def test_stale_bytecode_is_removed_and_detected(vllm_tree, sets_dir):
    root = vllm_tree("0.26.0")
    helper = root / realvllm.HELPER
    pyc = Path(py_compile.compile(str(helper), invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH))
    assert pyc.exists()
    assert run_cli("install", "--no-wheels", "--vllm-root", str(root), "--patches", str(sets_dir)).returncode == 0
    assert not pyc.exists()  # an unchecked pyc of the pristine text would have kept running
    # Plant one again (as a stale image layer might): verify must see it, install must fix it.
    pristine_src = root / "stale_src.py"
    pristine_src.write_bytes(realvllm.read_member("0.26.0", realvllm.HELPER))
    py_compile.compile(str(pristine_src), cfile=str(pyc),
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    code, out = cli_json("verify", "--no-wheels", "--vllm-root", str(root), "--patches", str(sets_dir))
    assert code == 3 and any(pyc.name in p and "unchecked" in p for p in out["problems"])
    # And Python really would run the old code from it:
    probe = subprocess.run([sys.executable, "-c", "import importlib.util,sys;"
                            f"spec=importlib.util.spec_from_file_location('h', {str(helper)!r});"
                            "m=importlib.util.module_from_spec(spec);"
                            "print(spec.loader.get_code('h').co_consts.count('M3FUSE_SAMPLE'))"],
                           capture_output=True, text=True)
    assert probe.stdout.strip() == "0", probe.stderr
    r = run_cli("install", "--no-wheels", "--vllm-root", str(root), "--patches", str(sets_dir))
    assert r.returncode == 0 and not pyc.exists()
    assert run_cli("verify", "--no-wheels", "--vllm-root", str(root), "--patches", str(sets_dir)).returncode == 0


def test_mode_kept_and_hard_links_broken(vllm_tree, sets_dir, tmp_path):
    root = vllm_tree("0.26.0")
    model = root / realvllm.MODEL
    model.chmod(0o640)
    twin = tmp_path / "other-env-model.py"
    os.link(model, twin)  # as a hard-linking installer shares one file between environments
    assert run_cli("install", "--no-wheels", "--vllm-root", str(root), "--patches", str(sets_dir)).returncode == 0
    assert (model.stat().st_mode & 0o7777) == 0o640
    assert twin.read_bytes() == realvllm.read_member("0.26.0", realvllm.MODEL)
    assert model.read_bytes() != twin.read_bytes()


def test_dry_run_changes_nothing(vllm_tree, sets_dir):
    root = vllm_tree("0.33.0")
    before = snapshot(root)
    code, out = cli_json("install", "--no-wheels", "--dry-run", "--vllm-root", str(root), "--patches", str(sets_dir))
    assert code == 0 and out["actions"]["dry_run"] and len(out["actions"]["changed"]) == 2
    assert snapshot(root) == before


def test_missing_vllm_and_bad_python(tmp_path):
    r = run_cli("status", "--vllm-root", str(tmp_path))
    assert r.returncode == 5 and "no 'vllm' package directory" in r.stderr
    notpy = tmp_path / "notpython"
    notpy.write_text("#!/bin/sh\necho hello\n")
    notpy.chmod(0o755)
    r = run_cli("status", "--python", str(notpy))
    assert r.returncode == 5 and str(notpy) in r.stderr and "Python" in r.stderr
    r = run_cli("status", "--python", str(tmp_path / "nope"))
    assert r.returncode == 5 and "no such file" in r.stderr


def test_wheels_and_patches_both_skipped_is_usage_error():
    r = run_cli("install", "--no-wheels", "--no-patches")
    assert r.returncode == 2 and "nothing to do" in r.stderr


def test_python_is_checked_even_with_vllm_root(vllm_tree, sets_dir, tmp_path):
    root = vllm_tree("0.26.0")
    notpy = tmp_path / "notpython"
    notpy.write_text("#!/bin/sh\nexit 0\n")
    notpy.chmod(0o755)
    before = snapshot(root)
    r = run_cli("install", "--no-wheels", "--python", str(notpy), "--vllm-root", str(root),
                "--patches", str(sets_dir))
    assert r.returncode == 5 and str(notpy) in r.stderr
    assert snapshot(root) == before
    code, out = cli_json("status", "--python", sys.executable, "--vllm-root", str(root), "--patches", str(sets_dir))
    assert code == 0 and out["vllm"]["python"] == sys.executable


@pytest.mark.parametrize("version", SHIPPED_RELEASES)
def test_shipped_set_round_trip_on_the_real_release(version, vllm_tree):
    """The shipped set (no --patches) on the real release: patched, verified, and reverted to
    files the vLLM wheel's own RECORD vouches for."""
    root = vllm_tree(version)
    before = snapshot(root)
    code, out = cli_json("install", "--no-wheels", "--vllm-root", str(root))
    assert code == 0 and out["set"] == SET_OF[version] and out["state"] == "patched", out
    assert all(f["record"] == "differs" for f in out["files"])
    assert run_cli("verify", "--no-wheels", "--vllm-root", str(root)).returncode == 0
    code, out = cli_json("revert", "--vllm-root", str(root))
    assert code == 0 and all(f["record"] == "match" for f in out["files"])
    assert {k: v[:2] for k, v in snapshot(root).items()} == {k: v[:2] for k, v in before.items()}
