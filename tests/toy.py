"""Tiny seeded UNet-like model and LoRAs for the CPU test suite (diffusers' dummy sizes: channels 4/8, context 8)."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loratorio.core import LowRank, merged_weight

CTX = 8


class TinyUNet(nn.Module):
    """conv, resnet conv, cross-attention (Linear q/k/v/out), feed-forward, 1×1 projection, a time-embedding Linear
    (one row per image) and GroupNorm/LayerNorm: every targeted kind."""

    def __init__(self, ch: int = 4, hidden: int = 8, ctx: int = CTX) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(ch, hidden, 3, padding=1)
        self.time = nn.Linear(1, hidden)
        self.res = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.to_q = nn.Linear(hidden, hidden, bias=False)
        self.to_k = nn.Linear(ctx, hidden, bias=False)
        self.to_v = nn.Linear(ctx, hidden, bias=False)
        self.to_out = nn.Linear(hidden, hidden)
        self.ff1 = nn.Linear(hidden, 2 * hidden)
        self.ff2 = nn.Linear(2 * hidden, hidden)
        self.proj = nn.Conv2d(hidden, hidden, 1)
        self.conv_out = nn.Conv2d(hidden, ch, 3, padding=1)
        # Norms (initialised without the RNG, so every other weight is as before): for norm-layer deltas.
        self.norm = nn.GroupNorm(2, hidden)
        self.ln = nn.LayerNorm(hidden)

    def forward(self, x: Tensor, sigma: Tensor, context: Tensor) -> Tensor:
        b, _, h, w = x.shape
        c_in = 1 / (sigma**2 + 1).sqrt()
        feat = self.conv_in(x * c_in.view(-1, 1, 1, 1)) + self.time(sigma.log().view(-1, 1))[:, :, None, None]
        feat = feat + self.res(F.silu(self.norm(feat)))
        tokens = feat.flatten(2).transpose(1, 2)
        q, k, v = self.to_q(tokens), self.to_k(context), self.to_v(context)
        attn = (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).softmax(-1) @ v
        tokens = tokens + self.to_out(attn)
        tokens = tokens + self.ff2(F.gelu(self.ff1(self.ln(tokens))))
        feat = self.proj(tokens.transpose(1, 2).reshape(b, -1, h, w))
        return self.conv_out(F.silu(feat))


class Denoiser(nn.Module):
    """k-diffusion-style wrapper: returns denoised x0 = x − σ·ε, as the WebUIs' CFG denoisers see it."""

    def __init__(self, unet: TinyUNet) -> None:
        super().__init__()
        self.inner_model = unet

    def forward(self, x: Tensor, sigma: Tensor, context: Tensor) -> Tensor:
        return x - sigma.view(-1, 1, 1, 1) * self.inner_model(x, sigma, context)


def make_unet(seed: int = 0) -> TinyUNet:
    torch.manual_seed(seed)
    return TinyUNet().eval()


def _randn(gen: torch.Generator, *shape: int, std: float = 0.3) -> Tensor:
    return torch.randn(*shape, generator=gen) * std


def make_lora(unet: TinyUNet, seed: int, rank: int = 2, multiplier: float = 1.0) -> dict[str, LowRank]:
    """A LoRA on every kind of target, with random non-zero `up` (a zero `up` would make every test pass)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, LowRank] = {}
    for name in ("to_q", "to_k", "to_v", "to_out", "ff1", "ff2", "time"):
        layer = getattr(unet, name)
        out[name] = LowRank(_randn(g, rank, layer.in_features), _randn(g, layer.out_features, rank),
                            alpha=rank / 2, multiplier=multiplier)
    # LoCon: k×k down then 1×1 up, and a 1×1 conv given as 2-D factors.
    out["res"] = LowRank(_randn(g, rank, 8, 3, 3), _randn(g, 8, rank, 1, 1), alpha=1.0, multiplier=multiplier)
    out["proj"] = LowRank(_randn(g, rank, 8), _randn(g, 8, rank), multiplier=multiplier)
    # LoCon with a Tucker mid: 1×1 down, k×k mid, 1×1 up.
    out["conv_in"] = LowRank(_randn(g, rank, 4, 1, 1), _randn(g, 8, rank, 1, 1), alpha=rank,
                             mid=_randn(g, rank, rank, 3, 3), multiplier=multiplier)
    return out


def merged_copy(unet: TinyUNet, lora: dict[str, LowRank]) -> TinyUNet:
    """A copy of the model with the LoRA summed into its weights: the host's plain "merge" behaviour."""
    model = copy.deepcopy(unet)
    with torch.no_grad():
        for name, adapter in lora.items():
            layer = model.get_submodule(name)
            layer.weight += merged_weight(layer, adapter)
    return model
