"""Readers of a layer's output, derived from each release (m3fuse/patching/readers.py), against
each set's declarations (patches/<set>/readers.toml), and the set's copy of the layer loop
against upstream's.

Per row: every reader the release's ROCm model package has (pristine) and the set's patched
model has is declared, with a handling the patched code keeps; the set's deferred loop has a
counterpart of every statement of upstream's. Then the held-out port of issue 24, simulated on
every row: a new reader of the layer output merged into upstream's loops only fails, naming the
reader and its file:line; read before the reduction it fails; placed after the reduction (and
declared) it passes. A rename of a local variable throughout upstream's model changes nothing.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

import fusion_facts
import realvllm
from fusion_harness import patched_text, pristine_text
from fusion_matrix import ROWS, Row
from m3fuse.errors import PatchSetError
from m3fuse.patching import readers

MODEL = realvllm.MODEL
all_rows = pytest.mark.parametrize("fs", ROWS, ids=lambda r: r.name)


def reader_problems(fs: Row, model: str | None = None, pristine_model: str | None = None,
                    decl: readers.Declarations | None = None) -> list[str]:
    """The readers check of a row: the set's patched model (or `model`) against the release's
    package (its model replaced by `pristine_model` when given)."""
    files = fusion_facts.package_texts(fs.version)
    decl = decl if decl is not None else readers.load_declarations(fs.dir)
    up = _others(fs.version) + readers.derive(pristine_model if pristine_model is not None else files[MODEL], MODEL)
    ours = _others(fs.version) + readers.derive(model if model is not None else patched_text(fs, MODEL), MODEL)
    return readers.check(up, ours, decl, where=f"patches/{fs.name}/{readers.READERS_FILE}")


@functools.cache
def _others(version: str) -> list[readers.Read]:
    """The readers in the package's files other than the model (no set patches them)."""
    files = fusion_facts.package_texts(version)
    return [r for r in readers.derive_package(files) if r.file != MODEL]


def drift(fs: Row, model: str | None = None, pristine_model: str | None = None,
          decl: readers.Declarations | None = None) -> list[str]:
    decl = decl if decl is not None else readers.load_declarations(fs.dir)
    return readers.loop_drift(pristine_model if pristine_model is not None else pristine_text(fs, MODEL),
                              model if model is not None else patched_text(fs, MODEL), decl)


# ============================================================== the shipped sets
@all_rows
def test_every_reader_of_a_layer_output_is_declared_and_handled(fs):
    assert reader_problems(fs) == []


@all_rows
def test_the_sets_loop_has_every_statement_of_upstreams(fs):
    assert drift(fs) == []


@all_rows
def test_the_facts_list_the_readers_the_set_declares(fs):
    """The derived fact (tests/fusion_facts.json) and the declarations name the same readers of
    the release (the patched file adds only the set's reducers)."""
    decl = readers.load_declarations(fs.dir)
    assert sorted(decl.readers) == list(fs.layer_output_readers)
    assert readers.LAYER in fs.layer_output_readers and "self.norm" in fs.layer_output_readers


# ============================================================== the held-out port, simulated
EXTRACT = "self._maybe_extract_hidden_state(extracted, idx + 1, hidden_states)"


REDUCE = ("if partial:\n"
          "    hidden_states = tensor_model_parallel_all_reduce(hidden_states)\n"
          "    partial = False\n")


def _stmt_at(tree: ast.Module, line: int) -> ast.stmt:
    """The innermost statement spanning `line`."""
    spans = [n for n in ast.walk(tree) if isinstance(n, ast.stmt) and n.lineno <= line <= n.end_lineno]
    return min(spans, key=lambda n: n.end_lineno - n.lineno)


def _insert_after(text: str, lines: list[int], stmt: str) -> str:
    """`stmt` after the statement at each of `lines`, with that statement's indentation."""
    tree = ast.parse(text)
    ends = {}
    for line in lines:
        node = _stmt_at(tree, line)
        ends[node.end_lineno] = " " * node.col_offset
    out = []
    for i, line in enumerate(text.splitlines(keepends=True), 1):
        out.append(line)
        if i in ends:
            out += [f"{ends[i]}{b}\n" for b in stmt.splitlines()]
    return "".join(out)


