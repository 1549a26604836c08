"""Issue 18's defects in the shipped sets, and the run-time inputs no test tried before.

Every test runs a set's real patched code (tests/fusion_harness.py) on every row it applies to;
each is also a killer of a planted bug in tests/test_fusion_mutations.py.

- The stale gamma: in `fused` mode the helper caches `weight + 1`; a weight update the way
  vLLM's reload writes it (the norm's `weight_loader`, else the release's own
  `default_weight_loader`, which copies through `param.data`; or `param.copy_` for a
  kernel-format reload) must reach the fused path, in place (captured graphs hold the
  cache's address).
- World sizes AITER's fused dispatcher cannot run (6) are refused at construction.
- `registered=True` needs AITER's own capture flag; context parallelism turns deferral off.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import os
import tempfile
import types
from pathlib import Path

import pytest
import torch

import realvllm
from fusion_harness import Stage, load_helper, load_model, release_bytes
from fusion_matrix import rows_where
from fusion_standins import (
    FakeAiterCA,
    FakeAiterCAGemma,
    SimTP,
    compile_functions,
    compile_nodes,
    method_node,
    top_level,
)
from test_fusion_matrix import EPS, H, assert_matches, make_inputs, new_norm, reference, run_helper

WEIGHT_UTILS = "vllm/model_executor/model_loader/weight_utils.py"
MODEL_UTILS = "vllm/model_executor/utils.py"


def rows(pred=lambda r: True):
    chosen = rows_where(pred)
    return pytest.mark.parametrize("fs", chosen, ids=[r.name for r in chosen])


all_rows = rows()


def release_default_weight_loader(fs):
    """The release's own `default_weight_loader` (weight_utils.py), compiled from its wheel."""
    tree = ast.parse(release_bytes(fs.version, WEIGHT_UTILS).decode())
    g = {"torch": torch}
    loader = top_level(tree, "default_weight_loader")
    if any(isinstance(n, ast.Name) and n.id == "copy_weight_" for n in ast.walk(loader)):
        # 0.34+: the copy goes through model_executor/utils.py's copy_weight_ (in place, with a
        # page-touching prelude on integrated GPUs, never true on this CPU).
        utils = ast.parse(release_bytes(fs.version, MODEL_UTILS).decode())
        g.update(mmap=__import__("mmap"), functools=__import__("functools"),
                 current_platform=types.SimpleNamespace(is_integrated_gpu=lambda index: False))
        compile_nodes([top_level(utils, "_is_integrated_gpu"), top_level(utils, "copy_weight_")], g,
                      f"<{fs.version}>/{MODEL_UTILS}")
    compile_nodes([loader], g, f"<{fs.version}>/{WEIGHT_UTILS}")
    return g["default_weight_loader"]


def real_norm_class(fs, st: Stage):
    """The set's patched `MiniMAXGemmaRMSNorm`, its globals completed with what its weight
    loader calls (the helper's names and the release's default_weight_loader)."""
    world = load_model(fs, st)
    g = world.classes
    g["default_weight_loader"] = release_default_weight_loader(fs)
    for name in ("m3_refresh_gamma",):
        if hasattr(world.helper, name):
            g[name] = getattr(world.helper, name)
    return world.helper, g["MiniMAXGemmaRMSNorm"], g["default_weight_loader"]


def vllm_load(param: torch.Tensor, loaded: torch.Tensor, default_loader) -> None:
    """What M3's load_weights does per norm weight (model.py: `getattr(param, "weight_loader",
    default_weight_loader)(param, loaded_weight)`); the layerwise reload ends the same way."""
    getattr(param, "weight_loader", default_loader)(param, loaded)


def _gamma_ptrs(norm) -> dict:
    return {k: v.data_ptr() for k, v in norm.__dict__.get("_m3fuse_gamma", {}).items()}


