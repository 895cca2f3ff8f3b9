"""The real-WebUI test models' generator (tests/webui/make_models.py): layouts, LoRA key names, the file writer.

The shapes were checked once against the hosts' own classes (sgm's UNetModel and AutoencoderKL, open_clip's
ViT-bigG-14, transformers' CLIPTextModel, all 2515 keys) and their model detection; these tests keep the counts.
"""

from __future__ import annotations

import math

import torch
from safetensors.torch import load_file

from tests.webui import make_models as mm


def test_sdxl_layout_is_sdxl_base():
    spec = mm.sdxl_spec()
    assert len(spec) == 2515
    assert sum(k.startswith(mm.UNET) for k in spec) == 1680 and mm.params(spec, mm.UNET) == 2_567_463_684
    assert mm.params(spec, "conditioner.embedders.0.") == 123_060_480
    assert mm.params(spec, "conditioner.embedders.1.") == 694_659_841
    # what the hosts' detection reads: A1111 the bigG ln_final, Forge/reForge the UNet's depths, context and adm
    assert "conditioner.embedders.1.model.ln_final.weight" in spec
    assert spec[mm.UNET + "input_blocks.0.0.weight"][0] == (320, 4, 3, 3)
    assert spec[mm.UNET + "label_emb.0.0.weight"][0] == (1280, 2816)
    assert spec[mm.UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"][0] == (640, 2048)
    depth = {b: len({k.split(".transformer_blocks.")[1].split(".")[0] for k in spec
                     if k.startswith(f"{mm.UNET}{b}.1.transformer_blocks.")})
             for b in ("input_blocks.4", "input_blocks.5", "input_blocks.7", "input_blocks.8", "middle_block")}
    assert depth == {"input_blocks.4": 2, "input_blocks.5": 2, "input_blocks.7": 10, "input_blocks.8": 10,
                     "middle_block": 10}
    assert spec[mm.UNET + "input_blocks.4.1.proj_in.weight"][0] == (640, 640)  # linear projections
    assert spec["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"][0] == (3840, 1280)
    # neither text encoder may have an all-zero final norm bias (NaN through the hosts' emphasis)
    assert spec["conditioner.embedders.1.model.ln_final.bias"][1] == "fnb"
    assert spec["conditioner.embedders.0.transformer.text_model.final_layer_norm.bias"][1] == "fnb"


def test_sd15_layout_is_unchanged():
    spec = mm.sd15_spec()
    assert sum(k.startswith(mm.UNET) for k in spec) == 686 and mm.params(spec, mm.UNET) == 859_520_964
    assert sum(k.startswith("cond_stage_model.") for k in spec) == 197


def test_sdxl_lora_names_are_kohyas_and_point_at_real_layers():
    spec = mm.sdxl_spec()
    unet = mm.sdxl_unet_targets(spec, mm.ATTN1 + mm.ATTN2 + mm.FF, proj=True)
    assert len(unet) == 11 * 12  # 11 transformers: proj_in/out and 10 layers of block 0
    for name, key in unet + mm.sdxl_conv_targets(spec):
        assert key in spec and name == "lora_unet_" + key[len(mm.UNET):-len(".weight")].replace(".", "_")
    assert all(len(spec[key][0]) == 4 and spec[key][0][2:] == (3, 3) for _, key in mm.sdxl_conv_targets(spec))
    te1, te2 = mm.te_targets(spec, 0, [0, 11]), mm.te_targets(spec, 1, [0, 31])
    assert te1[0][0] == "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    assert te2[-1][0] == "lora_te2_text_model_encoder_layers_31_mlp_fc2"
    assert {shape for _, _, shape in te2} == {(1280, 1280), (5120, 1280), (1280, 5120)}  # q/k/v: thirds of in_proj
    assert all(key in spec for _, key, _ in te1 + te2)


def test_lora_pair_is_low_rank_with_the_asked_size():
    shape = (64, 32, 3, 3)
    sd, ratio = mm.lowrank_pair("lora_unet_x", shape, "w", seed=1, rank=4, rel=0.08, dtype=torch.float32)
    down, up = sd["lora_unet_x.lora_down.weight"], sd["lora_unet_x.lora_up.weight"]
    assert down.shape == (4, 32, 3, 3) and up.shape == (64, 4, 1, 1) and up.abs().min() > 0
    delta = (up.flatten(1) @ down.flatten(1)) * float(sd["lora_unet_x.alpha"]) / 4
    w_norm = mm.weight_std(shape, "w") * math.sqrt(64 * 32 * 9)
    assert math.isclose(delta.norm().item() / w_norm, ratio, rel_tol=1e-4) and 0.06 <= ratio <= 0.1


def test_streamed_safetensors_read_back(tmp_path):
    path = str(tmp_path / "t.safetensors")
    tensors = {"a": torch.randn(3, 5).half(), "b.ids": torch.arange(7).reshape(1, 7), "c": torch.tensor(2.5)}
    mm.write_safetensors(path, {k: (tuple(v.shape), v.dtype, lambda v=v: v) for k, v in tensors.items()},
                         {"note": "x"})
    back = load_file(path)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())
    # deterministic: one generator per tensor, seeded from the seed and the key
    spec = {"w": ((8, 4), "w"), "fnb": ((4,), "fnb")}
    first = [mm.make_tensor(k, sh, kind, 3, torch.float16) for k, (sh, kind) in spec.items()]
    again = [mm.make_tensor(k, sh, kind, 3, torch.float16) for k, (sh, kind) in reversed(spec.items())][::-1]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True)) and first[1].abs().min() > 0
