"""The vllm-0.33.0 patch set: real-file round trip, helper behaviour on CPU torch, model `ast`
checks, the patched model `forward` run on a simulated TP group, and 0.30-0.32 drift.

Helper stand-ins live in tests/fusion_harness_033.py (see its docstring).
"""

from __future__ import annotations

import ast
import base64
import copy
import csv
import hashlib
import io
import re
import types
from pathlib import Path

import pytest
import torch

import realvllm
from fusion_harness_033 import (
    FakeAiterCA,
    FakeAiterCANoStage,
    FakeAiterWrapper,
    M3Norm,
    OtherGemmaNorm,
    SimTP,
    Stage,
    class_node,
    compile_functions,
    load_helper,
    method_node,
    rms_ref,
    staged,
)
from m3fuse.errors import PatchSetError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from m3fuse.hunks import apply_patch

REPO = Path(__file__).resolve().parent.parent
SET = REPO / "patches" / "vllm-0.33.0"
VERSION = "0.33.0"
HELPER = realvllm.HELPER
MODEL = realvllm.MODEL
MTP = realvllm.MTP
ENV = "M3_AITER_AR_RMS_MODE"
# facts.md: the 0.33.0 files as shipped
PINS_033 = {
    HELPER: "aec049372738a38fd644305c51e3a0068b008f3ca16da9dfca57191c434ab03f",
    MODEL: "ffd0d5724579a68640a377a482a77e79c3d17e3114e5f38e117183179faf0f68",
    MTP: "a16c37ef4920acb49d20c2ddf90d112d016960c82d888190781a591657ffcd4a",
}
BF16_TOL = dict(atol=3e-2, rtol=3e-2)
# Whole-model comparisons (5 layers of bf16 rounding): relative Frobenius error.
MODEL_TOL = 2e-2  # correct runs measure ~0.008, a leaked partial ~0.35-0.5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def manifest() -> dict:
    return tomllib.loads((SET / "manifest.toml").read_text())


def entry(path: str) -> dict:
    return next(f for f in manifest()["files"] if f["path"] == path)


# One read of the wheel per session.
@pytest.fixture(scope="session")
def real() -> dict[str, bytes]:
    return {m: realvllm.read_member(VERSION, m) for m in (HELPER, MODEL, MTP)}


@pytest.fixture(scope="session")
def patched(real) -> dict[str, str]:
    out = {}
    for m in (HELPER, MODEL):
        e = entry(m)
        out[m] = apply_patch(real[m], (SET / e["patch"]).read_text(), name=e["patch"]).decode()
    return out


# ============================================================== real files, pins, round trip
def test_manifest_names_the_release_and_two_files():
    m = manifest()
    assert m["name"] == "vllm-0.33.0" and m["vllm-versions"] == ["0.33.0"]
    assert sorted(f["path"] for f in m["files"]) == sorted([HELPER, MODEL])


@pytest.mark.parametrize("path", [HELPER, MODEL])
def test_set_applies_to_real_file_and_reverts_byte_identical(real, path):
    e = entry(path)
    original = real[path]
    assert sha(original) == e["pristine-sha256"] == PINS_033[path]
    text = (SET / e["patch"]).read_text()
    new = apply_patch(original, text, name=e["patch"])
    assert sha(new) == e["patched-sha256"]
    assert apply_patch(new, text, reverse=True, name=e["patch"]) == original
    compile(new, path, "exec")


def test_pristine_pins_match_the_wheel_record(real):
    """RECORD's own hashes (urlsafe b64 sha256) agree with the set's pristine pins."""
    with __import__("zipfile").ZipFile(realvllm.wheel_path(VERSION)) as zf:
        rec = next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
        rows = {r[0]: r[1] for r in csv.reader(io.StringIO(zf.read(rec).decode())) if len(r) >= 2}
    for path in (HELPER, MODEL, MTP):
        digest = bytes.fromhex(PINS_033[path])
        assert rows[path] == "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def test_mtp_is_not_patched_and_is_the_shipped_file(real):
    assert MTP not in [f["path"] for f in manifest()["files"]]
    assert sha(real[MTP]) == PINS_033[MTP]


def test_patched_files_compile(patched):
    for path, src in patched.items():
        compile(src, path, "exec")


@pytest.mark.slow
@pytest.mark.parametrize("version", ["0.30.0", "0.31.0", "0.32.0"])
def test_030_to_032_share_the_helper_but_not_the_model(version):
    """Those releases must be refused as drift: the helper matches the pin, the model matches
    neither the pristine nor the patched pin, and the model diff does not apply to it."""
    helper = realvllm.read_member(version, HELPER)
    model = realvllm.read_member(version, MODEL)
    assert sha(helper) == entry(HELPER)["pristine-sha256"]
    assert sha(model) not in (entry(MODEL)["pristine-sha256"], entry(MODEL)["patched-sha256"])
    with pytest.raises(PatchSetError):
        apply_patch(model, (SET / entry(MODEL)["patch"]).read_text(), name="model.py.diff")


# ============================================================== helper on CPU torch
HIDDEN = 512


def make_stage(world: int, ca_cls=FakeAiterCA, **kw) -> Stage:
    tp = SimTP(world)
    return Stage(tp=tp, wrappers=[FakeAiterWrapper(ca_cls(tp)) for _ in range(world)], **kw)