def _capture_lines(text: str, deferred: bool | None) -> list[int]:
    """Lines of the EAGLE3 capture hook in the layer loops (the set's deferred one or upstream's)."""
    return sorted({r.line for r in readers.derive(text) if r.key == "self._maybe_add_hidden_state"
                   and r.in_layer_loop and (deferred is None or r.in_deferred_loop is deferred)})


def _held_out(fs: Row) -> tuple[str, str]:
    """The release with a new reader of every layer's output in each of its layer loops (a
    hidden-state extraction, kept like EAGLE3's captures), and the set as a clean merge gives it:
    the call in upstream's loops only, not in the set's own copy."""
    pristine, patched = pristine_text(fs, MODEL), patched_text(fs, MODEL)
    new_release = _insert_after(pristine, _capture_lines(pristine, None), EXTRACT)
    merged = _insert_after(patched, _capture_lines(patched, False), EXTRACT)
    assert new_release.count(EXTRACT) >= 1 and merged.count(EXTRACT) == new_release.count(EXTRACT)
    return new_release, merged


def _declared_with(fs: Row, key: str, handling: str) -> readers.Declarations:
    decl = readers.load_declarations(fs.dir)
    decl.readers[key] = readers.Declaration(key, handling, "issue 24's held-out extraction")
    return decl


@all_rows
def test_a_new_reader_merged_into_upstreams_loop_only_fails_naming_it(fs):
    new_release, merged = _held_out(fs)
    problems = reader_problems(fs, merged, new_release)
    line = _stmt_at(ast.parse(pristine_text(fs, MODEL)), _capture_lines(pristine_text(fs, MODEL), None)[0]).end_lineno + 1
    assert any(p.startswith("undeclared reader 'self._maybe_extract_hidden_state'") and f"{MODEL}:{line} " in p
               for p in problems), problems
    # the loop comparison names the statement the set's loop lacks
    gaps = drift(fs, merged, new_release)
    assert len(gaps) == 1 and EXTRACT in gaps[0] and f"{MODEL}:{line}," in gaps[0], gaps
    # declared (as the maintainer would), it still fails: the set's loop never calls it
    decl = _declared_with(fs, "self._maybe_extract_hidden_state", "reduced-before")
    assert any("never in the set's deferred loop" in p for p in reader_problems(fs, merged, new_release, decl))


@all_rows
def test_a_new_reader_read_before_the_reduction_fails(fs):
    new_release, merged = _held_out(fs)
    # The second resolution of the held-out port: the call added to the set's loop, right after
    # the layer call (before the capture reduction): it reads a per-rank partial sum.
    layer_line = min(r.line for r in readers.derive(merged) if r.key == readers.LAYER and r.in_deferred_loop)
    wrong = _insert_after(merged, [layer_line], EXTRACT)
    decl = _declared_with(fs, "self._maybe_extract_hidden_state", "reduced-before")
    problems = reader_problems(fs, wrong, new_release, decl)
    assert any(p.startswith("reader 'self._maybe_extract_hidden_state'") and "no reduction before it" in p
               for p in problems), problems


@all_rows
def test_a_new_reader_after_the_reduction_passes(fs):
    new_release, merged = _held_out(fs)
    # The correct resolution: in the set's loop too, after a reduction of the output (this
    # structural check sees that a reduction precedes the read in its block, not under which
    # condition; tests/test_reader_values.py runs the values), declared reduced-before.
    right = _insert_after(merged, _capture_lines(merged, True), REDUCE + EXTRACT)
    decl = _declared_with(fs, "self._maybe_extract_hidden_state", "reduced-before")
    assert reader_problems(fs, right, new_release, decl) == []
    assert drift(fs, right, new_release, decl) == []


