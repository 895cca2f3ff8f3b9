"""Test-only generator of the LoRA files users have, written by the LyCORIS trainer library's own network classes.

    python -m tests.lycoris_files OUT_DIR [--checkpoint SD15.safetensors] [--formats ...] [--copies N]

Needs `requirements-formats.txt` (lycoris-lora, diffusers, transformers); the default test suite never imports this.
It builds a random SD1.5 UNet (diffusers' UNet2DConditionModel, the SD1.5 config) and a CLIP ViT-L/14 text model
(transformers), loads the base weights of `--checkpoint` into them when given (an original-LDM-layout SD1.5 file such
as the rig's, so that formats relative to the base weight, DoRA and IA3, see the weights the hosts will), wraps them
with `lycoris.kohya.create_network` (what sd-scripts calls for LyCORIS) using the "full" preset (conv_in/conv_out, the
time-embedding linears, every ResBlock incl. time_emb_proj and conv_shortcut, attention, feed-forward, up/downsample
convs; text-encoder attention and MLP), gives every factor random values at a small relative magnitude (the trainer
initialises one factor to zero), and saves with the library's own `save_weights`. Plus one kohya sd-scripts-style
LoCon (its networks/lora.py module selection with `conv_dim`), written here because sd-scripts is not a package.

IA3 uses the library's own "ia3" preset (the one it warns to use with IA3: to_k, to_v and ff.net.2 with the scale on
the input), not "full": A1111 v1.10.1's network_ia3 reshapes an output scale to (out, 1), which does not broadcast
over a conv kernel, so IA3 on the "full" preset's convs cannot load there. Its target names are anchored regexes
(`re.match`), which match no full module path as written ("to_k"), so they are given here as ".*to_k$" and so on.

LoKr is written without Tucker cores: Forge and reForge rebuild lokr_w2 from lokr_t2 with an einsum whose result is
not contiguous and pass it to torch.kron(...).reshape, which raises on torch 2.13, so they cannot load such a file
at all (A1111 makes it contiguous first; LoRAtorio never forms the Kronecker product). LoCon and LoHa use Tucker.

Two quirks of the libraries, handled here so that the files read as the files users download:
- transformers 5's CLIPTextModel has no `text_model` level, so the text encoder is wrapped in one: the keys read
  `lora_te_text_model_encoder_layers_*`, which the hosts map (without it they read `lora_te_encoder_layers_*`).
- lycoris-lora 4.1.3's "full" preset lists both the `TimestepEmbedding` class and the names `time_embedding.linear_*`,
  which makes create_network fail on diffusers' SD1.5 UNet with "duplicated lora name"; the preset used here is "full"
  without that class (the same layers, once).
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import re
import time

import torch
from torch import nn

log = logging.getLogger(__name__)

TARGET = 0.03  # |ΔW| / |W| per layer: visible in an image, small enough that the random model stays finite
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)

# name -> (create_network keyword arguments, what the file exercises)
FORMATS: dict[str, tuple[dict, str]] = {
    "locon": (dict(algo="lora", network_dim=8, network_alpha=4, conv_dim=4, conv_alpha=2, use_tucker=True),
              "LoRA/LoCon, Tucker lora_mid on 3x3 convs"),
    "loha": (dict(algo="loha", network_dim=4, network_alpha=2, conv_dim=4, conv_alpha=2, use_tucker=True),
             "LoHa, Tucker hada_t1/hada_t2 on 3x3 convs"),
    "lokr": (dict(algo="lokr", network_dim=8, network_alpha=4, conv_dim=8, conv_alpha=4, factor=8),
             "LoKr factor 8: full lokr_w1, low-rank lokr_w2_a/w2_b or full lokr_w2"),
    "lokr_w1ab": (dict(algo="lokr", network_dim=4, network_alpha=2, conv_dim=4, conv_alpha=2, factor=-1,
                       decompose_both=True), "LoKr with factored lokr_w1_a/lokr_w1_b and lokr_w2_a/lokr_w2_b"),
    "dora": (dict(algo="lora", network_dim=8, network_alpha=4, conv_dim=4, conv_alpha=2, dora_wd=True),
             "DoRA: LoRA/LoCon with dora_scale (wd_on_output, the library's default)"),
    "ia3": (dict(algo="ia3", network_dim=4, network_alpha=1, preset="ia3-sd"),
            "IA3 with the library's 'ia3' preset: to_k/to_v (output scale), ff.net.2 and mlp.fc2 (input scale)"),
    "full": (dict(algo="full", network_dim=4, network_alpha=1, train_norm=True),
             "full/diff: diff and diff_b, and w_norm/b_norm on the norms"),
}
KOHYA = "kohya_locon"  # sd-scripts networks/lora.py style, rank 8 linear / 4 conv
ALL = [*FORMATS, KOHYA]


class TextModelLevel(nn.Module):
    """Gives transformers 5's CLIPTextModel back the `text_model` level that older versions (and users' files) have."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.text_model = clip


