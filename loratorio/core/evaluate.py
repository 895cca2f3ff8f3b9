"""Evaluate the base model and N adapters on the same inputs: one routed batched call, or one call per adapter.

Inputs are pytrees (tensors, and dicts / lists / tuples of them, as hosts pass conditionings) whose tensors share
batch dimension 0; anything that is not a tensor passes through unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from loratorio.core.memory import Chunker, first_tensor
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
    chunker: Chunker | None = None,
    unit: int = 1,
) -> Tensor:
    """Outputs of `fn(inputs)` for each group in `adapters` (None = base), stacked as (G, B, ...).

    Batched mode lays the groups out contiguously in one call of G·B rows (slices, no gathers); sequential mode makes
    one call of B rows per group. `max_rows` caps a call's rows; a `chunker` splits the rows to fit device memory and
    retries after out-of-memory errors, never splitting `unit` consecutive rows. Each row is evaluated once either
    way, so chunks change no result.
    """
    groups = tuple(adapters) if adapters is not None else (None, *range(router.n_adapters))
    batch = batch_size(inputs)
    chunker = chunker or Chunker(max_rows=max_rows)
    latent = first_tensor(inputs)
    shape = tuple(latent.shape[1:]) if latent is not None else None

    def call(start: int, stop: int) -> Tensor:
        labels = tuple(groups[row // batch] for row in range(start, stop))
        with router.routed(labels):
            return fn(rows_of(inputs, batch, start, stop))

    out = chunker.run(call, len(groups) * batch, batch, shape, unit=unit, limit=None if batched else batch)
    return out.reshape(len(groups), batch, *out.shape[1:])


def rows_of(inputs: Any, batch: int, start: int, stop: int) -> Any:
    """Rows [start, stop) of the inputs stacked once per group: whole copies by repeat, parts by index."""
    if start % batch == 0 and stop % batch == 0:
        copies = (stop - start) // batch
        return tree_repeat(inputs, copies) if copies > 1 else inputs
    index = torch.tensor([row % batch for row in range(start, stop)])
    return tree_map(lambda t: t.index_select(0, index.to(t.device)) if t.dim() else t, inputs)


def batch_size(inputs: Any) -> int:
    """The batch size shared by every tensor of an input tree; an error if they disagree."""
    sizes = set()
    tree_map(lambda t: sizes.add(t.shape[0]) if t.dim() else None, inputs)
    if len(sizes) != 1:
        raise ValueError(f"inputs must share one batch size, got {sorted(sizes)}")
    return sizes.pop()
