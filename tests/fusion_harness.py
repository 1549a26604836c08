"""CPU harness for every fusion patch set: runs the *patched* vLLM code without vLLM, AITER or a GPU.

One harness for all sets; what differs per release is a row of facts in tests/fusion_matrix.py
(`FusionSet` is that row, `SETS` the table).

- The patched text of a file is the committed diff applied (with the engine's
  `m3fuse.patching.hunks.apply_patch`) to the real release file from `tests/realvllm.py`.
  `override_source(fs, rel, text)` replaces it for as long as it is active (the mutation check
  runs matrix tests against planted bugs that way); `model_source=` / `helper_source=` do the
  same for one call.
- The stand-ins shared by every harness (`SimTP`, `FakeAiterCA`, `FakeAiterWrapper`, `M3Norm`,
  `OtherGemmaNorm`, RMSNorm math, ast helpers) live in `tests/fusion_standins.py`. The
  `FakeAiterCA`s built here keep the cross-rank sum in fp32 before the residual add.
- `Stage`: installs stand-in modules for every vLLM import the helper makes (also its lazy
  ones: `vllm._aiter_ops`, `vllm.config`, `vllm.platforms`) and stubs
  `torch.cuda.is_current_stream_capturing`, for as long as it is active. `FakeRocmAiterOps`
  answers either AITER API generation (raw object for 0.24, the TP communicator's
  `FakeAiterWrapper` for 0.25+, optionally one per rank) and, for 0.30+, vLLM's own
  `get_fused_allreduce_rmsnorm_op` (with `gemma_norm`). More stand-in modules (e.g. a
  `vllm.logger`) go in `extra_modules`, or a subclass extends `_modules()`.
- `load_model(...)`: the real classes `MiniMAXGemmaRMSNorm`, `MiniMaxM3DecoderLayer` and
  `MiniMaxM3Model` (and `EagleModelMixin` from the release's interfaces.py) compiled from
  the patched source against stand-in globals, so tests run the patched `__init__`s and
  `forward`s themselves with stand-in attention/FFN modules. With `real_ffn=True` the FFNs are
  the release's own `MiniMaxM3MoE` / `MiniMaxM3MLP` (and 0.24.0's `_M3DeferredReduceMoERunner`)
  over stand-ins for the linear layers, the gate and the MoE factory; the factory's runner runs
  the release's own `MoERunner._maybe_reduce_shared_expert_output` / `_maybe_reduce_final_output`.
  Every all-reduce is logged in `Stage.reduce_log` (rank 0, by label).
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import os
import sys
import types
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

import realvllm
from fusion_matrix import REPO, ROW_IDS, ROWS, Row
from fusion_standins import (
    M3_MODULE,
    FakeAiterCA,
    FakeAiterCAGemma,
    FakeAiterWrapper,
    OtherGemmaNorm,
    SimTP,
    compile_nodes,
    method_node,
    module_from_source,
    rms_norm,
    standin_logger_module,
    top_level,
)
from m3fuse.patching.hunks import apply_patch

INTERFACES = "vllm/model_executor/models/interfaces.py"
MOE_LAYER = "vllm/model_executor/layers/fused_moe/layer.py"
MOE_RUNNER = "vllm/model_executor/layers/fused_moe/runner/moe_runner.py"
NVIDIA_MODEL = "vllm/models/minimax_m3/nvidia/model.py"
NVIDIA_MODULE = "vllm.models.minimax_m3.nvidia.model"

# The row type keeps the name the first harness gave it.
FusionSet = Row
SETS: list[Row] = ROWS
SET_IDS = ROW_IDS

__all__ = ["FusionSet", "SETS", "SET_IDS", "Stage", "arm_world", "load_helper", "load_model", "build_model",
           "run_forward", "ToyConfig", "manifest", "patched_text", "pristine_text", "pristine_bytes",
           "override_source"]


def manifest(fs: FusionSet) -> dict:
    import tomllib

    return tomllib.loads((fs.dir / "manifest.toml").read_text())


# ----------------------------------------------------------------------------- sources
_BYTES: dict[tuple[str, str], bytes] = {}
_PATCHED: dict[tuple[str, str], str] = {}
_TREES: dict[str, ast.Module] = {}
_OVERRIDES: dict[tuple[str, str], str] = {}


_ZIPS: dict[str, zipfile.ZipFile] = {}


def release_bytes(version: str, rel: str) -> bytes:
    """A member of the release wheel, read once per session (one open zip per release: its
    central directory costs more to parse than most members do to read)."""
    key = (version, rel)
    if key not in _BYTES:
        _BYTES[key] = _zip(version).read(rel)
    return _BYTES[key]


def _zip(version: str) -> zipfile.ZipFile:
    if version not in _ZIPS:
        _ZIPS[version] = zipfile.ZipFile(realvllm.wheel_path(version))
    return _ZIPS[version]


def release_members(version: str) -> frozenset[str]:
    return frozenset(_zip(version).namelist())


def pristine_bytes(fs: FusionSet, rel: str) -> bytes:
    return release_bytes(fs.version, rel)


def pristine_text(fs: FusionSet, rel: str) -> str:
    return pristine_bytes(fs, rel).decode()


def committed_patched_text(fs: FusionSet, rel: str) -> str:
    """The committed diff applied to the real release file (never overridden)."""
    key = (fs.name, rel)
    if key not in _PATCHED:
        entry = next(f for f in manifest(fs)["files"] if f["path"] == rel)
        diff = (fs.dir / entry["patch"]).read_text()
        _PATCHED[key] = apply_patch(pristine_bytes(fs, rel), diff, name=entry["patch"]).decode()
    return _PATCHED[key]


def patched_text(fs: FusionSet, rel: str) -> str:
    """What the tests treat as the set's patched file: the committed one, or an override."""
    return _OVERRIDES.get((fs.name, rel)) or committed_patched_text(fs, rel)


