"""Generated mutation testing with cosmic-ray over engine files, on a scratch copy of the repository
(the hand-written mutants of `tools/mutate.py` cover the C++ kernels and the promises; this covers every
operator, comparison, constant and keyword of the files it is given).

cosmic-ray is not a project dependency: install it in its own virtual environment and pass its command:

    python3 -m venv /tmp/cr && /tmp/cr/bin/pip install cosmic-ray
    python tools/mutate_cosmic_ray.py --cosmic-ray /tmp/cr/bin/cosmic-ray --profile engine
    python tools/mutate_cosmic_ray.py --cosmic-ray /tmp/cr/bin/cosmic-ray --profile engine --only rule.py
    python tools/mutate_cosmic_ray.py --cosmic-ray /tmp/cr/bin/cosmic-ray \\
        --files lorarar_kernels/plan.py --tests tests/test_plan.py,tests/test_oracle.py

``--profile engine`` mutates each engine file of `PROFILES` with its own tests (the test files that
exercise it, fastest to fail first), one cosmic-ray session per file; ``--only`` picks some of them by
file name. The scratch copy holds the tracked and untracked (not ignored) files and the installed
extension; the tests run from it with the project's Python (``PYTHONPATH``; the editable install's import
hook removed), so the working tree is never touched. Each mutant's pytest run is forked from a server
process that has imported torch and pytest once (but nothing of the project), which saves seconds per
mutant; the test files run one at a time, in their order, up to the first that fails; a test run that
cannot reach the server runs pytest itself. Prints every survivor with its diff
and the score per file (exit status 1 when a mutant survives); ``--report FILE`` writes the same as
markdown; ``--dump SQLITE...`` only reports sessions kept with ``--keep`` (or interrupted: the mutants
not run yet are counted apart); ``--keep`` keeps the copy and its session databases. ``--recheck
SQLITE...`` runs each survivor of kept sessions again, against the tests as they are now (the file's
tests of ``--profile`` or ``--tests``), on a fresh scratch copy: it re-applies the mutant with ``cosmic-ray
apply``, checks that the diff is the one recorded (else the file changed since and the mutant is reported
"moved"), and reports which are killed since and which still survive. On a machine without a usable GPU
the mutants of the `GPU_ONLY` definitions are left out (cr-filter-lines) and counted apart. Operators that only rewrite a number's bits
or swap an operator for a bitwise or exotic one are left out by default (``--all-operators`` keeps them):
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

# Top-level definitions whose code runs only on a CUDA GPU with the extension built for it: on any other
# machine their mutants are left out of the run (no test can reach them; each would survive after running
# every test file) and reported apart as "GPU only, not run".
GPU_ONLY: dict[str, tuple[str, ...]] = {
    "lorarar_kernels/ops/native.py": ("CudaPlan", "_Cuda", "cuda_coefficients"),
}


def gpu_usable() -> bool:
    """Whether this machine runs the cuda kernels (a CUDA device and an extension built with CUDA)."""
    code = "import torch, lorarar_kernels.ops.native as n; print(torch.cuda.is_available() and n.compiled_with_cuda())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    return out.stdout.strip() == "True"


def kept_lines(path: Path, names) -> list[str]:
    """``"a-b"`` line ranges of ``path`` outside its top-level definitions ``names`` (cr-filter-lines keeps
    the mutants inside the ranges)."""
    import ast

    tree = ast.parse(path.read_text())
    spans = sorted(
        (min([n.lineno, *(d.lineno for d in getattr(n, "decorator_list", []))]), n.end_lineno)
        for n in tree.body
        if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and n.name in names
    )
    missing = set(names) - {n.name for n in tree.body if hasattr(n, "name")}
    if missing:
        raise SystemExit(f"mutate_cosmic_ray: GPU_ONLY names {sorted(missing)} not defined in {path}")
    ranges, start = [], 1
    for a, b in spans:
        if a > start:
            ranges.append(f"{start}-{a - 1}")
        start = b + 1
    last = len(path.read_text().splitlines())
    if start <= last:
        ranges.append(f"{start}-{last}")
    return ranges


def _live(dump: str) -> int:
    return sum(
        1 for line in dump.splitlines() if (json.loads(line)[1] or {}).get("worker_outcome") != "skipped"
    )


# every formats file: the format tests, fastest first
FORMAT_TESTS = (
    "tests/test_formats_refusals.py",  # pure, ~1 s: each reader's refusals
    "tests/test_formats_scales.py",  # pure: which metadata config a layer's scale comes from
    "tests/test_formats_names.py",
    "tests/test_formats_loading.py",
    "tests/test_formats_legacy.py",
    "tests/test_formats_kohya.py",
    "tests/test_formats_peft.py",
    "tests/test_formats_transformers.py",
    "tests/test_formats_oracles.py",  # against diffusers / PEFT / kohya's own loaders, on their files
    "tests/test_robust_inputs.py",
)

# The engine files and, for each, the test files that exercise it (chosen by what they import and call),
# ordered so that a wrong mutant usually fails in the first, fastest one (pytest runs with -x).
PROFILES: dict[str, dict[str, tuple[str, ...]]] = {
    "engine": {
        "lorarar_kernels/rule.py": (
            "tests/test_rule_refusals.py",
            "tests/test_rule.py",
            "tests/test_merge_errors.py",
            "tests/test_plan.py",
            "tests/test_rule_transformer_parts.py",
            "tests/test_robust_inputs.py::test_complex_or_text_coefficients_are_refused",
            "tests/test_robust_inputs.py::test_a_non_sequence_hyper_parts_is_refused",
            "tests/test_robust_inputs.py::test_wrong_argument_kinds_are_refused_before_anything_is_written",
        ),
        "lorarar_kernels/plan.py": ("tests/test_plan.py", "tests/test_rule.py"),
        "lorarar_kernels/arguments.py": (
            "tests/test_arguments.py",
            "tests/test_robust_inputs.py::test_wrong_argument_kinds_are_refused_before_anything_is_written",
            "tests/test_merge_errors.py",
        ),
        "lorarar_kernels/target_state.py": (
            "tests/test_merge_promises.py",
            "tests/test_transactional.py",
            "tests/test_merge_state.py",
            "tests/test_merge_errors.py",
            "tests/test_merge_in_place.py",
            # accelerate's real offload hooks move the weights: the only tests of moves_weights / _form
            "tests/test_pipeline_offload.py",
            # PEFT's fuse_lora / unfuse_lora while a pair is merged: the only tests of the fused-adapter check
            "tests/test_pipeline_peft_fuse.py",
        ),
        "lorarar_kernels/merge.py": (
            "tests/test_merge_promises.py",
            "tests/test_merge_state.py",
            "tests/test_merge_errors.py",
            "tests/test_transactional.py",
            "tests/test_merge_in_place.py",
            "tests/test_merge.py",
            "tests/test_robust_inputs.py",  # meta, tied, conv-kernel refusals
        ),
        # the triton kernel runs in triton's interpreter on the CPU; the cuda one only where CUDA is built
        "lorarar_kernels/grouped_coefficients.py": ("tests/test_grouped_coefficients.py",),
        "lorarar_kernels/foreign_state.py": (
            "tests/test_foreign_state.py",  # PEFT's layers and accelerate's hooks, read directly
            "tests/test_merge_state.py",
            "tests/test_pipeline_offload.py",
            "tests/test_pipeline_peft_fuse.py",
        ),
        "lorarar_kernels/ops/reference.py": (
            "tests/test_reference_ops.py",  # against the contract's formula in fp64
            "tests/test_ops_nonfinite.py",
            "tests/test_ops_ties.py",
        ),
        "lorarar_kernels/lora.py": (
            "tests/test_lora_promises.py",
            "tests/test_formats_loading.py",
            "tests/test_formats_transformers.py",  # scaled(), the transformer component
            "tests/test_formats_peft.py",
            "tests/test_robust_inputs.py",
            "tests/test_conveniences.py",
        ),
        "lorarar_kernels/hypernet.py": (
            "tests/test_hypernet_promises.py",
            "tests/test_hypernet.py",  # against an fp64 re-derivation and the authors' checkpoints
            "tests/test_merge.py",
            "tests/test_dispatch.py",
        ),
        "lorarar_kernels/factors.py": (
            "tests/test_factors.py",
            "tests/test_merge_errors.py",  # a NaN / Inf factor named by its file at plan time (native pack)
            "tests/test_fused_qkv.py",
            "tests/test_merge.py",
        ),
        "lorarar_kernels/materialise.py": (
            "tests/test_layering.py",
            "tests/test_plan.py",
            "tests/test_merge_errors.py",
            "tests/test_grouped_coefficients.py",  # the Triton coefficient kernel (interpreter) takes no P
            "tests/test_merge_promises.py",
            "tests/test_merge.py",
            "tests/test_fused_qkv.py",
        ),
        "lorarar_kernels/dispatch.py": (
            "tests/test_dispatch.py",
            "tests/test_grouped_coefficients.py",
            "tests/test_ops_ties.py",
            "tests/test_merge.py",
        ),
        "lorarar_kernels/ops/validate.py": (
            "tests/test_ops_validate_refusals.py",  # every check at its edge and one step past it
            "tests/test_ops_validate.py",
            "tests/test_merge_errors.py",
            "tests/test_robust_inputs.py",
        ),
        "lorarar_kernels/ops/native.py": (
            "tests/test_ops_native_refusals.py",
            "tests/test_ops_native.py",
            "tests/test_ops_pack.py",
            "tests/test_ops_native_sources.py",  # the cpp kernel reading the LoRAs' own tensors
            "tests/test_ops_nonfinite.py",
            "tests/test_ops_ties.py",
            "tests/test_merge_in_place.py",
            "tests/test_factors.py",
            "tests/test_ops_cpu_isa.py",
        ),
        "lorarar_kernels/ops/cpu_isa.py": (
            "tests/test_cpu_isa_rules.py",  # pure: every path's rules, the paths this CPU lacks included
            "tests/test_ops_cpu_isa.py",
            "tests/test_ops_native.py",
        ),
        "lorarar_kernels/ops/__init__.py": (
            "tests/test_ops_contract.py",
            "tests/test_ops_validate.py",
            "tests/test_reference_ops.py",
            "tests/test_ops_pack.py",
            "tests/test_ops_native.py",
            "tests/test_ops_nonfinite.py",
            "tests/test_dispatch.py",
            "tests/test_merge.py",
        ),
        "lorarar_kernels/lora_layer.py": (
            "tests/test_lora_layer_refusals.py",
            "tests/test_lora_promises.py",
            "tests/test_robust_inputs.py",
            "tests/test_formats_loading.py",
            "tests/test_formats_peft.py",
            "tests/test_factors.py",
            "tests/test_conveniences.py",
        ),
        "lorarar_kernels/safeio.py": (
            "tests/test_safeio.py",
            "tests/test_formats_loading.py",
            "tests/test_robust_inputs.py",
            "tests/test_hypernet_promises.py",
            "tests/test_formats_peft.py",
            "tests/test_robust_cli.py",
        ),
        "lorarar_kernels/fused_projections.py": (
            "tests/test_fused_blocks.py",
            "tests/test_fused_qkv.py",
            "tests/test_formats_transformers.py",
        ),
        "lorarar_kernels/errors.py": (
            "tests/test_errors.py",
            "tests/test_robust_inputs.py",
            "tests/test_merge_errors.py",
        ),
        "lorarar_kernels/formats/__init__.py": FORMAT_TESTS,
        "lorarar_kernels/formats/adapter_config.py": FORMAT_TESTS,
        "lorarar_kernels/formats/common.py": FORMAT_TESTS,
        "lorarar_kernels/formats/flux_names.py": FORMAT_TESTS,
        "lorarar_kernels/formats/kohya.py": FORMAT_TESTS,
        "lorarar_kernels/formats/legacy.py": FORMAT_TESTS,
        "lorarar_kernels/formats/names.py": FORMAT_TESTS,
        "lorarar_kernels/formats/peft.py": FORMAT_TESTS,
        "lorarar_kernels/formats/sgm_names.py": FORMAT_TESTS,
        "lorarar_kernels/formats/xlabs.py": FORMAT_TESTS,
    },
    # the integration's swap code: the diffusers swapper (real tiny pipelines, real accelerate and PEFT)
    "integration": {
        "python_api/lorarar/pipeline.py": (
            "tests/test_pipeline_promises.py",  # keyword-only options, progress, SGM names, export, repr
            "tests/test_pipeline_peft_fuse.py",
            "tests/test_pipeline_offload.py",
            "tests/test_pipeline.py",
            "tests/test_conveniences.py",
        ),
        "python_api/lorarar/pipeline_targets.py": (
            "tests/test_pipeline_promises.py",
            "tests/test_conveniences.py",  # text encoders, progress, the rollback across models
            "tests/test_pipeline.py",
            "tests/test_pipeline_dit.py",
            "tests/test_fused_qkv.py",
            "tests/test_transactional.py",
        ),
    },
}

# pytest forked from a process that imported the heavy libraries once (never the project: each fork
# imports the mutated copy afresh). One request at a time, over a unix socket: the client sends its argv
# and gets pytest's exit status back; a fork that runs past the time limit is killed (SIGALRM).
_FORK_SERVER = """
import json, os, signal, socket, sys
sock_path, limit = sys.argv[1], int(float(sys.argv[2]))
sys.dont_write_bytecode = True
import torch, numpy, pytest, safetensors  # noqa: F401  (what every test run imports)
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(sock_path)
srv.listen(1)
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    with conn:
        try:
            args = json.loads(conn.makefile().readline())
        except (OSError, ValueError):  # the client went away before asking
            continue
        pid = os.fork()
        if pid == 0:
            srv.close()
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1), os.dup2(devnull, 2)
            signal.alarm(limit)
            sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("_editable_skbc_")]
            import lorarar_kernels
            assert lorarar_kernels.__file__.startswith(os.getcwd()), lorarar_kernels.__file__
            try:
                rc = int(pytest.main(args))
            except BaseException:
                rc = 3
            os._exit(rc)
        _, status = os.waitpid(pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        try:
            conn.sendall(f"{rc}\\n".encode())
        except OSError:  # the client was killed (cosmic-ray's timeout): serve the next one
            pass
"""

_CLIENT = """
import json, os, socket, subprocess, sys
sock_path, args = sys.argv[1], sys.argv[2:]
targets = [a for a in args if os.path.exists(a.split("::")[0])]  # test files (or file::test)
options = [a for a in args if a not in targets]
if not targets:
    sys.exit(f"no test file among {args} (run from the scratch copy)")


def pytest_rc(argv):
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sock_path)
    except OSError:  # no server: run pytest here (slower, same answer)
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.call([sys.executable, os.path.join(here, "_run_pytest.py"), *argv])
    s.sendall((json.dumps(argv) + "\\n").encode())
    reply = s.makefile().readline().strip()
    return int(reply) if reply.lstrip("-").isdigit() else 4


