"""The patched fused all-reduce + Gemma RMSNorm helper, run on CPU with real torch.

Each test loads the helper text that the committed patch set produces from the real release
file, under stand-in vLLM/AITER modules, on a simulated TP group (fusion_harness)."""

from __future__ import annotations

import pytest
import torch

from fusion_harness import SET_IDS, SETS, Stage, load_helper
from fusion_standins import FakeAiterCA, FakeAiterCANoStage, M3Norm, OtherGemmaNorm, SimTP

H = 64
EPS = 1e-6
BF16_TOL = dict(atol=3e-2, rtol=2e-2)


@pytest.fixture(params=SETS, ids=SET_IDS)
def fs(request):
    return request.param


def make_inputs(world: int, tokens: int = 16, hidden: int = H, dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    partials = [torch.randn(tokens, hidden, generator=g).to(dtype) for _ in range(world)]
    residual = torch.randn(tokens, hidden, generator=g).to(dtype)
    weight = 0.3 * torch.randn(hidden, generator=g)
    return partials, residual, weight


def reference(partials, residual, weight, eps=EPS):
    """float64: all-reduce (sum), residual add, Gemma RMSNorm (scale 1 + weight)."""
    s = sum(p.double() for p in partials) + residual.double()
    out = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight.double())
    return out, s


def new_norm(weight, cls=M3Norm, dtype=torch.bfloat16):
    n = cls(weight.numel(), eps=EPS)
    with torch.no_grad():
        n.weight.copy_(weight)
    return n.to(dtype)


def run_helper(stage: Stage, helper, partials, residual, norm):
    def one(rank):
        return helper.fused_allreduce_gemma_rms_norm(partials[rank].clone(), residual.clone(), norm)

    return stage.tp.run(one)


@pytest.mark.parametrize("world", [2, 4, 8])
def test_modes_agree_with_float64_reference(fs, world):
    partials, residual, weight = make_inputs(world, seed=world)
    ref_out, ref_res = reference(partials, residual, weight)
    results = {}
    for mode in ("fused", "control", "off"):
        with Stage(fs, SimTP(world), mode=mode) as st:
            helper = load_helper(fs)
            helper.initialize_m3_aiter_allreduce()
            norm = new_norm(weight)
            outs = run_helper(st, helper, partials, residual, norm)
            n_calls = len(st.ca.calls) if st.ca is not None else 0
        assert n_calls == (world if mode == "fused" else 0), mode
        for out, res in outs:
            assert out.dtype == torch.bfloat16 and res.dtype == torch.bfloat16
            torch.testing.assert_close(out.double(), ref_out, **BF16_TOL)
            torch.testing.assert_close(res.double(), ref_res, **BF16_TOL)
        results[mode] = outs
    # control is the unpatched arithmetic: bit-identical to off
    for (a, ra), (b, rb) in zip(results["control"], results["off"]):
        assert torch.equal(a, b) and torch.equal(ra, rb)


def test_aiter_call_arguments(fs):
    world = 4
    partials, residual, weight = make_inputs(world, tokens=512, seed=3)
    with Stage(fs, SimTP(world), mode="fused") as st:
        helper = load_helper(fs)
        helper.initialize_m3_aiter_allreduce()
        norm = new_norm(weight)
        run_helper(st, helper, partials, residual, norm)  # eager: fills the gamma cache
        st.capturing = True
        run_helper(st, helper, partials, residual, norm)  # a "graph capture"
        calls = st.ca.calls
    assert len(calls) == 2 * world
    expected_w = (norm.weight.float() + 1.0).to(torch.bfloat16)
    for i, call in enumerate(calls):
        assert torch.equal(call["w"], expected_w)
        assert not torch.equal(call["w"], norm.weight.detach())
        assert call["w"].dtype == torch.bfloat16
        assert call["use_1stage"] is False
        assert call["eps"] == EPS
        assert call["shape"] == (512, H)
        assert call["registered"] is (i >= world)


