"""vLLM's own `graph_capture` context drives the patched helper's `registered=` (issue 23).

`vllm.distributed.parallel_state.graph_capture` (the module function every model runner enters
around its CUDA/HIP graph captures) and `GroupCoordinator.graph_capture` are compiled from each
release's wheel, with vLLM's own `AiterCustomAllreduce.capture` (0.25+,
`device_communicators/aiter_custom_all_reduce.py`). The fused call inside it must pass
`registered=True` (AITER registers the captured buffers when its `capture()` exits), outside
it `registered=False` (the input is copied into AITER's buffer), also while a stream captures.

Stand-ins, each for what cannot run on this CPU: `torch.cuda`'s streams (`Stream`,
`current_stream`, `stream`: CUDA-only), the stream-capture state (the runner's
`torch.cuda.graph`, CUDA-only: `Stage.capturing`), AITER's `CustomAllreduce.capture()`
(`FakeAiterCA.capture`, AITER at its tag `custom_all_reduce.py:457-469`: sets `_IS_CAPTURING`),
vLLM's `CudaCommunicator`/`XpuCommunicator` classes (for the release's isinstance check) and
`non_expandable_allocations` (0.33+, a CUDA allocator setting), `vllm.platforms.rocm.on_gfx1250`
(an MI300/MI355: False).
"""

from __future__ import annotations

import ast
import contextlib
import sys
import types
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from fusion_harness import Stage, load_helper, release_bytes, release_members
from fusion_matrix import rows_where
from fusion_standins import FakeAiterWrapper, SimTP, class_node, compile_nodes, method_node, top_level
from test_fusion_matrix import make_inputs, new_norm, run_helper

PARALLEL_STATE = "vllm/distributed/parallel_state.py"
AITER_WRAPPER = "vllm/distributed/device_communicators/aiter_custom_all_reduce.py"


class _Stream:  # stand-in: torch.cuda.Stream (CUDA-only)
    def __init__(self, device=None) -> None:
        self.device = device

    def wait_stream(self, other) -> None:
        pass


class _Cuda:  # stand-in: the torch.cuda stream API graph_capture uses
    Stream = _Stream
    _current = _Stream()

    @staticmethod
    def current_stream(device=None):
        return _Cuda._current

    @staticmethod
    @contextlib.contextmanager
    def stream(s):
        yield


class CudaCommunicator:  # stand-in class for the release's isinstance check
    def __init__(self, aiter_ar_comm=None) -> None:
        self.ca_comm = None  # vLLM's own custom all-reduce: not built when AITER's is
        self.fi_pcie_ipc_ar_comm = None
        self.aiter_ar_comm = aiter_ar_comm


class XpuCommunicator:
    pass


def release_graph_capture(fs, st: Stage, tp_comm: CudaCommunicator):
    """The release's `graph_capture(device)` over TP/PP/DP coordinators whose
    `graph_capture` is the release's `GroupCoordinator.graph_capture`."""
    tree = ast.parse(release_bytes(fs.version, PARALLEL_STATE).decode())
    fake_torch = types.SimpleNamespace(cuda=_Cuda, device=torch.device, Tensor=torch.Tensor)
    g: dict[str, Any] = {"torch": fake_torch, "contextmanager": contextlib.contextmanager,
                         "nullcontext": contextlib.nullcontext, "dataclass": dataclass,
                         "AbstractContextManager": contextlib.AbstractContextManager, "Any": Any}
    compile_nodes([class_node(tree, "GraphCaptureContext")], g, f"<{fs.version}>/{PARALLEL_STATE}",
                  strip_annotations=False)
    coordinator = types.new_class("GroupCoordinator")
    ns = compile_nodes([method_node(tree, "GroupCoordinator", "graph_capture")], dict(g),
                       f"<{fs.version}>/{PARALLEL_STATE}")
    coordinator.graph_capture = ns["graph_capture"]

    def group(comm):
        grp = coordinator()
        grp.device_communicator = comm
        return grp

    tp, pp, dp = group(tp_comm), group(None), group(None)
    g.update(get_tp_group=lambda: tp, get_pp_group=lambda: pp, get_dp_group=lambda: dp)
    names = ["graph_capture"]
    if any(isinstance(n, ast.FunctionDef) and n.name == "_aiter_registers_graph_buffers" for n in tree.body):
        names.insert(0, "_aiter_registers_graph_buffers")
    compile_nodes([top_level(tree, n) for n in names], g, f"<{fs.version}>/{PARALLEL_STATE}")
    return g["graph_capture"]


