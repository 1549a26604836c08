"""CPU harness for the fusion patch sets: runs the *patched* vLLM code without vLLM, AITER or a GPU.

Parameterised by patch set: add a `FusionSet` to `SETS` to cover another release.

- The patched text of a file is the committed diff applied (with the engine's
  `m3fuse.patching.hunks.apply_patch`) to the real release file from `tests/realvllm.py`.
- The stand-ins shared with the 0.33.0 harness (`SimTP`, `FakeAiterCA`, `FakeAiterWrapper`,
  `M3Norm`, `OtherGemmaNorm`, RMSNorm math, ast helpers) live in `tests/fusion_standins.py`.
  The `FakeAiterCA`s built here keep the cross-rank sum in fp32 before the residual add.
- `Stage`: installs stand-in modules for every vLLM import the helper makes (also its lazy
  ones) and stubs `torch.cuda.is_current_stream_capturing`, for as long as it is active;
  `FakeRocmAiterOps` answers either AITER API generation (raw object for 0.24, the
  `FakeAiterWrapper` of the TP communicator for 0.25+).
- `load_model(...)`: the real classes `MiniMAXGemmaRMSNorm`, `MiniMaxM3DecoderLayer` and
  `MiniMaxM3Model` (and `EagleModelMixin` from the release's interfaces.py) compiled from
  the patched source against stand-in globals, so tests run the patched `__init__`s and
  `forward`s themselves with stand-in attention/FFN modules.
"""

from __future__ import annotations

import ast
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import realvllm
from fusion_standins import (
    M3_MODULE,
    FakeAiterCA,
    FakeAiterWrapper,
    OtherGemmaNorm,
    SimTP,
    compile_nodes,
    module_from_source,
    rms_norm,
    standin_logger_module,
    top_level,
)
from m3fuse.patching.hunks import apply_patch

REPO = Path(__file__).resolve().parent.parent
INTERFACES = "vllm/model_executor/models/interfaces.py"


@dataclass(frozen=True)
class FusionSet:
    name: str  # patches/<name>
    version: str  # the vLLM release whose files it patches
    aiter_api: str  # "raw": rocm_aiter_ops.initialize_aiter_allreduce (0.24); "wrapper": TP communicator (0.25+)
    has_pp: bool  # the model forward takes intermediate_tensors / PP

    @property
    def dir(self) -> Path:
        return REPO / "patches" / self.name


SETS: list[FusionSet] = [
    FusionSet("vllm-0.24.0", "0.24.0", "raw", has_pp=False),
    FusionSet("vllm-0.26.0", "0.26.0", "wrapper", has_pp=True),
]
SET_IDS = [s.name for s in SETS]


def manifest(fs: FusionSet) -> dict:
    import tomllib

    return tomllib.loads((fs.dir / "manifest.toml").read_text())


_TEXT_CACHE: dict[tuple[str, str, bool], str] = {}


def pristine_bytes(fs: FusionSet, rel: str) -> bytes:
    return realvllm.read_member(fs.version, rel)


def patched_text(fs: FusionSet, rel: str) -> str:
    key = (fs.name, rel, True)
    if key not in _TEXT_CACHE:
        entry = next(f for f in manifest(fs)["files"] if f["path"] == rel)
        diff = (fs.dir / entry["patch"]).read_text()
        _TEXT_CACHE[key] = apply_patch(pristine_bytes(fs, rel), diff, name=entry["patch"]).decode()
    return _TEXT_CACHE[key]


def pristine_text(fs: FusionSet, rel: str) -> str:
    key = (fs.name, rel, False)
    if key not in _TEXT_CACHE:
        _TEXT_CACHE[key] = pristine_bytes(fs, rel).decode()
    return _TEXT_CACHE[key]


# ----------------------------------------------------------------------------- AITER ops
class FakeRocmAiterOps:
    """`vllm._aiter_ops.rocm_aiter_ops` for either API generation."""

    def __init__(self, stage: "Stage") -> None:
        self.stage = stage
        self.init_calls: list[tuple] = []
        if stage.fs.aiter_api == "raw":  # 0.25+ has no such method: hasattr() tells them apart
            self.initialize_aiter_allreduce = self._initialize_aiter_allreduce

    def is_enabled(self) -> bool:
        return self.stage.aiter_enabled

    def is_custom_all_reduce_enabled(self) -> bool:
        return self.stage.aiter_enabled and self.stage.aiter_custom_ar_env

    def get_aiter_allreduce(self):
        st = self.stage
        if st.fs.aiter_api == "raw":
            return st.raw_ca
        # 0.25+: the TP communicator built the wrapper at distributed init iff these held.
        if (st.aiter_enabled and st.aiter_custom_ar_env and st.custom_all_reduce
                and st.aiter_importable and st.tp.world > 1):
            return FakeAiterWrapper(st.make_ca())
        return None

    def _initialize_aiter_allreduce(self, group, device) -> None:
        st = self.stage
        self.init_calls.append((group, device))
        st.raw_ca = st.make_ca() if st.aiter_importable else None


