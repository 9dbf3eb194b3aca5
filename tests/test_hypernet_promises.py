"""`lk.Hypernet`'s promises that generated mutants of hypernet.py showed no test held: bad widths refused,
the dense form on any leading batch shape, the projection cache never reused after a LoRA's scale changed,
keyword-only `load` options, a checkpoint that is not a hypernetwork refused with what is wrong, and a pair of
mismatched layers refused in either order."""

import pytest
import torch
from engine_helpers import rand_layer
from safetensors import safe_open
from safetensors.torch import save_file

import lorarar_kernels as lk


def _net(widths=(8, 12), hidden=6, seed=0):
    torch.manual_seed(seed)
    net = lk.Hypernet(widths=widths, hidden=hidden)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.5)  # a non-trivial network: every output depends on every input
    return net


@pytest.mark.parametrize("widths", [(-4, 8), (0, 8), (8, 8), ()])
def test_widths_must_be_distinct_positive_ints(widths):
    with pytest.raises(lk.LayerMismatchError, match="widths must be distinct positive ints"):
        lk.Hypernet(widths=widths, hidden=4)


def test_the_dense_form_takes_any_leading_batch_shape():
    net = _net()
    cols = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    out = net(cols)
    assert out.shape == (3, 5, 2)
    assert torch.allclose(out.reshape(15, 2), net(cols.reshape(15, 16)), atol=1e-6)


def test_a_lora_rescaled_after_its_coefficients_were_cached_gets_fresh_ones():
    gen = torch.Generator().manual_seed(2)
    net = _net()
    c, s = rand_layer(8, 5, 2, gen, amp=0.5), rand_layer(8, 5, 3, gen, amp=0.5)
    for scale in (0.5, 2.0):  # the cached stamp is larger, then smaller, than the new one
        with torch.no_grad():
            net.coefficients(c, s)  # fills the cache
            cached = net.coefficients(lk.LoRALayer(c.down, c.up, scale), s)  # same up tensor, new scale
        fresh = net.coefficients(lk.LoRALayer(c.down, c.up, scale), s)  # grad enabled: never cached
        assert torch.equal(cached[0], fresh[0].detach()) and torch.equal(cached[1], fresh[1].detach())


def test_load_takes_map_location_by_keyword_only(tmp_path):
    path = tmp_path / "h.safetensors"
    _net().save(path)
    with pytest.raises(TypeError):
        lk.Hypernet.load(path, "cpu")
    assert lk.Hypernet.load(path, map_location="cpu").widths == (8, 12)


def _checkpoint(tmp_path, **tensors):
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_a_checkpoint_that_is_not_a_hypernetwork_says_what_is_wrong(tmp_path):
    sd = {k: v.detach().clone() for k, v in _net(widths=(8,)).state_dict().items()}
    three_d = dict(sd, **{"input_1.weight": sd["input_1.weight"][..., None]})
    with pytest.raises(
        lk.LoraFileError, match=r"input_1.weight has shape \(6, 16, 1\), expected \[hidden, 2\*width\]"
    ):
        lk.Hypernet.load(_checkpoint(tmp_path, **three_d))
    headless = {k: v for k, v in sd.items() if not k.startswith("output.1.")}
    with pytest.raises(lk.LoraFileError, match="not a LoRA.rar hypernetwork"):
        lk.Hypernet.load(_checkpoint(tmp_path, **headless))
    extra = dict(sd, **{"input_1.extra": torch.ones(3)})
    with pytest.raises(lk.LoraFileError, match="does not fit the hypernetwork"):
        lk.Hypernet.load(_checkpoint(tmp_path, **extra))


def test_a_pair_of_layers_of_different_shapes_is_refused_in_either_order():
    gen = torch.Generator().manual_seed(3)
    net = _net()
    a, b = rand_layer(8, 12, 2, gen), rand_layer(12, 8, 2, gen)
    for c, s in ((a, b), (b, a)):
        with pytest.raises(lk.LayerMismatchError, match="content delta is .* but style delta is"):
            net.coefficients(c, s)


def _with_metadata(tmp_path, meta):
    """A saved `_net()` whose metadata is replaced by ``meta``, or by what ``meta`` returns given the file's own."""
    path = tmp_path / "h.safetensors"
    _net().save(path)
    with safe_open(str(path), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
        own = dict(f.metadata())
    save_file(sd, str(path), metadata=meta(own) if callable(meta) else meta)
    return path


@pytest.mark.parametrize("declared", ["8,10", "8,14", "8"])
def test_a_hypernetwork_file_whose_metadata_widths_disagree_with_its_tensors_is_refused(tmp_path, declared):
    path = _with_metadata(tmp_path, lambda own: dict(own, widths="".join(list(declared))))
    with pytest.raises(lk.LoraFileError, match=r"metadata widths .* disagree with tensors \(8, 12\)"):
        lk.Hypernet.load(path)


def test_a_one_dimensional_input_weight_is_refused_with_its_shape(tmp_path):
    sd = {k: v.detach().clone() for k, v in _net(widths=(8,)).state_dict().items()}
    flat = dict(sd, **{"input_1.weight": sd["input_1.weight"].flatten()})
    with pytest.raises(
        lk.LoraFileError, match=r"input_1.weight has shape \(96,\), expected \[hidden, 2\*width\]"
    ):
        lk.Hypernet.load(_checkpoint(tmp_path, **flat))


def test_metadata_widths_are_read_only_from_lorarars_own_format(tmp_path):
    """Widths in metadata are checked only when the file says it is lorarar's format (read at run time, an
    equal string); a lorarar file without them, or another tool's with its own widths entry, loads."""
    from lorarar_kernels.hypernet import HYPERNET_FORMAT

    ours = "".join(list(HYPERNET_FORMAT))
    assert lk.Hypernet.load(_with_metadata(tmp_path, {"format": ours})).widths == (8, 12)
    assert lk.Hypernet.load(_with_metadata(tmp_path, {"format": "other/1", "widths": "3"})).widths == (8, 12)
    with pytest.raises(lk.LoraFileError, match="disagree"):
        lk.Hypernet.load(_with_metadata(tmp_path, {"format": ours, "widths": "3"}))


def test_a_conv_layer_on_either_side_of_a_hypernetwork_pair_is_refused_naming_where():
    from lorarar_kernels.hypernet import check_pair

    gen = torch.Generator().manual_seed(4)
    lin = rand_layer(8, 12, 2, gen)
    conv = lk.LoRALayer(torch.randn(2, 3, 2, 2, generator=gen), torch.randn(8, 2, generator=gen))
    for c, s in ((conv, lin), (lin, conv)):
        with pytest.raises(
            lk.LayerMismatchError, match=r"^layer x: hypernetwork coefficients apply to linear"
        ):
            check_pair(c, s, "layer x")
        with pytest.raises(lk.LayerMismatchError, match=r"^hypernetwork coefficients apply to linear"):
            check_pair(c, s)
