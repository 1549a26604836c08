"""Issue 12, run time, on every patch set's patched code (CPU stand-ins, real release files).

What the patched `MiniMaxM3Model.__init__` does before any graph capture:
- refuses what cannot run here (`m3_check_runtime`): a Ray worker whose mode may not be the
  driver's; `off` where vLLM 0.30+'s own one-stage AITER branch cannot run on the installed
  AITER; a torch.compiled draft model under vLLM's AR+RMS compile pass on such an AITER;
- names what runs (`m3_report_run`): one log line per process, a warning per known AITER
  defect, and the `M3FUSE_RUN_RECORD` JSON from rank 0.

Every row of the fusion matrix (tests/fusion_matrix.py) runs, on the one harness
(tests/fusion_harness.py: the real `MiniMaxM3Model` compiled from the patched file, vLLM's own
one-stage op calling the wrapper's AITER `custom_fused_ar_rms` like the real op). Cases are
chosen by the row's facts (`upstream_aiter_branch`, `aiter_api`, `specialized_decode`, ...);
a case that cannot apply to a row is not generated. The installed AITER is a real distribution
(a `amd_aiter-X.dist-info` on `sys.path`, read by `importlib.metadata`) plus a stand-in
`CustomAllreduce` with the pinned (no `gemma_norm`) or a later `custom_fused_ar_rms` signature.

The last section runs the real `m3fuse env ARM` on each row's patched real release tree and
builds the world from exactly what it prints: no arm it recommends fails at construction.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import re
import sys
import types
import zipfile
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import torch

import fusion_harness as fh
import realvllm
from conftest import run_cli
from m3fuse.runtime.env import OFF_ONE_STAGE_NOTE
from fusion_matrix import ROWS, Row, rows_where
from fusion_standins import (
    FakeAiterCA,
    FakeAiterCAGemma,
    FakeAiterCANoStage,
    M3Norm,
    SimTP,
    rms_ref,
    standin_logger_module,
)

MODE_ENV = "M3_AITER_AR_RMS_MODE"
CUSTOM_AR = "VLLM_ROCM_USE_AITER_CUSTOM_AR"
PINNED = "0.1.15.post1+rocm7.2.manylinux.2.28"  # wheels.lock: has neither #3514 nor #4346
FIXED = "0.1.21.post2"  # the AITER vLLM 0.33.0's sources name: both fixes, gemma_norm
LOGGER_PREFIX = "m3_helper_under_test"  # the stand-in helper module's __name__


def rows(pred=lambda r: True):
    """Parametrize over the matrix rows a fact selects (the others get no case at all)."""
    return pytest.mark.parametrize("fs", rows_where(pred), ids=lambda r: r.name)


all_rows = rows()
upstream_rows = rows(lambda r: r.upstream_aiter_branch)  # 0.30.0-0.33.0
pre_upstream_rows = rows(lambda r: not r.upstream_aiter_branch)  # 0.24.0-0.29.0
wrapper_rows = rows(lambda r: r.aiter_api == "wrapper")  # 0.25+
raw_rows = rows(lambda r: r.aiter_api == "raw")  # 0.24.0
specialized_rows = rows(lambda r: r.specialized_decode)  # 0.33.0


# ============================================================================ the world
@dataclass
class Setup:
    """One vLLM process's configuration, as far as the patched code reads it."""

    mode: str | None = "fused"
    tp: int = 2
    pp: int = 1
    dp: int = 1
    pp_rank: int = 0
    dp_rank: int = 0
    aiter_enabled: bool = True  # VLLM_ROCM_USE_AITER
    custom_ar: bool = True  # VLLM_ROCM_USE_AITER_CUSTOM_AR
    custom_all_reduce: bool = True  # no --disable-custom-all-reduce
    ca_cls: type = FakeAiterCAGemma  # the installed AITER's CustomAllreduce
    executor: str | None = None  # parallel_config.distributed_executor_backend
    dp_backend: str = "mp"
    draft: tuple[str, ...] | None = None  # speculative draft model architectures
    spec_method: str = "eagle3"
    compile_mode: int = 3  # CompilationMode.VLLM_COMPILE (vLLM's default)
    fuse_ar_rms: bool = True  # pass_config.fuse_allreduce_rms (on at -O2, ROCm, AITER, TP > 1)
    # Sequence parallelism configured: pass_config.enable_sp where the release's PassConfig has
    # it (up to 0.31.0), else sequence-parallel MoE (parallel_config.use_sequence_parallel_moe).
    sp: bool = False
    specialized: bool = False  # 0.33.0 specialized ("monokernel") decode configured
    env: dict[str, str] = field(default_factory=dict)


def vllm_config(st: fh.Stage, s: Setup) -> types.SimpleNamespace:
    """The model's vllm_config: the Stage's parallel/pass config plus what the run-time checks
    read (executor, DP rank/backend, compilation mode, the AR+RMS pass, speculative config)."""
    base = st.vllm_config()
    pc = base.parallel_config
    pc.data_parallel_rank = s.dp_rank
    pc.distributed_executor_backend = s.executor
    pc.data_parallel_backend = s.dp_backend
    pass_config = base.compilation_config.pass_config
    pass_config.fuse_allreduce_rms = s.fuse_ar_rms
    spec = None if s.draft is None else types.SimpleNamespace(
        method=s.spec_method, draft_model_config=types.SimpleNamespace(architectures=list(s.draft)))
    return types.SimpleNamespace(
        model_config=types.SimpleNamespace(hf_text_config=fh.ToyConfig()), cache_config=None,
        quant_config=None, use_v2_model_runner=False,
        scheduler_config=types.SimpleNamespace(max_num_batched_tokens=64), parallel_config=pc,
        compilation_config=types.SimpleNamespace(mode=s.compile_mode, pass_config=pass_config),
        speculative_config=spec)


def stage_for(fs: Row, s: Setup, tp: SimTP) -> fh.Stage:
    sp = dict(enable_sp=s.sp) if fs.pass_config_enable_sp else dict(sp_moe=s.sp)
    return fh.Stage(fs, tp, mode=s.mode, aiter_enabled=s.aiter_enabled, aiter_custom_ar_env=s.custom_ar,
                    custom_all_reduce=s.custom_all_reduce, pp=s.pp, dp=s.dp, pp_rank=s.pp_rank,
                    ca_factory=lambda t: s.ca_cls(t, sum_dtype=torch.float32), op_calls_aiter=True,
                    specialized_decode_config=object() if s.specialized else None, **sp)


@dataclass
class Built:
    models: list
    helper: types.ModuleType
    tp: SimTP
    stage: fh.Stage
    world: fh.ModelWorld