@contextlib.contextmanager
def override_source(fs: FusionSet, rel: str, text: str) -> Iterator[None]:
    """Make `patched_text(fs, rel)` return `text` (a planted bug) inside the block."""
    key = (fs.name, rel)
    old = _OVERRIDES.get(key)
    _OVERRIDES[key] = text
    try:
        yield
    finally:
        if old is None:
            _OVERRIDES.pop(key, None)
        else:
            _OVERRIDES[key] = old


def tree_of(text: str) -> ast.Module:
    """Parsed once per distinct text (callers must not mutate it; compile_nodes copies)."""
    key = hashlib.sha256(text.encode()).hexdigest()
    if key not in _TREES:
        _TREES[key] = ast.parse(text)
    return _TREES[key]


# ----------------------------------------------------------------------------- AITER ops
class FakeRocmAiterOps:
    """`vllm._aiter_ops.rocm_aiter_ops` for either API generation."""

    def __init__(self, stage: "Stage") -> None:
        self.stage = stage
        self.init_calls: list[tuple] = []
        if stage.fs.aiter_api == "raw":  # 0.25+ has no such method: hasattr() tells them apart
            self.initialize_aiter_allreduce = self._initialize_aiter_allreduce
        self._wrapper: FakeAiterWrapper | None = None

    def is_enabled(self) -> bool:
        return self.stage.aiter_enabled

    def is_custom_all_reduce_enabled(self):
        st = self.stage
        if not st.rocm:  # if_aiter_supported: None off-platform
            return None
        return st.aiter_enabled and st.aiter_custom_ar_env

    def get_aiter_allreduce(self):
        st = self.stage
        if st.fs.aiter_api == "raw":
            return st.raw_ca
        if st.wrappers is not None:
            return st.wrappers[st.tp.rank]
        # 0.25+: the TP communicator built the wrapper at distributed init iff these held.
        if (st.rocm and st.aiter_enabled and st.aiter_custom_ar_env and st.custom_all_reduce
                and st.aiter_importable and st.aiter_comm and st.tp.world > 1):
            if self._wrapper is None:
                self._wrapper = FakeAiterWrapper(st.make_ca())
            return self._wrapper
        return None

    def _initialize_aiter_allreduce(self, group, device) -> None:
        st = self.stage
        self.init_calls.append((group, device))
        st.raw_ca = st.make_ca() if st.aiter_importable else None

    def get_fused_allreduce_rmsnorm_op(self):
        """vLLM 0.30+'s one-stage AITER op (`gemma_norm=True` applies 1 + weight in-kernel)."""
        st = self.stage

        def op(*, input_, residual, weight, epsilon, gemma_norm=False):
            st.upstream_op_calls.append(dict(rank=st.tp.rank, tokens=input_.shape[0], gemma_norm=gemma_norm))
            if st.op_calls_aiter:
                ar = st.rocm_aiter_ops.get_aiter_allreduce()
                return ar.aiter_ca.custom_fused_ar_rms(
                    input_, residual, weight, epsilon,
                    use_1stage=ar.use_1stage_fused_ar_rms(input_), gemma_norm=gemma_norm)
            s = st.tp.all_reduce(input_).float() + residual.float()
            scale = (1.0 + weight.float()) if gemma_norm else weight.float()
            return rms_norm(s, scale, epsilon).to(input_.dtype), s.to(input_.dtype)

        return op


# ----------------------------------------------------------------------------- AITER version
@contextlib.contextmanager
def installed_aiter(version: str) -> Iterator[None]:
    """An `amd-aiter` distribution of `version` on sys.path while active: its dist-info is all
    the helper reads (importlib.metadata, `_m3_aiter_version`; AITER itself is never imported).
    A context manager, not a fixture: the mutation check calls tests as test(fs, *args)."""
    import importlib
    import tempfile

    with tempfile.TemporaryDirectory() as site:
        d = os.path.join(site, f"amd_aiter-{version}.dist-info")
        os.mkdir(d)
        with open(os.path.join(d, "METADATA"), "w") as f:
            f.write(f"Metadata-Version: 2.1\nName: amd-aiter\nVersion: {version}\n")
        sys.path.insert(0, site)
        importlib.invalidate_caches()
        try:
            yield
        finally:
            sys.path.remove(site)
            importlib.invalidate_caches()


# ----------------------------------------------------------------------------- stage
def fp32_sum_ca(tp: SimTP) -> FakeAiterCA:
    """The default AITER stand-in here: the cross-rank sum stays fp32 until the norm."""
    return FakeAiterCA(tp, sum_dtype=torch.float32)


