"""Issue 12, run time, on the three shipped sets' patched code (CPU stand-ins, real release files).

What the patched `MiniMaxM3Model.__init__` does before any graph capture:
- refuses what cannot run here (`m3_check_runtime`): a Ray worker whose mode may not be the
  driver's; `off` where vLLM 0.30+'s own one-stage AITER branch cannot run on the installed
  AITER; a torch.compiled draft model under vLLM's AR+RMS compile pass on such an AITER;
- names what runs (`m3_report_run`): one log line per process, a warning per known AITER
  defect, and the `M3FUSE_RUN_RECORD` JSON from rank 0.

The 0.24.0/0.26.0 models are the real classes from `tests/fusion_harness.py`; for 0.33.0 the real
`MiniMaxM3Model` (and `EagleModelMixin`) is compiled from the patched file over stand-in decoder
layers. The installed AITER is a real distribution (a `amd_aiter-X.dist-info` on `sys.path`, read
by `importlib.metadata`) plus a stand-in `CustomAllreduce` with the pinned (no `gemma_norm`) or a
later `custom_fused_ar_rms` signature.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import json
import logging
import re
import sys
import types
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import torch

import fusion_harness as fh
import fusion_harness_033 as fh33
import realvllm
from fusion_standins import (
    M3_MODULE,
    FakeAiterCA,
    FakeAiterCAGemma,
    FakeAiterCANoStage,
    FakeAiterWrapper,
    M3Norm,
    SimTP,
    compile_nodes,
    rms_ref,
    standin_logger_module,
    top_level,
)

SET_NAMES = ["vllm-0.24.0", "vllm-0.26.0", "vllm-0.33.0"]
FS = {fs.name: fs for fs in fh.SETS}
FS["vllm-0.33.0"] = fh.FusionSet("vllm-0.33.0", "0.33.0", "wrapper", has_pp=True)
MODE_ENV = "M3_AITER_AR_RMS_MODE"
PINNED = "0.1.15.post1+rocm7.2.manylinux.2.28"  # wheels.lock: has neither #3514 nor #4346
FIXED = "0.1.21.post2"  # the AITER vLLM 0.33.0's sources name: both fixes, gemma_norm
LOGGER_PREFIX = "m3_helper_under_test"  # the stand-in helper module's __name__


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
    enable_sp: bool = False
    specialized: bool = False  # 0.33.0 specialized ("monokernel") decode configured
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class ToyConfig(fh.ToyConfig):
    num_key_value_heads: int = 4


def vllm_config(s: Setup) -> types.SimpleNamespace:
    pc = types.SimpleNamespace(
        tensor_parallel_size=s.tp, pipeline_parallel_size=s.pp, data_parallel_size=s.dp,
        data_parallel_rank=s.dp_rank, use_sequence_parallel_moe=False,
        distributed_executor_backend=s.executor, data_parallel_backend=s.dp_backend)
    cc = types.SimpleNamespace(mode=s.compile_mode, pass_config=types.SimpleNamespace(
        enable_sp=s.enable_sp, fuse_allreduce_rms=s.fuse_ar_rms))
    spec = None if s.draft is None else types.SimpleNamespace(
        method=s.spec_method, draft_model_config=types.SimpleNamespace(architectures=list(s.draft)))
    return types.SimpleNamespace(
        model_config=types.SimpleNamespace(hf_text_config=ToyConfig()), cache_config=None,
        quant_config=None, parallel_config=pc, compilation_config=cc, speculative_config=spec,
        use_v2_model_runner=False, m3_specialized=object() if s.specialized else None)


@dataclass
class Built:
    models: list
    helper: types.ModuleType
    tp: SimTP
    stage: Any


def _stage_033(s: Setup, tp: SimTP) -> fh33.Stage:
    # cuda_communicator.py:77-81,150-155 (0.33.0): the TP communicator builds aiter_ar_comm only
    # with custom all-reduce allowed, AITER's custom all-reduce enabled and world size > 1.
    has = s.custom_all_reduce and s.aiter_enabled and s.custom_ar and tp.world > 1
    return fh33.Stage(tp=tp, aiter_enabled=s.aiter_enabled, aiter_custom_ar_env=s.custom_ar,
                      custom_all_reduce=s.custom_all_reduce, pp_rank=s.pp_rank, op_calls_aiter=True,
                      wrappers=[FakeAiterWrapper(s.ca_cls(tp)) for _ in range(tp.world)] if has else None)


def _classes_033(helper, tp: SimTP, source: str) -> dict:
    tree = ast.parse(source)
    iface = ast.parse(realvllm.read_member("0.33.0", fh.INTERFACES).decode())

    class Layer(torch.nn.Module):
        """Stand-in decoder layer: keeps what MiniMaxM3Model hands it."""

        def __init__(self, config, prefix, defer_ffn_all_reduce=False, **kw):
            super().__init__()
            self.defer_ffn_all_reduce = defer_ffn_all_reduce

    def make_layers(num, layer_fn, prefix=""):
        return 0, num, torch.nn.ModuleList([layer_fn(f"{prefix}.{i}") for i in range(num)])

    g: dict[str, Any] = {
        "__name__": M3_MODULE, "torch": torch, "nn": torch.nn,
        "specialized_decode_config": lambda vc: vc.m3_specialized,
        "get_pp_group": lambda: types.SimpleNamespace(is_first_rank=True, is_last_rank=True),
        "spec_decode_needs_target_embed": lambda *a, **k: False,
        "VocabParallelEmbedding": lambda *a, **k: torch.nn.Identity(),
        "PPMissingLayer": torch.nn.Identity, "make_layers": make_layers,
        "MiniMaxM3DecoderLayer": Layer, "MiniMaxM3MoE": None, "MiniMAXGemmaRMSNorm": M3Norm,
        "is_model_fused_shared_expert_compatible": lambda *a: False,
        "make_empty_intermediate_tensors_factory": lambda *a, **k: None,
        "get_tensor_model_parallel_world_size": lambda: tp.world,
    }
    for name in ("fused_allreduce_gemma_rms_norm", "initialize_m3_aiter_allreduce", "m3_aiter_ar_rms_mode",
                 "m3_defer_ffn_all_reduce", "m3_check_runtime", "m3_off_fallback", "m3_report_run"):
        g[name] = getattr(helper, name)
    compile_nodes([top_level(iface, "EagleModelMixin")], g, "<0.33.0>/interfaces.py")
    compile_nodes([top_level(tree, "MiniMaxM3Model")], g, "<vllm-0.33.0>/model.py")
    return g


@contextlib.contextmanager
def built(name: str, s: Setup, monkeypatch, *, model_source: str | None = None, build: int = 1):
    """Construct the patched MiniMaxM3Model on every TP rank (`build` times each) in a stand-in
    world for set `name`; yields while the world is up. Construction errors propagate."""
    fs = FS[name]
    for k, v in s.env.items():
        monkeypatch.setenv(k, v)
    source = model_source if model_source is not None else fh.patched_text(fs, realvllm.MODEL)
    tp = SimTP(s.tp)
    cfg = vllm_config(s)
    if name == "vllm-0.33.0":
        if s.mode is None:
            monkeypatch.delenv(MODE_ENV, raising=False)
        else:
            monkeypatch.setenv(MODE_ENV, s.mode)
        stage = _stage_033(s, tp)
        with fh33.staged(stage):
            helper = fh33.load_helper(fh.patched_text(fs, realvllm.HELPER))
            cls = _classes_033(helper, tp, source)["MiniMaxM3Model"]
            models = tp.run(lambda r: [cls(vllm_config=cfg, prefix="model") for _ in range(build)][-1])
            yield Built(models, helper, tp, stage)
        return
    with fh.Stage(fs, tp, mode=s.mode, aiter_enabled=s.aiter_enabled, aiter_custom_ar_env=s.custom_ar,
                  custom_all_reduce=s.custom_all_reduce, pp=s.pp, dp=s.dp, pp_rank=s.pp_rank,
                  enable_sp=s.enable_sp, ca_factory=lambda t: s.ca_cls(t, sum_dtype=torch.float32)) as st:
        w = fh.load_model(fs, st, model_source=source)
        cls = w.classes["MiniMaxM3Model"]
        models = tp.run(lambda r: [cls(vllm_config=cfg, prefix="model") for _ in range(build)][-1])
        yield Built(models, w.helper, tp, st)


def construct(name: str, s: Setup, monkeypatch, **kw) -> list:
    with built(name, s, monkeypatch, **kw) as b:
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


# ============================================================================ `off` on 0.33.0
def test_off_on_033_with_the_pinned_aiter_is_refused_at_construction(aiter, monkeypatch):
    aiter(PINNED)
    s = Setup(mode="off", tp=8, ca_cls=FakeAiterCA)
    with pytest.raises(RuntimeError) as info:
        construct("vllm-0.33.0", s, monkeypatch)
    msg = str(info.value)
    assert "gemma_norm" in msg and "custom_fused_ar_rms" in msg
    assert "_can_use_aiter_fused_ar_rms" in msg
    assert "Set VLLM_ROCM_USE_AITER_CUSTOM_AR=0 as well" in msg


def test_without_the_check_off_on_033_fails_at_the_first_small_batch(aiter, monkeypatch):
    """What the refusal prevents, on the same stand-ins: the unpatched branch hands the pinned
    signature gemma_norm= (the real op: _aiter_ops.py:1259-1266) -> TypeError; a large batch
    (two-stage territory, not the branch) still runs."""
    aiter(PINNED)
    source = fh.patched_text(FS["vllm-0.33.0"], realvllm.MODEL)
    line = "        m3_check_runtime(vllm_config)\n"
    assert source.count(line) == 1
    s = Setup(mode="off", tp=8, ca_cls=FakeAiterCA)
    with built("vllm-0.33.0", s, monkeypatch, model_source=source.replace(line, "")) as b:
        parts, residual, norms, ref = _case(8, 200)
        outs = b.tp.run(lambda r: b.helper.fused_allreduce_gemma_rms_norm(parts[r], residual.clone(), norms[r]))
        _assert_ref(outs, ref)
        parts, residual, norms, _ = _case(8, 4)
        with pytest.raises(TypeError, match="gemma_norm"):
            b.tp.run(lambda r: b.helper.fused_allreduce_gemma_rms_norm(parts[r], residual.clone(), norms[r]))


@pytest.mark.parametrize("tokens", [1, 10, 200])
def test_off_on_033_with_custom_ar_off_constructs_and_runs(aiter, monkeypatch, tokens):
    aiter(PINNED)
    s = Setup(mode="off", tp=8, ca_cls=FakeAiterCA, custom_ar=False)
    with built("vllm-0.33.0", s, monkeypatch) as b:
        assert all(m.defer_ffn_all_reduce is False for m in b.models)
        parts, residual, norms, ref = _case(8, tokens)
        outs = b.tp.run(lambda r: b.helper.fused_allreduce_gemma_rms_norm(parts[r], residual.clone(), norms[r]))
        _assert_ref(outs, ref)
        assert not b.stage.upstream_op_calls and b.tp.all_reduce_calls == 1


def test_off_on_033_with_a_gemma_aiter_before_4346_is_refused(aiter, monkeypatch):
    aiter("0.1.18")
    with pytest.raises(RuntimeError, match=r"ROCm/aiter#4346") as info:
        construct("vllm-0.33.0", Setup(mode="off", tp=4, ca_cls=FakeAiterCAGemma), monkeypatch)
    assert "gemma_norm= to the installed" not in str(info.value)


def test_off_on_033_with_a_fixed_aiter_runs_vllms_own_branch(aiter, monkeypatch):
    aiter("0.1.19.post1")
    with built("vllm-0.33.0", Setup(mode="off", tp=4, ca_cls=FakeAiterCAGemma), monkeypatch) as b:
        parts, residual, norms, ref = _case(4, 8)
        outs = b.tp.run(lambda r: b.helper.fused_allreduce_gemma_rms_norm(parts[r], residual.clone(), norms[r]))
        _assert_ref(outs, ref)
        assert [c["gemma_norm"] for c in b.stage.upstream_op_calls] == [True] * 4


@pytest.mark.parametrize("name", ["vllm-0.24.0", "vllm-0.26.0"])
def test_off_before_030_has_no_upstream_branch_and_constructs(aiter, monkeypatch, name):
    aiter(PINNED)
    models = construct(name, Setup(mode="off", tp=8, ca_cls=FakeAiterCA), monkeypatch)
    assert all(m.defer_ffn_all_reduce is False for m in models)


@pytest.mark.parametrize("version,expected", [("0.24.0", False), ("0.26.0", False), ("0.33.0", True)])
def test_gemma_norm_proxy_matches_the_release(version, expected):
    """The patched helper decides "vLLM forwards gemma_norm to AITER" from the helper's own
    `_can_use_aiter_fused_ar_rms`; in the real releases both arrive together."""
    helper = realvllm.read_member(version, realvllm.HELPER).decode()
    ops = realvllm.read_member(version, "vllm/_aiter_ops.py").decode()
    call = re.search(r"ca\.custom_fused_ar_rms\((.*?)\)\n", ops, re.S)
    forwards = bool(call) and "gemma_norm=gemma_norm" in call.group(1)
    assert ("def _can_use_aiter_fused_ar_rms" in helper) is expected
    assert forwards is expected


def test_custom_ar_off_keeps_033_off_the_upstream_branch():
    """VLLM_ROCM_USE_AITER_CUSTOM_AR=0: is_custom_all_reduce_enabled() is False, so the helper's
    branch returns False and the TP communicator builds vLLM's own custom all-reduce."""
    helper = realvllm.read_member("0.33.0", realvllm.HELPER).decode().splitlines()
    assert helper[119:121] == ["    if not rocm_aiter_ops.is_custom_all_reduce_enabled():",
                               "        return False"]  # fused_allreduce_gemma_rms_norm.py:120-121
    ops = realvllm.read_member("0.33.0", "vllm/_aiter_ops.py").decode().splitlines()
    assert ops[2203].strip() == "_CUSTOM_ALL_REDUCE_ENABLED = envs.VLLM_ROCM_USE_AITER_CUSTOM_AR"
    assert ops[2442].strip() == "return cls._AITER_ENABLED and cls._CUSTOM_ALL_REDUCE_ENABLED"
    comm = realvllm.read_member("0.33.0", "vllm/distributed/device_communicators/cuda_communicator.py").decode()
    assert "and bool(rocm_aiter_ops.is_custom_all_reduce_enabled())" in comm
    assert "if use_custom_allreduce and self.aiter_ar_comm is None and self.world_size > 1:" in comm


