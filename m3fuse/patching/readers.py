"""Readers of a decoder layer's output, derived from a release's own source (its AST).

A set defers each layer's FFN all-reduce, so between a layer call and the next reduction the
layer's output is a per-rank partial sum. Any code that reads it there must either reduce it
first or be the reducer. Upstream keeps adding such readers (EAGLE3 captures, PP hand-offs,
hidden-state extraction), and a clean merge can land one in upstream's loop only. So the
readers are not listed by hand: `derive(text)` finds, in every function of a model file,

- the *layer calls*: `A, B = f(..., A, B, ...)` where `f` is a decoder layer (a loop variable
  over something holding `.layers`, `kernel or layer`, or `self.layers[i]`);
- every later *read* of what a layer call returned (both names, and anything assigned from them
  without a call in between, e.g. `x = h + r`), keyed by the call that takes it (its callee's
  source with the two names replaced by `{out}`/`{res}`, so a local rename changes no key),
  or by the statement (`return`, `if`, ...) when no call does.

`<layer>` is the next layer call reading the previous one's output. For a *patched* source,
each read also says whether the output may be a partial sum there (`may_partial`): the set's
flag (the name it passes as `fuse_input_allreduce=`) is tracked through `if`s and assignments.

Each set declares how it handles each derived reader (`readers.toml`, `load_declarations`):

    [[reader]]
    reader = "self.norm"            # the derived key
    handling = "reduced-by-reader"  # or "reduced-before" / "unreachable"
    reason = "..."                  # why, for the review; required

and which statements of upstream's layer loop its own copy of the loop replaces:

    [[replaced]]
    statement = "..."               # ast.unparse of upstream's statement
    reason = "..."

`check(pristine, patched, declarations)` returns the problems: an undeclared reader (named with
its file:line), a stale declaration, a reader the set's deferred path reads while the output
may be partial without the declared handling, or a declared reader the set's deferred loop
never calls. `loop_drift` compares the set's copy of the layer loop with upstream's.

What the text can show and what it cannot: `reduced-before` is satisfied by an all-reduce of
the output earlier in the reader's block, whatever its condition (the EAGLE3 reduction runs
only for captured layers, which is all the hook reads); that the condition covers what the
reader reads is the declaration's reason, and `instrument` lets the harness run every reader
against the release's values (tests/test_reader_values.py), which checks it.
"""

from __future__ import annotations

import ast
import copy
from dataclasses import dataclass, field
from pathlib import Path

from .. import pysource, safeio
from ..errors import PatchSetError
from ..tomlread import TOMLDecodeError, loads

READERS_FILE = "readers.toml"
PACKAGE = "vllm/models/minimax_m3/amd/"  # the ROCm model's package: every file in it is searched
MODEL = PACKAGE + "model.py"
HANDLINGS = ("reduced-before", "reduced-by-reader", "unreachable")
LAYER = "<layer>"
# The set's own reducers: they read a partial sum by design (the helper all-reduces it).
REDUCERS = frozenset({"tensor_model_parallel_all_reduce", "fused_allreduce_gemma_rms_norm"})
# Of those, the one whose result is the (now reduced) output itself; the other returns a norm's output.
ALL_REDUCE = "tensor_model_parallel_all_reduce"
FLAG_KEYWORD = "fuse_input_allreduce"  # the decoder layer's keyword the set passes its flag to
ROLES = ("{out}", "{res}")


@dataclass(frozen=True)
class Read:
    """One read of a layer's output (or residual) in a function."""

    key: str  # the reader: callee source with {out}/{res}, LAYER, or a statement kind
    function: str  # Class.method or function name
    file: str  # the file's path (as given to derive)
    line: int
    roles: tuple[str, ...]  # which of {out}/{res} it reads
    in_layer_loop: bool  # inside a loop whose body calls a layer
    may_partial: bool = False  # patched only: {out} read while the set's flag may be True
    passes_flag: bool = False  # the reader call passes the set's flag as a keyword
    reduced_before: bool = False  # a reducer of {out} runs earlier in the same block
    in_deferred_loop: bool = False  # patched only: in a loop whose layer call takes the set's flag