@contextlib.contextmanager
def built(fs: Row, s: Setup, monkeypatch, *, model_source: str | None = None,
          helper_source: str | None = None, build: int = 1):
    """Construct the patched MiniMaxM3Model (the real class) on every TP rank (`build` times
    each) in a stand-in world for row `fs`; yields while the world is up. Construction errors
    propagate."""
    for k, v in s.env.items():
        monkeypatch.setenv(k, v)
    tp = SimTP(s.tp)
    with stage_for(fs, s, tp) as st:
        w = fh.load_model(fs, st, model_source=model_source, helper_source=helper_source)
        cfg = vllm_config(st, s)
        cls = w.classes["MiniMaxM3Model"]
        models = tp.run(lambda r: [cls(vllm_config=cfg, prefix="model") for _ in range(build)][-1])
        yield Built(models, w.helper, tp, st, w)


def construct(fs: Row, s: Setup, monkeypatch, **kw) -> list:
    with built(fs, s, monkeypatch, **kw) as b:
        return b.models


@pytest.fixture
def aiter(tmp_path, monkeypatch):
    """Install an `amd-aiter` distribution of the given version (its dist-info, which is all
    `importlib.metadata` reads) on sys.path; None leaves it uninstalled."""
    made = []

    def install(version: str | None) -> None:
        site = tmp_path / f"site-{len(made)}"
        made.append(site)
        if version is not None:
            d = site / f"amd_aiter-{version}.dist-info"
            d.mkdir(parents=True)
            (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: amd-aiter\nVersion: {version}\n")
        else:
            site.mkdir()
        # Newest first on sys.path; an uninstall hides the older ones.
        for old in made[:-1]:
            with contextlib.suppress(ValueError):
                sys.path.remove(str(old))
        monkeypatch.syspath_prepend(str(site))
        importlib.invalidate_caches()

    return install


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in ("M3FUSE_RUN_RECORD", "VLLM_RAY_EXTRA_ENV_VARS_TO_COPY", "VLLM_RAY_EXTRA_ENV_VAR_PREFIXES_TO_COPY"):
        monkeypatch.delenv(k, raising=False)


def m3_lines(caplog, level=logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name.startswith(LOGGER_PREFIX) and r.levelno == level]


# ============================================================================ `off` on 0.30+
@upstream_rows
def test_off_with_the_pinned_aiter_is_refused_at_construction(aiter, monkeypatch, fs):
    aiter(PINNED)
    s = Setup(mode="off", tp=8, ca_cls=FakeAiterCA)
    with pytest.raises(RuntimeError) as info:
        construct(fs, s, monkeypatch)
    msg = str(info.value)
    assert "gemma_norm" in msg and "custom_fused_ar_rms" in msg
    assert "_can_use_aiter_fused_ar_rms" in msg
    assert "Set VLLM_ROCM_USE_AITER_CUSTOM_AR=0 as well" in msg


def _without_check(fs: Row) -> str:
    source = fh.patched_text(fs, realvllm.MODEL)
    line = "        m3_check_runtime(vllm_config)\n"
    assert source.count(line) == 1
    return source.replace(line, "")


@upstream_rows
def test_without_the_check_off_fails_at_the_first_small_batch(aiter, monkeypatch, fs):
    """What the refusal prevents, on the same stand-ins: the unpatched branch hands the pinned
    signature gemma_norm= (the real op: 0.33.0 _aiter_ops.py:1259-1266) -> TypeError; a large
    batch (two-stage territory, not the branch) still runs."""
    aiter(PINNED)
    s = Setup(mode="off", tp=8, ca_cls=FakeAiterCA)
    with built(fs, s, monkeypatch, model_source=_without_check(fs)) as b:
        parts, residual, norms, ref = _case(8, 200)
        outs = b.tp.run(lambda r: b.helper.fused_allreduce_gemma_rms_norm(parts[r], residual.clone(), norms[r]))
        _assert_ref(outs, ref)
        parts, residual, norms, _ = _case(8, 4)
        with pytest.raises(TypeError, match="gemma_norm"):
            b.tp.run(lambda r: b.helper.fused_allreduce_gemma_rms_norm(parts[r], residual.clone(), norms[r]))


@upstream_rows
@pytest.mark.parametrize("tokens", [1, 10, 200])
def test_off_with_custom_ar_off_constructs_and_runs(aiter, monkeypatch, fs, tokens):
    aiter(PINNED)
    s = Setup(mode="off", tp=8, ca_cls=FakeAiterCA, custom_ar=False)
    with built(fs, s, monkeypatch) as b:
        assert all(m.defer_ffn_all_reduce is False for m in b.models)
        parts, residual, norms, ref = _case(8, tokens)
        outs = b.tp.run(lambda r: b.helper.fused_allreduce_gemma_rms_norm(parts[r], residual.clone(), norms[r]))
        _assert_ref(outs, ref)
        assert not b.stage.upstream_op_calls and b.tp.all_reduce_calls == 1


@upstream_rows
def test_off_with_a_gemma_aiter_before_4346_is_refused(aiter, monkeypatch, fs):
    aiter("0.1.18")
    with pytest.raises(RuntimeError, match=r"ROCm/aiter#4346") as info:
        construct(fs, Setup(mode="off", tp=4, ca_cls=FakeAiterCAGemma), monkeypatch)
    assert "gemma_norm= to the installed" not in str(info.value)


@upstream_rows
def test_off_with_a_fixed_aiter_runs_vllms_own_branch(aiter, monkeypatch, fs):
    aiter("0.1.19.post1")
    with built(fs, Setup(mode="off", tp=4, ca_cls=FakeAiterCAGemma), monkeypatch) as b:
        parts, residual, norms, ref = _case(4, 8)
        outs = b.tp.run(lambda r: b.helper.fused_allreduce_gemma_rms_norm(parts[r], residual.clone(), norms[r]))
        _assert_ref(outs, ref)
        assert [c["gemma_norm"] for c in b.stage.upstream_op_calls] == [True] * 4


@pre_upstream_rows
def test_off_before_030_has_no_upstream_branch_and_constructs(aiter, monkeypatch, fs):
    aiter(PINNED)
    with built(fs, Setup(mode="off", tp=8, ca_cls=FakeAiterCA), monkeypatch) as b:
        assert all(m.defer_ffn_all_reduce is False for m in b.models)
        parts, residual, norms, ref = _case(8, 4)  # a small batch: no AITER branch to take
        outs = b.tp.run(lambda r: b.helper.fused_allreduce_gemma_rms_norm(parts[r], residual.clone(), norms[r]))
        _assert_ref(outs, ref)
        assert not b.stage.upstream_op_calls


@all_rows
def test_gemma_norm_proxy_matches_the_release(fs):
    """The patched helper decides "vLLM forwards gemma_norm to AITER" from the helper's own
    `_can_use_aiter_fused_ar_rms`; in the real releases both arrive together."""
    helper = fh.pristine_text(fs, realvllm.HELPER)
    ops = fh.release_bytes(fs.version, "vllm/_aiter_ops.py").decode()
    call = re.search(r"ca\.custom_fused_ar_rms\((.*?)\)\n", ops, re.S)
    forwards = bool(call) and "gemma_norm=gemma_norm" in call.group(1)
    assert ("def _can_use_aiter_fused_ar_rms" in helper) is fs.upstream_aiter_branch
    assert forwards is fs.upstream_aiter_branch


# Lines docs/fusion.md cites (1-based): the helper's early return, _aiter_ops.py's switch and
# is_custom_all_reduce_enabled's return.
CITED_LINES = {"0.33.0": (120, 2204, 2443)}


@upstream_rows
def test_custom_ar_off_keeps_the_upstream_branch_off(fs):
    """VLLM_ROCM_USE_AITER_CUSTOM_AR=0: is_custom_all_reduce_enabled() is False, so the helper's
    branch returns False and the TP communicator builds vLLM's own custom all-reduce."""
    helper = fh.pristine_text(fs, realvllm.HELPER).splitlines()
    start = next(i for i, line in enumerate(helper) if line.startswith("def _can_use_aiter_fused_ar_rms("))
    end = next(i for i in range(start + 1, len(helper)) if helper[i].startswith("def "))
    body = helper[start:end]
    at = body.index("    if not rocm_aiter_ops.is_custom_all_reduce_enabled():")
    assert body[at + 1] == "        return False"
    ops = fh.release_bytes(fs.version, "vllm/_aiter_ops.py").decode().splitlines()
    switch = [i for i, line in enumerate(ops)
              if line.strip() == "_CUSTOM_ALL_REDUCE_ENABLED = envs.VLLM_ROCM_USE_AITER_CUSTOM_AR"]
    ret = [i for i, line in enumerate(ops)
           if line.strip() == "return cls._AITER_ENABLED and cls._CUSTOM_ALL_REDUCE_ENABLED"]
    assert len(switch) == 1 and len(ret) == 1
    if fs.version in CITED_LINES:
        assert (start + at + 1, switch[0] + 1, ret[0] + 1) == CITED_LINES[fs.version]
    comm = fh.release_bytes(fs.version, "vllm/distributed/device_communicators/cuda_communicator.py").decode()
    # use_aiter_allreduce = use_custom_allreduce [and not VLLM_BATCH_INVARIANT (0.32+)] and
    # bool(rocm_aiter_ops.is_custom_all_reduce_enabled())
    assert re.search(r"use_aiter_allreduce = \(?\s*use_custom_allreduce\s+and\s+(not envs\.VLLM_BATCH_INVARIANT\s+and\s+)?"
                     r"bool\(\s*rocm_aiter_ops\.is_custom_all_reduce_enabled\(\)\s*\)", comm)
    assert "if use_custom_allreduce and self.aiter_ar_comm is None and self.world_size > 1:" in comm


# ============================================================================ compile pass
EAGLE3 = ("Eagle3LlamaForCausalLM",)
PASS_OFF_JSON = {"pass_config": {"fuse_allreduce_rms": False}}


def _pass_cases(fs: Row) -> list[tuple[str | None, type, str | None]]:
    """(installed AITER version, its CustomAllreduce, refusal text or None) per API generation:
    from 0.30 vLLM's op passes gemma_norm= (the pinned AITER cannot take it; a gemma build
    before #4346 runs the racy one-stage kernel); before 0.30 the op runs the fused one-stage
    kernel without gemma_norm, refused only while AITER lacks #4346; an unknown version is not
    guessed."""
    if fs.upstream_aiter_branch:
        return [(PINNED, FakeAiterCA, "gemma_norm= to the installed"),
                ("0.1.18", FakeAiterCAGemma, "ROCm/aiter#4346"),
                (FIXED, FakeAiterCAGemma, None)]
    if fs.aiter_api == "wrapper":
        return [(PINNED, FakeAiterCA, "ROCm/aiter#4346"),
                ("0.1.19.post1", FakeAiterCA, None),
                (None, FakeAiterCA, None)]
    return [(PINNED, FakeAiterCA, "ROCm/aiter#4346"), (FIXED, FakeAiterCA, None)]


def _pass_params():
    return [pytest.param(fs, *case, id=f"{fs.name}-{case[0] or 'no-aiter'}")
            for fs in ROWS for case in _pass_cases(fs)]


@pytest.mark.parametrize("fs,version,ca_cls,refused", _pass_params())
@pytest.mark.parametrize("mode", ["fused", "control", "off"])
def test_compiled_draft_under_the_ar_rms_pass(aiter, monkeypatch, fs, version, ca_cls, refused, mode):
    aiter(version)
    off_needs_custom_ar_off = fs.upstream_aiter_branch and mode == "off" and refused is not None
    s = Setup(mode=mode, tp=4, ca_cls=ca_cls, draft=EAGLE3, custom_ar=not off_needs_custom_ar_off)
    if refused is None or off_needs_custom_ar_off:
        # off itself needs CUSTOM_AR=0 with this AITER on 0.30+; then the pass has no
        # communicator (0.33.0 allreduce_rms_fusion.py:1585-1592 disables itself): harmless.
        construct(fs, s, monkeypatch)
        return
    with pytest.raises(RuntimeError, match=re.escape(refused)) as info:
        construct(fs, s, monkeypatch)
    msg = str(info.value)
    assert "RocmAiterAllReduceFusionPass" in msg and "Eagle3LlamaForCausalLM" in msg
    (js,) = re.findall(r"--compilation-config '(\{.*?\}\})'", msg)
    assert json.loads(js) == PASS_OFF_JSON
    construct(fs, replace(s, fuse_ar_rms=False), monkeypatch)  # the named fix works


@all_rows
@pytest.mark.parametrize("change", [
    dict(draft=("MiniMaxM3MTP",)),  # amd/mtp.py: no @support_torch_compile
    dict(draft=None), dict(compile_mode=0), dict(fuse_ar_rms=False), dict(tp=1), dict(aiter_enabled=False),
], ids=["m3-mtp", "no-draft", "eager", "pass-off", "tp1", "no-aiter"])
def test_the_pass_check_is_quiet_where_the_pass_does_not_run(aiter, monkeypatch, fs, change):
    aiter(PINNED)
    mode = "control" if change.get("aiter_enabled") is False else "fused"
    construct(fs, Setup(mode=mode, ca_cls=FakeAiterCA, **{"tp": 4, "draft": EAGLE3, **change}), monkeypatch)


@all_rows
@pytest.mark.parametrize("method,refused", [("ngram", False), ("suffix", False), ("draft_model", True)])
def test_methods_without_a_draft_network_are_not_refused(aiter, monkeypatch, fs, method, refused):
    """ngram/suffix/custom_class/extract_hidden_states get the target's model config as
    draft_model_config (config/speculative.py, 0.33.0 :1297-1373) and load no draft network."""
    aiter(PINNED)
    s = Setup(mode="control", tp=4, ca_cls=FakeAiterCA, draft=("MiniMaxM3ForCausalLM",), spec_method=method)
    if not refused:
        construct(fs, s, monkeypatch)
        return
    with pytest.raises(RuntimeError, match="RocmAiterAllReduceFusionPass"):
        construct(fs, s, monkeypatch)


@raw_rows
def test_024_pass_needs_vllms_custom_all_reduce(aiter, monkeypatch, fs):
    """0.24.0's pass returns early without vLLM's ca_comm (allreduce_rms_fusion.py:1476-1484)."""
    aiter(PINNED)
    construct(fs, Setup(mode="control", tp=4, ca_cls=FakeAiterCA, draft=EAGLE3, custom_all_reduce=False),
              monkeypatch)


@all_rows
def test_the_pass_off_setting_exists_in_the_release(fs):
    """The JSON the refusal names: the field, the pass it gates, and that a user's False is
    kept by the optimisation-level defaults (they fill None only)."""
    comp = fh.release_bytes(fs.version, "vllm/config/compilation.py").decode()
    pass_cls = comp[comp.index("class PassConfig"):comp.index("class CompilationConfig")]
    assert "    fuse_allreduce_rms: bool = None" in pass_cls
    pm = fh.release_bytes(fs.version, "vllm/compilation/passes/pass_manager.py").decode()
    assert re.search(r"if self\.pass_config\.fuse_allreduce_rms:\n\s+if rocm_aiter_ops\.is_enabled\(\):\n"
                     r"\s+self\.passes \+= \[RocmAiterAllReduceFusionPass\(config\)\]", pm)
    vc = fh.release_bytes(fs.version, "vllm/config/vllm.py").decode()
    assert "        if getattr(config_obj, key) is None:\n" in vc
    assert '"fuse_allreduce_rms": enable_allreduce_rms_fusion,' in vc
    assert "rocm_aiter_ops.is_enabled() and cfg.parallel_config.tensor_parallel_size > 1" in vc


# ============================================================================ fallbacks
MODE_RE = re.compile(r"M3_AITER_AR_RMS_MODE=(fused|control|off)( with VLLM_ROCM_USE_AITER_CUSTOM_AR=0)?")


def offered(msg: str, current: str | None) -> list[dict]:
    """Every setting an error message offers, as Setup changes. A mode equal to the current
    one is the message's cause, not advice."""
    out: list[dict] = []
    for m in MODE_RE.finditer(msg):
        if m.group(2):
            out.append(dict(mode=m.group(1), custom_ar=False))
        elif m.group(1) != (current or "fused"):
            out.append(dict(mode=m.group(1)))
    rest = MODE_RE.sub("", msg)
    if "VLLM_ROCM_USE_AITER_CUSTOM_AR=0" in rest:
        out.append(dict(custom_ar=False))
    for js in re.findall(r"--compilation-config '(\{.*?\}\})'", msg):
        out.append(dict(fuse_ar_rms=json.loads(js)["pass_config"]["fuse_allreduce_rms"]))
    if "VLLM_RAY_EXTRA_ENV_VARS_TO_COPY=M3_AITER_AR_RMS_MODE" in msg:
        out.append(dict(env={"VLLM_RAY_EXTRA_ENV_VARS_TO_COPY": "M3_AITER_AR_RMS_MODE"}))
    if "Install the pinned AITER (0.1.15.post1)" in msg:
        out.append(dict(ca_cls=FakeAiterCA, aiter_version=PINNED))
    if "0.1.19.post1 or later" in msg:
        out.append(dict(ca_cls=FakeAiterCAGemma, aiter_version="0.1.19.post1"))
    return out


def _no_pool(tp, **kw):
    return FakeAiterCA(tp, with_pool=False, **kw)


def _disabled(tp, **kw):
    return FakeAiterCA(tp, disabled=True, **kw)


# Every way the patched code refuses to start, on the deployed AITER (the pinned one).
REFUSALS = [
    ("aiter off", Setup(mode="fused", ca_cls=FakeAiterCA, aiter_enabled=False)),
    ("custom AR env off", Setup(mode="fused", ca_cls=FakeAiterCA, custom_ar=False)),
    ("custom AR disabled", Setup(mode="fused", ca_cls=FakeAiterCA, custom_all_reduce=False)),
    ("AITER disabled", Setup(mode="fused", ca_cls=_disabled)),
    ("AITER < 0.1.12", Setup(mode="fused", ca_cls=_no_pool)),
    ("no use_1stage", Setup(mode="fused", ca_cls=FakeAiterCANoStage)),
    ("SP control", Setup(mode="control", ca_cls=FakeAiterCA, sp=True)),
    ("SP fused", Setup(mode=None, ca_cls=FakeAiterCA, sp=True)),
    ("off", Setup(mode="off", ca_cls=FakeAiterCA)),
    ("compiled draft", Setup(mode="control", ca_cls=FakeAiterCA, draft=EAGLE3)),
    ("ray", Setup(mode="control", ca_cls=FakeAiterCA, executor="ray")),
    ("ray dp", Setup(mode="control", ca_cls=FakeAiterCA, dp=2, dp_backend="ray")),
]


def refuses(label: str, fs: Row) -> bool:
    """What a set does not refuse: before 0.30 `off` has no upstream AITER branch; 0.24.0 creates
    the AITER communicator itself (rocm_aiter_ops.initialize_aiter_allreduce), whatever
    VLLM_ROCM_USE_AITER_CUSTOM_AR or --disable-custom-all-reduce say."""
    if label == "off":
        return fs.upstream_aiter_branch
    if label in ("custom AR env off", "custom AR disabled"):
        return fs.aiter_api == "wrapper"
    return True


@all_rows
@pytest.mark.parametrize("label,setup", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_every_fallback_a_message_names_constructs(aiter, monkeypatch, fs, label, setup):
    aiter(PINNED)
    s = replace(setup, tp=4)
    try:
        construct(fs, s, monkeypatch)
    except (RuntimeError, ValueError) as exc:
        msg = str(exc)
    else:
        assert not refuses(label, fs)
        return
    assert refuses(label, fs), msg
    fixes = offered(msg, s.mode)
    assert fixes, msg
    for fix in fixes:
        fix = dict(fix)
        version = fix.pop("aiter_version", None)
        if version is not None:
            aiter(version)
        env = {**s.env, **fix.pop("env", {})}
        fixed = replace(s, env=env, **fix)
        if fixed.sp and fixed.mode != "off":
            continue  # "turn sequence parallelism off" is the other half of that message
        construct(fs, fixed, monkeypatch)  # must not raise
        if version is not None:
            aiter(PINNED)


@upstream_rows
def test_plain_off_is_not_offered_where_it_fails(aiter, monkeypatch, fs):
    """0.30+, pinned AITER, AITER custom all-reduce on: an error that suggests falling back to
    off names CUSTOM_AR=0 with it, and off alone would indeed be refused."""
    aiter(PINNED)
    s = Setup(mode="control", tp=4, ca_cls=FakeAiterCA, sp=True)
    with pytest.raises(ValueError) as info:
        construct(fs, s, monkeypatch)
    assert "set M3_AITER_AR_RMS_MODE=off with VLLM_ROCM_USE_AITER_CUSTOM_AR=0." in str(info.value)
    with pytest.raises(RuntimeError, match="gemma_norm"):
        construct(fs, replace(s, mode="off"), monkeypatch)


@all_rows
def test_every_model_error_names_the_computed_fallback(fs):
    """The model-side refusals name m3_off_fallback(), never a hard-coded `off`: the MoE that
    reduces itself (at construction and in forward; 0.24.0's own runner adds one) and, on
    0.33.0, specialized decode."""
    text = fh.patched_text(fs, realvllm.MODEL)
    assert "M3_AITER_AR_RMS_MODE=off" not in text
    want = 2 + (fs.moe_defer_knob == "runner_cls") + fs.specialized_decode
    assert text.count("{m3_off_fallback()}") == want
    helper = fh.patched_text(fs, realvllm.HELPER)
    assert not re.search(r"=off\.[\"']", helper)


@all_rows
@pytest.mark.parametrize("mode", ["control", "off"])
def test_the_3514_warnings_advice_constructs(aiter, monkeypatch, fs, mode):
    """The #3514 warning offers VLLM_ROCM_USE_AITER_CUSTOM_AR=0 for control/off."""
    aiter(PINNED)
    construct(fs, Setup(mode=mode, tp=8, ca_cls=FakeAiterCA, custom_ar=False), monkeypatch)


# ============================================================================ provenance
TOPOLOGIES = {"TP1": dict(tp=1), "TP8": dict(tp=8), "PP2": dict(tp=2, pp=2), "DP2": dict(tp=2, dp=2)}


def expected(mode: str | None, tp: int, pp: int, dp: int) -> tuple[bool, str, str]:
    eff = mode or "fused"
    if eff == "off":
        why = "mode off"
    elif tp == 1:
        why = "TP=1"
    elif pp != 1:
        why = f"PP={pp}"
    elif dp != 1:
        why = f"DP={dp}"
    else:
        why = f"TP={tp}, PP=1, DP=1"
    defer = eff != "off" and tp > 1 and pp == 1 and dp == 1
    if eff != "fused":
        path = f"not used (mode {eff})"
    else:
        path = "not used (TP=1)" if tp == 1 else "ready"
    return defer, why, path


def expected_boundaries(fs: Row, mode: str | None, tp: int) -> str:
    """What this world runs at M3's norm boundaries, by batch bucket (issue 23): the fused path
    up to 512 tokens; in `off` on 0.30+ (AITER custom all-reduce on, an AITER with gemma_norm)
    vLLM's one-stage op where the wrapper's rule admits the call (tokens <= 80 at hidden 64,
    far under its byte caps); the all-reduce + norm elsewhere."""
    if tp == 1:
        return "1+ norm"
    if mode in ("fused", None):
        return "1-512 aiter-2stage, 513+ all-reduce+norm"
    if mode == "off" and fs.upstream_aiter_branch:
        return "1-80 vllm-aiter-1stage, 81+ all-reduce+norm"
    return "1+ all-reduce+norm"


@pytest.mark.parametrize("topo", list(TOPOLOGIES))
@pytest.mark.parametrize("mode", ["fused", "control", "off", None], ids=["fused", "control", "off", "unset"])
@all_rows
def test_log_line_and_record_name_what_runs(aiter, monkeypatch, caplog, tmp_path, fs, mode, topo):
    aiter(FIXED)
    record = tmp_path / "run" / "record.json"
    record.parent.mkdir()
    s = Setup(mode=mode, env={"M3FUSE_RUN_RECORD": str(record)}, **TOPOLOGIES[topo])
    caplog.set_level(logging.INFO)
    models = construct(fs, s, monkeypatch)
    defer, why, path = expected(mode, s.tp, s.pp, s.dp)
    assert [m.defer_ffn_all_reduce for m in models] == [defer] * s.tp  # what the model does
    lines = m3_lines(caplog)
    assert len(lines) == s.tp  # one per rank-process
    want = (f"m3fuse set {fs.name}: mode {mode or 'fused'}{'' if mode else ' (default)'}; "
            f"deferral {'on' if defer else 'off'} ({why}); AITER fused path {path}; "
            f"norm boundaries: {expected_boundaries(fs, mode, s.tp)}"
            f"{'; mono decode not requested' if fs.mono_decode else ''}; AITER {FIXED}")
    assert lines == [want] * s.tp
    assert not m3_lines(caplog, logging.WARNING)  # a fixed AITER: no defect warning
    got = json.loads(record.read_text())
    assert {k: got[k] for k in ("set", "mode", "mode_env", "deferral", "deferral_reason", "aiter_fused_path",
                                "aiter_fused_ready", "aiter_version", "aiter_defects", "tp", "pp", "dp", "rank")} == {
        "set": fs.name, "mode": mode or "fused", "mode_env": mode, "deferral": defer, "deferral_reason": why,
        "aiter_fused_path": path, "aiter_fused_ready": path == "ready", "aiter_version": FIXED,
        "aiter_defects": [], "tp": s.tp, "pp": s.pp, "dp": s.dp, "rank": {"tp": 0, "pp": 0, "dp": 0}}
    assert sorted(p.name for p in record.parent.iterdir()) == ["record.json"]  # no temp file left


@all_rows
@pytest.mark.parametrize("where", [dict(tp=2, pp=2, pp_rank=1), dict(tp=2, dp=2, dp_rank=1)], ids=["pp-rank-1", "dp-rank-1"])
def test_only_rank_0_writes_the_record(aiter, monkeypatch, caplog, tmp_path, fs, where):
    aiter(FIXED)
    record = tmp_path / "record.json"
    caplog.set_level(logging.INFO)
    construct(fs, Setup(mode="control", env={"M3FUSE_RUN_RECORD": str(record)}, **where), monkeypatch)
    assert not record.exists()
    assert len(m3_lines(caplog)) == 2  # every rank still logs


@all_rows
def test_once_per_process_and_the_record_is_replaced(aiter, monkeypatch, caplog, tmp_path, fs):
    aiter(FIXED)
    record = tmp_path / "record.json"
    record.write_text("stale\n")
    caplog.set_level(logging.INFO)
    construct(fs, Setup(mode="control", tp=4, env={"M3FUSE_RUN_RECORD": str(record)}), monkeypatch, build=2)
    assert len(m3_lines(caplog)) == 4
    assert json.loads(record.read_text())["mode"] == "control"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".m3fuse")) == []


