"""`m3fuse env ARM` on real release trees: the switch list against each release's own
vllm/envs.py, the output through a real bash `eval`, the A/B arms' differences, and hostile
input."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import zipfile
from pathlib import Path

import pytest

import realvllm
from conftest import run_cli

ENVS = "vllm/envs.py"
RAY = "VLLM_RAY_EXTRA_ENV_VARS_TO_COPY"
MODE = "M3_AITER_AR_RMS_MODE"
CUSTOM_AR = "VLLM_ROCM_USE_AITER_CUSTOM_AR"
PATCHED_RELEASES = ("0.24.0", "0.26.0", "0.33.0")
RELEASES = ("0.24.0", "0.26.0", "0.30.0", "0.33.0")
# Releases whose helper has vLLM's own one-stage AITER branch (gemma_norm=True).
ONE_STAGE = {"0.30.0", "0.33.0"}


def add_members(root: Path, version: str, *members: str) -> Path:
    with zipfile.ZipFile(realvllm.wheel_path(version)) as zf:
        for m in members:
            (root / m).parent.mkdir(parents=True, exist_ok=True)
            (root / m).write_bytes(zf.read(m))
    return root


def fake_aiter(root: Path, version: str) -> None:
    """The dist-info pip writes for amd-aiter (the only part of it `m3fuse env` reads)."""
    d = root / f"amd_aiter-{version}.dist-info"
    d.mkdir()
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: amd-aiter\nVersion: {version}\n\n")


def expected_switches(root: Path) -> list[str]:
    """Independent of m3fuse's ast reading: every dict key line of envs.py that names an AITER
    switch, as a plain regex sees the file."""
    return re.findall(r'^\s*"(VLLM_ROCM_USE_AITER\w*)"\s*:', (root / ENVS).read_text(), re.M)


def env_of(root: Path, arm: str, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli("env", arm, "--vllm-root", str(root), *extra, env=env)


def printed_pairs(out: str) -> dict[str, str]:
    pairs = {}
    for line in out.splitlines():
        words = shlex.split(line)
        assert words[0] == "export" and len(words) == 2, line
        k, v = words[1].split("=", 1)
        pairs[k] = v
    return pairs


def bash_eval(script: str) -> dict[str, str]:
    """What `eval "$script"` adds to an empty environment of a real bash."""
    def run(s: str) -> dict[str, str]:
        p = subprocess.run(["env", "-i", "/bin/bash", "--noprofile", "--norc", "-c", 'eval "$1"; env -0', "_", s],
                           capture_output=True, check=True)
        return dict(item.split("=", 1) for item in p.stdout.decode().split("\0") if item)
    base, after = run(""), run(script)
    return {k: v for k, v in after.items() if base.get(k) != v and k != "_"}


@pytest.fixture
def release(vllm_tree):
    def make(version: str, patched: bool) -> Path:
        root = add_members(vllm_tree(version), version, ENVS)
        if patched:
            r = run_cli("install", "--no-wheels", "--vllm-root", str(root))
            assert r.returncode == 0, r.stderr
        return root
    return make


@pytest.mark.parametrize("version", PATCHED_RELEASES)
def test_each_arm_on_a_patched_release_evals_to_exactly_its_switches(release, version):
    root = release(version, patched=True)
    switches = expected_switches(root)
    has_ray = RAY in (root / ENVS).read_text()
    assert has_ray  # every release here has it; the check below would be vacuous otherwise
    arms = {}
    for arm in ("fused", "control", "off"):
        r = env_of(root, arm)
        assert r.returncode == 0, r.stderr
        pairs = printed_pairs(r.stdout)
        assert bash_eval(r.stdout) == pairs  # eval yields exactly what was printed, nothing else
        assert set(pairs) == {MODE, *switches, RAY}
        assert pairs[MODE] == arm and pairs["VLLM_ROCM_USE_AITER"] == "1"
        assert {pairs[s] for s in switches if s not in ("VLLM_ROCM_USE_AITER", CUSTOM_AR)} == {"0"}
        assert set(pairs[RAY].split(",")) >= {MODE, "M3FUSE_RUN_RECORD", "M3FUSE_GUARD"}
        arms[arm] = pairs
    # 0.24.0 has no such switch (its envs.py defines none; nothing reads one there).
    assert (CUSTOM_AR in switches) == (version != "0.24.0")
    if CUSTOM_AR in switches:
        assert arms["fused"][CUSTOM_AR] == arms["control"][CUSTOM_AR] == "1"
    differ = lambda a, b: {k for k in arms[a] if arms[a][k] != arms[b].get(k)} | (set(arms[b]) - set(arms[a]))
    assert differ("fused", "control") == {MODE}
    # off on 0.33.0 (pinned AITER, or none found): the custom AR off, so vLLM's one-stage
    # branch (gemma_norm=True) is never reached; elsewhere off differs only in the mode.
    assert differ("off", "control") == ({MODE, CUSTOM_AR} if version in ONE_STAGE else {MODE})
    if version in ONE_STAGE:
        assert arms["off"][CUSTOM_AR] == "0"


@pytest.mark.parametrize("version", RELEASES)
@pytest.mark.parametrize("aiter", [None, "0.1.15.post1+rocm7.2.manylinux.2.28", "0.1.16.post6", "0.1.17",
                                   "0.1.19.post1+rocm7.1"])
def test_off_turns_the_custom_all_reduce_off_only_where_the_one_stage_branch_meets_an_old_aiter(
        release, version, aiter):
    root = release(version, patched=False)
    if aiter:
        fake_aiter(root, aiter)
    r = env_of(root, "off", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["aiter_version"] == aiter and out["state"] in ("pristine", "unsupported")
    # gemma_norm arrived in AITER v0.1.17 (ROCm/aiter#3792) and the fused one-stage exit barrier
    # in v0.1.19.post1 (#4346): the patched model refuses off before both; no dist-info means
    # "assume the pin".
    old_aiter = aiter is None or not aiter.startswith("0.1.19")
    assert out["env"].get(CUSTOM_AR) == (None if version == "0.24.0" else
                                         "0" if version in ONE_STAGE and old_aiter else "1")
    assert set(out["env"]) == {MODE, *expected_switches(root), RAY}


@pytest.mark.parametrize("version", ["0.26.0", "0.30.0"])
def test_fused_and_control_refuse_a_tree_that_is_not_patched(release, version):
    root = release(version, patched=False)
    for arm in ("fused", "control"):
        r = env_of(root, arm)
        assert r.returncode == 3 and r.stdout == ""
        assert "pristine, expected patched" in r.stderr
        j = env_of(root, arm, "--format", "json")
        assert j.returncode == 3
        assert json.loads(j.stdout)["error"]["kind"] == "not-patched"
    r = env_of(root, "off")
    assert r.returncode == 0 and printed_pairs(r.stdout)[MODE] == "off"
    assert "off runs upstream code" in r.stderr


def test_a_drifted_tree_gets_nothing_for_fused(release):
    root = release("0.26.0", patched=True)
    model = root / realvllm.MODEL
    model.write_bytes(model.read_bytes() + b"# local edit\n")
    r = env_of(root, "fused")
    assert r.returncode == 3 and r.stdout == "" and "drifted" in r.stderr


def test_formats_carry_the_same_settings(release):
    root = release("0.26.0", patched=True)
    sh = printed_pairs(env_of(root, "control").stdout)
    docker = env_of(root, "control", "--format", "docker")
    assert docker.returncode == 0
    parsed = {}
    for line in docker.stdout.splitlines():
        m = re.fullmatch(r'ENV ([A-Z0-9_]+)="(.*)"', line)
        assert m, line
        parsed[m.group(1)] = m.group(2)
    assert parsed == sh
    j = json.loads(env_of(root, "control", "--format", "json").stdout)
    assert j["env"] == sh and j["arm"] == "control" and j["set"] == "vllm-0.26.0"
    assert json.loads(env_of(root, "control", "--json").stdout)["env"] == sh


def test_ray_entries_already_set_are_kept_and_hostile_values_stay_literal(release, tmp_path):
    root = release("0.26.0", patched=True)
    witness = tmp_path / "pwned"
    have = f"FOO, M3FUSE_GUARD,$(touch {witness}) 'q\""
    r = env_of(root, "fused", env={RAY: have})
    assert r.returncode == 0, r.stderr
    got = bash_eval(r.stdout)
    assert not witness.exists()
    assert got[RAY] == f"FOO,M3FUSE_GUARD,$(touch {witness}) 'q\",M3_AITER_AR_RMS_MODE,M3FUSE_RUN_RECORD"
    assert "kept the entries already set" in r.stderr


def test_a_switch_that_cannot_be_zero_is_left_alone(release):
    root = release("0.33.0", patched=True)
    envs = root / ENVS
    text = envs.read_text()
    edited = text.replace('["auto", "a4w4", "a8w4", "a16w4", "0", "1"]', '["auto", "a4w4"]')
    assert edited != text
    envs.write_text(edited)
    r = env_of(root, "fused")
    assert r.returncode == 0
    assert "VLLM_ROCM_USE_AITER_MOE_SITUV2" not in printed_pairs(r.stdout)
    assert "VLLM_ROCM_USE_AITER_MOE_SITUV2 takes only auto, a4w4" in r.stderr


# ---------------------------------------------------------------------------- hostile input

@pytest.mark.parametrize("case", ["missing", "directory", "syntax", "nul", "no-table", "bad-name", "no-aiter"])
def test_a_bad_envs_py_is_refused_naming_the_file(release, case):
    root = release("0.26.0", patched=True)
    envs = root / ENVS
    text = envs.read_text()
    if case == "missing":
        envs.unlink()
    elif case == "directory":
        envs.unlink()
        envs.mkdir()
    elif case == "syntax":
        envs.write_text(text + "\ndef broken(:\n")
    elif case == "nul":
        envs.write_bytes(text.encode() + b"\x00")
    elif case == "no-table":
        envs.write_text(text.replace("environment_variables: dict", "renamed_variables: dict"))
    elif case == "bad-name":
        envs.write_text(text.replace('"VLLM_ROCM_USE_AITER_MHA":', '"VLLM_ROCM_USE_AITER_MHA; rm -rf ~":'))
    elif case == "no-aiter":
        envs.write_text(text.replace('"VLLM_ROCM_USE_AITER', '"VLLM_ROCM_NOT_AITER'))
    expect = {"missing": 5, "directory": 5}.get(case, 3)
    for arm in ("fused", "off"):
        r = env_of(root, arm)
        assert r.returncode == expect, (case, r.stdout, r.stderr)
        assert r.stdout == "" and str(envs) in r.stderr
        assert "Traceback" not in r.stderr
    hint = {"missing": "reinstall vLLM", "directory": "cannot read it", "no-aiter": "m3fuse supports"}
    assert hint.get(case, "reinstall vLLM") in r.stderr


def test_unknown_arm_format_and_a_python_that_is_not_python(release, tmp_path):
    root = release("0.26.0", patched=True)
    r = run_cli("env", "fast", "--vllm-root", str(root))
    assert r.returncode == 2 and "'fast' is not one of" in r.stderr
    r = run_cli("env", "fused", "--format", "yaml", "--vllm-root", str(root))
    assert r.returncode == 2
    notpy = tmp_path / "python"
    notpy.write_text("#!/bin/sh\necho 'not json'\n")
    notpy.chmod(0o755)
    r = run_cli("env", "fused", "--python", str(notpy))
    assert r.returncode == 5 and str(notpy) in r.stderr and "--python" in r.stderr and r.stdout == ""
    r = run_cli("env", "fused", "--python", str(tmp_path / "nope"))
    assert r.returncode == 5 and "does not exist" in r.stderr


@pytest.mark.parametrize("version,aiter,code,says", [
    # 0.33.0 with an AITER that has ROCm/aiter#4346: printed, the mode the only difference from fused
    ("0.33.0", "0.1.21.post2", 0, "ROCm/aiter#4888"),
    ("0.33.0", "0.1.19.post1+rocm7.1", 0, "ROCm/aiter#4888"),
    # refused where the patched model would refuse it at construction, nothing printed
    ("0.33.0", "0.1.18", 5, "AITER 0.1.18 is not known to have ROCm/aiter#4346"),
    ("0.33.0", None, 5, "no amd-aiter dist-info"),
    ("0.26.0", "0.1.21.post2", 3, "has no one-stage rule of its own"),
])
def test_the_one_stage_arm_is_printed_only_where_the_patched_model_takes_it(release, version, aiter, code, says):
    root = release(version, patched=True)
    if aiter:
        fake_aiter(root, aiter)
    r = env_of(root, "fused-1stage")
    assert r.returncode == code, r.stdout + r.stderr
    assert says in r.stderr
    if code:
        assert r.stdout == "" and "hint: " in r.stderr and "m3fuse env fused" in r.stderr
        return
    pairs = printed_pairs(r.stdout)
    assert bash_eval(r.stdout) == pairs and pairs[MODE] == "fused-1stage"
    fused = printed_pairs(env_of(root, "fused").stdout)
    assert {k for k in pairs if pairs[k] != fused.get(k)} | (set(fused) - set(pairs)) == {MODE}
    assert pairs[CUSTOM_AR] == "1"  # the fused kernel needs AITER's custom all-reduce