# ----------------------------------------------------------------------------- stage
def fp32_sum_ca(tp: SimTP) -> FakeAiterCA:
    """The default AITER stand-in here: the cross-rank sum stays fp32 until the norm."""
    return FakeAiterCA(tp, sum_dtype=torch.float32)


@dataclass
class Stage:
    """Stand-in world for one patch set; use as a context manager."""

    fs: FusionSet
    tp: SimTP
    mode: str | None = "fused"  # M3_AITER_AR_RMS_MODE; None = unset
    aiter_enabled: bool = True  # VLLM_ROCM_USE_AITER
    aiter_custom_ar_env: bool = True  # VLLM_ROCM_USE_AITER_CUSTOM_AR (0.25+)
    custom_all_reduce: bool = True  # not --disable-custom-all-reduce
    aiter_importable: bool = True
    ca_factory: Callable[[SimTP], FakeAiterCA] = fp32_sum_ca
    capturing: bool = False
    pp: int = 1
    dp: int = 1
    pp_rank: int = 0  # this process's pipeline stage (tests/test_runtime.py)
    enable_sp: bool = False
    raw_ca: FakeAiterCA | None = None
    fallback_all_reduces: int = 0
    _saved: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rocm_aiter_ops = FakeRocmAiterOps(self)
        self._ca: FakeAiterCA | None = None

    def make_ca(self) -> FakeAiterCA:
        if self._ca is None:
            self._ca = self.ca_factory(self.tp)
        return self._ca

    @property
    def ca(self) -> FakeAiterCA | None:
        return self._ca

    def vllm_config(self) -> types.SimpleNamespace:
        pc = types.SimpleNamespace(tensor_parallel_size=self.tp.world, pipeline_parallel_size=self.pp,
                                   data_parallel_size=self.dp, use_sequence_parallel_moe=False)
        cc = types.SimpleNamespace(pass_config=types.SimpleNamespace(enable_sp=self.enable_sp))
        return types.SimpleNamespace(parallel_config=pc, compilation_config=cc)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self.fallback_all_reduces += 1 if self.tp.rank == 0 else 0
        return self.tp.all_reduce(x)

    def _modules(self) -> dict[str, types.ModuleType]:
        def mod(name: str, **attrs: Any) -> types.ModuleType:
            m = types.ModuleType(name)
            m.__path__ = []  # a package, so submodule imports resolve through sys.modules
            m.__dict__.update(attrs)
            return m

        tp_group = types.SimpleNamespace(cpu_group="tp-cpu-group", device=torch.device("cpu"),
                                         device_group="tp-device-group")
        ps = mod("vllm.distributed.parallel_state",
                 get_tensor_model_parallel_rank=lambda: self.tp.rank,
                 get_tensor_model_parallel_world_size=lambda: self.tp.world,
                 get_tp_group=lambda: tp_group,
                 get_pp_group=lambda: types.SimpleNamespace(rank_in_group=self.pp_rank),
                 _ENABLE_CUSTOM_ALL_REDUCE=self.custom_all_reduce)
        co = mod("vllm.distributed.communication_op", tensor_model_parallel_all_reduce=self.all_reduce)
        dist = mod("vllm.distributed", parallel_state=ps, communication_op=co,
                   tensor_model_parallel_all_reduce=self.all_reduce,
                   get_tensor_model_parallel_world_size=lambda: self.tp.world)
        layernorm = mod("vllm.model_executor.layers.layernorm", GemmaRMSNorm=OtherGemmaNorm)
        return {
            "vllm": mod("vllm"),
            "vllm.distributed": dist,
            "vllm.distributed.parallel_state": ps,
            "vllm.distributed.communication_op": co,
            "vllm.model_executor": mod("vllm.model_executor"),
            "vllm.model_executor.layers": mod("vllm.model_executor.layers"),
            "vllm.model_executor.layers.layernorm": layernorm,
            "vllm._aiter_ops": mod("vllm._aiter_ops", rocm_aiter_ops=self.rocm_aiter_ops),
            "vllm.config": mod("vllm.config", get_current_vllm_config=self.vllm_config),
            "vllm.logger": standin_logger_module(),
        }

    def __enter__(self) -> "Stage":
        import os

        mods = self._modules()
        self._saved = {"modules": {k: sys.modules.get(k) for k in mods},
                       "capturing": torch.cuda.is_current_stream_capturing,
                       "env": os.environ.get("M3_AITER_AR_RMS_MODE")}
        # Make the flashinfer import of the helper fail as on ROCm.
        for k in [k for k in sys.modules if k == "vllm" or k.startswith("vllm.")]:
            self._saved["modules"].setdefault(k, sys.modules[k])
            del sys.modules[k]
        sys.modules.update(mods)
        torch.cuda.is_current_stream_capturing = lambda: self.capturing
        self.set_mode(self.mode)
        return self

    def set_mode(self, mode: str | None) -> None:
        import os

        self.mode = mode
        if mode is None:
            os.environ.pop("M3_AITER_AR_RMS_MODE", None)
        else:
            os.environ["M3_AITER_AR_RMS_MODE"] = mode

    def __exit__(self, *exc: Any) -> None:
        import os

        for k in [k for k in sys.modules if k == "vllm" or k.startswith("vllm.")]:
            del sys.modules[k]
        for k, v in self._saved["modules"].items():
            if v is not None:
                sys.modules[k] = v
        torch.cuda.is_current_stream_capturing = self._saved["capturing"]
        if self._saved["env"] is None:
            os.environ.pop("M3_AITER_AR_RMS_MODE", None)
        else:
            os.environ["M3_AITER_AR_RMS_MODE"] = self._saved["env"]


