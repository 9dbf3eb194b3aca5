"""The one place a kernel is chosen (`lorarar_kernels.dispatch`): the apply backend's auto rule, the
backend contract every registered backend satisfies, and the coefficient kernel's auto rule."""

from __future__ import annotations

import pytest
import torch
from coefficient_cases import DEV, HAS_GPU, available_kernels, hypernet, pair

import lorarar_kernels as lk
from lorarar_kernels import dispatch
from lorarar_kernels.errors import BackendUnavailableError, LoraRarError
from lorarar_kernels.ops import ApplyJob, native
from lorarar_kernels.plan import plan_pair

CPU = torch.device("cpu")


def test_every_backend_satisfies_the_contract():
    for name in dispatch._LOCATIONS:
        impl, why = dispatch._load(name)
        if impl is None:
            continue
        assert impl.name == name
        assert callable(impl.unavailable) and callable(impl.plan) and callable(impl.apply)
    assert set(lk.backends(CPU)) == set(dispatch._LOCATIONS) and lk.backends(CPU)["torch"] is None


@pytest.mark.parametrize("name", ["torch", "cpp", "triton"])
def test_every_plan_runs_the_same_pass_as_apply(name):
    if lk.backends(CPU)[name] is not None:
        pytest.skip(f"{name}: {lk.backends(CPU)[name]}")
    impl = dispatch.get(name, CPU)
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(24, 40, generator=gen)
    up, down = torch.randn(24, 5, generator=gen) * 0.1, torch.randn(5, 40, generator=gen) * 0.1
    cs = torch.rand(2, 40, generator=gen) + 0.5
    a, b = torch.full_like(w, float("nan")), torch.full_like(w, float("nan"))
    impl.apply([ApplyJob("l", a, w, up, down, cs, 2)])
    run = dispatch.runner(impl, [ApplyJob("l", b, w, up, down, cs, 2)])
    run()
    assert torch.equal(a, b) and not torch.isnan(a).any()


def test_auto_apply_choice_follows_the_table():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        want = next(n for n in dispatch.AUTO_ORDER[("cpu", dtype)] if lk.backends(CPU)[n] is None)
        assert dispatch.choose("auto", CPU, dtype)[0] == want
    assert dispatch.choose("auto", torch.device("meta"), torch.float32)[0] == "torch"  # unlisted device
    with pytest.raises(BackendUnavailableError, match="unknown backend"):
        dispatch.choose("fastest", CPU, torch.float32)
    with pytest.raises(BackendUnavailableError, match="unavailable on cpu"):
        dispatch.choose("cuda", CPU, torch.float32)


def test_cuda_coefficients_are_not_chosen_for_a_hidden_width_above_their_limit():
    wide = lk.Hypernet(widths=(64,), hidden=native.COEFF_MAX_HIDDEN + 1)
    why = dispatch.coefficient_unavailable("cuda", DEV, wide)
    assert why is not None and "hidden width" in why
    assert dispatch.coefficient_unavailable("cuda", DEV, lk.Hypernet(widths=(64,), hidden=8)) != why
    with pytest.raises(BackendUnavailableError, match="hidden width"):
        dispatch.choose_coefficients("cuda", DEV, wide.to(DEV), grad=False)
    assert dispatch.choose_coefficients("auto", DEV, wide.to(DEV), grad=False) != "cuda"


def test_auto_rule():
    net = hypernet("cpu")
    assert dispatch.choose_coefficients("auto", torch.device("cpu"), net, grad=False) == "torch"
    assert dispatch.choose_coefficients("auto", torch.device("cpu"), None, grad=False) == "torch"
    if HAS_GPU:
        gnet = hypernet(DEV)
        assert (
            dispatch.choose_coefficients("auto", DEV, gnet, grad=True) == "torch"
        )  # no autograd in the kernels
        assert (
            dispatch.choose_coefficients("auto", DEV, net, grad=False) == "torch"
        )  # hypernetwork left on the CPU
        assert (
            dispatch.choose_coefficients("auto", DEV, gnet, grad=False)
            == (available_kernels() or ["torch"])[0]
        )
    # on the CPU auto is the torch path itself: the same bits
    c, s = pair("cpu")
    a = plan_pair(c, s, net, coefficient_kernel="auto")
    t = plan_pair(c, s, net, coefficient_kernel="torch")
    assert any(f.col_scale is not None for f in a.values())  # hypernet layers: the check is not vacuous
    assert all(torch.equal(a[n].col_scale, t[n].col_scale) for n in a if a[n].col_scale is not None)


def test_bad_kernel_choices_say_why():
    net = hypernet("cpu")
    cpu = torch.device("cpu")
    with pytest.raises(LoraRarError, match="must be one of"):
        dispatch.choose_coefficients("fast", cpu, net, grad=False)
    with pytest.raises(LoraRarError, match="no autograd"):
        dispatch.choose_coefficients("triton", cpu, net, grad=True)
    if not HAS_GPU:
        with pytest.raises(BackendUnavailableError, match="cuda"):
            dispatch.choose_coefficients("cuda", cpu, net, grad=False)
        c, s = pair("cpu")
        with pytest.raises(BackendUnavailableError):
            plan_pair(c, s, net, coefficient_kernel="cuda")