# ============================================================================ compile pass
EAGLE3 = ("Eagle3LlamaForCausalLM",)
PASS_OFF_JSON = {"pass_config": {"fuse_allreduce_rms": False}}


@pytest.mark.parametrize("name,version,ca_cls,refused", [
    ("vllm-0.33.0", PINNED, FakeAiterCA, "gemma_norm= to the installed"),
    ("vllm-0.33.0", "0.1.18", FakeAiterCAGemma, "ROCm/aiter#4346"),
    ("vllm-0.33.0", FIXED, FakeAiterCAGemma, None),
    ("vllm-0.26.0", PINNED, FakeAiterCA, "ROCm/aiter#4346"),
    ("vllm-0.26.0", "0.1.19.post1", FakeAiterCA, None),
    ("vllm-0.26.0", None, FakeAiterCA, None),  # version unknown: no guess
    ("vllm-0.24.0", PINNED, FakeAiterCA, "ROCm/aiter#4346"),
    ("vllm-0.24.0", FIXED, FakeAiterCA, None),
])
@pytest.mark.parametrize("mode", ["fused", "control", "off"])
def test_compiled_draft_under_the_ar_rms_pass(aiter, monkeypatch, name, version, ca_cls, refused, mode):
    aiter(version)
    s = Setup(mode=mode, tp=4, ca_cls=ca_cls, draft=EAGLE3,
              custom_ar=not (name == "vllm-0.33.0" and mode == "off" and refused is not None))
    if refused is None:
        construct(name, s, monkeypatch)
        return
    if name == "vllm-0.33.0" and mode == "off":
        # off itself needs CUSTOM_AR=0 with this AITER; then the pass has no communicator
        # (allreduce_rms_fusion.py:1585-1592 disables itself), and it is harmless.
        construct(name, s, monkeypatch)
        return
    with pytest.raises(RuntimeError, match=re.escape(refused)) as info:
        construct(name, s, monkeypatch)
    msg = str(info.value)
    assert "RocmAiterAllReduceFusionPass" in msg and "Eagle3LlamaForCausalLM" in msg
    (js,) = re.findall(r"--compilation-config '(\{.*?\}\})'", msg)
    assert json.loads(js) == PASS_OFF_JSON
    construct(name, replace(s, fuse_ar_rms=False), monkeypatch)  # the named fix works


