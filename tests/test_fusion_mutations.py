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
import test_fixes_runtime as fx
import test_fusion_capture as fc
import test_fusion_records as fre
import test_fusion_reload as fr
import test_fusion_matrix as tm
import test_reader_values as rv
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
    # Issue 24: a new reader of every layer's output, merged into upstream's loop only.
    Mutant("new-reader-in-upstreams-loop-only", MODEL,
           "                hidden_states, residual = layer(positions, hidden_states, residual)\n",
           "                hidden_states, residual = layer(positions, hidden_states, residual)\n"
           "                self._maybe_extract_hidden_state(extracted, idx + 1, hidden_states)\n",
           ((tm.test_model_forward_structure, ()),)),
    Mutant("pp-hand-off-sends-a-partial", MODEL,
           "                # to the next stage must carry reduced hidden states.\n"
           "                hidden_states = tensor_model_parallel_all_reduce(hidden_states)\n",
           "                # to the next stage must carry reduced hidden states.\n                pass\n",
           ((rv.test_the_pp_hand_off_sends_the_releases_values, ()),),
           applies=lambda r: r.has_pp),
    Mutant("use-1stage-true", HELPER, "        use_1stage=use_1stage,\n    )", "        use_1stage=True,\n    )",
           ((tm.test_aiter_call_arguments_and_registered_follows_capture, ()),
            (tm.test_helper_modes_match_float64_reference, (2, "fused")))),
    Mutant("w-is-weight-not-weight-plus-1", HELPER, "        w=gamma,\n", "        w=norm.weight,\n",
           ((tm.test_helper_modes_match_float64_reference, (2, "fused")),)),
    Mutant("gemma-offset-applied-twice", HELPER, "        use_1stage=use_1stage,\n    )",
           "        use_1stage=use_1stage,\n        gemma_norm=True,\n    )",
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
           "    if torch.cuda.is_current_stream_capturing():\n        return None\n    if _m3_is_fake", "    if _m3_is_fake",
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
    Mutant("control-takes-upstream-one-stage-branch", HELPER, '\n    if m3_mode != "off":\n', "\n    if False:\n",
           ((tm.test_helper_modes_match_float64_reference, (2, "control")),),
           applies=lambda r: r.upstream_aiter_branch),
    Mutant("registered-ignores-enable-register-for-capturing", HELPER,
           '        and getattr(ca, "enable_register_for_capturing", True)\n', "",
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
           "            self.specialized_decode_config is None\n            and ", "            ",
           ((tm.test_specialized_decode_refuses_deferral, ()),),
           applies=lambda r: r.specialized_decode),
    # 0.34.0's review: mono decode reads a dense layer's output as reduced; the decoder layer's
    # normed attention input is `attn_input` (binding hidden_states instead compiles and then
    # raises UnboundLocalError); the MXFP8 input norm has no all-reduce.
    Mutant("deferral-on-under-mono", MODEL, "            and not mono_envs.MONO_ENABLE\n", "",
           ((tm.test_mono_decode_turns_deferral_off, ()),),
           applies=lambda r: r.mono_decode),
    Mutant("attn-input-trap", MODEL,
           "            attn_input, residual = fused_allreduce_gemma_rms_norm(\n"
           "                hidden_states, residual, self.input_layernorm",
           "            hidden_states, residual = fused_allreduce_gemma_rms_norm(\n"
           "                hidden_states, residual, self.input_layernorm",
           ((tm.test_patched_forward_matches_pristine_and_float64, (2, NO_AUX)),),
           applies=lambda r: r.attn_input == "attn_input"),
    Mutant("mxfp8-input-norm-reads-a-partial", MODEL, "        if fuse_input_allreduce:\n",
           "        if fuse_input_allreduce and not self.fuse_input_norm_mxfp8:\n",
           ((tm.test_mxfp8_norms_never_take_a_partial, ("control",)),
            (tm.test_mxfp8_norms_never_take_a_partial, ("fused",))),
           applies=lambda r: r.mxfp8_norms),
]


# Issue 18: the three defects' fixes, the run-time checks, the provenance and the Ray code.
GAMMA_COPY = "        gamma.copy_((src + 1.0).to(gamma.dtype))\n"
STAMP_CHECK = ("    if gamma is not None and state.get(_M3_GAMMA_STAMP) == (\n        weight.data_ptr(),\n"
               "        weight._version,\n    ):\n")
