"""The 0.24.0/0.26.0 fusion sets on the real release files: apply/revert/compile, the model
patch checked with `ast` (issue 4 and 8), and the patched `MiniMaxM3Model.forward` run on a
simulated TP group against the pristine (unfused) forward."""

from __future__ import annotations

import ast
import hashlib
from collections import Counter

import pytest
import torch

import realvllm
from fusion_harness import (
    SET_IDS,
    SETS,
    Stage,
    ToyConfig,
    build_model,
    load_model,
    manifest,
    patched_text,
    pristine_bytes,
    pristine_text,
    run_forward,
)
from fusion_standins import SimTP
from m3fuse.errors import PatchSetError
from m3fuse.patching.hunks import apply_patch

HELPER_SHA = "0169300358b731605508407ff39e9376497866b102b105f1e96113b80a658eac"
FUSED_LAYER_KWARG = "defer_ffn_all_reduce"


@pytest.fixture(params=SETS, ids=SET_IDS)
def fs(request):
    return request.param


# ----------------------------------------------------------------------------- apply / revert
def test_set_applies_reverts_and_compiles(fs):
    m = manifest(fs)
    assert m["vllm-versions"] == [fs.version]
    assert sorted(f["path"] for f in m["files"]) == sorted([realvllm.HELPER, realvllm.MODEL])
    for entry in m["files"]:
        original = pristine_bytes(fs, entry["path"])
        assert hashlib.sha256(original).hexdigest() == entry["pristine-sha256"]
        diff = (fs.dir / entry["patch"]).read_text()
        patched = apply_patch(original, diff, name=entry["patch"])
        assert hashlib.sha256(patched).hexdigest() == entry["patched-sha256"]
        assert apply_patch(patched, diff, reverse=True, name=entry["patch"]) == original
        compile(patched, entry["path"], "exec")
        with pytest.raises(PatchSetError):  # applying twice is refused, never doubled
            apply_patch(patched, diff, name=entry["patch"])
    helper = next(f for f in m["files"] if f["path"] == realvllm.HELPER)
    assert helper["pristine-sha256"] == HELPER_SHA


def test_0251_model_is_drift_for_every_set():
    model_0251 = realvllm.read_member("0.25.1", realvllm.MODEL)
    assert hashlib.sha256(realvllm.read_member("0.25.1", realvllm.HELPER)).hexdigest() == HELPER_SHA
    for fs in SETS:
        entry = next(f for f in manifest(fs)["files"] if f["path"] == realvllm.MODEL)
        assert hashlib.sha256(model_0251).hexdigest() != entry["pristine-sha256"]
        with pytest.raises(PatchSetError):
            apply_patch(model_0251, (fs.dir / entry["patch"]).read_text(), name=entry["patch"])


# ----------------------------------------------------------------------------- ast helpers
def tree_of(text: str) -> ast.Module:
    return ast.parse(text)


def cls(tree: ast.Module, name: str) -> ast.ClassDef:
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)


def meth(tree: ast.Module, c: str, name: str) -> ast.FunctionDef:
    return next(n for n in cls(tree, c).body if isinstance(n, ast.FunctionDef) and n.name == name)


def calls(node: ast.AST, func_src: str) -> list[ast.Call]:
    return [n for n in ast.walk(node) if isinstance(n, ast.Call) and ast.unparse(n.func) == func_src]


def kw(call: ast.Call, name: str) -> str | None:
    for k in call.keywords:
        if k.arg == name:
            return ast.unparse(k.value)
    return None


def dump(node: ast.AST) -> str:
    return ast.dump(node, include_attributes=False)


@pytest.fixture
def trees(fs):
    return (tree_of(pristine_text(fs, realvllm.MODEL)), tree_of(patched_text(fs, realvllm.MODEL)))