@dataclass(frozen=True)
class Declaration:
    reader: str
    handling: str
    reason: str


@dataclass(frozen=True)
class Replacement:
    statement: str
    reason: str


@dataclass
class Declarations:
    readers: dict[str, Declaration] = field(default_factory=dict)
    replaced: dict[str, Replacement] = field(default_factory=dict)


# ----------------------------------------------------------------------------- declarations
def parse_declarations(text: str, where: str) -> Declarations:
    """A set's readers.toml; PatchSetError naming the file and entry on anything malformed."""
    try:
        data = loads(text)
    except TOMLDecodeError as exc:
        raise PatchSetError(f"{where}: not valid TOML ({exc}). Fix it (format: m3fuse/patching/readers.py).") from None
    unknown = set(data) - {"reader", "replaced"}
    if unknown:
        raise PatchSetError(f"{where}: unknown table(s) {sorted(unknown)}; expected [[reader]] and [[replaced]].")
    out = Declarations()
    for i, entry in enumerate(data.get("reader", []), 1):
        if not isinstance(entry, dict) or set(entry) != {"reader", "handling", "reason"} or not all(
                isinstance(v, str) for v in entry.values()):
            raise PatchSetError(f"{where}: [[reader]] #{i} must have exactly the strings reader, handling, reason.")
        if entry["handling"] not in HANDLINGS:
            raise PatchSetError(f"{where}: [[reader]] #{i} ({entry['reader']}): handling {entry['handling']!r}, "
                                f"expected one of {', '.join(HANDLINGS)}.")
        if not entry["reason"].strip():
            raise PatchSetError(f"{where}: [[reader]] #{i} ({entry['reader']}): the reason is empty; say why.")
        if entry["reader"] in out.readers:
            raise PatchSetError(f"{where}: reader {entry['reader']!r} is declared twice.")
        out.readers[entry["reader"]] = Declaration(entry["reader"], entry["handling"], entry["reason"])
    for i, entry in enumerate(data.get("replaced", []), 1):
        if not isinstance(entry, dict) or set(entry) != {"statement", "reason"} or not all(
                isinstance(v, str) and v.strip() for v in entry.values()):
            raise PatchSetError(f"{where}: [[replaced]] #{i} must have exactly the non-empty strings statement, "
                                f"reason.")
        out.replaced[entry["statement"]] = Replacement(entry["statement"], entry["reason"])
    return out


def load_declarations(folder: Path) -> Declarations:
    """`folder/readers.toml` (bounded, regular file only); PatchSetError if missing or malformed."""
    path = Path(folder) / READERS_FILE
    try:
        raw = safeio.read_regular(path, safeio.MAX_SET_FILE)
    except safeio.Unsafe as exc:
        raise PatchSetError(f"{path}: {exc.reason}; a set's reader declarations are a small text file.") from None
    except FileNotFoundError:
        raise PatchSetError(f"{path}: missing. Every set declares how it handles each reader of a layer's "
                            f"output; copy the base set's {READERS_FILE} and adjust it (docs/releases.md).") from None
    except OSError as exc:
        raise PatchSetError(f"{path}: cannot read ({exc.strerror}).") from exc
    try:
        return parse_declarations(raw.decode("utf-8"), str(path))
    except UnicodeDecodeError:
        raise PatchSetError(f"{path}: not UTF-8 text.") from None


def base_copy(folder: Path) -> dict[str, bytes]:
    """{READERS_FILE: bytes} of a base set, for a set ported from it (its declarations are the
    starting point; the tests then check them against the new release), or {} if it has none."""
    path = Path(folder) / READERS_FILE
    if not path.exists() and not path.is_symlink():
        return {}
    try:
        return {READERS_FILE: safeio.read_regular(path, safeio.MAX_SET_FILE)}
    except safeio.Unsafe as exc:
        raise PatchSetError(f"{path}: {exc.reason}; a set's reader declarations are a small text file.") from None
    except OSError as exc:
        raise PatchSetError(f"{path}: cannot read ({exc.strerror}).") from exc