def case(world: int, tokens: int, *, dtype=torch.bfloat16, hidden=HIDDEN, seed=0, norm_cls=M3Norm):
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(tokens, hidden, generator=g).to(dtype) for _ in range(world)]
    residual = torch.randn(tokens, hidden, generator=g).to(dtype)
    weight = 0.3 * torch.randn(hidden, generator=g)
    norms = []
    for _ in range(world):
        n = norm_cls(hidden, eps=1e-6)
        with torch.no_grad():
            n.weight.copy_(weight)
        norms.append(n)
    s = sum(p.double() for p in parts) + residual.double()
    ref = (rms_ref(s, 1.0 + weight.double(), 1e-6), s)
    return parts, residual, norms, ref


def run_helper(helper, stage, parts, residual, norms):
    return stage.tp.run(lambda r: helper.fused_allreduce_gemma_rms_norm(parts[r], residual.clone(), norms[r]))


def assert_matches(outs, ref):
    for normed, res in outs:
        torch.testing.assert_close(normed.double(), ref[0], **BF16_TOL)
        torch.testing.assert_close(res.double(), ref[1], **BF16_TOL)
    for normed, res in outs[1:]:
        assert torch.equal(normed, outs[0][0]) and torch.equal(res, outs[0][1])


@pytest.fixture
def mode(monkeypatch):
    def set_(value: str | None):
        if value is None:
            monkeypatch.delenv(ENV, raising=False)
        else:
            monkeypatch.setenv(ENV, value)
    return set_


@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("tokens", [1, 37, 512])
@pytest.mark.parametrize("m", ["fused", "control", "off", None])
def test_helper_modes_match_float64_reference(patched, mode, world, tokens, m):
    mode(m)
    stage = make_stage(world)
    parts, residual, norms, ref = case(world, tokens, seed=world * 1000 + tokens)
    with staged(stage):
        helper = load_helper(patched[HELPER])
        outs = run_helper(helper, stage, parts, residual, norms)
    assert_matches(outs, ref)
    ca_calls = [c for w in stage.wrappers for c in w.aiter_ca.calls]
    if m in ("fused", None):  # unset means fused
        # Two-stage kernel for every eligible call, with w == 1 + weight, never the 1-stage path.
        assert len(ca_calls) == world and not stage.upstream_op_calls
        assert all(w.one_stage_queries == 0 for w in stage.wrappers)
        gamma = (norms[0].weight.detach().float() + 1.0).to(torch.bfloat16)
        for c in ca_calls:
            assert c["use_1stage"] is False and c["registered"] is False
            assert c["post_per_token_quant"] is False and c["eps"] == 1e-6
            assert c["w"].dtype == torch.bfloat16 and torch.equal(c["w"], gamma)
        assert all(n.calls == 0 for n in norms)
    elif m == "control":
        assert not ca_calls and not stage.upstream_op_calls
        assert all(n.calls == 1 for n in norms) and stage.tp.all_reduce_calls == 1
    else:  # off: the unpatched code, which takes vLLM's own AITER branch when 1-stage fits
        assert not ca_calls
        one_stage = FakeAiterWrapper(FakeAiterCA(SimTP(world))).use_1stage_fused_ar_rms(parts[0])
        assert len(stage.upstream_op_calls) == (world if one_stage else 0)
        assert all(c["gemma_norm"] is True for c in stage.upstream_op_calls)


@pytest.mark.parametrize("tokens", [1, 64, 200])
def test_off_is_bitwise_the_pristine_helper(real, patched, mode, tokens):
    mode("off")
    outs = {}
    for label, src in (("pristine", real[HELPER].decode()), ("off", patched[HELPER])):
        stage = make_stage(4)
        parts, residual, norms, _ = case(4, tokens, seed=tokens)
        with staged(stage):
            outs[label] = run_helper(load_helper(src), stage, parts, residual, norms)
        outs[label + "-log"] = (sorted(map(repr, stage.upstream_op_calls)),
                                [w.aiter_ca.calls for w in stage.wrappers])
    for (a, b), (c, d) in zip(outs["pristine"], outs["off"]):
        assert torch.equal(a, c) and torch.equal(b, d)
    assert outs["pristine-log"] == outs["off-log"]


def test_m3_hidden_6144_at_512_tokens_goes_fused(patched, mode):
    mode("fused")
    stage = make_stage(8)
    parts, residual, norms, ref = case(8, 512, hidden=6144, seed=6)
    with staged(stage):
        outs = run_helper(load_helper(patched[HELPER]), stage, parts, residual, norms)
    assert_matches(outs, ref)
    assert [c["use_1stage"] for w in stage.wrappers for c in w.aiter_ca.calls] == [False] * 8


