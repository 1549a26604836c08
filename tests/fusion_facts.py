"""The fusion matrix's facts, derived from each release's own files: one function per fact.

`python tools/release_facts.py --write` runs every function below on every set under patches/
(its first listed release's wheel, tests/realvllm.py) and writes tests/fusion_facts.json, which
tests/fusion_matrix.py reads as its rows; tests/test_fusion_matrix.py fails while the shipped
JSON differs from a fresh derivation. Nothing in a row is typed by hand.

Adding a fact: write `@fact def name(r: Release) -> value` here (JSON-able: str, bool, None,
list of str), run the command, and use `fs.name` in the tests. A function that finds its
release's files inconsistent with what it knows raises FactError naming what it saw, so a
release whose code the harness has never seen fails here by name.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PATCHES = REPO / "patches"
FACTS_JSON = Path(__file__).resolve().parent / "fusion_facts.json"

HELPER = "vllm/model_executor/layers/fused_allreduce_gemma_rms_norm.py"
MODEL = "vllm/models/minimax_m3/amd/model.py"
MTP = "vllm/models/minimax_m3/amd/mtp.py"
AITER_OPS = "vllm/_aiter_ops.py"
AITER_WRAPPER = "vllm/distributed/device_communicators/aiter_custom_all_reduce.py"
MOE_LAYER = "vllm/model_executor/layers/fused_moe/layer.py"
MOE_RUNNER = "vllm/model_executor/layers/fused_moe/runner/moe_runner.py"
COMPILATION = "vllm/config/compilation.py"
CUDA_COMMUNICATOR = "vllm/distributed/device_communicators/cuda_communicator.py"
RELOAD_INPLACE = "vllm/model_executor/model_loader/reload/inplace.py"
WEIGHT_UTILS = "vllm/model_executor/model_loader/weight_utils.py"
FIRST_M3_RELEASE = "0.24.0"
# Config fields a layer plan may read that 0.24.0's (moe_layer_freq, sparse_attention_config) did not.
LAYER_PLAN_FIELDS = frozenset({"layer_types", "mlp_layer_types"})
# MiniMaxM3DecoderLayer.__init__'s parameters in 0.24.0; later ones are `layer_extra_args`.
LAYER_BASE_ARGS = ["self", "config", "prefix", "cache_config", "quant_config", "force_sparse_attn", "force_moe",
                   "topk_indices_buffer"]


class FactError(AssertionError):
    """A release's files do not fit what a fact function knows (a new design the matrix must learn)."""


@dataclass(frozen=True)
class Release:
    """One set's release, as the fact functions see it: its first listed version's files."""

    name: str
    versions: tuple[str, ...]

    @property
    def version(self) -> str:
        return self.versions[0]

    def bytes(self, rel: str) -> bytes:
        from fusion_harness import release_bytes  # one open zip per release for the session

        try:
            return release_bytes(self.version, rel)
        except KeyError:
            raise FactError(f"vLLM {self.version}'s wheel has no {rel}") from None

    def text(self, rel: str) -> str:
        return self.bytes(rel).decode()

    def tree(self, rel: str) -> ast.Module:
        return _parse(self.version, rel, self.text(rel))

    def members(self) -> frozenset[str]:
        from fusion_harness import release_members

        return release_members(self.version)


@functools.cache
def _parse(version: str, rel: str, text: str) -> ast.Module:
    return ast.parse(text)


def _class(tree: ast.Module, name: str) -> ast.ClassDef:
    found = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name]
    if len(found) != 1:
        raise FactError(f"expected one class {name}, found {len(found)}")
    return found[0]


def _method(tree: ast.Module, cls: str, name: str) -> ast.FunctionDef:
    found = [n for n in _class(tree, cls).body if isinstance(n, ast.FunctionDef) and n.name == name]
    if len(found) != 1:
        raise FactError(f"expected one {cls}.{name}, found {len(found)}")
    return found[0]


def _params(fn: ast.FunctionDef) -> list[str]:
    return [a.arg for a in fn.args.args + fn.args.kwonlyargs]


def _calls(node: ast.AST) -> set[str]:
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Call):
            f = n.func
            out.add(f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else "")
    return out


FACTS: dict[str, Callable[[Release], object]] = {}


def fact(fn: Callable[[Release], object]) -> Callable[[Release], object]:
    FACTS[fn.__name__] = fn
    return fn


