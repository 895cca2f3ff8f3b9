"""Masked adapters (fast mode): every adapted layer adds Σ_i Ω_i ⊙ Δ_i(x), Ω resampled to the layer's resolution.

One pass of the host's rows replaces LoRAtorio's base + N passes on the steps between full ones. A layer's output is
mapped to the latent grid by its shape: (B, C, h, w) is spatial; (B, T, C) is spatial when T is h·w of a level of the
latent pyramid (each downsample halves a side, rounding up); anything else (time embedding, text tokens) gets each
LoRA's mean share of the image. Cross-attention acts on text tokens, so it is run once per LoRA and blended instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loratorio.core.adapters import Adapter, Callback, Dense, LowRank, add_conv1x1_, add_linear_

FLAT_RULES = ("share", "full")
TEXT_RULES = ("blend", "share", "full")


class RowMasks:
    """Per-row weight of each adapter for one model call: (N, B, 1, H, W) at latent size, resampled per layer.

    flat: the rule for (B, C) outputs (time embedding): "share" weights LoRA i by Ω_i's mean over the image; "full"
    gives every LoRA the row's total weight (the merge, scaled as the row is). text: the rule for token outputs that
    are no image level (text tokens): "blend" reruns cross-attention per LoRA (tokens it misses take "share"), or
    "share" / "full" as for flat.
    """

    def __init__(self, weights: Tensor, flat: str = "share", text: str = "blend") -> None:
        if weights.dim() != 5 or weights.shape[2] != 1:
            raise ValueError(f"masks must be (N, B, 1, H, W), got {tuple(weights.shape)}")
        if flat not in FLAT_RULES or text not in TEXT_RULES:
            raise ValueError(f"flat must be one of {FLAT_RULES} and text one of {TEXT_RULES}, got {flat!r}, {text!r}")
        self.weights, self.flat, self.text = weights, flat, text
        self._cache: dict[tuple, Tensor] = {}

    def __len__(self) -> int:
        return self.weights.shape[1]

    @property
    def n_adapters(self) -> int:
        return self.weights.shape[0]

    def slice(self, start: int, stop: int) -> RowMasks:
        """The masks of rows [start, stop), for hosts that split a batch into sub-batches."""
        return RowMasks(self.weights[:, start:stop], self.flat, self.text)

    def level(self, tokens: int) -> tuple[int, int] | None:
        """The (h, w) of the pyramid level with `tokens` positions: SD's stride-2 convs give ceil(side / 2)."""
        h, w = self.weights.shape[-2:]
        while True:
            if h * w == tokens:
                return h, w
            if h == 1 and w == 1:
                return None
            h, w = -(-h // 2), -(-w // 2)

    def spatial(self, h: int, w: int, like: Tensor) -> Tensor:
        """Ω as (N, B, 1, h, w) in like's dtype: area-averaged to a coarser grid, so weights still sum as Ω does."""
        key = ("spatial", h, w, like.dtype, like.device)
        if key not in self._cache:
            n, b, _, big_h, big_w = self.weights.shape
            m = self.weights
            if (h, w) != (big_h, big_w):
                m = F.adaptive_avg_pool2d(m.reshape(n * b, 1, big_h, big_w).float(), (h, w)).reshape(n, b, 1, h, w)
            self._cache[key] = m.to(like.device, like.dtype)
        return self._cache[key]

    def flat_weights(self, like: Tensor, rule: str = "share") -> Tensor:
        """(N, B): each LoRA's weight for a layer with no spatial axis under `rule` ("share" or "full")."""
        key = ("flat", rule, like.dtype, like.device)
        if key not in self._cache:
            share = self.weights.float().mean(dim=(2, 3, 4))
            if rule == "full":
                share = share.sum(0, keepdim=True).expand_as(share)
            self._cache[key] = share.to(like.device, like.dtype)
        return self._cache[key]

    def for_output(self, y: Tensor) -> Tensor:
        """Weights broadcastable against (N, *y.shape): spatial for (B, C, h, w) and level-sized (B, T, C)."""
        if y.dim() == 4:
            return self.spatial(y.shape[-2], y.shape[-1], y)
        rule = self.flat
        if y.dim() == 3:
            hw = self.level(y.shape[1])
            if hw is not None:
                return self.spatial(*hw, y).reshape(self.n_adapters, len(self), -1, 1)
            rule = "share" if self.text == "blend" else self.text
        return self.flat_weights(y, rule).reshape(self.n_adapters, len(self), *([1] * (y.dim() - 1)))


def low_rank_of(adapter: Adapter) -> LowRank | None:
    """The LowRank behind an adapter: itself, or one a host bound into a Callback as partial(lowrank.apply, layer)."""
    if isinstance(adapter, LowRank):
        return adapter
    fn = adapter.fn if isinstance(adapter, Callback) else None
    if isinstance(fn, partial) and isinstance(getattr(fn.func, "__self__", None), LowRank) and not fn.keywords:
        return fn.func.__self__
    return None


@dataclass
class MaskStack:
    """The stackable LowRank adapters of one layer: down (Σr, in[, kh, kw]) and scaled up (out, Σr), concatenated.

    Masking the rank-r intermediate before a 1×1 `up` is masking the delta itself, position by position, so all of a
    layer's LoRAs cost one rank-Σr LoRA; `generic` lists the adapters that take the y' − y path instead.
    """

    ids: tuple[int, ...]
    ranks: tuple[int, ...]
    down: Tensor | None
    up: Tensor | None
    generic: tuple[int, ...]
    conv_args: dict | None = None

    @classmethod
    def build(cls, layer: nn.Module, table: Mapping[int, Adapter], n: int) -> MaskStack:
        conv = isinstance(layer, nn.Conv2d)
        ids, downs, ups, generic = [], [], [], []
        for i, adapter in sorted(table.items()):
            if i >= n:  # a host's extra group (Forge's "all LoRAs") has no mask
                continue
            lr = low_rank_of(adapter)
            down = None if lr is None or lr.mid is not None else lr.down
            one_by_one = lr is not None and (lr.up.dim() == 2 or tuple(lr.up.shape[2:]) == (1, 1))
            if conv and down is not None:
                down = down if down.dim() == 4 else down[:, :, None, None]
                if tuple(down.shape[2:]) != tuple(layer.weight.shape[2:]) or down.shape[1] != layer.in_channels:
                    down = None
            elif down is not None and down.dim() != 2:
                down = None
            if down is None or not one_by_one:
                generic.append(i)
                continue
            ids.append(i)
            downs.append(down)
            ups.append(lr.up.flatten(1) * lr.scale)
        if not ids:
            return cls((), (), None, None, tuple(generic))
        args = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation} if conv else None
        return cls(tuple(ids), tuple(d.shape[0] for d in downs), torch.cat(downs), torch.cat(ups, dim=1),
                   tuple(generic), args)

    def on(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """The factors on like's device and dtype, cast once and kept."""
        if self.down.device != like.device or self.down.dtype != like.dtype:
            self.down, self.up = self.down.to(like.device, like.dtype), self.up.to(like.device, like.dtype)
        return self.down, self.up

    def rank_masks(self, m: Tensor, channel_dim: int) -> Tensor:
        """(N, B, …, 1) weights -> each stacked rank column's weight, with the rank axis at `channel_dim`."""
        idx = torch.tensor(self.ids, device=m.device)
        sel = m.index_select(0, idx).squeeze(channel_dim + 1).movedim(0, channel_dim)
        reps = torch.tensor(self.ranks, device=m.device)
        return sel.repeat_interleave(reps, dim=channel_dim, output_size=sum(self.ranks))


def apply_masked(layer: nn.Module, x: Tensor, y: Tensor, table: Mapping[int, Adapter], masks: RowMasks,
                 stack: MaskStack) -> Tensor:
    """y + Σ_i Ω_i ⊙ Δ_i(x) for the layer's adapters; Δ_i = y_i' − y for kinds without a stacked fast path."""
    m = masks.for_output(y)
    acc = None
    for i in stack.generic:
        adapter = table[i]
        if isinstance(adapter, (LowRank, Dense)):  # additive kinds: the delta alone, without a copy of y
            delta = adapter.apply(layer, x, torch.zeros_like(y))
        else:
            delta = adapter.apply(layer, x, y.clone()) - y
        term = delta * m[i]
        acc = term if acc is None else acc.add_(term)
    if stack.ids:
        down, up = stack.on(x)
        if stack.conv_args is not None:
            h = F.conv2d(x, down, **stack.conv_args)
            h = h.mul_(stack.rank_masks(m, 1))
            add_conv1x1_(y, h, up, 1.0)
        else:
            h = F.linear(x, down)
            h = h.mul_(stack.rank_masks(m, y.dim() - 1))
            add_linear_(y, h, up, 1.0)
    return y if acc is None else y.add_(acc)


def attention_modules(root: nn.Module, targets: Mapping[nn.Module, Mapping[int, Adapter]]) -> dict[nn.Module,
                                                                                                  tuple[int, ...]]:
    """Modules holding a targeted `to_k` / `to_v` (SD's attention, in ldm, diffusers and Forge alike), with the ids of
    the adapters that change anything inside them."""
    names = {m: n for n, m in root.named_modules()}
    out: dict[nn.Module, tuple[int, ...]] = {}
    for layer in targets:
        parent, _, leaf = names.get(layer, "").rpartition(".")
        if leaf not in ("to_k", "to_v") or not parent:  # the root itself is a whole model, not an attention layer
            continue
        module = root.get_submodule(parent)
        if module not in out:
            ids = {i for sub in module.modules() if sub in targets for i in targets[sub]}
            out[module] = tuple(sorted(ids))
    return out


def context_of(args: Sequence, kwargs: Mapping) -> Tensor | None:
    """The text context an attention call was given (ldm/Forge `context=`, diffusers `encoder_hidden_states=`, or
    a second positional tensor); None for self-attention."""
    for key in ("context", "encoder_hidden_states"):
        value = kwargs.get(key)
        if isinstance(value, Tensor):
            return value
    if len(args) > 1 and isinstance(args[1], Tensor) and args[1] is not args[0]:
        return args[1]
    return None


def blend_runs(masks: RowMasks, ids: Sequence[int]) -> list[int | None]:
    """Which passes a cross-attention blend needs: each LoRA changing it, plus the base where they do not cover
    every position (a row's weights summing below 1: the re-centred negative, or LoRAs absent in this module)."""
    ids = [i for i in ids if i < masks.n_adapters]
    rest = 1 - masks.weights[ids].float().sum(0) if ids else torch.ones(1)
    return [*ids, None] if bool((rest.abs() > 1e-6).any()) else list(ids)


def blend(masks: RowMasks, runs: Sequence[int | None], outputs: Sequence[Tensor]) -> Tensor:
    """Σ_j Ω_j ⊙ out_j over the runs, the base (None) weighted by what the LoRAs leave: exact for a layer that acts
    on each query position independently, as cross-attention does."""
    m = masks.for_output(outputs[0])
    ids = [j for j in runs if j is not None]
    out = None
    for j, o in zip(runs, outputs, strict=True):
        w = m[j] if j is not None else 1 - m[ids].sum(0)
        out = o * w if out is None else out.add_(o * w)
    return out
