"""The whole `m3fuse install` as a container build runs it: pinned wheels from a (loopback)
server into a real venv that holds the real vllm 0.26.0, then the shipped patch set; and
`verify` over both halves."""

from __future__ import annotations

import json

import pytest

import realvllm
import venvs
from conftest import run_cli
from m3fuse.fingerprint import sha256_file
from wheelkit import FaultServer, aiter_wheel, build_wheel, cache_is_clean, installed, lock_text

AITER_V = "0.1.15.post1+rocm7.2.e2e"
FLY_V = "0.1.9.dev1+e2e"

pytestmark = pytest.mark.slow


def test_wheels_then_patches_and_verify_both(tmp_path):
    py = venvs.make_venv(tmp_path / "venv")
    venvs.pip(py, "install", "--no-deps", "--no-index", str(realvllm.wheel_path("0.26.0")))
    sp = venvs.site_packages(py)
    pristine = {rel: sha256_file(sp / rel) for rel in (realvllm.HELPER, realvllm.MODEL)}
    fly = build_wheel(tmp_path / "w", "flydsl", FLY_V, {"flydsl/__init__.py": "X = 1\n"})
    aiter = aiter_wheel(tmp_path / "w", AITER_V)
    cache = tmp_path / "cache"
    with FaultServer(stall_s=1.0) as srv:
        lock = tmp_path / "test.lock"
        lock.write_text(lock_text([srv.pin("flydsl", FLY_V, fly),
                                   srv.pin("amd-aiter", AITER_V, aiter, ["wrong"])]))
        base = ["--lock", str(lock), "--python", str(py)]

        # A tampered AITER download: exit 4, nothing installed, and vLLM not patched either.
        r = run_cli("install", *base, "--cache-dir", str(cache))
        assert r.returncode == 4, r.stdout + r.stderr
        assert "THESE FILES DO NOT MATCH THE HASHES IN THE LOCK" in r.stderr and "    expected: sha256 " in r.stderr
        assert installed(py, "flydsl") is None and installed(py, "amd-aiter") is None
        assert {rel: sha256_file(sp / rel) for rel in pristine} == pristine
        assert cache_is_clean(cache) == []

        # The server now sends the right bytes: wheels first, then the shipped 0.26.0 set.
        r = run_cli("install", *base, "--cache-dir", str(cache), "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        out = json.loads(r.stdout)
        assert [(w["action"], w["result"]) for w in out["wheels"]] == [("install", "installed"), ("install", "installed")]
        assert out["set"] == "vllm-0.26.0" and out["state"] == "patched"
        assert installed(py, "flydsl") == FLY_V and installed(py, "amd-aiter") == AITER_V

    # verify needs no network: the server is gone.
    r = run_cli("verify", *base)
    assert r.returncode == 0, r.stdout + r.stderr
    # An edited file of an installed pinned wheel is an integrity failure.
    init = sp / "flydsl" / "__init__.py"
    init.write_text("X = 2\n")
    code_json = run_cli("verify", *base, "--json")
    assert code_json.returncode == 4
    report = json.loads(code_json.stdout)
    assert {w["name"]: w["state"] for w in report["wheels"]}["flydsl"] == "record-mismatch"
    assert report["state"] == "patched"  # the vLLM half is still fine, and says so
    # --no-wheels checks the vLLM half alone.
    assert run_cli("verify", *base, "--no-wheels").returncode == 0
    # install repairs the wheel from the verified cache (no server needed) and leaves the patches.
    r = run_cli("install", *base, "--cache-dir", str(cache))
    assert r.returncode == 0, r.stdout + r.stderr
    assert init.read_text() == "X = 1\n"
    assert run_cli("verify", *base).returncode == 0


def test_a_vllm_the_patches_refuse_gets_no_wheels_either(tmp_path, vllm_tree):
    """Drift is found before the wheel step changes the environment (file:// pins: no server)."""
    root = vllm_tree("0.26.0")
    with open(root / realvllm.MODEL, "a") as f:
        f.write("# local edit\n")
    py = venvs.make_venv(tmp_path / "venv")
    fly = build_wheel(tmp_path / "w", "flydsl", FLY_V, {"flydsl/__init__.py": "X = 1\n"})
    aiter = aiter_wheel(tmp_path / "w", AITER_V)
    lock = tmp_path / "test.lock"
    lock.write_text(lock_text([("flydsl", FLY_V, [(fly, fly.as_uri())]), ("amd-aiter", AITER_V, [(aiter, aiter.as_uri())])]))
    r = run_cli("install", "--lock", str(lock), "--python", str(py), "--vllm-root", str(root),
                "--cache-dir", str(tmp_path / "cache"))
    assert r.returncode == 3 and "drifted" in r.stderr, r.stderr
    assert installed(py, "flydsl") is None and installed(py, "amd-aiter") is None
    # The same lock installs fine once the tree is the release again.
    (root / realvllm.MODEL).write_bytes(realvllm.read_member("0.26.0", realvllm.MODEL))
    r = run_cli("install", "--lock", str(lock), "--python", str(py), "--vllm-root", str(root),
                "--cache-dir", str(tmp_path / "cache"))
    assert r.returncode == 0, r.stderr
    assert installed(py, "flydsl") == FLY_V
