"""Fitting the batched call into device memory: rows per call from an estimate of its peak, and retries after OOM.

The batched call stacks 2(N+1) copies of the host's rows (the paper's §2.4 count of evaluations, in one call), so its
activations need about N+1 times what plain sampling needs. Before each call the rows are split into as few chunks as
fit the device's free memory; if a call still runs out of memory, the cache is freed and the same rows are evaluated
again in chunks of half the size. Either way every row is evaluated exactly once, with the same inputs, so the result
equals the unchunked call's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

log = logging.getLogger(__name__)

# Messages of the out-of-memory errors that are not torch.cuda.OutOfMemoryError: older torch, ROCm ("HIP out of
# memory"), MPS ("MPS backend out of memory"), XPU, and the CPU allocator ("DefaultCPUAllocator: not enough memory",
# "can't allocate memory").
_OOM_MESSAGES = ("out of memory", "not enough memory", "can't allocate memory")

# Peak activation memory of one UNet call, in values of the model's dtype per row and per latent pixel: what
# `python -m loratorio.bench memory --device meta` counts (diffusers' UNet with SD1.5 / SDXL shapes, fp16, attention
# as a fused kernel), rounded up: SD1.5 at 512 px 8343, SDXL at 1024 px 5057. SD1.5 needs more per pixel because it
# has attention (and its 4× wide feed-forward) at the full latent resolution; SDXL has none there.
# A call's peak is about VALUES_PER_PIXEL × rows × H × W × dtype size.
VALUES_PER_PIXEL = {"sd15": 8400.0, "sdxl": 5100.0}


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception is a device (or CPU allocator) running out of memory, in any of torch's forms."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _OOM_MESSAGES)


def activation_peak(values_per_pixel: float, dtype: torch.dtype) -> Callable[[int, tuple[int, ...]], float]:
    """Estimated peak bytes of one call of `rows` rows of latents shaped (C, H, W): values × rows × H × W × dtype."""
    size = torch.empty((), dtype=dtype).element_size()

    def peak(rows: int, shape: tuple[int, ...]) -> float:
        return values_per_pixel * size * rows * math.prod(shape[1:])

    return peak


@dataclass(frozen=True)
class MemoryBudget:
    """What a host knows about memory: free bytes on the model's device now, a call's peak, and how to free cache.

    free() returns None where there is no device budget (the CPU: the model shares RAM with everything else and an
    exhausted allocation is usually the OS killing the process, not an exception): then one call, and OOM retries only.
    peak(rows, shape) estimates one model call of `rows` rows of latents shaped `shape` (C, H, W), in bytes.
    """

    free: Callable[[], int | None]
    peak: Callable[[int, tuple[int, ...]], float]
    release: Callable[[], None] = lambda: None


class Chunker:
    """Rows per model call for one sampling pass: the budget's estimate, lowered for good by any OOM.

    A chunk holds whole copies of the host's rows (groups) where it can, for the routing's fast path; below one
    group, whole units: `unit` rows must stay in one call (1 where every row stands alone; a host chunk on Forge,
    whose per-chunk metadata cannot describe part of a chunk).
    """

    def __init__(self, budget: MemoryBudget | None = None, *, max_rows: int | None = None) -> None:
        self.budget = budget
        self.max_rows = max_rows
        self.cap: int | None = None  # rows per call that ran out of memory, halved
        self.most_chunks = 1  # the most calls one batched evaluation needed in this pass
        self.ooms = 0

    def rows_per_call(self, total: int, batch: int, shape: tuple[int, ...] | None, unit: int = 1) -> int:
        """The most rows one call may take: the cap, max_rows, and what the budget says fits (at least one unit)."""
        cap = total
        if self.max_rows:
            cap = min(cap, self.max_rows)
        if self.cap:
            cap = min(cap, self.cap)
        free = self.budget.free() if self.budget is not None and shape is not None else None
        if free is not None:
            fitting = [r for r in _sizes(cap, batch, unit) if self.budget.peak(r, shape) <= free]
            cap = fitting[0] if fitting else unit
        return max(_align(cap, batch, unit), unit)

    def run(self, call: Callable[[int, int], Tensor], total: int, batch: int, shape: tuple[int, ...] | None, *,
            unit: int = 1, limit: int | None = None) -> Tensor:
        """Evaluate rows [0, total) as call(start, stop) in as few chunks as fit; rows of the results concatenated.

        limit: rows per call never to exceed (one group: sequential evaluation). On an out-of-memory error the cache is
        released and the remaining rows are redone in chunks of half the size, down to one unit.
        """
        if total % unit or batch % unit:
            raise ValueError(f"rows ({total}) and rows per group ({batch}) must be whole units of {unit}")
        rows = self.rows_per_call(total, batch, shape, unit)
        if limit is not None:
            rows = min(rows, limit)
        sizes = plan_chunks(total, rows, batch, unit)
        outs, start, calls = [], 0, 0
        while start < total:
            size = sizes.pop(0)
            try:
                out = call(start, start + size)
            except Exception as exc:
                if not is_out_of_memory(exc) or size <= unit:
                    raise
                out = None  # retried below, once this frame no longer holds the exception's tensors
            if out is None:
                self.ooms += 1
                self.cap = max(_align(size // 2, batch, unit), unit)
                log.debug("LoRAtorio: out of memory with %d rows in one call; retrying with %d", size, self.cap)
                if self.budget is not None:
                    self.budget.release()
                sizes = plan_chunks(total - start, self.cap, batch, unit)
                continue
            outs.append(out)
            start += size
            calls += 1
        if limit is None:
            self.most_chunks = max(self.most_chunks, calls)
        return outs[0] if len(outs) == 1 else torch.cat(outs)



def _align(rows: int, batch: int, unit: int) -> int:
    """Whole groups when at least one fits, else whole units."""
    step = batch if rows >= batch else unit
    return rows - rows % step


def _sizes(cap: int, batch: int, unit: int) -> list[int]:
    """Candidate rows per call, largest first: whole groups down to one, then whole units."""
    groups = list(range(cap - cap % batch, 0, -batch)) if cap >= batch else []
    units = list(range(min(cap, batch - 1) // unit * unit, 0, -unit))
    return groups + units


def plan_chunks(total: int, rows: int, batch: int, unit: int = 1) -> list[int]:
    """As few chunks of at most `rows` rows as cover `total`, sized evenly in groups of `batch` (or in units)."""
    step = batch if rows >= batch and total % batch == 0 else unit
    pieces, per = total // step, max(rows // step, 1)
    chunks = math.ceil(pieces / per)
    return [(pieces // chunks + (i < pieces % chunks)) * step for i in range(chunks)]


def first_tensor(tree: object) -> Tensor | None:
    """The first tensor of a dict/list/tuple tree, in order (the hosts pass the latent first)."""
    if isinstance(tree, Tensor):
        return tree
    values = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else ()
    for value in values:
        found = first_tensor(value)
        if found is not None:
            return found
    return None
