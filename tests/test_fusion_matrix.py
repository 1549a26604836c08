"""The fusion test matrix: every patch set under patches/, one row of facts each
(tests/fusion_matrix.py), one harness (tests/fusion_harness.py).

Per row: the table itself against the real release files; the set's round trip on the real
files; the patched helper in every mode on simulated TP 2/4/8 against float64; its gate, gamma
cache, `registered`, init errors and deferral decision; `ast` checks of the patched model
(deferral wiring, MoE knobs, MTP, final norm, `off` = pristine bodies, specialized decode);
the patched `MiniMaxM3Model.forward` (real classes) against the pristine forward and float64,
with and without EAGLE3 captures; the release's own `MiniMaxM3MoE` proving the shared expert
is reduced exactly once in every mode; and the NVIDIA model's same-named norm taking the
unpatched path. A case that does not apply to a row is not generated.

Every test function takes the row as its first argument `fs` and reads the set's files only
through `patched_text` (so tests/test_fusion_mutations.py can run them against planted bugs).
"""

from __future__ import annotations

import ast
import base64
import copy
import csv
import functools
import hashlib
import io
import re
import types
import zipfile
from collections import Counter

import pytest
import torch

import fusion_facts
import realvllm
from fusion_harness import (
    EXTRA_STANDINS,
    INTERFACES,
    MOE_LAYER,
    MOE_RUNNER,
    Stage,
    ToyConfig,
    arm_world,
    build_model,
    flashinfer_norm_modules,
    installed_aiter,
    load_helper,
    load_model,
    manifest,
    nvidia_norm_class,
    patched_text,
    pristine_bytes,
    pristine_text,
    release_bytes,
    release_members,
    release_model_names,
    run_forward,
    tree_of,
)
from fusion_matrix import PATCHES, ROW_IDS, ROWS, rows_where
from fusion_standins import (
    FakeAiterCA,
    FakeAiterCANoStage,
    FakeAiterWrapper,
    M3Norm,
    OtherGemmaNorm,
    SimTP,
    class_node,
    method_node,
    rms_ref,
)
from m3fuse.errors import PatchSetError
from m3fuse.patching.hunks import apply_patch

HELPER, MODEL, MTP = realvllm.HELPER, realvllm.MODEL, realvllm.MTP
ENV = "M3_AITER_AR_RMS_MODE"
H = 64
EPS = 1e-6
BF16_TOL = dict(atol=3e-2, rtol=3e-2)
DEFER = "defer_ffn_all_reduce"


def rows(pred=lambda r: True):
    """pytest params over the rows a fact applies to."""
    return pytest.mark.parametrize("fs", rows_where(pred), ids=lambda r: r.name)


all_rows = rows()


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def src(node) -> str:
    return ast.unparse(node)


def dump(node: ast.AST) -> str:
    return ast.dump(node, include_attributes=False)


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
            return src(k.value)
    return None


def default_of(fn: ast.FunctionDef, arg: str) -> str:
    names = [a.arg for a in fn.args.args]
    if arg in names:
        return src(fn.args.defaults[names.index(arg) - (len(names) - len(fn.args.defaults))])
    kwo = [a.arg for a in fn.args.kwonlyargs]
    return src(fn.args.kw_defaults[kwo.index(arg)])


def trees(fs):
    return {"pristine": tree_of(pristine_text(fs, MODEL)), "patched": tree_of(patched_text(fs, MODEL)),
            "mtp": tree_of(pristine_text(fs, MTP))}


# ============================================================== the table
def test_every_set_under_patches_has_a_row():
    """A set with no row would ship untested; a row with no set tests nothing."""
    folders = sorted(p.name for p in PATCHES.iterdir() if (p / "manifest.toml").exists())
    assert folders == sorted(ROW_IDS)


@functools.cache
def _wheel_names(version: str) -> frozenset[str]:
    return release_members(version)


@all_rows
def test_row_facts_match_the_release(fs):
    """Every fact of the row (tests/fusion_facts.json), read again off the release's real files
    by its function in tests/fusion_facts.py; the manifest lists the row's releases."""
    m = manifest(fs)
    assert tuple(m["vllm-versions"]) == fs.versions and m["name"] == fs.name
    fresh = fusion_facts.derive_one(fusion_facts.Release(fs.name, fs.versions))
    assert fresh == fusion_facts.load()[fs.name], "stale: run python tools/release_facts.py --write"


@all_rows
def test_listed_versions_ship_the_same_files(fs):
    for v in fs.versions[1:]:
        for rel in (HELPER, MODEL, MTP):
            assert sha(release_bytes(v, rel)) == sha(pristine_bytes(fs, rel)), (v, rel)


def test_each_release_matches_exactly_one_set():
    """The (helper, model) pristine pins tell every release's set apart; 0.23.0 has no M3."""
    pins = {r.name: {f["path"]: f["pristine-sha256"] for f in manifest(r)["files"]} for r in ROWS}
    for r in ROWS:
        for v in r.versions:
            got = (sha(release_bytes(v, HELPER)), sha(release_bytes(v, MODEL)))
            matches = [n for n, p in pins.items() if (p[HELPER], p[MODEL]) == got]
            assert matches == [r.name], (v, matches)
    assert MODEL not in _wheel_names("0.23.0")


# ============================================================== real files, pins, round trip
@all_rows
def test_set_applies_reverts_and_compiles(fs):
    m = manifest(fs)
    assert sorted(f["path"] for f in m["files"]) == sorted([HELPER, MODEL])  # mtp.py is never patched
    for entry in m["files"]:
        diff = (fs.dir / entry["patch"]).read_text()
        for v in fs.versions:
            original = release_bytes(v, entry["path"])
            assert sha(original) == entry["pristine-sha256"]
            patched = apply_patch(original, diff, name=entry["patch"])
            assert sha(patched) == entry["patched-sha256"]
            assert apply_patch(patched, diff, reverse=True, name=entry["patch"]) == original
        compile(patched, entry["path"], "exec")
        with pytest.raises(PatchSetError):  # applying twice is refused, never doubled
            apply_patch(patched, diff, name=entry["patch"])
    for rel in (HELPER, MODEL):
        compile(patched_text(fs, rel), rel, "exec")


@all_rows
def test_pristine_pins_match_the_wheel_record(fs):
    """RECORD's own hashes (urlsafe b64 sha256) agree with the set's pristine pins, on every
    listed release."""
    pins = {f["path"]: f["pristine-sha256"] for f in manifest(fs)["files"]}
    pins[MTP] = fs.mtp_sha256
    for v in fs.versions:
        with zipfile.ZipFile(realvllm.wheel_path(v)) as zf:
            rec = next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
            rows_ = {r[0]: r[1] for r in csv.reader(io.StringIO(zf.read(rec).decode())) if len(r) >= 2}
        for path, pin in pins.items():
            assert rows_[path] == "sha256=" + base64.urlsafe_b64encode(bytes.fromhex(pin)).rstrip(b"=").decode()


