"""vLLM's own weight-reload engines drive the patched M3 norm in `fused` mode (issue 23).

Each release's reload code is imported from its own wheel (`vllm/model_executor/model_loader/
reload/`, and `reload/inplace.py`'s `reload_weights` where the release has it, else the model
runner's `reload_weights` method compiled from `vllm/v1/worker/gpu_model_runner.py`), over a
model holding the set's real patched `MiniMAXGemmaRMSNorm` after a fused call cached its
`weight + 1`. Which engines a release has is read off its wheel (`reload_engines`):

- `layerwise`: the checkpoint-format path (`reload_weights(is_checkpoint_format=True)`, and the
  weight-transfer engines' `update_weights` through `load_weights`). It runs every weight
  loader on a *meta* copy of the layer first (to count), then on a materialised copy, and
  copies back into the original Parameter (`param.data.copy_`).
- `direct` (0.34+, `VLLM_RELOAD_MODE=direct`): the loaders write the checkpoint in place, then
  `finalize_model_weights` reruns every module's `process_weights_after_loading`.
- `kernel-format`: `reload_weights(is_checkpoint_format=False)`: `param.copy_` past every
  loader, then (0.34+) `finalize_model_weights`.

After each: no exception, the cache holds the new `weight + 1` at the same address (captured
graphs read it there) and the next fused call takes the kernel and matches float64. The
kernel-format path of 0.24.0-0.33.0 runs no hook: the gamma is refreshed at the next eager
call (the stamp), which the test checks instead (docs/fusion.md, README's known limits).

Stand-ins (each for a vLLM module that does not import on this CPU, answering for a model of
norms only): `vllm.config` types, a logger with vLLM's `*_once` methods, the attention layer
test (`is_deferred_attention_layer`: no attention here), `QuantizeMethodBase` (no quant
method), `vllm.lora.layers.BaseLayerWithLoRA` (no LoRA), `get_model_loader` (weights are
given, never read from disk), `vllm.utils.torch_utils.is_torch_equal_or_newer`, and
`vllm.envs.VLLM_RELOAD_MODE`. M3's `load_weights` is reduced to what it does for a norm weight
(`amd/model.py`: `getattr(param, "weight_loader", default_weight_loader)(param, w)`).
"""

from __future__ import annotations

import ast
import contextlib
import logging
import sys
import tempfile
import types
from functools import lru_cache
from pathlib import Path

import pytest
import torch

import realvllm
from fusion_harness import Stage, release_bytes, release_members
from fusion_matrix import rows_where
from fusion_standins import SimTP, compile_nodes, method_node, top_level
from test_fixes_runtime import (
    FINALIZE_IMPORTS,
    _gamma_ptrs,
    gamma_for,
    real_norm_class,
    release_default_weight_loader,
)
from test_fusion_matrix import H, assert_matches, make_inputs, new_norm, reference, run_helper

RELOAD_DIR = "vllm/model_executor/model_loader/reload/"
WEIGHT_UTILS = "vllm/model_executor/model_loader/weight_utils.py"
MODEL_EXECUTOR_UTILS = "vllm/model_executor/utils.py"
RUNNER = "vllm/v1/worker/gpu_model_runner.py"


@lru_cache(maxsize=None)
def reload_engines(version: str) -> tuple[str, ...]:
    """The reload engines a release has, read off its wheel: `layerwise` (reload/layerwise.py),
    `direct` (reload/direct.py, VLLM_RELOAD_MODE=direct), `kernel-format` (always: the
    is_checkpoint_format=False branch of reload_weights), and whether that branch ends in
    `finalize_model_weights` (`kernel-format+hooks`)."""
    members = release_members(version)
    engines = []
    if RELOAD_DIR + "layerwise.py" in members:
        engines.append("layerwise")
    if RELOAD_DIR + "direct.py" in members:
        engines.append("direct")
    source = _reload_weights_source(version)
    engines.append("kernel-format+hooks" if "finalize_model_weights" in source else "kernel-format")
    return tuple(engines)