@pytest.mark.parametrize("what", ["513 tokens", "3-D", "fp32", "non-contiguous", "other norm", "residual fp32"])
def test_gate_sends_ineligible_calls_to_explicit_allreduce(patched, mode, what):
    mode("fused")
    world = 2
    stage = make_stage(world)
    tokens = 513 if what == "513 tokens" else 24
    dtype = torch.float32 if what == "fp32" else torch.bfloat16
    parts, residual, norms, ref = case(world, tokens, dtype=dtype,
                                       norm_cls=OtherGemmaNorm if what == "other norm" else M3Norm)
    if what == "3-D":
        parts = [p.view(4, 6, HIDDEN) for p in parts]
        residual = residual.view(4, 6, HIDDEN)
        ref = tuple(t.view(4, 6, HIDDEN) for t in ref)
    if what == "non-contiguous":
        parts = [torch.cat([p, p], dim=1)[:, ::2] for p in parts]
        assert not parts[0].is_contiguous()
        ref = None
    if what == "residual fp32":
        residual = residual.float()
    with staged(stage):
        outs = run_helper(load_helper(patched[HELPER]), stage, parts, residual, norms)
    assert not [c for w in stage.wrappers for c in w.aiter_ca.calls]
    if what == "other norm":
        # Not M3's norm: the unpatched code (here vLLM's AITER branch, 24 tokens at TP2).
        assert len(stage.upstream_op_calls) == world
    else:
        assert not stage.upstream_op_calls and all(n.calls == 1 for n in norms)
    if ref is not None and what != "residual fp32":
        assert_matches(outs, ref)


def test_tp1_is_the_norm_alone(patched, mode):
    mode("fused")
    stage = make_stage(1)
    parts, residual, norms, ref = case(1, 8)
    with staged(stage):
        outs = run_helper(load_helper(patched[HELPER]), stage, parts, residual, norms)
    assert_matches(outs, ref)
    assert not stage.wrappers[0].aiter_ca.calls and stage.tp.all_reduce_calls == 0


def test_registered_follows_graph_capture(patched, mode):
    mode("fused")
    stage = make_stage(2, capturing=True)
    parts, residual, norms, ref = case(2, 16)
    with staged(stage):
        outs = run_helper(load_helper(patched[HELPER]), stage, parts, residual, norms)
        assert_matches(outs, ref)
        assert [c["registered"] for w in stage.wrappers for c in w.aiter_ca.calls] == [True, True]
        # A communicator built without capture registration (cuMem graph pool) copies in.
        for w in stage.wrappers:
            w.aiter_ca.enable_register_for_capturing = False
        run_helper(load_helper(patched[HELPER]), stage, parts, residual, norms)
        assert [w.aiter_ca.calls[-1]["registered"] for w in stage.wrappers] == [False, False]


def test_gamma_is_cached_per_device_and_dtype(patched, mode):
    mode("fused")
    stage = make_stage(2)
    with staged(stage):
        helper = load_helper(patched[HELPER])
        for dtype in (torch.bfloat16, torch.float16):
            parts, residual, norms, ref = case(2, 8, dtype=dtype, seed=3)
            assert_matches(run_helper(helper, stage, parts, residual, norms), ref)
            assert set(norms[0].__dict__["_m3fuse_gamma"]) == {(torch.device("cpu"), dtype)}
    ws = [c["w"] for c in stage.wrappers[0].aiter_ca.calls]
    assert [w.dtype for w in ws] == [torch.bfloat16, torch.float16]
    norm = M3Norm(HIDDEN)
    with torch.no_grad():
        norm.weight.fill_(0.25)
    g1 = helper._m3_gamma(norm, torch.empty(1, HIDDEN, dtype=torch.bfloat16))
    g2 = helper._m3_gamma(norm, torch.empty(1, HIDDEN, dtype=torch.float16))
    assert helper._m3_gamma(norm, torch.empty(1, HIDDEN, dtype=torch.bfloat16)) is g1
    assert g1.dtype == torch.bfloat16 and g2.dtype == torch.float16
    assert torch.equal(g1.float(), torch.full((HIDDEN,), 1.25))
    assert set(norm.__dict__["_m3fuse_gamma"]) == {(torch.device("cpu"), torch.bfloat16),
                                                   (torch.device("cpu"), torch.float16)}
    assert "_m3fuse_gamma" not in dict(norm.named_parameters()) and not list(norm.buffers())


class FakeAiterCAWithGemmaFlag(FakeAiterCA):
    """A newer AITER whose kernel can apply Gemma's 1 + w itself (gemma_norm=True)."""

    def fused_ar_rms(self, inp, res_inp, *, w, eps, registered=False, use_1stage=False,
                     post_per_token_quant=False, gemma_norm=False, **_):
        return super().fused_ar_rms(inp, res_inp, w=(w.float() + 1.0).to(w.dtype) if gemma_norm else w,
                                    eps=eps, registered=registered, use_1stage=use_1stage,
                                    post_per_token_quant=post_per_token_quant)