@all_rows
@pytest.mark.parametrize("how", ["load_weights", "param.copy_"])
def test_gamma_follows_a_weight_update_in_place(fs, how):
    """fused == control == float64 after the weight changes, and the cached `weight + 1` kept
    its address (CUDA/HIP graphs read it there)."""
    world = 2
    partials, residual, weight = make_inputs(world, tokens=16, seed=21)
    new_weight = 0.5 * torch.randn(H, generator=torch.Generator().manual_seed(22))
    with Stage(fs, SimTP(world), mode="fused") as st:
        helper, cls, default_loader = real_norm_class(fs, st)
        helper.initialize_m3_aiter_allreduce()
        norm = new_norm(weight, cls=cls)
        assert_matches(run_helper(st, helper, partials, residual, norm), reference(partials, residual, weight))
        before = _gamma_ptrs(norm)
        assert before, "the fused call cached no gamma"
        calls_before = len(st.ca.calls)
        loaded = new_weight.to(norm.weight.dtype)
        if how == "load_weights":
            vllm_load(norm.weight, loaded, default_loader)
        else:  # reload_weights(is_checkpoint_format=False): inplace.py's param.copy_
            with torch.no_grad():
                norm.weight.copy_(loaded)
            if fs.reload_hooks:  # 0.34+: that path ends in finalize_model_weights, every time
                with finalize_imports():
                    release_finalize_model_weights(fs)(norm)
        fused = run_helper(st, helper, partials, residual, norm)
        assert len(st.ca.calls) > calls_before, "the call after the update did not take the fused kernel"
        assert _gamma_ptrs(norm) == before, "the cached gamma was replaced, not rewritten in place"
        st.set_mode("control")
        control = run_helper(st, helper, partials, residual, norm)
    ref = reference(partials, residual, new_weight.to(torch.bfloat16).float())
    assert_matches(fused, ref)
    for (a, b), (c, d) in zip(fused, control):
        assert torch.allclose(a.float(), c.float(), atol=3e-2, rtol=3e-2)
        assert torch.allclose(b.float(), d.float(), atol=3e-2, rtol=3e-2)
    assert_matches(control, ref)


@contextlib.contextmanager
def norm_with_cached_gamma(fs, seed: int):
    """The set's patched norm in a fused TP-2 stage, after one fused call cached its gamma:
    yields (norm, the release's default_weight_loader)."""
    partials, residual, weight = make_inputs(2, seed=seed)
    with Stage(fs, SimTP(2), mode="fused") as st:
        helper, cls, default_loader = real_norm_class(fs, st)
        helper.initialize_m3_aiter_allreduce()
        norm = new_norm(weight, cls=cls)
        run_helper(st, helper, partials, residual, norm)
        yield norm, default_loader


def gamma_for(weight: torch.Tensor) -> torch.Tensor:
    """The `weight + 1` the fused path must hold for a bf16 norm weight."""
    return (weight.to(torch.bfloat16).float() + 1.0).to(torch.bfloat16)


@all_rows
def test_weight_loader_refreshes_before_any_eager_call(fs):
    """The loader path (every load_weights write) refreshes the cached tensor itself, so a graph
    replayed right after the update (no Python runs then) reads the new `weight + 1`."""
    new_weight = 0.4 * torch.randn(H, generator=torch.Generator().manual_seed(24))
    with norm_with_cached_gamma(fs, seed=23) as (norm, default_loader):
        vllm_load(norm.weight, new_weight.to(norm.weight.dtype), default_loader)
        (gamma,) = norm.__dict__["_m3fuse_gamma"].values()
    assert torch.equal(gamma, gamma_for(new_weight))


# finalize_model_weights' lazy imports name vLLM layers that do not import on this CPU. For a
# tree of norms they answer: no deferred attention layer, no quant method, no device move.
FINALIZE_IMPORTS = {
    "vllm.model_executor.layers.attention": {"is_deferred_attention_layer": lambda module: False},
    "vllm.model_executor.layers.quantization.base_config": {"QuantizeMethodBase": type("QuantizeMethodBase", (), {})},
    "vllm.model_executor.model_loader.utils": {"device_loading_context": lambda module, device: contextlib.nullcontext()},
}


@contextlib.contextmanager
def finalize_imports():
    """FINALIZE_IMPORTS as modules in sys.modules (their parents too), removed afterwards."""
    import sys

    names = sorted({".".join(m.split(".")[:i + 1]) for m in FINALIZE_IMPORTS for i in range(m.count(".") + 1)})
    saved = {n: sys.modules.get(n) for n in names}
    try:
        for n in names:
            mod = types.ModuleType(n)
            mod.__path__ = []  # a package, so its children import
            mod.__dict__.update(FINALIZE_IMPORTS.get(n, {}))
            sys.modules[n] = mod
        yield
    finally:
        for n, old in saved.items():
            if old is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = old


