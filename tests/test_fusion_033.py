"""The vllm-0.33.0 patch set: real-file round trip, helper behaviour on CPU torch, model `ast`
checks, the patched model `forward` run on a simulated TP group, and 0.30-0.32 drift.

Helper stand-ins: tests/fusion_harness_033.py (0.33.0 Stage) over tests/fusion_standins.py (shared).
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
from fusion_harness_033 import Stage, load_helper, staged
from fusion_standins import (
    FakeAiterCA,
    FakeAiterCANoStage,
    FakeAiterWrapper,
    M3Norm,
    OtherGemmaNorm,
    SimTP,
    class_node,
    compile_functions,
    method_node,
    rms_ref,
)
from m3fuse.errors import PatchSetError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from m3fuse.patching.hunks import apply_patch

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
    stage = make_stage(2)
    parts, residual, norms, ref = case(2, 16)
    with staged(stage):
        helper = load_helper(patched[HELPER])
        # A gamma first needed inside a capture would hold no values until replay:
        # that call takes the explicit path; the eager (profile) run fills the cache.
        stage.capturing = True
        assert_matches(run_helper(helper, stage, parts, residual, norms), ref)
        assert not any(w.aiter_ca.calls for w in stage.wrappers)
        stage.capturing = False
        assert_matches(run_helper(helper, stage, parts, residual, norms), ref)
        stage.capturing = True
        assert_matches(run_helper(helper, stage, parts, residual, norms), ref)
        assert [[c["registered"] for c in w.aiter_ca.calls] for w in stage.wrappers] == [[False, True]] * 2
        # A communicator built without capture registration (cuMem graph pool) copies in.
        for w in stage.wrappers:
            w.aiter_ca.enable_register_for_capturing = False
        run_helper(helper, stage, parts, residual, norms)
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
    with staged(stage):
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
    needle = "        use_1stage=False,\n    )\n    return out, res_out"
    assert src.count(needle) == 1
    doubled = src.replace(needle, needle.replace("use_1stage=False,\n", "use_1stage=False,\n        gemma_norm=True,\n"))

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
    ("aiter off", "VLLM_ROCM_USE_AITER is not set to 1"),
    ("custom ar env off", "VLLM_ROCM_USE_AITER_CUSTOM_AR is off"),
    ("custom ar disabled", "--disable-custom-all-reduce"),
    ("no comm", "VLLM_BATCH_INVARIANT"),
    ("disabled", "disabled its CustomAllreduce"),
    ("old aiter", "0.1.12"),
    ("no use_1stage", "use_1stage"),
])
def test_initialize_names_the_missing_setting(patched, mode, problem, match):
    mode("fused")
    stage = make_stage(2, ca_cls=FakeAiterCANoStage if problem == "no use_1stage" else FakeAiterCA)
    if problem in ("not rocm", "aiter off", "custom ar env off", "custom ar disabled", "no comm"):
        stage.wrappers = None  # vLLM's TP communicator built no aiter_ar_comm
    if problem == "not rocm":
        stage.rocm = False
    elif problem == "aiter off":
        stage.aiter_enabled = False
    elif problem == "custom ar env off":
        stage.aiter_custom_ar_env = False
    elif problem == "custom ar disabled":
        stage.custom_all_reduce = False
    elif problem == "disabled":
        for w in stage.wrappers:
            w.aiter_ca.disabled = True
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
    with staged(stage), pytest.raises(RuntimeError, match="no AITER custom all-reduce"):
        run_helper(load_helper(patched[HELPER]), stage, parts, residual, norms)


# ============================================================== deferral decision (helper)
def _vllm_config(pp=1, dp=1, enable_sp=False, sp_moe=False):
    pc = types.SimpleNamespace(pipeline_parallel_size=pp, data_parallel_size=dp,
                               use_sequence_parallel_moe=sp_moe)
    cc = types.SimpleNamespace(pass_config=types.SimpleNamespace(enable_sp=enable_sp))
    return types.SimpleNamespace(parallel_config=pc, compilation_config=cc)


@pytest.mark.parametrize("m,world,pp,dp,want", [
    ("fused", 4, 1, 1, True), (None, 2, 1, 1, True), ("control", 8, 1, 1, True),
    ("off", 4, 1, 1, False), ("fused", 1, 1, 1, False), ("control", 4, 2, 1, False),
    ("fused", 4, 1, 2, False),
])
def test_defer_decision(patched, mode, m, world, pp, dp, want):
    mode(m)
    with staged(make_stage(world)):
        helper = load_helper(patched[HELPER])
        assert helper.m3_defer_ffn_all_reduce(_vllm_config(pp=pp, dp=dp)) is want


@pytest.mark.parametrize("sp", ["enable_sp", "sp_moe"])
def test_defer_refuses_sequence_parallelism(patched, mode, sp):
    mode("control")
    with staged(make_stage(4)):
        helper = load_helper(patched[HELPER])
        with pytest.raises(ValueError, match="sequence parallelism"):
            helper.m3_defer_ffn_all_reduce(_vllm_config(**{sp: True}))
        mode("off")
        assert helper.m3_defer_ffn_all_reduce(_vllm_config(**{sp: True})) is False


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


def default_of(fn: ast.FunctionDef, arg: str) -> str:
    names = [a.arg for a in fn.args.args]
    return ast.unparse(fn.args.defaults[names.index(arg) - (len(names) - len(fn.args.defaults))])


def src(node) -> str:
    return ast.unparse(node)


def test_deferral_condition_and_aiter_init(trees):
    init = method_node(trees["patched"], "MiniMaxM3Model", "__init__")
    body = [src(s) for s in init.body]
    decide = body.index("self.defer_ffn_all_reduce = self.specialized_decode_config is None "
                        "and m3_defer_ffn_all_reduce(vllm_config)")
    assert body[decide - 1] == "self.m3_ar_rms_mode = m3_aiter_ar_rms_mode()"
    assert body[decide + 1] == "initialize_m3_aiter_allreduce()"  # no-op unless fused, TP > 1
    first = next(i for i, s in enumerate(body) if s.startswith("self.specialized_decode_config = "))
    layers = next(i for i, s in enumerate(body) if "make_layers(" in s)
    assert first < decide < layers
    (call,) = calls_named(init, "MiniMaxM3DecoderLayer")
    assert kw(call, "defer_ffn_all_reduce") == "self.defer_ffn_all_reduce"


def test_decoder_layer_defers_only_when_asked(trees):
    init = method_node(trees["patched"], "MiniMaxM3DecoderLayer", "__init__")
    assert default_of(init, "defer_ffn_all_reduce") == "False"
    for cls in ("MiniMaxM3MoE", "MiniMaxM3MLP"):
        (call,) = calls_named(init, cls)
        assert kw(call, "reduce_results") == "not defer_ffn_all_reduce"
    assert "self.defer_ffn_all_reduce = defer_ffn_all_reduce" in src(init)
    fwd = method_node(trees["patched"], "MiniMaxM3DecoderLayer", "forward")
    assert default_of(fwd, "fuse_input_allreduce") == "False"
    first = fwd.body[0]
    assert isinstance(first, ast.If) and src(first.test) == "fuse_input_allreduce"
    assert src(first.body) == (
        "hidden_states, residual = fused_allreduce_gemma_rms_norm(hidden_states, residual, self.input_layernorm)")


def test_moe_skips_final_all_reduce_through_the_factory(trees):
    init = method_node(trees["patched"], "MiniMaxM3MoE", "__init__")
    assert default_of(init, "reduce_results") == "True"
    (factory,) = calls_named(init, "FusedMoEFactory")
    assert kw(factory, "reduce_results") == "reduce_results"
    text = src(init)
    assert "self.defers_all_reduce = not reduce_results" in text
    assert "if self.defers_all_reduce and (not self.experts.moe_config.skip_final_all_reduce):" in text
    (shared,) = calls_named(init, "MiniMaxM3MLP")  # already un-reduced upstream; the runner sums
    assert kw(shared, "reduce_results") == "False"
    fwd = src(method_node(trees["patched"], "MiniMaxM3MoE", "forward"))
    assert "if self.defers_all_reduce and self.experts._fused_output_is_reduced:" in fwd


def test_mtp_block_still_reduces(trees):
    """amd/mtp.py (unpatched, pinned) builds the decoder layer without defer_ffn_all_reduce
    (default False -> reduce_results=True), calls it without fuse_input_allreduce, then adds
    the residual to its output itself."""
    (call,) = calls_named(trees["mtp"], "MiniMaxM3DecoderLayer")
    assert kw(call, "defer_ffn_all_reduce") is None and not any(k.arg is None for k in call.keywords)
    fwd = method_node(trees["mtp"], "MiniMaxM3MultiTokenPredictorLayer", "forward")
    (layer_call,) = [c for c in calls_named(fwd, "transformer_layer")]
    assert kw(layer_call, "fuse_input_allreduce") is None and kw(layer_call, "residual") == "None"
    assert "hidden_states += residual" in src(fwd)


M3_FLAGS = {"fuse_input_allreduce", "defer_ffn_all_reduce", "partial"}


class _Off(ast.NodeTransformer):
    """The code path with deferral off: every m3fuse flag False. `if <flag>` (alone or in an
    `and`) keeps its else branch; the `partial = False` bookkeeping goes."""

    def visit_If(self, node):
        self.generic_visit(node)
        t = node.test
        names = {n.attr for n in ast.walk(t) if isinstance(n, ast.Attribute)} | {
            n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
        if names & M3_FLAGS:
            assert isinstance(t, (ast.Name, ast.Attribute)) or (
                isinstance(t, ast.BoolOp) and isinstance(t.op, ast.And))
            return node.orelse
        return node

    def visit_Assign(self, node):
        if [src(t) for t in node.targets] == ["partial"]:
            return None
        return node


def _body(fn: ast.FunctionDef) -> str:
    return ast.dump(ast.parse("\n".join(src(s) for s in fn.body)))


@pytest.mark.parametrize("cls", ["MiniMaxM3DecoderLayer", "MiniMaxM3Model"])
def test_off_keeps_every_original_call(trees, cls):
    """With deferral off every flag is False; the patched forward then is the pristine one."""
    pristine = method_node(trees["pristine"], cls, "forward")
    off = _Off().visit(copy.deepcopy(method_node(trees["patched"], cls, "forward")))
    assert _body(off) == _body(pristine)
    extra = {a.arg for a in off.args.args} - {a.arg for a in pristine.args.args}
    assert extra == ({"fuse_input_allreduce"} if cls == "MiniMaxM3DecoderLayer" else set())


def test_off_builds_the_original_modules(trees):
    """defer False -> reduce_results=True everywhere, the pristine default."""
    p_init = src(method_node(trees["pristine"], "MiniMaxM3DecoderLayer", "__init__"))
    assert "reduce_results" not in p_init
    for cls in ("MiniMaxM3MLP", "MiniMaxM3MoE"):
        assert default_of(method_node(trees["patched"], cls, "__init__"), "reduce_results") == "True"


def test_specialized_decode_refuses_deferral(trees):
    """The mono path (specialized_decode/runtime/executor.py) runs a layer's input norm natively
    on the incoming hidden states and returns the reduced MoE output: it can neither take nor
    hand on a partial sum, so deferral is off whenever specialized decode is configured."""
    executor = realvllm.read_member(VERSION, "vllm/models/minimax_m3/amd/specialized_decode/runtime/executor.py").decode()
    assert "hidden_states, residual = layer.input_layernorm(hidden_states, residual)" in executor
    assert "return runner(part, residual, weights, self._slots, final)" in executor
    model_state = realvllm.read_member(VERSION, "vllm/models/minimax_m3/amd/model_state.py").decode()
    assert "if self.backbone.specialized_decode_config is not None:" in model_state
    assert "self.backbone.build_specialized_decode()" in model_state
    build = src(method_node(trees["patched"], "MiniMaxM3Model", "build_specialized_decode"))
    assert re.search(r"if self\.defer_ffn_all_reduce:\n\s+raise RuntimeError\(", build)
    fwd_p = method_node(trees["patched"], "MiniMaxM3Model", "forward")
    fwd_0 = method_node(trees["pristine"], "MiniMaxM3Model", "forward")
    (top_p,) = [s for s in fwd_p.body if isinstance(s, ast.If) and "decode is None" in src(s.test)]
    (top_0,) = [s for s in fwd_0.body if isinstance(s, ast.If) and src(s.test) == "decode is None"]
    assert src(top_p.test) == "decode is None and self.defer_ffn_all_reduce"
    (elif_,) = top_p.orelse
    assert src(elif_.test) == "decode is None"
    assert src(elif_.body) == src(top_0.body) and src(elif_.orelse) == src(top_0.orelse)


def test_issue8_captures_get_reduced_tensors(trees):
    fwd = method_node(trees["patched"], "MiniMaxM3Model", "forward")
    (top,) = [s for s in fwd.body if isinstance(s, ast.If) and "decode is None" in src(s.test)]
    (loop,) = top.body
    assert isinstance(loop, ast.For)
    assert [src(s) for s in loop.body] == [
        "hidden_states, residual = layer(positions, hidden_states, residual, fuse_input_allreduce=partial)",
        "partial = layer.defer_ffn_all_reduce",
        "if partial and idx + 1 in self.aux_hidden_state_layers:\n"
        "    hidden_states = tensor_model_parallel_all_reduce(hidden_states)\n"
        "    partial = False",
        "self._maybe_add_hidden_state(aux_hidden_states, idx + 1, hidden_states, residual)",
    ]
    # Before the loop nothing is partial; after it only the PP hand-off (deferral is off for
    # PP > 1, and it reduces anyway) and the final norm read hidden_states.
    i = fwd.body.index(top)
    assert src(fwd.body[i - 1]) == "partial = False"
    readers = [s for s in fwd.body[i + 1:] if any(
        isinstance(n, ast.Name) and n.id == "hidden_states" and isinstance(n.ctx, ast.Load) for n in ast.walk(s))]
    assert src(readers[0]).startswith("if not get_pp_group().is_last_rank:\n    if partial:\n"
                                      "        hidden_states = tensor_model_parallel_all_reduce(hidden_states)")
    assert src(readers[1]) == ("if partial:\n    hidden_states, _ = fused_allreduce_gemma_rms_norm("
                               "hidden_states, residual, self.norm)\nelse:\n"
                               "    hidden_states, _ = self.norm(hidden_states, residual)")
    # ... and then only the returns of the normed output.
    assert [src(r).split("\n")[0] for r in readers[2:]] == ["if len(aux_hidden_states) > 0:", "return hidden_states"]


# ============================================================== model: run the patched forward
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


def _build(model_src: str, helper, tp, *, defer: bool, n_layers: int, hidden: int, seed: int, aux: tuple):
    """The real forward methods of the given model source on stand-in layers/modules."""
    tree = ast.parse(model_src)
    iface = ast.parse(realvllm.read_member(VERSION, "vllm/model_executor/models/interfaces.py").decode())
    glb = dict(torch=torch, get_pp_group=lambda: _PP(), IntermediateTensors=dict,
               fused_allreduce_gemma_rms_norm=helper.fused_allreduce_gemma_rms_norm,
               tensor_model_parallel_all_reduce=tp.all_reduce)
    layer_fwd = compile_functions([method_node(tree, "MiniMaxM3DecoderLayer", "forward")], glb, "<layer>")["forward"]
    model_ns = compile_functions([method_node(tree, "MiniMaxM3Model", "forward"),
                                  method_node(iface, "EagleModelMixin", "_maybe_add_hidden_state")], glb, "<model>")
    Layer = type("Layer", (), {"forward": layer_fwd, "__call__": lambda self, *a, **k: self.forward(*a, **k)})
    Model = type("Model", (), {"forward": model_ns["forward"], "_maybe_add_hidden_state": model_ns["_maybe_add_hidden_state"]})
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(n_layers):
        L = Layer()
        L.layer_id, L.is_moe_layer, L.defer_ffn_all_reduce = i, i >= 2, defer
        L.input_layernorm, L.post_attention_layernorm = M3Norm(hidden), M3Norm(hidden)
        for nrm in (L.input_layernorm, L.post_attention_layernorm):
            with torch.no_grad():
                nrm.weight.copy_(0.2 * torch.randn(hidden, generator=g))
        L.self_attn = _Partial(tp, [torch.randn(hidden, hidden, generator=g) / hidden ** 0.5 / tp.world
                                    for _ in range(tp.world)], reduce_results=False, nonlinear=False)
        ffn = _Partial(tp, [torch.randn(hidden, hidden, generator=g) / hidden ** 0.5
                            for _ in range(tp.world)], reduce_results=not defer, nonlinear=True)
        setattr(L, "block_sparse_moe" if L.is_moe_layer else "mlp", ffn)
        layers.append(L)
    m = Model()
    m.layers, m.start_layer, m.end_layer = layers, 0, n_layers
    m.specialized_decode, m.defer_ffn_all_reduce, m.aux_hidden_state_layers = None, defer, aux
    m.norm = M3Norm(hidden)
    with torch.no_grad():
        m.norm.weight.copy_(0.2 * torch.randn(hidden, generator=g))
    m.embed_input_ids = lambda ids: ids  # the test hands embeddings in as "ids"
    return m


@torch.no_grad()
def _reference(m0, emb: torch.Tensor):
    """float64 model math, from the definition (each sharded op = the sum of the ranks' parts)."""
    def full(op, x, nonlinear):
        return sum((torch.tanh(x @ w.double()) if nonlinear else x @ w.double()) for w in op.mats)

    def norm(n, s):
        return rms_ref(s, 1.0 + n.weight.double(), n.variance_epsilon)

    h, res, aux = emb.double(), None, []
    if 0 in m0.aux_hidden_state_layers:
        aux.append(h)
    for i, L in enumerate(m0.layers):
        res = h if res is None else h + res
        h = full(L.self_attn, norm(L.input_layernorm, res), False)
        res = h + res
        h = full(L.block_sparse_moe if L.is_moe_layer else L.mlp, norm(L.post_attention_layernorm, res), True)
        if i + 1 in m0.aux_hidden_state_layers:
            aux.append(h + res)
    return norm(m0.norm, h + res), aux


def _run_model(model_src, helper_src, tp, stage, *, defer, aux, seed=5, n_layers=5, hidden=128, tokens=16):
    with staged(stage):
        helper = load_helper(helper_src)
        models = [_build(model_src, helper, tp, defer=defer, n_layers=n_layers, hidden=hidden, seed=seed, aux=aux)
                  for _ in range(tp.world)]
        emb = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed + 1)).to(torch.bfloat16)
        outs = tp.run(lambda r: models[r].forward(emb, torch.arange(tokens), None))
    return models, emb, outs


