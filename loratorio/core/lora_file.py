"""LoRA state dicts (kohya/LyCORIS `lora_down`/`lora_up`, peft `lora_A`/`lora_B`, LoHa, LoKr, full) as adapters.

Hosts with their own LoRA loader (A1111, Forge) hand their modules over instead; this parser serves the toy models,
benchmarks and non-WebUI front ends, and the tests' round trips.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from loratorio.core.adapters import Dense, LowRank

_SUFFIXES = {
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid",
    "lora_A.weight": "down", "lora_B.weight": "up", "alpha": "alpha",
    "hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a", "hada_w2_b": "w2b",
    "lokr_w1": "k1", "lokr_w2": "k2", "lokr_w1_a": "k1a", "lokr_w1_b": "k1b", "lokr_w2_a": "k2a", "lokr_w2_b": "k2b",
    "diff": "diff", "diff_b": "diff_b",
}


def kohya_name(module_name: str, prefix: str = "lora_unet") -> str:
    """kohya's key for a module path: 'mid.attn.to_q' -> 'lora_unet_mid_attn_to_q'."""
    return f"{prefix}_{module_name.replace('.', '_')}"


def group_keys(state_dict: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Split a state dict into {layer key: {part: tensor}}; unknown keys are an error, not silently dropped."""
    out: dict[str, dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        for suffix, part in _SUFFIXES.items():
            if key.endswith("." + suffix):
                out.setdefault(key[: -len(suffix) - 1], {})[part] = value
                break
        else:
            raise ValueError(f"unrecognised LoRA key {key!r}")
    return out


def _scale(parts: dict[str, Tensor], rank: int) -> float:
    return float(parts["alpha"]) / rank if "alpha" in parts else 1.0


def to_adapter(parts: dict[str, Tensor], multiplier: float = 1.0) -> LowRank | Dense:
    """One layer's parts as an adapter: LowRank for LoRA/LoCon, Dense (ΔW computed now) for the other kinds."""
    if "down" in parts and "up" in parts:
        alpha = float(parts["alpha"]) if "alpha" in parts else None
        return LowRank(parts["down"], parts["up"], alpha, parts.get("mid"), multiplier)
    if "w1a" in parts:
        # LoHa (Hyeon-Woo et al. 2022): ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha/rank.
        w = (parts["w1a"] @ parts["w1b"]) * (parts["w2a"] @ parts["w2b"])
        return Dense(w * _scale(parts, parts["w1b"].shape[0]), multiplier=multiplier)
    if {"k1", "k1a"} & parts.keys():
        # LoKr: ΔW = w1 ⊗ w2, either factor possibly low-rank; alpha/rank applies only to a decomposed factor.
        w1 = parts["k1"] if "k1" in parts else parts["k1a"] @ parts["k1b"]
        w2 = parts["k2"] if "k2" in parts else parts["k2a"] @ parts["k2b"].flatten(1)
        rank = parts["k1b"].shape[0] if "k1b" in parts else parts["k2b"].shape[0] if "k2b" in parts else 0
        return Dense(torch.kron(w1, w2.flatten(1)) * (_scale(parts, rank) if rank else 1.0), multiplier=multiplier)
    if "diff" in parts:
        return Dense(parts["diff"], parts.get("diff_b"), multiplier=multiplier)
    raise ValueError(f"incomplete LoRA layer: parts {sorted(parts)}")


def adapters_for_model(
    root: nn.Module,
    state_dict: Mapping[str, Tensor],
    prefix: str = "lora_unet",
    multiplier: float = 1.0,
) -> dict[str, LowRank | Dense]:
    """Map a kohya-style state dict onto `root`'s module names; a key that matches no module is an error."""
    by_key = {kohya_name(name, prefix): name for name, _ in root.named_modules() if name}
    out = {}
    for key, parts in group_keys(state_dict).items():
        if key not in by_key:
            raise ValueError(f"LoRA layer {key!r} matches no module of the model")
        out[by_key[key]] = to_adapter(parts, multiplier)
    return out


def to_state_dict(adapters: Mapping[str, LowRank], prefix: str = "lora_unet") -> dict[str, Tensor]:
    """Inverse of adapters_for_model for low-rank adapters, in kohya's key format (for saving as safetensors)."""
    out = {}
    for name, a in adapters.items():
        key = kohya_name(name, prefix)
        out[f"{key}.lora_down.weight"] = a.down.contiguous()
        out[f"{key}.lora_up.weight"] = a.up.contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(a.rank if a.alpha is None else a.alpha))
        if a.mid is not None:
            out[f"{key}.lora_mid.weight"] = a.mid.contiguous()
    return out
