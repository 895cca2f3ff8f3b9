"""LoRA state dicts (kohya/LyCORIS `lora_down`/`lora_up`, peft `lora_A`/`lora_B`, LoHa, LoKr, full) as adapters.

Hosts with their own LoRA loader (A1111, Forge) hand their modules over instead; this parser serves the toy models,
benchmarks and non-WebUI front ends, and the tests' round trips.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from loratorio.core.adapters import Adapter, Dense, LoHa, LoKr, LowRank, Rescaled, merged_weight

_SUFFIXES = {
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid",
    "lora_A.weight": "down", "lora_B.weight": "up", "alpha": "alpha",
    "hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a", "hada_w2_b": "w2b",
    "lokr_w1": "k1", "lokr_w2": "k2", "lokr_w1_a": "k1a", "lokr_w1_b": "k1b", "lokr_w2_a": "k2a", "lokr_w2_b": "k2b",
    "hada_t1": "t1", "hada_t2": "t2", "lokr_t2": "kt2", "dora_scale": "dora",
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


def to_adapter(parts: dict[str, Tensor], multiplier: float = 1.0, weight: Tensor | None = None) -> Adapter:
    """One layer's parts as an adapter applied from its factors (the formulas of Forge's merge_lora_to_weight).

    `weight`, the layer's base weight, is needed for DoRA (`dora_scale`) only.
    """
    inner: Adapter
    mult = 1.0 if "dora" in parts else multiplier  # DoRA applies the multiplier after its normalisation
    if "down" in parts and "up" in parts:
        alpha = float(parts["alpha"]) if "alpha" in parts else None
        inner = LowRank(parts["down"], parts["up"], alpha, parts.get("mid"), mult)
    elif "w1a" in parts:
        # LoHa (Hyeon-Woo et al. 2022): ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha/rank.
        inner = LoHa(parts["w1a"], parts["w1b"], parts["w2a"], parts["w2b"], _scale(parts, parts["w1b"].shape[0]),
                     parts.get("t1"), parts.get("t2"), mult)
    elif {"k1", "k1a"} & parts.keys():
        # LoKr: ΔW = w1 ⊗ w2, either factor possibly low-rank; alpha/rank applies only to a decomposed factor.
        rank = parts["k2b"].shape[0] if "k2b" in parts and "k2" not in parts else \
            parts["k1b"].shape[0] if "k1b" in parts and "k1" not in parts else 0
        inner = LoKr(parts.get("k1"), parts.get("k2"), parts.get("k1a"), parts.get("k1b"), parts.get("k2a"),
                     parts.get("k2b"), parts.get("kt2"), _scale(parts, rank) if rank else 1.0, mult)
    elif "diff" in parts:
        return Dense(parts["diff"], parts.get("diff_b"), multiplier=multiplier)
    else:
        raise ValueError(f"incomplete LoRA layer: parts {sorted(parts)}")
    if "dora" not in parts:
        return inner
    if weight is None:
        raise ValueError("a DoRA layer (dora_scale) needs the layer's base weight")
    w, m = weight.float(), parts["dora"].float()
    eps = torch.finfo(torch.float32).eps
    if m.shape[0] == w.shape[0]:  # wd_on_output: the norms of W's rows (weight_decompose)
        return Rescaled(inner, m.flatten() / (w.reshape(w.shape[0], -1).norm(dim=1) + eps), None, multiplier)
    merged = w + merged_weight(_shaped(w), inner).float()
    norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1) + eps
    return Rescaled(inner, None, m.flatten() / norm, multiplier)


def _shaped(w: Tensor) -> nn.Module:
    """A stand-in layer of w's shape, for merged_weight."""
    if w.dim() == 4:
        return nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), bias=False, device="meta")
    return nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")


def adapters_for_model(
    root: nn.Module,
    state_dict: Mapping[str, Tensor],
    prefix: str = "lora_unet",
    multiplier: float = 1.0,
) -> dict[str, Adapter]:
    """Map a kohya-style state dict onto `root`'s module names; a key that matches no module is an error."""
    by_key = {kohya_name(name, prefix): name for name, _ in root.named_modules() if name}
    out = {}
    for key, parts in group_keys(state_dict).items():
        if key not in by_key:
            raise ValueError(f"LoRA layer {key!r} matches no module of the model")
        layer = root.get_submodule(by_key[key])
        out[by_key[key]] = to_adapter(parts, multiplier, getattr(layer, "weight", None))
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
