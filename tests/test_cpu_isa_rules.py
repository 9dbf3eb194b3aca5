"""The rules of `ops.cpu_isa` that do not need the CPU they describe: which path multiplies which dtype, the
rounding the kernel's tolerance is built from, what `describe` and `auto` say for each path. The paths
this CPU cannot run are described through a stand-in for the extension's cpuid report (the kernels
themselves are checked on every path that runs here by tests/test_ops_cpu_isa.py)."""

from __future__ import annotations

import pytest
import torch

from lorarar_kernels.errors import BackendUnavailableError
from lorarar_kernels.ops import cpu_isa

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture
def cpu(monkeypatch):
    """``cpu(runs)``: the extension's cpuid report replaced by ``runs`` ({path: None or why not}); `best()`'s
    cache is cleared around the test so no other test sees a stand-in (this one, or a test's own)."""
    cpu_isa.best.cache_clear()

    def pretend(runs: dict[str, str | None]) -> None:
        monkeypatch.setattr(cpu_isa, "available", lambda: dict(runs))
        cpu_isa.best.cache_clear()

    yield pretend
    monkeypatch.undo()
    cpu_isa.best.cache_clear()


EVERY = dict.fromkeys(cpu_isa.PATHS)  # a CPU that runs every path (AMX-BF16)
AVX2_ONLY = {"portable": None, "avx2": None, "avx512": "no AVX-512", "amx": "no AMX"}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_amx_multiplies_only_bf16_weights_on_tiles(dtype):
    assert cpu_isa.path_for("amx", dtype) == ("amx" if dtype == torch.bfloat16 else "avx512")
    for path in ("portable", "avx2", "avx512"):
        assert cpu_isa.path_for(path, dtype) == path


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_only_bf16_on_amx_rounds_its_operands(dtype):
    want = 2.0**-8 if dtype == torch.bfloat16 else 0.0
    assert cpu_isa.operand_rounding(dtype, "amx") == want
    for path in ("portable", "avx2", "avx512"):
        assert cpu_isa.operand_rounding(dtype, path) == 0.0


def test_operand_rounding_defaults_to_the_selected_path(cpu, monkeypatch):
    cpu(EVERY)
    monkeypatch.setenv(cpu_isa.ENV, "amx")
    assert cpu_isa.operand_rounding(torch.bfloat16) == 2.0**-8
    monkeypatch.setenv(cpu_isa.ENV, "avx512")
    assert cpu_isa.operand_rounding(torch.bfloat16) == 0.0


def test_codes_are_the_cpp_enum_order():
    assert [cpu_isa.code(p) for p in ("portable", "avx2", "avx512", "amx")] == [0, 1, 2, 3]


@pytest.mark.parametrize("runs, best", [(EVERY, "amx"), (AVX2_ONLY, "avx2"),
                                        ({"portable": None, "avx2": "x", "avx512": "x", "amx": "x"}, "portable")])  # fmt: skip
def test_best_is_the_fastest_path_that_runs(cpu, monkeypatch, runs, best):
    cpu(runs)
    monkeypatch.delenv(cpu_isa.ENV, raising=False)
    assert cpu_isa.best() == best and cpu_isa.selected() == best
    monkeypatch.setenv(cpu_isa.ENV, "  Auto ")
    assert cpu_isa.selected() == best


def test_a_forced_path_is_read_case_blind_and_refused_where_it_cannot_run(cpu, monkeypatch):
    cpu(AVX2_ONLY)
    monkeypatch.setenv(cpu_isa.ENV, " AVX2\n")
    assert cpu_isa.selected() == "avx2"
    monkeypatch.setenv(cpu_isa.ENV, "avx512")
    with pytest.raises(
        BackendUnavailableError, match="LORARAR_CPU_PATH=avx512: that CPU path cannot run here: no AVX-512"
    ):
        cpu_isa.selected()
    monkeypatch.setenv(cpu_isa.ENV, "sse2")
    with pytest.raises(
        BackendUnavailableError, match="'sse2' is not one of auto, portable, avx2, avx512, amx"
    ):
        cpu_isa.selected()


def test_describe_says_the_path_and_whether_it_was_forced(cpu, monkeypatch):
    cpu(EVERY)
    monkeypatch.setattr(cpu_isa, "cpu_model", lambda: "Test CPU")
    monkeypatch.delenv(cpu_isa.ENV, raising=False)
    assert (
        cpu_isa.describe()
        == "Test CPU: path amx (bf16 weights on AMX tiles, fp32/fp16 on avx512), from cpuid"
    )
    monkeypatch.setenv(cpu_isa.ENV, "AUTO")
    assert cpu_isa.describe().endswith(", from cpuid")
    monkeypatch.setenv(cpu_isa.ENV, "avx2")
    assert cpu_isa.describe() == "Test CPU: path avx2, forced by LORARAR_CPU_PATH"
    monkeypatch.setenv(cpu_isa.ENV, "amx")
    assert cpu_isa.describe().endswith("fp32/fp16 on avx512), forced by LORARAR_CPU_PATH")
    monkeypatch.setattr(cpu_isa, "cpu_model", lambda: "")
    assert cpu_isa.describe().startswith("unknown CPU: path amx")
    monkeypatch.setenv(cpu_isa.ENV, "x")
    assert cpu_isa.describe() == "LORARAR_CPU_PATH='x' is not one of auto, portable, avx2, avx512, amx"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_auto_takes_cpp_only_on_the_paths_measured_faster(cpu, monkeypatch, dtype):
    cpu(EVERY)
    for path in cpu_isa.PATHS:
        monkeypatch.setenv(cpu_isa.ENV, path)
        why = cpu_isa.auto_unavailable(dtype)
        if path in cpu_isa.AUTO_PATHS:
            assert why is None, path
        else:
            assert (
                why
                == "the cpp kernel's portable path is not measured faster than torch (see cpu_isa.AUTO_PATHS)"
            )
    monkeypatch.setenv(cpu_isa.ENV, "nope")
    assert "LORARAR_CPU_PATH='nope' is not one of" in cpu_isa.auto_unavailable(dtype)  # said, not raised