@all_rows
def test_a_replaced_upstream_statement_passes_only_when_listed(fs):
    new_release, merged = _held_out(fs)
    decl = readers.load_declarations(fs.dir)
    stmt = next(ast.unparse(n) for n in ast.walk(ast.parse(new_release))
                if isinstance(n, ast.Expr) and ast.unparse(n) == EXTRACT)
    decl.replaced[stmt] = readers.Replacement(stmt, "the set extracts after its own reduction")
    assert drift(fs, merged, new_release, decl) == []


# ============================================================== renames, and the declarations' format
RENAMES = {("MiniMaxM3Model", "forward"): {"hidden_states": "hs", "residual": "resid", "idx": "i", "layer": "blk"},
           # the decoder layer's own locals (its parameters are its callers' interface)
           ("MiniMaxM3DecoderLayer", "forward"): {"ffn": "block_ffn", "attn_input": "attn_in"}}


def _rename_locals(text: str, renames: dict = RENAMES) -> str:
    """Local names of some methods renamed throughout each method (upstream's refactor)."""
    for (cls, fn), names in renames.items():
        tree = ast.parse(text)
        method = next(m for c in tree.body if isinstance(c, ast.ClassDef) and c.name == cls
                      for m in c.body if isinstance(m, ast.FunctionDef) and m.name == fn)
        lines = text.splitlines(keepends=True)
        start, end = method.lineno - 1, method.end_lineno
        body = "".join(lines[start:end])
        for old, new in names.items():
            body = re.sub(rf"(?<![.\w\"']){old}\b(?![\"'=])", new, body)
        text = "".join(lines[:start]) + body + "".join(lines[end:])
    return text


@all_rows
def test_a_rename_of_locals_upstream_needs_no_edit(fs):
    pristine, patched = pristine_text(fs, MODEL), patched_text(fs, MODEL)
    new_release, merged = _rename_locals(pristine), _rename_locals(patched)
    assert "hs, resid = " in new_release and "hs, resid = " in merged
    assert "block_ffn = " in new_release and "block_ffn = " in merged
    compile(merged, MODEL, "exec")
    keys = lambda t: sorted(readers.reader_keys(readers.derive(t)))  # noqa: E731
    assert keys(new_release) == keys(pristine) and keys(merged) == keys(patched)
    assert reader_problems(fs, merged, new_release) == []
    assert drift(fs, merged, new_release) == []


def test_a_rename_in_upstreams_loop_only_is_drift():
    """The set's copy keeps the old name while the rest of the function has the new one: that
    copy would raise NameError; the comparison sees it."""
    fs = ROWS[-1]
    pristine, patched = pristine_text(fs, MODEL), patched_text(fs, MODEL)
    new_release = _rename_locals(pristine)
    merged = _rename_locals(patched).replace("hs, resid = layer(", "hidden_states, residual = layer(") \
        .replace("hs, resid = blk(\n", "hidden_states, residual = blk(\n")
    assert drift(fs, merged, new_release) != []


@pytest.mark.parametrize("text,words", [
    ("[[reader]]\nreader = 'x'\nhandling = 'maybe'\nreason = 'r'\n", "handling 'maybe'"),
    ("[[reader]]\nreader = 'x'\nhandling = 'unreachable'\nreason = ' '\n", "the reason is empty"),
    ("[[reader]]\nreader = 'x'\nhandling = 'unreachable'\n", "exactly the strings reader, handling, reason"),
    ("[[reader]]\nreader = 'x'\nhandling = 'unreachable'\nreason = 'r'\n" * 2, "declared twice"),
    ("[[replaced]]\nstatement = 'x'\n", "exactly the non-empty strings statement, reason"),
    ("[other]\n", "unknown table"),
    ("[[reader]\n", "not valid TOML"),
])
def test_malformed_declarations_are_refused_naming_the_file(text, words):
    with pytest.raises(PatchSetError) as exc:
        readers.parse_declarations(text, "patches/x/readers.toml")
    assert str(exc.value).startswith("patches/x/readers.toml: ") and words in str(exc.value)