# one test file at a time, stopping at the first that fails (as -x would, without collecting the rest)
for target in targets:
    rc = pytest_rc([*options, target])
    if rc:
        sys.exit(rc)
sys.exit(0)
"""


def toml_list(items) -> str:
    return "[" + ", ".join(repr(str(i)).replace("'", '"') for i in items) + "]"


def run_file(cr: Path, scratch: Path, env, file: str, tests, timeout: float, exclude, gpu: bool) -> dict:
    """One cosmic-ray session over ``file`` with ``tests``: {file, tests, killed, survived, gpu_only,
    seconds}; without a usable GPU (``gpu`` False) the mutants of `GPU_ONLY` code are not run."""
    t0 = time.perf_counter()
    tag = file.replace("/", "_").removesuffix(".py")
    test_cmd = " ".join(_test_command(scratch, tests))
    config, session = f"{tag}.toml", f"{tag}.sqlite"
    (scratch / config).write_text(
        "[cosmic-ray]\n"
        f"module-path = {toml_list([file])}\n"
        f"timeout = {timeout}\n"
        "excluded-modules = []\n"
        f"test-command = {toml_list([test_cmd])[1:-1]}\n\n"
        '[cosmic-ray.distributor]\nname = "local"\n\n'
        f"[cosmic-ray.filters.operators-filter]\nexclude-operators = {toml_list(exclude)}\n"
    )
    gpu_names = () if gpu else GPU_ONLY.get(file, ())
    if gpu_names:
        ranges = kept_lines(scratch / file, gpu_names)
        with open(scratch / config, "a") as f:
            f.write(
                f"\n[cosmic-ray.filters.line-filter.lines]\n{toml_list([file])[1:-1]} = {toml_list(ranges)}\n"
            )

    def step(*cmd: str) -> str:
        r = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(
                f"mutate_cosmic_ray: {' '.join(cmd[:2])} failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}"
            )
        return r.stdout

    step(str(cr), "init", config, session)
    step(str(cr.parent / "cr-filter-operators"), session, config)
    gpu_only = 0
    if gpu_names:
        before = _live(step(str(cr), "dump", session))
        step(str(cr.parent / "cr-filter-lines"), session, "--config", config)
        gpu_only = before - _live(step(str(cr), "dump", session))
    step(str(cr), "baseline", config)  # the unmutated copy must pass
    step(str(cr), "exec", config, session)
    r = outcomes(step(str(cr), "dump", session))
    return {
        "file": file,
        "tests": list(tests),
        **r,
        "gpu_only": gpu_only,
        "seconds": time.perf_counter() - t0,
    }


def outcomes(dump: str) -> dict:
    """{killed, survived, pending} of a cosmic-ray session from its ``cosmic-ray dump`` output."""
    results = [json.loads(line)[1] for line in dump.splitlines()]
    pending = sum(r is None for r in results)  # not run yet (an interrupted session)
    killed = sum(
        r is not None and r.get("worker_outcome") == "normal" and r["test_outcome"] == "killed"
        for r in results
    )
    survived = sorted(survivors(dump), key=lambda e: e["line"])
    return {"killed": killed, "survived": survived, "pending": pending}


def survivors(dump: str) -> list[dict]:
    """The survived mutants of a ``cosmic-ray dump``: {module_path, operator, occurrence, line, diff}."""
    out = []
    for line in dump.splitlines():
        item, result = json.loads(line)
        if result is None or result.get("worker_outcome") != "normal" or result["test_outcome"] == "killed":
            continue
        (mut,) = item["mutations"]
        diff = "".join(result["diff"]) if isinstance(result["diff"], list) else result["diff"]
        out.append(
            {"module_path": mut["module_path"], "operator": mut["operator_name"], "occurrence": mut["occurrence"],
             "line": mut["start_pos"][0], "diff": diff.rstrip()}
        )  # fmt: skip
    return out


def _test_command(scratch: Path, tests) -> list[str]:
    """The pytest client's command line in ``scratch`` (test files one at a time, up to the first failure)."""
    return [sys.executable, str(scratch / "_pytest_client.py"), str(scratch / "_pytest.sock"),
            "-x", "-q", "-p", "no:cacheprovider", *tests]  # fmt: skip