@pytest.mark.parametrize("name", SET_NAMES)
@pytest.mark.parametrize("change", [
    dict(draft=("MiniMaxM3MTP",)),  # amd/mtp.py: no @support_torch_compile
    dict(draft=None), dict(compile_mode=0), dict(fuse_ar_rms=False), dict(tp=1), dict(aiter_enabled=False),
], ids=["m3-mtp", "no-draft", "eager", "pass-off", "tp1", "no-aiter"])
def test_the_pass_check_is_quiet_where_the_pass_does_not_run(aiter, monkeypatch, name, change):
    aiter(PINNED)
    mode = "control" if change.get("aiter_enabled") is False else "fused"
    construct(name, Setup(mode=mode, ca_cls=FakeAiterCA, **{"tp": 4, "draft": EAGLE3, **change}), monkeypatch)


@pytest.mark.parametrize("name", SET_NAMES)
@pytest.mark.parametrize("method,refused", [("ngram", False), ("suffix", False), ("draft_model", True)])
def test_methods_without_a_draft_network_are_not_refused(aiter, monkeypatch, name, method, refused):
    """ngram/suffix/custom_class/extract_hidden_states get the target's model config as
    draft_model_config (config/speculative.py, 0.33.0 :1297-1373) and load no draft network."""
    aiter(PINNED)
    s = Setup(mode="control", tp=4, ca_cls=FakeAiterCA, draft=("MiniMaxM3ForCausalLM",), spec_method=method)
    if not refused:
        construct(name, s, monkeypatch)
        return
    with pytest.raises(RuntimeError, match="RocmAiterAllReduceFusionPass"):
        construct(name, s, monkeypatch)