# ----------------------------------------------------------------------------- derivation
def _src(node: ast.AST) -> str:
    return ast.unparse(node)


def _mentions_layers(node: ast.AST, containers: set[str]) -> bool:
    return any((isinstance(n, ast.Attribute) and n.attr == "layers") or (isinstance(n, ast.Name) and (
        n.id == "layers" or n.id in containers)) for n in ast.walk(node))


def _names(target: ast.AST) -> list[str]:
    return [n.id for n in ast.walk(target) if isinstance(n, ast.Name)]


class _Layers(ast.NodeVisitor):
    """Names that hold decoder layers in one function: loop variables over `.layers`."""

    def __init__(self) -> None:
        self.containers: set[str] = set()
        self.layer_vars: set[str] = set()

    def visit_Assign(self, node: ast.Assign) -> None:
        if any(isinstance(n, ast.Attribute) and n.attr == "layers" for n in ast.walk(node.value)):
            for t in node.targets:
                self.containers.update(_names(t))
        self.generic_visit(node)

    def visit_For(self, node: ast.For) -> None:
        if _mentions_layers(node.iter, self.containers):
            # `for idx, layer in enumerate(layers)`: the last name bound is the layer
            names = _names(node.target)
            if names:
                self.layer_vars.add(names[-1])
        self.generic_visit(node)


def _is_layer_callee(func: ast.AST, layer_vars: set[str], containers: set[str]) -> bool:
    if isinstance(func, ast.Name):
        return func.id in layer_vars
    if isinstance(func, ast.BoolOp):  # `(kernel or layer)(...)`
        return any(_is_layer_callee(v, layer_vars, containers) for v in func.values)
    if isinstance(func, ast.IfExp):
        return _is_layer_callee(func.body, layer_vars, containers) or _is_layer_callee(func.orelse, layer_vars,
                                                                                        containers)
    if isinstance(func, ast.Subscript):  # self.layers[i](...)
        return _mentions_layers(func.value, containers)
    return False


def layer_call(stmt: ast.AST, layer_vars: set[str], containers: set[str]) -> tuple[str, str] | None:
    """(out, res) if `stmt` is `out, res = layer(..., out, res, ...)`."""
    if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Tuple)
            and isinstance(stmt.value, ast.Call)):
        return None
    elts = stmt.targets[0].elts
    if len(elts) != 2 or not all(isinstance(e, ast.Name) for e in elts):
        return None
    out, res = elts[0].id, elts[1].id
    args = [a.id for a in stmt.value.args if isinstance(a, ast.Name)]
    if out in args and res in args and args.index(out) < args.index(res) and _is_layer_callee(
            stmt.value.func, layer_vars, containers):
        return out, res
    return None


def _flag_of(fn: ast.AST) -> str | None:
    for n in ast.walk(fn):
        if isinstance(n, ast.Call):
            for k in n.keywords:
                if k.arg == FLAG_KEYWORD and isinstance(k.value, ast.Name):
                    return k.value.id
    return None


def _callee_name(call: ast.Call) -> str:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


State = dict  # name -> frozenset of origins ({"layer", "other"}); "<flag>" -> frozenset of bools


def _join(a: State | None, b: State | None) -> State | None:
    if a is None:
        return b
    if b is None:
        return a
    return {k: a.get(k, frozenset()) | b.get(k, frozenset()) for k in a.keys() | b.keys()}