def test_gemma_scale_is_applied_exactly_once(patched, mode):
    """w = 1 + weight is the scale; passing gemma_norm=True as well would apply it twice. The
    reference check catches that, and the pinned signature refuses the flag outright."""
    mode("fused")
    src = patched[HELPER]
    needle = "                use_1stage=False,\n            )\n            return out, res_out"
    assert src.count(needle) == 1
    doubled = src.replace(needle, needle.replace("use_1stage=False,\n", "use_1stage=False,\n                gemma_norm=True,\n"))

    # Ours, on a newer AITER that has the flag: still right (the flag is never passed).
    stage = make_stage(2, ca_cls=FakeAiterCAWithGemmaFlag)
    parts, residual, norms, ref = case(2, 16, seed=11)
    with staged(stage):
        assert_matches(run_helper(load_helper(src), stage, parts, residual, norms), ref)
    # The double application: caught by the float64 comparison ...
    stage = make_stage(2, ca_cls=FakeAiterCAWithGemmaFlag)
    with staged(stage):
        outs = run_helper(load_helper(doubled), stage, parts, residual, norms)
    with pytest.raises(AssertionError):
        assert_matches(outs, ref)
    # ... and rejected by the pinned AITER's signature (no gemma_norm parameter).
    stage = make_stage(2)
    with staged(stage), pytest.raises(TypeError, match="gemma_norm"):
        run_helper(load_helper(doubled), stage, parts, residual, norms)


@pytest.mark.parametrize("value", ["bogus", "FUSEDX", "1"])
def test_bad_mode_value_raises(patched, mode, value):
    mode(value)
    stage = make_stage(2)
    with staged(stage):
        helper = load_helper(patched[HELPER])
        with pytest.raises(ValueError, match=ENV):
            helper.m3_aiter_ar_rms_mode()
        with pytest.raises(ValueError, match=ENV):
            helper.initialize_m3_aiter_allreduce()


def test_mode_values(patched, mode):
    with staged(make_stage(2)):
        helper = load_helper(patched[HELPER])
        for value, want in ((None, "fused"), ("fused", "fused"), ("control", "control"), ("off", "off")):
            mode(value)
            assert helper.m3_aiter_ar_rms_mode() == want


@pytest.mark.parametrize("problem,match", [
    ("not rocm", "not a ROCm platform"),
    ("aiter off", "VLLM_ROCM_USE_AITER"),
    ("no comm", "disable-custom-all-reduce"),
    ("disabled", "disabled its CustomAllreduce"),
    ("old aiter", "0.1.12"),
    ("no use_1stage", "use_1stage"),
])
def test_initialize_names_the_missing_setting(patched, mode, problem, match):
    mode("fused")
    stage = make_stage(2, ca_cls=FakeAiterCANoStage if problem == "no use_1stage" else FakeAiterCA)
    if problem == "not rocm":
        stage.rocm = False
    elif problem == "aiter off":
        stage.aiter_enabled = None  # if_aiter_supported returns None off-platform
    elif problem == "no comm":
        stage.wrappers = None
    elif problem == "disabled":
        for w in stage.wrappers:
            w.disabled = True
    elif problem == "old aiter":
        for w in stage.wrappers:  # no _pool: AITER < 0.1.12
            w.aiter_ca = types.SimpleNamespace(fused_ar_rms=w.aiter_ca.fused_ar_rms)
    with staged(stage):
        helper = load_helper(patched[HELPER])
        with pytest.raises(RuntimeError, match=match):
            helper.initialize_m3_aiter_allreduce()
        for m in ("control", "off"):  # no-op outside fused
            mode(m)
            helper.initialize_m3_aiter_allreduce()


def test_initialize_is_idempotent_and_noop_at_tp1(patched, mode):
    mode("fused")
    with staged(make_stage(2)):
        helper = load_helper(patched[HELPER])
        helper.initialize_m3_aiter_allreduce()
        helper.initialize_m3_aiter_allreduce()
    stage = make_stage(1)
    stage.wrappers = None
    with staged(stage):
        load_helper(patched[HELPER]).initialize_m3_aiter_allreduce()


def test_fused_never_falls_back_silently_without_the_communicator(patched, mode):
    mode("fused")
    stage = make_stage(2)
    stage.wrappers = None
    parts, residual, norms, _ = case(2, 8)
    with staged(stage), pytest.raises(RuntimeError, match="aiter_ar_comm"):
        run_helper(load_helper(patched[HELPER]), stage, parts, residual, norms)


# ============================================================== model: ast checks
@pytest.fixture(scope="session")
def trees(real, patched):
    return {"pristine": ast.parse(real[MODEL]), "patched": ast.parse(patched[MODEL]),
            "mtp": ast.parse(real[MTP])}


def calls_named(node: ast.AST, name: str) -> list[ast.Call]:
    out = []
    for n in ast.walk(node):
        if isinstance(n, ast.Call):
            f = n.func
            fname = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if fname == name:
                out.append(n)
    return out


def kw(call: ast.Call, name: str) -> str | None:
    for k in call.keywords:
        if k.arg == name:
            return ast.unparse(k.value)
    return None


def test_deferral_condition(trees):
    init = method_node(trees["patched"], "MiniMaxM3Model", "__init__")
    assigns = [n for n in ast.walk(init) if isinstance(n, ast.Assign)
               and ast.unparse(n.targets[0]) == "self.defer_ffn_all_reduce"]
    assert len(assigns) == 1
    value = assigns[0].value
    assert isinstance(value, ast.BoolOp) and isinstance(value.op, ast.And)
    assert sorted(ast.unparse(v) for v in value.values) == sorted([
        "self.m3_ar_rms_mode in ('control', 'fused')",
        "get_tensor_model_parallel_world_size() > 1",
        "parallel_config.pipeline_parallel_size == 1",
        "parallel_config.data_parallel_size == 1",
        "self.specialized_decode_config is None",
    ])
    text = ast.unparse(init)
    assert "self.m3_ar_rms_mode = m3_aiter_ar_rms_mode()" in text
    assert "parallel_config = vllm_config.parallel_config" in text
    # The specialized-decode config is known before the decision is made.
    order = [ast.unparse(s) for s in init.body]
    first = next(i for i, s in enumerate(order) if s.startswith("self.specialized_decode_config ="))
    decide = next(i for i, s in enumerate(order) if s.startswith("self.defer_ffn_all_reduce ="))
    layers = next(i for i, s in enumerate(order) if "make_layers(" in s)
    assert first < decide < layers