def fp32_sum_ca_gemma(tp: SimTP) -> FakeAiterCA:
    """The same with a `custom_fused_ar_rms` that takes gemma_norm: the AITER `off` needs on the
    rows with vLLM's own one-stage branch (0.30+); with the pinned signature the patched model
    refuses `off` there at construction (tests/test_runtime.py covers that refusal)."""
    return FakeAiterCAGemma(tp, sum_dtype=torch.float32)


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
    aiter_comm: bool = True  # the TP communicator built aiter_ar_comm (not VLLM_BATCH_INVARIANT)
    rocm: bool = True  # vllm.platforms.current_platform.is_rocm()
    ca_factory: Callable[[SimTP], FakeAiterCA] = fp32_sum_ca
    wrappers: list[Any] | None = None  # per-rank AiterCustomAllreduce wrappers (0.25+), else one shared
    capturing: bool = False
    pp: int = 1
    dp: int = 1
    pp_rank: int = 0  # this process's pipeline stage (tests/test_runtime.py)
    enable_sp: bool = False  # compilation_config.pass_config.enable_sp (where PassConfig has it)
    sp_moe: bool = False  # parallel_config.use_sequence_parallel_moe
    specialized_decode_config: Any = None  # 0.33.0: specialized_decode_config(vllm_config)
    fuse_shared_experts: bool = False  # VLLM_ROCM_USE_AITER_FUSION_SHARED_EXPERTS
    mono: bool = False  # VLLM_ROCM_MINIMAX_M3_MONO=1 (rows with mono_decode)
    kv_cache_dtype: str = "fp8"  # cache_config.cache_dtype (mono decode needs fp8)
    hidden: int = 64  # model_config.hf_text_config.hidden_size (ToyConfig.hidden_size, the tests' H)
    mxfp8: bool = False  # gfx950 + MXFP8 checkpoint: the layers take the MXFP8 norm branches
    mxfp8_calls: list = field(default_factory=list)  # (rank 0) which MXFP8 norm ran, with a partial?
    moe_kernel_reduces: bool = False  # the MoE kernel's output_is_reduced()
    # vLLM's op as in _aiter_ops.py:1191-1269 (calls the wrapper's AITER custom_fused_ar_rms with
    # gemma_norm=) instead of the math stand-in (tests/test_runtime.py).
    op_calls_aiter: bool = False
    raw_ca: FakeAiterCA | None = None
    fallback_all_reduces: int = 0
    extra_modules: dict[str, types.ModuleType] = field(default_factory=dict)
    upstream_op_calls: list[dict] = field(default_factory=list)
    reduce_log: list[str] = field(default_factory=list)  # rank 0: one label per all-reduce
    _saved: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rocm_aiter_ops = FakeRocmAiterOps(self)
        self._ca: FakeAiterCA | None = None

    def make_ca(self) -> FakeAiterCA:
        if self._ca is None:
            factory = self.ca_factory
            if factory is fp32_sum_ca and self.fs.upstream_aiter_branch:
                factory = fp32_sum_ca_gemma
            self._ca = factory(self.tp)
        return self._ca

    @property
    def ca(self) -> FakeAiterCA | None:
        return self._ca

    def vllm_config(self) -> types.SimpleNamespace:
        pc = types.SimpleNamespace(tensor_parallel_size=self.tp.world, pipeline_parallel_size=self.pp,
                                   data_parallel_size=self.dp, use_sequence_parallel_moe=self.sp_moe,
                                   enable_expert_parallel=False, enable_eplb=False)
        pass_config = types.SimpleNamespace()
        if self.fs.pass_config_enable_sp:
            pass_config.enable_sp = self.enable_sp
        elif self.enable_sp:
            raise AssertionError(f"{self.fs.name}: PassConfig has no enable_sp in this release")
        cc = types.SimpleNamespace(pass_config=pass_config, cudagraph_mode=None)
        hf = types.SimpleNamespace(hidden_size=self.hidden)
        mc = types.SimpleNamespace(dtype=torch.bfloat16, hf_config=hf, hf_text_config=hf, max_model_len=4096)
        cache = types.SimpleNamespace(cache_dtype=self.kv_cache_dtype, block_size=128)
        attn = types.SimpleNamespace(resolve_indexer_kv_dtype=lambda default: "fp8")
        return types.SimpleNamespace(parallel_config=pc, compilation_config=cc, model_config=mc,
                                     cache_config=cache, attention_config=attn)

    def all_reduce(self, x: torch.Tensor, label: str = "comm-op") -> torch.Tensor:
        if self.tp.rank == 0:
            self.fallback_all_reduces += 1
            self.reduce_log.append(label)
        return self.tp.all_reduce(x)

    def _modules(self) -> dict[str, types.ModuleType]:
        st = self

        def mod(name: str, **attrs: Any) -> types.ModuleType:
            m = types.ModuleType(name)
            m.__path__ = []  # a package, so submodule imports resolve through sys.modules
            m.__dict__.update(attrs)
            return m

        class _Platform:
            @staticmethod
            def is_rocm() -> bool:
                return st.rocm

        tp_group = types.SimpleNamespace(cpu_group="tp-cpu-group", device=torch.device("cpu"),
                                         device_group="tp-device-group", device_communicator=None)
        ps = mod("vllm.distributed.parallel_state",
                 get_tensor_model_parallel_rank=lambda: self.tp.rank,
                 get_tensor_model_parallel_world_size=lambda: self.tp.world,
                 get_tp_group=lambda: tp_group,
                 # 0.30+'s EagleModelMixin asks for the PP layout of the captures; the run report
                 # asks for this process's stage
                 get_pp_group=lambda: types.SimpleNamespace(world_size=1, is_first_rank=True, is_last_rank=True,
                                                            rank_in_group=self.pp_rank),
                 model_parallel_is_initialized=lambda: True,
                 _ENABLE_CUSTOM_ALL_REDUCE=self.custom_all_reduce)
        co = mod("vllm.distributed.communication_op", tensor_model_parallel_all_reduce=self.all_reduce)
        dist = mod("vllm.distributed", parallel_state=ps, communication_op=co,
                   tensor_model_parallel_all_reduce=self.all_reduce,
                   get_tensor_model_parallel_world_size=lambda: self.tp.world)
        layernorm = mod("vllm.model_executor.layers.layernorm", GemmaRMSNorm=OtherGemmaNorm)
        mods = {
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
            "vllm.platforms": mod("vllm.platforms", current_platform=_Platform()),
        }
        mods.update(self.extra_modules)
        return mods

    def __enter__(self) -> "Stage":
        mods = self._modules()
        self._saved = {"modules": {k: sys.modules.get(k) for k in mods},
                       "capturing": torch.cuda.is_current_stream_capturing,
                       "env": os.environ.get("M3_AITER_AR_RMS_MODE")}
        # Only the stand-ins answer vllm imports (the helper's flashinfer import fails as on ROCm).
        for k in [k for k in sys.modules if k == "vllm" or k.startswith("vllm.")]:
            self._saved["modules"].setdefault(k, sys.modules[k])
            del sys.modules[k]
        sys.modules.update(mods)
        torch.cuda.is_current_stream_capturing = lambda: self.capturing
        self.set_mode(self.mode)
        return self

    def set_mode(self, mode: str | None) -> None:
        self.mode = mode
        if mode is None:
            os.environ.pop("M3_AITER_AR_RMS_MODE", None)
        else:
            os.environ["M3_AITER_AR_RMS_MODE"] = mode

    def __exit__(self, *exc: Any) -> None:
        for k in [k for k in sys.modules if k == "vllm" or k.startswith("vllm.")]:
            del sys.modules[k]
        for k in self.extra_modules:
            sys.modules.pop(k, None)
        for k, v in self._saved["modules"].items():
            if v is not None:
                sys.modules[k] = v
        torch.cuda.is_current_stream_capturing = self._saved["capturing"]
        if self._saved["env"] is None:
            os.environ.pop("M3_AITER_AR_RMS_MODE", None)
        else:
            os.environ["M3_AITER_AR_RMS_MODE"] = self._saved["env"]