def test_024_pass_needs_vllms_custom_all_reduce(aiter, monkeypatch):
    """0.24.0's pass returns early without vLLM's ca_comm (allreduce_rms_fusion.py:1476-1484)."""
    aiter(PINNED)
    construct("vllm-0.24.0", Setup(mode="control", tp=4, ca_cls=FakeAiterCA, draft=EAGLE3,
                                   custom_all_reduce=False), monkeypatch)


@pytest.mark.parametrize("version", ["0.24.0", "0.26.0", "0.33.0"])
def test_the_pass_off_setting_exists_in_the_release(version):
    """The JSON the refusal names: the field, the pass it gates, and that a user's False is
    kept by the optimisation-level defaults (they fill None only)."""
    comp = realvllm.read_member(version, "vllm/config/compilation.py").decode()
    pass_cls = comp[comp.index("class PassConfig"):comp.index("class CompilationConfig")]
    assert "    fuse_allreduce_rms: bool = None" in pass_cls
    pm = realvllm.read_member(version, "vllm/compilation/passes/pass_manager.py").decode()
    assert re.search(r"if self\.pass_config\.fuse_allreduce_rms:\n\s+if rocm_aiter_ops\.is_enabled\(\):\n"
                     r"\s+self\.passes \+= \[RocmAiterAllReduceFusionPass\(config\)\]", pm)
    vc = realvllm.read_member(version, "vllm/config/vllm.py").decode()
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
    ("SP control", Setup(mode="control", ca_cls=FakeAiterCA, enable_sp=True)),
    ("SP fused", Setup(mode=None, ca_cls=FakeAiterCA, enable_sp=True)),
    ("off", Setup(mode="off", ca_cls=FakeAiterCA)),
    ("compiled draft", Setup(mode="control", ca_cls=FakeAiterCA, draft=EAGLE3)),
    ("ray", Setup(mode="control", ca_cls=FakeAiterCA, executor="ray")),
    ("ray dp", Setup(mode="control", ca_cls=FakeAiterCA, dp=2, dp_backend="ray")),
]
# What a set does not refuse: 0.24/0.26 have no upstream AITER branch for `off`; 0.24.0 creates
# the AITER communicator itself (rocm_aiter_ops.initialize_aiter_allreduce), whatever
# VLLM_ROCM_USE_AITER_CUSTOM_AR or --disable-custom-all-reduce say.
NOT_REFUSED = {("off", "vllm-0.24.0"), ("off", "vllm-0.26.0"), ("custom AR env off", "vllm-0.24.0"),
               ("custom AR disabled", "vllm-0.24.0")}


