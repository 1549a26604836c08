"""README's container section is the tested Containerfile (tests/test_image.py builds and
runs it), shown verbatim between its markers, and one sequence from a fresh clone to
`podman run ... m3fuse verify` that tests/test_image.py runs verbatim: neither can drift."""

from __future__ import annotations

import re

from conftest import REPO

BEGIN, END = "<!-- BEGIN Containerfile -->\n", "<!-- END Containerfile -->\n"
SEQ_BEGIN, SEQ_END = "<!-- BEGIN container-sequence -->\n", "<!-- END container-sequence -->\n"


def marked_block(begin: str, end: str, lang: str) -> str:
    """The one fenced ```lang block between README's `begin` and `end` markers."""
    text = (REPO / "README.md").read_text()
    assert text.count(begin) == 1 and text.count(end) == 1, f"README.md needs one {begin.strip()} ... {end.strip()}"
    marked = text[text.index(begin) + len(begin):text.index(end)]
    found = re.fullmatch(rf"```{lang}\n(.*)```\n", marked, re.S)
    assert found, f"the marked block must be one ```{lang} fenced block and nothing else"
    return found.group(1)


def readme_containerfile() -> str:
    return marked_block(BEGIN, END, "dockerfile")


def readme_sequence() -> str:
    """README's container sequence (tests/test_image.py runs it verbatim)."""
    return marked_block(SEQ_BEGIN, SEQ_END, "sh")


def test_the_readme_shows_the_tested_containerfile_verbatim():
    assert readme_containerfile() == (REPO / "Containerfile").read_text(), (
        "README.md's Containerfile block differs from ./Containerfile: copy the file between the markers")


def test_the_readme_sequence_names_every_input_and_makes_its_venv():
    seq = readme_sequence()
    section = (REPO / "README.md").read_text().split("## Container build\n", 1)[1].split("\n## ", 1)[0]
    for name in ("Containerfile", ".dockerignore", "wheels.lock", "wheels/", "tools/image-wheels.sh"):
        assert name in section, f"README's container section does not name {name}"
    assert "-m venv .venv" in seq and "tools/image-wheels.sh" in seq and "podman build" in seq
    assert seq.rstrip().splitlines()[-1].startswith("podman run --rm m3-vllm m3fuse verify")
    # Every file the Containerfile reads from the context is one the sequence provides.
    text = (REPO / "Containerfile").read_text()
    copied = [line.split()[1:-1] for line in text.splitlines() if line.startswith("COPY ") and "--from" not in line]
    assert copied == [["wheel[s]/", "${M3FUSE_LOCK_FILE}*"]], copied
    assert re.search(r"^ARG M3FUSE_LOCK_FILE=wheels.lock$", text, re.M)