UPSTREAM = lambda r: r.upstream_aiter_branch  # noqa: E731
MUTANTS += [
    Mutant("stale-gamma-never-refreshed", HELPER, GAMMA_COPY, "        src = src\n",
           ((fx.test_gamma_follows_a_weight_update_in_place, ("load_weights",)),
            (fx.test_gamma_follows_a_weight_update_in_place, ("param.copy_",)))),
    Mutant("stale-gamma-norm-loader-does-not-refresh", MODEL, "        m3_refresh_gamma(self, param)\n", "",
           ((fx.test_weight_loader_refreshes_before_any_eager_call, ()),
            (fx.test_gamma_follows_a_weight_update_in_place, ("load_weights",)))),
    Mutant("stale-gamma-kernel-reload-hook-does-not-refresh", MODEL,
           "        # weight loader, so the cached weight + 1 is refreshed here too.\n        m3_refresh_gamma(self)\n",
           "        # weight loader, so the cached weight + 1 is refreshed here too.\n        pass\n",
           ((fx.test_a_kernel_format_reload_refreshes_gamma_before_any_eager_call, ()),),
           applies=lambda r: r.reload_hooks),
    Mutant("stale-gamma-version-stamp-ignored", HELPER, STAMP_CHECK, "    if gamma is not None:\n",
           ((fx.test_gamma_follows_a_weight_update_in_place, ("param.copy_",)),
            (fr.test_every_reload_engine_of_the_release_refreshes_the_fused_gamma_in_place, ("kernel-format",))),
           applies=lambda r: not r.reload_hooks),
    Mutant("gamma-replaced-not-rewritten", HELPER, GAMMA_COPY,
           "        norm.__dict__[_M3_GAMMA_ATTR][(gamma.device, gamma.dtype)] = (src + 1.0).to(gamma.dtype)\n",
           ((fx.test_gamma_follows_a_weight_update_in_place, ("load_weights",)),)),
    Mutant("fused-at-any-world-size", HELPER, "    if tp not in M3_AITER_FUSED_WORLD_SIZES:\n", "    if False:\n",
           ((fx.test_fused_refuses_a_world_size_the_fused_kernel_cannot_run, (6,)),)),
    Mutant("registered-ignores-aiters-capture-flag", HELPER, '        and getattr(ca, "_IS_CAPTURING", False)\n', "",
           ((fx.test_registered_needs_aiters_own_capture_flag, ()),)),
    Mutant("deferral-on-under-context-parallelism", HELPER,
           '        if size != 1:\n            return f"{tag}={size}"\n', "",
           ((fx.test_context_parallelism_turns_deferral_off, (2, 1, "PCP=2")),
            (fx.test_context_parallelism_turns_deferral_off, (1, 2, "DCP=2")))),
    Mutant("ray-any-prefix-list-accepted", HELPER, "        M3_AR_RMS_MODE_ENV.startswith(p)\n",
           "        bool(p)\n",
           ((fx.test_ray_prefix_list_must_cover_the_modes_name, ("M3_X", False)),)),
    Mutant("ray-executor-class-not-seen", HELPER,
           '    if getattr(pc, "use_ray", False) or backend == "ray":\n', '    if backend == "ray":\n',
           ((fx.test_ray_executor_given_as_a_class_is_refused, ("class",)),)),
    Mutant("record-written-in-place", HELPER,
           '        fd, tmp = tempfile.mkstemp(\n'
           '            prefix=".m3fuse-run-", suffix=".json", dir=os.path.dirname(target)\n'
           '        )\n',
           '        fd, tmp = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), target\n',
           ((fx.test_the_record_is_replaced_atomically, ()),)),
    Mutant("record-rank-check-tp-only", HELPER, "    if path and rank == (0, 0, 0):\n",
           "    if path and rank[0] == 0:\n",
           ((fx.test_only_rank_0_0_0_writes_the_record, ((0, 1, 0), False)),
            (fx.test_only_rank_0_0_0_writes_the_record, ((0, 0, 1), False)))),
    Mutant("fused-path-ready-before-init", HELPER, '"ready" if _m3_aiter_ready else "not ready"', '"ready"',
           ((fx.test_fused_path_is_not_ready_before_initialisation, ()),)),
    Mutant("passthrough-keeps-deferral", HELPER,
           '    if getattr(parallel_config, "all2all_backend", None) == "passthrough":\n',
           "    if False:\n",
           ((fx.test_all2all_passthrough_turns_deferral_off, ("passthrough", "all2all backend passthrough")),),
           applies=UPSTREAM),
    Mutant("gate-takes-non-contiguous-residual", HELPER, "        or not residual.is_contiguous()\n", "",
           ((fx.test_non_contiguous_residual_takes_the_explicit_path, ("strided",)),)),
    Mutant("compile-modes-1-2-refused", HELPER, "!= 3:  # CompilationMode.VLLM_COMPILE", "== 0:",
           ((fx.test_compile_pass_check_only_at_vllm_compile, (1, False)),
            (fx.test_compile_pass_check_only_at_vllm_compile, (2, False))),
           applies=UPSTREAM),
    Mutant("off-refusal-skipped", HELPER, '    why = _m3_off_refusal() if mode == "off" else None\n',
           "    why = None\n",
           ((fx.test_off_with_the_pinned_aiter_refused_unless_custom_ar_is_off, (True, True)),),
           applies=UPSTREAM),
    Mutant("report-not-once-per-rank", HELPER, "    if rank in _m3_reported:\n        return facts\n", "",
           ((fx.test_one_line_per_rank_per_process, ()),)),
    Mutant("kwargs-op-lacks-gemma-norm", HELPER, ' or p.kind is p.VAR_KEYWORD', '',
           ((fx.test_an_op_taking_kwargs_has_gemma_norm, (fx.KwargsAiterCA, False)),)),
]


