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


SEQ_BEGIN, SEQ_END = "<!-- BEGIN container-sequence -->\n", "<!-- END container-sequence -->\n"


def readme_sequence() -> str:
    """README's container sequence: the one ```sh block between its markers (tests/test_image.py
    runs it verbatim)."""
    text = (REPO / "README.md").read_text()
    assert text.count(SEQ_BEGIN) == 1 and text.count(SEQ_END) == 1, f"README.md needs one {SEQ_BEGIN.strip()}"
    marked = text[text.index(SEQ_BEGIN) + len(SEQ_BEGIN):text.index(SEQ_END)]
    found = re.fullmatch(r"```sh\n(.*)```\n", marked, re.S)
    assert found, "the marked block must be one ```sh fenced block and nothing else"
    return found.group(1)


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