@pytest.mark.parametrize("name", SET_NAMES)
@pytest.mark.parametrize("label,setup", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_every_fallback_a_message_names_constructs(aiter, monkeypatch, name, label, setup):
    aiter(PINNED)
    s = replace(setup, tp=4)
    try:
        construct(name, s, monkeypatch)
    except (RuntimeError, ValueError) as exc:
        msg = str(exc)
    else:
        assert (label, name) in NOT_REFUSED
        return
    assert (label, name) not in NOT_REFUSED
    fixes = offered(msg, s.mode)
    assert fixes, msg
    for fix in fixes:
        fix = dict(fix)
        version = fix.pop("aiter_version", None)
        if version is not None:
            aiter(version)
        env = {**s.env, **fix.pop("env", {})}
        fixed = replace(s, env=env, **fix)
        if fixed.enable_sp and fixed.mode != "off":
            continue  # "turn sequence parallelism off" is the other half of that message
        construct(name, fixed, monkeypatch)  # must not raise
        if version is not None:
            aiter(PINNED)


def test_plain_off_is_not_offered_where_it_fails(aiter, monkeypatch):
    """0.33.0, pinned AITER, AITER custom all-reduce on: an error that suggests falling back to
    off names CUSTOM_AR=0 with it, and off alone would indeed be refused."""
    aiter(PINNED)
    s = Setup(mode="control", tp=4, ca_cls=FakeAiterCA, enable_sp=True)
    with pytest.raises(ValueError) as info:
        construct("vllm-0.33.0", s, monkeypatch)
    assert "set M3_AITER_AR_RMS_MODE=off with VLLM_ROCM_USE_AITER_CUSTOM_AR=0." in str(info.value)
    with pytest.raises(RuntimeError, match="gemma_norm"):
        construct("vllm-0.33.0", replace(s, mode="off"), monkeypatch)


@pytest.mark.parametrize("name", SET_NAMES)
def test_every_model_error_names_the_computed_fallback(name):
    """The model-side refusals (MoE that reduces itself, specialized decode) name
    m3_off_fallback(), never a hard-coded `off`."""
    text = fh.patched_text(FS[name], realvllm.MODEL)
    assert "M3_AITER_AR_RMS_MODE=off" not in text
    assert text.count("{m3_off_fallback()}") == {"vllm-0.24.0": 3, "vllm-0.26.0": 2, "vllm-0.33.0": 3}[name]
    helper = fh.patched_text(FS[name], realvllm.HELPER)
    assert not re.search(r"=off\.[\"']", helper)


@pytest.mark.parametrize("mode", ["control", "off"])
@pytest.mark.parametrize("name", SET_NAMES)
def test_the_3514_warnings_advice_constructs(aiter, monkeypatch, name, mode):
    """The #3514 warning offers VLLM_ROCM_USE_AITER_CUSTOM_AR=0 for control/off."""
    aiter(PINNED)
    construct(name, Setup(mode=mode, tp=8, ca_cls=FakeAiterCA, custom_ar=False), monkeypatch)


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


@pytest.mark.parametrize("topo", list(TOPOLOGIES))
@pytest.mark.parametrize("mode", ["fused", "control", "off", None], ids=["fused", "control", "off", "unset"])
@pytest.mark.parametrize("name", SET_NAMES)
def test_log_line_and_record_name_what_runs(aiter, monkeypatch, caplog, tmp_path, name, mode, topo):
    aiter(FIXED)
    record = tmp_path / "run" / "record.json"
    record.parent.mkdir()
    s = Setup(mode=mode, env={"M3FUSE_RUN_RECORD": str(record)}, **TOPOLOGIES[topo])
    caplog.set_level(logging.INFO)
    models = construct(name, s, monkeypatch)
    defer, why, path = expected(mode, s.tp, s.pp, s.dp)
    assert [m.defer_ffn_all_reduce for m in models] == [defer] * s.tp  # what the model does
    lines = m3_lines(caplog)
    assert len(lines) == s.tp  # one per rank-process
    want = (f"m3fuse set {name}: mode {mode or 'fused'}{'' if mode else ' (default)'}; "
            f"deferral {'on' if defer else 'off'} ({why}); AITER fused path {path}; AITER {FIXED}")
    assert lines == [want] * s.tp
    assert not m3_lines(caplog, logging.WARNING)  # a fixed AITER: no defect warning
    got = json.loads(record.read_text())
    assert {k: got[k] for k in ("set", "mode", "mode_env", "deferral", "deferral_reason", "aiter_fused_path",
                                "aiter_fused_ready", "aiter_version", "aiter_defects", "tp", "pp", "dp", "rank")} == {
        "set": name, "mode": mode or "fused", "mode_env": mode, "deferral": defer, "deferral_reason": why,
        "aiter_fused_path": path, "aiter_fused_ready": path == "ready", "aiter_version": FIXED,
        "aiter_defects": [], "tp": s.tp, "pp": s.pp, "dp": s.dp, "rank": {"tp": 0, "pp": 0, "dp": 0}}
    assert sorted(p.name for p in record.parent.iterdir()) == ["record.json"]  # no temp file left


@pytest.mark.parametrize("name", SET_NAMES)
@pytest.mark.parametrize("where", [dict(tp=2, pp=2, pp_rank=1), dict(tp=2, dp=2, dp_rank=1)], ids=["pp-rank-1", "dp-rank-1"])
def test_only_rank_0_writes_the_record(aiter, monkeypatch, caplog, tmp_path, name, where):
    aiter(FIXED)
    record = tmp_path / "record.json"
    caplog.set_level(logging.INFO)
    construct(name, Setup(mode="control", env={"M3FUSE_RUN_RECORD": str(record)}, **where), monkeypatch)
    assert not record.exists()
    assert len(m3_lines(caplog)) == 2  # every rank still logs


@pytest.mark.parametrize("name", SET_NAMES)
def test_once_per_process_and_the_record_is_replaced(aiter, monkeypatch, caplog, tmp_path, name):
    aiter(FIXED)
    record = tmp_path / "record.json"
    record.write_text("stale\n")
    caplog.set_level(logging.INFO)
    construct(name, Setup(mode="control", tp=4, env={"M3FUSE_RUN_RECORD": str(record)}), monkeypatch, build=2)
    assert len(m3_lines(caplog)) == 4
    assert json.loads(record.read_text())["mode"] == "control"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".m3fuse")) == []