class _Walker:
    """Abstract interpretation of one function: where layer outputs flow and who reads them."""

    def __init__(self, fn: ast.FunctionDef, qualname: str, rel: str, prefix: str = ""):
        self.prefix = prefix
        found = _Layers()
        found.visit(fn)
        self.layer_vars, self.containers = found.layer_vars, found.containers
        self.fn, self.qualname, self.rel = fn, qualname, rel
        self.flag = _flag_of(fn)
        self.roles: dict[str, str] = {}  # local name -> {out}/{res}
        self.reads: dict[tuple[int, int, str], Read] = {}
        self.loop_depth_with_layer = 0
        self.deferred_depth = 0

    # -- expressions
    def _parents(self, root: ast.AST) -> dict[ast.AST, ast.AST]:
        return {c: p for p in ast.walk(root) for c in ast.iter_child_nodes(p)}

    def _key(self, expr: ast.AST) -> str:
        # A copy: the names are rewritten to their roles, the caller's tree stays as it is.
        tree = copy.deepcopy(expr)
        for n in ast.walk(tree):
            if isinstance(n, ast.Name) and n.id in self.roles:
                n.id = self.roles[n.id]
        return _src(tree)

    def _read_expr(self, expr: ast.AST | None, state: State, stmt: ast.stmt, kind: str, block: list[ast.stmt],
                   propagate: bool = False) -> bool:
        """Record every read of a layer output in `expr`; True if one flows on (not inside a call)."""
        if expr is None:
            return False
        parents = self._parents(expr)
        flows = False
        for node in ast.walk(expr):
            if not (isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)
                    and "layer" in state.get(node.id, frozenset())):
                continue
            child, p = node, parents.get(node)
            while p is not None and not isinstance(p, ast.Call):
                child, p = p, parents.get(p)
            if p is None:
                if propagate:
                    flows = True
                    continue
                key = kind
                call = None
            else:
                call = p
                if child is p.func:
                    key = self._key(p.func)
                elif _is_layer_callee(p.func, self.layer_vars, self.containers):
                    key = LAYER
                else:
                    key = self._key(p.func)
                if _callee_name(p) == ALL_REDUCE and propagate:
                    flows = True
            role = self.roles.get(node.id, "{out}")
            flag = state.get("<flag>", frozenset({False}))
            may = self.flag is not None and role == "{out}" and True in flag
            passes = call is not None and any(isinstance(k.value, ast.Name) and k.value.id == self.flag
                                              for k in call.keywords)
            before = self._reduced_before(stmt, block)
            k = (node.lineno, node.col_offset, key)
            old = self.reads.get(k)
            roles = tuple(sorted(set((old.roles if old else ())) | {role}))
            self.reads[k] = Read(self.prefix + key, self.qualname, self.rel, node.lineno, roles, self.loop_depth_with_layer > 0,
                                 may or (old.may_partial if old else False), passes, before,
                                 self.deferred_depth > 0)
        return flows

    def _reduced_before(self, stmt: ast.stmt, block: list[ast.stmt]) -> bool:
        """A reducer assigns {out} in a statement before `stmt` in its block, after its last layer call."""
        if stmt not in block:
            return False
        for s in reversed(block[:block.index(stmt)]):
            if layer_call(s, self.layer_vars, self.containers):
                return False
            for n in ast.walk(s):
                if (isinstance(n, ast.Assign) and isinstance(n.value, ast.Call) and _callee_name(n.value) == ALL_REDUCE
                        and any(self.roles.get(t) == "{out}" for t in _names(n.targets[0]))):
                    return True
        return False

    # -- statements
    def block(self, stmts: list[ast.stmt], state: State | None) -> State | None:
        for s in stmts:
            if state is None:
                return None
            state = self.stmt(s, state, stmts)
        return state

    def _assign(self, targets: list[ast.AST], origin: frozenset, state: State) -> State:
        state = dict(state)
        for t in targets:
            for name in _names(t):
                state[name] = origin
        return state

    def stmt(self, s: ast.stmt, state: State, block: list[ast.stmt]) -> State | None:
        lc = layer_call(s, self.layer_vars, self.containers)
        if lc:
            self.roles.setdefault(lc[0], "{out}")
            self.roles.setdefault(lc[1], "{res}")
            self._read_expr(s.value, state, s, "call", block)
            return self._assign(s.targets, frozenset({"layer"}), state)
        if isinstance(s, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            value = s.value
            targets = s.targets if isinstance(s, ast.Assign) else [s.target]
            flows = self._read_expr(value, state, s, "assignment", block, propagate=True)
            if isinstance(s, ast.AugAssign):
                flows = flows or any("layer" in state.get(n, frozenset()) for n in _names(s.target))
            new = self._assign(targets, frozenset({"layer"} if flows else {"other"}), state) if value is not None \
                else state
            if self.flag and any(isinstance(t, ast.Name) and t.id == self.flag for t in targets):
                v = value
                new["<flag>"] = frozenset({v.value}) if isinstance(v, ast.Constant) and isinstance(
                    v.value, bool) else frozenset({True, False})
            if flows and not isinstance(s, ast.AugAssign):
                for name in _names(targets[0]) if targets else ():
                    # a name assigned from the output (x = h + r) reads as the output
                    self.roles.setdefault(name, "{out}")
            return new
        if isinstance(s, ast.If):
            self._read_expr(s.test, state, s, "if", block)
            then, other = self._refine(s.test, state)
            return _join(self.block(s.body, then), self.block(s.orelse, other))
        if isinstance(s, (ast.For, ast.AsyncFor, ast.While)):
            head = s.iter if isinstance(s, (ast.For, ast.AsyncFor)) else s.test
            self._read_expr(head, state, s, "loop", block)
            calls = [n for n in ast.walk(s) if layer_call(n, self.layer_vars, self.containers)]
            with_layer = bool(calls)
            deferred = any(k.arg == FLAG_KEYWORD for c in calls for k in c.value.keywords)
            self.loop_depth_with_layer += with_layer
            self.deferred_depth += deferred
            entry = state
            if isinstance(s, (ast.For, ast.AsyncFor)):
                entry = self._assign([s.target], frozenset({"other"}), state)
            end = None
            for _ in range(3):  # to a fixpoint: the lattice is tiny
                end = self.block(s.body, _join(entry, end) if end is not None else entry)
            self.loop_depth_with_layer -= with_layer
            self.deferred_depth -= deferred
            return self.block(s.orelse, _join(state, end))
        if isinstance(s, (ast.Try, getattr(ast, "TryStar", ast.Try))):
            body = self.block(s.body, state)
            handlers = None
            for h in s.handlers:
                handlers = _join(handlers, self.block(h.body, _join(state, body)))
            after = self.block(s.orelse, body) if body is not None else None
            after = _join(after, handlers)
            return self.block(s.finalbody, after) if s.finalbody else after
        if isinstance(s, (ast.With, ast.AsyncWith)):
            for item in s.items:
                self._read_expr(item.context_expr, state, s, "with", block)
            return self.block(s.body, state)
        if isinstance(s, ast.Return):
            self._read_expr(s.value, state, s, "return", block)
            return None
        if isinstance(s, ast.Raise):
            self._read_expr(s.exc, state, s, "raise", block)
            return None
        if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            return state
        if isinstance(s, ast.Expr):
            self._read_expr(s.value, state, s, "expression", block)
            return state
        for child in ast.iter_child_nodes(s):  # assert, delete, ...: any read counts
            if isinstance(child, ast.expr):
                self._read_expr(child, state, s, type(s).__name__.lower(), block)
        return state

    def _refine(self, test: ast.expr, state: State) -> tuple[State | None, State | None]:
        """The states in an `if`'s two branches, knowing the set's flag's value where the test says it."""
        if self.flag is None:
            return state, state
        flag = state.get("<flag>", frozenset({False}))

        def with_flag(values: frozenset) -> State | None:
            return None if not values else {**state, "<flag>": values}

        if isinstance(test, ast.Name) and test.id == self.flag:
            return with_flag(flag & {True}), with_flag(flag & {False})
        if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not) and isinstance(test.operand, ast.Name) \
                and test.operand.id == self.flag:
            return with_flag(flag & {False}), with_flag(flag & {True})
        if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And) and any(
                isinstance(v, ast.Name) and v.id == self.flag for v in test.values):
            return with_flag(flag & {True}), state
        return state, state