def _module(name: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__path__ = []
    m.__dict__.update(attrs)
    return m


def release_wrapper_class(fs) -> type:
    """FakeAiterWrapper with the release's own `AiterCustomAllreduce.capture` (and, where the
    release has it, `registers_graph_buffers`)."""
    tree = ast.parse(release_bytes(fs.version, AITER_WRAPPER).decode())
    cls_node = class_node(tree, "AiterCustomAllreduce")
    wanted = [n for n in cls_node.body if isinstance(n, ast.FunctionDef)
              and n.name in ("capture", "registers_graph_buffers")]
    ns = compile_nodes(wanted, {"contextmanager": contextlib.contextmanager, "property": property},
                       f"<{fs.version}>/{AITER_WRAPPER}")
    attrs = {n.name: ns[n.name] for n in wanted}
    return type("ReleaseAiterWrapper", (FakeAiterWrapper,), attrs)


def _stage_modules(st: Stage) -> None:
    sys.modules.update({
        "vllm.distributed.device_communicators": _module("vllm.distributed.device_communicators"),
        "vllm.distributed.device_communicators.cuda_communicator": _module(
            "vllm.distributed.device_communicators.cuda_communicator", CudaCommunicator=CudaCommunicator),
        "vllm.distributed.device_communicators.xpu_communicator": _module(
            "vllm.distributed.device_communicators.xpu_communicator", XpuCommunicator=XpuCommunicator),
        "vllm.platforms.rocm": _module("vllm.platforms.rocm", on_gfx1250=lambda: False),  # an MI300/MI355
        "vllm.device_allocator": _module("vllm.device_allocator"),
        "vllm.device_allocator.alloc_conf": _module(
            "vllm.device_allocator.alloc_conf", non_expandable_allocations=contextlib.nullcontext),
    })


@pytest.mark.parametrize("fs", rows_where(lambda r: True), ids=lambda r: r.name)
def test_registered_follows_vllms_own_graph_capture_context(fs):
    world = 2
    partials, residual, weight = make_inputs(world, tokens=8, seed=41)
    with Stage(fs, SimTP(world), mode="fused") as st:
        _stage_modules(st)
        if fs.aiter_api == "raw":  # 0.24.0: the raw AITER object from rocm_aiter_ops
            helper = load_helper(fs)
            helper.initialize_m3_aiter_allreduce()
            comm = CudaCommunicator()
        else:  # 0.25+: the TP communicator's wrapper, vLLM's own capture()
            st.rocm_aiter_ops._wrapper = release_wrapper_class(fs)(st.make_ca())
            st.rocm_aiter_ops._wrapper._register_graph_buffers = True  # 0.33+: not under the cuMem pool
            helper = load_helper(fs)
            helper.initialize_m3_aiter_allreduce()
            comm = CudaCommunicator(st.rocm_aiter_ops._wrapper)
        graph_capture = release_graph_capture(fs, st, comm)
        st.make_ca().capture_flag = False  # AITER's own flag, as at rest: only capture() sets it
        norm = new_norm(weight)
        run_helper(st, helper, partials, residual, norm)  # eager: fills the gamma cache
        st.capturing = True  # a stream capture outside vLLM's context
        run_helper(st, helper, partials, residual, norm)
        st.capturing = False
        ca = st.make_ca()
        ca_capture = type(ca).capture

        @contextlib.contextmanager
        def aiter_capture(self):  # AITER's capture(): the flag on inside, off after
            self.capture_flag = True
            try:
                yield
            finally:
                self.capture_flag = False

        type(ca).capture = aiter_capture
        try:
            with graph_capture(torch.device("cpu")):
                assert ca.capture_flag is True, "vLLM's graph_capture did not enter AITER's capture()"
                st.capturing = True
                run_helper(st, helper, partials, residual, norm)
                st.capturing = False
        finally:
            type(ca).capture = ca_capture
        assert ca.capture_flag is False
    got = [c["registered"] for c in st.ca.calls]
    assert got == [False] * world + [False] * world + [True] * world, got
