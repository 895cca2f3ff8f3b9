"""Test-only: a random-weight ControlNet of an SD1.5 checkpoint's shape, for the opt-in real-host ControlNet tests.

    python3 -m tests.make_controlnet CHECKPOINT.safetensors OUT.safetensors [--hint-scale 12] [--residual-scale 0.3]

Follows ControlNet's own initialisation (lllyasviel/ControlNet, tool_add_control.py): the encoder (time embedding,
input blocks, middle block) is copied from the checkpoint's UNet; the hint encoder and the 1×1 "zero" convolutions
are new. Trained zero convolutions start at zero; here they are random, scaled so that the residuals change the image
clearly while it stays finite. Keys carry the `control_model.` prefix of the original .pth files, which both
sd-webui-controlnet and Forge's built-in ControlNet load. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import logging
import math
import re

import torch

UNET = "model.diffusion_model."
PREFIX = "control_model."
# Output channels of the hint encoder's 3×3 convolutions before the last (cldm.py; three of them have stride 2, which
# lives in the host's model definition, not in the weights), from image pixels to the latent grid.
HINT_CHANNELS = (16, 16, 32, 32, 96, 96, 256)


def block_channels(unet: dict[str, torch.Tensor]) -> list[int]:
    """Output channels of each UNet input block: what each zero convolution maps (12 for SD1.5)."""
    count = 1 + max(int(m.group(1)) for k in unet if (m := re.match(r"input_blocks\.(\d+)\.", k)))
    out = []
    for i in range(count):
        for key in (f"input_blocks.{i}.0.out_layers.3.weight", f"input_blocks.{i}.0.op.weight",
                    f"input_blocks.{i}.0.weight"):
            if key in unet:
                out.append(unet[key].shape[0])
                break
        else:
            raise ValueError(f"cannot tell the output channels of input block {i}")
    return out


def _conv(gen: torch.Generator, c_out: int, c_in: int, k: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights with output rms ≈ scale × input rms (He-style fan-in scaling) and zero bias."""
    std = scale / math.sqrt(c_in * k * k)
    return torch.randn(c_out, c_in, k, k, generator=gen) * std, torch.zeros(c_out)


def make_controlnet(checkpoint: dict[str, torch.Tensor], *, hint_channels: int = 3, hint_scale: float = 12.0,
                    residual_scale: float = 0.3, seed: int = 0) -> dict[str, torch.Tensor]:
    """The ControlNet state dict (`control_model.` keys) for an SD checkpoint (`model.diffusion_model.` keys)."""
    unet = {k[len(UNET):]: v for k, v in checkpoint.items() if k.startswith(UNET)}
    if not unet:
        raise ValueError(f"no {UNET}* keys: not an SD checkpoint")
    dtype = next(iter(unet.values())).dtype
    gen = torch.Generator().manual_seed(seed)
    sd = {k: v.clone() for k, v in unet.items() if k.startswith(("time_embed.", "input_blocks.", "middle_block."))}
    c_in = hint_channels
    for i, c_out in enumerate(HINT_CHANNELS):
        # SiLU between convolutions keeps about half the energy: a √2 gain holds the rms through the stack.
        w, b = _conv(gen, c_out, c_in, 3, math.sqrt(2) if i else 1.0)
        sd[f"input_hint_block.{2 * i}.weight"], sd[f"input_hint_block.{2 * i}.bias"] = w, b
        c_in = c_out
    channels = block_channels(unet)
    last = 2 * len(HINT_CHANNELS)
    sd[f"input_hint_block.{last}.weight"], sd[f"input_hint_block.{last}.bias"] = _conv(gen, channels[0], c_in, 3,
                                                                                       hint_scale)
    for i, c in enumerate(channels):
        sd[f"zero_convs.{i}.0.weight"], sd[f"zero_convs.{i}.0.bias"] = _conv(gen, c, c, 1, residual_scale)
    mid = unet["middle_block.2.out_layers.3.weight"].shape[0]
    sd["middle_block_out.0.weight"], sd["middle_block_out.0.bias"] = _conv(gen, mid, mid, 1, residual_scale)
    return {PREFIX + k: v.to(dtype).contiguous() for k, v in sd.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    # 12: on the rigs' random SD1.5 (64×64, 4 steps) two different hints then give images more than 3/255 apart
    # per pixel (tests/test_webui_controlnet.py); at 1 they were 0.5/255 apart, at 4 about 2/255.
    parser.add_argument("--hint-scale", type=float, default=12.0,
                        help="rms of the hint features relative to the hint image's")
    parser.add_argument("--residual-scale", type=float, default=0.3,
                        help="rms of each residual relative to the ControlNet feature it comes from")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from safetensors.torch import load_file, save_file

    control = make_controlnet(load_file(args.checkpoint), hint_scale=args.hint_scale,
                              residual_scale=args.residual_scale, seed=args.seed)
    save_file(control, args.out)
    size = sum(v.numel() * v.element_size() for v in control.values()) / 2**20
    logging.info("make_controlnet: wrote %s: %d keys, %.1f MiB", args.out, len(control), size)


if __name__ == "__main__":
    main()
