"""CPU stand-ins for running the vllm-0.33.0 set's patched code without vLLM, AITER or a GPU.

- `SimTP`: a simulated tensor-parallel group of N ranks, one thread per rank, with an
  out-of-place all-reduce (fp32 sum in rank order, rounded to the input dtype).
- `FakeAiterCA`: AITER's raw `CustomAllreduce` with the exact `fused_ar_rms` signature of the
  pinned build (0.1.15.post1: keyword-only `w`, `eps`, `registered`, `use_1stage`, no
  `gemma_norm`); it computes sum + residual add + RMSNorm scaled by `w` and records its
  arguments. `FakeAiterWrapper` is vLLM 0.33.0's `AiterCustomAllreduce` surface (`aiter_ca`,
  `disabled`, `should_custom_ar`, `supports_dynamic_hidden_dim`, `use_1stage_fused_ar_rms`).
- `load_helper(source)`: the helper module built from source text with stand-ins for every vLLM
  import it makes (also the lazy `vllm._aiter_ops`), for as long as `Stage` is active.
- `M3Norm`: a norm class named and placed like M3's ROCm `MiniMAXGemmaRMSNorm` (fp32 math,
  scales by 1 + weight), so the helper recognises it by name without importing the model.
- `model_functions(source, ...)`: selected functions of the real model file, compiled against
  stand-in globals, so tests run the patched `forward` code itself.

This is a 0.33.0-specific harness (the lead may fold it into tests/fusion_harness.py later).
"""

from __future__ import annotations

import ast
import sys
import threading
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

M3_MODULE = "vllm.models.minimax_m3.amd.model"


# ----------------------------------------------------------------------------- TP group
class SimTP:
    def __init__(self, world: int) -> None:
        self.world = world
        self._local = threading.local()
        self._barrier = threading.Barrier(world)
        self._slots: list[torch.Tensor | None] = [None] * world
        self.all_reduce_calls = 0  # counted on rank 0

    @property
    def rank(self) -> int:
        return getattr(self._local, "rank", 0)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return x
        r = self.rank
        self._slots[r] = x
        self._barrier.wait(timeout=60)
        acc = torch.zeros(x.shape, dtype=torch.float32)
        for t in self._slots:
            acc = acc + t.float()
        self._barrier.wait(timeout=60)
        if r == 0:
            self.all_reduce_calls += 1
        return acc.to(x.dtype)

    def run(self, fn: Callable[[int], Any]) -> list[Any]:
        """fn(rank) on every rank concurrently; returns the per-rank results in rank order."""
        out: list[Any] = [None] * self.world
        errs: list[BaseException] = []

        def body(r: int) -> None:
            self._local.rank = r
            try:
                out[r] = fn(r)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errs.append(e)
                self._barrier.abort()

        if self.world == 1:
            body(0)
        else:
            ts = [threading.Thread(target=body, args=(r,)) for r in range(self.world)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(120)
        if errs:
            raise errs[0]
        return out


# ----------------------------------------------------------------------------- AITER
def rms_ref(s: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    s = s.double()
    return s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * scale.double()


@dataclass
class FakeAiterCA:
    """AITER 0.1.15.post1 `CustomAllreduce` as far as the helper uses it."""

    tp: SimTP
    fully_connected: bool = True
    calls: list[dict] = field(default_factory=list)
    disabled: bool = False
    _pool: dict = field(default_factory=dict)  # present from AITER 0.1.12 on

    @property
    def world_size(self) -> int:
        return self.tp.world

    def fused_ar_rms(self, inp, res_inp, *, res_out=None, out=None, scale_out=None, w, eps,
                     registered=False, use_1stage=False, post_per_token_quant=False):
        self.calls.append(dict(rank=self.tp.rank, shape=tuple(inp.shape), dtype=inp.dtype,
                               w=w.detach().clone(), eps=eps, registered=registered,
                               use_1stage=use_1stage, post_per_token_quant=post_per_token_quant,
                               res_out=res_out, out=out))
        s = self.tp.all_reduce(inp).float() + res_inp.float()
        normed = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * w.float()
        return normed.to(inp.dtype), s.to(inp.dtype)


class FakeAiterCANoStage(FakeAiterCA):
    """An AITER build whose fused_ar_rms has no `use_1stage` (the public 0.1.7 wheel)."""

    def fused_ar_rms(self, inp, res_inp, *, res_out=None, out=None, w, eps, registered=False):  # type: ignore[override]
        raise AssertionError("must not be called")


@dataclass
class FakeAiterWrapper:
    """vLLM 0.33.0 `AiterCustomAllreduce` (vllm/distributed/device_communicators/aiter_custom_all_reduce.py)."""

    aiter_ca: Any
    disabled: bool = False
    max_bytes: int = 8192 * 1024 * 8
    one_stage_queries: int = 0

    def should_custom_ar(self, inp: torch.Tensor) -> bool:
        return inp.numel() * inp.element_size() <= self.max_bytes

    @property
    def supports_dynamic_hidden_dim(self) -> bool:
        return hasattr(self.aiter_ca, "_pool")

    @staticmethod
    def effective_max_size() -> int:
        return 8192 * 1024 * 8

    def use_1stage_fused_ar_rms(self, inp: torch.Tensor) -> bool:
        # The real decision (aiter_custom_all_reduce.py:90-122) for a fully connected group.
        self.one_stage_queries += 1
        hidden = inp.shape[-1]
        if inp.numel() // hidden > 80:
            return False
        total = inp.numel() * inp.element_size()
        w = self.aiter_ca.world_size
        return w == 2 or (w <= 4 and total < 256 * 1024) or (w <= 8 and total < 128 * 1024)


# ----------------------------------------------------------------------------- norms
class M3Norm(torch.nn.Module):
    """Stand-in for M3's ROCm `MiniMAXGemmaRMSNorm` (model.py:242-271): fp32, scale 1 + weight."""

    def __init__(self, hidden: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(hidden))
        self.variance_epsilon = eps
        self.calls = 0

    def forward(self, x, residual=None):
        self.calls += 1
        if residual is None:
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
                    * (1.0 + self.weight.float())).to(x.dtype)
        s = x.float() + residual.float()
        out = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1.0 + self.weight.float())
        return out.to(x.dtype), s.to(x.dtype)


