"""The wheel step keeps the AITER a release needs: real release trees, real venvs and pip, a
loopback server that records every request.

- a newer, sound AITER is kept (never downgraded to the pin, never refused) and verify passes;
- on 0.30+ the pin (which lacks aiter.ops.msa_attention and gemma_norm) is never installed:
  install refuses before any download unless a sound AITER is there;
- on 0.24-0.29 the pin is still installed;
- --exact-pins keeps the old strictness.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

import wheelkit

from conftest import REPO, run_cli, snapshot
from m3fuse.errors import EXIT_DRIFT, EXIT_ENVIRONMENT
from m3fuse.wheels.needs import AITER, NEEDS_FILE
from test_wheelplan import server  # noqa: F401 - the loopback server fixture
from venvs import site_packages
from wheelkit import FaultServer, aiter_build, aiter_wheel, clone_venv, installed, make_venv, needed_modules

pytestmark = pytest.mark.slow

PIN = "0.1.15.post1+rocm7.2.manylinux.2.28"  # the shipped pin's version, so the shipped facts apply
NEWER = "0.1.23"
FLY = "0.1.9.dev1+abc"
def shipped_facts() -> str:
    return "\n[packages.tool.m3fuse]" + (REPO / "wheels.lock").read_text().split("[packages.tool.m3fuse]", 1)[1]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return make_venv(tmp_path_factory.mktemp("tpl") / "venv").parent.parent


@pytest.fixture
def venv(template, tmp_path):
    return clone_venv(template, tmp_path / "venv")


def served_lock(tmp_path: Path, srv: FaultServer) -> Path:
    return wheelkit.served_lock(tmp_path, srv, fly=("flydsl", FLY, {"flydsl/__init__.py": ""}), aiter=PIN,
                                extra=shipped_facts())


def pip_install(py: Path, wheel: Path) -> None:
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)


def wheel_step(cmd: str, tree: Path, py: Path, lock: Path, tmp_path: Path, *extra: str):
    args = [cmd, "--vllm-root", str(tree), "--python", str(py), "--lock", str(lock)]
    if cmd == "install":
        args += ["--cache-dir", str(tmp_path / "cache")]
    return run_cli(*args, *extra)


def requested(srv: FaultServer) -> set[str]:
    return {path.rsplit("/", 1)[-1].split("-")[0] for path, *_ in srv.log}


def test_a_newer_sound_aiter_is_kept_and_verify_passes(tmp_path, vllm_tree, venv, server):
    tree = vllm_tree("0.33.0")
    pip_install(venv, aiter_build(tmp_path / "image", NEWER, needed_modules("vllm-0.33.0")))
    lock = served_lock(tmp_path, server)

    r = wheel_step("install", tree, venv, lock, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"amd-aiter: installed {NEWER}, pinned {PIN}: keep (installed {NEWER} is newer and sound)" in r.stdout
    assert installed(venv, "amd-aiter") == NEWER and installed(venv, "flydsl") == FLY
    assert requested(server) == {"flydsl"}  # the pinned AITER was never fetched

    v = wheel_step("verify", tree, venv, lock, tmp_path, "--json")
    assert v.returncode == 0, v.stdout + v.stderr
    out = json.loads(v.stdout)
    row = next(w for w in out["wheels"] if w["name"] == "amd-aiter")
    assert row["ok"] and row["kept"] == f"installed {NEWER} is newer and sound"
    # verify names every accepted build and why, in --json and in text; the lock it judged by.
    assert out["accepted"] == [
        {"name": "flydsl", "version": FLY, "pinned_version": FLY, "reason": "pinned"},
        {"name": "amd-aiter", "version": NEWER, "pinned_version": PIN, "reason": "kept: newer and sound"}]
    assert out["lock"]["path"] == str(lock) and len(out["lock"]["sha256"]) == 64
    text = wheel_step("verify", tree, venv, lock, tmp_path)
    assert text.returncode == 0, text.stdout + text.stderr
    assert f"wheel amd-aiter {NEWER}: kept: newer and sound (pinned {PIN})" in text.stdout
    assert f"wheel flydsl {FLY}: pinned (pinned {FLY})" in text.stdout
    # The defects report names the AITER actually installed: 0.1.23 has every barrier fix.
    assert out["aiter"]["version"] == NEWER and [d["id"] for d in out["aiter"]["defects"]] == ["ROCm/aiter#4888"]
    again = wheel_step("install", tree, venv, lock, tmp_path, "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["aiter"]["version"] == NEWER

    # --exact-pins: today's strictness, the newer build is a downgrade to refuse (verify: wrong version).
    strict = wheel_step("install", tree, venv, lock, tmp_path, "--exact-pins", "--json")
    assert strict.returncode == EXIT_ENVIRONMENT and json.loads(strict.stdout)["error"]["kind"] == "downgrade"
    assert wheel_step("verify", tree, venv, lock, tmp_path, "--exact-pins").returncode == EXIT_ENVIRONMENT
    assert installed(venv, "amd-aiter") == NEWER


def test_a_newer_aiter_that_is_not_sound_is_not_kept(tmp_path, vllm_tree, venv, server):
    # 0.26.0 (the pin fits it): a newer build without use_1stage fails the content check, so the
    # plan is the old downgrade refusal, and it says why the newer build was not kept.
    tree = vllm_tree("0.26.0")
    pip_install(venv, aiter_wheel(tmp_path / "image", NEWER, use_1stage=False))
    lock = served_lock(tmp_path, server)
    r = wheel_step("install", tree, venv, lock, tmp_path, "--json")
    assert r.returncode == EXIT_ENVIRONMENT, r.stdout + r.stderr
    out = json.loads(r.stdout)
    row = next(w for w in out["wheels"] if w["name"] == "amd-aiter")
    assert out["error"]["kind"] == "downgrade" and row["action"] == "downgrade"
    assert "not sound" in row["reason"] and "use_1stage" in row["reason"]
    assert server.log == []


@pytest.mark.parametrize("release,set_name", [("0.30.0", "vllm-0.30.0"), ("0.33.0", "vllm-0.33.0")])
def test_on_0_30_plus_the_pin_is_never_installed(tmp_path, vllm_tree, venv, server, release, set_name):
    tree = vllm_tree(release)
    lock = served_lock(tmp_path, server)
    before = snapshot(tree)

    r = wheel_step("install", tree, venv, lock, tmp_path)
    assert r.returncode == EXIT_ENVIRONMENT, r.stdout + r.stderr
    err = r.stderr
    assert f"vLLM {release}'s MiniMax M3 needs a newer amd-aiter than the lock pins" in err
    assert "aiter.ops.msa_attention" in err and ">= 0.1.21.post2" in err and "takes no gemma_norm" in err
    assert "m3fuse lock add" in err.splitlines()[-1] and "Traceback" not in err
    assert server.log == [] and installed(venv, "amd-aiter") is None and installed(venv, "flydsl") is None
    assert snapshot(tree) == before  # the patches were not applied either

    dry = wheel_step("install", tree, venv, lock, tmp_path, "--dry-run", "--json")
    out = json.loads(dry.stdout)
    assert dry.returncode == EXIT_ENVIRONMENT and out["error"]["kind"] == "aiter-needs-unmet"
    assert [w["action"] for w in out["wheels"]] == ["install", "unmet"]
    assert any("aiter.ops.msa_attention" in u for u in out["wheels"][1]["unmet"])

    # An installed AITER newer than the pin but without what the release imports is not enough.
    pip_install(venv, aiter_build(tmp_path / "img", "0.1.21.post2", ["aiter.ops.triton.gluon.pa_decode_gluon"]))
    r = wheel_step("install", tree, venv, lock, tmp_path)
    assert r.returncode == EXIT_ENVIRONMENT and "it has no module aiter.ops.msa_attention" in r.stderr
    assert server.log == [] and installed(venv, "amd-aiter") == "0.1.21.post2"

    # --exact-pins installs the pin as before; verify then fails on the release's needs, and
    # passes only with --exact-pins too.
    subprocess.run([str(venv), "-m", "pip", "uninstall", "-q", "-y", "amd-aiter"], check=True)
    e = wheel_step("install", tree, venv, lock, tmp_path, "--exact-pins", "--dry-run")
    assert e.returncode == 0, e.stdout + e.stderr
    assert f"amd-aiter {PIN} (pinned, kept by --exact-pins) does not have what vLLM {release} needs" in e.stdout
    e = wheel_step("install", tree, venv, lock, tmp_path, "--exact-pins", "--json")
    assert e.returncode == 0, e.stdout + e.stderr
    assert installed(venv, "amd-aiter") == PIN
    assert "ROCm/aiter#3792" in {d["id"] for d in json.loads(e.stdout)["aiter"]["defects"]}
    v = wheel_step("verify", tree, venv, lock, tmp_path, "--json")
    assert v.returncode == EXIT_ENVIRONMENT
    row = next(w for w in json.loads(v.stdout)["wheels"] if w["name"] == "amd-aiter")
    assert row["state"] == "needs-unmet" and any("msa_attention" in u for u in row["unmet"])
    assert all(len(p) < 200 for p in row["problems"]), row["problems"]  # the whole lists: "unmet"/"lacks"
    assert json.loads(v.stdout)["hint"].startswith("install a build of amd-aiter with what vLLM needs")
    assert wheel_step("verify", tree, venv, lock, tmp_path, "--exact-pins").returncode == 0


@pytest.mark.parametrize("release", ["0.24.0", "0.29.0"])
def test_on_0_24_to_0_29_the_pin_is_still_installed(tmp_path, vllm_tree, venv, server, release):
    tree = vllm_tree(release)
    lock = served_lock(tmp_path, server)
    r = wheel_step("install", tree, venv, lock, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert installed(venv, "amd-aiter") == PIN and requested(server) == {"flydsl", "amd_aiter"}
    v = wheel_step("verify", tree, venv, lock, tmp_path, "--json")
    assert v.returncode == 0, v.stdout + v.stderr
    assert [(a["name"], a["reason"]) for a in json.loads(v.stdout)["accepted"]] == [("flydsl", "pinned"),
                                                                                  ("amd-aiter", "pinned")]


@pytest.mark.parametrize("metadata", ["Metadata-Version: 2.1\nName: amd-aiter\nVersion: not a version\n\n", None])
def test_an_installed_aiter_without_a_readable_version_is_refused_cleanly(tmp_path, vllm_tree, venv, server,
                                                                          metadata):
    tree = vllm_tree("0.33.0")
    d = site_packages(venv) / "amd_aiter-9.dist-info"
    d.mkdir()
    (d / "RECORD").write_text("")
    if metadata is not None:
        (d / "METADATA").write_text(metadata)
    lock = served_lock(tmp_path, server)
    r = wheel_step("install", tree, venv, lock, tmp_path, "--json")
    assert r.returncode == EXIT_ENVIRONMENT, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["error"]["kind"] == "aiter-needs-unmet" and "Traceback" not in r.stderr
    # The message summarises the installed build in one line; --json lists all it lacks.
    lacks = next(w for w in out["wheels"] if w["name"] == "amd-aiter")["lacks"]
    assert any("cannot be compared with 0.1.21.post2" in x for x in lacks), lacks
    assert "--json lists all" in out["error"]["message"]
    assert server.log == []


def test_a_malformed_needs_file_stops_install_before_any_download(tmp_path, vllm_tree, venv, server):
    tree = vllm_tree("0.33.0")
    patches = tmp_path / "patches"
    shutil.copytree(REPO / "patches", patches)
    needs = patches / "vllm-0.33.0" / NEEDS_FILE
    needs.write_text(needs.read_text().replace('"aiter.ops.msa_attention"', '"aiter.ops.msa attention"'))
    lock = served_lock(tmp_path, server)
    r = wheel_step("install", tree, venv, lock, tmp_path, "--patches", str(patches))
    assert r.returncode == EXIT_DRIFT, r.stdout + r.stderr
    assert str(needs) in r.stderr and "not a dotted Python name" in r.stderr and "Traceback" not in r.stderr
    assert server.log == [] and installed(venv, "amd-aiter") is None


def test_lock_add_records_what_a_new_pin_provides_and_install_then_uses_it(tmp_path, vllm_tree, venv, server):
    tree = vllm_tree("0.33.0")
    lock = served_lock(tmp_path, server)
    assert wheel_step("install", tree, venv, lock, tmp_path).returncode == EXIT_ENVIRONMENT  # the pin cannot run it
    newer = aiter_build(tmp_path / "new", NEWER, needed_modules("vllm-0.33.0"))
    url = server.add(newer.name, newer.read_bytes())
    r = run_cli("lock", "add", str(newer), "--url", url, "--lock", str(lock))
    assert r.returncode == 0, r.stdout + r.stderr
    from m3fuse.wheels import fit
    from m3fuse.wheels.lock import load_lock

    pkg = load_lock(lock).package(AITER)
    facts = fit.from_lock(pkg, lock)
    assert pkg.version == NEWER and facts is not None and newer.name in facts.source
    from m3fuse.wheels.needs import known_modules

    every = known_modules(REPO / "patches", AITER)  # what any shipped set names
    assert set(facts.modules) == set(every) and "aiter.ops.msa_attention" in every
    assert {m for m, has in facts.modules.items() if not has} == set(every) - set(needed_modules("vllm-0.33.0"))
    assert "gemma_norm" in facts.api["CustomAllreduce.custom_fused_ar_rms"]

    r = wheel_step("install", tree, venv, lock, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert installed(venv, "amd-aiter") == NEWER and requested(server) == {"flydsl", "amd_aiter"}
    assert wheel_step("verify", tree, venv, lock, tmp_path).returncode == 0


def test_an_installed_build_with_what_the_pin_lacks_is_accepted_as_needs_met(tmp_path, vllm_tree, venv, server):
    """A newer pin whose recorded facts lack a module the release imports, and an older
    installed build that has it: install keeps the installed one, and verify names it
    `needs met` (the third reason, beside `pinned` and `kept: newer and sound`)."""
    tree = vllm_tree("0.33.0")
    pinned, older = "0.1.30", "0.1.22"
    pip_install(venv, aiter_build(tmp_path / "image", older, needed_modules("vllm-0.33.0")))
    facts = ('\n[packages.tool.m3fuse]\nversion = "0.1.30"\nsource = "test facts"\n'
             '[packages.tool.m3fuse.modules]\n"aiter.ops.msa_attention" = false\n')
    lock = wheelkit.served_lock(tmp_path, server, fly=("flydsl", FLY, {"flydsl/__init__.py": ""}), aiter=pinned,
                                extra=facts)
    r = wheel_step("install", tree, venv, lock, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert installed(venv, "amd-aiter") == older and requested(server) == {"flydsl"}
    v = wheel_step("verify", tree, venv, lock, tmp_path, "--json")
    assert v.returncode == 0, v.stdout + v.stderr
    row = next(a for a in json.loads(v.stdout)["accepted"] if a["name"] == "amd-aiter")
    assert row == {"name": "amd-aiter", "version": older, "pinned_version": pinned, "reason": "needs met"}
    text = wheel_step("verify", tree, venv, lock, tmp_path).stdout
    assert f"wheel amd-aiter {older}: needs met (pinned {pinned})" in text