def base_models(checkpoint: str | None) -> tuple[nn.Module, nn.Module]:
    """SD1.5-shaped UNet and text encoder (random, or the checkpoint's base weights), fp32, eval."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).eval()
    clip = CLIPTextModel(CLIPTextConfig(**CLIP_L)).eval()
    if checkpoint:
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
        from safetensors.torch import load_file

        sd = load_file(checkpoint)
        converted = convert_ldm_unet_checkpoint(sd, dict(unet.config))
        missing, unexpected = unet.load_state_dict({k: v.float() for k, v in converted.items()}, strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint UNet is not SD1.5: missing {missing[:5]}, unexpected {unexpected[:5]}")
        prefix = "cond_stage_model.transformer.text_model."
        te = {k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)}
        missing, unexpected = clip.load_state_dict(te, strict=False)
        missing, unexpected = ([k for k in keys if "position_ids" not in k] for keys in (missing, unexpected))
        if missing or unexpected:
            raise ValueError(f"checkpoint text encoder does not match CLIP-L: {missing[:5]}, {unexpected[:5]}")
        del sd
    for p in [*unet.parameters(), *clip.parameters()]:
        p.requires_grad_(False)
    return unet, TextModelLevel(clip)


def _register_presets() -> None:
    """'full-sd' and 'ia3-sd': the library's "full" and "ia3" presets with the fixes of the module docstring."""
    import lycoris.config

    full = copy.deepcopy(lycoris.config.PRESET["full"])
    full["unet_target_module"] = [m for m in full["unet_target_module"] if m != "TimestepEmbedding"]
    lycoris.config.PRESET["full-sd"] = full
    ia3 = copy.deepcopy(lycoris.config.PRESET["ia3"])
    anchored = {name: f".*{re.escape(name)}$" for name in ia3["unet_target_name"] + ia3["text_encoder_target_name"]}
    for part in ("unet_target_name", "text_encoder_target_name"):
        ia3[part] = [anchored[name] for name in ia3[part]]
    ia3["name_algo_map"] = {anchored[name]: options for name, options in ia3["name_algo_map"].items()}
    lycoris.config.PRESET["ia3-sd"] = ia3


def _randomise(module: nn.Module, g: torch.Generator) -> None:
    """Random factors with |ΔW|/|W| = TARGET, scaling the one factor the delta is linear in."""
    name = type(module).__name__
    params = dict(module.named_parameters())
    for p in params.values():
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(max(p[0].numel(), 1)))
    if name == "NormModule":
        with torch.no_grad():
            for p in params.values():
                p.mul_(TARGET)
        return
    org = module.org_weight.float()
    if name == "FullModule":
        with torch.no_grad():
            noise = torch.randn(org.shape, generator=g)
            module.weight.copy_(org + noise * (TARGET * org.norm() / noise.norm()))
            if module.bias is not None:
                bias = module.org_bias[0]
                module.bias.copy_(bias + torch.randn(bias.shape, generator=g) * TARGET * (bias.std() + 1e-3))
        return
    if name == "IA3Module":
        with torch.no_grad():
            module.weight.copy_(torch.randn(module.weight.shape, generator=g) * TARGET)
        return
    lead = {"LoConModule": "lora_up.weight", "LohaModule": "hada_w1_a", "LokrModule": "lokr_w1"}[name]
    if lead not in params:
        lead = "lokr_w1_a"
    if lead not in params:
        raise KeyError(f"{module.lora_name}: {name} has {sorted(params)}")
    if "dora_scale" in params:  # the magnitude starts at |W|; move it a little so that it matters
        with torch.no_grad():
            m = _dora_magnitude(org, params["dora_scale"].shape)
            params["dora_scale"].copy_(m * (1 + TARGET * torch.randn(m.shape, generator=g)))
    with torch.no_grad():
        diff = module.get_diff_weight(multiplier=1)[0].float()
        params[lead].mul_(TARGET * org.norm() / diff.norm().clamp_min(1e-12))


