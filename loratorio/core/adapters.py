"""Per-layer adapter kinds: what one LoRA adds to one layer's output, for the rows routed to it.

Vocabulary (kohya/A1111): `down` is r×in, `up` is out×r, `scale = alpha / rank`; peft's `lora_A` / `lora_B` are
`down` / `up`. Every kind exposes `apply(layer, x, y) -> y'` on the routed rows only: `x` is the layer's input rows,
`y` its base output for them (updated in place where possible), and the result is exact when `y` is a fresh clone of
the base output, so `y' - y` is the adapter's delta for any kind.

Each kind is applied from the factors the file stores, never as a full-size ΔW held per LoRA: LoKr through the
Kronecker identity, LoHa as a low-rank product built while the layer runs, DoRA and IA3 as channel scales around the
layer's own weight. Only full/diff files, whose ΔW is the file, hold a full-size tensor.
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


def _kernel(layer: nn.Module) -> tuple[int, int, int]:
    """A Conv2d's (input channels per group, kh, kw): how a flattened (r, in·kh·kw) factor is shaped as a kernel."""
    if layer.groups != 1:
        raise ValueError(f"grouped convolutions (groups={layer.groups}) take only LoRA/LoCon and full deltas")
    return layer.in_channels, *layer.kernel_size


def _channel_view(t: Tensor, conv: bool) -> Tensor:
    """A per-channel vector shaped to broadcast over a layer's output: dim 1 of (B, C, H, W), the last dim else."""
    return t.view(1, -1, 1, 1) if conv else t.view(-1)


