"""README's container section is the tested Containerfile (tests/test_image.py builds and
runs it), shown verbatim between its markers: the two cannot drift apart."""

from __future__ import annotations

import re

from conftest import REPO

BEGIN, END = "<!-- BEGIN Containerfile -->\n", "<!-- END Containerfile -->\n"


def readme_containerfile() -> str:
    text = (REPO / "README.md").read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, f"README.md needs one {BEGIN.strip()} ... {END.strip()}"
    marked = text[text.index(BEGIN) + len(BEGIN):text.index(END)]
    found = re.fullmatch(r"```dockerfile\n(.*)```\n", marked, re.S)
    assert found, "the marked block must be one ```dockerfile fenced block and nothing else"
    return found.group(1)


def test_the_readme_shows_the_tested_containerfile_verbatim():
    assert readme_containerfile() == (REPO / "Containerfile").read_text(), (
        "README.md's Containerfile block differs from ./Containerfile: copy the file between the markers")
