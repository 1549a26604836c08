"""Smoke test of bench/bench.py (issue 7): it runs end to end in its smallest configuration and
reports every figure with numeric medians. No timing is asserted: speed goals are not tests."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIGURES = ("verify_latency", "verify_with_wheels", "idempotent_install", "verify_10_vs_3_sets", "hashing", "download",
           "cold_install")


@pytest.mark.slow
def test_bench_quick_json_reports_every_figure():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench.py"), "--quick", "--json", "--reps", "1"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert set(out["figures"]) == set(FIGURES)
    for name in FIGURES:
        fig = out["figures"][name]
        if name == "download" and fig["skipped"] and shutil.which("curl") is None:
            continue  # no curl on this machine: the row says so instead of measuring
        assert not fig["skipped"], fig
        for side in ("m3fuse", "baseline"):
            st = fig[side]
            for key in ("median", "min", "max", "q1", "q3"):
                assert isinstance(st[key], float) and math.isfinite(st[key]) and st[key] > 0, (name, side, st)
            assert st["n"] >= 1
        assert isinstance(fig["ratio"], float) and fig["ratio"] > 0
        assert fig["pass"] in (True, False)
        assert fig["goal"].startswith(("<=", ">="))
    m = out["machine"]
    assert m["nproc"] >= 1 and m["python"]
    # The temp dir is gone.
    assert not Path(m["disk"]["tmp_dir"]).exists()