def _stage(world):
    tp = SimTP(world)
    return tp, Stage(tp=tp, wrappers=[FakeAiterWrapper(FakeAiterCA(tp)) for _ in range(world)])


@pytest.mark.parametrize("aux", [(0, 2, 5), (1, 3)])
@pytest.mark.parametrize("m", ["control", "fused"])
@pytest.mark.parametrize("world", [2, 4])
def test_patched_forward_matches_unfused_loop(real, patched, mode, m, world, aux):
    """The patched forward with deferred FFN reductions and EAGLE3 captures against the
    pristine forward with reducing layers and against a float64 reference."""
    mode(m)
    tp, stage = _stage(world)
    models, emb, outs = _run_model(patched[MODEL], patched[HELPER], tp, stage, defer=True, aux=aux)
    n = len(models[0].layers)
    captured = len([a for a in aux if 1 <= a <= n])
    # Each FFN output is reduced exactly once (fused into the next norm, or explicitly for a
    # captured layer), each attention output once: as many reductions as unpatched.
    assert tp.all_reduce_calls == 2 * n
    fused_calls = stage.wrappers[0].aiter_ca.calls
    if m == "fused":  # post-attention norms + the input/final norms after an uncaptured layer
        assert len(fused_calls) == n + (n - captured)
        assert all(c["use_1stage"] is False for w in stage.wrappers for c in w.aiter_ca.calls)
    else:
        assert not fused_calls

    mode("off")
    tp0, stage0 = _stage(world)
    _, _, base = _run_model(real[MODEL].decode(), real[HELPER].decode(), tp0, stage0, defer=False, aux=aux)
    assert tp0.all_reduce_calls == 2 * n

    ref_h, ref_aux = _reference(models[0], emb)
    for (h, caps), (bh, bcaps) in zip(outs, base):
        assert len(caps) == len(bcaps) == len(aux)
        assert rel_err(h, ref_h) < MODEL_TOL and rel_err(h, bh) < MODEL_TOL
        for c, bc, rc in zip(caps, bcaps, ref_aux):
            assert rel_err(c, rc) < MODEL_TOL and rel_err(c, bc) < MODEL_TOL
    for h, caps in outs[1:]:  # every rank holds the same reduced tensors
        assert torch.equal(h, outs[0][0]) and all(torch.equal(a, b) for a, b in zip(caps, outs[0][1]))