def _changed_lines(diff: str) -> list[str]:
    return [x for x in diff.splitlines() if x[:1] in "+-" and not x.startswith(("+++", "---"))]


def recheck(cr: Path, scratch: Path, env, survivor: dict, tests, timeout: float) -> str:
    """Re-apply one survivor in ``scratch`` and run ``tests``: "killed", "survived", "moved" or "timeout"."""
    path = scratch / survivor["module_path"]
    pristine = path.read_text()
    try:
        subprocess.run(
            [str(cr), "apply", survivor["module_path"], survivor["operator"], str(survivor["occurrence"])],
            cwd=scratch, env=env, check=True, capture_output=True,
        )  # fmt: skip
        now = subprocess.run(
            ["diff", "-u", "-", str(path)], input=pristine, capture_output=True, text=True
        ).stdout
        if _changed_lines(now) != _changed_lines(survivor["diff"]):
            return "moved"
        try:
            rc = subprocess.run(
                _test_command(scratch, tests), cwd=scratch, env=env, capture_output=True, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            return "timeout"
        return "killed" if rc else "survived"
    finally:
        path.write_text(pristine)


def score_line(r: dict) -> str:
    n = r["killed"] + len(r["survived"])
    pending = f", {r['pending']} not run" if r.get("pending") else ""
    pending += f", {r['gpu_only']} GPU only, not run" if r.get("gpu_only") else ""
    return (
        f"{r['file']}: {r['killed']}/{n} killed = {100 * r['killed'] / max(n, 1):.1f} % "
        f"({len(r['survived'])} survived{pending}; {r['seconds']:.0f} s; tests {', '.join(r['tests'])})"
    )


def markdown(results) -> str:
    out = ["# cosmic-ray run", ""]
    k = sum(r["killed"] for r in results)
    n = k + sum(len(r["survived"]) for r in results)
    out += [f"Total: {k}/{n} killed = {100 * k / max(n, 1):.1f} %", ""]
    out += [f"- {score_line(r)}" for r in results] + [""]
    for r in results:
        for s in r["survived"]:
            out += [f"## {r['file']}:{s['line']} {s['operator']}", "", "```diff", s["diff"], "```", ""]
    return "\n".join(out)


def report(results, path) -> int:
    """Print every survivor and the scores (and write them to ``path`` as markdown); 0 when none survived."""
    for r in results:
        for x in r["survived"]:
            print(f"SURVIVED {r['file']}:{x['line']} {x['operator']}\n{x['diff']}")
        print(f"score: {score_line(r)}")
    k = sum(r["killed"] for r in results)
    n = k + sum(len(r["survived"]) for r in results)
    print(f"total: {k}/{n} killed = {100 * k / max(n, 1):.1f} %")
    if path:
        Path(path).write_text(markdown(results))
    return 0 if k == n else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cosmic-ray", default="cosmic-ray", help="the cosmic-ray command (its own venv)")
    ap.add_argument(
        "--profile", choices=sorted(PROFILES), help="mutate each file of a profile with its tests"
    )
    ap.add_argument("--only", default="", help="with --profile: comma-separated file names (rule.py,plan.py)")
    ap.add_argument("--files", help="comma-separated files to mutate (repository-relative)")
    ap.add_argument("--tests", help="comma-separated pytest targets that should catch them")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant's test run")
    ap.add_argument("--all-operators", action="store_true", help="keep the exotic operators too")
    ap.add_argument("--report", help="write the scores and every survivor's diff to this markdown file")
    ap.add_argument("--keep", action="store_true", help="keep the scratch copy (its path is printed)")
    ap.add_argument("--dump", nargs="+", metavar="SQLITE", help="only report kept (or interrupted) sessions")
    ap.add_argument(
        "--recheck",
        nargs="+",
        metavar="SQLITE",
        help="run the survivors of kept sessions against today's tests",
    )
    args = ap.parse_args(argv)
    cr = Path(shutil.which(args.cosmic_ray) or args.cosmic_ray)
    if not cr.is_file():
        raise SystemExit(f"mutate_cosmic_ray: {args.cosmic_ray} not found; install cosmic-ray (see --help)")
    if args.dump:
        results = []
        for db in args.dump:
            out = subprocess.run([str(cr), "dump", db], capture_output=True, text=True, check=True).stdout
            file = json.loads(out.splitlines()[0])[0]["mutations"][0]["module_path"] if out else db
            results.append({"file": file, "tests": [], **outcomes(out), "seconds": 0.0})
        return report(results, args.report)
    sessions: dict[str, list[dict]] = {}
    for db in args.recheck or []:
        out = subprocess.run([str(cr), "dump", db], capture_output=True, text=True, check=True).stdout
        for x in survivors(out):
            sessions.setdefault(x["module_path"], []).append(x)
    if args.recheck and args.tests:
        args.files = ",".join(sessions)
    elif args.recheck:
        args.profile = args.profile or "engine"
        args.only = ",".join(sessions)
    if args.recheck and not sessions:
        print("no survivors in those sessions")
        return 0
    if args.profile:
        plan = dict(PROFILES[args.profile])
        if args.only:
            wanted = args.only.split(",")
            plan = {f: t for f, t in plan.items() if Path(f).name in wanted or f in wanted}
            if len(plan) != len(wanted):
                raise SystemExit(f"mutate_cosmic_ray: --only {args.only}: not all in profile {args.profile}")
    elif args.files and args.tests:
        plan = {f: tuple(args.tests.split(",")) for f in args.files.split(",")}
    else:
        raise SystemExit("mutate_cosmic_ray: give --profile, or --files and --tests")
    for f, tests in plan.items():
        for p in [f, *(t.split("::")[0] for t in tests)]:
            if not (ROOT / p).is_file():
                raise SystemExit(f"mutate_cosmic_ray: {p} does not exist")

    scratch = Path(tempfile.mkdtemp(prefix="lorarar-cosmic-ray-"))
    server = None
    results = []
    try:
        scratch_copy(scratch)
        shutil.copy2(installed_extension(), scratch / "lorarar_kernels")
        (scratch / "_run_pytest.py").write_text(_RUN_PYTEST)
        (scratch / "_pytest_client.py").write_text(_CLIENT)
        (scratch / "_fork_server.py").write_text(_FORK_SERVER)
        env = env_for(scratch)
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        server = subprocess.Popen(
            [sys.executable, str(scratch / "_fork_server.py"), str(scratch / "_pytest.sock"), str(args.timeout)],
            cwd=scratch, env=env, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        if server.stdout.readline().strip() != "ready":
            raise SystemExit("mutate_cosmic_ray: the pytest fork server did not start")
        if args.recheck:
            return _recheck_all(cr, scratch, env, plan, sessions, args.timeout, args.report)
        exclude = [] if args.all_operators else EXOTIC
        gpu = gpu_usable()
        for f, tests in plan.items():
            r = run_file(cr, scratch, env, f, tests, args.timeout, exclude, gpu)
            results.append(r)
            print(f"score: {score_line(r)}", flush=True)
            if args.report:
                Path(args.report).write_text(markdown(results))
        return report(results, None)
    finally:
        if server is not None:
            server.kill()
            server.wait()
        if args.keep:
            print(f"scratch copy kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


def _recheck_all(cr, scratch, env, plan, sessions, timeout, path) -> int:
    lines, still = ["# cosmic-ray survivors rechecked", ""], 0
    for f, found in sessions.items():
        tests = plan[f]
        counts: dict[str, int] = {}
        for x in found:
            verdict = recheck(cr, scratch, env, x, tests, timeout)
            counts[verdict] = counts.get(verdict, 0) + 1
            still += verdict != "killed"
            print(f"{verdict.upper():8} {f}:{x['line']} {x['operator']}", flush=True)
            lines += [f"- {verdict}: `{f}:{x['line']}` {x['operator']}"]
            if verdict != "killed":
                lines += ["", "```diff", x["diff"], "```", ""]
        summary = ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))
        print(f"recheck: {f}: {len(found)} survivors: {summary} (tests {', '.join(tests)})")
        lines.insert(2, f"- {f}: {len(found)} survivors: {summary}")
    if path:
        Path(path).write_text("\n".join(lines) + "\n")
    return 1 if still else 0


if __name__ == "__main__":
    sys.exit(main())
