"""Generated mutation testing with cosmic-ray over chosen engine files, on a scratch copy of the repository
(the hand-written mutants of `tools/mutate.py` cover the C++ kernels and the promises; this covers every
operator, comparison, constant and keyword of the files it is given).

cosmic-ray is not a project dependency: install it in its own virtual environment and pass its command:

    python3 -m venv /tmp/cr && /tmp/cr/bin/pip install cosmic-ray
    python tools/mutate_cosmic_ray.py --cosmic-ray /tmp/cr/bin/cosmic-ray \\
        --files lorarar_kernels/plan.py --tests tests/test_plan.py,tests/test_oracle.py

The scratch copy holds the tracked and untracked (not ignored) files and the installed extension; the
tests run from it with the project's Python (``PYTHONPATH``; the editable install's import hook removed),
so the working tree is never touched. Prints every survivor with its diff and the
score (exit status 1 when a mutant survives); ``--keep`` keeps the copy and its session database. Operators that only rewrite a number's bits or
swap an operator for a bitwise or exotic one are left out by default (``--all-operators`` keeps them):
those mutants crash or are caught as the plain ones are, and they triple the run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from mutate import _RUN_PYTEST, env_for, installed_extension, scratch_copy  # noqa: E402

# cosmic-ray operator names (regular expressions, matched from the start) left out by default
EXOTIC = [
    r"core/ReplaceBinaryOperator_.*_(FloorDiv|Mod|Pow|RShift|LShift|BitOr|BitAnd|BitXor)$",
    r"core/ReplaceBinaryOperator_(FloorDiv|Mod|Pow|RShift|LShift|BitOr|BitAnd|BitXor)_",
    r"core/NumberReplacer",
]


def toml_list(items) -> str:
    return "[" + ", ".join(repr(str(i)).replace("'", '"') for i in items) + "]"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cosmic-ray", default="cosmic-ray", help="the cosmic-ray command (its own venv)")
    ap.add_argument("--files", required=True, help="comma-separated files to mutate (repository-relative)")
    ap.add_argument("--tests", required=True, help="comma-separated pytest targets that should catch them")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant's test run")
    ap.add_argument("--all-operators", action="store_true", help="keep the exotic operators too")
    ap.add_argument("--keep", action="store_true", help="keep the scratch copy (its path is printed)")
    args = ap.parse_args(argv)
    cr = Path(shutil.which(args.cosmic_ray) or args.cosmic_ray)
    if not cr.is_file():
        raise SystemExit(f"mutate_cosmic_ray: {args.cosmic_ray} not found; install cosmic-ray (see --help)")
    files, tests = args.files.split(","), args.tests.split(",")
    for f in files + [t.split("::")[0] for t in tests]:
        if not (ROOT / f).is_file():
            raise SystemExit(f"mutate_cosmic_ray: {f} does not exist")

    scratch = Path(tempfile.mkdtemp(prefix="lorarar-cosmic-ray-"))
    t0 = time.perf_counter()
    try:
        scratch_copy(scratch)
        shutil.copy2(installed_extension(), scratch / "lorarar_kernels")
        (scratch / "_run_pytest.py").write_text(_RUN_PYTEST)
        test_cmd = " ".join(
            [sys.executable, str(scratch / "_run_pytest.py"), "-x", "-q", "-p", "no:cacheprovider", *tests]
        )
        exclude = [] if args.all_operators else EXOTIC
        (scratch / "cosmic-ray.toml").write_text(
            "[cosmic-ray]\n"
            f"module-path = {toml_list(files)}\n"
            f"timeout = {args.timeout}\n"
            "excluded-modules = []\n"
            f"test-command = {toml_list([test_cmd])[1:-1]}\n\n"
            '[cosmic-ray.distributor]\nname = "local"\n\n'
            f"[cosmic-ray.filters.operators-filter]\nexclude-operators = {toml_list(exclude)}\n"
        )
        env = env_for(scratch)
        bin_dir = cr.parent

        def step(*cmd: str) -> str:
            r = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(
                    f"mutate_cosmic_ray: {' '.join(cmd[:2])} failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}"
                )
            return r.stdout

        step(str(cr), "init", "cosmic-ray.toml", "session.sqlite")
        step(str(bin_dir / "cr-filter-operators"), "session.sqlite", "cosmic-ray.toml")
        step(str(cr), "baseline", "cosmic-ray.toml")  # the unmutated copy must pass
        step(str(cr), "exec", "cosmic-ray.toml", "session.sqlite")
        killed, survived = [], []
        for line in step(str(cr), "dump", "session.sqlite").splitlines():
            item, result = json.loads(line)
            if result is None or result.get("worker_outcome") != "normal":
                continue  # filtered out (operator left out) or not run
            (killed if result["test_outcome"] == "killed" else survived).append((item, result))
        for item, result in survived:
            (mut,) = item["mutations"]
            print(f"SURVIVED {mut['module_path']}:{mut['start_pos'][0]} {mut['operator_name']}")
            print("".join(result["diff"]).rstrip() if isinstance(result["diff"], list) else result["diff"])
        n = len(killed) + len(survived)
        print(
            f"score: {len(killed)}/{n} killed = {100 * len(killed) / max(n, 1):.1f} % "
            f"(files {files}; tests {tests}; {time.perf_counter() - t0:.0f} s)"
        )
        return 0 if not survived else 1
    finally:
        if args.keep:
            print(f"scratch copy kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
