"""`m3fuse port` without `--from`: the base of each file chosen by trying every set.

Every set that patches a file is merged onto the new release's file in memory; the file takes
the set with the fewest conflicts (a merge that does not compile counts as worse than any
conflict count), ties going to the nearest release at or below the target, then the nearest
above. The set chosen for most files names the port (`ported-from`), the rest are per-file
overrides, exactly as `--from SET --from FILE=SET` would give.

Fewest conflicts can pick a base that merges cleanly into an outdated design: when the
release's own pristine file has an upstream branch that the chosen base's pristine file does
not know (a helper generation), a warning names it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from packaging.version import InvalidVersion, Version

from ..errors import MergeConflict, UsageProblem
from .basesource import BaseSource
from .hunks import apply_diff
from .patchset import PatchSet
from .port import PortRequest, PortResult, check_name, merge_file, port, read_tree

# Upstream code whose arrival starts a new generation of a target file: a base whose pristine
# file lacks what the release's has merged its changes into the older design.
GENERATION_MARKERS = {
    "_can_use_aiter_fused_ar_rms": "vLLM's own one-stage AITER fused all-reduce + RMSNorm branch",
}


def _version(text: str) -> Version | None:
    try:
        return Version(text)
    except InvalidVersion:
        return None


def nearness(pset: PatchSet, target: str) -> tuple[int, object]:
    """Sort key: at or below the target first (nearest first), then above (nearest first)."""
    t = _version(target)
    vs = [v for v in map(_version, pset.vllm_versions) if v is not None]
    if t is None or not vs:
        return (2, pset.name)
    below = [v for v in vs if v <= t]
    if below:
        return (0, tuple(-x for x in max(below).release))
    return (1, min(vs).release)


@dataclass
class Candidate:
    path: str
    set_name: str
    conflicts: int
    compiles: bool
    chosen: bool = False

    def to_json(self) -> dict:
        return {"path": self.path, "set": self.set_name, "conflicts": self.conflicts,
                "compiles": self.compiles, "chosen": self.chosen}


@dataclass
class Choice:
    primary: str
    per_file: dict[str, str]
    candidates: list[Candidate]
    warnings: list[str] = field(default_factory=list)

    @property
    def overrides(self) -> list[str]:
        return [f"{path}={name}" for path, name in self.per_file.items() if name != self.primary]

    def to_json(self) -> dict:
        return {"primary": self.primary, "per_file": self.per_file, "warnings": self.warnings,
                "candidates": [c.to_json() for c in self.candidates]}

    def table(self) -> list[str]:
        width = max(len(c.set_name) for c in self.candidates)
        lines = ["port: candidate bases (conflicts of a three-way merge onto this tree):"]
        for path in self.per_file:
            lines.append(f"  {path}")
            for c in (c for c in self.candidates if c.path == path):
                mark = "<- chosen" if c.chosen else ""
                note = "" if c.compiles else " (does not compile)"
                lines.append(f"    {c.set_name:<{width}}  {c.conflicts} conflict(s){note}  {mark}".rstrip())
        over = "".join(f" --from {o}" for o in self.overrides)
        lines.append(f"port: took --from {self.primary}{over}")
        lines += [f"warning: {w}" for w in self.warnings]
        return lines


def choose(sets: list[PatchSet], tree: dict[str, bytes], target_version: str, source: BaseSource,
           new_name: str) -> Choice:
    candidates: list[Candidate] = []
    per_file: dict[str, str] = {}
    pristine_of: dict[tuple[str, str], bytes] = {}
    for path, ours in tree.items():
        mine: list[tuple[tuple, Candidate]] = []
        for s in sets:
            t = next((t for t in s.targets if t.path == path), None)
            if t is None:
                continue
            base = source.pristine(s, t)
            pristine_of[(s.name, path)] = base
            merged = merge_file(path, base, ours, apply_diff(base, t.diff, name=str(t.patch_file)),
                                tree_label="tree", set_name=s.name, new_name=new_name)
            c = Candidate(path, s.name, len(merged.conflicts), merged.compile_error is None)
            # Not compiling ranks before the conflict count: it is worse than any number of
            # conflicts (the module docstring's rule; a conflict is shown, broken code is silent).
            mine.append(((not c.compiles, c.conflicts, nearness(s, target_version)), c))
        mine.sort(key=lambda kc: kc[0])
        mine[0][1].chosen = True
        per_file[path] = mine[0][1].set_name
        candidates += [c for _, c in mine]
    by_name = {s.name: s for s in sets}
    counts = Counter(per_file.values())
    primary = min(counts, key=lambda n: (-counts[n], nearness(by_name[n], target_version)))
    choice = Choice(primary, per_file, candidates)
    for path, name in per_file.items():
        for marker, what in GENERATION_MARKERS.items():
            if marker in tree[path].decode("utf-8", "replace") and \
                    marker not in pristine_of[(name, path)].decode("utf-8", "replace"):
                choice.warnings.append(
                    f"{path}: the chosen base {name} predates this release's generation of the file: the "
                    f"release's pristine file has {what} (`{marker}`), {name}'s does not. Its changes merge "
                    f"into the older design; review them against the new branch, or port this file from a "
                    f"set that knows it (--from {path.rsplit('/', 1)[-1]}=SET).")
    return choice


def port_with_bases(req: PortRequest, source: BaseSource, echo) -> tuple[PortResult, Choice | None]:
    """`port` with the bases chosen here when `req.base` is empty, and the base files read out
    of `source` (so --wheels serves them) before port looks in its cache."""
    by_name = {s.name: s for s in req.sets}
    choice = None
    if not req.base:
        check_name(req.name, req.out, req.sets)
        target = req.vllm.version or (req.versions[0] if req.versions else "")
        if not target:
            raise UsageProblem(f"{req.vllm.root}: no vllm dist-info tells this tree's version; pass --version V.")
        paths = list(dict.fromkeys(t.path for s in req.sets for t in s.targets))
        tree = read_tree(req.vllm, req.sets, paths)
        choice = choose(req.sets, tree, target, source, req.name)
        for line in choice.table():
            echo(line)
        req.base, req.overrides = choice.primary, choice.overrides
    else:
        for item in [req.base] + [o.partition("=")[2] for o in req.overrides]:
            if item in by_name:
                source.files(by_name[item], list(by_name[item].targets))
    try:
        return port(req, echo), choice
    except MergeConflict as err:
        if choice is not None:
            err.payload["base_choice"] = choice.to_json()
        raise
