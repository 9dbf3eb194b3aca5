"""Mutation testing: apply each hand-written mutant of `tools/mutants.py` to a scratch copy of the
repository, run the tests that should catch it, and report killed / survived and the score.

    python tools/mutate.py            # every mutant (C++ ones rebuild the extension in the scratch copy)
    python tools/mutate.py --fast     # the reduced set the default suite runs (tests/test_mutation.py)
    python tools/mutate.py --only relu-removed,cpp-bf16-truncates   # some by id
    python tools/mutate.py --list
    python tools/mutate.py --check    # does every mutant still apply exactly once? (seconds; in the suite)

The working tree is never touched: the scratch copy holds the tracked and untracked (not ignored) files,
and imports come from it (``PYTHONPATH``; the editable install's import hook is removed). Python mutants reuse the installed
extension; C++ mutants build it once with CMake (CUDA off) and rebuild the mutated file per mutant (a mutant
that does not compile counts as stillborn, not killed). Before the mutants, the unmutated copy must pass
every selected test (else the run stops: a failing baseline kills everything). A mutant of a cpp kernel
path this CPU cannot run (`Mutant.cpu_path`, e.g. the AVX-512 write-back on an AVX2 machine) is reported
"not run" with the reason and left out of the score: no test here can reach it. Exit status 0 when every
mutant run is killed or accepted (`Mutant.accepted`, with the reason), 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from mutants import MUTANTS, Mutant  # noqa: E402


def scratch_copy(dest: Path) -> None:
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def installed_extension() -> Path:
    out = subprocess.run(
        [sys.executable, "-c", "import lorarar_kernels._C as c; print(c.__file__)"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    return Path(out.stdout.strip())


def env_for(scratch: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(scratch), str(scratch / "python_api")])
    env.setdefault("TRITON_INTERPRET", "1")
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def build_extension(scratch: Path, log) -> bool:
    """(Re)build lorarar_kernels._C in ``scratch/_mutant_build`` and put it in the scratch package."""
    build = scratch / "_mutant_build"
    if not (build / "build.ninja").exists():
        import pybind11

        cmd = ["cmake", "-S", str(scratch), "-B", str(build), "-G", "Ninja", "-DLORARAR_CUDA=OFF",
               "-DCMAKE_BUILD_TYPE=Release", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
               f"-DPython_EXECUTABLE={sys.executable}"]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            log(r.stdout[-2000:] + r.stderr[-2000:])
            raise SystemExit("mutate: cmake configure failed in the scratch copy")
    r = subprocess.run(["cmake", "--build", str(build)], capture_output=True, text=True)
    if r.returncode:
        return False
    (so,) = [p for p in build.glob("_C*.so")]
    for old in (scratch / "lorarar_kernels").glob("_C*.so"):
        old.unlink()
    shutil.copy2(so, scratch / "lorarar_kernels" / so.name)
    return True


# pytest with the editable install's import hook removed (it would import the working tree, not the copy),
# after checking that the packages come from the scratch copy.
_RUN_PYTEST = """
import os, sys
sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("_editable_skbc_")]
import lorarar_kernels
assert lorarar_kernels.__file__.startswith(os.getcwd()), lorarar_kernels.__file__
import pytest
sys.exit(pytest.main(sys.argv[1:]))
"""


def run_tests(scratch: Path, tests, timeout: float) -> tuple[bool, str]:
    """(passed, last lines) of pytest over ``tests`` in the scratch copy."""
    cmd = [sys.executable, "-c", _RUN_PYTEST, "-x", "-q", "-p", "no:cacheprovider", "--no-header", *tests]
    try:
        r = subprocess.run(
            cmd, cwd=scratch, env=env_for(scratch), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return False, "timeout"
    tail = (r.stdout + r.stderr).strip().splitlines()[-1:] or [""]
    return r.returncode == 0, tail[0]


def mutated_texts(root: Path, mutant: Mutant) -> tuple[dict[str, str], list[str]]:
    """(the mutated texts of the files ``mutant`` edits under ``root``, its problems): an edit whose text is
    not found exactly once (``every``: at least once), or that changes nothing, is a problem."""
    texts: dict[str, str] = {}
    problems: list[str] = []
    for f, old, new in mutant.edits():
        if not (root / f).is_file():
            problems.append(f"{f} does not exist")
            continue
        text = texts.get(f) or (root / f).read_text()
        n = text.count(old)
        if old == new:
            problems.append(f"{f}: the edit changes nothing")
        elif n == 0 or (n > 1 and not mutant.every):
            expected = "at least once" if mutant.every else "once"
            problems.append(f"{f} holds its text {n} times (expected {expected})")
        else:
            texts[f] = text.replace(old, new)
    for t in mutant.tests:
        if not (root / t.split("::")[0]).is_file():
            problems.append(f"test target {t} does not exist")
    return texts, problems


def check(root: Path, mutants) -> list[str]:
    """One line per mutant that no longer applies to ``root`` (empty: every one does)."""
    bad = []
    ids = [m.id for m in mutants]
    bad += [f"{i}: the id is used twice" for i in sorted({i for i in ids if ids.count(i) > 1})]
    for m in mutants:
        bad += [f"{m.id}: {p}" for p in mutated_texts(root, m)[1]]
    return bad


def apply(scratch: Path, mutant: Mutant) -> dict[str, str]:
    """Write ``mutant`` into the scratch copy; returns the original texts to put back."""
    texts, problems = mutated_texts(scratch, mutant)
    if problems:
        raise SystemExit(f"mutate: mutant {mutant.id!r}: {'; '.join(problems)}; update tools/mutants.py")
    originals = {f: (scratch / f).read_text() for f in texts}
    for f, text in texts.items():
        (scratch / f).write_text(text)
    return originals


def cannot_run_here(m) -> str | None:
    """Why the cpp kernel path a mutant lives on (`Mutant.cpu_path`) cannot run on this CPU, else None."""
    if not m.cpu_path:
        return None
    from lorarar_kernels.ops import cpu_isa

    return cpu_isa.available()[m.cpu_path]


@contextlib.contextmanager
def scratch_dir(prefix: str, keep: bool, log):
    """A fresh scratch folder for one run; removed afterwards unless ``keep`` (its path is then logged)."""
    scratch = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield scratch
    finally:
        if keep:
            log(f"scratch copy kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


def score_line(results, seconds: float) -> tuple[bool, str]:
    """(every mutant run killed or accepted, the run's score line) for ``[(mutant, verdict, tail)]``:
    killed / (killed + SURVIVED); accepted, stillborn and not-run mutants are counted apart."""
    counted = [r for r in results if r[1] in ("killed", "SURVIVED")]
    killed = sum(r[1] == "killed" for r in counted)
    n = {v: sum(r[1] == v for r in results) for v in ("accepted", "stillborn", "not run")}
    line = (
        f"score: {killed}/{len(counted)} killed = {100 * killed / max(len(counted), 1):.1f} % "
        f"({n['accepted']} accepted survivors, {n['stillborn']} stillborn, "
        f"{n['not run']} not run on this CPU; {seconds:.0f} s)"
    )
    return killed == len(counted), line


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    ap.add_argument("--fast", action="store_true", help="only the reduced set (Mutant.fast)")
    ap.add_argument("--only", default="", help="comma-separated mutant ids")
    ap.add_argument("--python-only", action="store_true", help="skip the C++ mutants (no rebuilds)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument(
        "--check", action="store_true",
        help="only check that every chosen mutant still applies exactly once to the working tree (seconds)",
    )  # fmt: skip
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant's test run")
    ap.add_argument("--keep", action="store_true", help="keep the scratch copy (its path is printed)")
    args = ap.parse_args(argv)
    chosen = list(MUTANTS)
    if args.only:
        ids = set(args.only.split(","))
        unknown = ids - {m.id for m in MUTANTS}
        if unknown:
            raise SystemExit(f"mutate: unknown mutant ids {sorted(unknown)}")
        chosen = [m for m in chosen if m.id in ids]
    if args.fast:
        chosen = [m for m in chosen if m.fast]
    if args.python_only:
        chosen = [m for m in chosen if not m.native]
    if args.check:
        bad = check(ROOT, chosen)
        for line in bad:
            print(f"does not apply: {line}")
        print(f"check: {len(chosen) - len({b.split(':')[0] for b in bad})}/{len(chosen)} mutants apply")
        return 1 if bad else 0
    if args.list:
        for m in chosen:
            print(f"{m.id:40s} {'fast ' if m.fast else ''}{'C++ ' if m.native else ''}{m.file}")
        return 0

    def log(msg: str) -> None:
        print(msg, flush=True)

    t_start = time.perf_counter()
    with scratch_dir("lorarar-mutate-", args.keep, log) as scratch:
        scratch_copy(scratch)
        shutil.copy2(installed_extension(), scratch / "lorarar_kernels")
        tests = sorted({t for m in chosen for t in m.tests})
        ok, tail = run_tests(scratch, tests, args.timeout)
        if not ok:
            log(f"baseline FAILED (unmutated copy): {tail}")
            return 2
        log(f"baseline: {len(tests)} test targets pass on the unmutated copy ({scratch})")
        built = False
        results = []
        for m in sorted(chosen, key=lambda m: m.native):
            t0 = time.perf_counter()
            why = cannot_run_here(m)
            if why is not None:
                results.append((m, "not run", why))
                log(f"{'not run':9s} {m.id}  (its {m.cpu_path} kernel path cannot run on this CPU: {why})")
                continue
            originals = apply(scratch, m)
            try:
                if m.native:
                    if not build_extension(scratch, log):
                        results.append((m, "stillborn", "does not compile"))
                        log(f"{'stillborn':9s} {m.id}")
                        continue
                    built = True
                passed, tail = run_tests(scratch, m.tests, args.timeout)
            finally:
                for f, text in originals.items():
                    (scratch / f).write_text(text)
            verdict = "killed" if not passed else ("accepted" if m.accepted else "SURVIVED")
            results.append((m, verdict, tail))
            log(f"{verdict:9s} {m.id}  ({time.perf_counter() - t0:.0f} s: {tail})")
        if built:
            build_extension(scratch, log)
        all_killed, line = score_line(results, time.perf_counter() - t_start)
        log("")
        log(line)
        for m, verdict, _ in results:
            if verdict == "accepted":
                log(f"  accepted {m.id}: {m.accepted}")
            elif verdict == "SURVIVED":
                log(f"  SURVIVED {m.id}: no test in {list(m.tests)} fails")
        return 0 if all_killed else 1


if __name__ == "__main__":
    sys.exit(main())
