"""The generated C++ mutants of `tools/mutate_cpp.py` (the CPU kernels' mutation score, README "Testing"):
sites only in code, each mutant one exact edit, ids unique and stable, the sample seeded and spread over
the files. The run itself (rebuilds and kernel tests per mutant) is `python tools/mutate_cpp.py`."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import mutate_cpp  # noqa: E402

SNIPPET = """// a < b in a comment, 7 too
#define LIMIT (1 << 4)
#pragma omp parallel for \\
    if (n > 1)
const char* s = "x < y && 3";  /* a > b */ int k = 0;
for (int i = 0; i < n && !done; i += 2) acc[i * 4] = a - b;
template <int NR> void f();
int64_t v = 0x7FFFu >> 16;
"""


def sites(ms):
    return {(m.line, m.old, m.new) for m in ms}


def test_comments_strings_and_preprocessor_lines_are_never_mutated():
    ms = mutate_cpp.mutants_of("csrc/x.cpp", SNIPPET)
    assert {m.line for m in ms} == {5, 6, 8}, sites(ms)  # code lines only (the template line is skipped)
    assert sites(m for m in ms if m.line == 5) == {(5, "0", "1")}  # not the string's `<`, `&&`, `3`
    assert sites(m for m in ms if m.line == 6) == {
        (6, "0", "1"), (6, "<", "<="), (6, "&&", "||"), (6, "!", ""), (6, "+=", "-="), (6, "2", "3"),
        (6, "*", "/"), (6, "4", "5"), (6, "-", "+"),
    }  # fmt: skip
    assert sites(m for m in ms if m.line == 8) == {
        (8, "0x7FFFu", "0x8000u"),
        (8, ">>", "<<"),
        (8, "16", "17"),
    }


def test_each_mutant_is_one_exact_edit_of_its_line():
    ms = mutate_cpp.mutants_of("csrc/x.cpp", SNIPPET)
    lines = SNIPPET.split("\n")
    for m in ms:
        out = m.apply(SNIPPET).split("\n")
        changed = [i for i, (a, b) in enumerate(zip(lines, out)) if a != b]
        assert changed == [m.line - 1], m
        assert out[m.line - 1] == lines[m.line - 1][: m.col] + m.new + lines[m.line - 1][m.col + len(m.old) :]
    assert len({m.id for m in ms}) == len(ms)


def test_the_kernel_files_give_unique_ids_and_a_seeded_spread_sample():
    ms = mutate_cpp.all_mutants()
    assert {f for f in mutate_cpp.FILES if f.endswith(".cpp")} <= {m.file for m in ms}  # every kernel file
    assert all(f.startswith("csrc/cpu_") for f in mutate_cpp.FILES)
    assert len({m.id for m in ms}) == len(ms)
    a, b = mutate_cpp.sample(ms, 100, seed=3), mutate_cpp.sample(ms, 100, seed=3)
    assert a == b and mutate_cpp.sample(ms, 100, seed=4) != a
    assert {m.file for m in a} == {m.file for m in ms}  # every file gets its share
    assert 90 <= len(a) <= 110 and len(set(a)) == len(a)
    for f in mutate_cpp.FILE_PATH:
        assert f in mutate_cpp.FILES  # each path-only file exists (renames must update the table)


def test_ids_name_their_site_and_select_it(capsys):
    m = mutate_cpp.all_mutants(files=("csrc/cpu_convert.h",))[0]
    assert mutate_cpp.main(["--files", "cpu_convert.h", "--ids", m.id, "--list"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(m.id) and "1 mutants in 1 files" in out