# ----------------------------------------------------------------------------- construction
def test_decoder_layer_defers_only_when_asked(fs, trees):
    _, new = trees
    init = meth(new, "MiniMaxM3DecoderLayer", "__init__")
    args = init.args.args + init.args.kwonlyargs
    defaults = dict(zip([a.arg for a in init.args.args][-len(init.args.defaults):], init.args.defaults))
    defaults.update({a.arg: d for a, d in zip(init.args.kwonlyargs, init.args.kw_defaults)})
    assert FUSED_LAYER_KWARG in [a.arg for a in args]
    assert ast.literal_eval(defaults[FUSED_LAYER_KWARG]) is False  # MTP and any other caller: reduce
    (moe,) = calls(init, "MiniMaxM3MoE")
    (mlp,) = calls(init, "MiniMaxM3MLP")
    assert kw(moe, "reduce_results") == f"not {FUSED_LAYER_KWARG}"
    assert kw(mlp, "reduce_results") == f"not {FUSED_LAYER_KWARG}"
    assert any(ast.unparse(n) == f"self.{FUSED_LAYER_KWARG} = {FUSED_LAYER_KWARG}" for n in init.body)


def test_moe_skips_final_all_reduce_with_what_the_release_offers(fs, trees):
    _, new = trees
    layer_src = realvllm.read_member(fs.version, "vllm/model_executor/layers/fused_moe/layer.py").decode()
    factory = next(n for n in tree_of(layer_src).body if isinstance(n, ast.FunctionDef) and n.name == "FusedMoE")
    accepted = {a.arg for a in factory.args.args + factory.args.kwonlyargs}
    init = meth(new, "MiniMaxM3MoE", "__init__")
    assert "reduce_results" in [a.arg for a in init.args.args + init.args.kwonlyargs]
    (fused,) = calls(init, "FusedMoE")
    used = {k.arg for k in fused.keywords}
    assert used <= accepted, used - accepted  # every keyword exists in this release's FusedMoE
    if "reduce_results" in accepted:
        assert kw(fused, "reduce_results") == "reduce_results"
        assert kw(fused, "runner_cls") is None
        raise_checks = [n for n in ast.walk(init) if isinstance(n, ast.If)
                        and "skip_final_all_reduce" in ast.unparse(n.test)]
        assert raise_checks and isinstance(raise_checks[0].body[0], ast.Raise)
    else:  # 0.24.0: no reduce_results; a runner subclass skips the final reduce
        assert kw(fused, "runner_cls") == "None if reduce_results else _M3DeferredReduceMoERunner"
        runner = cls(new, "_M3DeferredReduceMoERunner")
        assert [ast.unparse(b) for b in runner.bases] == ["MoERunner"]
        override = next(n for n in runner.body if isinstance(n, ast.FunctionDef))
        assert override.name == "_maybe_reduce_final_output"
        base = tree_of(realvllm.read_member(
            fs.version, "vllm/model_executor/layers/fused_moe/runner/moe_runner.py").decode())
        base_fn = meth(base, "MoERunner", "_maybe_reduce_final_output")
        assert [a.arg for a in override.args.args] == [a.arg for a in base_fn.args.args]
        assert not calls(override, "tensor_model_parallel_all_reduce")
        assert "_fused_output_is_reduced" in ast.unparse(override)  # backend that reduces: raise
        sp = [n for n in ast.walk(init) if isinstance(n, ast.If) and "is_sequence_parallel" in ast.unparse(n.test)]
        assert sp and isinstance(sp[0].body[0], ast.Raise)
    fwd = meth(new, "MiniMaxM3MoE", "forward")
    guard = [n for n in ast.walk(fwd) if isinstance(n, ast.If) and "_fused_output_is_reduced" in ast.unparse(n.test)]
    assert guard and isinstance(guard[0].body[0], ast.Raise)


