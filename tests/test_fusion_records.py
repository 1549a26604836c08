"""The run record says what ran, per boundary kind and batch bucket (issue 23).

For every set and mode, the patched model is built and run on the fusion harness at 8 and 600
tokens, with AITER's custom all-reduce on and off, MXFP8 post-attention norms on and off (the
rows that have them), and mono decode requested (the rows that have it). What the harness
counted as run at each boundary (AITER's two-stage fused kernel, vLLM's own one-stage AITER
op, the all-reduce + norm, the MXFP8 norm with its quant epilogue) must be what the record's
bucket for that many tokens names, and the log line says the same.

The AITER installed is a modern one (its `custom_fused_ar_rms` takes `gemma_norm`, version
0.1.21.post2: what 0.30+ need), so that `off` with the custom all-reduce on runs: on 0.30+
vLLM's own one-stage op then takes M3's norm at small batches (vLLM's rule, from the TP
communicator's wrapper: at TP 2 up to 80 tokens).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile

import pytest
import torch

from fusion_harness import Stage, ToyConfig, build_model, installed_aiter, load_model, run_forward
from fusion_matrix import rows_where
from fusion_standins import FakeAiterCAGemma, SimTP
from test_fixes_runtime import _Lines  # one log-line collector for the run-time tests

MODERN_AITER = "0.1.21.post2"
KINDS = ("aiter-1stage", "aiter-2stage", "vllm-aiter-1stage", "all-reduce+norm", "all-reduce+mxfp8-norm")


def modern_aiter():
    """An `amd-aiter` distribution of MODERN_AITER on sys.path while active."""
    return installed_aiter(MODERN_AITER)


def bucket(runs: dict[str, str], tokens: int) -> str:
    """The kind a record's buckets name for `tokens` ("1-80", "81+")."""
    for key, kind in runs.items():
        lo, _, hi = key.partition("-")
        lo = int(lo.rstrip("+"))
        if tokens >= lo and (key.endswith("+") or tokens <= int(hi)):
            return kind
    raise AssertionError(f"no bucket of {runs} holds {tokens} tokens")


@contextlib.contextmanager
def recording():
    """M3FUSE_RUN_RECORD in a temp dir and the root logger's INFO lines: yields (path, lines)."""
    handler, root = _Lines(), logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "run.json")
        os.environ["M3FUSE_RUN_RECORD"] = path
        try:
            yield path, handler.lines
        finally:
            os.environ.pop("M3FUSE_RUN_RECORD", None)
            root.removeHandler(handler)
            root.setLevel(old_level)