def _functions(tree: ast.Module):
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield f"{node.name}.{sub.name}", sub


def derive(text: str, rel: str = MODEL, prefix: str = "") -> list[Read]:
    """Every read of a decoder layer's output or residual in `text`'s functions, in line order.
    `prefix` starts every key (a file other than the model: its path under the model's package)."""
    tree = pysource.parse(text)
    reads: list[Read] = []
    for qualname, fn in _functions(tree):
        w = _Walker(fn, qualname, rel, prefix)
        if not w.layer_vars and not any(isinstance(n, ast.Call) and isinstance(n.func, ast.Subscript)
                                        and _mentions_layers(n.func.value, set()) for n in ast.walk(fn)):
            continue
        w.block(fn.body, {})
        reads += w.reads.values()
    return sorted(reads, key=lambda r: (r.line, r.key))


def derive_package(files: dict[str, str], model_text: str | None = None) -> list[Read]:
    """The readers in every .py file of the model's package (`files`: path -> text, the release's
    members under PACKAGE), the model file replaced by `model_text` when given (the patched one).
    Keys of other files start with their path under the package, e.g. `mono/runner.py: <layer>`."""
    reads: list[Read] = []
    for rel in sorted(files):
        if not (rel.startswith(PACKAGE) and rel.endswith(".py")):
            continue
        if rel == MODEL:
            reads += derive(model_text if model_text is not None else files[rel], rel)
        else:
            reads += derive(files[rel], rel, prefix=rel[len(PACKAGE):] + ": ")
    return reads


