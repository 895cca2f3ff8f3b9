"""LoRAtorio's weight maps as images: where each LoRA won, averaged over the sampling steps."""

from __future__ import annotations

import numpy as np
from torch import Tensor

LATENT_SCALE = 8  # SD's VAE: one latent pixel is 8×8 image pixels


def accumulate(total: Tensor | None, steps: int, maps: Tensor) -> tuple[Tensor, int]:
    """Running sum of (N, B, h, w) weight maps over steps; restarts when the shape changes (a new pass or size)."""
    if total is None or total.shape != maps.shape:
        return maps.clone(), 1
    return total + maps, steps + 1


def weight_map_images(mean_maps: Tensor, names: list[str]) -> list[tuple[str, object]]:
    """(caption, PIL image) per image and LoRA from (N, B, h, w) mean weights in [0, 1]; white = that LoRA won."""
    from PIL import Image  # the WebUIs ship Pillow; imported late so the core and tests never need it

    out = []
    n, b = mean_maps.shape[:2]
    for image in range(b):
        for i in range(n):
            pixels = (mean_maps[i, image].clamp(0, 1).numpy() * 255).round().astype(np.uint8)
            img = Image.fromarray(pixels, mode="L").resize(
                (pixels.shape[1] * LATENT_SCALE, pixels.shape[0] * LATENT_SCALE), Image.NEAREST)
            out.append((f"LoRAtorio weight map: {names[i]} (image {image + 1})", img))
    return out