@all_rows
def test_an_unwritable_record_path_is_refused(aiter, monkeypatch, tmp_path, fs):
    aiter(FIXED)
    bad = tmp_path / "missing-dir" / "record.json"
    with pytest.raises(RuntimeError, match=r"M3FUSE_RUN_RECORD=.*missing-dir.*unset it"):
        construct(fs, Setup(mode="off", tp=2, env={"M3FUSE_RUN_RECORD": str(bad)}), monkeypatch)
    assert not bad.parent.exists()


@specialized_rows
def test_specialized_decode_is_named_as_the_reason(aiter, monkeypatch, caplog, fs):
    aiter(FIXED)
    caplog.set_level(logging.INFO)
    models = construct(fs, Setup(mode="control", tp=4, specialized=True), monkeypatch)
    assert all(m.defer_ffn_all_reduce is False for m in models)
    assert all("deferral off (specialized decode)" in line for line in m3_lines(caplog))


@all_rows
def test_the_set_line_is_one_top_level_line_naming_the_set(fs):
    text = fh.patched_text(fs, realvllm.HELPER)
    assert re.findall(r"^M3FUSE_SET = .*$", text, re.M) == [f'M3FUSE_SET = "{fs.name}"']
    assert "M3FUSE_SET" not in fh.pristine_text(fs, realvllm.HELPER)
    assert fh.manifest(fs)["name"] == fs.name


