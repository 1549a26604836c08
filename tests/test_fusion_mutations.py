"""Mutation check over the fusion matrix: planted bugs that the matrix must catch.

Each mutant is a text substitution in a set's patched helper or model. For every row it
applies to, the substitution is planted (`fusion_harness.override_source`) and each of the
mutant's named matrix tests (functions of tests/test_fusion_matrix.py, run in-process with the
arguments given) must FAIL on it. A named test that passes on the mutant is a survivor: the
matrix has lost the check that caught it. The unmutated set passes those same tests (the
matrix itself runs them), so a failure here is the planted bug's doing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest

import realvllm
import test_fusion_matrix as tm
from fusion_harness import committed_patched_text, override_source
from fusion_matrix import ROWS, Row

HELPER, MODEL = realvllm.HELPER, realvllm.MODEL


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    old: str
    new: str
    killers: tuple[tuple[Callable, tuple], ...]  # (matrix test, its arguments after the row)
    applies: Callable[[Row], bool] = lambda r: True


SHARED_MLP = ("                reduce_results=False,\n"
              "                prefix=f\"{prefix}.shared_experts\",")
FINAL_NORM = ("            hidden_states, _ = fused_allreduce_gemma_rms_norm(\n"
              "                hidden_states, residual, self.norm\n"
              "            )")
CAPTURE_REDUCE = ("                    hidden_states = tensor_model_parallel_all_reduce(hidden_states)\n"
                  "                    partial = False\n")
# _m3_defer_blocker's PP test (every set since the run-time checks: one `if` per blocker)
PP_CLAUSE = ("    if parallel_config.pipeline_parallel_size != 1:\n"
             "        return f\"PP={parallel_config.pipeline_parallel_size}\"\n")
NO_AUX = ()
AUX = (1, 2, 4)

MUTANTS: list[Mutant] = [
    Mutant("shared-expert-reduces-itself", MODEL, SHARED_MLP,
           SHARED_MLP.replace("reduce_results=False", "reduce_results=reduce_results"),
           ((tm.test_shared_expert_output_is_reduced_exactly_once, ("off", 2, {})),
            (tm.test_shared_expert_output_is_reduced_exactly_once, ("fused", 2, {"pp": 2})),
            (tm.test_shared_expert_output_is_reduced_exactly_once, ("control", 2, {"dp": 2})),
            (tm.test_patched_forward_with_the_release_ffn, ()))),
    Mutant("norm-recognised-by-class-name-alone", HELPER,
           "return cls.__name__ == _M3_NORM_CLASS and cls.__module__ == _M3_NORM_MODULE",
           "return cls.__name__ == _M3_NORM_CLASS",
           ((tm.test_nvidia_norm_of_the_same_name_takes_the_unpatched_path, ("fused",)),)),
    Mutant("eagle3-capture-not-reduced", MODEL, CAPTURE_REDUCE, "                    partial = False\n",
           ((tm.test_patched_forward_matches_pristine_and_float64, (2, AUX)),
            (tm.test_model_forward_structure, ()))),
    Mutant("use-1stage-true", HELPER, "        use_1stage=False,\n    )", "        use_1stage=True,\n    )",
           ((tm.test_aiter_call_arguments_and_registered_follows_capture, ()),
            (tm.test_helper_modes_match_float64_reference, (2, "fused")))),
    Mutant("w-is-weight-not-weight-plus-1", HELPER, "        w=gamma,\n", "        w=norm.weight,\n",
           ((tm.test_helper_modes_match_float64_reference, (2, "fused")),)),
    Mutant("gemma-offset-applied-twice", HELPER, "        use_1stage=False,\n    )",
           "        use_1stage=False,\n        gemma_norm=True,\n    )",
           ((tm.test_helper_modes_match_float64_reference, (4, None)),)),
    Mutant("deferral-on-at-pp2", HELPER, PP_CLAUSE, "",
           ((tm.test_deferral_predicate, ("control", 2, 2, 1, False)),
            (tm.test_no_deferral_at_pp_or_dp_builds_reducing_layers, ({"pp": 2},)))),
    Mutant("mtp-layer-defers", MODEL, "        defer_ffn_all_reduce: bool = False,\n",
           "        defer_ffn_all_reduce: bool = True,\n",
           ((tm.test_mtp_style_layer_reduces_its_ffn, ()),)),
    Mutant("final-norm-plain", MODEL, FINAL_NORM, "            hidden_states, _ = self.norm(hidden_states, residual)",
           ((tm.test_patched_forward_matches_pristine_and_float64, (2, NO_AUX)),)),
    Mutant("input-norm-never-fused", MODEL, "fuse_input_allreduce=partial", "fuse_input_allreduce=False",
           ((tm.test_patched_forward_matches_pristine_and_float64, (2, NO_AUX)),)),
    Mutant("gamma-first-computed-in-capture", HELPER,
           "        if torch.cuda.is_current_stream_capturing():\n            return None\n", "",
           ((tm.test_gamma_is_never_first_computed_inside_a_capture, ()),)),
    Mutant("routed-experts-keep-reducing", MODEL,
           "            reduce_results=reduce_results,\n            prefix=f\"{prefix}.experts\",",
           "            prefix=f\"{prefix}.experts\",",
           ((tm.test_shared_expert_output_is_reduced_exactly_once, ("control", 2, {})),),
           applies=lambda r: r.moe_defer_knob == "reduce_results"),
    Mutant("runner-subclass-reduces-anyway", MODEL,
           "        return states[..., :trunc_size] if trunc_size is not None else states\n\n\nclass MiniMaxM3MoE",
           "        return tensor_model_parallel_all_reduce(states[..., :trunc_size] if trunc_size is not None "
           "else states)\n\n\nclass MiniMaxM3MoE",
           ((tm.test_shared_expert_output_is_reduced_exactly_once, ("control", 2, {})),),
           applies=lambda r: r.moe_defer_knob == "runner_cls"),
    Mutant("control-takes-upstream-one-stage-branch", HELPER, '    if m3_mode != "off":\n', "    if False:\n",
           ((tm.test_helper_modes_match_float64_reference, (2, "control")),),
           applies=lambda r: r.upstream_aiter_branch),
    Mutant("registered-ignores-enable-register-for-capturing", HELPER,
           'registered = torch.cuda.is_current_stream_capturing() and getattr(\n'
           '        ca, "enable_register_for_capturing", True\n    )',
           "registered = torch.cuda.is_current_stream_capturing()",
           ((tm.test_registered_is_off_when_the_communicator_does_not_register, ()),),
           applies=lambda r: r.capture_registration_optional),
    Mutant("imports-a-name-the-release-lacks", MODEL, "    tensor_model_parallel_all_reduce,\n)",
           "    tensor_model_parallel_all_reduce_fused,\n)",
           ((tm.test_patches_import_only_what_the_release_defines, ()),)),
    Mutant("calls-an-aiter-op-the-release-lacks", HELPER, "    wrapper = rocm_aiter_ops.get_aiter_allreduce()\n    if wrapper is None:\n        raise",
           "    wrapper = rocm_aiter_ops.get_custom_allreduce()\n    if wrapper is None:\n        raise",
           ((tm.test_helper_calls_only_aiter_apis_the_release_has, ()),),
           applies=lambda r: r.aiter_api == "wrapper"),
    Mutant("specialized-decode-defers", MODEL,
           "            self.specialized_decode_config is None\n            and m3_defer_ffn_all_reduce(vllm_config)",
           "            m3_defer_ffn_all_reduce(vllm_config)",
           ((tm.test_specialized_decode_refuses_deferral, ()),),
           applies=lambda r: r.specialized_decode),
]


def _params():
    return [pytest.param(m, r, id=f"{m.id}-{r.name}") for m in MUTANTS for r in ROWS if m.applies(r)]


def test_every_mutant_applies_somewhere():
    assert all(any(m.applies(r) for r in ROWS) for m in MUTANTS)
    assert len({m.id for m in MUTANTS}) == len(MUTANTS)


@pytest.mark.parametrize("mutant,fs", _params())
def test_mutant_is_caught(mutant: Mutant, fs: Row):
    text = committed_patched_text(fs, mutant.file)
    assert text.count(mutant.old) == 1, f"{fs.name}: the planted bug's anchor is not in {mutant.file} once"
    bad = text.replace(mutant.old, mutant.new)
    compile(bad, mutant.file, "exec")  # a planted bug, not a syntax error
    survivors = []
    with override_source(fs, mutant.file, bad):
        for test, args in mutant.killers:
            try:
                test(fs, *args)
            except Exception:  # noqa: BLE001 - the matrix test failed: the mutant is caught
                continue
            survivors.append(f"{test.__name__}{args!r}")
    assert not survivors, f"{mutant.id} on {fs.name} survives {survivors}"