M3Norm.__name__ = M3Norm.__qualname__ = "MiniMAXGemmaRMSNorm"
M3Norm.__module__ = M3_MODULE


class OtherGemmaNorm(M3Norm):
    """Same math, different class: must never take the M3 path."""


OtherGemmaNorm.__name__ = OtherGemmaNorm.__qualname__ = "GemmaRMSNorm"
OtherGemmaNorm.__module__ = "vllm.model_executor.layers.layernorm"


# ----------------------------------------------------------------------------- stage
@dataclass
class Stage:
    """What the stand-in vLLM modules answer; one per test."""

    tp: SimTP
    rocm: bool = True
    aiter_enabled: bool = True  # VLLM_ROCM_USE_AITER
    aiter_custom_ar_env: bool = True  # VLLM_ROCM_USE_AITER_CUSTOM_AR
    custom_all_reduce: bool = True  # not --disable-custom-all-reduce
    wrappers: list[Any] | None = None  # per rank, or None (no aiter_ar_comm)
    capturing: bool = False
    upstream_op_calls: list[dict] = field(default_factory=list)

    def wrapper(self):
        return None if self.wrappers is None else self.wrappers[self.tp.rank]

    def modules(self) -> dict[str, types.ModuleType]:
        st = self

        def mod(name: str, **attrs) -> types.ModuleType:
            m = types.ModuleType(name)
            m.__dict__.update(attrs)
            return m

        class _Platform:
            @staticmethod
            def is_rocm() -> bool:
                return st.rocm

        class _RocmAiterOps:
            @staticmethod
            def is_enabled():
                return st.aiter_enabled

            @staticmethod
            def is_custom_all_reduce_enabled():
                # if_aiter_supported: None off-platform
                return (st.aiter_enabled and st.aiter_custom_ar_env) if st.rocm else None

            @staticmethod
            def get_aiter_allreduce():
                return st.wrapper()

            @staticmethod
            def get_fused_allreduce_rmsnorm_op():
                def op(*, input_, residual, weight, epsilon, gemma_norm=False):
                    st.upstream_op_calls.append(dict(rank=st.tp.rank, tokens=input_.shape[0], gemma_norm=gemma_norm))
                    s = st.tp.all_reduce(input_).float() + residual.float()
                    scale = (1.0 + weight.float()) if gemma_norm else weight.float()
                    out = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + epsilon) * scale
                    return out.to(input_.dtype), s.to(input_.dtype)
                return op

        tp = self.tp
        return {
            "vllm": mod("vllm"),
            "vllm.distributed": mod("vllm.distributed", tensor_model_parallel_all_reduce=tp.all_reduce),
            "vllm.distributed.communication_op": mod(
                "vllm.distributed.communication_op", tensor_model_parallel_all_reduce=tp.all_reduce),
            "vllm.distributed.parallel_state": mod(
                "vllm.distributed.parallel_state",
                get_tensor_model_parallel_rank=lambda: tp.rank,
                get_tensor_model_parallel_world_size=lambda: tp.world,
                get_tp_group=lambda: types.SimpleNamespace(cpu_group=None, device_communicator=None),
                _ENABLE_CUSTOM_ALL_REDUCE=self.custom_all_reduce),
            "vllm.model_executor": mod("vllm.model_executor"),
            "vllm.model_executor.layers": mod("vllm.model_executor.layers"),
            "vllm.model_executor.layers.layernorm": mod(
                "vllm.model_executor.layers.layernorm", GemmaRMSNorm=OtherGemmaNorm),
            "vllm.platforms": mod("vllm.platforms", current_platform=_Platform()),
            "vllm._aiter_ops": mod("vllm._aiter_ops", rocm_aiter_ops=_RocmAiterOps()),
            "vllm.config": mod("vllm.config", get_current_vllm_config=lambda: None),
        }