def test_fused_mode_initializes_aiter_at_construction(trees):
    init = method_node(trees["patched"], "MiniMaxM3Model", "__init__")
    ifs = [s for s in init.body if isinstance(s, ast.If) and calls_named(s, "initialize_m3_aiter_allreduce")]
    assert len(ifs) == 1 and ast.unparse(ifs[0].test) == "self.m3_ar_rms_mode == 'fused'"
    layers = next(i for i, s in enumerate(init.body) if "make_layers(" in ast.unparse(s))
    assert init.body.index(ifs[0]) < layers


def test_layers_get_the_model_decision_and_the_chain(trees):
    init = method_node(trees["patched"], "MiniMaxM3Model", "__init__")
    layer_calls = calls_named(init, "MiniMaxM3DecoderLayer")
    assert len(layer_calls) == 1 and kw(layer_calls[0], "defer_ffn_all_reduce") == "self.defer_ffn_all_reduce"
    text = ast.unparse(init)
    assert "layer.fuse_input_allreduce = idx > 0 and prev_defers" in text
    assert "prev_defers = layer.ffn_all_reduce_deferred" in text
    assert "self.fuse_final_norm_allreduce = prev_defers" in text


def test_decoder_layer_defers_only_when_asked(trees):
    init = method_node(trees["patched"], "MiniMaxM3DecoderLayer", "__init__")
    args = init.args
    names = [a.arg for a in args.args]
    default = args.defaults[names.index("defer_ffn_all_reduce") - (len(names) - len(args.defaults))]
    assert isinstance(default, ast.Constant) and default.value is False
    for cls in ("MiniMaxM3MoE", "MiniMaxM3MLP"):
        (call,) = calls_named(init, cls)
        assert kw(call, "reduce_results") == "not defer_ffn_all_reduce"
    assert "self.fuse_input_allreduce = False" in ast.unparse(init)
    prop = method_node(trees["patched"], "MiniMaxM3DecoderLayer", "ffn_all_reduce_deferred")
    assert "return self.block_sparse_moe.defers_all_reduce" in ast.unparse(prop)
    assert "return not self.mlp.down_proj.reduce_results" in ast.unparse(prop)


def test_moe_skips_final_all_reduce_through_the_factory(trees):
    init = method_node(trees["patched"], "MiniMaxM3MoE", "__init__")
    names = [a.arg for a in init.args.args]
    default = init.args.defaults[names.index("reduce_results") - (len(names) - len(init.args.defaults))]
    assert default.value is True
    (factory,) = calls_named(init, "FusedMoEFactory")
    assert kw(factory, "reduce_results") == "reduce_results"
    text = ast.unparse(init)
    assert "self.defers_all_reduce = not reduce_results" in text
    assert "if self.defers_all_reduce and (not moe_config.skip_final_all_reduce):" in text
    # The pristine shared expert already returns un-reduced (the runner sums then reduces).
    (shared,) = calls_named(init, "MiniMaxM3MLP")
    assert kw(shared, "reduce_results") == "False"
    fwd = ast.unparse(method_node(trees["patched"], "MiniMaxM3MoE", "forward"))
    assert "_fused_output_is_reduced" in fwd


def test_mtp_block_still_reduces(trees):
    """amd/mtp.py (unpatched) builds the decoder layer without defer_ffn_all_reduce, so its
    FFN/MoE reduce (default False -> reduce_results=True), then adds the residual itself."""
    (call,) = calls_named(trees["mtp"], "MiniMaxM3DecoderLayer")
    assert kw(call, "defer_ffn_all_reduce") is None and not any(k.arg is None for k in call.keywords)
    fwd = ast.unparse(method_node(trees["mtp"], "MiniMaxM3MultiTokenPredictorLayer", "forward"))
    assert "hidden_states += residual" in fwd


def test_final_norm_and_later_layers_go_through_the_helper(trees):
    fwd = method_node(trees["patched"], "MiniMaxM3Model", "forward")
    ifs = [n for n in ast.walk(fwd) if isinstance(n, ast.If) and ast.unparse(n.test) == "self.fuse_final_norm_allreduce"]
    assert len(ifs) == 1
    assert ast.unparse(ifs[0].body) == "hidden_states, _ = fused_allreduce_gemma_rms_norm(hidden_states, residual, self.norm)"
    assert ast.unparse(ifs[0].orelse) == "hidden_states, _ = self.norm(hidden_states, residual)"
    lfwd = method_node(trees["patched"], "MiniMaxM3DecoderLayer", "forward")
    first = lfwd.body[0]
    assert isinstance(first, ast.If) and ast.unparse(first.test) == "self.fuse_input_allreduce and residual is not None"
    assert ast.unparse(first.body) == (
        "hidden_states, residual = fused_allreduce_gemma_rms_norm(hidden_states, residual, self.input_layernorm)")