def test_backends_default_to_the_gpu_if_there_is_one_else_the_cpu():
    assert lk.backends() == lk.backends("cuda" if torch.cuda.is_available() else "cpu")


def test_the_auto_rule_takes_the_first_available_candidate_not_the_fallback(monkeypatch):
    """An unavailable candidate is skipped, not the end of the list: with ("cuda", "cpp", "torch") on the
    CPU, cpp (where it runs) is chosen, not torch."""
    monkeypatch.setitem(dispatch.AUTO_ORDER, ("cpu", torch.float32), ("cuda", "cpp", "torch"))
    want = "cpp" if lk.backends(CPU)["cpp"] is None else "torch"
    assert dispatch.choose("auto", CPU, torch.float32)[0] == want


def test_coefficient_kernel_availability_says_why_per_kernel():
    meta = torch.device("meta")
    assert dispatch.coefficient_unavailable("torch", meta) is None  # torch runs anywhere
    assert dispatch.coefficient_unavailable("triton", meta) is not None  # no GPU and no CPU: no Triton
    for bad in ("abc", "tz", "xyz"):  # sorted before or after the known names: an unknown name is unknown
        assert dispatch.coefficient_unavailable(bad, CPU).startswith("unknown coefficient kernel")
        with pytest.raises(BackendUnavailableError, match="unknown backend"):
            dispatch.choose(bad, CPU, torch.float32)
    try:
        from lorarar_kernels.ops import triton_coeff
    except Exception:  # Triton absent: nothing more to compare
        return
    # where Triton runs (its interpreter here) its own answer, not another kernel's
    assert dispatch.coefficient_unavailable("triton", CPU) == triton_coeff.unavailable(CPU)


def test_coefficient_kernel_names_read_at_run_time_are_the_same_kernels():
    """Names from a config file (equal strings, not the literals) choose as the literals do."""
    net = hypernet("cpu")
    auto, torch_, cuda, triton = ("".join(list(k)) for k in ("auto", "torch", "cuda", "triton"))
    assert auto is not "auto" and torch_ is not "torch"  # noqa: F632
    assert dispatch.choose_coefficients(auto, CPU, net, grad=False) == "torch"
    assert dispatch.choose_coefficients(torch_, CPU, net, grad=True) == "torch"  # torch has autograd
    assert dispatch.coefficient_unavailable(torch_, CPU) is None
    for name in (cuda, triton):
        why = dispatch.coefficient_unavailable(name, torch.device("meta"))
        assert why is not None and not why.startswith("unknown")
    assert dispatch.choose(auto, CPU, torch.float32) == dispatch.choose("auto", CPU, torch.float32)


def test_an_explicit_coefficient_kernel_needs_the_hypernetwork_on_the_weights_device():
    with pytest.raises(LoraRarError, match="needs the hypernetwork on cpu, not meta"):
        dispatch.choose_coefficients("triton", CPU, hypernet("cpu").to("meta"), grad=False)


def test_a_backend_module_that_cannot_be_imported_is_reported_not_raised(monkeypatch):
    import sys

    dispatch._load.cache_clear()
    monkeypatch.setitem(sys.modules, "lorarar_kernels.ops.triton_backend", None)  # as if Triton were absent
    try:
        impl, why = dispatch._load("triton")
        assert impl is None and "could not be imported" in why
        assert "could not be imported" in lk.backends(CPU)["triton"]
    finally:
        dispatch._load.cache_clear()


def test_the_cuda_coefficient_limit_refuses_only_widths_above_it():
    for hidden in (8, native.COEFF_MAX_HIDDEN):
        why = dispatch.coefficient_unavailable("cuda", DEV, lk.Hypernet(widths=(64,), hidden=hidden))
        assert why is None or "hidden width" not in why


def test_triton_coefficients_that_cannot_be_imported_are_reported_not_raised(monkeypatch):
    import sys

    from lorarar_kernels import ops

    monkeypatch.delattr(ops, "triton_coeff", raising=False)
    monkeypatch.setitem(sys.modules, "lorarar_kernels.ops.triton_coeff", None)  # as if Triton were absent
    why = dispatch.coefficient_unavailable("triton", CPU)
    assert why.startswith("Triton coefficients cannot be imported")
    assert dispatch.choose_coefficients("auto", CPU, hypernet("cpu"), grad=False) == "torch"


@pytest.mark.parametrize("cuda_here", [True, False], ids=["cuda-present", "no-cuda"])
def test_an_unindexed_cuda_device_is_the_current_one_and_other_devices_stay(monkeypatch, cuda_here):
    """``torch.device("cuda")`` and a tensor's ``cuda:0`` name one GPU but compare unequal: devices are compared
    in canonical form (the bug the first H200 run found: the grouped coefficient kernels never ran). Without
    a GPU the CUDA runtime is stood in for (present, current device 3), or absent: then nothing changes."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_here)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    want_cuda = torch.device("cuda", 3) if cuda_here else torch.device("cuda")
    assert dispatch.canonical_device("cuda") == want_cuda
    assert dispatch.canonical_device(torch.device("cuda")) == want_cuda
    assert dispatch.canonical_device("cuda:1") == torch.device("cuda", 1)
    for other in ("cpu", "meta", torch.device("cpu")):
        assert dispatch.canonical_device(other) == torch.device(other)