def _reload_weights_source(version: str) -> str:
    """The text of the release's `reload_weights` (inplace.py from 0.32, else the runner's)."""
    members = release_members(version)
    if RELOAD_DIR + "inplace.py" in members:
        tree = ast.parse(release_bytes(version, RELOAD_DIR + "inplace.py").decode())
        return ast.unparse(top_level(tree, "reload_weights"))
    tree = ast.parse(release_bytes(version, RUNNER).decode())
    return ast.unparse(method_node(tree, "GPUModelRunner", "reload_weights"))


class _OnceLogger(logging.LoggerAdapter):
    """vLLM's logger adds `info_once`/`warning_once`/`debug_once` (vllm/logger.py)."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.getLogger(name), {})

    def info_once(self, msg, *args, **kwargs):
        self.info(msg, *args)

    def warning_once(self, msg, *args, **kwargs):
        self.warning(msg, *args)

    def debug_once(self, msg, *args, **kwargs):
        self.debug(msg, *args)


class QuantizeMethodBase:  # stand-in: no module of this model has a quant method
    pass


class BaseLayerWithLoRA(torch.nn.Module):  # stand-in: no LoRA layer here
    pass


def _is_torch_equal_or_newer(target: str) -> bool:  # stand-in for vllm.utils.torch_utils
    from packaging.version import Version

    return Version(torch.__version__.split("+")[0]) >= Version(target)


_TMP = tempfile.TemporaryDirectory(prefix="m3fuse-reload-src-")  # this process's, removed at exit


@lru_cache(maxsize=None)
def _extracted(version: str) -> Path:
    """The release's reload package, unpacked once per session (upstream files stay out of git)."""
    dest = Path(_TMP.name) / version
    members = [m for m in release_members(version) if m.startswith(RELOAD_DIR) and m.endswith(".py")]
    realvllm.extract(version, dest, members)
    return dest