def reader_keys(reads: list[Read]) -> dict[str, list[Read]]:
    """Reads grouped by reader, the set's own reducers left out."""
    out: dict[str, list[Read]] = {}
    for r in reads:
        if r.key.split("(")[0] in REDUCERS:
            continue
        out.setdefault(r.key, []).append(r)
    return out


# ----------------------------------------------------------------------------- checks
def check(pristine: list[Read], patched: list[Read], decl: Declarations, where: str = READERS_FILE) -> list[str]:
    """Problems with a set's handling of the readers derived from its release (pristine and
    patched). Each names the reader and a file:line (of the pristine or the patched text)."""
    problems = []
    up, ours = reader_keys(pristine), reader_keys(patched)
    for key, reads in {**up, **{k: v for k, v in ours.items() if k not in up}}.items():
        if key not in decl.readers:
            r = reads[0]
            side = "the release's" if key in up else "the patched"
            problems.append(f"undeclared reader {key!r} of a layer's output: {r.file}:{r.line} ({side} "
                            f"{r.function}); declare its handling in {where}")
    for key in decl.readers:
        if key not in up and key not in ours:
            problems.append(f"{where}: reader {key!r} is declared but no longer derived from the release; remove it")
    for key, reads in ours.items():
        d = decl.readers.get(key)
        if d is None:
            continue
        for r in reads:
            if not r.may_partial or d.handling == "unreachable":
                continue
            if d.handling == "reduced-by-reader" and not r.passes_flag:
                problems.append(f"reader {key!r} at {r.file}:{r.line} (patched {r.function}) may read a partial sum "
                                f"and does not take the set's flag (declared reduced-by-reader)")
            if d.handling == "reduced-before" and not r.reduced_before:
                problems.append(f"reader {key!r} at {r.file}:{r.line} (patched {r.function}) may read a partial sum "
                                f"with no reduction before it in its block (declared reduced-before)")
    # A reader upstream calls in its layer loop must be called in the set's deferred loop too.
    deferred = {r.key for r in patched if r.in_deferred_loop}
    for key, reads in up.items():
        d = decl.readers.get(key)
        if d is None or d.handling == "unreachable":
            continue
        looped = [r for r in reads if r.in_layer_loop]
        if looped and deferred and key not in deferred:
            problems.append(f"reader {key!r} is called in upstream's layer loop ({looped[0].file}:{looped[0].line}, pristine) "
                            f"but never in the set's deferred loop: the merge put it in upstream's loop only")
    return problems


