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
from mutants import MUTANTS  # noqa: E402


def test_mutant_list_is_well_formed():
    ids = [m.id for m in MUTANTS]
    assert len(ids) == len(set(ids))
    for m in MUTANTS:
        assert m.tests and all((ROOT / t.split("::")[0]).is_file() for t in m.tests), m.id
        for f, old, new in m.edits():
            text = (ROOT / f).read_text()
            assert old != new and (text.count(old) == 1 or (m.every and text.count(old) > 1)), (m.id, f)


def test_reduced_mutation_run_kills_every_mutant():
    if not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout (the scratch copy is made from `git ls-files`)")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "mutate.py"), "--fast"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "SURVIVED" not in proc.stdout and "killed" in proc.stdout