# Issue 23: the reloads vLLM's own code drives, vLLM's own capture context, and what the run
# record says ran (per boundary kind and batch bucket, MXFP8 and mono provenance).
MXFP8 = lambda r: r.mxfp8_norms  # noqa: E731
MUTANTS += [
    Mutant("gamma-refreshed-from-a-meta-weight", HELPER,
           "    if not _m3_holds_data(w):\n        # The layerwise", "    if False:\n        # The layerwise",
           ((fr.test_every_reload_engine_of_the_release_refreshes_the_fused_gamma_in_place, ("layerwise",)),
            (fr.test_layerwise_reload_of_the_whole_patched_model, ()),
            (fr.test_tensors_without_data_never_reach_the_gamma_cache, ()))),
    Mutant("gamma-cached-from-a-trace", HELPER, "    if _m3_is_fake(like) or not _m3_holds_data(weight):\n",
           "    if False:\n",
           ((fr.test_tensors_without_data_never_reach_the_gamma_cache, ()),)),
    Mutant("stale-gamma-never-warned", HELPER, "            _m3_warn_stale_gamma()\n", "            pass\n",
           ((fr.test_every_reload_engine_of_the_release_refreshes_the_fused_gamma_in_place, ("kernel-format",)),),
           applies=lambda r: not r.reload_hooks),
    Mutant("reload-hook-does-not-refresh-under-vllms-reload", MODEL,
           "        # weight loader, so the cached weight + 1 is refreshed here too.\n        m3_refresh_gamma(self)\n",
           "        # weight loader, so the cached weight + 1 is refreshed here too.\n        pass\n",
           ((fr.test_every_reload_engine_of_the_release_refreshes_the_fused_gamma_in_place, ("kernel-format+hooks",)),),
           applies=lambda r: r.reload_hooks),
    Mutant("registered-outside-vllms-capture-context", HELPER, '        and getattr(ca, "_IS_CAPTURING", False)\n', "",
           ((fc.test_registered_follows_vllms_own_graph_capture_context, ()),)),
    Mutant("record-off-hides-vllms-one-stage-op", HELPER,
           "    if not _m3_vllm_passes_gemma_norm() or hidden is None:\n", "    if True:\n",
           ((fre.test_off_with_the_custom_all_reduce_on_runs_vllms_one_stage_op_at_small_batches, ()),
            (fre.test_the_record_names_what_ran_per_boundary_and_bucket, ("off", True, False, 8))),
           applies=UPSTREAM),
    Mutant("record-fused-claims-every-batch", HELPER,
           "            (M3_AITER_MAX_TOKENS, M3_RUNS_AITER_2STAGE),\n", "            (None, M3_RUNS_AITER_2STAGE),\n",
           ((fre.test_the_record_names_what_ran_per_boundary_and_bucket, ("fused", True, False, 600)),)),
    Mutant("mxfp8-handed-to-fused-above-512", HELPER,
           '            if m3_mode in _M3_FUSED_MODES and _m3_fused_gamma(\n                hidden_states, residual, norm\n'
           '            ) is not None:\n',
           '            if m3_mode in _M3_FUSED_MODES:\n',
           ((fre.test_the_record_names_what_ran_per_boundary_and_bucket, ("fused", True, True, 600)),),
           applies=MXFP8),
    Mutant("record-mxfp8-boundary-count-as-plain-norm", HELPER, "    return {k: plain.get(v, v) for k, v in runs.items()}\n",
           "    return runs\n",
           ((fre.test_the_record_names_what_ran_per_boundary_and_bucket, ("control", True, True, 8)),
            (tm.test_mxfp8_norms_never_take_a_partial, ("control",))),
           applies=MXFP8),
    Mutant("control-mxfp8-step-drops-the-quant-epilogue", HELPER,
           '            if m3_mode in _M3_FUSED_MODES and _m3_fused_gamma(\n',
           '            if m3_mode != "off" or _m3_fused_gamma(\n',
           ((tm.test_mxfp8_norms_never_take_a_partial, ("control",)),
            (fre.test_the_record_names_what_ran_per_boundary_and_bucket, ("control", True, True, 8))),
           applies=MXFP8),
    Mutant("mono-refused-recorded-as-on", MODEL, '    if getattr(mono, "_enabled", False):\n', "    if True:\n",
           ((fre.test_mono_requested_but_refused_says_why_after_vllm_decided, (2, "TP 2 != 4")),
            (tm.test_mono_decode_turns_deferral_off, ())),
           applies=lambda r: r.mono_decode),
]


