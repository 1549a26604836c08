#!/usr/bin/env python3
"""Mutation testing of one package module with cosmic-ray, against the tests that cover it.

    make mutation MODULE=m3fuse/patching/basechoice.py     # one module, its own test selection
    make mutation MODULE=... SURVIVORS=1                   # only the last run's survivors, again
    python tools/mutation.py --list                        # the modules and their selections

Each mutant is the module with one operator changed, written in place; the module's test
selection (SELECTIONS below: the test files or test ids that exercise it, so one module takes
minutes, not the whole suite's hour) runs with `pytest -x` and must fail. A mutant the
selection does not fail "survived": either a missing test, or an equivalent mutant (no input
can tell it from the original); docs/reliability.md ("Mutation testing") lists the ones judged
equivalent, with the reason, and the per-module counts.

Only the operators that model a programmer's slip run (OPERATORS: a flipped comparison, a
boundary moved by one, `and`/`or`, a dropped `not`, a caught exception type, a skipped loop,
True/False, a dropped decorator); cosmic-ray's exotic replacements (`+` for `<<`, `==` for
`is`, a variable swapped for another) would multiply the run time for little signal.

The module is mutated in the work tree (the tests start `python -m m3fuse` in subprocesses, so
the mutant must be the file on disk). Its original bytes are kept under build/mutation/ and put
back when the run ends, is interrupted, or is started again after a kill.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "build" / "mutation"

# module -> the tests that cover it (pytest node ids or files). Keep each one tight: every
# mutant runs it until the first failure, on a 2-core machine shared with other work.
SELECTIONS: dict[str, list[str]] = {
    "m3fuse/patching/basechoice.py": [
        "tests/test_mut_basechoice.py",
        "tests/test_lineage.py::test_without_from_each_file_takes_the_base_with_fewest_conflicts",
        "tests/test_lineage.py::test_a_tie_goes_to_the_nearest_release_at_or_below",
        "tests/test_lineage.py::test_an_older_helper_generation_is_warned_about"],
    "m3fuse/patching/patchset.py": ["tests/test_mut_patchset.py"],
    "m3fuse/patching/engine.py": ["tests/test_mut_engine.py"],
    "m3fuse/patching/lineage.py": ["tests/test_mut_lineage.py"],
    "m3fuse/wheels/lock.py": ["tests/test_mut_lock.py", "tests/test_lock.py"],
    "m3fuse/wheels/fit.py": ["tests/test_mut_fit.py", "tests/test_fixes_aiter.py"],
    "m3fuse/wheels/fetch.py": ["tests/test_mut_fetch_loop.py", "tests/test_mut_fetch.py"],
    "m3fuse/wheels/install.py": ["tests/test_mut_install.py"],
    "m3fuse/bytecode.py": ["tests/test_mut_bytecode.py", "tests/test_bounded_bytecode.py"],
    "m3fuse/safeio.py": ["tests/test_mut_safeio.py"],
    "m3fuse/entry.py": ["tests/test_interrupt.py::test_the_command_notes_a_signal_from_its_first_statements",
                        "tests/test_interrupt.py::test_a_second_signal_while_the_first_is_reported_is_ignored",
                        "tests/test_interrupt.py::test_the_entry_module_imported_off_the_main_thread_leaves_signals_alone",
                        "tests/test_interrupt.py::test_signals_from_the_first_instant_give_one_line_never_a_traceback"],
}

_CMP = "|".join(["Eq_NotEq", "NotEq_Eq", "Lt_LtE", "LtE_Lt", "Gt_GtE", "GtE_Gt", "Lt_Gt", "Gt_Lt",
                 "LtE_GtE", "GtE_LtE", "Is_IsNot", "IsNot_Is"])
_BIN = "|".join(["Add_Sub", "Sub_Add", "Mul_Div", "Div_Mul", "FloorDiv_Mul", "Mod_FloorDiv", "Pow_Mul",
                 "LShift_RShift", "RShift_LShift", "BitOr_BitAnd", "BitAnd_BitOr", "BitXor_BitOr"])
OPERATORS = [f"core/ReplaceComparisonOperator_({_CMP})", f"core/ReplaceBinaryOperator_({_BIN})",
             "core/ReplaceUnaryOperator_(USub_UAdd|Delete_Not)", "core/AddNot", "core/ReplaceTrueWithFalse",
             "core/ReplaceFalseWithTrue", "core/ReplaceAndWithOr", "core/ReplaceOrWithAnd",
             "core/ReplaceBreakWithContinue", "core/ReplaceContinueWithBreak", "core/ExceptionReplacer",
             "core/NumberReplacer", "core/RemoveDecorator", "core/ZeroIterationForLoop"]

TIMEOUT = 120.0  # per mutant (the selections take seconds); a mutant that hangs them counts as killed


def _slug(module: str) -> str:
    return module.replace("/", "_").removesuffix(".py")


def _restore(module: Path, saved: Path) -> None:
    if saved.is_file():
        data = saved.read_bytes()
        if module.read_bytes() != data:
            module.write_bytes(data)
            print(f"mutation: restored {module} from {saved} (a run was interrupted)", file=sys.stderr)
        saved.unlink()


def _config(module: str, tests: list[str]) -> str:
    # Without the hypothesis plugin pytest starts in a quarter of the CPU time; per mutant that adds up.
    cmd = " ".join([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                    "-p", "no:hypothesispytest", *tests])
    exclude = "^(?!(" + "|".join(OPERATORS) + ")$)"
    return "\n".join([
        "[cosmic-ray]",
        f"module-path = {json.dumps(module)}",
        f"timeout = {TIMEOUT}",
        "excluded-modules = []",
        f"test-command = {json.dumps(cmd)}",
        "[cosmic-ray.distributor]",
        'name = "local"',
        "[cosmic-ray.filters.operators-filter]",
        f"exclude-operators = [{json.dumps(exclude)}]",
        "",
    ])


def _results(db: Path) -> dict:
    con = sqlite3.connect(db)
    rows = con.execute(
        "SELECT m.operator_name, m.start_pos_row, m.start_pos_col, m.occurrence, r.worker_outcome, "
        "r.test_outcome, m.job_id, r.diff FROM mutation_specs m JOIN work_results r ON r.job_id = m.job_id").fetchall()
    con.close()
    # SQLAlchemy stores the enums' names (SURVIVED, SKIPPED, ...)
    rows = [(*r[:4], str(r[4]).lower(), str(r[5]).lower(), *r[6:]) for r in rows]
    tested = [r for r in rows if r[4] != "skipped"]
    survivors = sorted((r for r in tested if r[5] == "survived"), key=lambda r: (r[1], r[2]))
    return {"mutants": len(tested), "killed": sum(r[5] == "killed" for r in tested),
            "incompetent": sum(r[5] == "incompetent" for r in tested),
            "survived": [{"line": r[1], "col": r[2], "operator": r[0], "occurrence": r[3], "job": r[6],
                          "diff": r[7]} for r in survivors]}


def _forget_survivors(db: Path) -> int:
    """Drop the results of the mutants that survived, so `exec` tests them again."""
    con = sqlite3.connect(db)
    with con:
        n = con.execute("DELETE FROM work_results WHERE lower(test_outcome) = 'survived'").rowcount
    con.close()
    return n


def run(module: str, tests: list[str], *, survivors: bool = False) -> int:
    src = REPO / module
    OUT.mkdir(parents=True, exist_ok=True)
    saved = OUT / f"{_slug(module)}.orig"
    _restore(src, saved)
    cfg, db = OUT / f"{_slug(module)}.toml", OUT / f"{_slug(module)}.sqlite"
    cfg.write_text(_config(module, tests))
    if survivors and not db.is_file():
        print(f"mutation: no earlier run of {module} ({db}); run it whole first", file=sys.stderr)
        return 2
    if not survivors:
        db.unlink(missing_ok=True)
    shutil.copyfile(src, saved)
    bin_ = Path(sys.executable).parent
    # A SIGTERM/SIGINT ends cosmic-ray (its process group) and then the module is put back.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    start = time.monotonic()
    try:
        if survivors:
            print(f"mutation: testing the {_forget_survivors(db)} survivor(s) of the last run again")
        else:
            subprocess.run([bin_ / "cosmic-ray", "init", cfg, db], check=True, cwd=REPO)
            subprocess.run([bin_ / "cr-filter-operators", db, cfg], check=True, cwd=REPO)
        base = subprocess.run([bin_ / "cosmic-ray", "baseline", cfg], cwd=REPO)
        if base.returncode != 0:
            print(f"mutation: the unmutated {module} fails its own selection {tests}; fix that first",
                  file=sys.stderr)
            return 1
        subprocess.run([bin_ / "cosmic-ray", "exec", cfg, db], check=True, cwd=REPO)
    finally:
        _restore(src, saved)
    took = time.monotonic() - start
    res = _results(db)
    report = OUT / f"{_slug(module)}.json"
    earlier = json.loads(report.read_text()).get("seconds", 0) if survivors and report.is_file() else 0
    res.update(module=module, tests=tests, seconds=round(took) + earlier)
    report.write_text(json.dumps(res, indent=1) + "\n")
    print(f"mutation: {module}: {res['mutants']} mutants, {res['killed']} killed, "
          f"{len(res['survived'])} survived, {res['incompetent']} incompetent, {res['seconds']} s")
    for s in res["survived"]:
        print(f"  survived: {module}:{s['line']}:{s['col']} {s['operator']} #{s['occurrence']} (job {s['job']})")
    print(f"mutation: `{bin_ / 'cosmic-ray'} dump {db.relative_to(REPO)}` shows each mutant's diff")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("module", nargs="?", help="e.g. m3fuse/safeio.py")
    ap.add_argument("--list", action="store_true", help="print the modules and their test selections")
    ap.add_argument("--survivors", action="store_true",
                    help="test only the mutants that survived the module's last run (after adding tests)")
    args = ap.parse_args(argv)
    if args.list or not args.module:
        for m, t in SELECTIONS.items():
            print(f"{m}: {' '.join(t)}")
        return 0 if args.list else 2
    module = args.module.removeprefix("./")
    if module not in SELECTIONS:
        print(f"mutation: {module} has no test selection; add it to SELECTIONS in {Path(__file__).name} "
              f"(modules: {', '.join(SELECTIONS)})", file=sys.stderr)
        return 2
    return run(module, SELECTIONS[module], survivors=args.survivors)


if __name__ == "__main__":
    sys.exit(main())