def _dense_forward(layer: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x through `weight` with the layer's geometry (a Conv2d's stride/padding/groups; anything else is a Linear)."""
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight.reshape(layer.out_channels, -1, *layer.kernel_size), bias, groups=layer.groups,
                        **_conv_args(layer))
    return F.linear(x, weight.reshape(weight.shape[0], -1), bias)


def tucker(t: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """LyCORIS's Tucker/CP rebuild: W[p, r, k, l] = Σ t[i, j, k, l]·wa[i, p]·wb[j, r] (hosts' make_weight_cp)."""
    return torch.einsum("i j k l, j r, i p -> p r k l", t, wb, wa)


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
    # Under autocast (A1111's fp8 storage on CPU: bf16) y can be narrower than x; in-place ops are not autocast.
    h, up = h.to(y.dtype), up.to(y.dtype)
    if y.is_contiguous() and h.shape[:-1] == y.shape[:-1]:
        y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), up.t(), alpha=scale)
        return y
    return y.add_(F.linear(h, up), alpha=scale)


def add_conv1x1_(y: Tensor, h: Tensor, up: Tensor, scale: float) -> Tensor:
    """y += scale · (1×1 conv of h by up) in place; y (B, out, H, W), h (B, r, H, W), up (out, r)."""
    h, up = h.to(y.dtype), up.to(y.dtype)  # see add_linear_
    if y.is_contiguous() and h.shape[-2:] == y.shape[-2:]:
        b, r = h.shape[:2]
        y.view(b, y.shape[1], -1).baddbmm_(up.expand(b, *up.shape), h.reshape(b, r, -1), alpha=scale)
        return y
    return y.add_(F.conv2d(h, up[:, :, None, None]), alpha=scale)


@dataclass(eq=False)
class Dense:
    """A full-size ΔW (and Δb) as F.linear / F.conv2d: full/diff files, whose ΔW is what the file stores.

    ΔW·weight_scale·multiplier and Δb·multiplier (A1111 scales a full module's weight, not its bias, by alpha).
    """

    delta_weight: Tensor
    delta_bias: Tensor | None = None
    multiplier: float = 1.0
    weight_scale: float = 1.0
    _cache: _DeviceCache = field(default_factory=_DeviceCache, repr=False)

    def apply(self, layer: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        dw, db = self._cache.get((self.delta_weight, self.delta_bias), x)
        delta = _dense_forward(layer, x, dw)
        if self.weight_scale != 1.0:
            delta.mul_(self.weight_scale)
        if db is not None:
            delta.add_(_channel_view(db, isinstance(layer, nn.Conv2d)))
        return y.add_(delta, alpha=self.multiplier)


@dataclass(eq=False)
class Bias:
    """A bias delta alone (a diff_b next to another kind's weight delta): Δy = Δb·multiplier."""

    delta_bias: Tensor
    multiplier: float = 1.0
    _cache: _DeviceCache = field(default_factory=_DeviceCache, repr=False)

    def apply(self, layer: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        (db,) = self._cache.get((self.delta_bias,), y)
        return y.add_(_channel_view(db, isinstance(layer, nn.Conv2d)), alpha=self.multiplier)


@dataclass(eq=False)
class LoHa:
    """LoHa (Hyeon-Woo et al. 2022, FedPara): ΔW = (w1a·w1b) ⊙ (w2a·w2b) · scale · multiplier.

    Applied as the rank r1·r2 product (w1a ∗ w2a)·(w1b ∗ w2b) of the row-wise Khatri-Rao factors,
    (A1 B1) ⊙ (A2 B2) = Σ_pq (a1_p ⊙ a2_q)(b1_p ⊙ b2_q)ᵀ, built while the layer runs: no full-size ΔW is held.
    Shapes as stored: w1a (out, r1), w1b (r1, in·kh·kw). With Tucker cores t1/t2 (r, r, kh, kw; then wa (r, out),
    wb (r, in)) the layer's ΔW is built while it runs and dropped after.
    """

    w1a: Tensor
    w1b: Tensor
    w2a: Tensor
    w2b: Tensor
    scale: float = 1.0
    t1: Tensor | None = None
    t2: Tensor | None = None
    multiplier: float = 1.0
    _cache: _DeviceCache = field(default_factory=_DeviceCache, repr=False)

    def apply(self, layer: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        w1a, w1b, w2a, w2b, t1, t2 = self._cache.get((self.w1a, self.w1b, self.w2a, self.w2b, self.t1, self.t2), x)
        scale = self.scale * self.multiplier
        if t1 is not None:
            return y.add_(_dense_forward(layer, x, tucker(t1, w1a, w1b) * tucker(t2, w2a, w2b)), alpha=scale)
        up = (w1a[:, :, None] * w2a[:, None, :]).flatten(1)
        down = (w1b.flatten(1)[:, None, :] * w2b.flatten(1)[None, :, :]).flatten(0, 1)
        if isinstance(layer, nn.Conv2d):
            h = F.conv2d(x, down.reshape(down.shape[0], *_kernel(layer)), **_conv_args(layer))
            return add_conv1x1_(y, h, up, scale)
        return add_linear_(y, F.linear(x, down), up, scale)

    def dense(self, layer: nn.Module) -> Tensor:
        """ΔW shaped like the layer's weight, at the multiplier."""
        if self.t1 is not None:
            w = tucker(self.t1, self.w1a, self.w1b) * tucker(self.t2, self.w2a, self.w2b)
        else:
            w = (self.w1a @ self.w1b.flatten(1)) * (self.w2a @ self.w2b.flatten(1))
        return w.reshape(layer.weight.shape) * (self.scale * self.multiplier)


@dataclass(eq=False)
class LoKr:
    """LoKr (LyCORIS; Yeh et al. 2024): ΔW = w1 ⊗ w2 · scale · multiplier, never formed as a Kronecker product.

    (w1 ⊗ w2)·vec(X) = vec(w2·X·w1ᵀ): w2 maps each of the c input groups of d channels to b (a conv with the layer's
    kernel and geometry for a Conv2d), then w1 (a, c) mixes the groups. Factors as stored: w1 or w1_a·w1_b; w2, or
    w2_a·w2_b (w2_b (r, d·kh·kw)), or the Tucker core t2 with w2_a (r, b), w2_b (r, d); w2 (b·d·kh·kw, 1/(a·c) of
    ΔW's size) is rebuilt from its factors while the layer runs.
    """

    w1: Tensor | None = None
    w2: Tensor | None = None
    w1_a: Tensor | None = None
    w1_b: Tensor | None = None
    w2_a: Tensor | None = None
    w2_b: Tensor | None = None
    t2: Tensor | None = None
    scale: float = 1.0
    multiplier: float = 1.0
    _cache: _DeviceCache = field(default_factory=_DeviceCache, repr=False)

    def __post_init__(self) -> None:
        if (self.w1 is None) == (self.w1_a is None) or (self.w2 is None) == (self.w2_a is None):
            raise ValueError("LoKr needs w1 or w1_a/w1_b, and w2 or w2_a/w2_b")

    def factors(self, like: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(w1, w2) as matrices/kernels, cast like `like` when given."""
        tensors = (self.w1, self.w2, self.w1_a, self.w1_b, self.w2_a, self.w2_b, self.t2)
        w1, w2, w1_a, w1_b, w2_a, w2_b, t2 = tensors if like is None else self._cache.get(tensors, like)
        if w1 is None:
            w1 = w1_a @ w1_b
        if w2 is None:
            w2 = tucker(t2, w2_a, w2_b) if t2 is not None else w2_a @ w2_b
        return w1, w2

    def apply(self, layer: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        w1, w2 = self.factors(x)
        c, b = w1.shape[1], w2.shape[0]
        scale = self.scale * self.multiplier
        if isinstance(layer, nn.Conv2d):
            cin, kh, kw = _kernel(layer)
            n, _, h, w = x.shape
            z = F.conv2d(x.reshape(n * c, cin // c, h, w), w2.reshape(b, cin // c, kh, kw), **_conv_args(layer))
            out = torch.matmul(w1, z.reshape(n, c, -1))
            return y.add_(out.reshape(y.shape), alpha=scale)
        z = x.reshape(-1, c, x.shape[-1] // c) @ w2.reshape(b, -1).t()
        return y.add_(torch.matmul(w1, z).reshape(y.shape), alpha=scale)

    def dense(self, layer: nn.Module) -> Tensor:
        """ΔW shaped like the layer's weight, at the multiplier (the hosts' make_kron)."""
        w1, w2 = self.factors()
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2.contiguous()).reshape(layer.weight.shape) * (self.scale * self.multiplier)


@dataclass(eq=False)
class Rescaled:
    """W' = diag(row)·(W + ΔW)·diag(col), Δy = strength·(W'x − Wx), with W the layer's own weight at run time.

    DoRA (Liu et al. 2024): the magnitude over the direction's norm, row or col = m / |W + ΔW| computed once per
    generation by whoever builds it, as the host's formula has it; `inner` is the LoRA/LoHa/LoKr ΔW at multiplier 1.
    IA3 (Liu et al. 2022): no inner, row (output) or col (input) = 1 + w. Only a `col` needs W (one extra matmul on
    the routed rows); Wx itself is y minus the layer's bias.
    """

    inner: Adapter | None
    row: Tensor | None = None
    col: Tensor | None = None
    strength: float = 1.0
    _cache: _DeviceCache = field(default_factory=_DeviceCache, repr=False)

    def apply(self, layer: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        row, col = self._cache.get((self.row, self.col), x)
        conv = isinstance(layer, nn.Conv2d)
        xc = x if col is None else x * _channel_view(col, conv)
        delta = torch.zeros_like(y) if self.inner is None else self.inner.apply(layer, xc, torch.zeros_like(y))
        if col is not None:
            # W(col·x) − Wx, as one product on (col − 1)·x rather than a difference of two large ones.
            # (On hosts that keep weights off the compute device, .to() is that host's own per-call cast.)
            delta += _dense_forward(layer, x * _channel_view(col - 1, conv), layer.weight.to(x.device, x.dtype))
        if row is not None:
            base = y if layer.bias is None else y - _channel_view(layer.bias.to(y.device, y.dtype), conv)
            delta = delta.mul_(_channel_view(row, conv)).add_(base * _channel_view(row - 1, conv))
        return y.add_(delta, alpha=self.strength)

    def dense(self, layer: nn.Module) -> Tensor:
        """W' − W shaped like the layer's weight, at the strength."""
        w = layer.weight.float()
        merged = w if self.inner is None else w + merged_weight(layer, self.inner).float()
        shape = (-1,) + (1,) * (w.dim() - 1)
        if self.row is not None:
            merged = merged * self.row.float().view(shape)
        if self.col is not None:
            merged = merged * self.col.float().view(1, -1, *(1,) * (w.dim() - 2))
        return (merged - w) * self.strength


@dataclass(eq=False)
class NormDelta:
    """A GroupNorm/LayerNorm's weight and bias deltas (w_norm/b_norm, or diff on a norm):
    Δy = (norm(x)·Δw·weight_scale + Δb)·multiplier, with norm(x) the layer's normalisation without its affine."""

    delta_weight: Tensor | None
    delta_bias: Tensor | None = None
    multiplier: float = 1.0
    weight_scale: float = 1.0
    _cache: _DeviceCache = field(default_factory=_DeviceCache, repr=False)

    def apply(self, layer: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        dw, db = self._cache.get((self.delta_weight, self.delta_bias), x)
        if isinstance(layer, nn.GroupNorm):
            view = (1, -1) + (1,) * (x.dim() - 2)
            if dw is not None:
                y.add_(F.group_norm(x, layer.num_groups, eps=layer.eps) * dw.view(view),
                       alpha=self.weight_scale * self.multiplier)
        elif isinstance(layer, nn.LayerNorm):
            view = tuple(layer.normalized_shape)
            if dw is not None:
                y.add_(F.layer_norm(x, layer.normalized_shape, eps=layer.eps) * dw.view(view),
                       alpha=self.weight_scale * self.multiplier)
        else:
            raise ValueError(f"norm deltas need a GroupNorm or LayerNorm, not {type(layer).__name__}")
        if db is not None:
            y.add_(db.view(view), alpha=self.multiplier)
        return y


@dataclass(eq=False)
class Materialized:
    """Any other kind (GLoRA, OFT, "set", a host-side weight function…): `delta()` gives the host's ΔW (and Δb),
    built while the layer runs and dropped after, so nothing full-size is held."""

    delta: Callable[[], tuple[Tensor, Tensor | None]]
    multiplier: float = 1.0

    def apply(self, layer: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        dw, db = self.delta()
        out = _dense_forward(layer, x, dw.to(x.device, x.dtype),
                             None if db is None else db.to(x.device, x.dtype))
        return y.add_(out, alpha=self.multiplier)

    def dense(self, layer: nn.Module) -> Tensor:
        return self.delta()[0].reshape(layer.weight.shape) * self.multiplier


@dataclass(eq=False)
class Chain:
    """Several kinds on one layer (a weight kind and a bias diff of one file), applied in turn.

    Every kind but Rescaled adds a delta that does not read y, so only the first part may be a Rescaled.
    """

    parts: tuple

    def __post_init__(self) -> None:
        if any(isinstance(p, Rescaled) for p in self.parts[1:]):
            raise ValueError("a Rescaled part reads the base output: it must come first")

    def apply(self, layer: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        for part in self.parts:
            y = part.apply(layer, x, y)
        return y


@dataclass(eq=False)
class Callback:
    """A host's own per-module forward, `fn(x_rows, y_rows) -> new y_rows` (A1111's NetworkModule.forward shape)."""

    fn: Callable[[Tensor, Tensor], Tensor]

    def apply(self, layer: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return self.fn(x, y)


Adapter = Union[LowRank, Dense, Bias, LoHa, LoKr, Rescaled, NormDelta, Materialized, Chain, Callback]


def merged_weight(layer: nn.Module, adapter: Adapter) -> Tensor:
    """ΔW of an adapter as a dense tensor shaped like the layer's weight (merge baselines, DoRA norms, tests)."""
    if isinstance(adapter, Dense):
        return adapter.delta_weight.reshape(layer.weight.shape) * (adapter.weight_scale * adapter.multiplier)
    if isinstance(adapter, (LoHa, LoKr, Rescaled, Materialized)):
        return adapter.dense(layer)
    if isinstance(adapter, Chain):
        parts = [p for p in adapter.parts if not isinstance(p, Bias)]
        return sum(merged_weight(layer, p) for p in parts)
    if not isinstance(adapter, LowRank):
        raise TypeError(f"{type(adapter).__name__} has no weight delta")
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


def probe(layer: nn.Module, adapter: Adapter) -> None:
    """Run `adapter` once on a one-image random input shaped for `layer`, before anything of the host is changed.

    A dry run at install: a kind, shape or device mismatch then fails where sampling normally costs nothing, rather
    than mid-sampling. Raises ValueError when the output is misshapen or not finite.
    """
    weight = getattr(layer, "weight", None)
    device = weight.device if isinstance(weight, Tensor) else torch.device("cpu")
    dtype = weight.dtype if isinstance(weight, Tensor) and weight.is_floating_point() else torch.float32
    if dtype.itemsize < 2:
        # fp8 storage (A1111's "FP8 weight", Forge's fp8 UNet): the host computes in a wider type, so does the probe.
        dtype = torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype)

    with torch.no_grad():
        if isinstance(layer, nn.Conv2d):
            side = max(*layer.kernel_size, 1) * max(*layer.stride, 1) + 1
            x = randn(1, layer.in_channels, side, side)
            y = layer._conv_forward(x, layer.weight.to(dtype), None if layer.bias is None else layer.bias.to(dtype))
        elif isinstance(layer, nn.GroupNorm):
            x = randn(1, layer.num_channels, 2, 2)
            y = F.group_norm(x, layer.num_groups, layer.weight, layer.bias, layer.eps)
        elif isinstance(layer, nn.LayerNorm):
            x = randn(1, 2, *layer.normalized_shape)
            y = F.layer_norm(x, layer.normalized_shape, layer.weight, layer.bias, layer.eps)
        else:
            x = randn(1, 2, getattr(layer, "in_features", None) or weight.shape[-1])
            out = getattr(layer, "out_features", None) or weight.shape[0]
            y = torch.zeros(1, 2, out, device=device, dtype=dtype)
            if isinstance(weight, Tensor) and weight.is_floating_point() and weight.dim() == 2:
                bias = getattr(layer, "bias", None)
                y = F.linear(x, weight.to(dtype), bias.to(dtype) if isinstance(bias, Tensor) else None)
        got = adapter.apply(layer, x, y.clone())
    if got.shape != y.shape:
        raise ValueError(f"gives {tuple(got.shape)} for the layer's {tuple(y.shape)}")
    if not torch.isfinite(got).all():
        raise ValueError("gives a non-finite output")
