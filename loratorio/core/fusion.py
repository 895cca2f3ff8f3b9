"""LoRAtorio's per-step mathematics: patch similarity, SoftMin weights (Ω) and the re-centred fusion.

Pure tensor functions; they know nothing about models, samplers or hosts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# A patch whose vectors have (almost) no energy has no direction; its cosine is defined as 0, so every LoRA ties
# there and the SoftMin falls back to uniform weights instead of producing NaN.
_NORM_EPS = 1e-12


def _patch_sums(t: Tensor, p: int) -> Tensor:
    """Sum (B, C, H, W) over channels and p×p patches; ragged edge patches hold only what is left (ceil grid)."""
    h, w = t.shape[-2:]
    pad_h, pad_w = -h % p, -w % p
    # Zero padding adds nothing to a sum, so an edge patch is exactly its smaller remainder of the latent.
    t = F.pad(t.sum(dim=-3, keepdim=True), (0, pad_w, 0, pad_h))
    return F.avg_pool2d(t, p, divisor_override=1)


def patch_similarity(eps_loras: Tensor, eps_ref: Tensor, patch_size: int) -> Tensor:
    """Cosine similarity S[i, j] of each LoRA's patch j with the reference's patch j (paper §3, Φ_θi vs Φ_θ).

    eps_loras: (N, B, C, H, W); eps_ref: (B, C, H, W). Returns (N, B, 1, ceil(H/p), ceil(W/p)) in fp32.
    """
    if eps_loras.dim() != 5 or eps_ref.dim() != 4 or eps_loras.shape[1:] != eps_ref.shape:
        raise ValueError(f"expected eps_loras (N, B, C, H, W) and eps_ref (B, C, H, W), got "
                         f"{tuple(eps_loras.shape)} and {tuple(eps_ref.shape)}")
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    n, b, c, h, w = eps_loras.shape
    # fp16 dot products over C·p·p elements overflow and lose precision: the similarity is always taken in fp32.
    a = eps_loras.float().reshape(n * b, c, h, w)
    r = eps_ref.float().repeat(n, 1, 1, 1)
    dot = _patch_sums(a * r, patch_size)
    norm = (_patch_sums(a * a, patch_size) * _patch_sums(r * r, patch_size)).sqrt()
    cos = torch.where(norm > _NORM_EPS, dot / norm.clamp_min(_NORM_EPS), torch.zeros_like(dot))
    return cos.reshape(n, b, 1, *cos.shape[-2:])


def divergence_spread(eps_loras: Tensor, eps_ref: Tensor, patch_size: int) -> Tensor:
    """Per LoRA (N,): coefficient of variation over the patches of its divergence from the reference (1 − S),
    averaged over the batch. Low for a LoRA that changes the whole image alike, as a style does."""
    div = (1 - patch_similarity(eps_loras, eps_ref, patch_size)).clamp_min(0).flatten(2)
    return (div.std(dim=-1) / div.mean(dim=-1).clamp_min(_NORM_EPS)).mean(dim=-1)


def softmin_weights(similarity: Tensor, temperature: float, top_k: int | None = None,
                    min_share: float = 0.0, relative: bool = False) -> Tensor:
    """Ω = SoftMin_τ(S) over the LoRA axis (dim 0), optionally hard-masked to the k least similar (dynamic mode).

    min_share > 0 lifts every LoRA's mean weight over each image's patches to at least min_share (`floor_shares`).
    relative: each LoRA's similarity is taken relative to its own mean over the image's patches, so a LoRA wins
    where it departs most from its usual divergence, not only where it diverges most in absolute terms.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if relative:
        # A small skill (a hat) diverges less than a large one everywhere; against its own mean it still stands out.
        similarity = similarity - similarity.mean(dim=(-2, -1), keepdim=True)
    logits = -similarity / temperature
    n = similarity.shape[0]
    if top_k is not None and 0 < top_k < n:
        # Keep the k most divergent LoRAs of each patch; masking logits (not weights) renormalises for free.
        kth = logits.topk(top_k, dim=0).values[-1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if min_share > 0:
        logits = floor_shares(logits, min_share)
    return logits.softmax(dim=0)


def floor_shares(logits: Tensor, min_share: float, iterations: int = 30) -> Tensor:
    """Logits (N, B, 1, h, w) plus one offset per LoRA and image, so that each LoRA's mean weight is >= min_share.

    A LoRA that wins no patch is a requested skill lost from the image. Raising its logits everywhere by the same
    offset keeps its own map's shape (it gains first where it was closest to winning) and changes nothing for a LoRA
    already above the floor. The floor is capped at 1/N; the offsets are found by multiplicative updates (each
    raises a LoRA's share towards the floor) and stay 0 where every share already clears it.
    """
    n = logits.shape[0]
    target = math.log(min(min_share, 1.0 / n) * (1 - 1e-3))
    offset = logits.new_zeros(n, logits.shape[1], 1, 1, 1)
    for _ in range(iterations):
        share = (logits + offset).softmax(dim=0).mean(dim=(-2, -1), keepdim=True)
        lift = (target - share.clamp_min(1e-12).log()).clamp_min(0)
        if not lift.any():
            break
        offset = offset + lift
    return logits + offset


def upsample_weights(weights: Tensor, size: tuple[int, int], patch_size: int) -> Tensor:
    """Nearest-upsample Ω from the patch grid to latent size (the figure's Ω̂^up), cropping ragged edges."""
    up = weights.repeat_interleave(patch_size, dim=-2).repeat_interleave(patch_size, dim=-1)
    return up[..., : size[0], : size[1]]


def patch_weights(
    eps_loras: Tensor,
    eps_ref: Tensor,
    patch_size: int,
    temperature: float,
    top_k: int | None = None,
    min_share: float = 0.0,
    relative: bool = False,
) -> Tensor:
    """LoRAtorio's spatial weight map Ω̂^up (paper §3, SoftMin of patch cosine similarity).

    eps_loras: (N, B, C, H, W) per-LoRA cond predictions; eps_ref: (B, C, H, W) the base reference.
    Returns (N, B, 1, H, W) fp32 weights summing to 1 over N at every pixel.
    """
    sim = patch_similarity(eps_loras, eps_ref, patch_size)
    weights = softmin_weights(sim, temperature, top_k, min_share, relative)
    return upsample_weights(weights, eps_ref.shape[-2:], patch_size)


def weighted_sum(preds: Tensor, weights: Tensor) -> Tensor:
    """Σ_i Ω̂_i ⊙ preds_i over the LoRA axis; preds (N, B, C, H, W), weights (N, B, 1, H, W) or broadcastable."""
    return (weights * preds.float()).sum(dim=0).to(preds.dtype)


def recentre_uncond(base_uncond: Tensor, fused_uncond: Tensor, recentre: float) -> Tensor:
    """Re-centring (paper §3): ẽ(z) = λ·ε_θ(z, ∅) + (1 − λ)·Σ_i Ω̂_i ε_θi(z, ∅)."""
    if not 0.0 <= recentre <= 1.0:
        raise ValueError(f"recentre must be in [0, 1], got {recentre}")
    if not recentre:
        return fused_uncond
    return torch.lerp(fused_uncond.float(), base_uncond.float(), recentre).to(fused_uncond.dtype)


def compose(
    base_cond: Tensor,
    base_uncond: Tensor,
    loras_cond: Tensor,
    loras_uncond: Tensor,
    weights: Tensor,
    recentre: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """Fused cond ẽ(z,c) = Σ Ω̂_i ε_i(c) and re-centred uncond ẽ(z) = λ ε(∅) + (1−λ) Σ Ω̂_i ε_i(∅) (paper §3).

    Because Σ_i Ω̂_i = 1 at every pixel, the same call is exact in ε space and in x0 space (x0 = x − σε is affine in
    ε with shared x and σ), so hosts that hand over denoised x0 need not convert. base_cond is unused by the fusion
    itself; it is accepted so that every mode has one signature.
    """
    del base_cond
    cond = weighted_sum(loras_cond, weights)
    return cond, recentre_uncond(base_uncond, weighted_sum(loras_uncond, weights), recentre)


def to_eps(x: Tensor, denoised: Tensor, sigma: Tensor) -> Tensor:
    """ε = (x − x0)/σ, the noise a k-diffusion denoiser implies (Karras et al. 2022, eq. 3).

    x: (B, C, H, W); sigma: (B,); denoised: (B, C, H, W) or (N, B, C, H, W).
    """
    return (x - denoised) / sigma.reshape(-1, *([1] * (x.dim() - 1))).to(denoised.dtype)