M3_FLAGS = ("fuse_input_allreduce", "fuse_final_norm_allreduce", "ffn_all_reduce_deferred")


class _Off(ast.NodeTransformer):
    """The code path with every m3fuse flag False: `if <flag>...` keeps its else branch."""

    def visit_If(self, node):
        self.generic_visit(node)
        names = {n.attr for n in ast.walk(node.test) if isinstance(n, ast.Attribute)}
        if names & set(M3_FLAGS):
            assert isinstance(node.test, (ast.Attribute, ast.BoolOp))
            if isinstance(node.test, ast.BoolOp):
                assert isinstance(node.test.op, ast.And)
            return node.orelse
        return node


def _dump(fn: ast.FunctionDef) -> str:
    return ast.dump(ast.parse(ast.unparse(fn)))


@pytest.mark.parametrize("cls", ["MiniMaxM3DecoderLayer", "MiniMaxM3Model"])
def test_off_keeps_every_original_call(trees, cls):
    """With deferral off every flag is False; the patched forward then is the pristine one."""
    pristine = method_node(trees["pristine"], cls, "forward")
    off = _Off().visit(copy.deepcopy(method_node(trees["patched"], cls, "forward")))
    assert _dump(off) == _dump(pristine)


def test_off_builds_the_original_modules(trees):
    """defer False -> reduce_results=True everywhere (the pristine default) and no AITER call."""
    p_init = ast.unparse(method_node(trees["pristine"], "MiniMaxM3DecoderLayer", "__init__"))
    assert "reduce_results" not in p_init  # pristine relies on the defaults (True)
    for cls, default in (("MiniMaxM3MLP", "True"), ("MiniMaxM3MoE", "True")):
        init = method_node(trees["patched"], cls, "__init__")
        names = [a.arg for a in init.args.args]
        d = init.args.defaults[names.index("reduce_results") - (len(names) - len(init.args.defaults))]
        assert ast.unparse(d) == default


def test_specialized_decode_refuses_deferral(trees, real):
    """The mono path (specialized_decode/runtime/executor.py) runs a layer's input norm natively
    on the incoming hidden states and returns the reduced MoE output: it can neither take nor
    hand on a partial sum, so deferral is off whenever specialized decode is configured."""
    executor = realvllm.read_member(VERSION, "vllm/models/minimax_m3/amd/specialized_decode/runtime/executor.py").decode()
    assert "hidden_states, residual = layer.input_layernorm(hidden_states, residual)" in executor
    assert "return runner(part, residual, weights, self._slots, final)" in executor
    model_state = realvllm.read_member(VERSION, "vllm/models/minimax_m3/amd/model_state.py").decode()
    assert "self.backbone.build_specialized_decode()" in model_state
    assert "if self.backbone.specialized_decode_config is not None:" in model_state
    build = ast.unparse(method_node(trees["patched"], "MiniMaxM3Model", "build_specialized_decode"))
    assert re.search(r"if self\.defer_ffn_all_reduce:\n\s+raise RuntimeError\(", build)
    # The mono branch of forward is untouched.
    def mono_branch(tree):
        fwd = method_node(tree, "MiniMaxM3Model", "forward")
        (node,) = [n for n in ast.walk(fwd) if isinstance(n, ast.If) and ast.unparse(n.test) == "decode is None"]
        return ast.dump(ast.parse(ast.unparse(node.orelse)))
    assert mono_branch(trees["patched"]) == mono_branch(trees["pristine"])


def test_issue8_captures_get_reduced_tensors(trees):
    fwd = method_node(trees["patched"], "MiniMaxM3Model", "forward")
    (stock,) = [n for n in ast.walk(fwd) if isinstance(n, ast.If) and ast.unparse(n.test) == "decode is None"]
    (loop,) = stock.body
    assert isinstance(loop, ast.For)
    call, capture = loop.body  # the layer call, then nothing but the capture
    assert ast.unparse(call) == "hidden_states, residual = layer(positions, hidden_states, residual)"
    assert isinstance(capture, ast.If)
    assert ast.unparse(capture.test) == "idx + 1 in self.aux_hidden_state_layers and layer.ffn_all_reduce_deferred"
    assert ast.unparse(capture.body) == ("self._maybe_add_hidden_state(aux_hidden_states, idx + 1, "
                                         "tensor_model_parallel_all_reduce(hidden_states), residual)")
    assert ast.unparse(capture.orelse) == "self._maybe_add_hidden_state(aux_hidden_states, idx + 1, hidden_states, residual)"
    # After the loops: only the PP hand-off (deferral is off for PP > 1) and the final norm read it.
    after = fwd.body[fwd.body.index(stock) + 1:]
    readers = [ast.unparse(s) for s in after if any(isinstance(n, ast.Name) and n.id == "hidden_states"
                                                   and isinstance(n.ctx, ast.Load) for n in ast.walk(s))]
    assert readers[0].startswith("if not get_pp_group().is_last_rank:")
    assert readers[1].startswith("if self.fuse_final_norm_allreduce:")


