"""One LoRAtorio step over a host's batch: evaluate base and LoRAs, fuse the cond rows, re-centre the uncond rows.

Hosts describe their batch with a `BatchLayout` and hand over a model callable; the engine returns a tensor shaped
like the host's own model output, so the host's CFG (and everything after it) runs unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from loratorio.core.evaluate import evaluate
from loratorio.core.fusion import recentre_uncond, to_eps, weighted_sum
from loratorio.core.modes import mode_recentre, mode_weights, switch_index
from loratorio.core.routing import MultiAdapter
from loratorio.core.settings import Settings


@dataclass(frozen=True)
class BatchLayout:
    """Where the prompt and negative rows sit in a host batch.

    cond_rows: rows of prompt predictions (several per image with `AND`); uncond_rows: rows of negative predictions
    (empty when the host skips them, e.g. NGMS); uncond_of_cond[c]: position in uncond_rows of cond row c's image.
    """

    cond_rows: tuple[int, ...]
    uncond_rows: tuple[int, ...] = ()
    uncond_of_cond: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.uncond_rows and sorted(set(self.uncond_of_cond)) != list(range(len(self.uncond_rows))):
            raise ValueError("uncond_of_cond must map every cond row to an uncond row, covering each uncond row")
        if set(self.cond_rows) & set(self.uncond_rows):
            raise ValueError("a row cannot be both cond and uncond")

    @classmethod
    def cond_then_uncond(cls, images: int) -> BatchLayout:
        """The common layout [cond × b, uncond × b], image i's uncond in row b + i."""
        return cls(tuple(range(images)), tuple(range(images, 2 * images)), tuple(range(images)))

    @property
    def cond_of_uncond(self) -> list[int]:
        """For each uncond row, the first cond row of its image: the weight map its fusion uses."""
        return [self.uncond_of_cond.index(j) for j in range(len(self.uncond_rows))]


class Composer:
    """Runs one mode of composition per step; keeps the last weight map for display."""

    def __init__(self, router: MultiAdapter, settings: Settings, *, batched: bool = True,
                 max_rows: int | None = None) -> None:
        self.router = router
        self.settings = settings
        self.batched = batched
        self.max_rows = max_rows
        self.last_weights: Tensor | None = None

    def groups(self, step: int) -> tuple[int | None, ...]:
        """Which models a step evaluates (None = base): Switch one LoRA, Composite all LoRAs, LoRAtorio base too."""
        s, n = self.settings, self.router.n_adapters
        if s.mode == "switch":
            return (switch_index(step, n, s.switch_interval),)
        if s.mode == "composite":
            return tuple(range(n))
        return (None, *range(n))

    def __call__(
        self,
        fn: Callable[[Any], Tensor],
        inputs: Any,
        layout: BatchLayout,
        step: int,
        x: Tensor | None = None,
        sigma: Tensor | None = None,
    ) -> Tensor:
        """fn(inputs) -> predictions (B, C, H, W) in ε space, or in x0 space when x and sigma are given.

        x, sigma: the host batch's noisy latent and sigma, (B, C, H, W) and (B,).
        """
        preds = evaluate(fn, inputs, self.router, batched=self.batched, adapters=self.groups(step),
                         max_rows=self.max_rows)
        return self.fuse(preds, layout, step, x, sigma)

    def fuse(self, preds: Tensor, layout: BatchLayout, step: int, x: Tensor | None = None,
             sigma: Tensor | None = None) -> Tensor:
        """The fusion alone: patch weights, weighted sum and re-centring over `preds` (G, B, C, H, W) of `groups`."""
        s = self.settings
        if s.mode == "switch":
            return preds[0]
        base = preds[0] if s.mode == "loratorio" else None
        loras = preds[1:] if s.mode == "loratorio" else preds
        cond, unc = list(layout.cond_rows), list(layout.uncond_rows)
        eps_loras, eps_ref = loras[:, cond], None
        if base is not None:
            ref_rows = cond
            if s.reference == "uncond" and unc:
                ref_rows = [unc[j] for j in layout.uncond_of_cond]
            eps_ref = base[ref_rows]
            if x is not None:
                eps_loras = to_eps(x[cond], eps_loras, sigma[cond])
                eps_ref = to_eps(x[ref_rows], eps_ref, sigma[ref_rows])
        weights = mode_weights(s.mode, eps_loras, eps_ref, patch_size=s.patch_size, temperature=s.temperature,
                               top_k=s.top_k or None, step=step)
        self.last_weights = weights
        out = (base if base is not None else loras[0]).clone()
        out[cond] = weighted_sum(loras[:, cond], weights)
        if unc:
            w_unc = weights[:, layout.cond_of_uncond] if weights.shape[1] > 1 else weights
            fused = weighted_sum(loras[:, unc], w_unc)
            base_unc = base[unc] if base is not None else fused
            out[unc] = recentre_uncond(base_unc, fused, mode_recentre(s.mode, s.recentre))
        return out
