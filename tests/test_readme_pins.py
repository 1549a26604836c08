"""README's supported-releases table must equal the patch sets' manifests, so the two cannot
disagree: one row `| release | helper|model | `pristine sha256` | `patched sha256` |` per
release listed in any manifest's vllm-versions and per patched file, nothing else."""

from __future__ import annotations

import re
import tomllib
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FILE_KIND = {
    "vllm/model_executor/layers/fused_allreduce_gemma_rms_norm.py": "helper",
    "vllm/models/minimax_m3/amd/model.py": "model",
}
ROW = re.compile(r"^\| (\d+\.\d+\.\d+) \| (helper|model) \| `([0-9a-f]{64})` \| `([0-9a-f]{64})` \|\s*$")


def readme_rows() -> list[tuple[str, str, str, str]]:
    return [m.groups() for line in (REPO / "README.md").read_text().splitlines() if (m := ROW.match(line))]


def manifest_rows() -> list[tuple[str, str, str, str]]:
    out = []
    for path in sorted((REPO / "patches").glob("*/manifest.toml")):
        m = tomllib.loads(path.read_text())
        for version in m["vllm-versions"]:
            for f in m["files"]:
                out.append((version, FILE_KIND[f["path"]], f["pristine-sha256"], f["patched-sha256"]))
    return out


def test_readme_pins_equal_the_manifests():
    readme, manifests = readme_rows(), manifest_rows()
    assert readme, "README.md has no `| release | file | pristine sha256 | patched sha256 |` rows"
    dupes = [r for r, n in Counter(readme).items() if n > 1]
    assert not dupes, f"README lists these rows twice: {dupes}"
    missing = sorted(set(manifests) - set(readme))
    extra = sorted(set(readme) - set(manifests))
    assert not missing and not extra, (
        f"README.md's supported-releases table disagrees with patches/*/manifest.toml:\n"
        f"  in the manifests, not in README: {missing}\n  in README, not in any manifest: {extra}")


def test_every_manifest_release_is_in_the_readme():
    listed = {r[0] for r in readme_rows()}
    releases = {r[0] for r in manifest_rows()}
    assert releases <= listed, f"releases with a set but no README row: {sorted(releases - listed)}"
