"""CPU stand-ins for the fusion patch-set harness (tests/fusion_harness.py, every set):
no vLLM, AITER or GPU.

- `SimTP`: a simulated tensor-parallel group of N ranks, one thread per rank (the caller's
  thread at N = 1); its out-of-place all-reduce is an fp32 sum in rank order, rounded to the
  input dtype.
- `rms_norm` (RMSNorm scaled by `scale`, no Gemma offset, in the input's dtype or a given one)
  and `rms_ref` (the same in float64: the references tests compare against).
- `FakeAiterCA`: AITER's raw `CustomAllreduce` with the exact `fused_ar_rms` signature of the
  pinned build (0.1.15.post1: keyword-only `w`, `eps`, `registered`, `use_1stage`, no
  `gemma_norm`); it all-reduces over the SimTP group, adds the residual, applies RMSNorm scaled
  by the given `w` (plain, not `1 + w`) and records its arguments. `FakeAiterCANoStage` is a
  build without `use_1stage`. Its `custom_fused_ar_rms(input, residual_inp, weight, eps,
  use_1stage)` is the pinned one (no `gemma_norm`); `FakeAiterCAGemma` has the later
  `custom_fused_ar_rms(..., use_1stage, out_hidden_dim=0, gemma_norm=False)`.
- `FakeAiterWrapper`: vLLM 0.25+'s `AiterCustomAllreduce` (raw object at `.aiter_ca`, `disabled`
  read from it), with 0.33.0's `should_custom_ar`, `supports_dynamic_hidden_dim` and
  `use_1stage_fused_ar_rms` as well.
- `M3Norm`: named and placed like M3's ROCm `MiniMAXGemmaRMSNorm` (fp32 math, scales by
  `1 + weight`, counts its calls), so the helper recognises it by name; `OtherGemmaNorm` is the
  same math under vLLM's `GemmaRMSNorm` name.
- `standin_logger_module()`: `vllm.logger` whose `init_logger(name)` is the stdlib logger of
  that name (tests read it with pytest's caplog).
- ast helpers: `top_level` / `class_node` / `method_node` find definitions in a parsed file;
  `compile_nodes` / `compile_functions` compile copies of them against stand-in globals.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import hashlib
import threading
import types
from typing import Any, Callable, Hashable

import torch

M3_MODULE = "vllm.models.minimax_m3.amd.model"


# ----------------------------------------------------------------------------- TP group
class SimTP:
    """N ranks as N threads; collective calls must be made by every rank in the same order."""

    def __init__(self, world: int) -> None:
        self.world = world
        self._local = threading.local()
        self._barrier = threading.Barrier(world)
        self._slots: list[Any] = [None] * world
        self.all_reduce_calls = 0  # counted on rank 0

    @property
    def rank(self) -> int:
        return getattr(self._local, "rank", 0)

    def _gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        r = self.rank
        self._slots[r] = x
        self._barrier.wait(timeout=60)
        got = list(self._slots)
        self._barrier.wait(timeout=60)
        return got

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return x
        parts = self._gather(x)
        acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for t in parts:
            acc = acc + t.float()
        if self.rank == 0:
            self.all_reduce_calls += 1
        return acc.to(x.dtype)

    def run(self, fn: Callable[[int], Any]) -> list[Any]:
        """fn(rank) on every rank at once; returns the per-rank results in rank order,
        re-raising failures. A group of one runs on the calling thread."""
        results: list[Any] = [None] * self.world
        errors: list[BaseException] = []

        def body(r: int) -> None:
            self._local.rank = r
            try:
                results[r] = fn(r)
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)
                self._barrier.abort()

        if self.world == 1:
            body(0)
        else:
            threads = [threading.Thread(target=body, args=(r,)) for r in range(self.world)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
        if errors:
            raise errors[0]
        return results


# ----------------------------------------------------------------------------- RMSNorm math
def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float,
             dtype: torch.dtype | None = None) -> torch.Tensor:
    """RMSNorm scaled by `scale` (no Gemma offset), computed in `dtype` if given, else in the
    dtype of the inputs (fp32 in the stand-in kernels and norms, like the real ones)."""
    if dtype is not None:
        x, scale = x.to(dtype), scale.to(dtype)
    var = x.pow(2).mean(dim=-1, keepdim=True)
    return x * torch.rsqrt(var + eps) * scale


def rms_ref(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """The float64 reference: `rms_norm` with x and scale converted to float64."""
    return rms_norm(x, scale, eps, dtype=torch.float64)


# ----------------------------------------------------------------------------- AITER fakes
class FakeAiterCA:
    """AITER 0.1.15.post1 `CustomAllreduce` as far as the patched helpers use it.

    `sum_dtype`: what the cross-rank sum is rounded to before the residual add. None (the
    default) rounds it to the input dtype, as vLLM's unfused all-reduce does;
    torch.float32 keeps it in fp32 (what tests/fusion_harness.py's `Stage` builds by default)."""

    def __init__(self, tp: SimTP, *, disabled: bool = False, with_pool: bool = True,
                 fully_connected: bool = True, sum_dtype: torch.dtype | None = None) -> None:
        self.tp = tp
        self.fully_connected = fully_connected
        self.disabled = disabled
        if with_pool:
            self._pool = {}  # present from AITER 0.1.12 on
        self.sum_dtype = sum_dtype
        self.calls: list[dict] = []
        self._lock = threading.Lock()

    @property
    def world_size(self) -> int:
        return self.tp.world

    def fused_ar_rms(self, inp, res_inp, *, res_out=None, out=None, scale_out=None, w, eps,
                     registered=False, use_1stage=False, post_per_token_quant=False):
        with self._lock:
            self.calls.append(dict(rank=self.tp.rank, shape=tuple(inp.shape), dtype=inp.dtype,
                                   w=w.detach().clone(), eps=eps, registered=registered,
                                   use_1stage=use_1stage, post_per_token_quant=post_per_token_quant,
                                   res_out=res_out, out=out, res_inp_is_input=res_inp))
        summed = inp if self.sum_dtype is None else inp.to(self.sum_dtype)
        total = self.tp.all_reduce(summed) if inp.device.type != "meta" else summed
        s = total.float() + res_inp.float()
        return rms_norm(s, w.float(), eps).to(inp.dtype), s.to(inp.dtype)

    def all_gather_unreg(self, inp, out=None, dim=0):
        """The pinned signature (custom_all_reduce.py:643-662): every rank's `inp` concatenated
        along dim 0 or the last dim, in rank order (vLLM 0.34.0 gathers the logits with it)."""
        parts = self.tp._gather(inp) if self.tp.world > 1 else [inp]
        got = torch.cat(parts, dim=0 if dim == 0 else -1)
        if out is None:
            return got
        out.copy_(got)
        return out

    def custom_fused_ar_rms(self, input, residual_inp, weight, eps, use_1stage):
        # The pinned build's signature: no gemma_norm.
        if self.disabled:
            return None
        return self.fused_ar_rms(input, residual_inp, w=weight, eps=eps, use_1stage=use_1stage)

    # AITER's own capture flag (custom_all_reduce.py:332, set and cleared by capture(),
    # :457-469). vLLM's graph_capture enters ca.capture() around every graph capture, so by
    # default it follows the (stubbed) stream-capture state; `capture_flag` pins it for a test
    # (a capture outside AITER's context).
    capture_flag: bool | None = None

    @property
    def _IS_CAPTURING(self) -> bool:  # noqa: N802 - AITER's name
        if self.capture_flag is not None:
            return self.capture_flag
        return bool(torch.cuda.is_current_stream_capturing())

    @contextlib.contextmanager
    def capture(self):
        self.capture_flag = True
        try:
            yield
        finally:
            self.capture_flag = None


class FakeAiterCAGemma(FakeAiterCA):
    """A later AITER whose custom_fused_ar_rms takes gemma_norm (applies `1 + weight`)."""

    def custom_fused_ar_rms(self, input, residual_inp, weight, eps, use_1stage,  # type: ignore[override]
                            out_hidden_dim=0, gemma_norm=False):
        if self.disabled:
            return None
        w = weight.float() + 1.0 if gemma_norm else weight
        return self.fused_ar_rms(input, residual_inp, w=w, eps=eps, use_1stage=use_1stage)


class FakeAiterCANoStage(FakeAiterCA):
    """An AITER build whose fused_ar_rms has no `use_1stage` (e.g. the public 0.1.7 wheel,
    0.1.7.post2.dev18)."""

    def fused_ar_rms(self, inp, res_inp, *, res_out=None, out=None, w, eps, registered=False):  # type: ignore[override]
        raise AssertionError("must not be called")


class FakeAiterWrapper:
    """vLLM's `AiterCustomAllreduce` (vllm/distributed/device_communicators/
    aiter_custom_all_reduce.py, owned by the TP device communicator): the 0.25+ surface
    (`aiter_ca`, `disabled`, `supports_dynamic_hidden_dim`, `effective_max_size`,
    `should_custom_ar`) plus 0.33.0's `use_1stage_fused_ar_rms`."""

    MAX_BYTES = 8192 * 1024 * 8

    def __init__(self, ca: Any, *, max_bytes: int = MAX_BYTES) -> None:
        self._impl = ca
        self.max_bytes = max_bytes
        self.one_stage_queries = 0

    @property
    def aiter_ca(self) -> Any:
        return self._impl

    @aiter_ca.setter
    def aiter_ca(self, ca: Any) -> None:  # tests swap in an older AITER object
        self._impl = ca

    @property
    def disabled(self) -> bool:
        return self._impl.disabled

    def should_custom_ar(self, inp: torch.Tensor) -> bool:
        return inp.numel() * inp.element_size() <= self.max_bytes

    @property
    def supports_dynamic_hidden_dim(self) -> bool:
        return hasattr(self._impl, "_pool")

    @classmethod
    def effective_max_size(cls) -> int:
        return cls.MAX_BYTES

    def use_1stage_fused_ar_rms(self, inp: torch.Tensor) -> bool:
        # 0.33.0's decision (aiter_custom_all_reduce.py:90-122) for a fully connected group.
        self.one_stage_queries += 1
        hidden = inp.shape[-1]
        if inp.numel() // hidden > 80:
            return False
        total = inp.numel() * inp.element_size()
        w = self._impl.world_size
        return w == 2 or (w <= 4 and total < 256 * 1024) or (w <= 8 and total < 128 * 1024)


# ----------------------------------------------------------------------------- norms
_CALLS_LOCK = threading.Lock()


class M3Norm(torch.nn.Module):
    """Stand-in for M3's ROCm `MiniMAXGemmaRMSNorm` (model.py:242-271): fp32 math, scale
    `1 + weight`; `calls` counts forwards."""

    def __init__(self, hidden: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(hidden))
        self.variance_epsilon = eps
        self.calls = 0

    def forward(self, x, residual=None):
        with _CALLS_LOCK:  # one norm may serve every simulated rank's thread
            self.calls += 1
        xf = x.float()
        if residual is not None:
            xf = xf + residual.float()
            new_res = xf.to(x.dtype)
        out = rms_norm(xf, 1.0 + self.weight.float(), self.variance_epsilon).to(x.dtype)
        return out if residual is None else (out, new_res)


M3Norm.__name__ = M3Norm.__qualname__ = "MiniMAXGemmaRMSNorm"
M3Norm.__module__ = M3_MODULE


class OtherGemmaNorm(M3Norm):
    """Same math, another class (e.g. vLLM's GemmaRMSNorm): never the AITER/M3 path."""


OtherGemmaNorm.__name__ = OtherGemmaNorm.__qualname__ = "GemmaRMSNorm"
OtherGemmaNorm.__module__ = "vllm.model_executor.layers.layernorm"


# ----------------------------------------------------------------------------- vllm.logger
def standin_logger_module() -> types.ModuleType:
    """`vllm.logger` for the patched code: `init_logger(name)` is `logging.getLogger(name)`."""
    import logging

    m = types.ModuleType("vllm.logger")
    m.init_logger = logging.getLogger
    return m


# ----------------------------------------------------------------------------- source / ast
# Compiled code, reused: the text (or the caller's cache key) fixes it, and copying plus
# compiling the AST dominated each model construction in the run-time tests.
_CODE: dict[Hashable, types.CodeType] = {}


def module_from_source(source: str, name: str, filename: str) -> types.ModuleType:
    """Execute source text as a fresh module (stand-in vLLM modules must already be staged)."""
    module = types.ModuleType(name)
    module.__file__ = filename
    key = ("module", hashlib.sha256(source.encode()).hexdigest(), filename)
    code = _CODE.get(key)
    if code is None:
        code = _CODE[key] = compile(source, filename, "exec")
    exec(code, module.__dict__)
    return module


class _StripAnnotations(ast.NodeTransformer):
    """Annotations name vLLM types the stand-in globals do not have; they carry no behaviour."""

    def visit_arg(self, node: ast.arg) -> ast.arg:
        node.annotation = None
        return node

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.FunctionDef:
        node.returns = None
        self.generic_visit(node)
        return node

    def visit_AnnAssign(self, node: ast.AnnAssign):
        if node.value is None:
            return None
        return ast.copy_location(ast.Assign(targets=[node.target], value=node.value), node)


def top_level(tree: ast.Module, name: str,
              kinds: tuple[type, ...] = (ast.ClassDef, ast.FunctionDef)) -> ast.stmt:
    for node in tree.body:
        if isinstance(node, kinds) and node.name == name:
            return node
    raise KeyError(name)


def class_node(tree: ast.Module, name: str) -> ast.ClassDef:
    return top_level(tree, name, (ast.ClassDef,))


def method_node(tree: ast.Module, cls: str, name: str) -> ast.FunctionDef:
    for node in class_node(tree, cls).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise KeyError(f"{cls}.{name}")


def compile_nodes(nodes: list[ast.stmt], globals_: dict, filename: str, *,
                  strip_annotations: bool = True, drop_function_decorators: bool = False,
                  fresh_namespace: bool = False, cache_key: Hashable | None = None) -> dict:
    """Compile top-level copies of the given nodes (the caller's tree is left as it was) and
    return the namespace: globals_ itself, or a copy of it with `fresh_namespace`.
    `cache_key`: the caller vouches that this key always comes with the same nodes (e.g. the
    source text's hash and the names); the compiled code is then reused (new objects each
    run: only the code is shared)."""
    key = None if cache_key is None else ("nodes", cache_key, filename, strip_annotations,
                                          drop_function_decorators)
    code = _CODE.get(key) if key is not None else None
    if code is None:
        body = []
        for n in nodes:
            n = copy.deepcopy(n)
            if strip_annotations:
                n = _StripAnnotations().visit(n)
            if drop_function_decorators and isinstance(n, ast.FunctionDef):
                n.decorator_list = []
            body.append(n)
        mod = ast.fix_missing_locations(ast.Module(body=body, type_ignores=[]))
        code = compile(mod, filename, "exec")
        if key is not None:
            _CODE[key] = code
    ns = dict(globals_) if fresh_namespace else globals_
    exec(code, ns)
    return ns


def compile_functions(nodes: list[ast.stmt], globals_: dict, filename: str) -> dict:
    """Top-level copies of the given function nodes (methods too; decorators dropped,
    annotations kept), compiled in a copy of globals_."""
    return compile_nodes(nodes, globals_, filename, strip_annotations=False,
                         drop_function_decorators=True, fresh_namespace=True)
