"""The AITER APIs m3fuse's patches (and vLLM's paths they sit in) call, checked against the
pinned AITER's source at its tag, as recorded in docs/fusion.md ("AITER at its tag").

The record is one table of signatures (ROCm/aiter v0.1.15.post1, file:line); the CPU stand-ins
in tests/fusion_standins.py must have exactly those signatures, and every call the patched
helpers make must fit them. The dispatcher's world sizes and AITER's capture flag, also from
the record, must be what each patched helper uses.
"""

from __future__ import annotations

import ast
import inspect
import re

import pytest

import fusion_standins
import realvllm
from fusion_harness import patched_text
from fusion_matrix import REPO, ROWS

DOC = REPO / "docs" / "fusion.md"
BEGIN, END = "<!-- aiter-signatures:begin -->", "<!-- aiter-signatures:end -->"


def recorded() -> dict[tuple[str, str], str]:
    """(stand-in class, method) -> signature text, from docs/fusion.md's table."""
    text = DOC.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, f"{DOC}: the signature table's markers"
    rows = {}
    for line in text[text.index(BEGIN):text.index(END)].splitlines():
        m = re.match(r"\| (\w+) \| (\w+) \| `(\(.*\))` \| (CA:\d+-\d+) \|$", line)
        if m:
            rows[(m.group(1), m.group(2))] = m.group(3)
    assert rows, f"{DOC}: no signature rows"
    return rows


def doc_section() -> str:
    text = DOC.read_text()
    return text[text.index("## AITER at its tag"):text.index(END)]


def test_the_record_names_every_method_the_patches_call_on_aiter():
    calls = set()
    for fs in ROWS:
        tree = ast.parse(patched_text(fs, realvllm.HELPER))
        calls |= {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call)
                  and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name)
                  and n.func.value.id == "ca"}
    assert calls == {"fused_ar_rms"}
    assert {m for _, m in recorded()} >= calls | {"custom_fused_ar_rms", "all_gather_unreg"}


@pytest.mark.parametrize("key", sorted(recorded()), ids=lambda k: ".".join(k))
def test_stand_in_signature_is_the_pinned_one(key):
    cls, method = key
    fn = getattr(getattr(fusion_standins, cls), method)
    assert str(inspect.signature(fn)) == recorded()[key]


@pytest.mark.parametrize("fs", ROWS, ids=lambda r: r.name)
def test_patched_calls_fit_the_pinned_signature(fs):
    """Every `ca.fused_ar_rms(...)` the patched helper makes binds to the recorded signature
    (positional count and keyword names), with no gemma_norm, and use_1stage is the local the
    function guards with the fused-1stage checks (`one_stage` from the caller's mode and
    `_m3_one_stage_ready` from construction: False in `fused`; tests/test_fusion_matrix.py runs
    both arms)."""
    sig = inspect.Signature.from_callable(eval("lambda " + recorded()[("FakeAiterCA", "fused_ar_rms")][1:-1] + ": 0",
                                               {}, {}))  # noqa: S307 - our own record
    tree = ast.parse(patched_text(fs, realvllm.HELPER))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr == "fused_ar_rms"]
    assert calls
    for call in calls:
        args = [None] * (1 + len(call.args))  # self + the positional arguments
        kwargs = {k.arg: None for k in call.keywords}
        sig.bind(*args, **kwargs)  # TypeError if they do not fit
        value = next(k.value for k in call.keywords if k.arg == "use_1stage")
        assert isinstance(value, ast.Name) and value.id == "use_1stage"
        assert "gemma_norm" not in kwargs
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_m3_aiter_fused_ar_rms")
    (decided,) = [n.value for n in ast.walk(fn) if isinstance(n, ast.Assign)
                  and [getattr(t, "id", None) for t in n.targets] == ["use_1stage"]]
    names = {n.id for n in ast.walk(decided) if isinstance(n, ast.Name)}
    assert {"one_stage", "_m3_one_stage_ready", "_m3_one_stage_admits"} <= names


@pytest.mark.parametrize("fs", ROWS, ids=lambda r: r.name)
def test_world_sizes_and_capture_flag_are_the_recorded_ones(fs):
    section = doc_section()
    cases = re.search(r"size with cases ([\d, ]+) only", section)
    assert cases, "the record names the dispatcher's cases"
    sizes = tuple(sorted(int(x) for x in cases.group(1).split(",")))
    assert "`self._IS_CAPTURING` (CA:332)" in section
    tree = ast.parse(patched_text(fs, realvllm.HELPER))
    consts = {n.targets[0].id: n.value for n in tree.body if isinstance(n, ast.Assign)
              and isinstance(n.targets[0], ast.Name)}
    assert ast.literal_eval(consts["M3_AITER_FUSED_WORLD_SIZES"]) == sizes
    flags = [n.args[1].value for n in ast.walk(tree) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Name) and n.func.id == "getattr" and len(n.args) >= 2
             and isinstance(n.args[1], ast.Constant) and n.args[1].value.endswith("CAPTURING")]
    assert flags == ["_IS_CAPTURING"]
    assert isinstance(inspect.getattr_static(fusion_standins.FakeAiterCA, "_IS_CAPTURING"), property)


def test_stand_in_all_gather_unreg_gathers_in_rank_order():
    import torch

    tp = fusion_standins.SimTP(2)
    ca = fusion_standins.FakeAiterCA(tp)
    outs = tp.run(lambda r: (ca.all_gather_unreg(torch.full((2, 3), float(r)), dim=0),
                             ca.all_gather_unreg(torch.full((2, 3), float(r)), dim=-1)))
    for rows_, cols in outs:
        assert rows_.shape == (4, 3) and rows_[:2].eq(0).all() and rows_[2:].eq(1).all()
        assert cols.shape == (2, 6) and cols[:, :3].eq(0).all() and cols[:, 3:].eq(1).all()
