"""The merge rule (`lorarar_kernels.rule`): which layers take which coefficients; the hypernetwork's parts."""

import pytest
import torch
from engine_helpers import rand_lora
from engine_models import AttentionStack, attention_shapes

import lorarar_kernels as lk
from lorarar_kernels.rule import merge_rule, part_of, resolve_parts

SMALL = attention_shapes((("down_blocks.0", 48, 1, 1), ("up_blocks.0", 64, 1, 2)), context=40)


def _net(parts=None, seed=0):
    torch.manual_seed(seed)
    return lk.Hypernet(widths=(48, 64), hidden=16) if parts is None else lk.Hypernet((48, 64), 16, parts)


def test_hypernet_parts_are_obeyed():
    """A network trained for ``to_q`` only merges ``to_q`` through itself; ``to_out.0`` is a plain sum."""
    c, s = rand_lora(SMALL, 3, 1), rand_lora(SMALL, 2, 2)
    m = lk.merge(AttentionStack(SMALL, seed=3), c, s, _net(("to_q",)))
    assert m.coefficients and all(n.endswith(".to_q") for n in m.coefficients)
    assert all(f.mode == "sum" for n, f in m.plan.items() if n.endswith("to_out.0"))
    direct = lk.merged_adapter(c, s, _net(("to_q",)))
    assert all(direct[n].down.shape[0] == 5 for n in direct)  # every layer merged, rank r_c + r_s


def test_hyper_parts_none_means_the_networks_own_and_a_subset_is_allowed():
    c, s = rand_lora(SMALL, 3, 1), rand_lora(SMALL, 2, 2)
    net = _net()
    assert net.parts == ("to_q", "to_out.0")
    rule = merge_rule(c, s, net)
    hyper = {r.name for r in rule.layers if r.mode == "hypernet"}
    assert hyper == {n for n in c if part_of(n, net.parts)} and rule.hyper_parts == net.parts
    only_q = merge_rule(c, s, net, hyper_parts=["to_q"])
    assert {r.name for r in only_q.layers if r.mode == "hypernet"} == {n for n in c if n.endswith("to_q")}


def test_hyper_parts_the_network_was_not_trained_for_are_refused():
    c, s = rand_lora(SMALL, 3, 1), rand_lora(SMALL, 2, 2)
    net = _net(("to_q",))
    with pytest.raises(
        lk.LayerMismatchError, match=r"to_out\.0.*not parts this hypernetwork was trained for"
    ):
        lk.merge(AttentionStack(SMALL), c, s, net, hyper_parts=("to_q", "to_out.0"))
    with pytest.raises(lk.LayerMismatchError, match="trained for"):
        lk.merged_adapter(c, s, net, hyper_parts=("to_k",))
    assert resolve_parts(None, ("to_k",)) == ()  # no hypernetwork: a direct merge, parts unused


def test_rule_modes_and_given_coefficients():
    c = rand_lora(SMALL[:6], 3, 1)
    s = rand_lora(SMALL[2:8], 2, 2)
    name = SMALL[3][0]
    rule = merge_rule(c, s, None, coefficients={name: (None, torch.full((SMALL[3][2],), 0.5))})
    modes = {r.name: r.mode for r in rule.layers}
    assert [modes[n] for n, _, _ in SMALL[:2]] == ["content", "content"]
    assert [modes[n] for n, _, _ in SMALL[6:8]] == ["style", "style"]
    assert modes[name] == "coefficients" and modes[SMALL[2][0]] == "sum"
    given = next(r.given for r in rule.layers if r.name == name)
    assert given[0].dtype == torch.float32 and torch.equal(given[0], torch.ones(SMALL[3][2]))
    with pytest.raises(lk.LayerMismatchError, match="expected"):
        merge_rule(c, s, None, coefficients={name: (torch.ones(3), None)})