# ----------------------------------------------------------------------------- the facts
@fact
def aiter_api(r: Release) -> str:
    """"raw" (0.24.0: `initialize_aiter_allreduce`, AITER's own CustomAllreduce) or "wrapper"
    (0.25+: vLLM's AiterCustomAllreduce owned by the TP communicator, raw object at `.aiter_ca`)."""
    raw = "def initialize_aiter_allreduce" in r.text(AITER_OPS)
    if raw is (AITER_WRAPPER in r.members()):
        raise FactError(f"vLLM {r.version}: initialize_aiter_allreduce={raw} but the wrapper module "
                        f"{'exists' if raw else 'is missing'}; neither AITER API generation")
    return "raw" if raw else "wrapper"


@fact
def upstream_aiter_branch(r: Release) -> bool:
    """The pristine helper has vLLM's own one-stage AITER branch (0.30+)."""
    helper = r.text(HELPER)
    has = "_can_use_aiter_fused_ar_rms" in helper
    if has is not ("from vllm.platforms import current_platform" in helper):
        raise FactError(f"vLLM {r.version}: the helper's upstream AITER branch and its current_platform "
                        f"import disagree")
    return has


@fact
def moe_factory(r: Release) -> str:
    """The routed-experts constructor MiniMaxM3MoE.__init__ calls."""
    called = _calls(_method(r.tree(MODEL), "MiniMaxM3MoE", "__init__")) & {"FusedMoE", "FusedMoEFactory"}
    if len(called) != 1:
        raise FactError(f"vLLM {r.version}: MiniMaxM3MoE.__init__ calls {sorted(called)} of FusedMoE/FusedMoEFactory")
    return called.pop()


def _factory_params(r: Release) -> set[str]:
    name = moe_factory(r)
    layer = r.tree(MOE_LAYER)
    fns = [n for n in layer.body if isinstance(n, ast.FunctionDef) and n.name == name]
    if len(fns) != 1:
        raise FactError(f"vLLM {r.version}: {MOE_LAYER} has {len(fns)} function(s) named {name}")
    return set(_params(fns[0]))


@fact
def moe_defer_knob(r: Release) -> str:
    """How the patched MoE skips the runner's final all-reduce."""
    params = _factory_params(r)
    if "reduce_results" in params:
        return "reduce_results"
    if "runner_cls" in params:
        return "runner_cls"
    raise FactError(f"vLLM {r.version}: {moe_factory(r)} takes neither reduce_results nor runner_cls")


@fact
def runner_output_is_reduced_arg(r: Release) -> bool:
    final = _method(r.tree(MOE_RUNNER), "MoERunner", "_maybe_reduce_final_output")
    return "output_is_reduced" in [a.arg for a in final.args.args]


@fact
def shared_expert_fusion(r: Release) -> str | None:
    """None (0.24.0: never), "helper" (0.25-0.28: `_fuse_shared_experts_enabled(config)`) or
    "resolved" (0.29+: `fuse_shared_experts=` on the factory call)."""
    init = _method(r.tree(MODEL), "MiniMaxM3MoE", "__init__")
    calls = [n for n in ast.walk(init)
             if isinstance(n, ast.Call) and ast.unparse(n.func).split(".")[-1] == moe_factory(r)]
    if len(calls) != 1:
        raise FactError(f"vLLM {r.version}: MiniMaxM3MoE.__init__ calls {moe_factory(r)} {len(calls)} times")
    call = calls[0]
    if "fuse_shared_experts=" in ast.unparse(call):
        return "resolved"
    return "helper" if "_fuse_shared_experts_enabled(config)" in ast.unparse(init) else None


@fact
def specialized_decode(r: Release) -> bool:
    return "specialized_decode" in r.text(MODEL)


@fact
def has_pp(r: Release) -> bool:
    return "intermediate_tensors" in _params(_method(r.tree(MODEL), "MiniMaxM3Model", "forward"))


@fact
def layer_extra_args(r: Release) -> list[str]:
    names = _params(_method(r.tree(MODEL), "MiniMaxM3DecoderLayer", "__init__"))
    if names[:len(LAYER_BASE_ARGS)] != LAYER_BASE_ARGS:
        raise FactError(f"vLLM {r.version}: MiniMaxM3DecoderLayer.__init__ starts {names[:len(LAYER_BASE_ARGS)]}, "
                        f"not {LAYER_BASE_ARGS}")
    return names[len(LAYER_BASE_ARGS):]