def load_helper(fs: FusionSet, name: str = "m3_helper_under_test") -> types.ModuleType:
    """The patched helper as a fresh module (call inside an active Stage)."""
    return module_from_source(patched_text(fs, realvllm.HELPER), name,
                              f"<patched {fs.name}>/{realvllm.HELPER}")


# ----------------------------------------------------------------------------- model
@dataclass
class ToyConfig:
    """The few hf_text_config fields the decoder layer and model constructors read."""

    hidden_size: int = 64
    num_hidden_layers: int = 4
    rms_norm_eps: float = 1e-6
    vocab_size: int = 97
    dense_intermediate_size: int = 96
    moe_layer_freq: list = field(default_factory=lambda: [0, 1, 1, 1])
    sparse_attention_config: Any = None


def _gen(*key: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(1000003 * hash(key) % (2**31))
    return g


class FakeAttention(torch.nn.Module):
    """Row-parallel output like o_proj with reduce_results=False: a per-rank partial sum."""

    def __init__(self, config, layer_id, quant_config=None, prefix="", cache_config=None,
                 topk_indices_buffer=None, *, tp: SimTP) -> None:
        super().__init__()
        h = config.hidden_size
        self.a = torch.nn.Parameter(torch.randn(h, h, generator=_gen(layer_id, 1, tp.rank)) / h ** 0.5)

    def forward(self, positions, hidden_states):
        return hidden_states @ self.a.to(hidden_states.dtype)


class FakeFFN(torch.nn.Module):
    """Dense MLP / MoE stand-in honouring reduce_results like RowParallelLinear / the MoE runner."""

    def __init__(self, config, layer_id, reduce_results: bool, *, tp: SimTP, stage: Stage) -> None:
        super().__init__()
        h = config.hidden_size
        self.tp, self.stage, self.reduce_results = tp, stage, reduce_results
        self.defers_all_reduce = not reduce_results
        self.b = torch.nn.Parameter(torch.randn(h, 2 * h, generator=_gen(layer_id, 2)) / h ** 0.5)
        self.c = torch.nn.Parameter(torch.randn(2 * h, h, generator=_gen(layer_id, 3, tp.rank)) / h ** 0.5)

    def forward(self, x):
        part = torch.tanh(x @ self.b.to(x.dtype)) @ self.c.to(x.dtype)
        return self.stage.all_reduce(part) if self.reduce_results and self.tp.world > 1 else part


@dataclass
class ModelWorld:
    classes: dict
    helper: types.ModuleType
    stage: Stage


def load_model(fs: FusionSet, stage: Stage, model_source: str | None = None) -> ModelWorld:
    """Compile the real decoder-layer/model classes of the (patched) model source against
    stand-ins; call inside an active Stage. `model_source` overrides the patched text
    (tests use it to prove a broken forward is caught)."""
    helper = load_helper(fs)
    src = model_source if model_source is not None else patched_text(fs, realvllm.MODEL)
    tree = ast.parse(src)
    iface = ast.parse(realvllm.read_member(fs.version, INTERFACES).decode())
    tp = stage.tp

    def make_layers(num, layer_fn, prefix=""):
        return 0, num, torch.nn.ModuleList([layer_fn(f"{prefix}.{i}") for i in range(num)])

    def moe(config, layer_id, quant_config=None, prefix="", reduce_results=True):
        return FakeFFN(config, layer_id, reduce_results, tp=tp, stage=stage)

    def mlp(config, intermediate_size, quant_config=None, reduce_results=True, prefix=""):
        return FakeFFN(config, int(prefix.split(".")[-2]), reduce_results, tp=tp, stage=stage)

    def attention(*a, **k):
        return FakeAttention(*a, **k, tp=tp)

    def gemma_rmsnorm(x, w, eps):
        return rms_norm(x.float(), 1.0 + w.float(), eps).to(x.dtype)

    def gemma_fused_add_rmsnorm(x, residual, w, eps):
        s = x.float() + residual.float()
        return rms_norm(s, 1.0 + w.float(), eps).to(x.dtype), s.to(x.dtype)

    g: dict[str, Any] = {
        "__name__": M3_MODULE,
        "torch": torch,
        "nn": torch.nn,
        "gemma_rmsnorm": gemma_rmsnorm,
        "gemma_fused_add_rmsnorm": gemma_fused_add_rmsnorm,
        "MiniMaxM3Attention": attention,
        "MiniMaxM3SparseAttention": attention,
        "MiniMaxM3MoE": moe,
        "MiniMaxM3MLP": mlp,
        "make_layers": make_layers,
        "PPMissingLayer": torch.nn.Identity,
        "VocabParallelEmbedding": lambda *a, **k: torch.nn.Identity(),
        "make_empty_intermediate_tensors_factory": lambda *a, **k: None,
        "get_pp_group": lambda: types.SimpleNamespace(is_first_rank=True, is_last_rank=True),
        "IntermediateTensors": dict,
        "get_tensor_model_parallel_world_size": lambda: tp.world,
        "tensor_model_parallel_all_reduce": stage.all_reduce,
    }
    for name in ("fused_allreduce_gemma_rms_norm", "initialize_m3_aiter_allreduce",
                 "m3_aiter_ar_rms_mode", "m3_defer_ffn_all_reduce", "m3_check_runtime",
                 "m3_off_fallback", "m3_report_run"):
        if hasattr(helper, name):
            g[name] = getattr(helper, name)
    compile_nodes([top_level(iface, "EagleModelMixin")], g, f"<{fs.version}>/{INTERFACES}")
    names = ["_sparse_attention_layer_ids", "_is_moe_layer", "MiniMAXGemmaRMSNorm",
             "MiniMaxM3DecoderLayer", "MiniMaxM3Model"]
    compile_nodes([top_level(tree, n) for n in names], g, f"<{fs.name}>/{realvllm.MODEL}")
    return ModelWorld(classes=g, helper=helper, stage=stage)


def build_model(world: ModelWorld, config: ToyConfig, dtype=torch.bfloat16) -> torch.nn.Module:
    """Construct the patched MiniMaxM3Model (on the calling rank's thread)."""
    vllm_config = types.SimpleNamespace(
        model_config=types.SimpleNamespace(hf_text_config=config),
        cache_config=None, quant_config=None,
        **vars(world.stage.vllm_config()))
    model = world.classes["MiniMaxM3Model"](vllm_config=vllm_config, prefix="model")
    # Replicated norm weights, small and non-zero (so `1 + weight` matters).
    for i, (name, p) in enumerate(sorted(model.named_parameters())):
        if name.endswith("layernorm.weight") or name == "norm.weight":
            with torch.no_grad():
                p.copy_(0.2 * torch.randn(p.shape, generator=_gen(7, i)))
    return model.to(dtype)


def run_forward(world: ModelWorld, model: torch.nn.Module, embeds: torch.Tensor, fs: FusionSet):
    positions = torch.arange(embeds.shape[0])
    if fs.has_pp:
        return model(None, positions, None, embeds)
    return model(None, positions, embeds)