def test_without_the_extension_every_path_says_so(cpu, monkeypatch):
    monkeypatch.setattr(cpu_isa, "_C", None)
    runs = cpu_isa.available()
    assert set(runs) == set(cpu_isa.PATHS)
    assert set(runs.values()) == {"the native extension lorarar_kernels._C is not built"}
    assert cpu_isa.cpu_model() == "" and cpu_isa.best() == "portable"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_forced_amx_path_read_from_the_environment_multiplies_as_amx_does(cpu, monkeypatch, dtype):
    """The path named in LORARAR_CPU_PATH is a string built at run time, not the module's literal: it is
    compared by value (fp32/fp16 weights on a forced amx path run on avx512, with fp32 operands)."""
    cpu(EVERY)
    monkeypatch.setenv(cpu_isa.ENV, " AMX ")
    path = cpu_isa.selected()
    assert path == "amx" and cpu_isa.path_for(path, dtype) == ("amx" if dtype == torch.bfloat16 else "avx512")
    assert cpu_isa.operand_rounding(dtype) == (2.0**-8 if dtype == torch.bfloat16 else 0.0)


def test_the_package_imports_without_its_extension():
    """A pure-Python install (no `_C`): importing the engine works and the cpp backend says why it cannot
    run, and the CPU paths all report the missing extension. Run in a fresh interpreter whose imports of
    `_C` fail."""
    import subprocess
    import sys

    code = (
        "import importlib.abc, sys\n"
        "class NoExtension(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'lorarar_kernels._C':\n"
        "            raise ImportError('no extension in this test')\n"
        "sys.meta_path.insert(0, NoExtension())\n"
        "import torch, lorarar_kernels as lk\n"
        "from lorarar_kernels.ops import cpu_isa\n"
        "print(lk.backends(torch.device('cpu'))['cpp'])\n"
        "print(cpu_isa.best(), cpu_isa.cpu_model() == '')\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert "not built" in lines[0] and lines[1] == "portable True", res.stdout


# The registers each feature needs (csrc/cpu_isa.cpp): (register, bit). xcr0 counts only with OSXSAVE.
_AVX2_BITS = [("ecx1", 12), ("ecx1", 27), ("ecx1", 28), ("ecx1", 29), ("ebx7", 5), ("xcr0", 1), ("xcr0", 2)]
_AVX512_BITS = _AVX2_BITS + [("ebx7", 16), ("ebx7", 30), ("ebx7", 31), ("xcr0", 5), ("xcr0", 6), ("xcr0", 7)]
_NEEDS = {
    "avx2": _AVX2_BITS,  # AVX, FMA, F16C, OSXSAVE, AVX2; the OS saves xmm/ymm
    "avx512": _AVX512_BITS,  # + AVX-512 F/BW/VL; opmask and zmm state
    "amx_cpu": _AVX512_BITS + [("edx7", 24), ("edx7", 22)],  # + AMX-TILE, AMX-BF16
    "amx_tiles_os": [("ecx1", 27), ("xcr0", 17), ("xcr0", 18)],  # the OS saves tile config and data
}
_WIDTH = {"ecx1": 32, "ebx7": 32, "edx7": 32, "xcr0": 64}
needs_extension = pytest.mark.skipif(
    not hasattr(cpu_isa._C, "cpu_features_from"), reason="native extension not built"
)


def _features(**regs) -> dict[str, bool]:
    return dict(cpu_isa._C.cpu_features_from(regs["ecx1"], regs["ebx7"], regs["edx7"], regs["xcr0"]))


@needs_extension
def test_each_feature_needs_exactly_its_cpuid_and_xcr0_bits():
    """The feature rule of every path, on any CPU: from registers with every bit set, clearing one bit
    turns off exactly the features that need it (so a rule reading a neighbouring bit, or one that needs
    only some of its bits, is caught here even on a CPU that has them all); from all-zero registers, the
    needed bits alone turn a feature on."""
    full = {r: (1 << w) - 1 for r, w in _WIDTH.items()}
    assert _features(**full) == {f: True for f in _NEEDS}
    for reg, width in _WIDTH.items():
        for bit in range(width):
            got = _features(**{**full, reg: full[reg] & ~(1 << bit)})
            want = {f: (reg, bit) not in needs for f, needs in _NEEDS.items()}
            assert got == want, (reg, bit, got)
    for feature, needs in _NEEDS.items():
        regs = {r: 0 for r in _WIDTH}
        for reg, bit in needs:
            regs[reg] |= 1 << bit
        assert _features(**regs)[feature], (feature, regs)