# ============================================================================ AITER defects
@pytest.mark.parametrize("version,defects", [
    (PINNED, ["ROCm/aiter#3514", "ROCm/aiter#4346"]),
    ("0.1.15.post1", ["ROCm/aiter#3514", "ROCm/aiter#4346"]),
    ("0.1.16.dev3+g1234abc", ["ROCm/aiter#3514", "ROCm/aiter#4346"]),  # before the 0.1.16 tag
    ("0.1.16", ["ROCm/aiter#4346"]),
    ("0.1.19", ["ROCm/aiter#4346"]),
    ("0.1.19.post1", []),
    ("0.1.19.post1+rocm7.2", []),
    (FIXED, []),
    (None, None),
    ("not-a-version", None),
])
@all_rows
def test_defect_table(fs, version, defects):
    """The set's table: #3514 and #4346 everywhere, and #4082 (fixed with #4346) where vLLM sends
    TP all-gathers to AITER (the row's `aiter_all_gather`, 0.34+)."""
    with fh.Stage(fs, SimTP(1)):
        helper = fh.load_helper(fs)
    gather = ["ROCm/aiter#4082"] if fs.aiter_all_gather else []
    if defects is not None and "ROCm/aiter#4346" in defects:
        defects = defects + gather
    assert helper.m3_aiter_defects(version) == defects
    assert [d for d, _, _ in helper.M3_AITER_DEFECTS] == ["ROCm/aiter#3514", "ROCm/aiter#4346"] + gather
    assert dict((d, fixed) for d, fixed, _ in helper.M3_AITER_DEFECTS) == {
        "ROCm/aiter#3514": "0.1.16", "ROCm/aiter#4346": "0.1.19.post1",
        **{d: "0.1.19.post1" for d in gather}}


