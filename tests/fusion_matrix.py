"""The fusion test matrix's table of facts: one row per patch set under patches/.

The rows are data derived from each release's own files (tests/fusion_facts.py, one function
per fact), kept in tests/fusion_facts.json and regenerated with

    python tools/release_facts.py --write

tests/test_fusion_matrix.py fails while a folder under patches/ has no row (or a row names no
folder) and while the shipped JSON differs from a fresh derivation, so a row can neither be
missing nor claim what its release does not have. What each fact means is in the docstring of
its function in tests/fusion_facts.py; `fs.<fact>` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import fusion_facts

REPO = fusion_facts.REPO
PATCHES = fusion_facts.PATCHES


def _frozen(value):
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class Row:
    name: str  # patches/<name>
    versions: tuple[str, ...]
    facts: tuple[tuple[str, object], ...]  # (fact name, value), in tests/fusion_facts.py's order

    def __getattr__(self, key: str):
        # Only reached for names that are not fields: the facts.
        if key != "facts":
            for name, value in self.facts:
                if name == key:
                    return value
        raise AttributeError(f"row {self.__dict__.get('name', '?')} has no fact {key!r} "
                             f"(tests/fusion_facts.py; regenerate with tools/release_facts.py --write)")

    def with_facts(self, **changes: object) -> "Row":
        """This row with some facts changed (a test's what-if: a release the harness lacks)."""
        unknown = set(changes) - {k for k, _ in self.facts}
        assert not unknown, f"no such facts: {sorted(unknown)}"
        return Row(self.name, self.versions, tuple((k, _frozen(changes.get(k, v))) for k, v in self.facts))

    @property
    def version(self) -> str:
        """The release the behavioural tests run on."""
        return self.versions[0]

    @property
    def dir(self) -> Path:
        return PATCHES / self.name


def rows_from(facts: dict[str, dict]) -> list[Row]:
    return [Row(name, tuple(row["versions"]),
                tuple((k, _frozen(v)) for k, v in row.items() if k != "versions"))
            for name, row in facts.items()]


ROWS: list[Row] = rows_from(fusion_facts.load())
ROW_IDS = [r.name for r in ROWS]


def rows_where(pred) -> list[Row]:
    """The rows a fact applies to (cases that do not apply are not generated)."""
    return [r for r in ROWS if pred(r)]


def row(name: str) -> Row:
    return next(r for r in ROWS if r.name == name)