@pytest.mark.parametrize("name", SET_NAMES)
def test_an_unwritable_record_path_is_refused(aiter, monkeypatch, tmp_path, name):
    aiter(FIXED)
    bad = tmp_path / "missing-dir" / "record.json"
    with pytest.raises(RuntimeError, match=r"M3FUSE_RUN_RECORD=.*missing-dir.*unset it"):
        construct(name, Setup(mode="off", tp=2, env={"M3FUSE_RUN_RECORD": str(bad)}), monkeypatch)
    assert not bad.parent.exists()


def test_specialized_decode_is_named_as_the_reason(aiter, monkeypatch, caplog):
    aiter(FIXED)
    caplog.set_level(logging.INFO)
    models = construct("vllm-0.33.0", Setup(mode="control", tp=4, specialized=True), monkeypatch)
    assert all(m.defer_ffn_all_reduce is False for m in models)
    assert all("deferral off (specialized decode)" in line for line in m3_lines(caplog))


@pytest.mark.parametrize("name", SET_NAMES)
def test_the_set_line_is_one_top_level_line_naming_the_set(name):
    text = fh.patched_text(FS[name], realvllm.HELPER)
    assert re.findall(r"^M3FUSE_SET = .*$", text, re.M) == [f'M3FUSE_SET = "{name}"']
    assert "M3FUSE_SET" not in fh.pristine_text(FS[name], realvllm.HELPER)
    assert fh.manifest(FS[name])["name"] == name


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
def test_defect_table(monkeypatch, version, defects):
    with fh33.staged(fh33.Stage(tp=SimTP(1))):
        helper = fh33.load_helper(fh.patched_text(FS["vllm-0.33.0"], realvllm.HELPER))
    assert helper.m3_aiter_defects(version) == defects
    assert [d for d, _, _ in helper.M3_AITER_DEFECTS] == ["ROCm/aiter#3514", "ROCm/aiter#4346"]
    assert dict((d, fixed) for d, fixed, _ in helper.M3_AITER_DEFECTS) == {
        "ROCm/aiter#3514": "0.1.16", "ROCm/aiter#4346": "0.1.19.post1"}


