"""What each release needs of AITER, derived from the real release wheels: the shipped
aiter-needs.toml files equal a fresh derivation, the lock's facts about the pin answer every
need, and the needs file and the lock's facts refuse hostile contents cleanly."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

import realvllm
from conftest import REPO, run_cli
from m3fuse.errors import EXIT_DRIFT, EXIT_USAGE, PatchSetError
from m3fuse.patching.patchset import load_all, load_patchset
from m3fuse.wheels import fit
from m3fuse.wheels.lock import LockError, load_lock
from m3fuse.wheels.needs import AITER, NEEDS_FILE, derive, load_needs, render

pytestmark = pytest.mark.slow

SETS = load_all(REPO / "patches")
LOCK = load_lock(REPO / "wheels.lock")
PIN_AITER = LOCK.package(AITER)


def wheels_of(s) -> list[Path]:
    return [realvllm.wheel_path(v) for v in s.vllm_versions]


@pytest.mark.parametrize("patch_set", SETS, ids=lambda s: s.name)
def test_the_shipped_needs_file_equals_a_fresh_derivation_from_the_release(patch_set):
    shipped = (patch_set.folder / NEEDS_FILE).read_text(encoding="utf-8")
    assert render(derive(wheels_of(patch_set), patch_set.parse()), patch_set.name) == shipped


def test_needs_command_check_and_write(tmp_path):
    s = load_patchset(REPO / "patches" / "vllm-0.30.0")
    wheel = realvllm.wheel_path("0.30.0")
    ok = run_cli("needs", str(s.folder), "--vllm", str(wheel), "--check")
    assert ok.returncode == 0 and "up to date" in ok.stdout
    copy = tmp_path / "vllm-0.30.0"
    shutil.copytree(s.folder, copy)
    (copy / NEEDS_FILE).write_text((copy / NEEDS_FILE).read_text().replace('"aiter.ops.msa_attention",\n', ""))
    stale = run_cli("needs", str(copy), "--vllm", str(wheel), "--check")
    assert stale.returncode == EXIT_DRIFT and "stale" in stale.stderr and "m3fuse needs" in stale.stderr
    assert run_cli("needs", str(copy), "--vllm", str(wheel)).returncode == 0
    assert (copy / NEEDS_FILE).read_text() == (s.folder / NEEDS_FILE).read_text()
    # A wheel of a release the set does not cover is refused, nothing written.
    other = run_cli("needs", str(copy), "--vllm", str(realvllm.wheel_path("0.29.0")))
    assert other.returncode == EXIT_USAGE and "0.29.0" in other.stderr and "Traceback" not in other.stderr
    # Something that is no release at all: a text file, a folder without vLLM's metadata.
    junk = tmp_path / "junk.whl"
    junk.write_text("not a zip")
    (tmp_path / "bare" / "vllm").mkdir(parents=True)
    for bad in (junk, tmp_path / "bare"):
        r = run_cli("needs", str(copy), "--vllm", str(bad))
        assert r.returncode == EXIT_USAGE and "is not a vLLM release" in r.stderr and "Traceback" not in r.stderr
    assert (copy / NEEDS_FILE).read_text() == (s.folder / NEEDS_FILE).read_text()


def test_0_34_0_needs_flydsl_kernels_and_the_all_gather_it_routes_to_aiter():
    # No 0.34.0 set on this branch: the derivation runs on the real release with no patches.
    bare = dataclasses.replace(SETS[-1], targets=())
    n = derive([realvllm.wheel_path("0.34.0")], bare).dists[AITER]
    assert {"aiter.ops.msa_attention", "aiter.ops.msa_block_select", "aiter.ops.flydsl.quick_allreduce_int4_ipc",
            "aiter.ops.flydsl.kernels.act", "aiter.ops.flydsl.kernels.dpp_utils"} <= set(n.modules)
    assert n.calls["CustomAllreduce.all_gather_unreg"] == ("dim",)
    assert n.calls["CustomAllreduce.custom_fused_ar_rms"] == ("gemma_norm", "use_1stage")
    assert n.min_version == "0.1.21.post2" and n.min_version_source.startswith("vllm/v1/attention/")
    pin = fit.from_lock(PIN_AITER, LOCK.path)
    v = fit.judge(n, pin, dist=AITER, vllm="0.34.0")
    assert not v.unknown and not v.ok
    assert any("quick_allreduce_int4_ipc" in u for u in v.unmet)


def test_the_lock_answers_every_need_and_the_pin_fits_only_0_24_to_0_29():
    pin = fit.from_lock(PIN_AITER, LOCK.path)
    assert pin is not None and "v0.1.15.post1" in pin.source
    fits = {}
    for s in SETS:
        needs = load_needs(s.folder)
        assert needs is not None, s.name
        v = fit.judge(needs.get(AITER), pin, dist=AITER, vllm=s.name)
        assert v.unknown == [], (s.name, v.unknown)  # the plan decides before any download
        fits[s.name] = v.ok
    old = {s.name for s in SETS if s.vllm_versions[0] < "0.30"}
    assert {n for n, ok in fits.items() if ok} == old and len(old) == 6
    v33 = fit.judge(load_needs(REPO / "patches" / "vllm-0.33.0").get(AITER), pin, dist=AITER, vllm="0.33.0")
    text = " ".join(v33.unmet)
    assert "aiter.ops.msa_attention" in text and "aiter.ops.msa_block_select" in text
    assert "takes no gemma_norm" in text and "0.1.21.post2" in text


@pytest.mark.parametrize("edit,problem", [
    (lambda t: t + "\n[[[", "not valid TOML"),
    (lambda t: t.replace("format = 1", "format = 9"), "format is 9"),
    (lambda t: t.replace('"aiter.ops.msa_attention"', '"../../etc/passwd"'), "not a dotted Python name"),
    (lambda t: t.replace('min-version = "0.1.21.post2"', 'min-version = "latest"'), "not a PEP 440 version"),
    (lambda t: t.replace('vllm = ["0.30.0"]', 'vllm = "0.30.0"'), "list of non-empty strings"),
    (lambda t: t.replace("[amd-aiter]", "[amd-aiter]\nsurprise = 1"), "unknown keys"),
    (lambda t: t.replace('["gemma_norm", "use_1stage"]', '[1, 2]'), "list of non-empty strings"),
])
def test_a_malformed_needs_file_is_refused(tmp_path, edit, problem):
    d = tmp_path / "set"
    shutil.copytree(REPO / "patches" / "vllm-0.30.0", d)
    (d / NEEDS_FILE).write_text(edit((d / NEEDS_FILE).read_text()))
    with pytest.raises(PatchSetError) as e:
        load_needs(d)
    assert problem in e.value.message and str(d / NEEDS_FILE) in e.value.message
    (d / NEEDS_FILE).write_bytes(b"\xff\xfe garbage")
    with pytest.raises(PatchSetError):
        load_needs(d)
    (d / NEEDS_FILE).unlink()
    assert load_needs(d) is None


@pytest.mark.parametrize("facts,problem", [
    ('"just text"', "not a table"),
    ('{ version = "x.y", source = "s" }', "not a PEP 440 version"),
    ('{ version = "0.1.15.post1+rocm7.2.manylinux.2.28", source = "s", modules = { "aiter" = "yes" } }',
     "true/false"),
    ('{ version = "0.1.15.post1+rocm7.2.manylinux.2.28", source = "s", api = { "C.m" = "self" } }',
     "parameter names"),
    ('{ version = "0.1.15.post1+rocm7.2.manylinux.2.28" }', "source"),
])
def test_malformed_lock_facts_are_refused(tmp_path, facts, problem):
    text = (REPO / "wheels.lock").read_text()
    head = text.split("[packages.tool.m3fuse]")[0]
    lock = tmp_path / "facts.lock"
    lock.write_text(head.replace("[[packages.wheels]]\nname = \"amd_aiter", f"tool.m3fuse = {facts}\n\n"
                                 "[[packages.wheels]]\nname = \"amd_aiter"))
    pkg = load_lock(lock).package(AITER)
    with pytest.raises(LockError) as e:
        fit.from_lock(pkg, lock)
    assert problem in e.value.message and str(lock) in e.value.message


def test_facts_for_another_version_say_nothing_about_the_pin(tmp_path):
    lock = tmp_path / "other.lock"
    lock.write_text((REPO / "wheels.lock").read_text().replace(
        'version = "0.1.15.post1+rocm7.2.manylinux.2.28"\nsource', 'version = "0.1.14"\nsource'))
    assert fit.from_lock(load_lock(lock).package(AITER), lock) is None


@pytest.mark.parametrize("content", [b"\xff\xfe\x00 not text", b"class CustomAllreduce(:\n", None, "huge"])
def test_an_installed_aiter_whose_api_file_is_hostile_is_not_sound(tmp_path, content):
    from m3fuse.wheels.check import AITER_CAR
    from wheelkit import aiter_source

    f = tmp_path / AITER_CAR
    f.parent.mkdir(parents=True)
    if content is None:
        f.mkdir()  # a folder where the module should be
    elif content == "huge":
        f.write_text(aiter_source() + "#" * (fit.MAX_SOURCE + 1))
    else:
        f.write_bytes(content)
    need = load_needs(REPO / "patches" / "vllm-0.26.0").get(AITER)
    v = fit.judge(need, fit.from_tree(tmp_path, "0.1.23", AITER, need.modules), dist=AITER, vllm="0.26.0")
    assert not v.ok and v.unmet
    # The same tree with the real shape of the file is sound for what it has.
    f.unlink() if f.is_file() else f.rmdir()
    f.write_text(aiter_source())
    sound = fit.from_tree(tmp_path, "0.1.23", AITER, ())
    assert sound.content_problems == [] and "use_1stage" in sound.api["CustomAllreduce.fused_ar_rms"]