@fact
def pass_config_enable_sp(r: Release) -> bool:
    pc = _class(r.tree(COMPILATION), "PassConfig")
    return "enable_sp" in {n.target.id for n in pc.body
                           if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


@fact
def capture_registration_optional(r: Release) -> bool:
    """vLLM may build AITER's CustomAllreduce with enable_register_for_capturing=False (0.32+)."""
    if aiter_api(r) != "wrapper":
        return False
    return b"enable_register_for_capturing" in r.bytes(AITER_WRAPPER)


@fact
def mtp_sha256(r: Release) -> str:
    return hashlib.sha256(r.bytes(MTP)).hexdigest()


@fact
def mono_decode(r: Release) -> bool:
    """The model builds the mono decode path (`VLLM_ROCM_MINIMAX_M3_MONO=1`, amd/mono/; 0.34+):
    its runner hands a dense layer's output to kernels that take it as reduced."""
    init = _method(r.tree(MODEL), "MiniMaxM3Model", "__init__")
    return any(isinstance(n, ast.Attribute) and n.attr == "MONO_ENABLE" and isinstance(n.value, ast.Name)
               and n.value.id == "mono_envs" for n in ast.walk(init))


@fact
def mxfp8_norms(r: Release) -> bool:
    """The decoder layer has the MXFP8 norm branches and the helper defines
    `allreduce_gemma_rms_norm_mxfp8` (0.34+, gfx950 + MXFP8 checkpoints). One without the other
    is a design the matrix does not know."""
    helper = "allreduce_gemma_rms_norm_mxfp8" in _top_level_names(r.tree(HELPER))
    init = _method(r.tree(MODEL), "MiniMaxM3DecoderLayer", "__init__")
    assigned = {ast.unparse(t) for n in ast.walk(init) if isinstance(n, ast.Assign) for t in n.targets}
    layer = {"self.fuse_input_norm_mxfp8", "self.fuse_post_norm_mxfp8"} <= assigned
    return _one_design(("the helper defines allreduce_gemma_rms_norm_mxfp8", helper),
                       ("the decoder layer sets fuse_input/post_norm_mxfp8", layer))


@fact
def pp_aux_hidden_states(r: Release) -> bool:
    """MiniMaxM3Model hands EAGLE3 captures across PP stages (`supports_aux_hidden_states_over_pp
    = True`, `pack_local_aux_hidden_states` in forward; 0.34+)."""
    cls = _class(r.tree(MODEL), "MiniMaxM3Model")
    declares = any(ast.unparse(n) == "supports_aux_hidden_states_over_pp = True" for n in cls.body)
    packs = "pack_local_aux_hidden_states" in _calls(_method(r.tree(MODEL), "MiniMaxM3Model", "forward"))
    return _one_design(("MiniMaxM3Model sets supports_aux_hidden_states_over_pp = True", declares),
                       ("its forward calls pack_local_aux_hidden_states", packs))


@fact
def aiter_all_gather(r: Release) -> bool:
    """The TP device communicator sends all-gathers (the logits, every step) to AITER's
    `all_gather_unreg` (0.34+), so ROCm/aiter#4082 is in the set's defect table."""
    return "all_gather_unreg" in _calls(r.tree(CUDA_COMMUNICATOR))


@fact
def reload_hooks(r: Release) -> bool:
    """The in-place reload ends in `finalize_model_weights`, which calls every module's
    `process_weights_after_loading()`, on both of its paths: the kernel-format one
    (`is_checkpoint_format=False`: `param.copy_`, past any weight loader) too (0.34+). Then the
    norm's hook refreshes the cached `weight + 1` before any graph replays."""
    if RELOAD_INPLACE not in r.members():
        return False
    reload = [n for n in r.tree(RELOAD_INPLACE).body if isinstance(n, ast.FunctionDef) and n.name == "reload_weights"]
    if len(reload) != 1:
        raise FactError(f"expected one reload_weights in {RELOAD_INPLACE}, found {len(reload)}")
    finalize = [n for n in r.tree(WEIGHT_UTILS).body
                if isinstance(n, ast.FunctionDef) and n.name == "finalize_model_weights"]
    walks = bool(finalize) and "process_weights_after_loading" in ast.unparse(finalize[0])
    kernel_path = [n for n in ast.walk(reload[0]) if isinstance(n, ast.If)
                   and ast.unparse(n.test) == "is_checkpoint_format"]
    ends = len(kernel_path) == 1 and "finalize_model_weights" in _calls(ast.Module(kernel_path[0].orelse, []))
    return _one_design(("weight_utils.finalize_model_weights calls process_weights_after_loading", walks),
                       ("reload_weights' kernel-format path calls finalize_model_weights", ends))


@fact
def attn_input(r: Release) -> str:
    """The name the decoder layer's forward gives the normed attention input (`hidden_states`
    up to 0.33.0, `attn_input` from 0.34.0)."""
    fwd = _method(r.tree(MODEL), "MiniMaxM3DecoderLayer", "forward")
    calls = [n for n in ast.walk(fwd) if isinstance(n, ast.Call) and ast.unparse(n.func) == "self.self_attn"]
    values = [k.value for c in calls for k in c.keywords if k.arg == "hidden_states"]
    if len(calls) != 1 or len(values) != 1 or not isinstance(values[0], ast.Name):
        raise FactError(f"expected one self.self_attn(hidden_states=NAME) call, found {len(calls)} call(s)")
    return values[0].id


@fact
def config_fields(r: Release) -> list[str]:
    """hf config fields the release's layer plan reads beyond 0.24.0's design (the harness's
    ToyConfig must have them)."""
    from fusion_harness import release_model_names

    return sorted(release_model_names(r.version)[1] & LAYER_PLAN_FIELDS)


@fact
def model_standins(r: Release) -> list[str]:
    """Names the harness runs of the release's model that need a behaving stand-in: those
    tests/fusion_harness.py's EXTRA_STANDINS answers, and those the release's own helper newly
    defines (beyond 0.24.0's). A name the model needs that neither covers fails every model test
    with one HarnessGap naming it."""
    from fusion_harness import EXTRA_STANDINS, release_model_names

    free = release_model_names(r.version)[0]
    first = Release(r.name, (FIRST_M3_RELEASE,))
    new_in_helper = _top_level_names(r.tree(HELPER)) - _top_level_names(first.tree(HELPER))
    return sorted(free & (set(EXTRA_STANDINS) | new_in_helper))


@fact
def layer_output_readers(r: Release) -> list[str]:
    """Every reader of a decoder layer's output or residual in the release's ROCm model package
    (m3fuse/patching/readers.py: loops, decode paths, PP hand-off, hooks, other files such as
    mono/runner.py). Each set declares how it handles each one (patches/<set>/readers.toml;
    tests/test_readers.py); a new reader upstream shows here and fails there until declared."""
    from m3fuse.patching import readers

    return sorted(readers.reader_keys(readers.derive_package(package_texts(r.version))))


@functools.cache
def package_texts(version: str) -> dict[str, str]:
    """The release's ROCm model package: path -> text of every .py member."""
    from fusion_harness import release_bytes, release_members
    from m3fuse.patching import readers

    return {m: release_bytes(version, m).decode() for m in sorted(release_members(version))
            if m.startswith(readers.PACKAGE) and m.endswith(".py")}


def _one_design(a: tuple[str, bool], b: tuple[str, bool]) -> bool:
    """Two signs of one design, which a release has both or neither of; else a FactError."""
    if a[1] is not b[1]:
        raise FactError(f"{a[0]}: {a[1]}, but {b[0]}: {b[1]}")
    return a[1]


def _top_level_names(tree: ast.Module) -> set[str]:
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


# ----------------------------------------------------------------------------- derive, load
def releases(patches: Path = PATCHES) -> list[Release]:
    out = []
    for m in sorted(patches.glob("*/manifest.toml")):
        if m.parent.name.startswith("."):
            continue
        data = tomllib.loads(m.read_text())
        out.append(Release(data["name"], tuple(data["vllm-versions"])))
    return out


def derive_one(r: Release) -> dict:
    row: dict = {"versions": list(r.versions)}
    for name, fn in FACTS.items():
        try:
            row[name] = fn(r)
        except FactError as exc:
            raise FactError(f"{r.name}: fact {name!r} cannot be read off vLLM {r.version}'s files: {exc}. "
                            f"Teach tests/fusion_facts.py::{name} this release's design.") from None
    return row


def derive(patches: Path = PATCHES) -> dict[str, dict]:
    return {r.name: derive_one(r) for r in releases(patches)}


def render(facts: dict[str, dict]) -> str:
    return json.dumps(facts, indent=1, sort_keys=False) + "\n"


def load() -> dict[str, dict]:
    if not FACTS_JSON.is_file():
        return {}
    return json.loads(FACTS_JSON.read_text())