def test_a_missing_or_unsafe_declarations_file_is_refused(tmp_path):
    with pytest.raises(PatchSetError, match="missing.*copy the base set's readers.toml"):
        readers.load_declarations(tmp_path)
    (tmp_path / "elsewhere").write_text("")
    (tmp_path / readers.READERS_FILE).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PatchSetError, match="readers.toml"):
        readers.load_declarations(tmp_path)


def test_a_stale_declaration_fails():
    fs = ROWS[0]
    decl = readers.load_declarations(fs.dir)
    decl.readers["self.gone"] = readers.Declaration("self.gone", "unreachable", "was there once")
    assert any("'self.gone' is declared but no longer derived" in p for p in reader_problems(fs, decl=decl))


# ============================================================== at port time
def test_port_carries_the_base_declarations_and_warns_on_an_undeclared_reader(vllm_tree, pristine_trees,
                                                                              tmp_path):
    """`m3fuse port` gives the new set its base's readers.toml, keeps the base release's
    pristine files in the work folder (base/), and checks the merged model: here the base set
    forgot the EAGLE3 hook, and the port says so with the reader and its file:line."""
    import shutil

    from conftest import REPO, run_cli

    bases = tmp_path / "bases"
    shutil.copytree(REPO / "patches" / "vllm-0.26.0", bases / "vllm-0.26.0")
    decl = bases / "vllm-0.26.0" / readers.READERS_FILE
    text = decl.read_text()
    hook = text.index('[[reader]]\nreader = "self._maybe_add_hidden_state"')
    decl.write_text(text[:hook] + text[text.index("[[reader]]", hook + 1):])
    root, out, work = vllm_tree("0.28.0"), tmp_path / "out", tmp_path / "work"
    common = ["--vllm-root", str(root), "--from", "vllm-0.26.0", "--patches", str(bases), "--out", str(out),
              "--base-root", str(pristine_trees("0.26.0"))]
    r = run_cli("port", *common, "--name", "vllm-0.28.0", "--workdir", str(work), "--edit")
    assert r.returncode == 0, r.stderr
    assert (work / "base" / MODEL).read_bytes() == (pristine_trees("0.26.0") / MODEL).read_bytes()
    assert (work / "pristine" / MODEL).read_bytes() == (root / MODEL).read_bytes()
    r = run_cli("port", "--resume", str(work), "--patches", str(bases), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "vllm-0.28.0" / readers.READERS_FILE).read_text() == decl.read_text()
    line = next(r_.line for r_ in readers.derive((root / MODEL).read_text()) if r_.key == "self._maybe_add_hidden_state")
    warnings = [ln for ln in r.stdout.splitlines() if ln.startswith("warning: ")]
    assert warnings and all("'self._maybe_add_hidden_state'" in w for w in warnings), r.stdout
    assert any(f"{MODEL}:{line} " in w for w in warnings), warnings


def _held_out_tree(src: Path, dest: Path, version: str) -> Path:
    """A copy of release tree `src` whose model has the held-out reader in each layer loop, with
    its RECORD row updated (as a build of that source would write it)."""
    import base64
    import hashlib
    import shutil

    shutil.copytree(src, dest)
    model = dest / MODEL
    text = model.read_text()
    model.write_text(_insert_after(text, _capture_lines(text, None), EXTRACT))
    data = model.read_bytes()
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    (record,) = dest.glob("vllm-*.dist-info/RECORD")
    rows = [f"{MODEL},sha256={digest},{len(data)}" if ln.startswith(MODEL + ",") else ln
            for ln in record.read_text().splitlines()]
    record.write_text("\n".join(rows) + "\n")
    return dest


