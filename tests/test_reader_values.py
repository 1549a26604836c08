"""Every derived reader of a layer's output, run: what it produces in the patched model equals
what it produces in the release's own model, in every mode and TP size.

`readers.instrument` routes every reader call that `m3fuse/patching/readers.py` derives from a
model source (the EAGLE3 hook, the final norm, the PP hand-off, anything new) through a probe,
in the release's pristine model and in the set's patched one alike; the probe records what the
call returns and what it appends to a list argument (the hook's captures). The harness
(tests/fusion_harness.py, simulated TP) runs both; per reader, the sequence of recorded tensors
must match (off and control bit for bit, fused within bf16). A reader the release adds is
probed with no test edit; one the set's loop lacks, or feeds a partial sum, differs here.
"""

from __future__ import annotations

import threading
import types

import pytest
import torch

import realvllm
import test_fusion_matrix as tm
import test_readers
from fusion_harness import Stage, ToyConfig, arm_world, build_model, load_model, patched_text, pristine_text, run_forward
from fusion_matrix import ROWS
from fusion_standins import SimTP
from m3fuse.patching import readers

MODEL = realvllm.MODEL
PROBE = "__m3_probe__"
EXTRA_READER = "extract_hidden_state"  # a reader the releases do not have (the held-out port's)


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, tuple):
        return [t for t in value if isinstance(t, torch.Tensor)]
    if isinstance(value, dict):
        return [t for t in value.values() if isinstance(t, torch.Tensor)]
    return []


def probed_run(fs, world: int, mode: str, aux: tuple, source: str,
               last_pp_rank: bool = True) -> list[dict[str, list[list[torch.Tensor]]]]:
    """Per rank: reader key -> one entry per call, the tensors it returned or appended.
    `last_pp_rank=False`: the model runs as a PP stage that hands its output on."""
    local = threading.local()

    def probe(key, fn, *args, **kwargs):
        lists = [a for a in (*args, *kwargs.values()) if isinstance(a, list)]
        sizes = [len(x) for x in lists]
        out = fn(*args, **kwargs)
        got = [t for x, n in zip(lists, sizes) for t in x[n:] if isinstance(t, torch.Tensor)] + _tensors(out)
        local.records.setdefault(key, []).append([t.detach().clone() for t in got])
        return out

    def extract_hidden_state(store: list, hidden: torch.Tensor) -> None:
        store.append(hidden.clone())

    config = ToyConfig()
    with Stage(fs, SimTP(world), mode=mode, **arm_world(fs, mode)) as st:
        extra = {PROBE: probe, EXTRA_READER: extract_hidden_state}
        if not last_pp_rank:
            # The hand-off path with this stage's TP group deferring: deferral is off at PP > 1
            # (the helper's gate), so only a stage that believes it is alone reaches it here.
            extra["get_pp_group"] = lambda: types.SimpleNamespace(is_first_rank=True, is_last_rank=False)
        w = load_model(fs, st, model_source=readers.instrument(source, PROBE), extra_globals=extra)

        def rank(r):
            local.records = {}
            model = build_model(w, config)
            model.m3_extracted = []  # the held-out reader's store (below)
            if aux:
                model._set_aux_hidden_state_layers(aux)
            run_forward(w, model, tm._embeds(config.hidden_size), fs)
            return local.records

        return st.tp.run(rank)


def differences(fs, world: int, aux: tuple, pristine: str, patched: str, last_pp_rank: bool = True) -> list[str]:
    """Where a reader's values in the patched model differ from the release's."""
    base = probed_run(fs, world, "off", aux, pristine, last_pp_rank)
    out = []
    for mode in ("off", "control", "fused"):
        got = probed_run(fs, world, mode, aux, patched, last_pp_rank)
        for r in range(world):
            if sorted(got[r]) != sorted(base[r]):
                out.append(f"{mode} rank {r}: readers called {sorted(got[r])}, release {sorted(base[r])}")
                continue
            for key in base[r]:
                mine, theirs = got[r][key], base[r][key]
                if [len(c) for c in mine] != [len(c) for c in theirs]:
                    out.append(f"{mode} rank {r}: {key} produced {[len(c) for c in mine]} tensor(s) per call, "
                               f"release {[len(c) for c in theirs]}")
                    continue
                for i, (a, b) in enumerate(zip(mine, theirs)):
                    for x, y in zip(a, b):
                        exact = mode in ("off", "control")
                        if (exact and not torch.equal(x, y)) or (not exact and tm.rel_err(x, y) >= tm.MODEL_TOL):
                            out.append(f"{mode} rank {r}: {key} call {i}: rel err {tm.rel_err(x, y):.3g}")
    return out