def arm_world(fs: FusionSet, mode: str | None) -> dict[str, Any]:
    """Stage settings beyond the mode that `m3fuse env MODE` prints for the pinned AITER (the
    default stand-in's signature: `custom_fused_ar_rms` without gemma_norm): on a release whose
    helper has vLLM's own one-stage AITER branch (0.30+), `off` comes with
    VLLM_ROCM_USE_AITER_CUSTOM_AR=0, without which the patched model refuses `off` at
    construction (m3_check_runtime). tests/test_runtime.py checks the two agree."""
    if mode == "off" and fs.upstream_aiter_branch:
        return {"aiter_custom_ar_env": False}
    return {}


def load_helper(fs: FusionSet, name: str = "m3_helper_under_test", source: str | None = None) -> types.ModuleType:
    """The patched helper (or `source`) as a fresh module (call inside an active Stage)."""
    text = source if source is not None else patched_text(fs, realvllm.HELPER)
    return module_from_source(text, name, f"<patched {fs.name}>/{realvllm.HELPER}")


# ----------------------------------------------------------------------------- model
@dataclass
class ToyConfig:
    """The hf_text_config fields the decoder layer, model and MoE constructors read."""

    hidden_size: int = 64
    num_hidden_layers: int = 4
    rms_norm_eps: float = 1e-6
    vocab_size: int = 97
    dense_intermediate_size: int = 96
    moe_layer_freq: list = field(default_factory=lambda: [0, 1, 1, 1])
    sparse_attention_config: Any = None
    # MoE (real_ffn)
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    intermediate_size: int = 32
    n_shared_experts: int = 1
    routed_scaling_factor: float = 1.5
    scoring_func: str = "sigmoid"
    use_routing_bias: bool = False
    hidden_act: str = "swigluoai"
    swiglu_alpha: float = 1.702
    swiglu_beta: float = 1.0
    swiglu_limit: float = 7.0

    # The same layer plan in the spelling of releases that name it per layer (0.34.0's
    # `config_fields`: `layer_types`, `mlp_layer_types`).
    @property
    def layer_types(self) -> list[str]:
        return ["full_attention"] * self.num_hidden_layers

    @property
    def mlp_layer_types(self) -> list[str]:
        return ["sparse" if f else "dense" for f in self.moe_layer_freq]


class HarnessGap(RuntimeError):
    """The fusion harness cannot stand in for a row's release: one message naming what is
    missing (a stand-in, a config field), instead of a failure per test."""


def harness_gap(fs: FusionSet, what: str) -> HarnessGap:
    return HarnessGap(
        f"tests/fusion_harness.py cannot stand in for {fs.name} (vLLM {fs.version}): {what}. "
        "Add the stand-in to EXTRA_STANDINS (or the field to ToyConfig and LAYER_PLAN_FIELDS in "
        "tests/fusion_facts.py), then re-derive the row's `model_standins` / `config_fields` with "
        "`python tools/release_facts.py --write`.")


def _gen(*key: Any) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(hashlib.sha256(repr(key).encode()).hexdigest()[:8], 16))
    return g


class FakeAttention(torch.nn.Module):
    """Row-parallel output like o_proj with reduce_results=False: a per-rank partial sum."""

    def __init__(self, config, layer_id, quant_config=None, prefix="", cache_config=None,
                 topk_indices_buffer=None, *, tp: SimTP, **release_specific: Any) -> None:
        super().__init__()
        h = config.hidden_size
        self.a = torch.nn.Parameter(torch.randn(h, h, generator=_gen(layer_id, 1, tp.rank)) / h ** 0.5)
        self.qkv_proj = torch.nn.Identity()  # what 0.34+'s MXFP8 input-norm check inspects

    def forward(self, positions, hidden_states):
        x = dequant(hidden_states)
        return x @ self.a.to(x.dtype)


class QuantizedActivationStandIn:
    """0.34+'s `QuantizedActivation` (an MXFP8 activation handed to a linear): here the values
    stay in the activation dtype, so a stand-in linear reads them back with `dequant`."""

    def __init__(self, x_q, x_scale, dtype, shape, key) -> None:
        self.x_q, self.x_scale, self.dtype, self.shape, self.key = x_q, x_scale, dtype, shape, key


def dequant(x):
    return x.x_q.to(x.dtype) if isinstance(x, QuantizedActivationStandIn) else x


