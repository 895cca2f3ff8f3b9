"""LyCORIS-format factors for the tiny test UNet, laid out as the trainer writes them, and as each host loads them.

`file_weights(fmt, unet, seed)` gives {layer name: {file key suffix: tensor}} with the shapes LyCORIS stores
(lora_down/lora_mid/lora_up, hada_w1_a…/hada_t1, lokr_w1…/lokr_t2, dora_scale, IA3 weight/on_input, diff/diff_b,
w_norm/b_norm); `a1111_network`, `forge_patches` turn them into what A1111's Lora extension and Forge's/reForge's
loaders hold. Every delta is random and non-zero at a small relative size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from loratorio.core import LowRank

LINEAR = ("to_q", "to_k", "to_v", "to_out", "ff1", "ff2", "time")
CONV = ("conv_in", "res", "conv_out", "proj")
NORMS = ("norm", "ln")
# Formats: the native kinds, with and without their optional parts (Tucker cores, factored LoKr halves, DoRA axes).
FORMATS = ("lora", "locon_tucker", "loha", "loha_tucker", "lokr", "lokr_w2ab", "lokr_w1ab", "lokr_tucker", "dora",
           "dora_in", "loha_dora", "ia3", "ia3_in", "full")
# Forge/reForge have no IA3 loader, and cannot merge a Tucker LoKr themselves: their torch.kron(w1, w2).reshape of the
# non-contiguous einsum rebuild of lokr_t2 raises (A1111 calls .contiguous() first).
FORGE_FORMATS = tuple(f for f in FORMATS if not f.startswith("ia3") and f != "lokr_tucker")


def _split(n: int) -> tuple[int, int]:
    """LoKr's factorization of a dimension into (small, large)."""
    return (2, n // 2) if n % 2 == 0 and n > 2 else (1, n)


def file_weights(fmt: str, unet: nn.Module, seed: int, rank: int = 2) -> dict[str, dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float = 0.3) -> Tensor:
        return torch.randn(*shape, generator=g) * std

    out: dict[str, dict[str, Tensor]] = {}
    layers = LINEAR + CONV
    if fmt.startswith("ia3"):
        layers = LINEAR
    for name in layers:
        layer = unet.get_submodule(name)
        w = layer.weight
        o, i, k = w.shape[0], w.shape[1], tuple(w.shape[2:])
        kk = int(torch.tensor(k).prod()) if k else 1
        big_kernel = bool(k) and k != (1, 1)
        alpha = torch.tensor(float(rank) / 2)
        if fmt in ("lora", "dora", "dora_in") or (fmt == "locon_tucker" and not big_kernel):
            parts = {"lora_down.weight": randn(rank, i, *k), "lora_up.weight": randn(o, rank, *(1,) * len(k)),
                     "alpha": alpha}
            if fmt == "dora":
                parts["dora_scale"] = w.detach().reshape(o, -1).norm(dim=1).reshape(o, *(1,) * (w.dim() - 1)) * (
                    1 + randn(o, *(1,) * (w.dim() - 1), std=0.1))
            if fmt == "dora_in":
                norm = w.detach().transpose(0, 1).reshape(i, -1).norm(dim=1).reshape(1, i, *(1,) * (w.dim() - 2))
                parts["dora_scale"] = norm * (1 + randn(*norm.shape, std=0.1))
        elif fmt == "locon_tucker":
            parts = {"lora_down.weight": randn(rank, i, 1, 1), "lora_mid.weight": randn(rank, rank, *k),
                     "lora_up.weight": randn(o, rank, 1, 1), "alpha": alpha}
        elif fmt in ("loha", "loha_dora") or (fmt == "loha_tucker" and not big_kernel):
            parts = {"hada_w1_a": randn(o, rank), "hada_w1_b": randn(rank, i * kk), "hada_w2_a": randn(o, rank),
                     "hada_w2_b": randn(rank, i * kk), "alpha": alpha}
            if fmt == "loha_dora":
                parts["dora_scale"] = w.detach().reshape(o, -1).norm(dim=1).reshape(o, *(1,) * (w.dim() - 1)) * 1.05
        elif fmt == "loha_tucker":
            parts = {"hada_t1": randn(rank, rank, *k), "hada_w1_a": randn(rank, o), "hada_w1_b": randn(rank, i),
                     "hada_t2": randn(rank, rank, *k), "hada_w2_a": randn(rank, o), "hada_w2_b": randn(rank, i),
                     "alpha": alpha}
        elif fmt.startswith("lokr"):
            (a, b), (c, d) = _split(o), _split(i)
            parts = {"alpha": alpha}
            if fmt == "lokr_w1ab":
                parts |= {"lokr_w1_a": randn(a, 1), "lokr_w1_b": randn(1, c)}
            else:
                parts["lokr_w1"] = randn(a, c)
            if fmt == "lokr":
                parts["lokr_w2"] = randn(b, d, *k)
            elif fmt == "lokr_tucker" and big_kernel:
                parts |= {"lokr_t2": randn(rank, rank, *k), "lokr_w2_a": randn(rank, b), "lokr_w2_b": randn(rank, d)}
            else:
                parts |= {"lokr_w2_a": randn(b, rank), "lokr_w2_b": randn(rank, d * kk)}
        elif fmt == "ia3":
            parts = {"weight": randn(o), "on_input": torch.tensor(0)}
        elif fmt == "ia3_in":
            parts = {"weight": randn(i), "on_input": torch.tensor(1)}
        elif fmt == "full":
            parts = {"diff": randn(*w.shape, std=0.05)}
            if layer.bias is not None:
                parts["diff_b"] = randn(o, std=0.05)
        else:
            raise ValueError(fmt)
        out[name] = parts
    if fmt == "full":
        for name in NORMS:
            n = unet.get_submodule(name).weight.shape[0]
            out[name] = {"w_norm": randn(n, std=0.1), "b_norm": randn(n, std=0.1)}
    return out


def a1111_network_specs(weights: dict[str, dict[str, Tensor]]) -> dict[str, tuple[str, dict]]:
    """{layer: (module type, weights)} for tests.fake_a1111.Network."""
    specs = {}
    for name, w in weights.items():
        if "lora_down.weight" in w:
            lora = LowRank(w["lora_down.weight"], w["lora_up.weight"], float(w["alpha"]), w.get("lora_mid.weight"))
            specs[name] = ("lora", {"lora": lora, "dora_scale": w.get("dora_scale")})
        elif "hada_w1_a" in w:
            specs[name] = ("hada", w)
        elif any(k.startswith("lokr") for k in w):
            specs[name] = ("lokr", w)
        elif "on_input" in w:
            specs[name] = ("ia3", w)
        elif "w_norm" in w:
            specs[name] = ("norm", w)
        else:
            specs[name] = ("full", w)
    return specs


@dataclass
class WeightAdapter:
    """reForge's weight_adapter objects (LoRAAdapter, LoHaAdapter, LoKrAdapter): a name and a weights tuple."""

    name: str
    weights: tuple


def forge_patches(weights: dict[str, dict[str, Tensor]], reforge: bool = False) -> dict[str, object]:
    """{parameter key: patch} as Forge's comfyui load_lora builds them (reForge: weight_adapter objects)."""
    out: dict[str, object] = {}
    for name, w in weights.items():
        key = f"diffusion_model.{name}"
        alpha = float(w["alpha"]) if "alpha" in w else None
        dora = w.get("dora_scale")
        if "lora_down.weight" in w:
            v = ("lora", (w["lora_up.weight"], w["lora_down.weight"], alpha, w.get("lora_mid.weight"), dora))
            if reforge:
                v = WeightAdapter("lora", (*v[1], None))
        elif "hada_w1_a" in w:
            v = ("loha", (w["hada_w1_a"], w["hada_w1_b"], alpha, w["hada_w2_a"], w["hada_w2_b"], w.get("hada_t1"),
                          w.get("hada_t2"), dora))
            v = WeightAdapter(*v) if reforge else v
        elif any(k.startswith("lokr") for k in w):
            v = ("lokr", (w.get("lokr_w1"), w.get("lokr_w2"), alpha, w.get("lokr_w1_a"), w.get("lokr_w1_b"),
                          w.get("lokr_w2_a"), w.get("lokr_w2_b"), w.get("lokr_t2"), dora))
            v = WeightAdapter(*v) if reforge else v
        elif "w_norm" in w:
            out[f"{key}.weight"] = ("diff", (w["w_norm"],))
            out[f"{key}.bias"] = ("diff", (w["b_norm"],))
            continue
        elif "diff" in w:
            v = ("diff", (w["diff"],))
            if "diff_b" in w:
                out[f"{key}.bias"] = ("diff", (w["diff_b"],))
        else:
            raise ValueError(f"{name}: no Forge loader for {sorted(w)}")
        out[f"{key}.weight"] = v
    return out