def test_model_init_reads_mode_initializes_and_wires_deferral(fs, trees):
    _, new = trees
    init = meth(new, "MiniMaxM3Model", "__init__")
    src = [ast.unparse(s) for s in init.body]
    i_mode = src.index("self.m3_ar_rms_mode = m3_aiter_ar_rms_mode()")
    i_defer = src.index("self.defer_ffn_all_reduce = m3_defer_ffn_all_reduce(vllm_config)")
    i_init = src.index("initialize_m3_aiter_allreduce()")
    i_layers = next(i for i, s in enumerate(src) if "make_layers(" in s)
    assert i_mode < i_defer < i_layers and i_init < i_layers
    (layer_call,) = calls(init.body[i_layers], "MiniMaxM3DecoderLayer")
    assert kw(layer_call, FUSED_LAYER_KWARG) == "self.defer_ffn_all_reduce"


def test_mtp_keeps_reducing(fs):
    mtp = tree_of(pristine_text(fs, realvllm.MTP))  # mtp.py is not patched
    assert hashlib.sha256(pristine_bytes(fs, realvllm.MTP)).hexdigest() == \
        "710c2f3a9e09a97e08a64ce78982f13ce2531f7e1b8f9c9ea190d12e74741e56"
    (build,) = calls(mtp, "MiniMaxM3DecoderLayer")
    assert kw(build, FUSED_LAYER_KWARG) is None  # default False: FFN/MoE reduce themselves
    (use,) = calls(mtp, "self.transformer_layer")
    assert kw(use, "residual") == "None" and kw(use, "fuse_input_allreduce") is None
    # and the MTP block reads the layer output right away:
    fwd = meth(mtp, "MiniMaxM3MultiTokenPredictorLayer", "forward")
    assert "hidden_states += residual" in ast.unparse(fwd)


# ----------------------------------------------------------------------------- forwards
def test_layer_forward_input_norm(fs, trees):
    old, new = trees
    o = meth(old, "MiniMaxM3DecoderLayer", "forward")
    n = meth(new, "MiniMaxM3DecoderLayer", "forward")
    assert [a.arg for a in n.args.args] == [a.arg for a in o.args.args] + ["fuse_input_allreduce"]
    assert ast.literal_eval(n.args.defaults[-1]) is False
    first = n.body[0]
    assert isinstance(first, ast.If) and ast.unparse(first.test) == "fuse_input_allreduce"
    assert ast.unparse(first.body[0]) == (
        "hidden_states, residual = fused_allreduce_gemma_rms_norm(hidden_states, residual, "
        "self.input_layernorm)")
    # off / first layer / MTP: the original input norm, verbatim
    assert dump(first.orelse[0]) == dump(o.body[0])
    assert [dump(s) for s in n.body[1:]] == [dump(s) for s in o.body[1:]]


def _loops(fn: ast.FunctionDef) -> list[ast.For]:
    return [n for n in ast.walk(fn) if isinstance(n, ast.For)]


def test_model_forward_structure(fs, trees):
    old, new = trees
    o = meth(old, "MiniMaxM3Model", "forward")
    n = meth(new, "MiniMaxM3Model", "forward")
    (o_loop,) = _loops(o)
    branch = next(s for s in n.body if isinstance(s, ast.If) and ast.unparse(s.test) == "self.defer_ffn_all_reduce")
    # off: the pristine loop, verbatim
    assert len(branch.orelse) == 1 and dump(branch.orelse[0]) == dump(o_loop)
    (d_loop,) = [s for s in branch.body if isinstance(s, ast.For)]
    body = [ast.unparse(s) for s in d_loop.body]
    assert body[0] == ("hidden_states, residual = layer(positions, hidden_states, residual, "
                       "fuse_input_allreduce=partial)")
    assert body[1] == "partial = layer.defer_ffn_all_reduce"
    # EAGLE3 (issue 8): a captured layer's output is all-reduced before the capture
    cap = d_loop.body[2]
    assert isinstance(cap, ast.If)
    assert ast.unparse(cap.test) == "partial and idx + 1 in self.aux_hidden_state_layers"
    assert [ast.unparse(s) for s in cap.body] == [
        "hidden_states = tensor_model_parallel_all_reduce(hidden_states)", "partial = False"]
    assert body[3] == "self._maybe_add_hidden_state(aux_hidden_states, idx + 1, hidden_states, residual)"
    assert len(body) == 4
    # the tensor leaves the loop only through the final norm (helper if partial) or PP hand-off
    final = [s for s in n.body if isinstance(s, ast.If) and ast.unparse(s.test) == "partial"]
    assert len(final) == 1
    assert ast.unparse(final[0].body[0]) == (
        "hidden_states, _ = fused_allreduce_gemma_rms_norm(hidden_states, residual, self.norm)")
    o_norm = next(s for s in o.body if "self.norm(" in ast.unparse(s))
    assert dump(final[0].orelse[0]) == dump(o_norm)
    if fs.has_pp:
        pp = next(s for s in n.body if isinstance(s, ast.If) and "is_last_rank" in ast.unparse(s.test))
        guard = pp.body[0]
        assert ast.unparse(guard.test) == "partial"
        assert ast.unparse(guard.body[0]) == "hidden_states = tensor_model_parallel_all_reduce(hidden_states)"
        assert "IntermediateTensors" in ast.unparse(pp.body[1])


