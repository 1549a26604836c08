"""The fusion test matrix's table of facts: one row per patch set under patches/.

Adding a set means adding a row here; tests/test_fusion_matrix.py fails while a folder under
patches/ has no row (and while a row names no folder), and checks every fact below against the
release's real files, so a row cannot claim what its release does not have.

Facts, read off the real release files (cached wheels, tests/realvllm.py):
- `versions`: the releases the set lists (its manifest's vllm-versions); the behavioural tests
  run on the first, the pins are checked on all (0.25.0/0.25.1 and 0.27.0/0.27.1 ship the same
  two files).
- `aiter_api`: "raw" (0.24.0: `rocm_aiter_ops.initialize_aiter_allreduce(group, device)`,
  `get_aiter_allreduce()` returns AITER's own CustomAllreduce) or "wrapper" (0.25+: the TP
  device communicator owns vLLM's AiterCustomAllreduce, raw object at `.aiter_ca`).
- `upstream_aiter_branch`: the pristine helper has vLLM's own one-stage AITER branch
  (`_can_use_aiter_fused_ar_rms`, `get_fused_allreduce_rmsnorm_op()(..., gemma_norm=True)`)
  and imports `vllm.platforms.current_platform` (0.30+).
- `moe_factory`: the routed-experts constructor M3's MoE calls (FusedMoE up to 0.26.0,
  FusedMoEFactory from 0.27.0; both factory functions in fused_moe/layer.py).
- `moe_defer_knob`: how the patched MoE skips the runner's final all-reduce: "runner_cls"
  (0.24.0's FusedMoE has no reduce_results: a MoERunner subclass) or "reduce_results"
  (resolves to FusedMoEConfig.skip_final_all_reduce).
- `runner_output_is_reduced_arg`: MoERunner._maybe_reduce_final_output takes
  `output_is_reduced` (0.27+).
- `shared_expert_fusion`: how M3's MoE decides whether the shared expert is folded into the
  routed call: None (0.24.0: never), "helper" (0.25-0.28: `_fuse_shared_experts_enabled(config)`),
  "resolved" (0.29+: `is_fused_shared_expert_enabled` + `fuse_shared_experts=` on the factory and
  `is_model_fused_shared_expert_compatible` in the model).
- `specialized_decode`: the model has the monokernel decode path (0.33.0).
- `has_pp`: MiniMaxM3Model.forward takes `intermediate_tensors` (0.25+).
- `layer_extra_args`: MiniMaxM3DecoderLayer.__init__ parameters beyond 0.24.0's.
- `pass_config_enable_sp`: PassConfig has `enable_sp` (removed in 0.32.0).
- `capture_registration_optional`: vLLM may build AITER's CustomAllreduce with
  `enable_register_for_capturing=False` (cuMem graph pool; aiter_custom_all_reduce.py's
  `register_graph_buffers`, 0.32+): then `registered=True` is wrong inside a capture.
- `mtp_sha256`: amd/mtp.py as shipped (never patched).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PATCHES = REPO / "patches"

MTP_024 = "710c2f3a9e09a97e08a64ce78982f13ce2531f7e1b8f9c9ea190d12e74741e56"
MTP_027 = "a4ff54359a5579e7585e839fae09857fe64d72e1942d4464142356a971541d03"
MTP_032 = "6a2dcbf7cbeaf7355ba24f861c1a1ca40c4a4cf957dd4fee48a46a52ffeca699"
MTP_033 = "a16c37ef4920acb49d20c2ddf90d112d016960c82d888190781a591657ffcd4a"


@dataclass(frozen=True)
class Row:
    name: str  # patches/<name>
    versions: tuple[str, ...]
    aiter_api: str  # "raw" | "wrapper"
    upstream_aiter_branch: bool
    moe_factory: str  # "FusedMoE" | "FusedMoEFactory"
    moe_defer_knob: str  # "runner_cls" | "reduce_results"
    runner_output_is_reduced_arg: bool
    shared_expert_fusion: str | None  # None | "helper" | "resolved"
    specialized_decode: bool
    has_pp: bool
    layer_extra_args: tuple[str, ...]
    pass_config_enable_sp: bool
    capture_registration_optional: bool
    mtp_sha256: str

    @property
    def version(self) -> str:
        """The release the behavioural tests run on."""
        return self.versions[0]

    @property
    def dir(self) -> Path:
        return PATCHES / self.name


def _row(name, versions, *, api="wrapper", upstream=False, factory="FusedMoEFactory",
         knob="reduce_results", out_arg=True, sef="resolved", spec=False, pp=True,
         extra=(), enable_sp=True, reg_optional=False, mtp=MTP_027) -> Row:
    return Row(name, tuple(versions), api, upstream, factory, knob, out_arg, sef, spec, pp,
               tuple(extra), enable_sp, reg_optional, mtp)


SPARSE_TABLE = ("sparse_table_buffers",)
MSA_033 = ("msa_indexer_impl_cls", "sparse_bt_buffer", "sparse_ctx_buffer", "indexer_cp")

ROWS: list[Row] = [
    _row("vllm-0.24.0", ["0.24.0"], api="raw", factory="FusedMoE", knob="runner_cls",
         out_arg=False, sef=None, pp=False, mtp=MTP_024),
    _row("vllm-0.25.x", ["0.25.0", "0.25.1"], factory="FusedMoE", out_arg=False, sef="helper",
         mtp=MTP_024),
    _row("vllm-0.26.0", ["0.26.0"], factory="FusedMoE", out_arg=False, sef="helper", mtp=MTP_024),
    _row("vllm-0.27.x", ["0.27.0", "0.27.1"], sef="helper"),
    _row("vllm-0.28.0", ["0.28.0"], sef="helper"),
    _row("vllm-0.29.0", ["0.29.0"]),
    _row("vllm-0.30.0", ["0.30.0"], upstream=True, extra=SPARSE_TABLE),
    _row("vllm-0.31.0", ["0.31.0"], upstream=True, extra=SPARSE_TABLE),
    _row("vllm-0.32.0", ["0.32.0"], upstream=True, extra=SPARSE_TABLE, enable_sp=False,
         reg_optional=True, mtp=MTP_032),
    _row("vllm-0.33.0", ["0.33.0"], upstream=True, spec=True, extra=MSA_033, enable_sp=False,
         reg_optional=True, mtp=MTP_033),
]
ROW_IDS = [r.name for r in ROWS]


def rows_where(pred) -> list[Row]:
    """The rows a fact applies to (cases that do not apply are not generated)."""
    return [r for r in ROWS if pred(r)]


def row(name: str) -> Row:
    return next(r for r in ROWS if r.name == name)