@pytest.mark.parametrize("name", SET_NAMES)
@pytest.mark.parametrize("version", [PINNED, "0.1.16", "0.1.19.post1", None])
def test_defect_warning_at_construction(aiter, monkeypatch, caplog, name, version):
    aiter(version)
    caplog.set_level(logging.INFO)
    ca_cls = FakeAiterCAGemma if version == "0.1.19.post1" else FakeAiterCA
    construct(name, Setup(mode="control", tp=8, ca_cls=ca_cls), monkeypatch)
    warnings = m3_lines(caplog, logging.WARNING)
    info = m3_lines(caplog)
    assert all(f"AITER {version or 'not installed'}" in line for line in info) and len(info) == 8
    has_3514 = version in (PINNED,)
    has_4346 = version in (PINNED, "0.1.16")
    assert sum("has ROCm/aiter#3514 (fixed in 0.1.16)" in w for w in warnings) == (8 if has_3514 else 0)
    assert sum("has ROCm/aiter#4346 (fixed in 0.1.19.post1)" in w for w in warnings) == (8 if has_4346 else 0)
    for w in warnings:
        if "#3514" in w:
            if name == "vllm-0.24.0":  # vLLM 0.24 does plain all-reduces with its own communicator
                assert "not exposed in this process" in w
            else:  # 0.25+: the TP communicator's aiter_ar_comm takes every small all-reduce
                assert "exposed: vLLM sends every small tensor-parallel all-reduce" in w
                assert "in every M3_AITER_AR_RMS_MODE" in w
        else:
            assert "not exposed: m3fuse runs only the two-stage fused kernel" in w