class staged:
    """Context manager: stand-in vLLM modules in sys.modules and a CPU-safe
    torch.cuda.is_current_stream_capturing answering `stage.capturing`."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage

    def __enter__(self) -> Stage:
        self._saved = {k: sys.modules.get(k) for k in self.stage.modules()}
        mods = self.stage.modules()
        mods["vllm.distributed"].parallel_state = mods["vllm.distributed.parallel_state"]
        sys.modules.update(mods)
        self._cap = torch.cuda.is_current_stream_capturing
        torch.cuda.is_current_stream_capturing = lambda: self.stage.capturing
        return self.stage

    def __exit__(self, *exc) -> None:
        torch.cuda.is_current_stream_capturing = self._cap
        for k, v in self._saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def load_helper(source: str, name: str = "m3_helper_under_test") -> types.ModuleType:
    """Execute the helper's source (call inside `staged`); returns the module."""
    module = types.ModuleType(name)
    module.__file__ = f"<{name}>"
    code = compile(source, module.__file__, "exec")
    exec(code, module.__dict__)
    return module


# ----------------------------------------------------------------------------- model code
def class_node(tree: ast.Module, name: str) -> ast.ClassDef:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise KeyError(name)


def method_node(tree: ast.Module, cls: str, name: str) -> ast.FunctionDef:
    for node in class_node(tree, cls).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise KeyError(f"{cls}.{name}")


def compile_functions(nodes: list[ast.stmt], globals_: dict, filename: str) -> dict:
    """Compile top-level copies of the given function nodes (decorators dropped) in globals_."""
    body = []
    for n in nodes:
        n = ast.fix_missing_locations(ast.parse(ast.unparse(n)).body[0])
        if isinstance(n, ast.FunctionDef):
            n.decorator_list = []
        body.append(n)
    mod = ast.Module(body=body, type_ignores=[])
    ns = dict(globals_)
    exec(compile(ast.fix_missing_locations(mod), filename, "exec"), ns)
    return ns
