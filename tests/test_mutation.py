"""The reduced mutation run (issue 16): the most important hand-written mutants of `tools/mutants.py`
(`Mutant.fast`: the six survivors of the first mutation run, the method's formula, one C++ rounding
mutant) are applied to a scratch copy of the repository and each must make its tests fail. The full run
is `make mutation` (README, "Testing")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import mutate  # noqa: E402
from mutants import MUTANTS, Mutant  # noqa: E402


def test_every_mutant_still_applies_exactly_once():
    """`tools/mutate.py --check` on the working tree: a refactor that moves or rewrites a mutated line must
    re-target its mutant, never retire it silently (the full run would stop at it; this finds it in seconds)."""
    assert mutate.check(ROOT, MUTANTS) == []
    assert all(m.tests for m in MUTANTS)
    assert mutate.main(["--check"]) == 0


def test_check_reports_a_mutant_that_no_longer_applies():
    """The check itself can fail: text not in the file, text twice, a no-op edit, a missing file or test
    target, a duplicate id are each reported by id."""
    rule = "lorarar_kernels/rule.py"
    twice = "import"  # surely more than once in rule.py
    broken = (
        Mutant("gone", rule, (("this text is in no file", "x"),), ("tests/test_rule.py",)),
        Mutant("twice", rule, ((twice, "x"),), ("tests/test_rule.py",)),
        Mutant("noop", rule, (("def ", "def "),), ("tests/test_rule.py",), every=True),
        Mutant("no-file", "lorarar_kernels/no_such_file.py", (("a", "b"),), ("tests/test_rule.py",)),
        Mutant("no-test", rule, (("def ", "def  "),), ("tests/test_no_such_file.py",), every=True),
        MUTANTS[0],
        MUTANTS[0],
    )
    lines = mutate.check(ROOT, broken)
    for mid, what in [("gone", "0 times"), ("twice", "times (expected once)"), ("noop", "changes nothing"),
                      ("no-file", "does not exist"), ("no-test", "test target"),
                      (MUTANTS[0].id, "used twice")]:  # fmt: skip
        assert any(line.startswith(f"{mid}: ") and what in line for line in lines), (mid, lines)
    assert len(lines) == 6, lines


def test_reduced_mutation_run_kills_every_mutant():
    if not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout (the scratch copy is made from `git ls-files`)")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "mutate.py"), "--fast"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "SURVIVED" not in proc.stdout and "killed" in proc.stdout


def test_cosmic_ray_profiles_name_files_and_tests_that_exist():
    """`tools/mutate_cosmic_ray.py --profile engine` (README, "Testing"): every engine file it mutates and
    every test target it runs exists (a renamed test would otherwise make the documented run fail late),
    and the scripts it writes into the scratch copy are valid Python."""
    import mutate_cosmic_ray as cr

    for files in cr.PROFILES.values():
        assert files
        for f, tests in files.items():
            assert (ROOT / f).is_file() and f.startswith(("lorarar_kernels/", "python_api/lorarar/")), f
            assert tests, f
            for t in tests:
                path, _, name = t.partition("::")
                assert (ROOT / path).is_file(), t
                assert not name or f"def {name}(" in (ROOT / path).read_text(), t
    for script in (cr._FORK_SERVER, cr._CLIENT, mutate._RUN_PYTEST):
        compile(script, "<scratch script>", "exec")


def test_cosmic_ray_recheck_reads_the_survivors_and_compares_diffs_by_their_changed_lines():
    """``--recheck`` takes only the survived mutants of a session (not the killed, the filtered or the not
    run ones) and calls a re-applied mutant "moved" unless its changed lines are the recorded ones."""
    import json

    import mutate_cosmic_ray as cr

    def line(outcome, op="core/AddNot", occurrence=0, worker="normal"):
        mut = {"module_path": "lorarar_kernels/plan.py", "operator_name": op, "occurrence": occurrence,
               "start_pos": [7, 4], "end_pos": [7, 9]}  # fmt: skip
        diff = "--- mutation diff ---\n--- a/x\n+++ b/x\n@@ -7 +7 @@\n-    a = 1\n+    a = 2\n"
        result = (
            None if outcome is None else {"worker_outcome": worker, "test_outcome": outcome, "diff": diff}
        )
        return json.dumps([{"mutations": [mut]}, result])

    dump = "\n".join(
        [line("killed"), line("survived", occurrence=3), line(None), line("survived", worker="skipped")]
    )
    (only,) = cr.survivors(dump)
    assert (only["module_path"], only["operator"], only["occurrence"], only["line"]) == (
        "lorarar_kernels/plan.py", "core/AddNot", 3, 7,
    )  # fmt: skip
    same = "--- -\n+++ lorarar_kernels/plan.py\n@@ -7,1 +7,1 @@\n-    a = 1\n+    a = 2\n"
    assert cr._changed_lines(same) == cr._changed_lines(only["diff"]) == ["-    a = 1", "+    a = 2"]
    assert cr._changed_lines(same.replace("a = 2", "a = 3")) != cr._changed_lines(only["diff"])