@all_rows
@pytest.mark.parametrize("version", [PINNED, "0.1.16", "0.1.19.post1", None])
def test_defect_warning_at_construction(aiter, monkeypatch, caplog, fs, version):
    aiter(version)
    caplog.set_level(logging.INFO)
    ca_cls = FakeAiterCAGemma if version == "0.1.19.post1" else FakeAiterCA
    construct(fs, Setup(mode="control", tp=8, ca_cls=ca_cls), monkeypatch)
    warnings = m3_lines(caplog, logging.WARNING)
    info = m3_lines(caplog)
    assert all(f"AITER {version or 'not installed'}" in line for line in info) and len(info) == 8
    has_3514 = version in (PINNED,)
    has_4346 = version in (PINNED, "0.1.16")
    assert sum("has ROCm/aiter#3514 (fixed in 0.1.16)" in w for w in warnings) == (8 if has_3514 else 0)
    assert sum("has ROCm/aiter#4346 (fixed in 0.1.19.post1)" in w for w in warnings) == (8 if has_4346 else 0)
    has_4082 = has_4346 and fs.aiter_all_gather
    assert sum("has ROCm/aiter#4082 (fixed in 0.1.19.post1)" in w for w in warnings) == (8 if has_4082 else 0)
    for w in warnings:
        if "#4082" in w:  # vLLM 0.34+ all-gathers the logits through AITER in every mode
            assert "exposed: vLLM 0.34 sends tensor-parallel all-gathers" in w
            assert "in every M3_AITER_AR_RMS_MODE (fused and control alike)" in w
        elif "#3514" in w:
            if fs.aiter_api == "raw":  # vLLM 0.24 does plain all-reduces with its own communicator
                assert "not exposed in this process" in w
            else:  # 0.25+: the TP communicator's aiter_ar_comm takes every small all-reduce
                assert "exposed: vLLM sends every small tensor-parallel all-reduce" in w
                assert "in every M3_AITER_AR_RMS_MODE" in w
        else:
            assert "not exposed: m3fuse runs only the two-stage fused kernel" in w