# ============================================================== helper on CPU torch
def make_inputs(world: int, tokens: int = 16, hidden: int = H, dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    partials = [torch.randn(tokens, hidden, generator=g).to(dtype) for _ in range(world)]
    residual = torch.randn(tokens, hidden, generator=g).to(dtype)
    weight = 0.3 * torch.randn(hidden, generator=g)
    return partials, residual, weight


def reference(partials, residual, weight, eps=EPS):
    """float64: all-reduce (sum), residual add, Gemma RMSNorm (scale 1 + weight)."""
    s = sum(p.double() for p in partials) + residual.double()
    return rms_ref(s, 1.0 + weight.double(), eps), s


def new_norm(weight, cls=M3Norm, dtype=torch.bfloat16):
    n = cls(weight.numel(), eps=EPS)
    with torch.no_grad():
        n.weight.copy_(weight)
    return n.to(dtype)


def run_helper(stage: Stage, helper, partials, residual, norm):
    return stage.tp.run(lambda r: helper.fused_allreduce_gemma_rms_norm(partials[r].clone(), residual.clone(), norm))


def assert_matches(outs, ref, shape=None):
    for out, res in outs:
        assert out.dtype == res.dtype
        o, r = (out, res) if shape is None else (out.reshape(shape), res.reshape(shape))
        torch.testing.assert_close(o.double(), ref[0], **BF16_TOL)
        torch.testing.assert_close(r.double(), ref[1], **BF16_TOL)
    for out, res in outs[1:]:  # every rank holds the same reduced tensors
        assert torch.equal(out, outs[0][0]) and torch.equal(res, outs[0][1])


def _wrapper(st: Stage) -> FakeAiterWrapper | None:
    return st.rocm_aiter_ops._wrapper


def _one_stage_fits(world: int, x: torch.Tensor) -> bool:
    return FakeAiterWrapper(FakeAiterCA(SimTP(world))).use_1stage_fused_ar_rms(x)


TOKENS = (1, 37, 512)


@all_rows
@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("mode", ["fused", "control", "off", None], ids=["fused", "control", "off", "unset"])
def test_helper_modes_match_float64_reference(fs, world, mode):
    results = {}
    for tokens in TOKENS:
        partials, residual, weight = make_inputs(world, tokens=tokens, seed=world * 1000 + tokens)
        ref = reference(partials, residual, weight)
        with Stage(fs, SimTP(world), mode=mode) as st:
            helper = load_helper(fs)
            helper.initialize_m3_aiter_allreduce()
            norm = new_norm(weight)
            outs = run_helper(st, helper, partials, residual, norm)
        assert_matches(outs, ref)
        ca_calls = st.ca.calls if st.ca is not None else []
        if mode in ("fused", None):  # unset means fused: the two-stage kernel, w = 1 + weight
            assert len(ca_calls) == world and norm.calls == 0
            gamma = (norm.weight.detach().float() + 1.0).to(torch.bfloat16)
            for c in ca_calls:
                assert c["use_1stage"] is False and c["registered"] is False
                assert c["post_per_token_quant"] is False and c["eps"] == EPS
                assert c["w"].dtype == torch.bfloat16 and torch.equal(c["w"], gamma)
            assert not st.upstream_op_calls  # never vLLM's one-stage branch (0.30+)
            assert _wrapper(st) is None or _wrapper(st).one_stage_queries == 0
        elif mode == "control":  # explicit all-reduce + M3's norm, never the one-stage branch
            assert not ca_calls and not st.upstream_op_calls
            assert norm.calls == world and st.fallback_all_reduces == 1
        else:  # off: the unpatched code
            assert not ca_calls
            fits = fs.upstream_aiter_branch and _one_stage_fits(world, partials[0])
            assert len(st.upstream_op_calls) == (world if fits else 0)
            assert all(c["gemma_norm"] is True for c in st.upstream_op_calls)
        results[tokens] = outs
    if not fs.upstream_aiter_branch and mode == "control":
        # up to 0.29 the unpatched path is the explicit all-reduce + norm: control is it, bit for bit
        for tokens in TOKENS:
            partials, residual, weight = make_inputs(world, tokens=tokens, seed=world * 1000 + tokens)
            with Stage(fs, SimTP(world), mode="off") as st:
                off = run_helper(st, load_helper(fs), partials, residual, new_norm(weight))
            for (a, ra), (b, rb) in zip(results[tokens], off):
                assert torch.equal(a, b) and torch.equal(ra, rb)


ONE_STAGE_AITER = "0.1.21.post2"  # has ROCm/aiter#4346 (0.1.19.post1+) and gemma_norm


@all_rows
@pytest.mark.parametrize("world", [2, 4, 8])
def test_fused_1stage_runs_the_one_stage_kernel_exactly_where_vllms_rule_admits(fs, world):
    """The A/B arm `fused-1stage` (issue 23): AITER's fused kernel with use_1stage=True for the
    calls the release's own `_can_use_aiter_fused_ar_rms` admits (the wrapper's rule: at most
    80 tokens, its byte cap per TP size), two-stage for the other calls up to 512 tokens, both
    within bf16 of the float64 reference and never vLLM's own op. Releases without that rule
    (before 0.30) refuse the arm at construction."""
    if not fs.upstream_aiter_branch:
        with installed_aiter(ONE_STAGE_AITER), Stage(fs, SimTP(world), mode="fused-1stage"):
            with pytest.raises(RuntimeError, match="fused-1stage: this vLLM has no one-stage rule"):
                load_helper(fs).initialize_m3_aiter_allreduce()
        return
    for tokens in (1, 37, 80, 81, 512):
        partials, residual, weight = make_inputs(world, tokens=tokens, seed=world * 1000 + tokens)
        ref = reference(partials, residual, weight)
        with installed_aiter(ONE_STAGE_AITER), Stage(fs, SimTP(world), mode="fused-1stage") as st:
            helper = load_helper(fs)
            helper.initialize_m3_aiter_allreduce()
            norm = new_norm(weight)
            outs = run_helper(st, helper, partials, residual, norm)
        assert_matches(outs, ref)
        admits = _one_stage_fits(world, partials[0])
        assert admits == (tokens <= 80)  # H=64 bf16 is far under every byte cap: the token cap binds
        calls = st.ca.calls
        assert len(calls) == world and norm.calls == 0 and not st.upstream_op_calls
        gamma = (norm.weight.detach().float() + 1.0).to(torch.bfloat16)
        for c in calls:
            assert c["use_1stage"] is admits, (tokens, c["use_1stage"])
            assert c["registered"] is False and c["eps"] == EPS and torch.equal(c["w"], gamma)


@all_rows
@pytest.mark.parametrize("tokens", [1, 64, 200])
def test_off_is_bitwise_the_pristine_helper(fs, tokens):
    outs = {}
    for label, text in (("pristine", pristine_text(fs, HELPER)), ("off", patched_text(fs, HELPER))):
        partials, residual, weight = make_inputs(4, tokens=tokens, seed=tokens)
        with Stage(fs, SimTP(4), mode="off") as st:
            outs[label] = run_helper(st, load_helper(fs, source=text), partials, residual, new_norm(weight))
        outs[label + "-log"] = (sorted(map(repr, st.upstream_op_calls)), st.ca.calls if st.ca else [],
                                st.fallback_all_reduces)
    for (a, b), (c, d) in zip(outs["pristine"], outs["off"]):
        assert torch.equal(a, c) and torch.equal(b, d)
    assert outs["pristine-log"] == outs["off-log"]


@all_rows
def test_aiter_call_arguments_and_registered_follows_capture(fs):
    world = 4
    partials, residual, weight = make_inputs(world, tokens=512, seed=3)
    ref = reference(partials, residual, weight)
    with Stage(fs, SimTP(world), mode="fused") as st:
        helper = load_helper(fs)
        helper.initialize_m3_aiter_allreduce()
        norm = new_norm(weight)
        assert_matches(run_helper(st, helper, partials, residual, norm), ref)  # eager: fills the gamma cache
        st.capturing = True
        assert_matches(run_helper(st, helper, partials, residual, norm), ref)  # a "graph capture"
        calls = st.ca.calls
    assert len(calls) == 2 * world
    expected_w = (norm.weight.float() + 1.0).to(torch.bfloat16)
    for i, call in enumerate(calls):
        assert torch.equal(call["w"], expected_w) and not torch.equal(call["w"], norm.weight.detach())
        assert call["use_1stage"] is False and call["eps"] == EPS and call["shape"] == (512, H)
        assert call["registered"] is (i >= world)


@rows(lambda r: r.capture_registration_optional)
def test_registered_is_off_when_the_communicator_does_not_register(fs):
    """vLLM 0.32+ builds AITER's CustomAllreduce with enable_register_for_capturing=False under
    the cuMem graph pool; AITER then copies in, so `registered` must be False in a capture."""
    partials, residual, weight = make_inputs(2, seed=4)
    with Stage(fs, SimTP(2), mode="fused") as st:
        helper = load_helper(fs)
        helper.initialize_m3_aiter_allreduce()
        norm = new_norm(weight)
        run_helper(st, helper, partials, residual, norm)
        st.make_ca().enable_register_for_capturing = False
        st.capturing = True
        run_helper(st, helper, partials, residual, norm)
        st.make_ca().enable_register_for_capturing = True
        run_helper(st, helper, partials, residual, norm)
    assert [c["registered"] for c in st.ca.calls] == [False] * 2 + [False] * 2 + [True] * 2


@all_rows
def test_gamma_is_never_first_computed_inside_a_capture(fs):
    world = 2
    partials, residual, weight = make_inputs(world, seed=5)
    with Stage(fs, SimTP(world), mode="fused", capturing=True) as st:
        helper = load_helper(fs)
        helper.initialize_m3_aiter_allreduce()
        norm = new_norm(weight)
        outs = run_helper(st, helper, partials, residual, norm)
        assert not st.ca.calls  # unfused path for this call...
        assert not norm.__dict__.get("_m3fuse_gamma")  # ...and nothing cached from a capture
    assert_matches(outs, reference(partials, residual, weight))


class FakeAiterCAWithGemmaFlag(FakeAiterCA):
    """A newer AITER whose kernel can apply Gemma's 1 + w itself (gemma_norm=True)."""

    def fused_ar_rms(self, inp, res_inp, *, w, eps, registered=False, use_1stage=False,
                     post_per_token_quant=False, gemma_norm=False, **_):
        return super().fused_ar_rms(inp, res_inp, w=(w.float() + 1.0).to(w.dtype) if gemma_norm else w,
                                    eps=eps, registered=registered, use_1stage=use_1stage,
                                    post_per_token_quant=post_per_token_quant)


def _flag_ca(tp):
    return FakeAiterCAWithGemmaFlag(tp, sum_dtype=torch.float32)


@all_rows
def test_gemma_scale_is_applied_exactly_once(fs):
    """w = 1 + weight is the scale; passing gemma_norm=True as well would apply it twice: the
    float64 comparison catches that on a flag-aware AITER, the pinned signature refuses it."""
    text = patched_text(fs, HELPER)
    needle = "        use_1stage=use_1stage,\n    )\n    return out, res_out"
    assert text.count(needle) == 1
    doubled = text.replace(needle, needle.replace("use_1stage=use_1stage,\n",
                                                  "use_1stage=use_1stage,\n        gemma_norm=True,\n"))
    partials, residual, weight = make_inputs(2, seed=11)
    ref = reference(partials, residual, weight)
    def run(text, **kw):
        with Stage(fs, SimTP(2), mode="fused", **kw) as st:
            helper = load_helper(fs, source=text)
            helper.initialize_m3_aiter_allreduce()
            return run_helper(st, helper, partials, residual, new_norm(weight))

    assert_matches(run(text, ca_factory=_flag_ca), ref)  # ours, on an AITER with the flag: right
    with pytest.raises(AssertionError):  # the double application, caught by the float64 comparison
        assert_matches(run(doubled, ca_factory=_flag_ca), ref)
    with pytest.raises(TypeError, match="gemma_norm"):  # and refused by the pinned signature
        run(doubled)


GATE_CASES = ["513_tokens", "3d", "fp32", "other_norm", "non_contiguous", "residual_fp32", "fp16_ok", "512_ok"]


@all_rows
@pytest.mark.parametrize("case", GATE_CASES)
def test_gate(fs, case):
    world = 2
    tokens = {"513_tokens": 513, "512_ok": 512}.get(case, 8)
    dtype = {"fp32": torch.float32, "fp16_ok": torch.float16}.get(case, torch.bfloat16)
    partials, residual, weight = make_inputs(world, tokens=tokens, dtype=dtype, seed=11)
    ref = reference(partials, residual, weight)
    if case == "3d":
        partials = [p.view(2, tokens // 2, H) for p in partials]
        residual = residual.view(2, tokens // 2, H)
    if case == "non_contiguous":
        partials = [p.t().contiguous().t() for p in partials]
        assert not partials[0].is_contiguous()
    if case == "residual_fp32":
        residual = residual.float()
    cls = OtherGemmaNorm if case == "other_norm" else M3Norm
    with Stage(fs, SimTP(world), mode="fused") as st:
        helper = load_helper(fs)
        helper.initialize_m3_aiter_allreduce()
        norm = new_norm(weight, cls=cls, dtype=dtype)
        outs = run_helper(st, helper, partials, residual, norm)
    n_calls = len(st.ca.calls)
    if case.endswith("_ok"):
        assert n_calls == world and st.fallback_all_reduces == 0
    elif case == "other_norm":
        # Not M3's norm: the unpatched code (from 0.30 vLLM's own one-stage AITER branch here).
        assert n_calls == 0
        assert len(st.upstream_op_calls) == (world if fs.upstream_aiter_branch else 0)
        assert st.fallback_all_reduces == (0 if fs.upstream_aiter_branch else 1)
    else:
        assert n_calls == 0 and st.fallback_all_reduces == 1 and not st.upstream_op_calls
    if case != "residual_fp32":
        for out, res in outs:
            torch.testing.assert_close(out.reshape(tokens, H).double(), ref[0], **BF16_TOL)
            torch.testing.assert_close(res.reshape(tokens, H).double(), ref[1], **BF16_TOL)


@all_rows
def test_m3_hidden_6144_at_512_tokens_goes_fused(fs):
    world = 2  # TP 8 at this size costs ~8 s per row on 2 cores; the gate has no TP term
    partials, residual, weight = make_inputs(world, tokens=512, hidden=6144, seed=6)
    with Stage(fs, SimTP(world), mode="fused") as st:
        helper = load_helper(fs)
        helper.initialize_m3_aiter_allreduce()
        outs = run_helper(st, helper, partials, residual, new_norm(weight))
    rows_ = slice(0, 512, 73)  # the norm is per token: a sample of rows keeps the float64 check cheap
    ref = reference([p[rows_] for p in partials], residual[rows_], weight)
    assert_matches([(o[rows_], r[rows_]) for o, r in outs], ref)
    assert [c["use_1stage"] for c in st.ca.calls] == [False] * world
    assert all(c["shape"] == (512, 6144) for c in st.ca.calls)


@all_rows
def test_tp1_is_the_norm_alone(fs):
    partials, residual, weight = make_inputs(1, seed=2)
    with Stage(fs, SimTP(1), mode="fused", aiter_enabled=False) as st:
        helper = load_helper(fs)
        helper.initialize_m3_aiter_allreduce()
        norm = new_norm(weight)
        assert_matches(run_helper(st, helper, partials, residual, norm), reference(partials, residual, weight))
    assert st.ca is None and st.fallback_all_reduces == 0 and norm.calls == 1
    assert st.rocm_aiter_ops.init_calls == []


@all_rows
def test_gamma_cache_follows_dtype_and_device(fs):
    with Stage(fs, SimTP(2), mode="fused"):
        helper = load_helper(fs)
        weight = 0.1 * torch.randn(H, generator=torch.Generator().manual_seed(2))
        norm = new_norm(weight, dtype=torch.float32)
        bf = torch.zeros(4, H, dtype=torch.bfloat16)
        g1 = helper._m3_gamma(norm, bf)
        assert g1.dtype == torch.bfloat16 and torch.equal(g1, (weight + 1).to(torch.bfloat16))
        assert helper._m3_gamma(norm, bf) is g1  # cached, not recomputed
        g2 = helper._m3_gamma(norm, bf.half())
        assert g2.dtype == torch.float16 and torch.equal(g2, (weight + 1).half())
        meta = torch.empty(4, H, dtype=torch.bfloat16, device="meta")
        g3 = helper._m3_gamma(norm, meta)
        assert g3.device.type == "meta" and g3.dtype == torch.bfloat16
        assert set(norm.__dict__["_m3fuse_gamma"]) == {
            (torch.device("cpu"), torch.bfloat16), (torch.device("cpu"), torch.float16),
            (torch.device("meta"), torch.bfloat16)}
        assert "_m3fuse_gamma" not in dict(norm.named_parameters()) and not list(norm.buffers())


@all_rows
def test_gamma_cache_through_the_helper_per_dtype(fs):
    world = 2
    with Stage(fs, SimTP(world), mode="fused") as st:
        helper = load_helper(fs)
        helper.initialize_m3_aiter_allreduce()
        weight = 0.2 * torch.randn(H, generator=torch.Generator().manual_seed(4))
        norm = new_norm(weight, dtype=torch.float32)  # parameter dtype differs from activations
        for dtype in (torch.bfloat16, torch.float16):
            partials, residual, _ = make_inputs(world, dtype=dtype, seed=8)
            run_helper(st, helper, partials, residual, norm)
        ws = [c["w"] for c in st.ca.calls]
    assert [w.dtype for w in ws] == [torch.bfloat16] * world + [torch.float16] * world
    assert torch.equal(ws[-1], (weight + 1).half())


# ============================================================== modes and initialisation
@all_rows
@pytest.mark.parametrize("value", ["fuse", "on", "1", "", "fused,control"])
def test_bad_mode_raises(fs, value):
    with Stage(fs, SimTP(2), mode=value):
        helper = load_helper(fs)
        with pytest.raises(ValueError, match=ENV):
            helper.m3_aiter_ar_rms_mode()
        with pytest.raises(ValueError, match="fused, fused-1stage, control, off"):
            helper.initialize_m3_aiter_allreduce()


@all_rows
def test_mode_values(fs):
    for value, expected in ((None, "fused"), ("fused", "fused"), ("CONTROL", "control"), (" off ", "off"),
                            (" Fused-1Stage ", "fused-1stage")):
        with Stage(fs, SimTP(2), mode=value):
            assert load_helper(fs).m3_aiter_ar_rms_mode() == expected


@all_rows
@pytest.mark.parametrize("mode", ["control", "off"])
def test_initialize_is_a_noop_unless_fused(fs, mode):
    with Stage(fs, SimTP(2), mode=mode, aiter_enabled=False, aiter_importable=False) as st:
        load_helper(fs).initialize_m3_aiter_allreduce()
        assert st.rocm_aiter_ops.init_calls == [] and st.ca is None


@all_rows
def test_initialize_idempotent_and_creates_before_capture(fs):
    with Stage(fs, SimTP(2), mode="fused") as st:
        helper = load_helper(fs)
        helper.initialize_m3_aiter_allreduce()
        first = st.rocm_aiter_ops.get_aiter_allreduce()
        helper.initialize_m3_aiter_allreduce()
        helper.initialize_m3_aiter_allreduce()
        assert first is not None and st.rocm_aiter_ops.get_aiter_allreduce() is first
        if fs.aiter_api == "raw":  # created exactly once, on the TP group's CPU group and device
            assert st.rocm_aiter_ops.init_calls == [("tp-cpu-group", torch.device("cpu"))]
        else:
            assert st.rocm_aiter_ops.init_calls == []


@rows(lambda r: r.aiter_api == "raw")
def test_initialize_reuses_an_existing_raw_communicator(fs):
    with Stage(fs, SimTP(2), mode="fused") as st:
        st.raw_ca = st.make_ca()
        load_helper(fs).initialize_m3_aiter_allreduce()
        assert st.rocm_aiter_ops.init_calls == [] and st.rocm_aiter_ops.get_aiter_allreduce() is st.raw_ca


def _init_errors(fs):
    cases = [
        ("aiter off", dict(aiter_enabled=False), "VLLM_ROCM_USE_AITER"),
        ("old aiter", dict(ca_factory=lambda tp: FakeAiterCA(tp, with_pool=False)), "0.1.12"),
        ("no use_1stage", dict(ca_factory=FakeAiterCANoStage), "use_1stage"),
        ("disabled", dict(ca_factory=lambda tp: FakeAiterCA(tp, disabled=True)), "disabled"),
        ("no aiter", dict(aiter_importable=False), "amd-aiter"),
    ]
    if fs.aiter_api == "wrapper":
        cases += [
            ("custom ar env off", dict(aiter_custom_ar_env=False), "VLLM_ROCM_USE_AITER_CUSTOM_AR"),
            ("custom ar disabled", dict(custom_all_reduce=False), "--disable-custom-all-reduce"),
            ("no comm", dict(aiter_comm=False), "aiter_ar_comm"),
        ]
    if fs.upstream_aiter_branch:
        cases += [("not rocm", dict(rocm=False), "not a ROCm platform"),
                  ("batch invariant", dict(aiter_comm=False), "VLLM_BATCH_INVARIANT")]
    return cases


def _init_error_params():
    return [pytest.param(fs, kwargs, needle, id=f"{fs.name}-{label}")
            for fs in ROWS for label, kwargs, needle in _init_errors(fs)]


@pytest.mark.parametrize("fs,kwargs,needle", _init_error_params())
def test_initialize_raises_naming_the_missing_setting(fs, kwargs, needle):
    with Stage(fs, SimTP(2), mode="fused", **kwargs) as st:
        helper = load_helper(fs)
        with pytest.raises(RuntimeError) as info:
            helper.initialize_m3_aiter_allreduce()
        assert needle in str(info.value) and ENV in str(info.value), str(info.value)
        for m in ("control", "off"):  # no-op outside fused
            st.set_mode(m)
            helper.initialize_m3_aiter_allreduce()


@all_rows
def test_fused_call_without_communicator_raises_not_falls_back(fs):
    partials, residual, weight = make_inputs(2, seed=1)
    with Stage(fs, SimTP(2), mode="fused", aiter_enabled=False) as st:
        with pytest.raises(RuntimeError, match=f"{ENV}=fused"):
            run_helper(st, load_helper(fs), partials, residual, new_norm(weight))


# ============================================================== the deferral decision
DEFER_CASES = [("fused", 2, 1, 1, True), ("control", 8, 1, 1, True), (None, 4, 1, 1, True),
               ("off", 8, 1, 1, False), ("fused", 1, 1, 1, False), ("control", 2, 2, 1, False),
               ("fused", 2, 1, 2, False)]


@all_rows
@pytest.mark.parametrize("mode,world,pp,dp,expected", DEFER_CASES)
def test_deferral_predicate(fs, mode, world, pp, dp, expected):
    with Stage(fs, SimTP(world), mode=mode, pp=pp, dp=dp) as st:
        helper = load_helper(fs)
        assert helper.m3_defer_ffn_all_reduce(st.vllm_config()) is expected
        assert helper.m3_defer_ffn_all_reduce() is expected  # from get_current_vllm_config()


def _sp_params():
    out = []
    for fs in ROWS:
        out.append(pytest.param(fs, "sp_moe", id=f"{fs.name}-sp_moe"))
        if fs.pass_config_enable_sp:
            out.append(pytest.param(fs, "enable_sp", id=f"{fs.name}-enable_sp"))
    return out


@pytest.mark.parametrize("fs,sp", _sp_params())
def test_deferral_refuses_sequence_parallelism(fs, sp):
    with Stage(fs, SimTP(2), mode="control", **{sp: True}) as st:
        with pytest.raises(ValueError, match="sequence parallelism"):
            load_helper(fs).m3_defer_ffn_all_reduce(st.vllm_config())
    with Stage(fs, SimTP(2), mode="off", **{sp: True}) as st:
        assert load_helper(fs).m3_defer_ffn_all_reduce(st.vllm_config()) is False


@rows(lambda r: not r.pass_config_enable_sp)
def test_deferral_without_pass_config_enable_sp(fs):
    """0.32.0 removed PassConfig.enable_sp: the decision must not need the attribute."""
    with Stage(fs, SimTP(2), mode="control") as st:
        assert not hasattr(st.vllm_config().compilation_config.pass_config, "enable_sp")
        assert load_helper(fs).m3_defer_ffn_all_reduce(st.vllm_config()) is True


# ============================================================== model: ast checks
@all_rows
def test_decoder_layer_defers_only_when_asked(fs):
    new = trees(fs)["patched"]
    init = method_node(new, "MiniMaxM3DecoderLayer", "__init__")
    names = [a.arg for a in init.args.args + init.args.kwonlyargs]
    assert names[-1] == DEFER and default_of(init, DEFER) == "False"  # MTP and any other caller: reduce
    assert tuple(names[8:-1]) == fs.layer_extra_args  # the release's own arguments all kept
    (moe,) = calls_named(init, "MiniMaxM3MoE")
    (mlp,) = calls_named(init, "MiniMaxM3MLP")
    assert kw(moe, "reduce_results") == f"not {DEFER}" and kw(mlp, "reduce_results") == f"not {DEFER}"
    assert any(src(n) == f"self.{DEFER} = {DEFER}" for n in init.body)
    fwd = method_node(new, "MiniMaxM3DecoderLayer", "forward")
    assert default_of(fwd, "fuse_input_allreduce") == "False"
    # The first statement that reads the layer's input is the branch on fuse_input_allreduce,
    # which all-reduces it into the input norm (whatever the release names the normed result;
    # the forward tests check what it computes).
    first = next(s for s in fwd.body if any(isinstance(x, ast.Name) and x.id == "hidden_states"
                                            and isinstance(x.ctx, ast.Load) for x in ast.walk(s)))
    assert isinstance(first, ast.If) and "fuse_input_allreduce" in {
        x.id for x in ast.walk(first.test) if isinstance(x, ast.Name)}
    assert [[src(a) for a in c.args] for b in first.body for c in calls_named(b, "fused_allreduce_gemma_rms_norm")] == [
        ["hidden_states", "residual", "self.input_layernorm"]]


@all_rows
def test_moe_skips_final_all_reduce_with_what_the_release_offers(fs):
    t = trees(fs)
    new = t["patched"]
    accepted = {a.arg for a in next(n for n in tree_of(release_bytes(fs.version, MOE_LAYER).decode()).body
                                    if isinstance(n, ast.FunctionDef) and n.name == fs.moe_factory).args.args}
    init = method_node(new, "MiniMaxM3MoE", "__init__")
    assert default_of(init, "reduce_results") == "True"
    (factory,) = calls_named(init, fs.moe_factory)
    used = {k.arg for k in factory.keywords}
    assert used <= accepted, used - accepted  # every keyword exists in this release's factory
    # The shared expert is summed by the runner before its final reduce: it never reduces itself.
    (shared,) = calls_named(init, "MiniMaxM3MLP")
    assert kw(shared, "reduce_results") == "False"
    assert kw(factory, "shared_experts") == "self.shared_experts"
    text = src(init)
    assert "self.defers_all_reduce = not reduce_results" in text
    if fs.moe_defer_knob == "reduce_results":
        assert kw(factory, "reduce_results") == "reduce_results" and kw(factory, "runner_cls") is None
        assert "if self.defers_all_reduce and (not self.experts.moe_config.skip_final_all_reduce):" in text
    else:  # 0.24.0: no reduce_results; a runner subclass skips the final reduce
        assert kw(factory, "runner_cls") == "None if reduce_results else _M3DeferredReduceMoERunner"
        runner = class_node(new, "_M3DeferredReduceMoERunner")
        assert [src(b) for b in runner.bases] == ["MoERunner"]
        (override,) = [n for n in runner.body if isinstance(n, ast.FunctionDef)]
        base_fn = method_node(tree_of(release_bytes(fs.version, MOE_RUNNER).decode()), "MoERunner",
                              "_maybe_reduce_final_output")
        assert override.name == base_fn.name
        assert [a.arg for a in override.args.args] == [a.arg for a in base_fn.args.args]
        assert not calls_named(override, "tensor_model_parallel_all_reduce")
        assert "_fused_output_is_reduced" in src(override)
        assert "moe_config.is_sequence_parallel" in text
    fwd = src(method_node(new, "MiniMaxM3MoE", "forward"))
    assert "if self.defers_all_reduce and self.experts._fused_output_is_reduced:" in fwd


@all_rows
def test_model_init_reads_mode_initializes_and_wires_deferral(fs):
    init = method_node(trees(fs)["patched"], "MiniMaxM3Model", "__init__")
    body = [src(s) for s in init.body]
    i_mode = body.index("self.m3_ar_rms_mode = m3_aiter_ar_rms_mode()")
    # The one assignment of the deferral decision calls the helper's predicate on this config,
    # alone or and-ed with the release's own conditions (specialized decode, ...; what they
    # do is checked by running the model).
    (i_defer,) = [i for i, s in enumerate(init.body) if isinstance(s, ast.Assign)
                  and [src(x) for x in s.targets] == ["self.defer_ffn_all_reduce"]]
    decide = init.body[i_defer].value
    (pred,) = calls_named(decide, "m3_defer_ffn_all_reduce")
    assert [src(a) for a in pred.args] == ["vllm_config"]
    assert decide is pred or (isinstance(decide, ast.BoolOp) and isinstance(decide.op, ast.And)
                              and pred in decide.values)
    i_init = body.index("initialize_m3_aiter_allreduce()")
    i_layers = next(i for i, s in enumerate(body) if "make_layers(" in s)
    assert i_mode < i_defer < i_init < i_layers
    if fs.specialized_decode:
        assert next(i for i, s in enumerate(body) if s.startswith("self.specialized_decode_config = ")) < i_defer
    (layer_call,) = calls_named(init.body[i_layers], "MiniMaxM3DecoderLayer")
    assert kw(layer_call, DEFER) == "self.defer_ffn_all_reduce"
    for extra in fs.layer_extra_args:  # the release's own constructor arguments still passed
        assert kw(layer_call, extra) == f"self.{extra}"


@all_rows
def test_mtp_keeps_reducing(fs):
    """amd/mtp.py (unpatched, pinned) builds the decoder layer without defer_ffn_all_reduce
    (default False -> reduce_results=True), calls it with residual=None and no
    fuse_input_allreduce, then adds the residual to its output itself."""
    assert MTP not in [f["path"] for f in manifest(fs)["files"]]
    mtp = trees(fs)["mtp"]
    (build,) = calls_named(mtp, "MiniMaxM3DecoderLayer")
    assert kw(build, DEFER) is None and not any(k.arg is None for k in build.keywords)
    fwd = method_node(mtp, "MiniMaxM3MultiTokenPredictorLayer", "forward")
    (use,) = calls_named(fwd, "transformer_layer")
    assert kw(use, "residual") == "None" and kw(use, "fuse_input_allreduce") is None
    assert "hidden_states += residual" in src(fwd)


def _deferred_branch(fs, fn: ast.FunctionDef) -> ast.If:
    test = "decode is None and self.defer_ffn_all_reduce" if fs.specialized_decode else "self.defer_ffn_all_reduce"
    (branch,) = [s for s in fn.body if isinstance(s, ast.If) and src(s.test) == test]
    return branch


@all_rows
def test_model_forward_structure(fs):
    """Every reader of a layer's output that the release and the patched model have (derived,
    m3fuse/patching/readers.py: the next layer, EAGLE3 captures, PP hand-off, final norm, mono,
    anything new) is declared in the set's readers.toml and handled as declared, and the set's
    deferred loop has every statement of upstream's loop (tests/test_readers.py). Nothing here
    pins a release's text: a new reader fails by name, a local rename passes."""
    from test_readers import drift, reader_problems

    assert reader_problems(fs) == []
    assert drift(fs) == []


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
                isinstance(t, ast.BoolOp) and isinstance(t.op, ast.And)), src(t)
            return node.orelse
        return node

    def visit_Assign(self, node):
        return None if [src(t) for t in node.targets] == ["partial"] else node


def _body(fn: ast.FunctionDef) -> str:
    return ast.dump(ast.parse("\n".join(src(s) for s in fn.body)))


@all_rows
@pytest.mark.parametrize("cls", ["MiniMaxM3DecoderLayer", "MiniMaxM3Model"])
def test_off_is_the_pristine_forward(fs, cls):
    """With deferral off every flag is False; the patched forward then is the pristine one."""
    t = trees(fs)
    pristine = method_node(t["pristine"], cls, "forward")
    off = _Off().visit(copy.deepcopy(method_node(t["patched"], cls, "forward")))
    assert _body(off) == _body(pristine)
    extra = {a.arg for a in off.args.args} - {a.arg for a in pristine.args.args}
    assert extra == ({"fuse_input_allreduce"} if cls == "MiniMaxM3DecoderLayer" else set())


@all_rows
def test_off_keeps_every_original_call(fs):
    """Constructors and the MoE forward: every call of the pristine code is still made (the FFN
    constructors gained only reduce_results=not defer_ffn_all_reduce, default True)."""
    t = trees(fs)
    added = {("reduce_results", f"not {DEFER}"), (DEFER, f"self.{DEFER}"),
             ("reduce_results", "reduce_results"),  # the MoE factory's knob (0.25+)
             ("runner_cls", "None if reduce_results else _M3DeferredReduceMoERunner")}  # (0.24)

    class _DropAdded(ast.NodeTransformer):
        def visit_Call(self, node):
            self.generic_visit(node)
            node.keywords = [k for k in node.keywords if (k.arg, src(k.value)) not in added]
            return node

    for c, m in (("MiniMaxM3DecoderLayer", "__init__"), ("MiniMaxM3Model", "__init__"),
                 ("MiniMaxM3MoE", "__init__"), ("MiniMaxM3MoE", "forward")):
        old = Counter(dump(x) for x in ast.walk(method_node(t["pristine"], c, m)) if isinstance(x, ast.Call))
        fn = _DropAdded().visit(copy.deepcopy(method_node(t["patched"], c, m)))
        new = Counter(dump(x) for x in ast.walk(fn) if isinstance(x, ast.Call))
        missing = old - new
        assert not missing, (c, m, list(missing))
    for cls in ("MiniMaxM3MLP", "MiniMaxM3MoE"):
        assert default_of(method_node(t["patched"], cls, "__init__"), "reduce_results") == "True"


@rows(lambda r: r.specialized_decode)
def test_specialized_decode_refuses_deferral(fs):
    """The mono path (specialized_decode/runtime/executor.py) runs a layer's input norm natively
    on the incoming hidden states and returns the reduced MoE output: it can neither take nor
    hand on a partial sum, so deferral is off whenever specialized decode is configured."""
    base = "vllm/models/minimax_m3/amd/"
    executor = release_bytes(fs.version, base + "specialized_decode/runtime/executor.py").decode()
    assert "hidden_states, residual = layer.input_layernorm(hidden_states, residual)" in executor
    assert "return runner(part, residual, weights, self._slots, final)" in executor
    model_state = release_bytes(fs.version, base + "model_state.py").decode()
    assert "if self.backbone.specialized_decode_config is not None:" in model_state
    assert "self.backbone.build_specialized_decode()" in model_state
    t = trees(fs)
    build = src(method_node(t["patched"], "MiniMaxM3Model", "build_specialized_decode"))
    assert re.search(r"if self\.defer_ffn_all_reduce:\n\s+raise RuntimeError\(", build)
    fwd_p = method_node(t["patched"], "MiniMaxM3Model", "forward")
    (top_0,) = [s for s in method_node(t["pristine"], "MiniMaxM3Model", "forward").body
                if isinstance(s, ast.If) and src(s.test) == "decode is None"]
    (elif_,) = _deferred_branch(fs, fwd_p).orelse
    assert src(elif_.test) == "decode is None"
    assert src(elif_.body) == src(top_0.body) and src(elif_.orelse) == src(top_0.orelse)
    # and the real constructor: configured specialized decode -> no deferral in any mode
    built = []
    decode_mod = types.ModuleType(base.replace("/", ".") + "specialized_decode.runtime.decode")
    decode_mod.SpecializedDecode = types.SimpleNamespace(build=lambda model, cfg: built.append(cfg) or "decode")
    for mode in ("control", "fused"):
        cfg = object()
        with Stage(fs, SimTP(2), mode=mode, specialized_decode_config=cfg,
                   extra_modules={decode_mod.__name__: decode_mod}) as st:
            w = load_model(fs, st)
            models = st.tp.run(lambda r: build_model(w, ToyConfig()))
            for m in models:
                assert m.defer_ffn_all_reduce is False
                assert not any(layer.defer_ffn_all_reduce for layer in m.layers)
                m.build_specialized_decode()
                assert m.specialized_decode == "decode"
                m.defer_ffn_all_reduce = True
                with pytest.raises(RuntimeError, match="specialized decode"):
                    m.build_specialized_decode()
        assert built == [cfg, cfg]
        built.clear()


# ============================================================== running the patched model
FWD_TOKENS = 8


def _embeds(h: int, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.randn(FWD_TOKENS, h, generator=torch.Generator().manual_seed(42)).to(dtype)


def _run(fs, world, mode, aux, source=None, dtype=torch.bfloat16, **stage_kw):
    config = ToyConfig()
    with Stage(fs, SimTP(world), mode=mode, **{**arm_world(fs, mode), **stage_kw}) as st:
        w = load_model(fs, st, model_source=source)

        def rank(r):
            model = build_model(w, config, dtype=dtype)
            if aux:
                model._set_aux_hidden_state_layers(aux)
            out = run_forward(w, model, _embeds(config.hidden_size, dtype), fs)
            hidden, caps = out if isinstance(out, tuple) else (out, [])
            return hidden, caps, getattr(model, "defer_ffn_all_reduce", None)

        results = st.tp.run(rank)
    return results, st


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


MODEL_TOL = 0.03  # bf16 noise over a few layers; a partial sum in place of a reduced tensor is O(1)


@all_rows
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("aux", [(), (1, 2, 4), (0, 3)], ids=["no-eagle3", "aux-1-2-4", "aux-0-3"])
def test_patched_forward_matches_pristine_and_float64(fs, world, aux):
    """The patched MiniMaxM3Model.forward against the pristine one (off and control bit for
    bit, fused within bf16) and against a float64 run of the pristine model."""
    n_layers = ToyConfig().num_hidden_layers
    base, _ = _run(fs, world, "off", aux, source=pristine_text(fs, MODEL))
    ref, _ = _run(fs, world, "off", aux, source=pristine_text(fs, MODEL), dtype=torch.float64)
    for mode in ("off", "control", "fused"):
        got, st = _run(fs, world, mode, aux)
        for r in range(world):
            hidden, caps, deferred = got[r]
            assert deferred is (mode != "off")
            assert rel_err(hidden, base[r][0]) < MODEL_TOL and rel_err(hidden, ref[r][0]) < MODEL_TOL, (mode, r)
            assert len(caps) == len(aux) == len(base[r][1])
            for c, b, f in zip(caps, base[r][1], ref[r][1]):
                assert rel_err(c, b) < MODEL_TOL and rel_err(c, f) < MODEL_TOL, (mode, r)
            if mode in ("off", "control"):  # the unfused arithmetic, bit for bit
                assert torch.equal(hidden, base[r][0])
                assert all(torch.equal(c, b) for c, b in zip(caps, base[r][1]))
        for i in range(len(aux)):  # captures are complete (identical on every rank)
            assert all(torch.equal(got[r][1][i], got[0][1][i]) for r in range(world))
        fused_calls = len(st.ca.calls) if st.ca is not None else 0
        if mode == "fused":
            # post-attention norms + input norms of layers after the first whose input is
            # still partial + the final norm if the last output is still partial
            expected = n_layers + sum(1 for i in range(1, n_layers) if i not in aux) + (n_layers not in aux)
            assert fused_calls == expected * world
        else:
            assert fused_calls == 0
        if mode == "control":  # each FFN and attention output reduced exactly once
            assert st.fallback_all_reduces == 2 * n_layers


def _run_recorded(fs, world, mode, source=None, **stage_kw):
    """`_run` (no EAGLE3 captures) with M3FUSE_RUN_RECORD set: also returns rank 0's record."""
    import json
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "run.json")
        old = os.environ.get("M3FUSE_RUN_RECORD")
        os.environ["M3FUSE_RUN_RECORD"] = path
        try:
            got, st = _run(fs, world, mode, (), source=source, **stage_kw)
        finally:
            if old is None:
                os.environ.pop("M3FUSE_RUN_RECORD", None)
            else:
                os.environ["M3FUSE_RUN_RECORD"] = old
        with open(path) as f:
            return got, st, json.load(f)


@rows(lambda r: r.mono_decode)
def test_mono_decode_turns_deferral_off(fs):
    """VLLM_ROCM_MINIMAX_M3_MONO=1: the mono runner runs the dense prefix through these layers
    and hands the last one's output to kernels that take it as reduced (amd/mono/runner.py),
    so no layer may leave its FFN output partial, and the run record says why."""
    import logging

    base, _ = _run(fs, 2, "off", (), source=pristine_text(fs, MODEL), mono=True)
    for mode in ("control", "fused"):
        lines: list[str] = []
        handler = logging.Handler(logging.INFO)
        handler.emit = lambda rec: lines.append(rec.getMessage())
        root = logging.getLogger()
        old_level = root.level
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        try:
            got, st, record = _run_recorded(fs, 2, mode, mono=True)
        finally:
            root.removeHandler(handler)
            root.setLevel(old_level)
        provenance = [ln for ln in lines if ln.startswith(f"m3fuse set {fs.name}: ")]
        why = "mono decode requested (refused: TP 2 != 4)"  # MonoDecode's own reason, after it decided
        assert len(provenance) == 2 and all(f"; deferral off ({why}); " in ln for ln in provenance), lines
        assert all("; mono decode refused: TP 2 != 4; " in ln for ln in provenance), lines
        for r in range(2):
            hidden, _, deferred = got[r]
            assert deferred is False, mode
            assert rel_err(hidden, base[r][0]) < MODEL_TOL
        assert record["deferral"] is False and record["deferral_reason"] == why, record
        assert record["mono_decode"] == "refused: TP 2 != 4", record
        if mode == "control":  # every FFN reduces itself: one all-reduce per FFN and attention
            assert st.fallback_all_reduces == 2 * ToyConfig().num_hidden_layers
    _, _, record = _run_recorded(fs, 2, "control")
    assert record["deferral"] is True  # without mono decode the same world defers


@rows(lambda r: r.mxfp8_norms)
@pytest.mark.parametrize("mode", ["control", "fused"])
def test_mxfp8_norms_never_take_a_partial(fs, mode):
    """gfx950 + MXFP8 checkpoint (every layer takes 0.34's MXFP8 norm branches): with deferral
    on, a deferred input is reduced by the fused helper before the MXFP8 input-norm branch
    (which has no all-reduce) could read it; in `fused` mode the post-attention boundaries go
    through the fused kernel, in `control` through the plain all-reduce + MXFP8 norm; the run
    record says which, and the output equals the pristine model's."""
    n = ToyConfig().num_hidden_layers
    base, _ = _run(fs, 2, "off", (), source=pristine_text(fs, MODEL), mxfp8=True)
    got, st, record = _run_recorded(fs, 2, mode, mxfp8=True)
    for r in range(2):
        hidden, _, deferred = got[r]
        assert deferred is True
        assert rel_err(hidden, base[r][0]) < MODEL_TOL, (mode, r)
    assert st.mxfp8_calls.count("input") == 0  # every input after the first was partial
    assert record["mxfp8_post_norm_layers"] == n
    if mode == "fused":
        assert st.mxfp8_calls.count("post") == 0
        assert len(st.ca.calls) == (n + (n - 1) + 1) * 2  # post, input (layers 1..), final norm
        assert record["boundaries"]["mxfp8_post_norm"] == {
            "1-512": "aiter-2stage", "513+": "all-reduce+mxfp8-norm"} and record["aiter_fused_ready"] is True
    else:  # plain all-reduce + (MXFP8) norm: no fused kernel call
        assert st.ca is None or not st.ca.calls
        assert st.mxfp8_calls.count("post") == n
        assert record["boundaries"]["mxfp8_post_norm"] == {"1+": "all-reduce+mxfp8-norm"}


@rows(lambda r: r.aiter_all_gather)
def test_4082_exposure_follows_the_tp_groups_all_gather_route(fs):
    """#4082 is warned as exposed only where vLLM routes TP all-gathers to AITER: the TP
    communicator's `use_aiter_tp_all_gather` (CDNA3/4, TP 2/4/8), in every mode; unknown counts
    as exposed; no AITER custom all-reduce wrapper, not exposed."""
    import sys

    for mode in ("control", "fused"):
        for routed, exposed in ((True, True), (None, True), (False, False)):
            with Stage(fs, SimTP(2), mode=mode):
                helper = load_helper(fs)
                group = sys.modules["vllm.distributed.parallel_state"].get_tp_group()
                group.device_communicator = (None if routed is None
                                             else types.SimpleNamespace(use_aiter_tp_all_gather=routed))
                text = helper._m3_defect_exposure("ROCm/aiter#4082")
            assert text.startswith("exposed:" if exposed else "not exposed"), (mode, routed, text)
    with Stage(fs, SimTP(2), mode="control", aiter_comm=False):
        assert load_helper(fs)._m3_defect_exposure("ROCm/aiter#4082").startswith("not exposed")


@all_rows
def test_patched_forward_with_the_release_ffn(fs):
    """The same comparison with the release's own MiniMaxM3MoE / MiniMaxM3MLP (shared expert,
    runner reductions) in every layer: off and control bit for bit the pristine model."""
    config = ToyConfig()
    emb = _embeds(config.hidden_size)

    def run(mode, source=None):
        with Stage(fs, SimTP(2), mode=mode, **arm_world(fs, mode)) as st:
            w = load_model(fs, st, model_source=source, real_ffn=True)
            outs = st.tp.run(lambda r: run_forward(w, build_model(w, config), emb, fs))
        return outs, st

    base, st0 = run("off", pristine_text(fs, MODEL))
    for mode in ("off", "control", "fused"):
        got, st = run(mode)
        for h, b in zip(got, base):
            if mode == "fused":
                assert rel_err(h, b) < MODEL_TOL
            else:
                assert torch.equal(h, b), mode
        # as many reductions as the pristine model (vLLM's own one-stage op counts too, 0.30+)
        total = st.fallback_all_reduces + len(st.upstream_op_calls) // 2
        assert total == (st0.fallback_all_reduces + len(st0.upstream_op_calls) // 2 if mode != "fused" else 0)


@all_rows
def test_forward_run_catches_a_leaked_partial_capture(fs):
    """Sensitivity: a forward that captures without the all-reduce (issue 8's bug) fails."""
    text = patched_text(fs, MODEL)
    bad = text.replace("                    hidden_states = tensor_model_parallel_all_reduce(hidden_states)\n"
                       "                    partial = False\n", "                    pass\n")
    assert bad != text
    aux = (1, 2)
    base, _ = _run(fs, 2, "off", aux, source=pristine_text(fs, MODEL))
    got, _ = _run(fs, 2, "control", aux, source=bad)
    assert rel_err(got[0][0], base[0][0]) < MODEL_TOL  # the final output is still right...
    assert not all(rel_err(c, b) < MODEL_TOL for c, b in zip(got[0][1], base[0][1]))  # ...captures not
    assert not torch.equal(got[0][1][0], got[1][1][0])


@all_rows
def test_bad_mode_raises_at_model_construction(fs):
    with Stage(fs, SimTP(2), mode="fusde") as st:
        w = load_model(fs, st)
        with pytest.raises(ValueError, match=ENV):
            build_model(w, ToyConfig())


@all_rows
@pytest.mark.parametrize("stage_kw", [dict(pp=2), dict(dp=2)], ids=["pp2", "dp2"])
def test_no_deferral_at_pp_or_dp_builds_reducing_layers(fs, stage_kw):
    for mode in ("control", "fused"):
        got, _ = _run(fs, 2, mode, (), **stage_kw)
        base, _ = _run(fs, 2, "off", (), source=pristine_text(fs, MODEL), **stage_kw)
        for (h, _, deferred), (b, _, _) in zip(got, base):
            assert deferred is False
            if mode == "control":
                assert torch.equal(h, b)


@all_rows
def test_mtp_style_layer_reduces_its_ffn(fs):
    """A decoder layer built the way mtp.py builds it (no deferral kwarg), called with
    residual=None, returns a complete FFN output in every mode."""
    config = ToyConfig()
    for mode in ("control", "fused"):
        with Stage(fs, SimTP(2), mode=mode) as st:
            w = load_model(fs, st)
            layer_cls = w.classes["MiniMaxM3DecoderLayer"]
            w.helper.initialize_m3_aiter_allreduce()  # done by the target model in vLLM

            def rank(r):
                layer = layer_cls(config=config, prefix="mtp.layers.1", cache_config=None, quant_config=None,
                                  force_sparse_attn=True, force_moe=True).to(torch.bfloat16)
                assert layer.defer_ffn_all_reduce is False
                h, res = layer(positions=torch.arange(FWD_TOKENS), hidden_states=_embeds(config.hidden_size),
                               residual=None)
                return h + res

            outs = st.tp.run(rank)
        assert torch.equal(outs[0], outs[1])


# ============================================================== shared experts: reduced once
def _moe_partial64(moe, x: torch.Tensor) -> torch.Tensor:
    """This rank's un-reduced contribution (shared + scaled routed), float64, from the weights."""
    x = x.double()
    out = torch.zeros_like(x)
    if moe.shared_experts is not None:
        se = moe.shared_experts
        gu = x @ se.gate_up_proj.weight.double()
        g, u = gu.chunk(2, dim=-1)
        g, u = g.clamp(max=se.swiglu_limit), u.clamp(-se.swiglu_limit, se.swiglu_limit)
        out = out + (g * torch.sigmoid(se.swiglu_alpha * g) * (u + se.swiglu_beta)) @ se.down_proj.weight.double()
    ex = moe.experts
    logits = x.float().double() @ moe.gate.weight.double()
    routed = (torch.tanh(x @ ex.up.double()) @ ex.down.double()) * torch.sigmoid(logits[:, :1])
    return out + routed * ex.scale


SHARED_CASES = [("off", 2, {}), ("control", 2, {}), ("fused", 2, {}), (None, 2, {}), ("control", 4, {}),
                ("fused", 2, dict(pp=2)), ("control", 2, dict(dp=2)), ("off", 4, dict(moe_kernel_reduces=True))]


def _shared_params():
    out = []
    for fs in ROWS:
        cases = SHARED_CASES + ([("control", 2, dict(fuse_shared_experts=True)),
                                 ("off", 2, dict(fuse_shared_experts=True))] if fs.shared_expert_fusion else [])
        for mode, world, kw_ in cases:
            label = "-".join([mode or "unset", f"tp{world}"] + [f"{k}={v}" for k, v in kw_.items()])
            out.append(pytest.param(fs, mode, world, kw_, id=f"{fs.name}-{label}"))
    return out


@pytest.mark.parametrize("fs,mode,world,stage_kw", _shared_params())
def test_shared_expert_output_is_reduced_exactly_once(fs, mode, world, stage_kw):
    """The release's own MiniMaxM3MoE (patched) with its shared-expert MLP, built by the patched
    decoder layer inside the patched model: the MoE output holds shared + routed reduced once —
    inside the block when deferral is off, by the next norm when it is on."""
    config = ToyConfig()
    g = torch.Generator().manual_seed(world)
    x = torch.randn(6, config.hidden_size, generator=g)
    residual = torch.randn(6, config.hidden_size, generator=g)
    with Stage(fs, SimTP(world), mode=mode, **arm_world(fs, mode), **stage_kw) as st:
        w = load_model(fs, st, real_ffn=True)
        models = st.tp.run(lambda r: build_model(w, config, dtype=torch.float32))
        layer = [m.layers[1] for m in models]  # a MoE layer (moe_layer_freq)
        assert all(lyr.is_moe_layer for lyr in layer)
        moes = [lyr.block_sparse_moe for lyr in layer]
        assert (moes[0].shared_experts is None) is bool(stage_kw.get("fuse_shared_experts"))
        st.reduce_log.clear()
        outs = st.tp.run(lambda r: moes[r](x.clone()))
        in_block = list(st.reduce_log)
        st.reduce_log.clear()
        normed = st.tp.run(lambda r: w.helper.fused_allreduce_gemma_rms_norm(
            outs[r].clone(), residual.clone(), models[r].layers[2].input_layernorm)) if layer[0].defer_ffn_all_reduce \
            else None
    ref = sum(_moe_partial64(m, x) for m in moes)
    deferred = layer[0].defer_ffn_all_reduce
    assert deferred is (mode != "off" and not stage_kw.get("pp") and not stage_kw.get("dp"))  # None: unset = fused
    shared_reductions = [e for e in in_block if "shared_experts" in e]
    assert shared_reductions == [], "the shared expert reduced its own output"
    if deferred:
        assert in_block == []  # nothing reduced inside the MoE block...
        assert rel_err(sum(o.double() for o in outs), ref) < 1e-5  # ...the ranks hold partials of it
        norm = models[0].layers[2].input_layernorm
        s = ref + residual.double()
        for out, res in normed:  # ...and the next norm reduces them once
            torch.testing.assert_close(res.double(), s, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(out.double(), rms_ref(s, 1.0 + norm.weight.double(), EPS),
                                       atol=1e-4, rtol=1e-4)
    else:
        expected = (["moe-kernel"] + (["moe-final"] if moes[0].shared_experts is not None else [])
                    if stage_kw.get("moe_kernel_reduces") else ["moe-final"])
        assert in_block == expected
        for out in outs:
            assert rel_err(out, ref) < 1e-5


@all_rows
def test_moe_kernel_that_reduces_refuses_deferral(fs):
    config = ToyConfig()
    with Stage(fs, SimTP(2), mode="control", moe_kernel_reduces=True) as st:
        w = load_model(fs, st, real_ffn=True)
        models = st.tp.run(lambda r: build_model(w, config, dtype=torch.float32))
        x = torch.randn(4, config.hidden_size)
        with pytest.raises(RuntimeError, match="reduces its own output"):
            st.tp.run(lambda r: models[r].layers[1].block_sparse_moe(x.clone()))


@all_rows
def test_sequence_parallel_moe_refuses_at_construction(fs):
    """If the MoE would reduce (or scatter) its output itself, deferral is refused: by the
    helper's decision, and by the MoE block should it ever be asked to defer anyway."""
    config = ToyConfig()
    with Stage(fs, SimTP(2), mode="control", sp_moe=True) as st:
        w = load_model(fs, st, real_ffn=True)
        moe_cls = w.classes["MiniMaxM3MoE"]
        with pytest.raises(ValueError, match="M3_AITER_AR_RMS_MODE=off"):
            st.tp.run(lambda r: moe_cls(config=config, layer_id=1, prefix="model.layers.1.block_sparse_moe",
                                        reduce_results=False))


# ============================================================== the NVIDIA model's norm
@all_rows
@pytest.mark.parametrize("mode", ["fused", "control", "off", None], ids=["fused", "control", "off", "unset"])
def test_nvidia_norm_of_the_same_name_takes_the_unpatched_path(fs, mode):
    """vLLM's NVIDIA M3 model has its own MiniMAXGemmaRMSNorm (module
    vllm.models.minimax_m3.nvidia.model) and calls the same helper: it is not M3's ROCm norm and
    must get exactly what the pristine helper gives it, in every mode."""
    nv_cls = nvidia_norm_class(fs)
    assert nv_cls.__name__ == "MiniMAXGemmaRMSNorm" and nv_cls.__module__ == "vllm.models.minimax_m3.nvidia.model"
    world = 2
    results = {}
    for label, text, m in (("pristine", pristine_text(fs, HELPER), "off"), ("patched", patched_text(fs, HELPER), mode)):
        partials, residual, weight = make_inputs(world, tokens=16, seed=21)
        with Stage(fs, SimTP(world), mode=m, extra_modules=flashinfer_norm_modules()) as st:
            helper = load_helper(fs, source=text)
            norm = new_norm(weight, cls=nv_cls)
            outs = run_helper(st, helper, partials, residual, norm)
            recognised = helper.is_m3_gemma_norm(norm) if label == "patched" else None
        results[label] = (outs, st.ca.calls if st.ca else [], sorted(map(repr, st.upstream_op_calls)),
                          st.fallback_all_reduces)
        assert_matches(outs, reference(partials, residual, weight))
    (p_outs, *p_log), (n_outs, *n_log) = results["pristine"], results["patched"]
    assert n_log == p_log and not n_log[0]  # never AITER's fused_ar_rms, same unpatched calls
    for (a, b), (c, d) in zip(p_outs, n_outs):
        assert torch.equal(a, c) and torch.equal(b, d)
    assert recognised is False


# ============================================================== APIs the patches call exist in the release
def _module_names(text: str) -> set[str]:
    """Names a module defines at top level (defs, classes, assignments, imports)."""
    out = set()
    for n in ast.parse(text).body:
        if isinstance(n, (ast.FunctionDef, ast.ClassDef)):
            out.add(n.name)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            out |= {(a.asname or a.name).split(".")[0] for a in n.names}
        elif isinstance(n, ast.Assign):
            out |= {t.id for t in n.targets if isinstance(t, ast.Name)}
        elif isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name):
            out.add(n.target.id)
        elif isinstance(n, (ast.Try, ast.If)):
            out |= _module_names(ast.unparse(n.body)) if n.body else set()
    return out


def _imports(text: str) -> set[tuple[str, str]]:
    return {(n.module, a.name) for n in ast.walk(ast.parse(text)) if isinstance(n, ast.ImportFrom)
            and n.module and n.module.startswith("vllm") for a in n.names}


def _defines(fs, module: str, name: str, own: dict[str, str], depth: int = 0) -> bool:
    """Whether `from module import name` resolves in the release: a submodule, a top-level
    name, or a name re-exported through `from .x import *`."""
    names = _wheel_names(fs.version)
    path = module.replace(".", "/")
    if f"{path}/{name}.py" in names or f"{path}/{name}/__init__.py" in names:
        return True
    text = own.get(module) or next((release_bytes(fs.version, p).decode()
                                    for p in (path + ".py", path + "/__init__.py") if p in names), None)
    if text is None:
        return False
    if name in _module_names(text):
        return True
    package = module if f"{path}/__init__.py" in names else module.rpartition(".")[0]
    for n in ast.parse(text).body:
        if isinstance(n, ast.ImportFrom) and [a.name for a in n.names] == ["*"] and depth < 3:
            target = (package + "." + n.module) if n.level == 1 else n.module
            if _defines(fs, target, name, own, depth + 1):
                return True
    return False


@all_rows
def test_patches_import_only_what_the_release_defines(fs):
    """Every `from vllm... import name` a patch adds resolves in this release (or in the set's
    own patched helper)."""
    own = {HELPER.removesuffix(".py").replace("/", "."): patched_text(fs, HELPER)}
    checked = 0
    for rel in (HELPER, MODEL):
        added = _imports(patched_text(fs, rel)) - _imports(pristine_text(fs, rel))
        for module, name in sorted(added):
            assert _defines(fs, module, name, own), f"{fs.name}: {rel} imports {name} from {module}, which has none"
            checked += 1
    assert checked >= 4  # tensor_model_parallel_all_reduce + the three helper functions, at least


@all_rows
def test_helper_calls_only_aiter_apis_the_release_has(fs):
    """rocm_aiter_ops methods and AiterCustomAllreduce attributes the patched helper uses exist
    in this release's vLLM (the stand-ins answer any of them; the release must too)."""
    helper = ast.parse(patched_text(fs, HELPER))
    used = {n.attr for n in ast.walk(helper) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name) and n.value.id == "rocm_aiter_ops"}
    ops = class_node(tree_of(release_bytes(fs.version, "vllm/_aiter_ops.py").decode()), "rocm_aiter_ops")
    defined = {n.name for n in ops.body if isinstance(n, ast.FunctionDef)}
    assert used and used <= defined, used - defined
    if fs.aiter_api == "wrapper":
        wrapper = class_node(tree_of(release_bytes(
            fs.version, "vllm/distributed/device_communicators/aiter_custom_all_reduce.py").decode()),
            "AiterCustomAllreduce")
        members = {n.name for n in wrapper.body if isinstance(n, ast.FunctionDef)}
        m3 = ast.parse("\n".join(src(n) for n in helper.body if isinstance(n, ast.FunctionDef)
                                 and n.name.startswith(("_m3", "initialize_m3"))))
        wrapper_attrs = {n.attr for n in ast.walk(m3) if isinstance(n, ast.Attribute)
                         and isinstance(n.value, ast.Name) and n.value.id == "wrapper"}
        assert wrapper_attrs == {"aiter_ca"} and "aiter_ca" in members
    ps = _module_names(release_bytes(fs.version, "vllm/distributed/parallel_state.py").decode())
    if "_ENABLE_CUSTOM_ALL_REDUCE" in patched_text(fs, HELPER):
        assert "_ENABLE_CUSTOM_ALL_REDUCE" in ps