def test_no_other_reader_of_a_layer_output(fs, trees):
    """Every read of hidden_states after the first layer call in the patched forward is one of:
    the next layer call (input norm), the capture all-reduce, the (guarded) capture, the PP
    hand-off (guarded), or the final norm."""
    _, new = trees
    n = meth(new, "MiniMaxM3Model", "forward")
    allowed = {"layer", "tensor_model_parallel_all_reduce", "self._maybe_add_hidden_state",
               "fused_allreduce_gemma_rms_norm", "self.norm", "IntermediateTensors"}
    branch = next(s for s in n.body if isinstance(s, ast.If) and ast.unparse(s.test) == "self.defer_ffn_all_reduce")
    final = next(s for s in n.body if isinstance(s, ast.If) and ast.unparse(s.test) == "partial")
    # up to the final norm; what follows reads its (complete) output
    after = n.body[n.body.index(branch): n.body.index(final) + 1]
    parents = {}
    for top in after:
        for p in ast.walk(top):
            for c in ast.iter_child_nodes(p):
                parents[c] = p
    for top in after:
        for node in ast.walk(top):
            if isinstance(node, ast.Name) and node.id == "hidden_states" and isinstance(node.ctx, ast.Load):
                p = node
                while p in parents and not isinstance(p, ast.Call):
                    p = parents[p]
                assert isinstance(p, ast.Call), ast.unparse(parents.get(node, node))
                assert ast.unparse(p.func) in allowed, ast.unparse(p)
    # the decoder layer: nothing reads the FFN output before it is returned
    layer_fwd = meth(new, "MiniMaxM3DecoderLayer", "forward")
    assert ast.unparse(layer_fwd.body[-2]) == "hidden_states = ffn(hidden_states)"
    assert ast.unparse(layer_fwd.body[-1]) == "return (hidden_states, residual)"


def test_off_keeps_every_original_call(fs):
    for c, m in (("MiniMaxM3DecoderLayer", "forward"), ("MiniMaxM3Model", "forward"),
                 ("MiniMaxM3DecoderLayer", "__init__"), ("MiniMaxM3MoE", "forward")):
        old = Counter(dump(x) for x in ast.walk(meth(tree_of(pristine_text(fs, realvllm.MODEL)), c, m))
                      if isinstance(x, ast.Call))
        new_fn = meth(tree_of(patched_text(fs, realvllm.MODEL)), c, m)
        new = Counter(dump(x) for x in ast.walk(new_fn) if isinstance(x, ast.Call))
        if m == "__init__":  # the FFN constructors gained reduce_results=...: compare without it
            strip = lambda d: d.replace(f", keyword(arg='reduce_results', value=UnaryOp(op=Not(), operand=Name(id='{FUSED_LAYER_KWARG}', ctx=Load())))", "")  # noqa: E731
            new = Counter(strip(k) for k in new.elements())
        missing = old - new
        assert not missing, (c, m, list(missing))


# ----------------------------------------------------------------------------- running it
TOKENS = 8