def test_a_held_out_port_end_to_end(pristine_trees, tmp_path):
    """Issue 24's held-out port with the real `m3fuse port`: a release = 0.34.0 plus a new
    reader in each layer loop. The merge is clean and lands the call in upstream's loops only;
    port warns naming the reader, and the tests' check fails naming it, with no test edit.
    Resolved in the work folder (reduce, then read, in the set's loop) and declared, it passes."""
    import shutil

    from conftest import REPO, run_cli
    from m3fuse.patching.hunks import apply_patch
    from m3fuse.patching.patchset import load_patchset

    tree = _held_out_tree(pristine_trees("0.34.0"), tmp_path / "tree", "0.34.1")
    bases = tmp_path / "bases"
    shutil.copytree(REPO / "patches" / "vllm-0.34.0", bases / "vllm-0.34.0")
    out, work = tmp_path / "out", tmp_path / "work"
    common = ["--patches", str(bases), "--out", str(out)]
    port = ["port", "--vllm-root", str(tree), "--from", "vllm-0.34.0", "--name", "vllm-0.34.1", "--version", "0.34.1",
            "--base-root", str(pristine_trees("0.34.0")), *common]
    r = run_cli(*port, "--workdir", str(tmp_path / "clean"))
    assert r.returncode == 0, r.stderr  # a clean merge
    release = (tree / MODEL).read_text()
    pset = load_patchset(out / "vllm-0.34.1")
    (t,) = [t for t in pset.targets if t.path == MODEL]
    merged = apply_patch(release.encode(), t.patch_file.read_text()).decode()
    assert merged.count(EXTRACT) == release.count(EXTRACT) >= 2  # upstream's loops only
    line = _stmt_at(ast.parse(release), _capture_lines(release, None)[0]).end_lineno + 1
    warnings = [ln for ln in r.stdout.splitlines() if ln.startswith("warning: ")]
    assert any("undeclared reader 'self._maybe_extract_hidden_state'" in w and f"{MODEL}:{line} " in w
               for w in warnings), r.stdout
    assert any(EXTRACT in w and "no counterpart" in w for w in warnings), r.stdout
    decl = readers.load_declarations(out / "vllm-0.34.1")
    problems = readers.check(readers.derive(release), readers.derive(merged), decl)
    assert any("'self._maybe_extract_hidden_state'" in p and f"{MODEL}:{line} " in p for p in problems), problems

    # The correct resolution, made in a work folder as docs/releases.md says, then declared.
    shutil.rmtree(out / "vllm-0.34.1")
    r = run_cli(*port, "--workdir", str(work), "--edit")
    assert r.returncode == 0, r.stderr
    assert (work / "base" / MODEL).read_bytes() == (pristine_trees("0.34.0") / MODEL).read_bytes()
    m = work / "merged" / MODEL
    m.write_text(_insert_after(m.read_text(), _capture_lines(m.read_text(), True), REDUCE + EXTRACT))
    r = run_cli("port", "--resume", str(work), *common, "--json")
    assert r.returncode == 0, r.stderr
    # declared by nobody yet: the JSON says so too, and no longer names a missing loop statement
    warned = __import__("json").loads(r.stdout)["warnings"]
    assert warned and all("'self._maybe_extract_hidden_state'" in w for w in warned), warned
    toml = Path(out / "vllm-0.34.1" / readers.READERS_FILE)
    toml.write_text(toml.read_text() + '\n[[reader]]\nreader = "self._maybe_extract_hidden_state"\n'
                    'handling = "reduced-before"\nreason = "extraction reads a reduced output: the set '
                    'reduces first"\n')
    (t,) = [t for t in load_patchset(out / "vllm-0.34.1").targets if t.path == MODEL]
    fixed = apply_patch(release.encode(), t.patch_file.read_text()).decode()
    decl = readers.load_declarations(out / "vllm-0.34.1")
    others = _others("0.34.0")  # the package's other files (mono/runner.py), unchanged
    assert readers.check(others + readers.derive(release), others + readers.derive(fixed), decl) == []
    assert readers.loop_drift(release, fixed, decl) == []
    assert readers.review(release.encode(), fixed.encode(), out / "vllm-0.34.1") == []
