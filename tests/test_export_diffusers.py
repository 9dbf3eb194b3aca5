"""The merged adapter (Merge.export) loaded by diffusers' own load_lora_weights + fuse_lora gives the
weights lk.merge wrote in place. For fp16 weights: within 1 ulp of the weight plus what PEFT's fp16 delta
loses (it casts the factors to the weight's dtype and forms the delta in fp16 before adding it)."""

import pytest
import torch
from engine_helpers import ulp

import lorarar_kernels as lk

pytest.importorskip("diffusers")
from lorarar.tiny import attention_linears, build_tiny_pipeline, default_hypernet, demo_loras


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_export_loads_in_diffusers_and_fuses_to_the_same_weights(tmp_path, dtype):
    pipe = build_tiny_pipeline(seed=0, dtype=dtype)
    content, style = demo_loras(pipe.unet)
    net = default_hypernet(pipe.unet)
    m = lk.merge(pipe.unet, content, style, net)
    assert m.coefficients  # the hypernet really mixed some layers
    ours = {n: lin.weight.detach().clone() for n, lin in attention_linears(pipe.unet).items()}
    adapter = m.export()
    adapter.save(tmp_path / "pair.safetensors")
    m.restore()

    fresh = build_tiny_pipeline(seed=0, dtype=dtype)
    fresh.load_lora_weights(str(tmp_path), weight_name="pair.safetensors", adapter_name="pair")
    fresh.fuse_lora(lora_scale=1.0, components=["unet"])
    fresh.unload_lora_weights()  # drops the adapters, keeps the fused weights
    fused = {n: lin.weight.detach() for n, lin in attention_linears(fresh.unet).items()}
    base_unet = build_tiny_pipeline(seed=0, dtype=dtype).unet
    base = {n: lin.weight.detach() for n, lin in attention_linears(base_unet).items()}
    changed = 0
    for n in m.layers:
        a, b = ours[n].double(), fused[n].double()
        changed += int(not torch.equal(ours[n], base[n]))
        if dtype == torch.float32:
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6 * max(a.abs().max().item(), 1.0), msg=n)
        else:
            up, down = adapter[n].factors(torch.float64)
            fp16_delta_error = 2.0**-9 * (up.abs() @ down.abs())  # a few fp16 roundings of each term
            bound = ulp(ours[n]) + fp16_delta_error
            assert ((a - b).abs() <= bound).all(), f"{n}: {((a - b).abs() / bound).max()} x the bound"
    assert changed == len(m.layers)