# Issue 23, item 5: the explicit one-stage A/B arm (fused-1stage).
MUTANTS += [
    Mutant("one-stage-without-rocm-aiter-4346", HELPER, '    if "ROCm/aiter#4346" in defects:\n        return (\n',
           "    if False:\n        return (\n",
           ((fre.test_fused_1stage_refused_without_rocm_aiter_4346,
             ("0.1.18", "AITER 0.1.18 lacks the fused one-stage kernel's exit barrier")),),
           applies=UPSTREAM),
    Mutant("one-stage-with-an-unknown-aiter", HELPER, "    if defects is None:\n        have = ",
           "    if defects is None:\n        return None\n        have = ",
           ((fre.test_fused_1stage_refused_without_rocm_aiter_4346,
             (None, "the installed AITER's version is unknown")),),
           applies=UPSTREAM),
    Mutant("one-stage-above-vllms-size-rule", HELPER,
           "        one_stage and _m3_one_stage_ready and _m3_one_stage_admits(hidden_states)\n",
           "        one_stage and _m3_one_stage_ready\n",
           ((tm.test_fused_1stage_runs_the_one_stage_kernel_exactly_where_vllms_rule_admits, (4,)),
            (fre.test_the_record_names_what_ran_per_boundary_and_bucket, ("fused-1stage", True, False, 200))),
           applies=UPSTREAM),
    # (one_stage=True in plain fused is not planted: _m3_one_stage_ready, set only when
    # construction checked fused-1stage, keeps it two-stage; the "use-1stage-true" mutant
    # plants the kernel choice itself.)
    Mutant("one-stage-arm-runs-two-stage", HELPER, "one_stage=m3_mode == M3_MODE_1STAGE", "one_stage=False",
           ((fre.test_fused_1stage_record_names_both_kernels_by_vllms_rule, ()),
            (tm.test_fused_1stage_runs_the_one_stage_kernel_exactly_where_vllms_rule_admits, (2,))),
           applies=UPSTREAM),
    Mutant("one-stage-arm-on-a-release-without-the-rule", HELPER,
           "    if not _m3_vllm_passes_gemma_norm():\n        return (\n            \"this vLLM has no one-stage rule",
           "    if False:\n        return (\n            \"this vLLM has no one-stage rule",
           ((tm.test_fused_1stage_runs_the_one_stage_kernel_exactly_where_vllms_rule_admits, (2,)),),
           applies=lambda r: not r.upstream_aiter_branch),
    Mutant("record-one-stage-bucket-missing", HELPER, "            (one, M3_RUNS_AITER_1STAGE),\n", "",
           ((fre.test_fused_1stage_record_names_both_kernels_by_vllms_rule, ()),
            (fre.test_the_record_names_what_ran_per_boundary_and_bucket, ("fused-1stage", True, False, 8))),
           applies=UPSTREAM),
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
            # pytest.raises reports a missing exception with pytest's Failed (not an Exception)
            except (Exception, pytest.fail.Exception):  # noqa: BLE001 - the test failed: caught
                continue
            survivors.append(f"{test.__name__}{args!r}")
    assert not survivors, f"{mutant.id} on {fs.name} survives {survivors}"