def release_finalize_model_weights(fs):
    """The release's own `finalize_model_weights` (weight_utils.py), compiled from its wheel."""
    import collections.abc

    tree = ast.parse(release_bytes(fs.version, WEIGHT_UTILS).decode())
    g = {"torch": torch, "Iterable": collections.abc.Iterable}
    compile_nodes([top_level(tree, "finalize_model_weights")], g, f"<{fs.version}>/{WEIGHT_UTILS}")
    return g["finalize_model_weights"]


@rows(lambda r: r.reload_hooks)
def test_a_kernel_format_reload_refreshes_gamma_before_any_eager_call(fs):
    """reload_weights(is_checkpoint_format=False) writes `param.copy_` past the weight loader and
    then (0.34+, fact reload_hooks) runs the release's finalize_model_weights over the model. The
    norm's process_weights_after_loading must rewrite the cached `weight + 1` in place there: a
    graph replayed next runs no Python, so no eager check would catch the change."""
    new_weight = 0.3 * torch.randn(H, generator=torch.Generator().manual_seed(26))
    with norm_with_cached_gamma(fs, seed=25) as (norm, _):
        before = _gamma_ptrs(norm)
        model = torch.nn.Sequential(torch.nn.Sequential(norm), torch.nn.Identity())
        with torch.no_grad():
            norm.weight.copy_(new_weight.to(norm.weight.dtype))  # inplace.py's kernel-format write
        with finalize_imports():
            release_finalize_model_weights(fs)(model)
        (gamma,) = norm.__dict__["_m3fuse_gamma"].values()
        assert _gamma_ptrs(norm) == before, "the cached gamma was replaced, not rewritten in place"
    assert torch.equal(gamma, gamma_for(new_weight)), "the reload's hooks left the fused path's weight + 1 stale"


@rows(lambda r: r.aiter_api == "wrapper" or r.aiter_api == "raw")
@pytest.mark.parametrize("world", [3, 6])
def test_fused_refuses_a_world_size_the_fused_kernel_cannot_run(fs, world):
    """AITER 0.1.15.post1's CustomAllreduce takes 2, 4, 6, 8; its fused dispatcher only 2, 4, 8
    (docs/fusion.md). Refused at construction, naming the sizes; control still runs."""
    with Stage(fs, SimTP(world), mode="fused") as st:
        helper = load_helper(fs)
        with pytest.raises(RuntimeError) as err:
            helper.initialize_m3_aiter_allreduce()
        st.set_mode("control")
        helper.initialize_m3_aiter_allreduce()  # control: nothing to refuse
    msg = str(err.value)
    assert f"this group has {world}" in msg and "2, 4, 8" in msg and "control" in msg


@all_rows
@pytest.mark.parametrize("world", [2, 4, 8])
def test_fused_accepts_the_world_sizes_the_kernel_runs(fs, world):
    with Stage(fs, SimTP(world), mode="fused"):
        helper = load_helper(fs)
        helper.initialize_m3_aiter_allreduce()
        assert helper._m3_aiter_ready


@all_rows
def test_registered_needs_aiters_own_capture_flag(fs):
    """A stream capture outside AITER's capture() context (its _IS_CAPTURING off): the input's
    address is never registered, so the call must copy in (registered=False), as AITER's own
    custom_fused_ar_rms decides."""
    partials, residual, weight = make_inputs(2, seed=25)
    with Stage(fs, SimTP(2), mode="fused") as st:
        helper = load_helper(fs)
        helper.initialize_m3_aiter_allreduce()
        norm = new_norm(weight)
        run_helper(st, helper, partials, residual, norm)  # eager
        st.capturing = True
        st.make_ca().capture_flag = False
        run_helper(st, helper, partials, residual, norm)  # capture, AITER flag off
        st.make_ca().capture_flag = None
        run_helper(st, helper, partials, residual, norm)  # capture inside AITER's capture()
    assert [c["registered"] for c in st.ca.calls] == [False] * 2 + [False] * 2 + [True] * 2


def _cp_config(st: Stage, pcp: int, dcp: int):
    cfg = st.vllm_config()
    cfg.parallel_config.prefill_context_parallel_size = pcp
    cfg.parallel_config.decode_context_parallel_size = dcp
    return cfg