def _module(name: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__path__ = []
    m.__dict__.update(attrs)
    return m


@contextlib.contextmanager
def release_reload(fs, st: Stage, reload_mode: str = "layerwise"):
    """Import the release's own reload package (and, 0.34+, model_executor/utils.py) inside an
    active Stage; yields the `reload` package and the release's `reload_weights` callable
    `(model, weights, is_checkpoint_format)`."""
    v = fs.version
    root = _extracted(v)
    default_loader = release_default_weight_loader(fs)
    wu_tree = ast.parse(release_bytes(v, WEIGHT_UTILS).decode())
    import collections.abc

    wu = {"torch": torch, "Iterable": collections.abc.Iterable, "default_weight_loader": default_loader}
    if any(isinstance(n, ast.FunctionDef) and n.name == "finalize_model_weights" for n in wu_tree.body):
        compile_nodes([top_level(wu_tree, "finalize_model_weights")], wu, f"<{v}>/{WEIGHT_UTILS}")
    model_config = types.SimpleNamespace(dtype=torch.bfloat16, quantization=None, model="m3")
    vllm_config = types.SimpleNamespace(model_config=model_config, lora_config=None,
                                        load_config=types.SimpleNamespace(device=None, load_format="auto"),
                                        device_config=types.SimpleNamespace(device="cpu"))
    cfg = sys.modules["vllm.config"]
    cfg.ModelConfig = cfg.VllmConfig = types.SimpleNamespace
    mods = {
        "vllm.logger": _module("vllm.logger", init_logger=_OnceLogger),
        "vllm.envs": _module("vllm.envs", VLLM_RELOAD_MODE=reload_mode),
        "vllm.lora": _module("vllm.lora"),
        "vllm.lora.layers": _module("vllm.lora.layers", BaseLayerWithLoRA=BaseLayerWithLoRA),
        "vllm.utils": _module("vllm.utils"),
        "vllm.utils.torch_utils": _module("vllm.utils.torch_utils", is_torch_equal_or_newer=_is_torch_equal_or_newer),
        "vllm.model_executor.layers.attention": _module(
            "vllm.model_executor.layers.attention", is_deferred_attention_layer=lambda layer: False,
            Attention=type("Attention", (torch.nn.Module,), {}), MLAAttention=type("MLAAttention", (torch.nn.Module,), {})),
        "vllm.model_executor.layers.quantization": _module("vllm.model_executor.layers.quantization"),
        "vllm.model_executor.layers.quantization.base_config": _module(
            "vllm.model_executor.layers.quantization.base_config", QuantizeMethodBase=QuantizeMethodBase),
        # direct.py's supported-module check names these quant methods (none here)
        "vllm.model_executor.layers.quantization.humming": _module(
            "vllm.model_executor.layers.quantization.humming",
            HummingLinearMethod=type("HummingLinearMethod", (), {}), HummingMoEMethod=type("HummingMoEMethod", (), {})),
        "vllm.model_executor.layers.quantization.online": _module("vllm.model_executor.layers.quantization.online"),
        "vllm.model_executor.layers.quantization.online.fp8": _module(
            "vllm.model_executor.layers.quantization.online.fp8", OnlineLinearBase=type("OnlineLinearBase", (), {})),
        "vllm.model_executor.layers.quantization.online.moe_base": _module(
            "vllm.model_executor.layers.quantization.online.moe_base",
            OnlineMoEMethodBase=type("OnlineMoEMethodBase", (), {})),
        "vllm.model_executor.model_loader": _module(
            "vllm.model_executor.model_loader",
            get_model_loader=lambda load_config: pytest.fail("weights are given: nothing is read from disk")),
        "vllm.model_executor.model_loader.weight_utils": _module(
            "vllm.model_executor.model_loader.weight_utils", **wu),
        "vllm.model_executor.model_loader.utils": _module(
            "vllm.model_executor.model_loader.utils", **FINALIZE_IMPORTS["vllm.model_executor.model_loader.utils"]),
    }
    lu = mods["vllm.model_executor.model_loader.utils"]
    if "process_weights_after_loading(model, model_config, device)" in (
            release_bytes(v, RELOAD_DIR + "direct.py").decode() if RELOAD_DIR + "direct.py" in release_members(v) else ""):
        # direct.py's finish runs the loader's cold-start post-load pass (model_loader/utils.py),
        # compiled from the release; it ends in finalize_model_weights. For a model of norms:
        # no tied embeddings to retie, no memory pressure to relieve.
        ut = ast.parse(release_bytes(v, "vllm/model_executor/model_loader/utils.py").decode())
        lu.__dict__.update(maybe_retie_word_embeddings=lambda model, model_config: None,
                           release_device_memory_under_pressure=lambda device: None,
                           QuantizeMethodBase=QuantizeMethodBase, nullcontext=contextlib.nullcontext,
                           finalize_model_weights=wu["finalize_model_weights"], torch=torch, nn=torch.nn)
        compile_nodes([top_level(ut, "process_weights_after_loading")], lu.__dict__,
                      f"<{v}>/vllm/model_executor/model_loader/utils.py")
    sys.modules.update(mods)
    sys.modules["vllm.model_executor.model_loader"].__path__ = [str(root / "vllm/model_executor/model_loader")]
    if MODEL_EXECUTOR_UTILS in release_members(v):
        import importlib.util

        mu = importlib.util.module_from_spec(importlib.util.spec_from_loader("vllm.model_executor.utils", loader=None))
        platform = sys.modules["vllm.platforms"].current_platform
        platform.is_integrated_gpu = lambda *a, **k: False
        exec(compile(release_bytes(v, MODEL_EXECUTOR_UTILS).decode(), f"<{v}>/{MODEL_EXECUTOR_UTILS}", "exec"),
             mu.__dict__)
        sys.modules["vllm.model_executor.utils"] = mu
        lu.is_weights_pre_processed = getattr(mu, "is_weights_pre_processed", None)
    import importlib

    reload = importlib.import_module("vllm.model_executor.model_loader.reload")

    if RELOAD_DIR + "inplace.py" in release_members(v):
        inplace = importlib.import_module("vllm.model_executor.model_loader.reload.inplace")

        def reload_weights(model, weights, is_checkpoint_format):
            inplace.reload_weights(vllm_config, model, weights, None, is_checkpoint_format)
    else:
        tree = ast.parse(release_bytes(v, RUNNER).decode())
        nodes = [method_node(tree, "GPUModelRunner", "reload_weights")]
        if any(isinstance(n, ast.FunctionDef) and n.name == "_get_parameter_for_reload" for n in tree.body):
            nodes.insert(0, top_level(tree, "_get_parameter_for_reload"))
        g = {"torch": torch, "time": __import__("time"), "cast": __import__("typing").cast,
             "Iterable": collections.abc.Iterable, "logger": _OnceLogger("gpu_model_runner"),
             "get_model_loader": mods["vllm.model_executor.model_loader"].get_model_loader,
             "initialize_layerwise_reload": reload.initialize_layerwise_reload,
             "finalize_layerwise_reload": reload.finalize_layerwise_reload,
             "BaseLayerWithLoRA": BaseLayerWithLoRA}
        compile_nodes(nodes, g, f"<{v}>/{RUNNER}")

        def reload_weights(model, weights, is_checkpoint_format):
            runner = types.SimpleNamespace(  # the GPUModelRunner attributes the method reads
                get_model=lambda: model, model_config=model_config, load_config=vllm_config.load_config,
                lora_config=None, vllm_config=vllm_config,
                reset_encoder_cache=lambda: None, reset_mm_cache=lambda: None, reset_lora_state=lambda: None)
            g["reload_weights"](runner, weights, None, is_checkpoint_format)

    yield reload, reload_weights, default_loader


@contextlib.contextmanager
def _warnings():
    """WARNING messages logged while active (root logger)."""
    got: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: got.append(record.getMessage())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield got
    finally:
        root.removeHandler(handler)


class NormModel(torch.nn.Module):
    """A model of M3 norms with M3's `load_weights` for a norm weight (see the module doc)."""

    def __init__(self, norm: torch.nn.Module, default_loader) -> None:
        super().__init__()
        self.norm = norm
        self._default_loader = default_loader

    def load_weights(self, weights):
        params = dict(self.named_parameters())
        loaded = set()
        for name, w in weights:
            param = params[name]
            getattr(param, "weight_loader", self._default_loader)(param, w)
            loaded.add(name)
        return loaded


def _engine_rows():
    out = []
    for r in rows_where(lambda r: True):
        for e in reload_engines(r.version):
            out.append(pytest.param(r, e, id=f"{r.name}-{e}"))
    return out


@pytest.mark.parametrize("fs,engine", _engine_rows())
def test_every_reload_engine_of_the_release_refreshes_the_fused_gamma_in_place(fs, engine):
    world = 2
    partials, residual, weight = make_inputs(world, tokens=8, seed=31)
    new_weight = 0.5 * torch.randn(H, generator=torch.Generator().manual_seed(32))
    mode = "direct" if engine == "direct" else "layerwise"
    with Stage(fs, SimTP(world), mode="fused") as st:
        helper, cls, _ = real_norm_class(fs, st)
        helper.initialize_m3_aiter_allreduce()
        norm = new_norm(weight, cls=cls)
        with release_reload(fs, st, reload_mode=mode) as (reload, reload_weights, default_loader):
            model = NormModel(norm, default_loader)
            # At model load (model_loader/utils.py: process_weights_after_loading, initialize_model).
            reload.record_metadata_for_reloading(model)
            if engine == "direct":
                direct = sys.modules["vllm.model_executor.model_loader.reload.direct"]
                direct.record_checkpoint_layout(model)
            assert_matches(run_helper(st, helper, partials, residual, norm), reference(partials, residual, weight))
            before = _gamma_ptrs(norm)
            param = norm.weight
            weight_ptr = param.data_ptr()
            assert before, "the fused call cached no gamma"
            kernel_format = engine.startswith("kernel-format")
            # The kernel-format branch's `param.copy_` needs autograd off for M3's norm weight
            # (a plain nn.Parameter, requires_grad=True, in the pristine model too).
            with torch.no_grad() if kernel_format else contextlib.nullcontext():
                reload_weights(model, [("norm.weight", new_weight.to(torch.bfloat16))],
                               is_checkpoint_format=not kernel_format)
            assert norm.weight is param and norm.weight.data_ptr() == weight_ptr, "the reload moved the weight"
            assert torch.equal(norm.weight, new_weight.to(torch.bfloat16)), "the reload did not write the weight"
            if engine != "kernel-format":  # every engine but 0.24-0.33's kernel-format runs a refresh
                (gamma,) = norm.__dict__["_m3fuse_gamma"].values()
                assert torch.equal(gamma, gamma_for(new_weight)), f"{engine}: the cached weight + 1 is stale"
                assert _gamma_ptrs(norm) == before, "the cached gamma was replaced, not rewritten in place"
            calls = len(st.ca.calls)
            with _warnings() as warned:
                out = run_helper(st, helper, partials, residual, norm)
                run_helper(st, helper, partials, residual, norm)
            # Only a write no hook saw (0.24-0.33's kernel-format path) is found at this eager call,
            # and said once: graphs replayed in between used the old gamma (README's known limits).
            stale = [m for m in warned if "written past its weight loader" in m]
            assert len(stale) == (1 if engine == "kernel-format" else 0), warned
            assert len(st.ca.calls) > calls, "the call after the reload did not take the fused kernel"
            assert _gamma_ptrs(norm) == before
            (gamma,) = norm.__dict__["_m3fuse_gamma"].values()
            assert torch.equal(gamma, gamma_for(new_weight))
    assert_matches(out, reference(partials, residual, new_weight.to(torch.bfloat16).float()))


def test_the_engines_are_derived_from_each_wheel():
    """Every release has the layerwise engine; the kernel-format path gains hooks with 0.34's
    finalize_model_weights and the direct mode with reload/direct.py (both read off the wheel)."""
    table = {r.version: reload_engines(r.version) for r in rows_where(lambda r: True)}
    assert all("layerwise" in e for e in table.values())
    for v, e in table.items():
        has_fmw = b"def finalize_model_weights" in release_bytes(v, WEIGHT_UTILS)
        assert ("kernel-format+hooks" in e) == has_fmw, v
        assert ("direct" in e) == (RELOAD_DIR + "direct.py" in release_members(v)), v


@pytest.mark.parametrize("fs", rows_where(lambda r: True), ids=lambda r: r.name)
def test_tensors_without_data_never_reach_the_gamma_cache(fs):
    """A meta weight (the layerwise reload's counting pass) leaves the cache and its stamp as
    they were; a FakeTensor activation (tracing) or a meta weight never fills or reads it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    partials, residual, weight = make_inputs(2, tokens=8, seed=33)
    with Stage(fs, SimTP(2), mode="fused") as st:
        helper, cls, _ = real_norm_class(fs, st)
        helper.initialize_m3_aiter_allreduce()
        norm = new_norm(weight, cls=cls)
        run_helper(st, helper, partials, residual, norm)
        (gamma,) = norm.__dict__["_m3fuse_gamma"].values()
        kept, stamp = gamma.clone(), norm.__dict__["_m3fuse_gamma_stamp"]
        helper.m3_refresh_gamma(norm, norm.weight.detach().to("meta"))
        assert torch.equal(gamma, kept) and norm.__dict__["_m3fuse_gamma_stamp"] == stamp
        fresh = new_norm(weight, cls=cls)
        with FakeTensorMode() as mode:
            fake = mode.from_tensor(torch.zeros(8, H, dtype=torch.bfloat16))
            assert helper._m3_gamma(fresh, fake) is None
        assert not fresh.__dict__.get("_m3fuse_gamma"), "a gamma was cached from a trace"
        fresh.weight = torch.nn.Parameter(fresh.weight.detach().to("meta"))  # a model built on meta
        assert helper._m3_gamma(fresh, torch.zeros(8, H, dtype=torch.bfloat16)) is None
        assert not fresh.__dict__.get("_m3fuse_gamma"), "a gamma was cached from a meta weight"


class _ModelLoader:
    """M3's `load_weights` reduced to what it does per parameter of the harness model:
    `getattr(param, "weight_loader", default_weight_loader)(param, w)` (amd/model.py)."""

    def __init__(self, model: torch.nn.Module, default_loader) -> None:
        self.model, self.default_loader = model, default_loader

    def __call__(self, weights):
        params = dict(self.model.named_parameters())
        for name, w in weights:
            getattr(params[name], "weight_loader", self.default_loader)(params[name], w)
        return {name for name, _ in weights}


@pytest.mark.parametrize("fs", rows_where(lambda r: True), ids=lambda r: r.name)
def test_layerwise_reload_of_the_whole_patched_model(fs):
    """The patched MiniMaxM3Model on the harness (every norm the real patched class, deferral on,
    fused), reloaded by the release's own layerwise engine with new weights for every parameter:
    every parameter keeps its address, every norm's cached `weight + 1` is the new one at the same
    address, and the next forward equals a model built with those weights and never reloaded."""
    import test_fusion_matrix as tm

    from fusion_harness import ToyConfig, build_model, load_model, run_forward

    config = ToyConfig()
    embeds = tm._embeds(config.hidden_size)
    with Stage(fs, SimTP(2), mode="fused") as st:
        with release_reload(fs, st) as (reload, _, default_loader):
            world = load_model(fs, st)
            world.classes["default_weight_loader"] = default_loader
            if hasattr(world.helper, "m3_refresh_gamma"):
                world.classes["m3_refresh_gamma"] = world.helper.m3_refresh_gamma

            def rank(r):
                model = build_model(world, config)
                fresh = build_model(world, config)
                new = {n: (0.5 * p.detach().float() + 0.05).to(p.dtype) for n, p in model.named_parameters()}
                with torch.no_grad():
                    for n, p in fresh.named_parameters():
                        p.copy_(new[n])
                reload.record_metadata_for_reloading(model)
                run_forward(world, model, embeds, fs)  # fills every norm's gamma cache
                run_forward(world, fresh, embeds, fs)
                ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
                norms = [m for m in model.modules() if type(m).__name__ == "MiniMAXGemmaRMSNorm"]
                gammas = [_gamma_ptrs(m) for m in norms]
                reload.initialize_layerwise_reload(model)
                _ModelLoader(model, default_loader)(list(new.items()))
                reload.finalize_layerwise_reload(model, types.SimpleNamespace(dtype=torch.bfloat16))
                assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
                assert [_gamma_ptrs(m) for m in norms] == gammas
                assert sum(1 for g in gammas if g) == len(norms) - 1  # all but layer 0's input norm
                for m in norms:
                    for g in m.__dict__.get("_m3fuse_gamma", {}).values():
                        assert torch.equal(g, (m.weight.float() + 1.0).to(g.dtype))
                return run_forward(world, model, embeds, fs), run_forward(world, fresh, embeds, fs)

            outs = st.tp.run(rank)
    for got, want in outs:
        assert torch.equal(got, want)