# ============================================================== model: run the patched forward
def _maybe_add_hidden_state_source() -> ast.FunctionDef:
    src = realvllm.read_member(VERSION, "vllm/model_executor/models/interfaces.py").decode()
    return method_node(ast.parse(src), "EagleModelMixin", "_maybe_add_hidden_state")


class _PP:
    is_first_rank = True
    is_last_rank = True


class _Partial:
    """A TP-sharded op: rank r contributes f_r(x); reduce_results all-reduces like vLLM."""

    def __init__(self, tp, mats, reduce_results, nonlinear):
        self.tp, self.mats, self.nonlinear = tp, mats, nonlinear
        self.down_proj = types.SimpleNamespace(reduce_results=reduce_results)
        self.defers_all_reduce = not reduce_results

    def __call__(self, x=None, *, positions=None, hidden_states=None):
        x = hidden_states if x is None else x
        y = x.float() @ self.mats[self.tp.rank]
        y = (torch.tanh(y) if self.nonlinear else y).to(x.dtype)
        return self.tp.all_reduce(y) if self.down_proj.reduce_results else y


def _build(src: str, helper, tp, *, defer: bool, n_layers: int, hidden: int, seed: int, aux: tuple, moe: list):
    tree = ast.parse(src)
    glb = dict(torch=torch, get_pp_group=lambda: _PP(), IntermediateTensors=dict,
               fused_allreduce_gemma_rms_norm=helper.fused_allreduce_gemma_rms_norm,
               tensor_model_parallel_all_reduce=tp.all_reduce)
    layer_ns = compile_functions(
        [method_node(tree, "MiniMaxM3DecoderLayer", "forward")]
        + ([method_node(tree, "MiniMaxM3DecoderLayer", "ffn_all_reduce_deferred")]
           if any(isinstance(n, ast.FunctionDef) and n.name == "ffn_all_reduce_deferred"
                  for n in class_node(tree, "MiniMaxM3DecoderLayer").body) else []), glb, "<layer>")
    model_ns = compile_functions([method_node(tree, "MiniMaxM3Model", "forward"), _maybe_add_hidden_state_source()],
                                 glb, "<model>")
    attrs = {"forward": layer_ns["forward"], "__call__": lambda self, *a, **k: self.forward(*a, **k)}
    if "ffn_all_reduce_deferred" in layer_ns:
        attrs["ffn_all_reduce_deferred"] = property(layer_ns["ffn_all_reduce_deferred"])
    Layer = type("Layer", (), attrs)
    Model = type("Model", (), {"forward": model_ns["forward"], "_maybe_add_hidden_state": model_ns["_maybe_add_hidden_state"]})

    g = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(n_layers):
        L = Layer()
        L.layer_id = i
        L.fuse_input_allreduce = False
        L.is_moe_layer = i in moe
        L.input_layernorm, L.post_attention_layernorm = M3Norm(hidden), M3Norm(hidden)
        for nrm in (L.input_layernorm, L.post_attention_layernorm):
            with torch.no_grad():
                nrm.weight.copy_(0.2 * torch.randn(hidden, generator=g))
        L.self_attn = _Partial(tp, [torch.randn(hidden, hidden, generator=g) / hidden ** 0.5 / tp.world
                                    for _ in range(tp.world)], reduce_results=False, nonlinear=False)
        ffn = _Partial(tp, [torch.randn(hidden, hidden, generator=g) / hidden ** 0.5
                            for _ in range(tp.world)], reduce_results=not defer, nonlinear=True)
        if L.is_moe_layer:
            L.block_sparse_moe = ffn
        else:
            L.mlp = ffn
        layers.append(L)
    m = Model()
    m.layers, m.start_layer, m.end_layer = layers, 0, n_layers
    m.specialized_decode = None
    m.aux_hidden_state_layers = aux
    m.norm = M3Norm(hidden)
    with torch.no_grad():
        m.norm.weight.copy_(0.2 * torch.randn(hidden, generator=g))
    m.embed_input_ids = lambda ids: ids  # the test passes embeddings as "ids"
    # The patched __init__'s own chain statements (prev_defers ... fuse_final_norm_allreduce).
    init = method_node(tree, "MiniMaxM3Model", "__init__")
    chain = [s for s in init.body if "prev_defers" in ast.unparse(s)]
    if chain:
        fn = ast.parse("def chain(self):\n    pass").body[0]
        fn.body = chain
        compile_functions([fn], glb, "<chain>")["chain"](m)
    return m


@torch.no_grad()
def _reference(m0, emb: torch.Tensor, world: int):
    """float64 model math, straight from the definition (sum of the ranks' partials)."""
    def norm(n, x, res):
        s = x + res
        return rms_ref(s, 1.0 + n.weight.double(), n.variance_epsilon), s

    def full(op, x, nonlinear):
        return sum((torch.tanh(x @ w.double()) if nonlinear else x @ w.double()) for w in op.mats)

    h, res, aux = emb.double(), None, []
    if 0 in m0.aux_hidden_state_layers:
        aux.append(h)
    for i, L in enumerate(m0.layers):
        if res is None:
            res = h
            h = rms_ref(h, 1.0 + L.input_layernorm.weight.double(), 1e-6)
        else:
            h, res = norm(L.input_layernorm, h, res)
        h = full(L.self_attn, h, False)
        h, res = norm(L.post_attention_layernorm, h, res)
        h = full(L.block_sparse_moe if L.is_moe_layer else L.mlp, h, True)
        if i + 1 in m0.aux_hidden_state_layers:
            aux.append(h + res)
    return norm(m0.norm, h, res)[0], aux


