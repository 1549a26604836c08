"""A release the fusion harness cannot stand in for fails with one message naming what is missing.

The harness answers the names a release's model classes use from the row's facts
(`model_standins`, `config_fields`, derived by tests/fusion_facts.py). A row whose facts leave one out
(a new release before its row is derived) must fail every model test with the same
HarnessGap naming the name or config field, not with 23 unrelated errors.
"""

from __future__ import annotations

import pytest

from fusion_harness import HarnessGap, Stage, ToyConfig, build_model, load_model
from fusion_matrix import row
from fusion_standins import SimTP

FS = row("vllm-0.34.0")


def _build(fs):
    with Stage(fs, SimTP(1), mode="control") as st:
        w = load_model(fs, st)
        return build_model(w, ToyConfig())


def test_the_row_as_shipped_builds():
    assert _build(FS).defer_ffn_all_reduce is False  # TP=1: built, nothing deferred


def test_a_name_the_row_does_not_list_is_named():
    fs = FS.with_facts(model_standins=tuple(n for n in FS.model_standins if n != "mono_envs"))
    with pytest.raises(HarnessGap) as info:
        _build(fs)
    msg = str(info.value)
    assert "vllm-0.34.0" in msg and "'mono_envs'" in msg and "model_standins" in msg


def test_a_config_field_the_harness_lacks_is_named():
    fs = FS.with_facts(config_fields=FS.config_fields + ("attn_layer_kinds",))
    with pytest.raises(HarnessGap, match=r"ToyConfig has no attn_layer_kinds"):
        _build(fs)


def test_a_listed_name_without_a_stand_in_is_named_before_anything_runs():
    fs = FS.with_facts(model_standins=FS.model_standins + ("mono_kernels_v2", "peer_buffers"))
    with pytest.raises(HarnessGap, match=r"no stand-in for mono_kernels_v2, peer_buffers"):
        with Stage(fs, SimTP(1), mode="control") as st:
            load_model(fs, st)