@wrapper_rows
def test_3514_is_not_exposed_with_custom_ar_off(aiter, monkeypatch, caplog, fs):
    aiter(PINNED)
    caplog.set_level(logging.INFO)
    construct(fs, Setup(mode="off", tp=2, ca_cls=FakeAiterCA, custom_ar=False), monkeypatch)
    w3514 = [w for w in m3_lines(caplog, logging.WARNING) if "#3514" in w]
    assert len(w3514) == 2 and all("not exposed in this process" in w for w in w3514)


@all_rows
def test_citation_names_4346_for_the_fused_kernel(fs):
    text = fh.patched_text(fs, realvllm.HELPER)
    comment = text[text.index("    # fused: the two-stage kernel only"):text.index("use_1stage=use_1stage,\n")]
    assert "ROCm/aiter#4346, first in 0.1.19.post1" in comment
    assert "#3514 is the plain one-stage all-reduce's" in comment
    assert "fixed later in ROCm/aiter#3514" not in text


# ============================================================================ Ray
@all_rows
@pytest.mark.parametrize("via", [dict(executor="ray"), dict(dp=2, dp_backend="ray")], ids=["executor", "dp-backend"])
@pytest.mark.parametrize("listing,accepted", [
    ({}, False),
    ({"VLLM_RAY_EXTRA_ENV_VARS_TO_COPY": "FOO"}, False),
    ({"VLLM_RAY_EXTRA_ENV_VARS_TO_COPY": "FOO, M3_AITER_AR_RMS_MODE"}, True),
    ({"VLLM_RAY_EXTRA_ENV_VAR_PREFIXES_TO_COPY": "M3_"}, True),
], ids=["unlisted", "other", "listed", "prefix"])
def test_ray_worker_refused_unless_the_mode_is_copied(aiter, monkeypatch, fs, via, listing, accepted):
    aiter(FIXED)
    s = Setup(mode="control", tp=2, env=dict(listing), **via)
    if accepted:
        construct(fs, s, monkeypatch)
        return
    with pytest.raises(RuntimeError) as info:
        construct(fs, s, monkeypatch)
    msg = str(info.value)
    assert "runs under Ray" in msg and "'control'" in msg
    assert "VLLM_RAY_EXTRA_ENV_VARS_TO_COPY=M3_AITER_AR_RMS_MODE" in msg