def _run_model(src, helper_src, tp, stage, *, defer, aux, seed=5, n_layers=5, hidden=128, tokens=16):
    with staged(stage):
        helper = load_helper(helper_src)
        models = [_build(src, helper, tp, defer=defer, n_layers=n_layers, hidden=hidden, seed=seed,
                         aux=aux, moe=[2, 3, 4]) for _ in range(tp.world)]
        emb = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed + 1)).to(torch.bfloat16)
        outs = tp.run(lambda r: models[r].forward(emb, torch.arange(tokens), None))
    return models, emb, outs


@pytest.mark.parametrize("m", ["control", "fused"])
@pytest.mark.parametrize("world", [2, 4])
def test_patched_forward_matches_unfused_loop(real, patched, mode, m, world):
    """The patched forward (deferred FFN reductions, EAGLE3 captures at 0, 2 and 5) against the
    pristine forward with reducing layers and against a float64 reference."""
    mode(m)
    aux = (0, 2, 5)
    tp = SimTP(world)
    stage = Stage(tp=tp, wrappers=[FakeAiterWrapper(FakeAiterCA(tp)) for _ in range(world)])
    models, emb, outs = _run_model(patched[MODEL], patched[HELPER], tp, stage, defer=True, aux=aux)
    assert [L.fuse_input_allreduce for L in models[0].layers] == [False, True, True, True, True]
    assert models[0].fuse_final_norm_allreduce is True
    # Residual boundaries: 5 post-attention norms, the input norms of layers 1-4, the final norm.
    boundaries = 5 + 4 + 1
    if m == "fused":  # every one of them through AITER's two-stage kernel
        assert len(stage.wrappers[0].aiter_ca.calls) == boundaries
        assert all(c["use_1stage"] is False for w in stage.wrappers for c in w.aiter_ca.calls)
    else:
        assert not stage.wrappers[0].aiter_ca.calls

    tp0 = SimTP(world)
    stage0 = Stage(tp=tp0, wrappers=[FakeAiterWrapper(FakeAiterCA(tp0)) for _ in range(world)])
    mode("off")
    _, _, base = _run_model(real[MODEL].decode(), real[HELPER].decode(), tp0, stage0, defer=False, aux=aux)

    ref_h, ref_aux = _reference(models[0], emb, world)
    for (h, caps), (bh, bcaps) in zip(outs, base):
        assert len(caps) == len(bcaps) == 3
        assert rel_err(h, ref_h) < MODEL_TOL and rel_err(h, bh) < MODEL_TOL
        for c, bc, rc in zip(caps, bcaps, ref_aux):
            assert rel_err(c, rc) < MODEL_TOL and rel_err(c, bc) < MODEL_TOL
    for h, caps in outs[1:]:  # every rank holds the same reduced tensors
        assert torch.equal(h, outs[0][0]) and all(torch.equal(a, b) for a, b in zip(caps, outs[0][1]))
    # One reduction per boundary, plus one per captured layer output (2 and 5); pristine: 5 + 5.
    assert tp.all_reduce_calls == boundaries + 2
    assert tp0.all_reduce_calls == 5 + 5


def test_uncaptured_partial_would_be_caught(real, patched, mode):
    """Sensitivity: the pristine capture statement fed by deferring layers (issue 8's leak)
    disagrees with the reference, so the comparison above would notice a leak."""
    mode("control")
    world, aux = 4, (2,)
    tp = SimTP(world)
    stage = Stage(tp=tp, wrappers=None)
    # Pristine forward code, but layers that defer and reduce in their input norm (patched layer).
    leaky = patched[MODEL]
    p_tree, pr_tree = ast.parse(leaky), ast.parse(real[MODEL])
    cls = class_node(p_tree, "MiniMaxM3Model")
    idx = next(i for i, n in enumerate(cls.body) if isinstance(n, ast.FunctionDef) and n.name == "forward")
    cls.body[idx] = method_node(pr_tree, "MiniMaxM3Model", "forward")
    models, emb, outs = _run_model(ast.unparse(p_tree), patched[HELPER], tp, stage, defer=True, aux=aux)
    _, ref_aux = _reference(models[0], emb, world)
    assert rel_err(outs[0][1][0], ref_aux[0]) > 10 * MODEL_TOL


def test_off_forward_is_bitwise_pristine(real, patched, mode):
    mode("off")
    runs = []
    for src, hsrc in ((real[MODEL].decode(), real[HELPER].decode()), (patched[MODEL], patched[HELPER])):
        tp = SimTP(2)
        stage = Stage(tp=tp, wrappers=[FakeAiterWrapper(FakeAiterCA(tp)) for _ in range(2)])
        runs.append(_run_model(src, hsrc, tp, stage, defer=False, aux=(1, 3))[2])
    for (h, caps), (h2, caps2) in zip(*runs):
        assert torch.equal(h, h2) and all(torch.equal(a, b) for a, b in zip(caps, caps2))