# ----------------------------------------------------------------------------- the set's loop vs upstream's
def _locals_in_order(fn: ast.FunctionDef, skip: set[str]) -> dict[str, str]:
    """Each local name of `fn` -> a canonical name by the order of its first definition
    (parameters, then stores in source order), so a rename throughout the function changes nothing."""
    spots = [(a.lineno, a.col_offset, a.arg) for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs]
    spots += [(n.lineno, n.col_offset, n.id) for n in ast.walk(fn)
              if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)]
    out: dict[str, str] = {}
    for _, _, name in sorted(spots):
        if name not in out and name not in skip:
            out[name] = f"_v{len(out)}"
    return out


class _Canon(ast.NodeTransformer):
    def __init__(self, names: dict[str, str], flag: str | None):
        self.names, self.flag = names, flag

    def visit_Name(self, node: ast.Name) -> ast.Name:
        return ast.copy_location(ast.Name(self.names.get(node.id, node.id), node.ctx), node)

    def visit_Call(self, node: ast.Call) -> ast.Call:
        self.generic_visit(node)
        node.keywords = [k for k in node.keywords if not (k.arg == FLAG_KEYWORD)]
        return node


def _mentions(node: ast.AST, name: str | None) -> bool:
    return name is not None and any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(node))


def _set_own(stmt: ast.stmt, flag: str | None) -> bool:
    """The set's bookkeeping in its loop: assignments to its flag and `if`s on it."""
    if isinstance(stmt, ast.Assign):
        return any(_mentions(t, flag) for t in stmt.targets)
    if isinstance(stmt, ast.If):
        return _mentions(stmt.test, flag)
    return False


def _function(tree: ast.Module, qualname: str) -> ast.FunctionDef | None:
    return next((fn for q, fn in _functions(tree) if q == qualname), None)


def _layer_loops(fn: ast.FunctionDef) -> list[ast.For]:
    found = _Layers()
    found.visit(fn)
    return [n for n in ast.walk(fn) if isinstance(n, ast.For) and any(
        layer_call(s, found.layer_vars, found.containers) for s in n.body)]


def loop_drift(pristine: str, patched: str, decl: Declarations, rel: str = MODEL) -> list[str]:
    """The set keeps its own copy of upstream's layer loop (the one whose layer call takes its
    flag). Every statement of upstream's loop must have a counterpart in it (compared as ASTs,
    locals renamed by order of definition, the set's flag bookkeeping left out), unless the set
    lists it under [[replaced]] with the reason. Returns the problems (empty: no drift)."""
    new_tree, old_tree = pysource.parse(patched), pysource.parse(pristine)
    problems: list[str] = []
    copies = [(q, fn, loop) for q, fn in _functions(new_tree) for loop in _layer_loops(fn)
              if any(k.arg == FLAG_KEYWORD for s in loop.body if isinstance(s, ast.Assign)
                     and isinstance(s.value, ast.Call) for k in s.value.keywords)]
    if not copies:
        return [f"{rel}: the patched file has no layer loop passing {FLAG_KEYWORD}= (the set's deferred loop)"]
    for qualname, fn, ours in copies:
        up_fn = _function(old_tree, qualname)
        if up_fn is None:
            problems.append(f"{rel}: upstream has no {qualname}, which holds the set's loop (patched line {ours.lineno})")
            continue
        flag = _flag_of(fn)
        canon_new = _Canon(_locals_in_order(fn, {flag} if flag else set()), flag)
        canon_old = _Canon(_locals_in_order(up_fn, set()), None)

        def norm(node: ast.AST, canon: _Canon) -> str:
            return ast.dump(canon.visit(copy.deepcopy(node)), include_attributes=False)

        header = norm(ast.Module([ast.Expr(ours.target), ast.Expr(ours.iter)], []), canon_new)
        candidates = [lp for lp in _layer_loops(up_fn)
                      if norm(ast.Module([ast.Expr(lp.target), ast.Expr(lp.iter)], []), canon_old) == header]
        # the plain loop (a Name layer callee), not the specialised-decode one
        candidates.sort(key=lambda lp: not any(isinstance(s, ast.Assign) and isinstance(s.value, ast.Call)
                                                and isinstance(s.value.func, ast.Name) for s in lp.body))
        if not candidates:
            problems.append(f"{rel}:{ours.lineno}: the set's loop header `for {_src(ours.target)} in {_src(ours.iter)}` "
                            f"matches no layer loop of upstream's {qualname}")
            continue
        up = candidates[0]
        mine = [norm(s, canon_new) for s in ours.body if not _set_own(s, flag)]
        for s in up.body:
            d = norm(s, canon_old)
            if d in mine:
                mine.remove(d)
                continue
            text = _src(s)
            if text in decl.replaced:
                continue
            first = text.splitlines()[0]
            problems.append(f"upstream statement `{first}` ({rel}:{s.lineno}, pristine {qualname}) has no counterpart "
                            f"in the set's loop ({rel}:{ours.lineno}, patched): add it there (reducing first if it reads "
                            f"the layer output) or list it under [[replaced]] in {READERS_FILE} with the reason")
    return problems