@all_rows
def test_mp_executor_needs_nothing(aiter, monkeypatch, fs):
    aiter(FIXED)
    construct(fs, Setup(mode="off", tp=2, executor="mp"), monkeypatch)


@all_rows
def test_real_ray_env_copies_the_mode_only_when_listed(fs, monkeypatch, tmp_path):
    """The release's own vllm/ray/ray_env.py:get_env_vars_to_copy (the legacy Ray executor's and
    the Ray engine-core actors' list): M3_AITER_AR_RMS_MODE only when listed; the list itself is
    a VLLM_ variable, so a worker sees it."""
    version = fs.version
    src = fh.release_bytes(version, "vllm/ray/ray_env.py").decode()

    def names(listed: str) -> set[str]:
        monkeypatch.setenv("VLLM_RAY_EXTRA_ENV_VARS_TO_COPY", listed)
        envs = types.ModuleType("vllm.envs")
        envs.VLLM_CONFIG_ROOT = str(tmp_path)
        envs.VLLM_RAY_EXTRA_ENV_VAR_PREFIXES_TO_COPY = ""
        envs.VLLM_RAY_EXTRA_ENV_VARS_TO_COPY = listed
        envs.environment_variables = {"VLLM_RAY_EXTRA_ENV_VARS_TO_COPY": None}
        vllm = types.ModuleType("vllm")
        vllm.envs = envs
        mods = {"vllm": vllm, "vllm.envs": envs, "vllm.logger": standin_logger_module()}
        saved = {k: sys.modules.get(k) for k in mods}
        sys.modules.update(mods)
        try:
            ns: dict = {"__name__": "ray_env_under_test"}
            exec(compile(src, f"<{version}>/vllm/ray/ray_env.py", "exec"), ns)
            return ns["get_env_vars_to_copy"]()
        finally:
            for k, v in saved.items():
                if v is None:
                    sys.modules.pop(k, None)
                else:
                    sys.modules[k] = v

    monkeypatch.setenv(MODE_ENV, "control")
    assert MODE_ENV not in names("")
    got = names("FOO,M3_AITER_AR_RMS_MODE")
    assert MODE_ENV in got and "VLLM_RAY_EXTRA_ENV_VARS_TO_COPY" in got


@all_rows
def test_ray_v2_executor_keeps_a_nodes_own_value(fs):
    """RayExecutorV2 (the default "ray" backend in every release) copies the whole driver
    environment with setdefault: a value already in a node's environment wins. That is the gap
    the listing cannot close (docs/fusion.md)."""
    v2 = fh.release_bytes(fs.version, "vllm/v1/executor/ray_executor_v2.py").decode()
    assert re.search(r"for key, value in driver_env_vars\.items\(\):\n\s+os\.environ\.setdefault\(key, value\)", v2)
    abstract = fh.release_bytes(fs.version, "vllm/v1/executor/abstract.py").decode()
    assert "from vllm.v1.executor.ray_executor_v2 import RayExecutorV2" in abstract


# ============================================================================ helpers
def _case(world: int, tokens: int, hidden: int = 256, seed: int = 3):
    g = torch.Generator().manual_seed(seed + tokens)
    parts = [torch.randn(tokens, hidden, generator=g).to(torch.bfloat16) for _ in range(world)]
    residual = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16)
    weight = 0.3 * torch.randn(hidden, generator=g)
    norms = []
    for _ in range(world):
        n = M3Norm(hidden)
        with torch.no_grad():
            n.weight.copy_(weight)
        norms.append(n)
    s = sum(p.double() for p in parts) + residual.double()
    return parts, residual, norms, (rms_ref(s, 1.0 + weight.double(), 1e-6), s)


def _assert_ref(outs, ref):
    for normed, res in outs:
        torch.testing.assert_close(normed.double(), ref[0], atol=3e-2, rtol=3e-2)
        torch.testing.assert_close(res.double(), ref[1], atol=3e-2, rtol=3e-2)


# ============================================================================ `m3fuse env` vs the patches
ENVS = "vllm/envs.py"
ENV_ARMS = ("fused", "control", "off")


