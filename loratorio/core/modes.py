"""Composition modes behind one interface: LoRAtorio, and the Composite and Switch baselines for A/B comparison.

"Merge" is the host's own behaviour (all LoRAs summed into the weights) and needs no code here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from loratorio.core.fusion import patch_weights

MODES = ("loratorio", "composite", "switch")


def switch_index(step: int, n_loras: int, interval: int) -> int:
    """LoRA Switch (Zhong et al. 2024): the LoRA active at `step`, cycling every `interval` steps."""
    if n_loras < 1 or interval < 1:
        raise ValueError(f"need n_loras >= 1 and interval >= 1, got {n_loras} and {interval}")
    return (step // interval) % n_loras


def in_window(step: int, total_steps: int, start: float, end: float) -> bool:
    """Whether `step` of `total_steps` falls in the [start, end) fraction of sampling where composition runs."""
    if total_steps <= 0:
        return True
    frac = step / total_steps
    return start <= frac < end or (end >= 1.0 and frac >= 1.0)


def mode_weights(
    mode: str,
    eps_loras: Tensor,
    eps_ref: Tensor | None = None,
    *,
    patch_size: int = 8,
    temperature: float = 0.05,
    top_k: int | None = None,
    step: int = 0,
    switch_interval: int = 5,
    min_share: float = 0.0,
    relative: bool = False,
) -> Tensor:
    """Ω for one step: LoRAtorio's SoftMin map, Composite's uniform mean, or Switch's one-hot schedule.

    eps_loras: (N, B, C, H, W) cond predictions in ε space; eps_ref: (B, C, H, W), needed by LoRAtorio only.
    Returns weights broadcastable to (N, B, 1, H, W) that sum to 1 over N; pass them to `compose`.
    """
    n = eps_loras.shape[0]
    if mode == "loratorio":
        if eps_ref is None:
            raise ValueError("loratorio mode needs the base model's reference prediction")
        return patch_weights(eps_loras, eps_ref, patch_size, temperature, top_k, min_share, relative)
    if mode == "composite":
        return torch.full((n, 1, 1, 1, 1), 1.0 / n, device=eps_loras.device)
    if mode == "switch":
        onehot = torch.zeros((n, 1, 1, 1, 1), device=eps_loras.device)
        onehot[switch_index(step, n, switch_interval)] = 1.0
        return onehot
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def mode_recentre(mode: str, recentre: float) -> float:
    """λ for a mode: the baselines are the published ones and do not re-centre (Zhong et al. 2024)."""
    return recentre if mode == "loratorio" else 0.0