@pytest.mark.parametrize("name", ["vllm-0.26.0", "vllm-0.33.0"])
def test_3514_is_not_exposed_with_custom_ar_off(aiter, monkeypatch, caplog, name):
    aiter(PINNED)
    caplog.set_level(logging.INFO)
    construct(name, Setup(mode="off", tp=2, ca_cls=FakeAiterCA, custom_ar=False), monkeypatch)
    w3514 = [w for w in m3_lines(caplog, logging.WARNING) if "#3514" in w]
    assert len(w3514) == 2 and all("not exposed in this process" in w for w in w3514)


@pytest.mark.parametrize("name", SET_NAMES)
def test_citation_names_4346_for_the_fused_kernel(name):
    text = fh.patched_text(FS[name], realvllm.HELPER)
    comment = text[text.index("    # Two-stage kernel only"):text.index("use_1stage=False,\n")]
    assert "ROCm/aiter#4346, first in 0.1.19.post1" in comment
    assert "#3514 is the plain one-stage all-reduce's" in comment
    assert "fixed later in ROCm/aiter#3514" not in text


# ============================================================================ Ray
@pytest.mark.parametrize("name", SET_NAMES)
@pytest.mark.parametrize("via", [dict(executor="ray"), dict(dp=2, dp_backend="ray")], ids=["executor", "dp-backend"])
@pytest.mark.parametrize("listing,accepted", [
    ({}, False),
    ({"VLLM_RAY_EXTRA_ENV_VARS_TO_COPY": "FOO"}, False),
    ({"VLLM_RAY_EXTRA_ENV_VARS_TO_COPY": "FOO, M3_AITER_AR_RMS_MODE"}, True),
    ({"VLLM_RAY_EXTRA_ENV_VAR_PREFIXES_TO_COPY": "M3_"}, True),
], ids=["unlisted", "other", "listed", "prefix"])
def test_ray_worker_refused_unless_the_mode_is_copied(aiter, monkeypatch, name, via, listing, accepted):
    aiter(FIXED)
    s = Setup(mode="control", tp=2, env=dict(listing), **via)
    if accepted:
        construct(name, s, monkeypatch)
        return
    with pytest.raises(RuntimeError) as info:
        construct(name, s, monkeypatch)
    msg = str(info.value)
    assert "runs under Ray" in msg and "'control'" in msg
    assert "VLLM_RAY_EXTRA_ENV_VARS_TO_COPY=M3_AITER_AR_RMS_MODE" in msg


def test_mp_executor_needs_nothing(aiter, monkeypatch):
    aiter(FIXED)
    construct("vllm-0.26.0", Setup(mode="off", tp=2, executor="mp"), monkeypatch)


@pytest.mark.parametrize("version", ["0.24.0", "0.26.0", "0.33.0"])
def test_real_ray_env_copies_the_mode_only_when_listed(version, monkeypatch, tmp_path):
    """The release's own vllm/ray/ray_env.py:get_env_vars_to_copy (the legacy Ray executor's and
    the Ray engine-core actors' list): M3_AITER_AR_RMS_MODE only when listed; the list itself is
    a VLLM_ variable, so a worker sees it."""
    src = realvllm.read_member(version, "vllm/ray/ray_env.py").decode()

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


@pytest.mark.parametrize("version", ["0.24.0", "0.26.0", "0.33.0"])
def test_ray_v2_executor_keeps_a_nodes_own_value(version):
    """RayExecutorV2 (the default "ray" backend in all three) copies the whole driver
    environment with setdefault: a value already in a node's environment wins. That is the gap
    the listing cannot close (docs/fusion.md)."""
    v2 = realvllm.read_member(version, "vllm/v1/executor/ray_executor_v2.py").decode()
    assert re.search(r"for key, value in driver_env_vars\.items\(\):\n\s+os\.environ\.setdefault\(key, value\)", v2)
    abstract = realvllm.read_member(version, "vllm/v1/executor/abstract.py").decode()
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