@pytest.fixture
def patched_release(vllm_tree):
    """A real release tree (with its vllm/envs.py) patched by the real CLI, and the pinned
    AITER's dist-info next to vllm/ (all `m3fuse env` reads of AITER)."""
    def make(version: str):
        root = vllm_tree(version)
        with zipfile.ZipFile(realvllm.wheel_path(version)) as zf:
            (root / ENVS).write_bytes(zf.read(ENVS))
        r = run_cli("install", "--no-wheels", "--vllm-root", str(root))
        assert r.returncode == 0, r.stdout + r.stderr
        d = root / f"amd_aiter-{PINNED}.dist-info"
        d.mkdir()
        (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: amd-aiter\nVersion: {PINNED}\n\n")
        return root
    return make


def setup_from_env(env: dict[str, str]) -> Setup:
    """The world `m3fuse env` describes: its mode and AITER switches, the pinned AITER's
    CustomAllreduce (no gemma_norm), TP 8. A switch the release does not define (0.24.0 has no
    VLLM_ROCM_USE_AITER_CUSTOM_AR) keeps vLLM's default (on)."""
    return Setup(mode=env[MODE_ENV], tp=8, ca_cls=FakeAiterCA,
                 aiter_enabled=env["VLLM_ROCM_USE_AITER"] == "1",
                 custom_ar=env.get(CUSTOM_AR, "1") == "1")


@all_rows
def test_every_arm_env_recommends_constructs_and_runs(patched_release, aiter, monkeypatch, fs):
    """For each arm, the real `m3fuse env ARM --format json` on the row's patched real release
    tree; the patched files the CLI installed there, in the world those settings make: the
    patched MiniMaxM3Model constructs on 8 ranks and its forward runs (a batch small enough
    for vLLM's one-stage branch). For `off` on 0.30+, the same world without env's
    VLLM_ROCM_USE_AITER_CUSTOM_AR=0 is refused: the setting is what makes it run."""
    root = patched_release(fs.version)
    helper_src = (root / realvllm.HELPER).read_text()
    model_src = (root / realvllm.MODEL).read_text()
    assert helper_src == fh.committed_patched_text(fs, realvllm.HELPER)  # the set the matrix checks
    assert model_src == fh.committed_patched_text(fs, realvllm.MODEL)
    for arm in ENV_ARMS:
        r = run_cli("env", arm, "--format", "json", "--vllm-root", str(root))
        assert r.returncode == 0, (arm, r.stdout, r.stderr)
        out = json.loads(r.stdout)
        assert out["arm"] == arm and out["set"] == fs.name and out["aiter_version"] == PINNED
        env = out["env"]
        aiter(out["aiter_version"])
        s = setup_from_env(env)
        assert s.mode == arm and s.aiter_enabled
        # the fusion matrix runs each arm in this world too
        assert fh.arm_world(fs, arm) == ({} if s.custom_ar else {"aiter_custom_ar_env": False})
        if fs.upstream_aiter_branch and arm == "off":
            assert env[CUSTOM_AR] == "0"
            with pytest.raises(RuntimeError, match="Set VLLM_ROCM_USE_AITER_CUSTOM_AR=0 as well"):
                construct(fs, replace(s, custom_ar=True), monkeypatch,
                          helper_source=helper_src, model_source=model_src)
        with built(fs, s, monkeypatch, helper_source=helper_src, model_source=model_src) as b:
            assert [m.defer_ffn_all_reduce for m in b.models] == [arm != "off"] * 8
            world = b.world

            def rank(r):
                model = fh.build_model(world, fh.ToyConfig())
                return fh.run_forward(world, model, _embeds(fh.ToyConfig().hidden_size), fs)

            outs = b.tp.run(rank)
            for o in outs:
                assert torch.isfinite(o.float()).all()
                assert torch.equal(o, outs[0])  # every rank ends with the reduced hidden states
            fused_calls = len(b.stage.ca.calls) if b.stage.ca is not None else 0
            assert (fused_calls > 0) is (arm == "fused")  # only fused runs AITER's fused kernel
            assert not b.stage.upstream_op_calls  # vLLM's one-stage op never runs
        # The same arm with a torch.compiled EAGLE3 draft under the AR+RMS pass (vLLM's default):
        # env's settings leave the pass an AITER communicator in every arm but off on 0.30+
        # (CUSTOM_AR=0), so the pinned AITER is refused there, naming the --compilation-config
        # that works (env prints environment variables only: it cannot carry that flag).
        drafted = replace(s, draft=EAGLE3)
        if arm == "off" and fs.upstream_aiter_branch:
            construct(fs, drafted, monkeypatch, helper_source=helper_src, model_source=model_src)
        else:
            with pytest.raises(RuntimeError, match="RocmAiterAllReduceFusionPass") as info:
                construct(fs, drafted, monkeypatch, helper_source=helper_src, model_source=model_src)
            (js,) = re.findall(r"--compilation-config '(\{.*?\}\})'", str(info.value))
            assert json.loads(js) == PASS_OFF_JSON
            construct(fs, replace(drafted, fuse_ar_rms=False), monkeypatch,
                      helper_source=helper_src, model_source=model_src)


# AITERs before and after gemma_norm (0.1.17, ROCm/aiter#3792) and #4346 (0.1.19.post1).
AITER_GENERATIONS = [(PINNED, FakeAiterCA), ("0.1.17", FakeAiterCAGemma), ("0.1.18", FakeAiterCAGemma),
                     ("0.1.19.post1", FakeAiterCAGemma)]


@upstream_rows
def test_env_turns_custom_ar_off_exactly_where_the_patch_refuses_off(patched_release, aiter, monkeypatch, fs):
    """On 0.30+, for each AITER generation: `m3fuse env off` prints
    VLLM_ROCM_USE_AITER_CUSTOM_AR=0 iff the patched model refuses off with the AITER custom
    all-reduce on, and with env's settings it constructs."""
    root = patched_release(fs.version)
    dist = root / f"amd_aiter-{PINNED}.dist-info"
    decided = {}
    for version, ca_cls in AITER_GENERATIONS:
        dist = dist.rename(root / f"amd_aiter-{version}.dist-info")
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: amd-aiter\nVersion: {version}\n\n")
        r = run_cli("env", "off", "--format", "json", "--vllm-root", str(root))
        assert r.returncode == 0, r.stdout + r.stderr
        out = json.loads(r.stdout)
        assert out["aiter_version"] == version
        aiter(version)
        s = replace(setup_from_env(out["env"]), ca_cls=ca_cls)
        try:
            construct(fs, replace(s, custom_ar=True), monkeypatch)
            refused = False
        except RuntimeError as exc:
            assert "M3_AITER_AR_RMS_MODE=off runs vLLM's unpatched helper" in str(exc)
            refused = True
        assert (out["env"][CUSTOM_AR] == "0") is refused, version
        # where off keeps AITER's custom all-reduce, env says what runs then (issue 23)
        assert (OFF_ONE_STAGE_NOTE in out["notes"]) is (not refused), (version, out["notes"])
        construct(fs, s, monkeypatch)
        decided[version] = refused
    assert decided == {PINNED: True, "0.1.17": True, "0.1.18": True, "0.1.19.post1": False}


@all_rows
def test_env_prints_the_one_stage_arm_exactly_where_the_patched_model_takes_it(patched_release, aiter,
                                                                             monkeypatch, fs):
    """`m3fuse env fused-1stage` (issue 23, item 5) for each AITER generation and a modern one:
    it prints settings iff the patched model accepts the arm at construction (vLLM 0.30+ and
    ROCm/aiter#4346); where it prints, the model constructs with them on 8 ranks and its forward
    runs AITER's one-stage kernel for an 8-token batch; where it refuses (exit 3 or 5, nothing
    printed), the model refuses the arm too, naming it."""
    root = patched_release(fs.version)
    dist = root / f"amd_aiter-{PINNED}.dist-info"
    printed = {}
    for version, ca_cls in AITER_GENERATIONS + [("0.1.21.post2", FakeAiterCAGemma)]:
        dist = dist.rename(root / f"amd_aiter-{version}.dist-info")
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: amd-aiter\nVersion: {version}\n\n")
        r = run_cli("env", "fused-1stage", "--format", "json", "--vllm-root", str(root))
        aiter(version)
        printed[version] = r.returncode == 0
        if r.returncode:
            assert r.returncode in (3, 5) and json.loads(r.stdout)["ok"] is False, r.stdout
            s = Setup(mode="fused-1stage", tp=8, ca_cls=ca_cls)
            with pytest.raises(RuntimeError, match="M3_AITER_AR_RMS_MODE=fused-1stage: "):
                construct(fs, s, monkeypatch)
            continue
        s = replace(setup_from_env(json.loads(r.stdout)["env"]), ca_cls=ca_cls)
        assert s.mode == "fused-1stage" and s.custom_ar
        with built(fs, s, monkeypatch) as b:
            world = b.world
            outs = b.tp.run(lambda r: fh.run_forward(world, fh.build_model(world, fh.ToyConfig()),
                                                     _embeds(fh.ToyConfig().hidden_size), fs))
            assert all(torch.equal(o, outs[0]) for o in outs)
            stages = {c["use_1stage"] for c in b.stage.ca.calls}
            assert stages == {True} and not b.stage.upstream_op_calls
    modern = {v: fs.upstream_aiter_branch for v in ("0.1.19.post1", "0.1.21.post2")}
    assert printed == {PINNED: False, "0.1.17": False, "0.1.18": False, **modern}


def _embeds(h: int, tokens: int = 8, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.randn(tokens, h, generator=torch.Generator().manual_seed(42)).to(dtype)