class FakeFFN(torch.nn.Module):
    """Dense MLP / MoE stand-in honouring reduce_results like RowParallelLinear / the MoE runner."""

    # 0.34's mono decode check reads these (mono/dispatch.py _separate_shared_ok): no shared
    # expert in the stand-in
    is_fused_shared_expert_enabled = False
    shared_experts = None

    def __init__(self, config, layer_id, reduce_results: bool, *, tp: SimTP, stage: Stage) -> None:
        super().__init__()
        h = config.hidden_size
        self.tp, self.stage, self.reduce_results = tp, stage, reduce_results
        self.defers_all_reduce = not reduce_results
        self.b = torch.nn.Parameter(torch.randn(h, 2 * h, generator=_gen(layer_id, 2)) / h ** 0.5)
        self.c = torch.nn.Parameter(torch.randn(2 * h, h, generator=_gen(layer_id, 3, tp.rank)) / h ** 0.5)
        # what 0.34+'s MXFP8 post-norm check inspects (the MoE's shared expert: this module)
        self.gate_up_proj, self.down_proj = torch.nn.Identity(), torch.nn.Identity()
        self.__dict__["shared_experts"] = self  # not a submodule (that would recurse)

    def forward(self, x, shared_prequant=None):
        x = dequant(x)
        part = torch.tanh(x @ self.b.to(x.dtype)) @ self.c.to(x.dtype)
        return self.stage.all_reduce(part, "ffn") if self.reduce_results and self.tp.world > 1 else part


# --- the release's own FFN classes over counting stand-ins (real_ffn=True)
def shard(prefix: str, rank: int, shape: tuple[int, ...], scale: float) -> torch.Tensor:
    """Rank `rank`'s shard of the weight `prefix`, deterministic (fp32)."""
    return torch.randn(*shape, generator=_gen(prefix, rank)) * scale