class _DropCaptureReduce(ast.NodeTransformer):
    def visit_If(self, node):
        self.generic_visit(node)
        return None if "aux_hidden_state_layers" in src(node.test) else node


def test_a_leaked_partial_capture_would_be_caught(patched, mode):
    """Sensitivity: the same forward without the capture's all-reduce (issue 8's leak) hands
    EAGLE3 a partial sum, far outside the tolerance used above."""
    mode("control")
    tree = ast.parse(patched[MODEL])
    cls = class_node(tree, "MiniMaxM3Model")
    i = next(i for i, n in enumerate(cls.body) if isinstance(n, ast.FunctionDef) and n.name == "forward")
    cls.body[i] = ast.fix_missing_locations(_DropCaptureReduce().visit(cls.body[i]))
    tp, stage = _stage(4)
    models, emb, outs = _run_model(ast.unparse(tree), patched[HELPER], tp, stage, defer=True, aux=(2,))
    _, ref_aux = _reference(models[0], emb)
    assert rel_err(outs[0][1][0], ref_aux[0]) > 10 * MODEL_TOL


def test_off_forward_is_bitwise_pristine(real, patched, mode):
    mode("off")
    runs = []
    for msrc, hsrc in ((real[MODEL].decode(), real[HELPER].decode()), (patched[MODEL], patched[HELPER])):
        tp, stage = _stage(2)
        runs.append(_run_model(msrc, hsrc, tp, stage, defer=False, aux=(1, 3))[2])
    for (h, caps), (h2, caps2) in zip(*runs):
        assert torch.equal(h, h2) and all(torch.equal(a, b) for a, b in zip(caps, caps2))
