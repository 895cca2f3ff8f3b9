"""Per-layer adapter kinds: what one LoRA adds to one Linear/Conv2d output, for the rows routed to it.

Vocabulary (kohya/A1111): `down` is r×in, `up` is out×r, `scale = alpha / rank`; peft's `lora_A` / `lora_B` are
`down` / `up`. Every kind exposes `apply(layer, x, y) -> y'` on the routed rows only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _conv_args(layer: nn.Module) -> dict:
    """The geometry a delta conv must share with its host conv so that output shapes line up."""
    return {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation}


class _DeviceCache:
    """Tensors cast once per (device, dtype) instead of per step: hosts may move layers (A1111 --lowvram)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._tensors: tuple[Tensor | None, ...] = ()

    def get(self, tensors: tuple[Tensor | None, ...], like: Tensor) -> tuple[Tensor | None, ...]:
        key = (like.device, like.dtype)
        if key != self._key:
            self._tensors = tuple(None if t is None else t.to(like.device, like.dtype) for t in tensors)
            self._key = key
        return self._tensors


@dataclass(eq=False)
class LowRank:
    """LoRA / LoCon: Δy = up(mid?(down(x))) · alpha/rank · multiplier (Hu et al. 2021; LyCORIS Tucker for `mid`).

    Linear: down (r, in), up (out, r). Conv2d: down (r, in, kh, kw) with the layer's geometry, up (out, r, 1, 1);
    with a Tucker `mid` (r, r, kh, kw), down is 1×1 and mid carries the kernel.
    """

    down: Tensor
    up: Tensor
    alpha: float | None = None
    mid: Tensor | None = None
    multiplier: float = 1.0
    _cache: _DeviceCache = field(default_factory=_DeviceCache, repr=False)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        alpha = self.rank if self.alpha is None else self.alpha
        return alpha / self.rank * self.multiplier

    def apply(self, layer: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        down, up, mid = self._cache.get((self.down, self.up, self.mid), x)
        if isinstance(layer, nn.Conv2d):
            down = down if down.dim() == 4 else down[:, :, None, None]
            if mid is None:
                h = F.conv2d(x, down, **_conv_args(layer))
            else:
                h = F.conv2d(F.conv2d(x, down), mid, **_conv_args(layer))
            if up.dim() == 4 and up.shape[-2:] != (1, 1):
                return y.add_(F.conv2d(h, up), alpha=self.scale)
            return add_conv1x1_(y, h, up.flatten(1), self.scale)
        return add_linear_(y, F.linear(x, down.flatten(1)), up.flatten(1), self.scale)


def add_linear_(y: Tensor, h: Tensor, up: Tensor, scale: float) -> Tensor:
    """y += scale · h·upᵀ in place; y (..., out), h (..., r), up (out, r).

    In place because y is the routed rows' view of the layer output (no scatter copy); one addmm also spares the
    delta's temporary and a second pass over y.
    """
    if y.is_contiguous() and h.shape[:-1] == y.shape[:-1]:
        y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), up.t(), alpha=scale)
        return y
    return y.add_(F.linear(h, up), alpha=scale)


def add_conv1x1_(y: Tensor, h: Tensor, up: Tensor, scale: float) -> Tensor:
    """y += scale · (1×1 conv of h by up) in place; y (B, out, H, W), h (B, r, H, W), up (out, r)."""
    if y.is_contiguous() and h.shape[-2:] == y.shape[-2:]:
        b, r = h.shape[:2]
        y.view(b, y.shape[1], -1).baddbmm_(up.expand(b, *up.shape), h.reshape(b, r, -1), alpha=scale)
        return y
    return y.add_(F.conv2d(h, up[:, :, None, None]), alpha=scale)


@dataclass(eq=False)
class Dense:
    """Any other kind (LoHa, LoKr, full, DoRA…): a precomputed ΔW (and Δb), applied as F.linear / F.conv2d.

    Computed once per generation by whoever builds it; here it only runs.
    """

    delta_weight: Tensor
    delta_bias: Tensor | None = None
    multiplier: float = 1.0
    _cache: _DeviceCache = field(default_factory=_DeviceCache, repr=False)

    def apply(self, layer: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        dw, db = self._cache.get((self.delta_weight, self.delta_bias), x)
        if isinstance(layer, nn.Conv2d):
            delta = F.conv2d(x, dw.reshape(layer.weight.shape), db, groups=layer.groups, **_conv_args(layer))
        else:
            delta = F.linear(x, dw.reshape(layer.weight.shape), db)
        return y.add_(delta, alpha=self.multiplier)


@dataclass(eq=False)
class Callback:
    """A host's own per-module forward, `fn(x_rows, y_rows) -> new y_rows` (A1111's NetworkModule.forward shape)."""

    fn: Callable[[Tensor, Tensor], Tensor]

    def apply(self, layer: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return self.fn(x, y)


Adapter = Union[LowRank, Dense, Callback]


def merged_weight(layer: nn.Module, adapter: LowRank | Dense) -> Tensor:
    """ΔW of an adapter as a dense tensor shaped like the layer's weight (for merge baselines and tests)."""
    if isinstance(adapter, Dense):
        return adapter.delta_weight.reshape(layer.weight.shape) * adapter.multiplier
    down, up, mid = adapter.down, adapter.up, adapter.mid
    if isinstance(layer, nn.Conv2d):
        if mid is not None:
            # W = up · mid · down contracted over the rank axes; the kernel lives in mid.
            w = torch.einsum("or,rskl,si->oikl", up.flatten(1), mid, down.flatten(1))
        elif down.dim() == 4:
            w = torch.einsum("or,rikl->oikl", up.flatten(1), down)
        else:
            w = (up.flatten(1) @ down.flatten(1))[:, :, None, None]
    else:
        w = up.flatten(1) @ down.flatten(1)
    return w.reshape(layer.weight.shape) * adapter.scale
