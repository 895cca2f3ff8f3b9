"""Row routing: which adapter each batch row uses, and the hooks that add each adapter's delta to its rows only.

The mechanism is peft's mixed-adapter batch inference (base layer once over the whole batch, each adapter's delta on
its own rows), installed as removable forward hooks on our target layers rather than as wrapper classes, so the
host's modules, their `forward` and their weights are never replaced. The same hooks run the fast mode's masks
(core/masked.py): every adapter's delta on every row, weighted per position.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor, nn

from loratorio.core.adapters import Adapter, Callback, LowRank, NormDelta
from loratorio.core.masked import MaskStack, RowMasks, apply_masked, attention_modules, blend, blend_runs, context_of

log = logging.getLogger(__name__)
_FREE = object()  # no adapter forced on the layers (the state outside a cross-attention blend's passes)

@dataclass(frozen=True)
class RowRouting:
    """Per-row adapter ids (None = base) for one model call; groups are precomputed once and shared by all layers."""

    labels: tuple[int | None, ...]
    _index_cache: dict = field(default_factory=dict, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.labels)

    @cached_property
    def groups(self) -> tuple[tuple[int, slice | tuple[int, ...]], ...]:
        """(adapter id, rows) per adapter; rows are a slice when contiguous, so the hot path avoids gather/scatter."""
        rows: dict[int, list[int]] = {}
        for i, label in enumerate(self.labels):
            if label is not None:
                rows.setdefault(label, []).append(i)
        out = []
        for label, idx in rows.items():
            contiguous = idx[-1] - idx[0] + 1 == len(idx)
            out.append((label, slice(idx[0], idx[-1] + 1) if contiguous else tuple(idx)))
        return tuple(out)

    def groups_on(self, device: torch.device) -> Iterator[tuple[int, slice | Tensor]]:
        """Groups with non-contiguous rows as a LongTensor on `device`, built once per device per call."""
        for label, rows in self.groups:
            if isinstance(rows, slice):
                yield label, rows
            else:
                key = (label, device)
                if key not in self._index_cache:
                    self._index_cache[key] = torch.tensor(rows, dtype=torch.long, device=device)
                yield label, self._index_cache[key]

    @cached_property
    def block(self) -> tuple[int, int, tuple[int, ...]] | None:
        """(first row, rows per adapter, adapter ids in row order) when the adapters' rows are consecutive runs of one
        length, as evaluate() lays them out; None otherwise. Such a block takes one batched matmul per layer."""
        spans = sorted((rows.start, rows.stop, label) for label, rows in self.groups if isinstance(rows, slice))
        if not spans or len(spans) != len(self.groups):
            return None
        size = spans[0][1] - spans[0][0]
        for (_, stop, _), (start, next_stop, _) in zip(spans, spans[1:], strict=False):
            if start != stop or next_stop - start != size:
                return None
        return spans[0][0], size, tuple(label for *_, label in spans)

    def slice(self, start: int, stop: int) -> RowRouting:
        """The routing of rows [start, stop), for hosts that split a batch into sub-batches."""
        return RowRouting(self.labels[start:stop])


class RoutingSlot:
    """The routing (or masks) of the model call in flight; a cursor hands consecutive sub-batches their own rows."""

    def __init__(self) -> None:
        self.full: RowRouting | RowMasks | None = None
        self.current: RowRouting | RowMasks | None = None
        self._cursor = 0

    def begin_call(self, batch: int) -> None:
        """Called at the root module's entry: select this call's rows, so host-side batch splitting is harmless."""
        if self.full is None:
            self.current = None
            return
        total = len(self.full)
        if batch == total and self._cursor == 0:
            self.current = self.full
            return
        if self._cursor + batch > total:
            raise ValueError(f"model called with {batch} rows at row {self._cursor} but the routing has {total}")
        self.current = self.full.slice(self._cursor, self._cursor + batch)
        self._cursor = (self._cursor + batch) % total

    def set(self, routing: RowRouting | RowMasks | None) -> None:
        self.full, self.current, self._cursor = routing, None, 0


def _first_tensor(args: tuple, kwargs: dict) -> Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return value
    return None


class MultiAdapter:
    """Base + N adapters on one module tree, chosen per row (install/remove; usable as a context manager).

    adapters[i] maps a target (a dotted name under `root`, or the module itself) to adapter i's kind for that layer.
    """

    def __init__(self, root: nn.Module, adapters: Sequence[Mapping[str | nn.Module, Adapter]]) -> None:
        self.root = root
        self.n_adapters = len(adapters)
        self.slot = RoutingSlot()
        self.targets: dict[nn.Module, dict[int, Adapter]] = {}
        names = dict(root.named_modules())
        for i, table in enumerate(adapters):
            for key, adapter in table.items():
                module = names.get(key) if isinstance(key, str) else key
                if module is None:
                    raise ValueError(f"adapter {i}: no module named {key!r} under the model")
                takes = (nn.GroupNorm, nn.LayerNorm) if isinstance(adapter, NormDelta) else (nn.Linear, nn.Conv2d)
                if not isinstance(adapter, Callback) and not isinstance(module, takes):
                    raise ValueError(f"adapter {i}: {key!r} is a {type(module).__name__}; {type(adapter).__name__} "
                                     f"deltas go on {' and '.join(t.__name__ for t in takes)} layers (or use a "
                                     "Callback adapter)")
                self.targets.setdefault(module, {})[i] = adapter
        self._handles: list = []
        # Adapters applied to every routed row on top of its own (global LoRAs chosen during sampling); a routing
        # may not also name them, or their delta would be added twice.
        self.shared: tuple[int, ...] = ()
        # Per (layer, adapter ids in row order): the adapters' factors stacked for one bmm, or None where the layer
        # cannot take it. Built on first use after install() and dropped by remove(); likewise the masked stacks.
        # Each is a copy of the factors (rank 128 on SDXL: about 0.6 GB per LoRA in fp16), so only one kind is kept:
        # speed fast, which alternates routed full steps with masked passes, would otherwise hold two copies.
        self._stacks: dict[tuple[nn.Module, tuple[int, ...]], _Stack | None] = {}
        self._mask_stacks: dict[nn.Module, MaskStack] = {}
        # Cross-attention modules, blended per LoRA in masked mode; the adapter forced on every layer during one of
        # their passes (None = base), and the passes still to run for the module whose forward is in flight.
        self.attention = attention_modules(root, self.targets)
        self._forced: object = _FREE
        self._pending: dict[nn.Module, list[int | None]] = {}

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    @property
    def cached_bytes(self) -> int:
        """Bytes of the factor copies the router holds now (its stacks for routed and for masked calls)."""
        return stacked_bytes([*self._stacks.values(), *self._mask_stacks.values()])

    def install(self) -> MultiAdapter:
        """Register the hooks; installing twice is an error rather than a silent double delta."""
        if self._handles:
            raise RuntimeError("MultiAdapter is already installed")
        try:
            self._handles.append(self.root.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            for module in self.targets:
                self._handles.append(module.register_forward_hook(self._hook))
            for module in self.attention:
                self._handles.append(module.register_forward_pre_hook(self._attention_pre, with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._attention_post, with_kwargs=True))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Remove every hook and routing; the tree is exactly as before install (forward, weights, hook dicts)."""
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()
        self.slot.set(None)
        self._stacks.clear()
        self._mask_stacks.clear()
        self._forced, self._pending = _FREE, {}

    def __enter__(self) -> MultiAdapter:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    @contextmanager
    def routed(self, labels: Sequence[int | None] | RowRouting) -> Iterator[RowRouting]:
        """Route rows to adapters for the model calls made inside; always cleared in `finally`."""
        routing = labels if isinstance(labels, RowRouting) else RowRouting(tuple(labels))
        bad = [label for label in set(routing.labels) if label is not None and not 0 <= label < self.n_adapters]
        if bad:
            raise ValueError(f"routing names adapters {sorted(bad)}; this model has {self.n_adapters}")
        doubled = sorted(set(routing.labels) & set(self.shared))
        if doubled:
            raise ValueError(f"routing names adapters {doubled}, which already apply to every row")
        self._mask_stacks.clear()  # rebuilt at the next masked pass (every `full every` steps): one copy at a time
        self.slot.set(routing)
        try:
            yield routing
        finally:
            self.slot.set(None)

    @contextmanager
    def masked(self, masks: Tensor | RowMasks) -> Iterator[RowMasks]:
        """Fast mode for the model calls made inside: every row gets Σ_i masks[i] ⊙ Δ_i; cleared in `finally`.

        masks: (N, B, 1, H, W) per-row weights at latent size (core/masked.py), or a RowMasks.
        """
        masks = masks if isinstance(masks, RowMasks) else RowMasks(masks)
        if masks.n_adapters > self.n_adapters:
            raise ValueError(f"masks name {masks.n_adapters} adapters; this model has {self.n_adapters}")
        self._stacks.clear()  # the routed stacks are rebuilt at the next full step
        self.slot.set(masks)
        try:
            yield masks
        finally:
            self.slot.set(None)
            self._forced, self._pending = _FREE, {}

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.slot.full is not None:
            first = _first_tensor(args, kwargs)
            self.slot.begin_call(first.shape[0] if first is not None else 0)

    def _hook(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
        routing = self.slot.current
        if routing is None:
            return None
        if output.shape[0] != len(routing):
            raise ValueError(f"{type(module).__name__} got {output.shape[0]} rows; the routing has {len(routing)}")
        x, table = inputs[0], self.targets[module]
        if self._forced is not _FREE:  # one pass of a cross-attention blend: that adapter alone, on every row
            adapter = table.get(self._forced)
            return None if adapter is None else adapter.apply(module, x, output)
        if isinstance(routing, RowMasks):
            stack = self._mask_stacks.get(module)
            if stack is None:
                stack = self._mask_stacks[module] = MaskStack.build(module, table, routing.n_adapters)
            return apply_masked(module, x, output, table, routing, stack)
        block = routing.block
        if block is None or not self._apply_block(module, x, output, block):
            self._apply_groups(module, x, output, routing, table)
        for label in self.shared:
            adapter = table.get(label)
            if adapter is not None:
                new = adapter.apply(module, x, output)
                if new is not output:
                    output.copy_(new)
        return output

    def _apply_groups(self, module: nn.Module, x: Tensor, output: Tensor, routing: RowRouting,
                      table: dict[int, Adapter]) -> None:
        """Each adapter's delta on its own rows, one adapter at a time."""
        for label, rows in routing.groups_on(output.device):
            adapter = table.get(label)
            if adapter is None:  # a LoRA need not target every layer
                continue
            if isinstance(rows, slice):
                view = output[rows]
                new = adapter.apply(module, x[rows], view)
                if new is not view:
                    view.copy_(new)
            else:
                output.index_copy_(0, rows, adapter.apply(module, x.index_select(0, rows),
                                                          output.index_select(0, rows)))

    def _attention_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Masked mode, cross-attention: its keys and values act on text tokens, which have no place in the image, so
        the module runs once per LoRA (this first pass with the first) and the passes are blended per query."""
        masks = self.slot.current
        if (not isinstance(masks, RowMasks) or masks.text != "blend" or self._forced is not _FREE
                or context_of(args, kwargs) is None):
            return
        runs = blend_runs(masks, self.attention[module])
        if runs:
            self._pending[module] = runs
            self._forced = runs[0]

    def _attention_post(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> Tensor | None:
        runs = self._pending.pop(module, None)
        if runs is None:
            return None
        if not isinstance(output, Tensor):
            raise TypeError(f"{type(module).__name__} returned {type(output).__name__}; fast mode blends tensors")
        outputs = [output]
        try:
            for run in runs[1:]:
                self._forced = run
                outputs.append(module(*args, **kwargs))  # our hooks stand aside: _forced is set
        finally:
            self._forced = _FREE
        return blend(self.slot.current, runs, outputs)

    def _apply_block(self, module: nn.Module, x: Tensor, output: Tensor,
                     block: tuple[int, int, tuple[int, ...]]) -> bool:
        """All adapters of a Linear in two batched matmuls (down, then up accumulated into the output rows in place).

        Replaces 2-3 small kernels and a Python iteration per adapter with 2 kernels per layer; False when the layer
        cannot take it (a conv, an adapter missing here or not low-rank), and the per-adapter loop runs instead.
        """
        start, size, labels = block
        stop = start + size * len(labels)
        out = output[start:stop]
        if not out.is_contiguous():
            return False
        key = (module, labels)
        stack = self._stacks.get(key, _MISSING)
        if stack is _MISSING:
            stack = self._stacks[key] = _Stack.build(module, [self.targets[module].get(label) for label in labels])
        if stack is None:
            return False
        down, up = stack.on(x)
        h = torch.bmm(x[start:stop].reshape(len(labels), -1, x.shape[-1]), down)
        # In place, so not autocast: under it (A1111's fp8 storage: bf16) the output can be narrower than x.
        out.view(len(labels), -1, out.shape[-1]).baddbmm_(h.to(out.dtype), up.to(out.dtype))
        return True


_MISSING = object()


def stacked_bytes(stacks: Iterable[_Stack | MaskStack | None]) -> int:
    """Bytes of stacked factor copies: each stack's `down` and `up` (a layer without a stack, or a factor a stack
    lacks, counts 0)."""
    return sum(t.numel() * t.element_size() for s in stacks if s is not None for t in (s.down, s.up) if t is not None)


class _Stack:
    """Low-rank factors of several adapters on one Linear, stacked for bmm: down (G, in, r), up·scale (G, r, out).

    Unequal ranks are zero-padded to the largest, which adds nothing to the result.
    """

    def __init__(self, down: Tensor, up: Tensor) -> None:
        self.down, self.up = down, up

    @classmethod
    def build(cls, layer: nn.Module, adapters: Sequence[Adapter | None]) -> _Stack | None:
        if not isinstance(layer, nn.Linear) or not all(isinstance(a, LowRank) and a.mid is None for a in adapters):
            return None
        if any(a.down.requires_grad or a.up.requires_grad for a in adapters):
            # Factors being trained change every step (and a stack built from them would hold a stale graph).
            return None
        rank, like = max(a.rank for a in adapters), adapters[0].down
        down = like.new_zeros(len(adapters), rank, layer.in_features)
        up = like.new_zeros(len(adapters), layer.out_features, rank)
        for i, a in enumerate(adapters):
            down[i, : a.rank] = a.down.flatten(1)
            up[i, :, : a.rank] = a.up.flatten(1) * a.scale
        return cls(down.transpose(1, 2), up.transpose(1, 2))

    def on(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """The factors on like's device and dtype; cast once and kept (one copy), not per step."""
        if self.down.device != like.device or self.down.dtype != like.dtype:
            self.down, self.up = self.down.to(like.device, like.dtype), self.up.to(like.device, like.dtype)
        return self.down, self.up
