"""`m3fuse env ARM`: the environment each A/B arm needs on the installed vLLM release.

The AITER switches are read from the target's own `vllm/envs.py` (the keys of its
`environment_variables` table, parsed with `ast`; vLLM is never imported), so each release
gets exactly the switches it defines. Every arm turns AITER on (`VLLM_ROCM_USE_AITER=1`) and
every other AITER kernel off, except the custom all-reduce the fused kernel needs; the arms
then differ only in `M3_AITER_AR_RMS_MODE`, and `off` also where it must to run at all (see
`_off_needs_custom_ar_off`). `fused-1stage` (an A/B arm, never the default) is printed only where
the patched model accepts it: vLLM 0.30.0+ and an AITER known to have ROCm/aiter#4346.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import defects as aiter_defects
from .. import pysource, safeio
from ..errors import DriftError, EnvironmentProblem, M3fuseError, NotPatched, UnsupportedError
from ..patching import engine

FUSED, FUSED_1STAGE, CONTROL, OFF = "fused", "fused-1stage", "control", "off"
ARMS = (FUSED, FUSED_1STAGE, CONTROL, OFF)
FORMATS = ("sh", "docker", "json")

MODE_VAR = "M3_AITER_AR_RMS_MODE"
AITER_VAR = "VLLM_ROCM_USE_AITER"
CUSTOM_AR_VAR = "VLLM_ROCM_USE_AITER_CUSTOM_AR"
RAY_VAR = "VLLM_RAY_EXTRA_ENV_VARS_TO_COPY"
# Ray copies only VLLM_*/NCCL_/HF_... prefixes to its workers (vllm/ray/ray_env.py); these
# m3fuse settings must be named to reach them.
RAY_COPIED = (MODE_VAR, "M3FUSE_RUN_RECORD", "M3FUSE_GUARD")

ENVS = "vllm/envs.py"
HELPER = "vllm/model_executor/layers/fused_allreduce_gemma_rms_norm.py"
# vLLM 0.30.0+: the helper's own one-stage AITER branch, which passes gemma_norm=True.
ONE_STAGE_BRANCH = "_can_use_aiter_fused_ar_rms"

_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")


@dataclass(frozen=True)
class Switch:
    name: str
    choices: tuple[str, ...] | None = None  # when envs.py restricts the values (env_with_choices)

    @property
    def takes_zero(self) -> bool:
        return self.choices is None or "0" in self.choices


@dataclass(frozen=True)
class ReleaseEnv:
    path: Path
    switches: tuple[Switch, ...]  # every VLLM_ROCM_USE_AITER* key, in file order
    has_ray_extra: bool  # envs.py defines VLLM_RAY_EXTRA_ENV_VARS_TO_COPY


@dataclass
class ArmEnv:
    arm: str
    env: dict[str, str]
    notes: list[str] = field(default_factory=list)
    aiter_version: str | None = None


def _fix(path: Path) -> str:
    return (f"{path} is not the file a vLLM release ships; reinstall vLLM (pip install --force-reinstall "
            f"--no-deps vllm==VERSION) or point m3fuse at another tree with --vllm-root / --python.")


def read_release_env(root: Path) -> ReleaseEnv:
    path = Path(root) / ENVS
    try:
        # A regular file only (a FIFO or device planted there is refused unread), bounded.
        data = safeio.read_regular(path, pysource.MAX_PARSE)
    except FileNotFoundError:
        raise EnvironmentProblem(f"{path}: no such file. The vLLM install at {root} is incomplete (every release "
                                 f"since 0.2 has vllm/envs.py); reinstall vLLM or pass the right --vllm-root.") from None
    except safeio.Unsafe as exc:  # a FIFO, device, link or huge file planted there is never read
        raise EnvironmentProblem(f"{path}: cannot read it ({exc.reason}); nothing was printed. {_fix(path)}") from None
    except OSError as exc:
        raise EnvironmentProblem(f"{path}: cannot read it ({exc.strerror}).") from None
    try:
        tree = pysource.parse(data, str(path))  # bounded: deep nesting is a clean error, not a traceback
    except pysource.Unparsable as exc:
        raise DriftError(f"{path}: {exc.reason}. {_fix(path)}") from None
    table = _environment_variables(tree)
    if table is None:
        raise DriftError(f"{path}: has no top-level `environment_variables = {{...}}` table, which is where vLLM "
                         f"defines its settings. {_fix(path)}")
    keys: list[tuple[str, ast.expr]] = []
    for k, v in zip(table.keys, table.values):
        if isinstance(k, ast.Constant) and isinstance(k.value, str):
            keys.append((k.value, v))
    switches = []
    for name, value in keys:
        if not name.startswith(AITER_VAR):
            continue
        if not _NAME.match(name):
            raise DriftError(f"{path}: defines the AITER switch {name!r}, which is not an environment variable "
                             f"name. {_fix(path)}")
        switches.append(Switch(name, _choices(value)))
    if not any(s.name == AITER_VAR for s in switches):
        raise UnsupportedError(f"{path}: defines no {AITER_VAR} switch, so this vLLM has no AITER support that "
                               f"m3fuse can configure. Use a release m3fuse supports (`m3fuse status` lists them).")
    return ReleaseEnv(path, tuple(switches), any(name == RAY_VAR for name, _ in keys))


def _environment_variables(tree: ast.Module) -> ast.Dict | None:
    for node in tree.body:
        if isinstance(node, ast.AnnAssign):
            targets, value = [node.target], node.value
        elif isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        else:
            continue
        if isinstance(value, ast.Dict) and any(isinstance(t, ast.Name) and t.id == "environment_variables"
                                               for t in targets):
            return value
    return None


def _choices(value: ast.expr) -> tuple[str, ...] | None:
    """The allowed values of `env_with_choices(name, default, [..])` (0.33.0's
    VLLM_ROCM_USE_AITER_MOE_SITUV2, say); None for the plain boolean switches."""
    call = value.body if isinstance(value, ast.Lambda) else value
    if (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "env_with_choices"
            and len(call.args) >= 3 and isinstance(call.args[2], (ast.List, ast.Tuple))):
        vals = [e.value for e in call.args[2].elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
        return tuple(vals)
    return None


def has_one_stage_branch(root: Path) -> bool | None:
    """Whether the installed helper defines vLLM's own one-stage AITER branch (True/False), or
    None when the file cannot be read or parsed."""
    try:
        tree = pysource.parse(safeio.read_regular(Path(root) / HELPER, pysource.MAX_PARSE), HELPER)
    except FileNotFoundError:
        return False
    except (OSError, safeio.Unsafe, pysource.Unparsable):
        return None
    return any(isinstance(n, ast.FunctionDef) and n.name == ONE_STAGE_BRANCH for n in tree.body)


# What each fix gives, for notes that say what the installed AITER lacks.
_FIXES = {aiter_defects.NO_GEMMA_NORM: "ROCm/aiter#3792 (gemma_norm in custom_fused_ar_rms)",
          "ROCm/aiter#4346": "ROCm/aiter#4346 (the fused one-stage kernel's exit barrier)"}
# The patched model's refusal of a torch.compiled draft model under vLLM's AR+RMS compile pass
# (m3_check_runtime) cannot be answered with an environment variable: it takes this flag.
PASS_OFF_FLAG = """--compilation-config '{"pass_config": {"fuse_allreduce_rms": false}}'"""


# What `off` runs where AITER's custom all-reduce stays on and the release's helper has vLLM's
# own one-stage branch (0.30+ with an AITER that has gemma_norm and ROCm/aiter#4346): not
# "unfused" (the patched model's run record and log line name the buckets).
OFF_ONE_STAGE_NOTE = (
    f"off: {CUSTOM_AR_VAR}=1 here, so vLLM's own one-stage fused AITER all-reduce + RMSNorm runs "
    "M3's post-attention norms (MXFP8 ones included) at the batches vLLM's rule admits (hidden "
    "6144 bf16: TP8 up to 10 tokens, TP4 up to 21, TP2 up to 80), the all-reduce + norm above; "
    f"for an arm with no fused kernel at all set {CUSTOM_AR_VAR}=0 (vLLM's own custom all-reduce "
    "then runs).")


def _off_needs_custom_ar_off(root: Path, aiter_version: str | None, notes: list[str]) -> bool:
    """`off` runs the unpatched helper. On 0.30.0+ its one-stage branch passes gemma_norm=True,
    which an AITER before v0.1.17 does not take (a TypeError at graph capture), and runs the fused
    one-stage kernel, which has no exit barrier before v0.1.19.post1 (#4346): the patched model
    refuses `off` there at construction (m3_check_runtime) unless AITER's custom all-reduce is
    off. With
    VLLM_ROCM_USE_AITER_CUSTOM_AR=0, rocm_aiter_ops.is_custom_all_reduce_enabled() is False and
    _can_use_aiter_fused_ar_rms returns False before reaching AITER (0.30.0/0.33.0
    fused_allreduce_gemma_rms_norm.py:120-121, _aiter_ops.py:2069-2070 / 2442-2443)."""
    branch = has_one_stage_branch(root)
    if branch is False:
        return False
    hits = [d.id for d in aiter_defects.affecting(aiter_version) if d.id in aiter_defects.OFF_BLOCKERS]
    if not hits:
        return False
    missing = " and ".join(_FIXES[h] for h in hits)
    why = (f"AITER {aiter_version} predates {missing}" if aiter_version else
           f"no amd-aiter dist-info found in {root}, so an AITER without {missing} is assumed")
    where = ("this vLLM's helper has its own one-stage AITER branch (gemma_norm=True)" if branch else
             f"{root / HELPER} cannot be parsed, so vLLM's one-stage AITER branch is assumed")
    notes.append(f"off: {CUSTOM_AR_VAR}=0 because {where} and {why}; upstream then uses vLLM's own "
                 f"all-reduce instead of AITER's.")
    return True


# What the one-stage arm runs, and the open defect it exposes (docs/fusion.md, "fused-1stage").
ONE_STAGE_NOTE = (
    "fused-1stage: an A/B arm, never the default. AITER's one-stage fused kernel runs where vLLM's "
    "own rule admits the call (hidden 6144 bf16: TP8 up to 10 tokens, TP4 up to 21, TP2 up to 80), "
    "the two-stage one up to 512 tokens; the run record's boundaries say which ran (aiter-1stage). "
    "ROCm/aiter#4888 (open): on gfx942 (MI300X/MI325X) the one-stage kernel can return a wrong "
    "result on the first cold graph replay (after start or idle), silently; vLLM ships no fix (its "
    "own op picks one-stage by size alone) and vLLM #52150 reports "
    "--compilation-config '{\"cudagraph_mode\": \"FULL_DECODE_ONLY\"}' as its workaround.")


def _one_stage_arm_refusal(root: Path, aiter_version: str | None) -> M3fuseError | None:
    """Why the patched model would refuse `fused-1stage` here (initialize_m3_aiter_allreduce's
    _m3_one_stage_blocker), as the error `m3fuse env` raises instead of printing; None: it runs."""
    branch = has_one_stage_branch(root)
    fallback = f"use `m3fuse env {FUSED}` (two-stage only)"
    if branch is not True:
        why = ("has no one-stage rule of its own (_can_use_aiter_fused_ar_rms, vLLM 0.30.0+)" if branch is False
               else "cannot be parsed, so vLLM's one-stage rule cannot be confirmed")
        return UnsupportedError(f"m3fuse env {FUSED_1STAGE}: nothing printed; {root / HELPER} {why}, so the "
                                f"patched model refuses this arm at construction.", hint=fallback)
    if aiter_version is None or "ROCm/aiter#4346" in {d.id for d in aiter_defects.affecting(aiter_version)}:
        have = f"AITER {aiter_version}" if aiter_version else f"no amd-aiter dist-info in {root}, so the AITER"
        return EnvironmentProblem(
            f"m3fuse env {FUSED_1STAGE}: nothing printed; {have} is not known to have ROCm/aiter#4346 (the fused "
            f"one-stage kernel's exit barrier, first in 0.1.19.post1), so the patched model refuses this arm at "
            f"construction.", hint=f"install AITER 0.1.19.post1 or later, or {fallback}")
    return None


def _ray_value(environ: Mapping[str, str], notes: list[str]) -> str:
    # vLLM splits on commas and adds to its defaults (ray_env.py _parse_csv); entries the user
    # already named are kept, first.
    have = [t.strip() for t in environ.get(RAY_VAR, "").split(",") if t.strip()]
    if have:
        notes.append(f"{RAY_VAR}: kept the entries already set in this environment ({', '.join(have)}).")
    return ",".join(have + [v for v in RAY_COPIED if v not in have])


def refuse_unless_patched(tree: engine.TreeState, arm: str) -> None:
    if tree.state in (engine.DRIFTED, engine.UNSUPPORTED):
        engine.refuse_unless_known(tree)
    failures, code = engine.judge(tree, engine.PATCHED)
    if code:
        raise NotPatched(f"m3fuse env {arm}: nothing printed, the {arm} arm needs the patched vLLM: "
                         f"{' '.join(failures)}")


def arm_env(arm: str, tree: engine.TreeState, environ: Mapping[str, str] = os.environ) -> ArmEnv:
    """The settings `arm` needs on `tree`'s release. fused/control refuse a tree that is not
    patched; off never needs the patches (it is upstream's code)."""
    if arm not in ARMS:
        raise ValueError(arm)  # the CLI's click.Choice refuses it first
    root = tree.vllm.root
    release = read_release_env(root)  # a tree without a readable envs.py fails the same for every arm
    if arm != OFF:
        refuse_unless_patched(tree, arm)
    out = ArmEnv(arm, {MODE_VAR: arm}, aiter_version=aiter_defects.dist_version(root))
    if arm == FUSED_1STAGE:
        refusal = _one_stage_arm_refusal(root, out.aiter_version)
        if refusal is not None:
            raise refusal
        out.notes.append(ONE_STAGE_NOTE)
    if arm == OFF and tree.state != engine.PATCHED:
        out.notes.append(f"vLLM at {root} is {tree.state}: off runs upstream code, so these settings hold "
                         f"without the patches.")
    for s in release.switches:
        if s.name in (AITER_VAR, CUSTOM_AR_VAR):
            out.env[s.name] = "1"
        elif s.takes_zero:
            out.env[s.name] = "0"
        else:
            out.notes.append(f"{s.name} takes only {', '.join(s.choices or ())} ({release.path}); left at its "
                             f"default.")
    if arm == OFF and CUSTOM_AR_VAR in out.env and _off_needs_custom_ar_off(root, out.aiter_version, out.notes):
        out.env[CUSTOM_AR_VAR] = "0"
    if arm == OFF and out.env.get(CUSTOM_AR_VAR) == "1" and has_one_stage_branch(root):
        out.notes.append(OFF_ONE_STAGE_NOTE)
    if "ROCm/aiter#4346" in {d.id for d in aiter_defects.affecting(out.aiter_version)} and \
            out.env.get(CUSTOM_AR_VAR) != "0":
        out.notes.append(f"with a torch.compiled draft model (e.g. EAGLE3) this AITER (no ROCm/aiter#4346) "
                         f"also needs `vllm serve ... {PASS_OFF_FLAG}`: the patched model refuses to start "
                         f"without it.")
    if release.has_ray_extra:
        out.env[RAY_VAR] = _ray_value(environ, out.notes)
    else:
        out.notes.append(f"{release.path} has no {RAY_VAR}: under Ray, set {', '.join(RAY_COPIED)} on every "
                         f"worker yourself.")
    return out


def _docker_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'


def render(result: ArmEnv, fmt: str, tree: engine.TreeState) -> str:
    if fmt == "sh":
        return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in result.env.items())
    if fmt == "docker":  # Dockerfile ENV lines
        return "\n".join(f"ENV {k}={_docker_quote(v)}" for k, v in result.env.items())
    if fmt == "json":
        import json

        body: dict[str, Any] = {
            "ok": True, "command": "env", "arm": result.arm, "state": tree.state,
            "set": tree.patch_set.name if tree.patch_set else None,
            "vllm": {"version": tree.vllm.version, "root": str(tree.vllm.root)},
            "aiter_version": result.aiter_version, "env": result.env, "notes": result.notes,
        }
        return json.dumps(body, indent=2)
    raise ValueError(fmt)
