"""Generated mutation testing of the CPU kernels (`csrc/cpu_*`): every comparison, arithmetic and logical
operator, compound assignment, shift, logical negation and integer literal of the C++ is mutated in turn
(what cosmic-ray does for the Python, which it cannot reach here), the extension is rebuilt in a scratch
copy and the kernel tests must fail.

    python tools/mutate_cpp.py --list                        # every mutant, one line each, and the count
    python tools/mutate_cpp.py --sample 200 --seed 0         # a seeded sample, spread over the files
    python tools/mutate_cpp.py --files cpu_convert.h         # every mutant of some files
    python tools/mutate_cpp.py --ids cpu_pack.cpp:88:12:ror  # some mutants by id (a rerun of survivors)

Operators (one mutant per site and replacement; the C++ is clang-formatted, so a binary operator is the
one with a space on both sides): `<` `<=` `>` `>=` `==` `!=` to their boundary or negated neighbour; `+`
`-` `*` `/` to their opposite; `+=` `-=` `*=` `|=` and `&&` `||` `<<` `>>` swapped; a `!` removed; an
integer literal n to n + 1 (0 to 1). Comments, strings and preprocessor lines are never mutated.
A mutant that does not compile is "stillborn" and not counted; one of the AVX2, AVX-512 or AMX code on a
CPU that cannot run that path is "not run here" (no test can reach it) and not counted. The score is
killed / (killed + survived); every survivor is printed with its line, to be sorted in
docs/mutation-survivors.md (equivalent, or the test that now kills it). Uses `tools/mutate.py`'s scratch
copy, build and test runner; the working tree is never touched.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import mutate  # noqa: E402

FILES = tuple(sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").glob("cpu_*") if p.is_file()))
# the kernel path a file's code runs on alone (cpu_isa.PATHS); the other files run on every path
FILE_PATH = {"csrc/cpu_apply_avx2.cpp": "avx2", "csrc/cpu_apply_avx512.cpp": "avx512",
             "csrc/cpu_avx512_io.h": "avx512", "csrc/cpu_apply_amx.cpp": "amx"}  # fmt: skip
# fastest to fail first; -x stops at the first failure
TESTS = ("tests/test_cpu_isa_rules.py", "tests/test_ops_ties.py", "tests/test_ops_cpu_isa.py",
         "tests/test_ops_native.py", "tests/test_ops_native_sources.py", "tests/test_ops_pack.py",
         "tests/test_ops_nonfinite.py", "tests/test_oracle.py", "tests/test_merge_in_place.py")  # fmt: skip

# (kind, regex of the site, replacements): binary operators need a space on both sides
_SPACED = [
    ("ror", "<", ("<=",)), ("ror", "<=", ("<",)), ("ror", ">", (">=",)), ("ror", ">=", (">",)),
    ("ror", "==", ("!=",)), ("ror", "!=", ("==",)),
    ("aor", "+", ("-",)), ("aor", "-", ("+",)), ("aor", "*", ("/",)), ("aor", "/", ("*",)),
    ("asr", "+=", ("-=",)), ("asr", "-=", ("+=",)), ("asr", "*=", ("/=",)), ("asr", "|=", ("&=",)),
    ("lcr", "&&", ("||",)), ("lcr", "||", ("&&",)), ("sor", "<<", (">>",)), ("sor", ">>", ("<<",)),
]  # fmt: skip
_OPS = {op: (kind, reps) for kind, op, reps in _SPACED}
_SPACED_RE = re.compile(
    r"(?<= )(" + "|".join(re.escape(op) for op in sorted(_OPS, key=len, reverse=True)) + r")(?= )"
)
_NOT_RE = re.compile(r"!(?!=)")
_INT_RE = re.compile(r"(?<![\w.])(0[xX][0-9a-fA-F]+|\d+)([uUlL]*)(?![\w.])")


@dataclass(frozen=True)
class CppMutant:
    file: str
    line: int  # 1-based
    col: int  # 0-based column of the site in the line
    kind: str
    old: str
    new: str

    @property
    def id(self) -> str:
        return f"{Path(self.file).name}:{self.line}:{self.col}:{self.kind}"

    def apply(self, text: str) -> str:
        lines = text.split("\n")
        s = lines[self.line - 1]
        assert s[self.col : self.col + len(self.old)] == self.old, (self.id, s)
        lines[self.line - 1] = s[: self.col] + self.new + s[self.col + len(self.old) :]
        return "\n".join(lines)


def code_mask(text: str) -> list[str]:
    """Each line with its comments, string and char literals and preprocessor lines blanked to spaces (so
    that sites are found in code only; columns are kept)."""
    out, in_block, in_pp = [], False, False
    for line in text.split("\n"):
        chars = list(line)
        if in_pp or (not in_block and line.lstrip().startswith("#")):
            in_pp = line.rstrip().endswith("\\")
            out.append(" " * len(line))
            continue
        i = 0
        while i < len(chars):
            two = line[i : i + 2]
            if in_block:
                if two == "*/":
                    chars[i] = chars[i + 1] = " "
                    in_block = False
                    i += 2
                    continue
                chars[i] = " "
            elif two == "/*":
                in_block = True
                chars[i] = chars[i + 1] = " "
                i += 2
                continue
            elif two == "//":
                chars[i:] = " " * (len(chars) - i)
                break
            elif line[i] in "\"'":
                q, j = line[i], i + 1
                while j < len(line) and line[j] != q:
                    j += 2 if line[j] == "\\" else 1
                for k in range(i, min(j + 1, len(chars))):
                    chars[k] = " "
                i = j + 1
                continue
            i += 1
        out.append("".join(chars))
    return out


def mutants_of(file: str, text: str) -> list[CppMutant]:
    found: list[CppMutant] = []
    for n, code in enumerate(code_mask(text), start=1):
        if not code.strip() or code.lstrip().startswith("template"):
            continue
        for m in _SPACED_RE.finditer(code):
            kind, reps = _OPS[m.group(1)]
            found += [CppMutant(file, n, m.start(), kind, m.group(1), r) for r in reps]
        for m in _NOT_RE.finditer(code):
            found.append(CppMutant(file, n, m.start(), "not", "!", ""))
        for m in _INT_RE.finditer(code):
            digits, suffix = m.group(1), m.group(2)
            value = int(digits, 16) if digits[:2].lower() == "0x" else int(digits)
            new = (hex(value + 1) if digits[:2].lower() == "0x" else str(value + 1)) + suffix
            found.append(CppMutant(file, n, m.start(), "crp", m.group(0), new))
    return found


def all_mutants(root: Path = ROOT, files=FILES) -> list[CppMutant]:
    return [m for f in files for m in mutants_of(f, (root / f).read_text())]


def sample(mutants: list[CppMutant], n: int, seed: int) -> list[CppMutant]:
    """``n`` mutants drawn without replacement, each file getting its share (at least one), file order kept."""
    if n >= len(mutants):
        return list(mutants)
    rng = random.Random(seed)
    by_file: dict[str, list[CppMutant]] = {}
    for m in mutants:
        by_file.setdefault(m.file, []).append(m)
    picked: list[CppMutant] = []
    for ms in by_file.values():
        k = max(1, round(n * len(ms) / len(mutants)))
        picked += sorted(rng.sample(ms, min(k, len(ms))), key=lambda m: (m.line, m.col, m.new))
    return picked


def cannot_run_here(file: str) -> str | None:
    path = FILE_PATH.get(file)
    if path is None:
        return None
    from lorarar_kernels.ops import cpu_isa

    return cpu_isa.available()[path]


def main(argv=None) -> int:
    doc = __doc__.split("\n\n")
    ap = argparse.ArgumentParser(description=doc[0], epilog="\n\n".join(doc[1:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument(
        "--files", default="", help="comma-separated csrc file names (default: every csrc/cpu_* file)"
    )
    ap.add_argument("--ids", default="", help="comma-separated mutant ids (from --list or a report)")
    ap.add_argument("--sample", type=int, default=0, help="run a seeded sample of this many (0: all chosen)")
    ap.add_argument("--seed", type=int, default=0, help="the sample's seed (0)")
    ap.add_argument("--list", action="store_true", help="list the chosen mutants and exit")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant's test run (300)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch copy")
    args = ap.parse_args(argv)
    files = FILES
    if args.files:
        wanted = {w if w.startswith("csrc/") else f"csrc/{w}" for w in args.files.split(",")}
        if not wanted <= set(FILES):
            raise SystemExit(
                f"mutate_cpp: not CPU kernel files: {sorted(wanted - set(FILES))} (have {FILES})"
            )
        files = tuple(f for f in FILES if f in wanted)
    chosen = all_mutants(ROOT, files)
    if args.ids:
        ids = args.ids.split(",")
        by_id = {m.id: m for m in chosen}
        if set(ids) - set(by_id):
            raise SystemExit(f"mutate_cpp: unknown ids {sorted(set(ids) - set(by_id))} (--list shows them)")
        chosen = [by_id[i] for i in ids]
    if args.sample:
        chosen = sample(chosen, args.sample, args.seed)
    if args.list:
        texts = {f: (ROOT / f).read_text().split("\n") for f in files}
        for m in chosen:
            print(f"{m.id:40s} {texts[m.file][m.line - 1].strip()[:90]}")
        print(f"{len(chosen)} mutants in {len(files)} files")
        return 0

    def log(msg: str) -> None:
        print(msg, flush=True)

    t_start = time.perf_counter()
    results: list[tuple[CppMutant, str, str]] = []
    with mutate.scratch_dir("lorarar-mutate-cpp-", args.keep, log) as scratch:
        mutate.scratch_copy(scratch)
        if not mutate.build_extension(scratch, log):
            raise SystemExit("mutate_cpp: the unmutated copy does not build")
        ok, tail = mutate.run_tests(scratch, TESTS, args.timeout)
        if not ok:
            log(f"baseline FAILED (unmutated copy): {tail}")
            return 2
        log(
            f"baseline: {len(TESTS)} test files pass on the unmutated copy; {len(chosen)} mutants ({scratch})"
        )
        for i, m in enumerate(chosen, start=1):
            t0 = time.perf_counter()
            why = cannot_run_here(m.file)
            if why is not None:
                results.append((m, "not run", why))
                log(f"[{i}/{len(chosen)}] not run   {m.id}  ({why})")
                continue
            original = (scratch / m.file).read_text()
            try:
                (scratch / m.file).write_text(m.apply(original))
                if not mutate.build_extension(scratch, log):
                    verdict, tail = "stillborn", "does not compile"
                else:
                    passed, tail = mutate.run_tests(scratch, TESTS, args.timeout)
                    verdict = "SURVIVED" if passed else "killed"
            finally:
                (scratch / m.file).write_text(original)
            results.append((m, verdict, tail))
            log(f"[{i}/{len(chosen)}] {verdict:9s} {m.id}  ({time.perf_counter() - t0:.0f} s: {tail})")
        all_killed, line = mutate.score_line(results, time.perf_counter() - t_start)
        log("")
        log(line)
        texts = {f: (ROOT / f).read_text().split("\n") for f in {m.file for m, _, _ in results}}
        for m, verdict, _ in results:
            if verdict == "SURVIVED":
                log(f"  SURVIVED {m.id}  {m.old!r} -> {m.new!r}  in: {texts[m.file][m.line - 1].strip()}")
        return 0 if all_killed else 1


if __name__ == "__main__":
    sys.exit(main())
