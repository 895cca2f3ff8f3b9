"""The miniature text-to-image model: a token-wise text encoder and a small cross-attention UNet (EDM-preconditioned).

The "VAE" is a fixed, lossless pixel-unshuffle: a 3×32×32 image in [-1, 1] is a 12×16×16 latent, so a latent pixel
covers 2×2 image pixels (SD1.5's covers 8×8).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loratorio.miniworld.world import MAX_TOKENS, PAD, VOCAB

LATENT = (12, 16, 16)
SIGMA_DATA = 0.5
CTX = 32


def encode_image(img: Tensor) -> Tensor:
    """(B, 3, 32, 32) in [0, 1] -> latent (B, 12, 16, 16) in [-1, 1]."""
    return F.pixel_unshuffle(img * 2 - 1, 2)


def decode_latent(z: Tensor) -> Tensor:
    """Latent (B, 12, 16, 16) -> image (B, 3, 32, 32) in [0, 1]."""
    return (F.pixel_shuffle(z, 2) + 1).div(2).clamp(0, 1)


def tokenize(prompts: Sequence[Sequence[str]], vocab: Sequence[str] = VOCAB) -> Tensor:
    """Word lists -> (B, MAX_TOKENS) ids, padded with <pad>; an unknown word is an error."""
    index = {w: i for i, w in enumerate(vocab)}
    ids = torch.full((len(prompts), MAX_TOKENS), index[PAD], dtype=torch.long)
    for row, words in enumerate(prompts):
        if len(words) > MAX_TOKENS:
            raise ValueError(f"at most {MAX_TOKENS} words per prompt, got {list(words)}")
        for col, w in enumerate(words):
            if w not in index:
                raise ValueError(f"unknown word {w!r}; vocabulary: {tuple(vocab)}")
            ids[row, col] = index[w]
    return ids


class TextEncoder(nn.Module):
    """Embedding + token-wise MLP: prompts are sets of words, so no positions and no token mixing are needed.

    Every vocabulary word has an embedding; the skill triggers' stay at their random initialisation because the base
    model never sees them (like a rare token such as "sks" in a real text encoder).
    """

    def __init__(self, dim: int = CTX, vocab_size: int = len(VOCAB)) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(ids)
        return h + self.fc2(F.gelu(self.fc1(self.norm(h))))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added in between (as SD's ResnetBlock2D)."""

    def __init__(self, cin: int, cout: int, tdim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(8, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Linear(tdim, cout)
        self.norm2 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.time(temb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class CrossAttention(nn.Module):
    """Pixels attend to the prompt's tokens (to_q/to_k/to_v/to_out, SD's names), then a small feed-forward."""

    def __init__(self, dim: int, ctx: int = CTX, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(8, dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(ctx, dim, bias=False)
        self.to_v = nn.Linear(ctx, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.ff1 = nn.Linear(dim, 2 * dim)
        self.ff2 = nn.Linear(2 * dim, dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)

        def split(t: Tensor) -> Tensor:
            return t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2)

        q, k, v = split(self.to_q(tokens)), split(self.to_k(context)), split(self.to_v(context))
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        tokens = x.flatten(2).transpose(1, 2) + self.to_out(attn)
        tokens = tokens + self.ff2(F.gelu(self.ff1(tokens)))
        return tokens.transpose(1, 2).reshape(b, c, h, w)


class UNet(nn.Module):
    """Two resolutions (16², 8²), ResBlocks and cross-attention at both, one skip: F(c_in·x, c_noise, context)."""

    def __init__(self, ch: int = 24, tdim: int = 64) -> None:
        super().__init__()
        cin = LATENT[0]
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(100), 8)), persistent=False)
        self.time1 = nn.Linear(16, tdim)
        self.time2 = nn.Linear(tdim, tdim)
        self.conv_in = nn.Conv2d(cin, ch, 3, padding=1)
        self.down_res = ResBlock(ch, ch, tdim)
        self.down_attn = CrossAttention(ch)
        self.downsample = nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1)
        self.mid_res = ResBlock(2 * ch, 2 * ch, tdim)
        self.mid_attn = CrossAttention(2 * ch)
        self.upsample = nn.Conv2d(2 * ch, ch, 3, padding=1)
        self.up_res = ResBlock(2 * ch, ch, tdim)
        self.up_attn = CrossAttention(ch)
        self.norm_out = nn.GroupNorm(8, ch)
        self.conv_out = nn.Conv2d(ch, cin, 3, padding=1)

    def forward(self, x: Tensor, c_noise: Tensor, context: Tensor) -> Tensor:
        f = c_noise[:, None] * self.freqs
        temb = self.time2(F.silu(self.time1(torch.cat([f.sin(), f.cos()], 1))))
        h0 = self.down_attn(self.down_res(self.conv_in(x), temb), context)
        h = self.mid_attn(self.mid_res(self.downsample(h0), temb), context)
        h = self.upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.up_attn(self.up_res(torch.cat([h, h0], 1), temb), context)
        return self.conv_out(F.silu(self.norm_out(h)))


class Denoiser(nn.Module):
    """EDM preconditioning (Karras et al. 2022, Table 1): returns denoised x0, as the WebUIs' CFG denoisers see it."""

    def __init__(self, unet: UNet) -> None:
        super().__init__()
        self.inner_model = unet

    def forward(self, x: Tensor, sigma: Tensor, context: Tensor) -> Tensor:
        s = sigma.view(-1, 1, 1, 1)
        c_skip = SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2)
        c_out = s * SIGMA_DATA / (s**2 + SIGMA_DATA**2).sqrt()
        c_in = 1 / (s**2 + SIGMA_DATA**2).sqrt()
        return c_skip * x + c_out * self.inner_model(c_in * x, sigma.log() / 4, context)


def karras_sigmas(steps: int, sigma_min: float = 0.02, sigma_max: float = 20.0, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022 eq. 5 noise levels, with a final 0 (k-diffusion's get_sigmas_karras)."""
    ramp = torch.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1)])


def lora_targets(unet: UNet) -> list[str]:
    """The UNet layers a LoRA adapts: every Linear and Conv2d (LoCon-style), named as kohya's `lora_unet_*` keys."""
    return [name for name, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