@pytest.mark.parametrize("fs", ROWS, ids=lambda r: r.name)
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("aux", [(), (1, 2, 4)], ids=["no-eagle3", "aux-1-2-4"])
def test_every_derived_reader_sees_the_releases_values(fs, world, aux):
    pristine, patched = pristine_text(fs, MODEL), patched_text(fs, MODEL)
    probed = {k for k in readers.reader_keys(readers.derive(pristine)) if k != readers.LAYER}
    assert "self.norm" in probed and "self._maybe_add_hidden_state" in probed
    assert differences(fs, world, aux, pristine, patched) == []


@pytest.mark.parametrize("fs", [r for r in ROWS if r.has_pp], ids=lambda r: r.name)
def test_the_pp_hand_off_sends_the_releases_values(fs):
    """The PP hand-off (declared unreachable while deferring: deferral needs PP == 1) still
    sends reduced values when reached with the flag set."""
    pristine, patched = pristine_text(fs, MODEL), patched_text(fs, MODEL)
    assert "IntermediateTensors" in readers.reader_keys(readers.derive(pristine))
    assert differences(fs, 2, (), pristine, patched, last_pp_rank=False) == []


# ------------------------------------------------------------------ the held-out port, run
EXTRACT = f"{EXTRA_READER}(self.m3_extracted, hidden_states)"
REDUCE = test_readers.REDUCE


def _after(text: str, lines: list[int], block: str) -> str:
    return test_readers._insert_after(text, lines, block)


def _captures(text: str, deferred: bool | None) -> list[int]:
    return test_readers._capture_lines(text, deferred)


@pytest.mark.parametrize("fs", ROWS, ids=lambda r: r.name)
def test_a_new_reader_is_run_with_no_test_edit(fs):
    """The release gains a reader of every layer's output (in each of its loops). Merged into
    upstream's loops only, the set never calls it while deferring; read right after the layer
    call it gets a partial sum; after a reduction it gets the release's values."""
    pristine, patched = pristine_text(fs, MODEL), patched_text(fs, MODEL)
    release = _after(pristine, _captures(pristine, None), EXTRACT)
    merged = _after(patched, _captures(patched, False), EXTRACT)
    assert EXTRA_READER in readers.reader_keys(readers.derive(release))
    gaps = differences(fs, 2, (), release, merged)
    assert gaps and all(g.startswith(("control", "fused")) for g in gaps), gaps
    assert any(EXTRA_READER in g for g in gaps), gaps
    layer_stmt = min(r.line for r in readers.derive(merged) if r.key == readers.LAYER and r.in_deferred_loop)
    wrong = _after(merged, [layer_stmt], EXTRACT)
    gaps = differences(fs, 2, (), release, wrong)
    assert any(f"{EXTRA_READER} call" in g and "rel err" in g for g in gaps), gaps
    right = _after(merged, _captures(merged, True), REDUCE + EXTRACT)
    assert differences(fs, 2, (), release, right) == []


@pytest.mark.parametrize("fs", [ROWS[0], ROWS[-1]], ids=lambda r: r.name)
def test_a_rename_of_locals_upstream_runs_the_same(fs):
    """Upstream renames locals of the model's forward and of the decoder layer's (both its
    release and, by a clean merge, the set): the readers are found and run as before."""
    release = test_readers._rename_locals(pristine_text(fs, MODEL))
    merged = test_readers._rename_locals(patched_text(fs, MODEL))
    assert differences(fs, 2, (1, 2, 4), release, merged) == []