def run_model(fs, mode: str, tokens: int, **stage_kw):
    """Build and run the patched model on a TP-2 harness; returns (stage, record, log lines)."""
    config = ToyConfig()
    embeds = torch.randn(tokens, config.hidden_size, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    with recording() as (path, lines):
        with Stage(fs, SimTP(2), mode=mode, ca_factory=lambda tp: FakeAiterCAGemma(tp, sum_dtype=torch.float32),
                   **stage_kw) as st:
            world = load_model(fs, st)
            st.tp.run(lambda r: run_forward(world, build_model(world, config), embeds, fs))
        with open(path) as f:
            record = json.load(f)
    return st, record, [ln for ln in lines if ln.startswith(f"m3fuse set {fs.name}: ")]


def counted(st: Stage) -> dict[str, int]:
    """What the harness saw run on rank 0, by kind (the helper's all-reduces are `comm-op`)."""
    ca_calls = [c for c in st.ca.calls if c["rank"] == 0] if st.ca is not None else []
    return {
        "aiter-1stage": sum(1 for c in ca_calls if c["use_1stage"] is True),
        "aiter-2stage": sum(1 for c in ca_calls if c["use_1stage"] is False),
        "vllm-aiter-1stage": sum(1 for c in st.upstream_op_calls if c["rank"] == 0),
        "all-reduce": st.reduce_log.count("comm-op"),
        "mxfp8-post": st.mxfp8_calls.count("post"),
    }


def _cases():
    out = []
    for r in rows_where(lambda r: True):
        for mode in ("fused", "fused-1stage", "control", "off"):
            for custom_ar in (True, False):
                for mxfp8 in ((False, True) if r.mxfp8_norms else (False,)):
                    # fused-1stage: one-stage (8), two-stage (200), neither (600)
                    for tokens in ((8, 200, 600) if mode == "fused-1stage" else (8, 600)):
                        out.append(pytest.param(r, mode, custom_ar, mxfp8, tokens, id=(
                            f"{r.name}-{mode}-{'car' if custom_ar else 'nocar'}-"
                            f"{'mxfp8' if mxfp8 else 'bf16'}-{tokens}")))
    return out


@pytest.mark.parametrize("fs,mode,custom_ar,mxfp8,tokens", _cases())
def test_the_record_names_what_ran_per_boundary_and_bucket(fs, mode, custom_ar, mxfp8, tokens):
    kw = dict(aiter_custom_ar_env=custom_ar, mxfp8=mxfp8)
    if mode in ("fused", "fused-1stage") and not custom_ar and fs.aiter_api == "wrapper":
        # 0.25+: no AITER communicator without the custom all-reduce: fused refuses, naming it
        with modern_aiter(), pytest.raises(RuntimeError, match="VLLM_ROCM_USE_AITER_CUSTOM_AR=1"):
            run_model(fs, mode, tokens, **kw)
        return
    if mode == "fused-1stage" and not fs.upstream_aiter_branch:
        # before 0.30 vLLM has no one-stage rule of its own: the arm is refused at construction
        with modern_aiter(), pytest.raises(RuntimeError, match="fused-1stage: this vLLM has no one-stage rule"):
            run_model(fs, mode, tokens, **kw)
        return
    with modern_aiter():
        st, record, lines = run_model(fs, mode, tokens, **kw)
    runs = record["boundaries"]
    norm = bucket(runs["norm"], tokens)
    kinds = {norm}
    if mxfp8:
        mx = bucket(runs["mxfp8_post_norm"], tokens)
        kinds.add(mx)
    else:
        assert "mxfp8_post_norm" not in runs
    assert kinds <= set(KINDS), record
    seen = counted(st)
    assert (seen["aiter-1stage"] > 0) == ("aiter-1stage" in kinds), (record, seen)
    assert (seen["aiter-2stage"] > 0) == ("aiter-2stage" in kinds), (record, seen)
    assert (seen["vllm-aiter-1stage"] > 0) == ("vllm-aiter-1stage" in kinds), (record, seen)
    plain = {"all-reduce+norm", "all-reduce+mxfp8-norm"}
    assert (seen["all-reduce"] > 0) == bool(kinds & plain), (record, seen)
    assert (seen["mxfp8-post"] > 0) == ("all-reduce+mxfp8-norm" in kinds), (record, seen)
    if mxfp8 and mx != "all-reduce+mxfp8-norm":
        assert seen["mxfp8-post"] == 0
    # the one log line per rank says the same buckets
    # (the JSON record's keys are sorted; the line keeps the buckets in token order)
    ordered = sorted(runs["norm"].items(), key=lambda kv: int(kv[0].split("-")[0].rstrip("+")))
    text = ", ".join(f"{k} {v}" for k, v in ordered)
    assert lines and all(f"; norm boundaries: {text}" in ln for ln in lines), lines


@pytest.mark.parametrize("fs", rows_where(lambda r: r.upstream_aiter_branch), ids=lambda r: r.name)
def test_off_with_the_custom_all_reduce_on_runs_vllms_one_stage_op_at_small_batches(fs):
    """0.30+, a modern AITER, `off`: vLLM's one-stage op takes M3's norm up to its rule's limit
    (TP 2: 80 tokens, read from the wrapper), and the record says so, not `unfused`."""
    with modern_aiter():
        st, record, _ = run_model(fs, "off", 8)
    assert record["boundaries"]["norm"] == {"1-80": "vllm-aiter-1stage", "81+": "all-reduce+norm"}
    assert counted(st)["vllm-aiter-1stage"] == ToyConfig().num_hidden_layers  # every post-attention norm


@pytest.mark.parametrize("fs", rows_where(lambda r: r.mono_decode), ids=lambda r: r.name)
# TP 4: past the TP check, the toy layers (no sparse-attention indexer) fail its layer-mix check
@pytest.mark.parametrize("world,why", [(2, "TP 2 != 4"), (4, "layer mix")])
def test_mono_requested_but_refused_says_why_after_vllm_decided(fs, world, why):
    """VLLM_ROCM_MINIMAX_M3_MONO=1 where the release's own MonoDecode refuses the deployment:
    the record and log line carry MonoDecode's reason (decided after it ran); deferral stays
    off (the layers are built before MonoDecode can decide) and every FFN reduces itself."""
    config = ToyConfig()
    embeds = torch.randn(8, config.hidden_size, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    with modern_aiter(), recording() as (path, lines):
        with Stage(fs, SimTP(world), mode="control", mono=True) as st:
            w = load_model(fs, st)
            defer = st.tp.run(lambda r: build_model(w, config).defer_ffn_all_reduce)
            st.tp.run(lambda r: run_forward(w, build_model(w, config), embeds, fs))
        with open(path) as f:
            record = json.load(f)
    assert record["mono_decode"] == f"refused: {why}", record
    assert record["deferral"] is False and record["deferral_reason"] == f"mono decode requested (refused: {why})"
    assert defer == [False] * world
    assert any(f"; mono decode refused: {why}; " in ln for ln in lines), lines


@pytest.mark.parametrize("fs", rows_where(lambda r: r.upstream_aiter_branch), ids=lambda r: r.name)
def test_fused_1stage_record_names_both_kernels_by_vllms_rule(fs):
    """0.30+, a modern AITER, `fused-1stage` at TP 2: the one-stage kernel up to vLLM's rule's
    limit (TP 2: 80 tokens, read from the wrapper), the two-stage one up to 512, and the record
    and the calls say so (the one-stage calls are every boundary of an 8-token batch)."""
    with modern_aiter():
        st, record, lines = run_model(fs, "fused-1stage", 8)
    runs = {"1-80": "aiter-1stage", "81-512": "aiter-2stage", "513+": "all-reduce+norm"}
    assert record["boundaries"]["norm"] == runs and record["mode"] == "fused-1stage"
    assert record["aiter_fused_path"] == "ready" and record["deferral"] is True
    seen = counted(st)
    assert seen["aiter-1stage"] > 0 and seen["aiter-2stage"] == 0 and seen["vllm-aiter-1stage"] == 0
    assert lines and all("norm boundaries: 1-80 aiter-1stage, 81-512 aiter-2stage, 513+ all-reduce+norm" in ln
                         for ln in lines), lines


@pytest.mark.parametrize("fs", rows_where(lambda r: r.upstream_aiter_branch), ids=lambda r: r.name)
@pytest.mark.parametrize("aiter,why", [
    ("0.1.18", "AITER 0.1.18 lacks the fused one-stage kernel's exit barrier"),
    (None, "the installed AITER's version is unknown"),
])
def test_fused_1stage_refused_without_rocm_aiter_4346(fs, aiter, why):
    """`fused-1stage` needs an AITER known to have ROCm/aiter#4346 (0.1.19.post1+): an older
    one, or one whose version cannot be read, is refused at construction, naming it and the
    `fused` fallback; nothing one-stage runs."""
    ctx = installed_aiter(aiter) if aiter else contextlib.nullcontext()
    with ctx, pytest.raises(RuntimeError, match=why) as err:
        run_model(fs, "fused-1stage", 8)
    assert "M3_AITER_AR_RMS_MODE=fused (two-stage only)" in str(err.value)
