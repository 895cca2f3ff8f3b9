"""Evaluate the base model and N adapters on the same inputs: one routed batched call, or one call per adapter.

Inputs are pytrees (tensors, and dicts / lists / tuples of them, as hosts pass conditionings) whose tensors share
batch dimension 0; anything that is not a tensor passes through unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from loratorio.core.routing import MultiAdapter


def tree_map(fn: Callable[[Tensor], Any], tree: Any) -> Any:
    """Apply fn to every tensor of a dict/list/tuple tree, keeping its structure."""
    if isinstance(tree, Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_map(fn, v) for v in tree)
    return tree


def tree_repeat(tree: Any, times: int) -> Any:
    """Stack `times` copies of every tensor along the batch axis: [a, b] -> [a, b, a, b, ...]."""
    return tree_map(lambda t: t.repeat(times, *([1] * (t.dim() - 1))) if t.dim() else t, tree)


def evaluate(
    fn: Callable[[Any], Tensor],
    inputs: Any,
    router: MultiAdapter,
    *,
    batched: bool = True,
    adapters: tuple[int | None, ...] | None = None,
    max_rows: int | None = None,
) -> Tensor:
    """Outputs of `fn(inputs)` for each group in `adapters` (None = base), stacked as (G, B, ...).

    Batched mode lays the groups out contiguously in one call of G·B rows (slices, no gathers); sequential mode makes
    one call of B rows per group. `max_rows` caps a batched call's rows, splitting on group boundaries.
    """
    groups = tuple(adapters) if adapters is not None else (None, *range(router.n_adapters))
    batch = batch_size(inputs)
    per_call = 1 if not batched else len(groups)
    if batched and max_rows:
        per_call = max(1, min(len(groups), max_rows // max(batch, 1)))
    outs = []
    for start in range(0, len(groups), per_call):
        chunk = groups[start:start + per_call]
        labels = tuple(g for g in chunk for _ in range(batch))
        with router.routed(labels):
            out = fn(tree_repeat(inputs, len(chunk)) if len(chunk) > 1 else inputs)
        outs.append(out.reshape(len(chunk), batch, *out.shape[1:]))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def batch_size(inputs: Any) -> int:
    """The batch size shared by every tensor of an input tree; an error if they disagree."""
    sizes = set()
    tree_map(lambda t: sizes.add(t.shape[0]) if t.dim() else None, inputs)
    if len(sizes) != 1:
        raise ValueError(f"inputs must share one batch size, got {sorted(sizes)}")
    return sizes.pop()