def _dora_magnitude(w: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if shape[0] == w.shape[0]:  # wd_on_output
        return w.reshape(w.shape[0], -1).norm(dim=1).reshape(shape)
    return w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(shape)


def write_lycoris(fmt: str, unet: nn.Module, te: nn.Module, path: str, seed: int, dtype: torch.dtype) -> int:
    """One LyCORIS file of format `fmt`; returns its number of modules."""
    from lycoris.kohya import create_network

    kwargs = dict(FORMATS[fmt][0])
    dim, alpha = kwargs.pop("network_dim"), kwargs.pop("network_alpha")
    _register_presets()
    preset = kwargs.pop("preset", "full-sd")
    net = create_network(1.0, dim, alpha, None, te, unet, preset=preset, **kwargs)
    net.apply_to(te, unet, apply_text_encoder=True, apply_unet=True)
    try:
        g = torch.Generator().manual_seed(seed)
        for module in net.loras:
            _randomise(module, g)
        net.save_weights(path, dtype, {"ss_network_module": "lycoris.kohya", "loratorio_test_format": fmt})
        return len(net.loras)
    finally:
        for module in net.loras:
            module.restore()


def write_kohya_locon(unet: nn.Module, te: nn.Module, path: str, seed: int, dtype: torch.dtype,
                      rank: int = 8, conv_rank: int = 4) -> int:
    """sd-scripts networks/lora.py with conv_dim: Transformer2DModel Linear/1x1 layers at `rank`; ResnetBlock2D,
    Downsample2D, Upsample2D: 3x3 convs at `conv_rank`, their Linear/1x1 at `rank`; text encoder CLIPAttention and
    CLIPMLP. Keys lora_unet_/lora_te_ + module path, lora_down/lora_up/alpha."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    plan = [("lora_unet", unet, ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")),
            ("lora_te", te, ("CLIPAttention", "CLIPMLP"))]
    for prefix, root, classes in plan:
        for name, block in root.named_modules():
            if type(block).__name__ not in classes:
                continue
            for child_name, child in block.named_modules():
                conv = isinstance(child, nn.Conv2d)
                if not (isinstance(child, nn.Linear) or conv):
                    continue
                one = not conv or child.kernel_size == (1, 1)
                r = rank if one else conv_rank
                key = f"{prefix}.{name}.{child_name}".replace(".", "_")
                w = child.weight.float()
                if conv:
                    down = torch.randn(r, w.shape[1], *w.shape[2:], generator=g) / math.sqrt(w[0].numel())
                    up = torch.randn(w.shape[0], r, 1, 1, generator=g)
                    delta = up.flatten(1) @ down.flatten(1)
                else:
                    down = torch.randn(r, w.shape[1], generator=g) / math.sqrt(w.shape[1])
                    up = torch.randn(w.shape[0], r, generator=g)
                    delta = up @ down
                alpha = r / 2
                up *= TARGET * w.norm() / (delta.norm() * alpha / r)
                out[f"{key}.lora_down.weight"] = down.to(dtype).contiguous()
                out[f"{key}.lora_up.weight"] = up.to(dtype).contiguous()
                out[f"{key}.alpha"] = torch.tensor(alpha, dtype=dtype)
    save_file(out, path, {"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                          "ss_network_args": f'{{"conv_dim": "{conv_rank}"}}', "loratorio_test_format": KOHYA})
    return len(out) // 3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--checkpoint", help="SD1.5 checkpoint (original LDM layout) whose base weights to use")
    parser.add_argument("--formats", nargs="+", default=ALL, choices=ALL)
    parser.add_argument("--copies", type=int, default=1, help="files per format, each with its own seed (_2, _3…)")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "fp32"])
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("LyCORIS").setLevel(logging.WARNING)
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    os.makedirs(args.out_dir, exist_ok=True)
    torch.set_grad_enabled(False)
    unet, te = base_models(args.checkpoint)
    # "full" last: its modules hold two extra copies of the model while they exist.
    for i, fmt in enumerate(sorted(args.formats, key=lambda f: f == "full")):
        for copy_index in range(1, args.copies + 1):
            name = f"lyco_{fmt}" + (f"_{copy_index}" if copy_index > 1 else "")
            path = os.path.join(args.out_dir, name + ".safetensors")
            start = time.time()
            seed = args.seed + 100 * i + copy_index
            if fmt == KOHYA:
                n = write_kohya_locon(unet, te, path, seed, dtype)
            else:
                n = write_lycoris(fmt, unet, te, path, seed, dtype)
            log.info("%s: %d modules, %.1f MB, %.0f s", path, n, os.path.getsize(path) / 2**20, time.time() - start)


if __name__ == "__main__":
    main()