def test_gamma_is_never_first_computed_inside_a_capture(fs):
    world = 2
    partials, residual, weight = make_inputs(world, seed=5)
    ref_out, _ = reference(partials, residual, weight)
    with Stage(fs, SimTP(world), mode="fused", capturing=True) as st:
        helper = load_helper(fs)
        helper.initialize_m3_aiter_allreduce()
        norm = new_norm(weight)
        outs = run_helper(st, helper, partials, residual, norm)
        assert not st.ca.calls  # unfused path for this call...
        assert not norm.__dict__.get("_m3fuse_gamma")  # ...and nothing cached from a capture
    for out, _ in outs:
        torch.testing.assert_close(out.double(), ref_out, **BF16_TOL)


@pytest.mark.parametrize("case", ["513_tokens", "3d", "fp32", "other_norm", "non_contiguous", "fp16_ok", "512_ok"])
def test_gate(fs, case):
    world = 2
    tokens = {"513_tokens": 513, "512_ok": 512}.get(case, 8)
    dtype = {"fp32": torch.float32, "fp16_ok": torch.float16}.get(case, torch.bfloat16)
    partials, residual, weight = make_inputs(world, tokens=tokens, dtype=dtype, seed=11)
    ref_out, ref_res = reference(partials, residual, weight)
    if case == "3d":
        partials = [p.view(2, tokens // 2, H) for p in partials]
        residual = residual.view(2, tokens // 2, H)
    if case == "non_contiguous":
        partials = [p.t().contiguous().t() for p in partials]
        assert not partials[0].is_contiguous()
    cls = OtherGemmaNorm if case == "other_norm" else M3Norm
    with Stage(fs, SimTP(world), mode="fused") as st:
        helper = load_helper(fs)
        helper.initialize_m3_aiter_allreduce()
        norm = new_norm(weight, cls=cls, dtype=dtype)
        outs = run_helper(st, helper, partials, residual, norm)
        n_calls = len(st.ca.calls)
        fallbacks = st.fallback_all_reduces
    if case.endswith("_ok"):
        assert n_calls == world and fallbacks == 0
    else:
        assert n_calls == 0 and fallbacks == 1
    for out, res in outs:
        torch.testing.assert_close(out.reshape(tokens, H).double(), ref_out, **BF16_TOL)
        torch.testing.assert_close(res.reshape(tokens, H).double(), ref_res, **BF16_TOL)


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
        cache = norm.__dict__["_m3fuse_gamma"]
        assert set(cache) == {(torch.device("cpu"), torch.bfloat16), (torch.device("cpu"), torch.float16),
                              (torch.device("meta"), torch.bfloat16)}
        assert helper._m3_gamma(norm, bf) is g1


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


@pytest.mark.parametrize("value", ["fuse", "on", "1", "", "fused,control"])
def test_bad_mode_raises(fs, value):
    with Stage(fs, SimTP(2), mode=value):
        helper = load_helper(fs)
        with pytest.raises(ValueError, match="M3_AITER_AR_RMS_MODE"):
            helper.m3_aiter_ar_rms_mode()
        with pytest.raises(ValueError, match="fused, control, off"):
            helper.initialize_m3_aiter_allreduce()


@pytest.mark.parametrize("value,expected", [(None, "fused"), ("fused", "fused"), ("CONTROL", "control"),
                                            (" off ", "off")])
def test_mode_values(fs, value, expected):
    with Stage(fs, SimTP(2), mode=value):
        assert load_helper(fs).m3_aiter_ar_rms_mode() == expected


@pytest.mark.parametrize("mode", ["control", "off"])
def test_initialize_is_a_noop_unless_fused(fs, mode):
    with Stage(fs, SimTP(2), mode=mode, aiter_enabled=False, aiter_importable=False) as st:
        helper = load_helper(fs)
        helper.initialize_m3_aiter_allreduce()
        assert st.rocm_aiter_ops.init_calls == [] and st.ca is None


def test_initialize_is_a_noop_at_tp1(fs):
    with Stage(fs, SimTP(1), mode="fused", aiter_enabled=False) as st:
        load_helper(fs).initialize_m3_aiter_allreduce()
        assert st.rocm_aiter_ops.init_calls == []


def test_initialize_idempotent_and_creates_before_capture(fs):
    with Stage(fs, SimTP(2), mode="fused") as st:
        helper = load_helper(fs)
        helper.initialize_m3_aiter_allreduce()
        first = st.rocm_aiter_ops.get_aiter_allreduce()
        helper.initialize_m3_aiter_allreduce()
        helper.initialize_m3_aiter_allreduce()
        assert first is not None
        if fs.aiter_api == "raw":
            # created exactly once, on the TP group's CPU group and device
            assert st.rocm_aiter_ops.init_calls == [("tp-cpu-group", torch.device("cpu"))]
            assert st.rocm_aiter_ops.get_aiter_allreduce() is first
        else:
            assert st.rocm_aiter_ops.init_calls == []


def test_initialize_reuses_an_existing_raw_communicator():
    fs = next((s for s in SETS if s.aiter_api == "raw"), None)
    if fs is None:
        pytest.skip("no set with the 0.24 raw AITER API")
    with Stage(fs, SimTP(2), mode="fused") as st:
        st.raw_ca = st.make_ca()
        load_helper(fs).initialize_m3_aiter_allreduce()
        assert st.rocm_aiter_ops.init_calls == [] and st.rocm_aiter_ops.get_aiter_allreduce() is st.raw_ca


def _errors_for(fs):
    cases = [
        (dict(aiter_enabled=False), "VLLM_ROCM_USE_AITER"),
        (dict(ca_factory=lambda tp: FakeAiterCA(tp, with_pool=False)), "0.1.12"),
        (dict(ca_factory=FakeAiterCANoStage), "use_1stage"),
        (dict(ca_factory=lambda tp: FakeAiterCA(tp, disabled=True)), "disabled"),
        (dict(aiter_importable=False), "amd-aiter"),
    ]
    if fs.aiter_api == "wrapper":
        cases += [
            (dict(aiter_custom_ar_env=False), "VLLM_ROCM_USE_AITER_CUSTOM_AR"),
            (dict(custom_all_reduce=False), "--disable-custom-all-reduce"),
        ]
    return cases


def test_initialize_raises_naming_the_missing_setting(fs):
    for kwargs, needle in _errors_for(fs):
        with Stage(fs, SimTP(2), mode="fused", **kwargs):
            helper = load_helper(fs)
            with pytest.raises(RuntimeError) as info:
                helper.initialize_m3_aiter_allreduce()
            msg = str(info.value)
            assert needle in msg, (kwargs, msg)
            assert "M3_AITER_AR_RMS_MODE" in msg


def test_fused_call_without_communicator_raises_not_falls_back(fs):
    partials, residual, weight = make_inputs(2, seed=1)
    with Stage(fs, SimTP(2), mode="fused", aiter_enabled=False) as st:
        helper = load_helper(fs)
        norm = new_norm(weight)
        with pytest.raises(RuntimeError, match="M3_AITER_AR_RMS_MODE=fused"):
            run_helper(st, helper, partials, residual, norm)


@pytest.mark.parametrize("mode,world,pp,dp,expected", [
    ("fused", 2, 1, 1, True), ("control", 8, 1, 1, True), (None, 4, 1, 1, True),
    ("off", 8, 1, 1, False), ("fused", 1, 1, 1, False), ("control", 2, 2, 1, False),
    ("fused", 2, 1, 2, False),
])
def test_deferral_predicate(fs, mode, world, pp, dp, expected):
    with Stage(fs, SimTP(world), mode=mode, pp=pp, dp=dp) as st:
        helper = load_helper(fs)
        assert helper.m3_defer_ffn_all_reduce(st.vllm_config()) is expected
        assert helper.m3_defer_ffn_all_reduce() is expected  # from get_current_vllm_config()


def test_deferral_refuses_sequence_parallelism(fs):
    with Stage(fs, SimTP(2), mode="control", enable_sp=True) as st:
        with pytest.raises(ValueError, match="sequence parallelism"):
            load_helper(fs).m3_defer_ffn_all_reduce(st.vllm_config())
    with Stage(fs, SimTP(2), mode="off", enable_sp=True) as st:
        assert load_helper(fs).m3_defer_ffn_all_reduce(st.vllm_config()) is False