def _embeds(h: int) -> torch.Tensor:
    return torch.randn(TOKENS, h, generator=torch.Generator().manual_seed(42)).to(torch.bfloat16)


def _run(fs, world, mode, aux, source=None):
    config = ToyConfig()
    with Stage(fs, SimTP(world), mode=mode) as st:
        w = load_model(fs, st, model_source=source)

        def rank(r):
            model = build_model(w, config)
            if aux:
                model._set_aux_hidden_state_layers(aux)
            out = run_forward(w, model, _embeds(config.hidden_size), fs)
            hidden, caps = out if isinstance(out, tuple) else (out, [])
            return hidden, caps, getattr(model, "defer_ffn_all_reduce", None)

        results = st.tp.run(rank)
        fused_calls = len(st.ca.calls) if st.ca is not None else 0
    return results, fused_calls


def _close(a, b):
    """Within bf16 noise after a few layers (relative Frobenius error < 3%); a partial sum
    in place of a reduced tensor is off by O(1)."""
    a, b = a.double(), b.double()
    return bool((a - b).norm() <= 0.03 * b.norm())


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("aux", [(), (1, 2, 4), (0, 3)], ids=["no-eagle3", "aux-1-2-4", "aux-0-3"])
def test_patched_forward_matches_unfused_loop(fs, world, aux):
    n_layers = ToyConfig().num_hidden_layers
    base, _ = _run(fs, world, "off", aux, source=pristine_text(fs, realvllm.MODEL))
    for mode in ("off", "control", "fused"):
        got, fused_calls = _run(fs, world, mode, aux)
        for r in range(world):
            hidden, caps, deferred = got[r]
            assert deferred is (mode != "off")
            assert _close(hidden, base[r][0]), (mode, r)
            assert len(caps) == len(aux) == len(base[r][1])
            for c, b in zip(caps, base[r][1]):
                assert _close(c, b), (mode, r)
            if mode in ("off", "control"):  # the unfused arithmetic, bit for bit
                assert torch.equal(hidden, base[r][0])
                assert all(torch.equal(c, b) for c, b in zip(caps, base[r][1]))
        # captures are complete (identical on every rank), never partial sums
        for i in range(len(aux)):
            assert all(torch.equal(got[r][1][i], got[0][1][i]) for r in range(world))
        if mode == "fused":
            # post-attention norms + input norms of layers after the first whose input is
            # still partial + the final norm if the last output is still partial
            expected = n_layers + sum(1 for i in range(1, n_layers) if i not in aux) + (n_layers not in aux)
            assert fused_calls == expected * world
        else:
            assert fused_calls == 0


def test_forward_run_catches_a_leaked_partial_capture(fs):
    """A forward that captures without the all-reduce (issue 8's bug) must fail the comparison."""
    text = patched_text(fs, realvllm.MODEL)
    bad = text.replace("                    hidden_states = tensor_model_parallel_all_reduce(hidden_states)\n"
                       "                    partial = False\n", "                    pass\n")
    assert bad != text
    aux = (1, 2)
    base, _ = _run(fs, 2, "off", aux, source=pristine_text(fs, realvllm.MODEL))
    got, _ = _run(fs, 2, "control", aux, source=bad)
    assert _close(got[0][0], base[0][0])  # the final output is still right...
    assert not all(_close(c, b) for c, b in zip(got[0][1], base[0][1]))  # ...the captures are not
    assert not torch.equal(got[0][1][0], got[1][1][0])


def test_bad_mode_raises_at_model_construction(fs):
    with Stage(fs, SimTP(2), mode="fusde") as st:
        w = load_model(fs, st)
        with pytest.raises(ValueError, match="M3_AITER_AR_RMS_MODE"):
            build_model(w, ToyConfig())


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
                h, res = layer(positions=torch.arange(TOKENS), hidden_states=_embeds(config.hidden_size),
                               residual=None)
                return h + res

            outs = st.tp.run(rank)
        assert torch.equal(outs[0], outs[1])