@all_rows
@pytest.mark.parametrize("pcp,dcp,blocker", [(2, 1, "PCP=2"), (1, 2, "DCP=2"), (1, 1, None)])
def test_context_parallelism_turns_deferral_off(fs, pcp, dcp, blocker):
    with Stage(fs, SimTP(2), mode="control") as st:
        helper = load_helper(fs)
        cfg = _cp_config(st, pcp, dcp)
        assert helper._m3_defer_blocker(cfg) == blocker
        assert helper.m3_defer_ffn_all_reduce(cfg) is (blocker is None)



# ============================================================================ run-time inputs
# Fixture-free (the mutation check calls these with the row alone): environment changes are
# undone by `env`, files live in a TemporaryDirectory.
PARALLEL = "vllm/config/parallel.py"
upstream_rows = rows(lambda r: r.upstream_aiter_branch)


def _put(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@contextlib.contextmanager
def env(**values: str | None):
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            _put(k, v)
        yield
    finally:
        for k, v in saved.items():
            _put(k, v)


RAY_VARS = ("VLLM_RAY_EXTRA_ENV_VARS_TO_COPY", "VLLM_RAY_EXTRA_ENV_VAR_PREFIXES_TO_COPY", "M3FUSE_RUN_RECORD")


def clean_env(**values: str | None):
    return env(**{**{k: None for k in RAY_VARS}, **values})


def release_parallel_config(fs, **attrs):
    """An object with the release's own `ParallelConfig.use_ray` property (compiled from its
    config/parallel.py) and the given attributes."""
    tree = ast.parse(release_bytes(fs.version, PARALLEL).decode())
    ns = compile_functions([method_node(tree, "ParallelConfig", "use_ray")], {}, f"<{fs.version}>/{PARALLEL}")
    cls = type("ParallelConfig", (), {"use_ray": property(ns["use_ray"])})
    pc = cls()
    base = dict(pipeline_parallel_size=1, data_parallel_size=1, data_parallel_rank=0,
                distributed_executor_backend="mp", data_parallel_backend="mp",
                use_sequence_parallel_moe=False)
    for k, v in {**base, **attrs}.items():
        setattr(pc, k, v)
    return pc


def runtime_config(st: Stage, pc, *, compile_mode: int = 3, draft: tuple[str, ...] | None = None):
    pass_config = types.SimpleNamespace(fuse_allreduce_rms=True)
    spec = None if draft is None else types.SimpleNamespace(
        method="eagle3", draft_model_config=types.SimpleNamespace(architectures=list(draft)))
    return types.SimpleNamespace(parallel_config=pc, speculative_config=spec,
                                 compilation_config=types.SimpleNamespace(mode=compile_mode,
                                                                          pass_config=pass_config))


class RayExecutorClass:
    """An executor given as a class (vLLM accepts `distributed_executor_backend=<class>`); it
    orchestrates through Ray, so ParallelConfig.use_ray is true while the backend is no string."""

    uses_ray = True


@all_rows
@pytest.mark.parametrize("via", ["class", "string"])
def test_ray_executor_given_as_a_class_is_refused(fs, via):
    backend = RayExecutorClass if via == "class" else "ray"
    with clean_env(), Stage(fs, SimTP(2), mode="control") as st:
        helper = load_helper(fs)
        pc = release_parallel_config(fs, distributed_executor_backend=backend)
        assert pc.use_ray  # what the release itself answers
        with pytest.raises(RuntimeError, match="runs under Ray"):
            helper.m3_check_runtime(runtime_config(st, pc))


@all_rows
@pytest.mark.parametrize("prefixes,accepted", [
    ("M3_", True), ("M3_AITER_AR_RMS_MODE", True), ("VLLM_,M3_AITER", True),
    ("M3_X", False), ("AITER_", False), ("M3_AITER_AR_RMS_MODE_", False), ("VLLM_,HF_", False),
])
def test_ray_prefix_list_must_cover_the_modes_name(fs, prefixes, accepted):
    """VLLM_RAY_EXTRA_ENV_VAR_PREFIXES_TO_COPY: only a prefix of M3_AITER_AR_RMS_MODE makes Ray
    copy it; any other list leaves the worker's mode unknown, refused."""
    with clean_env(VLLM_RAY_EXTRA_ENV_VAR_PREFIXES_TO_COPY=prefixes), \
            Stage(fs, SimTP(2), mode="control") as st:
        helper = load_helper(fs)
        cfg = runtime_config(st, release_parallel_config(fs, distributed_executor_backend="ray"))
        if accepted:
            helper.m3_check_runtime(cfg)
            return
        with pytest.raises(RuntimeError, match="VLLM_RAY_EXTRA_ENV_VARS_TO_COPY=M3_AITER_AR_RMS_MODE"):
            helper.m3_check_runtime(cfg)


def _report(helper, st: Stage, *, tp_rank=0, pp_rank=0, dp_rank=0, defer=True) -> dict:
    """m3_report_run on the calling thread as the given rank (no threads: deterministic)."""
    st.tp._local.rank = tp_rank
    st.pp_rank = pp_rank
    pc = release_parallel_config(st.fs, data_parallel_rank=dp_rank)
    try:
        return helper.m3_report_run(runtime_config(st, pc), defer)
    finally:
        st.tp._local.rank = 0


@all_rows
@pytest.mark.parametrize("rank,writes", [
    ((0, 0, 0), True), ((1, 0, 0), False), ((0, 1, 0), False), ((0, 0, 1), False), ((1, 1, 1), False),
])
def test_only_rank_0_0_0_writes_the_record(fs, rank, writes):
    """The record's rank check, one rank per call on one thread: TP, PP and DP rank each count."""
    with tempfile.TemporaryDirectory() as d:
        record = Path(d) / "record.json"
        with clean_env(M3FUSE_RUN_RECORD=str(record)), Stage(fs, SimTP(2), mode="control") as st:
            helper = load_helper(fs)
            facts = _report(helper, st, tp_rank=rank[0], pp_rank=rank[1], dp_rank=rank[2])
        assert facts["rank"] == {"tp": rank[0], "pp": rank[1], "dp": rank[2]}
        assert record.exists() is writes


@all_rows
def test_the_record_is_replaced_atomically(fs):
    """A new file moved over the old one (os.replace): a reader holding the old file (here a
    hard link to it) still sees it whole; the path then names a new inode with the new facts."""
    with tempfile.TemporaryDirectory() as d:
        record, held = Path(d) / "record.json", Path(d) / "held-by-a-reader"
        record.write_text('{"old": true}\n')
        os.link(record, held)
        inode = record.stat().st_ino
        with clean_env(M3FUSE_RUN_RECORD=str(record)), Stage(fs, SimTP(2), mode="control") as st:
            helper = load_helper(fs)
            _report(helper, st)
        assert held.read_text() == '{"old": true}\n'
        assert record.stat().st_ino != inode
        assert json.loads(record.read_text())["mode"] == "control"
        assert sorted(p.name for p in Path(d).iterdir()) == ["held-by-a-reader", "record.json"]


@all_rows
def test_fused_path_is_not_ready_before_initialisation(fs):
    with clean_env(), Stage(fs, SimTP(2), mode="fused") as st:
        helper = load_helper(fs)
        before = _report(helper, st, tp_rank=0)
        helper.initialize_m3_aiter_allreduce()
        after = _report(helper, st, tp_rank=1)
    assert (before["aiter_fused_path"], before["aiter_fused_ready"]) == ("not ready", False)
    assert (after["aiter_fused_path"], after["aiter_fused_ready"]) == ("ready", True)


@upstream_rows
@pytest.mark.parametrize("backend,blocker", [("passthrough", "all2all backend passthrough"),
                                             ("allgather_reducescatter", None), (None, None)])
def test_all2all_passthrough_turns_deferral_off(fs, backend, blocker):
    """vLLM 0.32+'s passthrough all2all backend reduces the MoE output itself (TP only too)."""
    with clean_env(), Stage(fs, SimTP(2), mode="control") as st:
        helper = load_helper(fs)
        cfg = runtime_config(st, release_parallel_config(fs, all2all_backend=backend))
        assert helper._m3_defer_blocker(cfg) == blocker
        assert helper.m3_defer_ffn_all_reduce(cfg) is (blocker is None)


@all_rows
@pytest.mark.parametrize("layout", ["strided", "transposed"])
def test_non_contiguous_residual_takes_the_explicit_path(fs, layout):
    """The fused kernel reads the residual as dense rows; a non-contiguous one goes unfused."""
    world = 2
    partials, residual, weight = make_inputs(world, tokens=16, seed=26)
    if layout == "strided":
        wide = torch.zeros(16, 2 * H, dtype=residual.dtype)
        wide[:, ::2] = residual
        res = wide[:, ::2]
    else:
        res = residual.t().contiguous().t()
    assert not res.is_contiguous() and torch.equal(res, residual)
    with clean_env(), Stage(fs, SimTP(world), mode="fused") as st:
        helper = load_helper(fs)
        helper.initialize_m3_aiter_allreduce()
        norm = new_norm(weight)
        outs = st.tp.run(lambda r: helper.fused_allreduce_gemma_rms_norm(partials[r].clone(), res, norm))
        assert not st.ca.calls
    assert_matches(outs, reference(partials, residual, weight))


class KwargsAiterCA(FakeAiterCA):
    """An AITER whose custom_fused_ar_rms takes **kwargs (so gemma_norm= is accepted)."""

    def custom_fused_ar_rms(self, input, residual_inp, weight, eps, use_1stage, **kwargs):  # type: ignore[override]
        w = weight.float() + 1.0 if kwargs.get("gemma_norm") else weight
        return self.fused_ar_rms(input, residual_inp, w=w, eps=eps, use_1stage=use_1stage)


@all_rows
@pytest.mark.parametrize("cls,lacks", [(FakeAiterCA, True), (FakeAiterCAGemma, False), (KwargsAiterCA, False)])
def test_an_op_taking_kwargs_has_gemma_norm(fs, cls, lacks):
    with clean_env(), Stage(fs, SimTP(2), mode="off"):
        helper = load_helper(fs)
        assert helper._m3_lacks_gemma_norm(cls(SimTP(2))) is lacks


@upstream_rows
@pytest.mark.parametrize("mode,refused", [(0, False), (1, False), (2, False), (3, True)])
def test_compile_pass_check_only_at_vllm_compile(fs, mode, refused):
    """Only CompilationMode.VLLM_COMPILE (3) runs vLLM's AR+RMS pass on a draft model; modes 0-2
    (none, STOCK_TORCH_COMPILE, DYNAMO_TRACE_ONCE) never do, and are not refused."""
    with clean_env(), Stage(fs, SimTP(2), mode="fused",
                            ca_factory=lambda t: FakeAiterCA(t, sum_dtype=torch.float32)) as st:
        helper = load_helper(fs)
        cfg = runtime_config(st, release_parallel_config(fs), compile_mode=mode, draft=("LlamaForCausalLM",))
        if not refused:
            helper.m3_check_runtime(cfg)
            return
        with pytest.raises(RuntimeError, match="torch.compiled"):
            helper.m3_check_runtime(cfg)


@upstream_rows
@pytest.mark.parametrize("custom_ar,refused", [(True, True), (False, False)])
def test_off_with_the_pinned_aiter_refused_unless_custom_ar_is_off(fs, custom_ar, refused):
    """vLLM 0.30+'s own one-stage branch calls custom_fused_ar_rms(..., gemma_norm=), which the
    pinned AITER lacks: `off` is refused at construction unless VLLM_ROCM_USE_AITER_CUSTOM_AR=0."""
    with clean_env(), Stage(fs, SimTP(2), mode="off", aiter_custom_ar_env=custom_ar,
                            ca_factory=lambda t: FakeAiterCA(t, sum_dtype=torch.float32)) as st:
        helper = load_helper(fs)
        cfg = runtime_config(st, release_parallel_config(fs))
        if not refused:
            helper.m3_check_runtime(cfg)
            return
        with pytest.raises(RuntimeError, match="VLLM_ROCM_USE_AITER_CUSTOM_AR=0"):
            helper.m3_check_runtime(cfg)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@all_rows
def test_one_line_per_rank_per_process(fs):
    """m3_report_run logs once per (TP, PP, DP) rank in a process, however often the model is
    built; a second rank in the same process gets its own line."""
    with clean_env(), Stage(fs, SimTP(2), mode="control") as st:
        helper = load_helper(fs)
        log = logging.getLogger(helper.__name__)
        lines, level = _Lines(), log.level
        log.addHandler(lines)
        log.setLevel(logging.INFO)
        try:
            for rank in (0, 0, 1, 1, 0):
                _report(helper, st, tp_rank=rank)
        finally:
            log.removeHandler(lines)
            log.setLevel(level)
    sets = [line for line in lines.lines if line.startswith(f"m3fuse set {fs.name}: mode control")]
    assert len(sets) == 2
