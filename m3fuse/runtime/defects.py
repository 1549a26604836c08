"""Known AITER defects that bite the M3 fusion or the vLLM around it, as plain data, and which
AITER a target has or will get.

Every row was read off ROCm/aiter's git history: the affected range is where the fix's code is
absent from `csrc/include/custom_all_reduce.cuh` (or `aiter/dist/device_communicators/
custom_all_reduce.py`) at each release tag, the fixed version the first tag that has it. A
build between tags (``0.1.16.dev3+g...``) compares below the next tag and is reported as
affected: a version number cannot say which commits a development build has.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

AITER_DIST = "amd-aiter"


@dataclass(frozen=True)
class Defect:
    id: str  # how upstream names it, e.g. "ROCm/aiter#3514"
    url: str
    defect: str  # what is wrong in AITER
    introduced: str | None  # first affected AITER version; None: every known version
    fixed: str | None  # first AITER release with the fix; None: still open
    consequence: str  # what a user of m3fuse sees
    vllm_from: str | None = None  # bites only with vLLM at or above this release; None: all

    @property
    def affected(self) -> str:
        low = f">={self.introduced}" if self.introduced else ""
        high = f"<{self.fixed}" if self.fixed else ""
        return ", ".join(p for p in (low, high) if p) or "all known versions"


DEFECTS: tuple[Defect, ...] = (
    Defect(
        id="ROCm/aiter#3514",
        url="https://github.com/ROCm/aiter/pull/3514",
        defect=("the plain one-stage all-reduce kernel (cross_device_reduce_1stage) has no exit barrier "
                "(end_sync); lost in v0.1.12 by #2064's double-buffer change"),
        introduced="0.1.12",
        fixed="0.1.16",
        consequence=(
            "under HIP graph replay a fast rank can leave the kernel while a slower rank still reads its "
            "input over IPC; the buffer is reused and the slow rank reads garbage (NaN/Inf). From vLLM "
            "0.25.0 with VLLM_ROCM_USE_AITER=1 every small plain all-reduce goes there, in every "
            "M3_AITER_AR_RMS_MODE: <= 6 tokens at TP8, <= 13 at TP4, always at TP2 (M3, bf16)"),
    ),
    Defect(
        id="ROCm/aiter#4346",
        url="https://github.com/ROCm/aiter/pull/4346",
        defect=("the fused one-stage all-reduce + RMSNorm kernels (allreduce_fusion_kernel_1stage and "
                "its quant variants) have no exit barrier (end_sync); the kernel first ships in v0.1.10.post2"),
        introduced="0.1.10.post2",
        fixed="0.1.19.post1",
        consequence=(
            "silent cross-request corruption when a fused one-stage call reuses a buffer a peer still "
            "reads. m3fuse's sets always ask for the two-stage kernel (use_1stage=False), but vLLM's own "
            "code reaches the one-stage kernel: its AR+RMS compile pass (0.24.0/0.26.0, <= 80 tokens) and "
            "the unpatched helper's one-stage branch (0.30.0+, `off` mode)"),
    ),
    Defect(
        id="ROCm/aiter#4082",
        url="https://github.com/ROCm/aiter/pull/4082",
        defect=("the custom all-gather and reduce-scatter kernels (all_gather_unreg, reduce_scatter) return "
                "without an exit barrier (#4082 \"synchronize custom collectives before return\" adds it; "
                "released with #4346)"),
        introduced=None,
        fixed="0.1.19.post1",
        consequence=(
            "vLLM 0.30.0+ sends data-parallel all-gathers and reduce-scatters (DP 2/4/8 with the AITER "
            "custom all-reduce on, FULL graphs, uniform batches: cuda_communicator.py "
            "_can_use_aiter_ag_rs) to AITER's custom_all_gather/custom_reduce_scatter, and 0.34.0+ also "
            "routes TP all-gathers (the logits, every step) to its all_gather_unreg on CDNA3/4, in every "
            "M3_AITER_AR_RMS_MODE (fused and control alike): a fast rank can reuse the buffer a peer "
            "still reads, so outputs can be silently wrong (ROCm/aiter#4855 at TP8 on MI300X was closed "
            "as fixed by #4346 + #4082)"),
        vllm_from="0.30.0",
    ),
    Defect(
        id="ROCm/aiter#4888",
        url="https://github.com/ROCm/aiter/issues/4888",
        defect="on MI300X the one-stage all-reduce kernel can give a wrong result on the first replay after idle",
        introduced=None,
        fixed=None,
        consequence=("open upstream, no fixed release: any path that runs a one-stage kernel (small plain "
                     "all-reduces from vLLM 0.25.0, vLLM's one-stage fused branches) is exposed"),
    ),
    Defect(
        id="ROCm/aiter#3792",
        url="https://github.com/ROCm/aiter/pull/3792",
        defect="CustomAllreduce.custom_fused_ar_rms has no gemma_norm parameter (added in #3792, v0.1.17)",
        introduced=None,
        fixed="0.1.17",
        consequence=(
            "vLLM 0.30.0+ passes gemma_norm=True from the unpatched helper's one-stage branch (TP8: <= 10 "
            "tokens) and from its AR+RMS compile pass (on by default for any torch.compiled model, e.g. an "
            "EAGLE3 draft head): a TypeError at the first graph capture. `m3fuse env off` sets "
            "VLLM_ROCM_USE_AITER_CUSTOM_AR=0 on those releases for this reason"),
        vllm_from="0.30.0",
    ),
)

NO_GEMMA_NORM = "ROCm/aiter#3792"
# With either, the patched model refuses `off` on vLLM 0.30.0+ unless AITER's custom all-reduce
# is off (the patch's m3_check_runtime); `m3fuse env off` sets it off there.
OFF_BLOCKERS = (NO_GEMMA_NORM, "ROCm/aiter#4346")


def _version(text: str) -> Any:
    from packaging.version import InvalidVersion, Version  # only once an AITER was found

    try:
        return Version(text)
    except InvalidVersion:
        return None


def affecting(aiter_version: str | None, vllm_version: str | None = None) -> list[Defect]:
    """The rows that apply to `aiter_version` (with `vllm_version`, when known). An AITER
    whose version cannot be read (missing, not PEP 440) is affected by every row: nothing says
    it has a fix."""
    v = _version(aiter_version) if aiter_version else None
    vv = _version(vllm_version) if vllm_version else None
    out = []
    for d in DEFECTS:
        if d.vllm_from and vv is not None and vv < _version(d.vllm_from):
            continue
        if v is not None:
            if d.introduced and v < _version(d.introduced):
                continue
            if d.fixed and v >= _version(d.fixed):
                continue
        out.append(d)
    return out


def to_json(defects: list[Defect]) -> list[dict[str, Any]]:
    return [{"id": d.id, "url": d.url, "defect": d.defect, "affected": d.affected,
             "first_fixed": d.fixed, "consequence": d.consequence, "vllm_from": d.vllm_from}
            for d in defects]


def report(aiter_version: str | None, source: str, vllm_version: str | None = None) -> dict[str, Any]:
    """The `aiter` object of `install --json` / `verify --json`: which AITER, where that was
    read, and the defects that apply to it."""
    found = affecting(aiter_version, vllm_version) if aiter_version else []
    return {"version": aiter_version, "source": source, "defects": to_json(found)}


def describe(rep: dict[str, Any]) -> list[str]:
    """Human lines for `report(...)`; empty when nothing applies or no AITER is known."""
    if not rep["version"]:
        return []
    lines = []
    for d in rep["defects"]:
        fix = f"fixed in v{d['first_fixed']}" if d["first_fixed"] else "no fixed release yet"
        lines.append(f"AITER {rep['version']} ({rep['source']}) has {d['id']}: {d['defect']}; {fix}. "
                     f"Consequence: {d['consequence']}.")
    fixes = [d["first_fixed"] for d in rep["defects"] if d["first_fixed"]]
    if fixes:
        newest = max(fixes, key=_version)
        lines.append(f"AITER {rep['version']}: an AITER >= {newest} has every fix above; pin one with "
                     f"`m3fuse lock add URL --lock FILE`, then `m3fuse install --lock FILE`.")
    return lines


def dist_version(root: Path, dist: str = AITER_DIST) -> str | None:
    """Version of `dist` installed in the site-packages directory `root` (from its dist-info's
    METADATA, as pip wrote it), or None. One directory listing: `verify --no-wheels` calls it."""
    from ..target import dist_info

    return dist_info(Path(root), dist)[1]


def pinned_version(lock_path: Path, dist: str = AITER_DIST) -> str | None:
    """The version `m3fuse install` will put in, from the lock (None: the lock pins no AITER)."""
    from ..wheels.lock import load_lock

    for p in load_lock(lock_path).packages:
        if p.name.replace("_", "-").lower() == dist:
            return p.version
    return None


def pinned_report(lock_path: Path, vllm_version: str | None) -> dict[str, Any]:
    return report(pinned_version(lock_path), f"pinned in {Path(lock_path).name}", vllm_version)


def planned_report(wheels: list[dict[str, Any]], lock_path: Path, vllm_version: str | None) -> dict[str, Any]:
    """The report for the AITER the wheel step leaves installed: a kept build (newer than the
    pin, or the one the release needs) by its own version, else the pin. With no AITER row
    (the lock pins none) the pin, as before."""
    row = next((r for r in wheels if str(r.get("name", "")).replace("_", "-").lower() == AITER_DIST), None)
    if row is None:
        return pinned_report(lock_path, vllm_version)
    if row.get("action") == "keep" and row.get("reason"):
        return report(row.get("installed_version"), "installed, kept by the wheel step", vllm_version)
    return report(row.get("pinned_version"), f"pinned in {Path(lock_path).name}", vllm_version)


def installed_report(root: Path, vllm_version: str | None, version: str | None = None) -> dict[str, Any]:
    """`version` when the wheel check already read it from the target's pip metadata; else the
    dist-info beside vLLM in `root` is read."""
    return report(version or dist_version(root), f"installed in {root}", vllm_version)