def review(pristine_model: bytes, merged_model: bytes, folder: Path) -> list[str]:
    """`port`'s warnings for a written set: the readers check and the loop comparison on the
    model file alone (port holds no other file of the package, so declarations of other files'
    readers are not judged here; tests/test_readers.py judges them). Never raises: a file that
    does not parse or a set without declarations gives one line saying so."""
    try:
        decl = load_declarations(folder)
        old, new = pristine_model.decode("utf-8"), merged_model.decode("utf-8")
        problems = check(derive(old), derive(new), decl, where=str(Path(folder) / READERS_FILE))
        problems = [p for p in problems if not ("is declared but no longer derived" in p and ": " in p.split("'")[1])]
        return problems + loop_drift(old, new, decl)
    except (PatchSetError, SyntaxError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        return [f"readers not checked: {exc}"]


# ----------------------------------------------------------------------------- numerical probes (tests)
def instrument(text: str, probe: str = "__m3_probe__") -> str:
    """`text` with every derived reader call (not the layer calls, not the set's all-reduce)
    routed through `probe(key, callee, *args, **kwargs)`, for a harness that compares what each
    reader produces in the patched model with the release's. The set's fused reducer
    `fused_allreduce_gemma_rms_norm(out, res, NORM)` stands for the reader NORM (it is that
    norm, reduced first), so it is probed under NORM's key."""
    tree = pysource.parse(text)

    class _Wrap(ast.NodeTransformer):
        def __init__(self, walker: _Walker, keys: set[str]):
            self.w, self.keys = walker, keys

        def visit_Call(self, node: ast.Call) -> ast.AST:
            self.generic_visit(node)
            if _is_layer_callee(node.func, self.w.layer_vars, self.w.containers):
                return node
            name = _callee_name(node)
            if name == ALL_REDUCE or name == probe:
                return node
            if name == "fused_allreduce_gemma_rms_norm" and len(node.args) == 3:
                key = self.w._key(node.args[2])
            else:
                key = self.w._key(node.func)
            if key not in self.keys:
                return node
            return ast.copy_location(ast.Call(ast.Name(probe, ast.Load()), [ast.Constant(key), node.func, *node.args],
                                              node.keywords), node)

    for qualname, fn in _functions(tree):
        w = _Walker(fn, qualname, MODEL)
        if not w.layer_vars:
            continue
        w.block(fn.body, {})
        keys = {r.key for r in w.reads.values() if r.key != LAYER and r.key.split("(")[0] not in REDUCERS}
        _Wrap(w, keys).visit(fn)
    return ast.unparse(ast.fix_missing_locations(tree))