class ColumnLinear(torch.nn.Module):
    """MergedColumnParallelLinear: rank r holds columns r of every output; no communication."""

    def __init__(self, input_size, output_sizes, bias=False, quant_config=None, prefix="", *, tp, **_):
        super().__init__()
        self.prefix, self.tp = prefix, tp
        self.shape = (input_size, sum(output_sizes) // tp.world)
        self.weight = torch.nn.Parameter(shard(prefix, tp.rank, self.shape, input_size ** -0.5))

    def forward(self, x):
        return x @ self.weight.to(x.dtype), None


class RowLinear(torch.nn.Module):
    """RowParallelLinear: a per-rank partial sum, all-reduced iff reduce_results (vLLM's rule)."""

    def __init__(self, input_size, output_size, bias=False, quant_config=None, reduce_results=True,
                 prefix="", *, tp, stage, **_):
        super().__init__()
        self.prefix, self.tp, self.stage, self.reduce_results = prefix, tp, stage, reduce_results
        self.shape = (input_size // tp.world, output_size)
        self.weight = torch.nn.Parameter(shard(prefix, tp.rank, self.shape, input_size ** -0.5))

    def forward(self, x):
        y = x @ self.weight.to(x.dtype)
        if self.reduce_results and self.tp.world > 1:
            y = self.stage.all_reduce(y, self.prefix)
        return y, None


def swiglu_oai_split(gate_up, alpha, beta, limit):
    gate, up = gate_up.chunk(2, dim=-1)
    gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return gate * torch.sigmoid(alpha * gate) * (up + beta)


class GateStandIn(torch.nn.Module):
    """GateLinear: replicated fp32 router weights, fp32 logits."""

    def __init__(self, input_size, output_size, bias=False, params_dtype=None, out_dtype=None, prefix="", **_):
        super().__init__()
        self.out_dtype = out_dtype
        self.weight = torch.nn.Parameter(shard(prefix, "replicated", (input_size, output_size), input_size ** -0.5))

    def forward(self, x):
        return x.float() @ self.weight.float(), None


class RunnerBase:
    """MoERunner's attributes that its reduction methods read; the methods themselves are the
    release's own (compiled onto a subclass per release)."""

    def __init__(self, moe_config, stage: Stage, routed_scaling_factor: float) -> None:
        self.moe_config = moe_config
        self.stage = stage
        self.routed_scaling_factor = routed_scaling_factor

    @property
    def _fused_output_is_reduced(self) -> bool:
        return self.stage.moe_kernel_reduces


class FakeFusedMoE(torch.nn.Module):
    """The routed experts + runner: a per-rank routed partial, the shared expert run and summed
    the way MoERunner does (reduce shared separately only if the kernel reduced, then sum, then
    `_maybe_reduce_final_output`)."""

    def __init__(self, *, runner, shared_experts, config_hidden: int, routed_scaling_factor: float,
                 apply_routed_scale_to_output: bool, prefix: str, tp: SimTP, stage: Stage,
                 output_is_reduced_arg: bool) -> None:
        super().__init__()
        self.runner, self.shared_experts, self.tp, self.stage = runner, shared_experts, tp, stage
        self.moe_config = runner.moe_config
        self.scale = routed_scaling_factor if apply_routed_scale_to_output else 1.0
        self.output_is_reduced_arg = output_is_reduced_arg
        h = config_hidden
        self.up = torch.nn.Parameter(shard(prefix + ".up", "replicated", (h, 2 * h), h ** -0.5))
        self.down = torch.nn.Parameter(shard(prefix + ".down", tp.rank, (2 * h, h), h ** -0.5))

    @property
    def _fused_output_is_reduced(self) -> bool:
        return self.runner._fused_output_is_reduced

    def forward(self, hidden_states, router_logits):
        x = hidden_states
        weight = torch.sigmoid(router_logits[:, :1]).to(x.dtype)
        fused = (torch.tanh(x @ self.up.to(x.dtype)) @ self.down.to(x.dtype)) * weight
        if self._fused_output_is_reduced:  # a kernel that reduces its own output
            fused = self.stage.all_reduce(fused, "moe-kernel")
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        if hasattr(self.runner, "_maybe_reduce_shared_expert_output"):
            shared = self.runner._maybe_reduce_shared_expert_output(shared)
        fused = fused * self.scale
        out = fused if shared is None else shared + fused
        return self.runner._maybe_reduce_final_output(out, None)


def _factory_params(fs: FusionSet) -> set[str]:
    tree = tree_of(release_bytes(fs.version, MOE_LAYER).decode())
    fn = top_level(tree, fs.moe_factory, (ast.FunctionDef,))
    return {a.arg for a in fn.args.args + fn.args.kwonlyargs}


def _runner_base(fs: FusionSet, stage: Stage) -> type:
    """MoERunner stand-in carrying the release's own reduction methods."""
    tree = tree_of(release_bytes(fs.version, MOE_RUNNER).decode())
    names = ["_maybe_reduce_final_output", "_maybe_reduce_shared_expert_output"]
    nodes = []
    for n in names:
        with contextlib.suppress(KeyError):
            nodes.append(method_node(tree, "MoERunner", n))
    ns = compile_nodes(nodes, {"torch": torch, "tensor_model_parallel_all_reduce":
                               lambda x: stage.all_reduce(x, "moe-final")},
                       f"<{fs.version}>/{MOE_RUNNER}", fresh_namespace=True)
    return type("MoERunner", (RunnerBase,), {n.name: ns[n.name] for n in nodes})


def _ffn_globals(fs: FusionSet, stage: Stage, g: dict) -> dict:
    """Stand-in globals for the release's MiniMaxM3MoE / MiniMaxM3MLP."""
    tp = stage.tp
    accepted = _factory_params(fs)
    MoERunner = _runner_base(fs, stage)
    g["MoERunner"] = MoERunner

    def factory(**kwargs):
        unknown = set(kwargs) - accepted
        if unknown:
            raise TypeError(f"{fs.moe_factory}() got unexpected keyword argument(s) {sorted(unknown)}")
        reduce_results = kwargs.get("reduce_results", True)
        skip = not reduce_results and not (stage.sp_moe or kwargs.get("zero_expert_num"))
        moe_config = types.SimpleNamespace(
            is_sequence_parallel=stage.sp_moe, tp_size=tp.world, ep_size=1, skip_final_all_reduce=skip,
            moe_parallel_config=types.SimpleNamespace(use_all2all_kernels=False))
        runner_cls = kwargs.get("runner_cls") or MoERunner
        runner = runner_cls(moe_config, stage, kwargs.get("routed_scaling_factor", 1.0))
        return FakeFusedMoE(runner=runner, shared_experts=kwargs.get("shared_experts"),
                            config_hidden=kwargs["hidden_size"],
                            routed_scaling_factor=kwargs.get("routed_scaling_factor", 1.0),
                            apply_routed_scale_to_output=kwargs.get("apply_routed_scale_to_output", True),
                            prefix=kwargs.get("prefix", ""), tp=tp, stage=stage,
                            output_is_reduced_arg=fs.runner_output_is_reduced_arg)

    g.update({
        fs.moe_factory: factory,
        "GateLinear": GateStandIn,
        "MergedColumnParallelLinear": lambda *a, **k: ColumnLinear(*a, **k, tp=tp),
        "RowParallelLinear": lambda *a, **k: RowLinear(*a, **k, tp=tp, stage=stage),
        "swiglu_oai_split": swiglu_oai_split,
        "_fuse_shared_experts_enabled": lambda config: stage.fuse_shared_experts,
        "_aiter_moe_fused_shared_experts_enabled": lambda *a: False,
        "envs": types.SimpleNamespace(VLLM_ROCM_USE_AITER_FUSION_SHARED_EXPERTS=stage.fuse_shared_experts),
        "is_shared_expert_quant_fse_compatible": lambda *a: (True, ""),
        "logger": types.SimpleNamespace(warning=lambda *a, **k: None, info=lambda *a, **k: None),
    })
    return g


def _mxfp8_norm(stage: Stage, kind: str):
    """0.34+'s Triton Gemma norm + MXFP8 quant (`gemma_fused_add_rmsnorm_mxfp8`): no all-reduce.
    Logs on rank 0 which ran; the values stay in the activation dtype (QuantizedActivationStandIn)."""

    def norm(x, residual, w, eps):
        if stage.tp.rank == 0:
            stage.mxfp8_calls.append(kind)
        s = x.float() + residual.float()
        return rms_norm(s, 1.0 + w.float(), eps).to(x.dtype), None, s.to(x.dtype)

    return norm


def _mxfp8_ops_module(stage: Stage) -> types.ModuleType:
    """`vllm.models.minimax_m3.amd.ops` as the 0.34+ helper's `allreduce_gemma_rms_norm_mxfp8`
    imports it (the post-attention norm + quant, after its own plain all-reduce)."""
    m = types.ModuleType("vllm.models.minimax_m3.amd.ops")
    m.gemma_fused_add_rmsnorm_mxfp8 = _mxfp8_norm(stage, "post")
    post = m.gemma_fused_add_rmsnorm_mxfp8

    def with_bf16(x, residual, w, eps):
        x_q, scale, res = post(x, residual, w, eps)
        return x_q, scale, x_q, res

    m.gemma_fused_add_rmsnorm_mxfp8_and_bf16 = with_bf16
    return m


# Stand-ins for names only some releases' model classes use, by name: a row's
# `model_standins` fact says which its release needs; the harness installs exactly those.
EXTRA_STANDINS: dict[str, Callable[[Stage], Any]] = {
    "_can_fuse_input_norm_mxfp8": lambda st: (lambda module: st.mxfp8),
    "mono_envs": lambda st: types.SimpleNamespace(MONO_ENABLE=st.mono),
    "pp_splits_layer_sharing": lambda st: (lambda *a, **k: False),
    "_should_skip_index_topk": lambda st: (lambda *a, **k: False),
    "get_fused_shared_expert_layers": lambda st: (lambda *a, **k: []),
    "resolve_layer_fused_shared_expert": lambda st: (lambda *a, **k: st.fuse_shared_experts),
    "gemma_fused_add_rmsnorm_mxfp8": lambda st: _mxfp8_norm(st, "input"),
    "QuantizedActivation": lambda st: QuantizedActivationStandIn,
    "kMxfp8Dynamic": lambda st: "kMxfp8Dynamic",
    "ModelOptMxFp8Config": lambda st: type("ModelOptMxFp8Config", (), {}),  # no toy config is one
}


HARNESS_NODES = ("_sparse_attention_layer_ids", "_is_moe_layer", "MiniMAXGemmaRMSNorm", "MiniMaxM3MLP",
                 "MiniMaxM3MoE", "MiniMaxM3DecoderLayer", "MiniMaxM3Model")


def release_model_names(version: str) -> tuple[frozenset[str], frozenset[str]]:
    """What the harness runs of a release's pristine model (the layer-plan functions, and the
    `__init__`/`forward` of the classes in HARNESS_NODES): the global names it reads and the
    `config.X` fields. The facts `model_standins` / `config_fields` are checked against these."""
    import builtins

    tree = tree_of(release_bytes(version, realvllm.MODEL).decode())
    nodes: list[ast.AST] = []
    for n in tree.body:
        if getattr(n, "name", None) not in HARNESS_NODES:
            continue
        if isinstance(n, ast.ClassDef):
            nodes += [m for m in n.body if isinstance(m, ast.FunctionDef) and m.name in ("__init__", "forward")]
        else:
            nodes.append(n)
    loads, bound, fields = set(), set(), set()
    for node in nodes:
        for n in ast.walk(node):
            if isinstance(n, ast.Name):
                (loads if isinstance(n.ctx, ast.Load) else bound).add(n.id)
            elif isinstance(n, ast.arg):
                bound.add(n.arg)
            elif isinstance(n, (ast.Import, ast.ImportFrom)):
                bound.update((a.asname or a.name).split(".")[0] for a in n.names)
            elif isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "config":
                fields.add(n.attr)
    free = loads - bound - set(dir(builtins)) - set(HARNESS_NODES)
    return frozenset(free), frozenset(fields)


def _release_standins(fs: FusionSet, stage: Stage, helper: types.ModuleType) -> dict[str, Any]:
    """The row's `model_standins` (and `config_fields`), or one HarnessGap naming every name
    the harness has no stand-in for."""
    missing = [n for n in fs.model_standins if n not in EXTRA_STANDINS and not hasattr(helper, n)]
    missing_fields = [f for f in fs.config_fields if not hasattr(ToyConfig, f)]
    if missing or missing_fields:
        parts = ([f"no stand-in for {', '.join(missing)}"] if missing else []) + (
            [f"ToyConfig has no {', '.join(missing_fields)}"] if missing_fields else [])
        raise harness_gap(fs, "; ".join(parts))
    out = {n: getattr(helper, n) if hasattr(helper, n) else EXTRA_STANDINS[n](stage)
           for n in fs.model_standins}
    if fs.mxfp8_norms:
        _install_module(_mxfp8_ops_module(stage))
    if fs.mono_decode:
        _install_module(_mono_dispatch_module(fs))
    return out


def _install_module(m: types.ModuleType) -> None:
    """Put `m` (and any missing parent package) in sys.modules; the Stage removes every vllm.*
    module on exit."""
    parts = m.__name__.split(".")
    for i in range(1, len(parts)):
        parent = ".".join(parts[:i])
        if parent not in sys.modules:
            pkg = types.ModuleType(parent)
            pkg.__path__ = []
            sys.modules[parent] = pkg
    sys.modules[m.__name__] = m


MONO_DIR = "vllm/models/minimax_m3/amd/mono/"


def _mono_dispatch_module(fs: FusionSet) -> types.ModuleType:
    """0.34+'s `amd/mono/dispatch.py` as far as construction goes: the release's own
    `_config_refusal` (and its layer checks, `dense_prefix` from runner.py, the constants and
    `MonoUnsupported` of config.py) and `MonoDecode.__init__`, which decide whether mono decode
    runs. Stand-in: `supports` is False (the kernels need 256 CUs, FlyDSL and a GPU), so the
    tests look at what the model built around it."""
    m = types.ModuleType("vllm.models.minimax_m3.amd.mono.dispatch")
    config = types.ModuleType("vllm.models.minimax_m3.amd.mono.config")
    _install_module(config)  # before it runs: its dataclasses look their module up
    exec(compile(release_bytes(fs.version, MONO_DIR + "config.py").decode(), f"<{fs.version}>/{MONO_DIR}config.py",
                 "exec"), config.__dict__)
    runner = ast.parse(release_bytes(fs.version, MONO_DIR + "runner.py").decode())
    tree = ast.parse(release_bytes(fs.version, MONO_DIR + "dispatch.py").decode())
    g = dict(config.__dict__)
    g.update(torch=torch, envs=types.SimpleNamespace(MONO_ENABLE=True), cast=lambda t, v: v, Any=Any,
             logger=types.SimpleNamespace(info=lambda *a, **k: None, warning=lambda *a, **k: None))
    compile_nodes([top_level(runner, "dense_prefix")], g, f"<{fs.version}>/{MONO_DIR}runner.py")
    compile_nodes([top_level(tree, n) for n in ("_dense_prefix_ok", "_separate_shared_ok", "_config_refusal")],
                  g, f"<{fs.version}>/{MONO_DIR}dispatch.py")
    init = method_node(tree, "MonoDecode", "__init__")
    ns = compile_nodes([init], dict(g), f"<{fs.version}>/{MONO_DIR}dispatch.py")

    class MonoDecode:
        __init__ = ns["__init__"]

        def supports(self, *args) -> bool:
            return False

    m.MonoDecode = MonoDecode
    m._config_refusal = g["_config_refusal"]
    return m


@dataclass
class ModelWorld:
    classes: dict
    helper: types.ModuleType
    stage: Stage
    fs: FusionSet | None = None


FFN_CLASSES = ("MiniMaxM3MLP", "MiniMaxM3MoE")


def load_model(fs: FusionSet, stage: Stage, model_source: str | None = None, *,
               helper_source: str | None = None, real_ffn: bool = False,
               extra_globals: dict[str, Any] | None = None) -> ModelWorld:
    """Compile the real decoder-layer/model classes of the (patched) model source against
    stand-ins; call inside an active Stage. `model_source` / `helper_source` override the
    patched texts (tests use them to prove a broken file is caught); `extra_globals` adds names
    the source uses (tests/test_reader_values.py: its probe)."""
    helper = load_helper(fs, source=helper_source)
    src = model_source if model_source is not None else patched_text(fs, realvllm.MODEL)
    tree = tree_of(src)
    iface = tree_of(release_bytes(fs.version, INTERFACES).decode())
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
        "__package__": M3_MODULE.rpartition(".")[0],
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
        "tensor_model_parallel_all_reduce": lambda x: stage.all_reduce(x, "model"),
        # 0.29+: the model asks whether every MoE layer fused its shared expert
        "is_model_fused_shared_expert_compatible": lambda *a, **k: False,
        # 0.33.0: specialized ("monokernel") decode
        "specialized_decode_config": lambda vllm_config: stage.specialized_decode_config,
        "spec_decode_needs_target_embed": lambda *a, **k: False,
        "get_current_vllm_config": stage.vllm_config,
        "logger": types.SimpleNamespace(info_once=lambda *a, **k: None, warning=lambda *a, **k: None,
                                        info=lambda *a, **k: None),
    }
    g.update(_release_standins(fs, stage, helper))
    g.update(extra_globals or {})
    for name in ("fused_allreduce_gemma_rms_norm", "initialize_m3_aiter_allreduce",
                 "m3_aiter_ar_rms_mode", "m3_defer_ffn_all_reduce", "m3_check_runtime",
                 "m3_off_fallback", "m3_report_run"):
        if hasattr(helper, name):
            g[name] = getattr(helper, name)
    compile_nodes([top_level(iface, "EagleModelMixin")], g, f"<{fs.version}>/{INTERFACES}",
                  cache_key=(fs.version, INTERFACES))
    names = ["_sparse_attention_layer_ids", "_is_moe_layer", "MiniMAXGemmaRMSNorm"]
    if real_ffn:
        _ffn_globals(fs, stage, g)
        names += [n for n in ("_M3DeferredReduceMoERunner",) if _has(tree, n)] + list(FFN_CLASSES)
    names += [n for n in ("_m3_mono_status",) if _has(tree, n)] + ["MiniMaxM3DecoderLayer", "MiniMaxM3Model"]
    compile_nodes([top_level(tree, n) for n in names], g, f"<{fs.name}>/{realvllm.MODEL}",
                  cache_key=(hashlib.sha256(src.encode()).hexdigest(), tuple(names)))
    return ModelWorld(classes=g, helper=helper, stage=stage, fs=fs)


def _has(tree: ast.Module, name: str) -> bool:
    try:
        top_level(tree, name)
        return True
    except KeyError:
        return False


def build_vllm_config(stage: Stage, config: ToyConfig) -> types.SimpleNamespace:
    base = vars(stage.vllm_config())
    mc = base.pop("model_config")
    mc.hf_text_config = mc.hf_config = config
    return types.SimpleNamespace(
        model_config=mc, quant_config=None, use_v2_model_runner=False,
        scheduler_config=types.SimpleNamespace(max_num_batched_tokens=64), **base)


def build_model(world: ModelWorld, config: ToyConfig, dtype=torch.bfloat16) -> torch.nn.Module:
    """Construct the patched MiniMaxM3Model (on the calling rank's thread)."""
    try:
        model = world.classes["MiniMaxM3Model"](vllm_config=build_vllm_config(world.stage, config),
                                                prefix="model")
    except NameError as exc:  # a name the row's facts do not list
        fs = world.fs
        if fs is None or exc.name in world.classes:
            raise
        raise harness_gap(fs, f"its model code uses {exc.name!r}, which no stand-in answers") from exc
    except AttributeError as exc:
        if world.fs is None or not isinstance(exc.obj, ToyConfig):
            raise
        raise harness_gap(world.fs, f"its model code reads config.{exc.name}") from exc
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


# ----------------------------------------------------------------------------- NVIDIA norm
def nvidia_norm_class(fs: FusionSet) -> type:
    """The release's own NVIDIA `MiniMAXGemmaRMSNorm` (module vllm.models.minimax_m3.nvidia.model):
    same class name as M3's ROCm norm, another module. Its forward imports flashinfer.norm:
    stage `flashinfer_norm_modules()` for it."""
    tree = tree_of(release_bytes(fs.version, NVIDIA_MODEL).decode())
    g = {"__name__": NVIDIA_MODULE, "torch": torch, "nn": torch.nn}
    compile_nodes([top_level(tree, "MiniMAXGemmaRMSNorm")], g, f"<{fs.version}>/{NVIDIA_MODEL}")
    return g["MiniMAXGemmaRMSNorm"]


def flashinfer_norm_modules() -> dict[str, types.ModuleType]:
    """flashinfer.norm's Gemma kernels (fused add + norm in place), for the NVIDIA norm."""

    def gemma_rmsnorm(x, w, eps):
        return rms_norm(x.float(), 1.0 + w.float(), eps).to(x.dtype)

    def gemma_fused_add_rmsnorm(x, residual, w, eps):
        s = x.float() + residual.float()
        residual.copy_(s.to(residual.dtype))
        x.copy_(rms_norm(s, 1.0 + w.float(), eps).to(x.dtype))

    pkg = types.ModuleType("flashinfer")
    pkg.__path__ = []
    norm = types.ModuleType("flashinfer.norm")
    norm.gemma_rmsnorm, norm.gemma_fused_add_rmsnorm = gemma_rmsnorm, gemma_fused_add_rmsnorm
    pkg.norm = norm
    return {"flashinfer": pkg, "flashinfer.norm": norm}
