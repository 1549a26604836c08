"""CPU stand-ins for running the vllm-0.33.0 set's patched code without vLLM, AITER or a GPU.

The stand-ins shared with tests/fusion_harness.py (`SimTP`, `FakeAiterCA`, `FakeAiterWrapper`,
`M3Norm`, `OtherGemmaNorm`, `rms_ref`, the ast/compile helpers) live in
tests/fusion_standins.py; this module holds what only 0.33.0 needs:

- `Stage`: what the stand-in vLLM modules answer for 0.33.0 (`vllm.platforms`, the TP
  communicator's per-rank `aiter_ar_comm` wrappers, vLLM's own
  `get_fused_allreduce_rmsnorm_op` with `gemma_norm`); `staged(stage)` installs them.
- `load_helper(source)`: the helper module built from source text with those stand-ins for
  every vLLM import it makes (also the lazy `vllm._aiter_ops`), for as long as `staged` is
  active.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from typing import Any

import torch

from fusion_standins import OtherGemmaNorm, SimTP, module_from_source, rms_norm, standin_logger_module


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
    pp_rank: int = 0  # this process's pipeline stage (tests/test_runtime.py)
    # vLLM's op as in _aiter_ops.py:1191-1269 (calls the wrapper's AITER
    # custom_fused_ar_rms with gemma_norm=) instead of the math stand-in.
    op_calls_aiter: bool = False
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
                    if st.op_calls_aiter:
                        ar = st.wrapper()
                        return ar.aiter_ca.custom_fused_ar_rms(
                            input_, residual, weight, epsilon,
                            use_1stage=ar.use_1stage_fused_ar_rms(input_), gemma_norm=gemma_norm)
                    s = st.tp.all_reduce(input_).float() + residual.float()
                    scale = (1.0 + weight.float()) if gemma_norm else weight.float()
                    return rms_norm(s, scale, epsilon).to(input_.dtype), s.to(input_.dtype)
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
                get_pp_group=lambda: types.SimpleNamespace(rank_in_group=self.pp_rank),
                _ENABLE_CUSTOM_ALL_REDUCE=self.custom_all_reduce),
            "vllm.model_executor": mod("vllm.model_executor"),
            "vllm.model_executor.layers": mod("vllm.model_executor.layers"),
            "vllm.model_executor.layers.layernorm": mod(
                "vllm.model_executor.layers.layernorm", GemmaRMSNorm=OtherGemmaNorm),
            "vllm.platforms": mod("vllm.platforms", current_platform=_Platform()),
            "vllm._aiter_ops": mod("vllm._aiter_ops", rocm_aiter_ops=_RocmAiterOps()),
            "vllm.config": mod("vllm.config", get_current_vllm_config=lambda: None),
            "vllm.logger": standin_logger_module(),
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
    return module_from_source(source, name, f"<{name}>")
