"""The test-only ControlNet generator (tests/make_controlnet.py) on a miniature SD-shaped checkpoint."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.make_controlnet import block_channels, make_controlnet


def mini_checkpoint():
    g = torch.Generator().manual_seed(0)
    shapes = {
        "time_embed.0.weight": (32, 8), "input_blocks.0.0.weight": (8, 4, 3, 3),
        "input_blocks.1.0.out_layers.3.weight": (8, 8, 3, 3), "input_blocks.2.0.op.weight": (8, 8, 3, 3),
        "input_blocks.3.0.out_layers.3.weight": (16, 16, 3, 3), "input_blocks.3.1.proj_in.weight": (16, 16, 1, 1),
        "middle_block.2.out_layers.3.weight": (16, 16, 3, 3), "out.2.weight": (4, 8, 3, 3),
        "output_blocks.0.0.out_layers.3.weight": (16, 32, 3, 3),
    }
    ckpt = {"model.diffusion_model." + k: torch.randn(s, generator=g).half() for k, s in shapes.items()}
    ckpt["first_stage_model.decoder.conv_in.weight"] = torch.randn(4, 4, 3, 3).half()
    return ckpt


def test_encoder_is_copied_and_new_layers_have_the_unet_channels():
    ckpt = mini_checkpoint()
    sd = make_controlnet(ckpt, residual_scale=0.3)
    assert all(k.startswith("control_model.") for k in sd)
    assert not any(".out." in k or "output_blocks" in k or "first_stage" in k for k in sd)
    assert torch.equal(sd["control_model.input_blocks.3.1.proj_in.weight"],
                       ckpt["model.diffusion_model.input_blocks.3.1.proj_in.weight"])
    unet = {k[len("model.diffusion_model."):]: v for k, v in ckpt.items() if k.startswith("model.diffusion_model.")}
    assert block_channels(unet) == [8, 8, 8, 16]
    assert [sd[f"control_model.zero_convs.{i}.0.weight"].shape[:2] for i in range(4)] == [(8, 8), (8, 8), (8, 8),
                                                                                          (16, 16)]
    assert sd["control_model.middle_block_out.0.weight"].shape == (16, 16, 1, 1)
    assert sd["control_model.input_hint_block.0.weight"].shape == (16, 3, 3, 3)
    assert sd["control_model.input_hint_block.14.weight"].shape == (8, 256, 3, 3)
    assert all(v.dtype == torch.float16 for v in sd.values())


def test_residual_scale_sets_the_residual_rms_and_the_seed_fixes_the_weights():
    sd = make_controlnet(mini_checkpoint(), residual_scale=0.3, seed=1)
    w = sd["control_model.zero_convs.3.0.weight"].float()
    x = torch.randn(64, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    rms = F.conv2d(x, w).pow(2).mean().sqrt().item()
    assert 0.2 < rms < 0.4
    again = make_controlnet(mini_checkpoint(), residual_scale=0.3, seed=1)
    assert all(torch.equal(v, again[k]) for k, v in sd.items())
    assert not torch.equal(make_controlnet(mini_checkpoint(), seed=2)["control_model.zero_convs.3.0.weight"],
                           sd["control_model.zero_convs.3.0.weight"])
