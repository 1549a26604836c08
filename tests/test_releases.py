"""Every vLLM release that ships MiniMax M3, installed for real: a fresh venv, the release wheel
installed by pip, then `m3fuse install / verify / revert` through --python with the shipped sets.

The refusals that stay are here too: 0.23.0 (no M3 code), a release tree with one byte changed,
and the original image's model file (from no public release)."""

from __future__ import annotations

import compileall
import hashlib
import json
import shutil
from pathlib import Path

import pytest

import realvllm
import venvs
from conftest import REPO, run_cli, snapshot
from m3fuse.fingerprint import read_record
from m3fuse.patching.patchset import load_all

def _manifest_releases() -> list[str]:
    from packaging.version import Version

    return sorted((v for s in load_all(REPO / "patches") for v in s.vllm_versions), key=Version)


# The releases the shipped sets list: adding a set adds its releases here, with no edit.
M3_RELEASES = _manifest_releases()
IMAGE_MODEL_SHA = "91d81f8613e32f7afbd65c289f7885c5371263f70503bd053f97880989bf7536"
TARGETS = (realvllm.HELPER, realvllm.MODEL)


def shipped_sets():
    return load_all(REPO / "patches", parse=True)


def set_for(version: str) -> str:
    return next(s.name for s in shipped_sets() if version in s.vllm_versions)


def test_every_m3_release_has_exactly_one_set():
    """No release is listed by two sets, and the list holds the releases that ship M3's ROCm
    model from its first one (0.23.0 has none: test_0230_has_no_m3_and_is_refused)."""
    assert len(M3_RELEASES) == len(set(M3_RELEASES)), "a release is listed by two sets"
    assert M3_RELEASES[0] == "0.24.0" and len(M3_RELEASES) >= 12
    for version in M3_RELEASES:
        assert realvllm.read_member(version, realvllm.MODEL), version  # KeyError if the wheel has no M3 model


def cli_json(*args: str) -> tuple[int, dict]:
    r = run_cli(*args, "--json")
    return r.returncode, json.loads(r.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("version", M3_RELEASES)
def test_round_trip_in_a_fresh_venv_with_the_real_wheel(version, tmp_path):
    py = venvs.make_venv(tmp_path / "venv")
    # --no-compile: pip byte-compiling ~3000 files per release would triple the time; the
    # target files' bytecode is made below, which is what the stale-.pyc handling is about.
    venvs.pip(py, "install", "--no-deps", "--no-index", "--no-compile", str(realvllm.wheel_path(version)))
    sp = venvs.site_packages(py)
    for rel in TARGETS:
        assert compileall.compile_file(str(sp / rel), quiet=2)
    pycs = [p for rel in TARGETS for p in (sp / rel).parent.glob(f"__pycache__/{Path(rel).stem}.*.pyc")]
    assert pycs
    record = read_record(next(sp.glob(f"vllm-{version}.dist-info")))
    name = set_for(version)

    code, out = cli_json("install", "--no-wheels", "--python", str(py))
    assert code == 0 and out["set"] == name and out["state"] == "patched", out
    assert out["vllm"]["version"] == version
    assert not any(p.exists() for p in pycs), "stale bytecode of a patched file survived"
    r = run_cli("verify", "--no-wheels", "--python", str(py))
    assert r.returncode == 0, r.stdout + r.stderr
    code, out = cli_json("install", "--no-wheels", "--python", str(py))
    assert code == 0 and out["actions"]["changed"] == []  # idempotent

    code, out = cli_json("revert", "--python", str(py))
    assert code == 0 and out["state"] == "pristine"
    for rel in TARGETS:
        assert hashlib.sha256((sp / rel).read_bytes()).hexdigest() == record[rel], f"{rel} not RECORD-exact"
    assert run_cli("verify", "--no-wheels", "--expect", "pristine", "--python", str(py)).returncode == 0
    leftovers = [p for rel in TARGETS for p in (sp / rel).parent.iterdir() if ".m3fuse-tmp-" in p.name]
    assert not leftovers


def test_0230_has_no_m3_and_is_refused(tmp_path):
    root = realvllm.extract("0.23.0", tmp_path / "sp", ["vllm/__init__.py"])
    before = snapshot(root)
    r = run_cli("install", "--no-wheels", "--vllm-root", str(root))
    assert r.returncode == 3, r.stderr
    assert "0.23.0" in r.stderr and "has no MiniMax M3 model" in r.stderr and "closest set:" not in r.stderr
    assert snapshot(root) == before


@pytest.mark.parametrize("version", ["0.28.0", "0.32.0"])
def test_one_changed_byte_is_refused_naming_the_set(version, vllm_tree):
    root = vllm_tree(version)
    model = root / realvllm.MODEL
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    before = snapshot(root)
    for cmd in (["install", "--no-wheels"], ["revert"], ["verify", "--no-wheels"]):
        r = run_cli(*cmd, "--vllm-root", str(root))
        assert r.returncode == 3, (cmd, r.stdout, r.stderr)
        assert set_for(version) in r.stdout + r.stderr
    assert snapshot(root) == before


def test_the_original_images_model_file_has_no_set():
    # The image's vLLM (revision 4a560dd8) is from no public release and its file cannot be
    # fetched here; what can be checked is that no set would take it.
    for s in shipped_sets():
        for t in s.targets:
            assert IMAGE_MODEL_SHA not in (t.pristine_sha256, t.patched_sha256), s.name


def test_a_tree_like_the_image_is_refused_naming_the_closest_set(vllm_tree):
    """A 0.24.0-era tree whose model file is some other build (as on the image): exit 3 with the
    closest set and both fingerprints named, nothing written."""
    root = vllm_tree("0.24.0")
    model = root / realvllm.MODEL
    model.write_bytes(model.read_bytes() + b"# another build of this file\n")
    for d in root.glob("vllm-*.dist-info"):
        shutil.rmtree(d)  # the image's tree carries no release RECORD for its own build
    before = snapshot(root)
    r = run_cli("install", "--no-wheels", "--vllm-root", str(root))
    assert r.returncode == 3
    assert "vllm-0.24.0" in r.stderr and hashlib.sha256(model.read_bytes()).hexdigest() in r.stderr
    assert snapshot(root) == before
