"""One LoRAtorio step over a host's batch: evaluate base and LoRAs, fuse the cond rows, re-centre the uncond rows.

Hosts describe their batch with a `BatchLayout` and hand over a model callable; the engine returns a tensor shaped
like the host's own model output, so the host's CFG (and everything after it) runs unchanged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from loratorio.core.evaluate import batch_size, evaluate, tree_map
from loratorio.core.fusion import divergence_spread, recentre_uncond, to_eps, weighted_sum
from loratorio.core.masked import RowMasks
from loratorio.core.memory import Chunker, MemoryBudget
from loratorio.core.modes import mode_recentre, mode_weights, switch_index
from loratorio.core.routing import MultiAdapter
from loratorio.core.settings import Settings

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class FastRules:
    """How the fast mode treats what has no place in the image (measured in the README, not user settings).

    flat: layers with no spatial output (time embedding): "share" (each LoRA at its mean share) or "full" (merged).
    text: cross-attention: "blend" (one pass per LoRA, blended per query: exact for the layer), or its keys and
    values as other non-spatial layers, "share" or "full".
    uncond: the re-centred negative: "scaled" masks (1 − λ)·Ω in the same rows, the base taking λ, or "rows": extra
    base rows for the negative, blended with the masked rows after the call (one more row per image).
    """

    flat: str = "share"
    # "share": measured on the miniature, the same score as "blend" in both regimes, at a 20% cheaper fast step.
    text: str = "share"
    uncond: str = "scaled"
    warmup: int = 1
    # "cond": a full step evaluates base and LoRAs on the prompt rows only, runs the masked pass on every row, and
    # keeps ε_fused − ε_masked of the prompt rows; the fast steps after it add that residual back. Measured in the
    # README: without it the masked pass alone lost 0.07 in the weak regime even with a fresh Ω at every step.
    # "none": full steps as in full speed, fast steps the masked pass alone.
    correct: str = "cond"
    # Ω_i^γ renormalised over the LoRAs before masking (inf: each pixel's winner alone); 1 keeps Ω.
    sharpen: float = 1.0
    # The `auto_global` threshold fast mode uses where the user left it at 0: a LoRA whose divergence is spread evenly
    # (a style) then applies to every row instead of being masked. Measured in the README: with 0.5 fast mode gained
    # on both regimes' tuning half (weak +0.070 against +0.038 without); hatch, the skill it lost most, stays lost.
    auto_global: float = 0.5

    def __post_init__(self) -> None:
        if (self.correct not in ("cond", "none") or self.uncond not in ("scaled", "rows") or not self.sharpen > 0
                or not self.auto_global >= 0):
            raise ValueError(f"correct must be 'cond' or 'none', uncond 'scaled' or 'rows', sharpen > 0, "
                             f"auto_global >= 0: {self}")


class Composer:
    """Runs one mode of composition per step; keeps the last weight map for display (and for `reuse` and `fast`)."""

    def __init__(self, router: MultiAdapter, settings: Settings, *, batched: bool = True,
                 max_rows: int | None = None, budget: MemoryBudget | None = None,
                 fast_rules: FastRules = FastRules()) -> None:
        self.router = router
        self.settings = settings
        self.batched = batched
        # Splits the batched call to fit the device (budget: the host's free memory and peak estimate).
        self.chunker = Chunker(budget, max_rows=max_rows)
        self.fast_rules = fast_rules
        self.last_weights: Tensor | None = None
        self._weights_step: int | None = None  # the step last_weights were computed at
        # Settings.smoothing: the maps of the last step with fresh ones, and of this step so far, in call order (the
        # step they belong to is _weights_step, which _weights sets after smoothing each fresh map).
        self._smooth_prev: list[Tensor] = []
        self._smooth_now: list[Tensor] = []
        self._full_step: int | None = None  # the step of the last full (base + every LoRA) evaluation
        # The LoRAs that compete per patch; `auto_global` moves the others to every row after the first step.
        self.composed: tuple[int, ...] = tuple(range(router.n_adapters))
        self._globals_chosen = False
        self.total_steps: int | None = None  # set by the host: the temperature schedule needs it
        self.residuals: dict[int, Tensor] = {}  # FastRules.correct: ε_fused − ε_masked of the last full step

    def groups(self, step: int, layout: BatchLayout | None = None, batch: int | None = None) -> tuple[int | None, ...]:
        """Which models a step evaluates (None = base): Switch one LoRA, Composite all LoRAs, LoRAtorio base too.

        On a step that reuses the weights, LoRAtorio needs the base only to re-centre the negative; given the host's
        layout and batch size, the base is left out when nothing reads it.
        """
        s, c = self.settings, self.composed
        if s.mode == "switch":
            return (c[switch_index(step, len(c), s.switch_interval)],)
        if s.mode == "composite":
            return c
        if layout is not None and self._reusable(step, len(layout.cond_rows)) and not _base_read(layout, s, batch):
            return c
        return (None, *c)

    def predict(self, fn: Callable[[Any], Tensor], inputs: Any, step: int, unit: int = 1) -> Tensor:
        """The step's model outputs for each of `groups(step)` (base included in LoRAtorio mode), as (G, B, ...).

        For hosts that evaluate and fuse at different moments; `fuse` with its default `base` takes this output.
        unit: rows that must stay in one model call when the rows are split to fit memory.
        """
        return evaluate(fn, inputs, self.router, batched=self.batched, adapters=self.groups(step),
                        chunker=self.chunker, unit=unit)

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
        batch = batch_size(inputs)
        cond = list(layout.cond_rows)
        xc, sc = (x[cond], sigma[cond]) if x is not None and sigma is not None else (None, None)
        if self.fast_step(step, len(cond)):
            out = self.fast(fn, inputs, layout, batch)
            out[cond] = self.corrected(out[cond], 0, xc, sc)
            return out
        if self.corrects:
            # Base and LoRAs on the prompt rows give Ω and the exact fused prompt; one masked pass gives every row.
            preds = evaluate(fn, tree_map(lambda t: t[cond] if t.dim() and t.shape[0] == batch else t, inputs),
                             self.router, batched=self.batched, adapters=(None, *self.composed),
                             chunker=self.chunker)
            fused = self.fuse(preds, BatchLayout(tuple(range(len(cond)))), step, xc, sc, base=True)
            out = self.fast(fn, inputs, layout, batch)
            self.keep_residual(fused, out[cond], 0, xc, sc)
            out[cond] = fused
            return out
        groups = self.groups(step, layout, batch)
        preds = evaluate(fn, inputs, self.router, batched=self.batched, adapters=groups, chunker=self.chunker)
        return self.fuse(preds, layout, step, x, sigma, base=groups[0] is None)

    def fast_step(self, step: int, n_cond: int) -> bool:
        """Whether `speed` fast runs this step as one masked pass: within `full_every` steps of the last full one,
        whose Ω has one map per cond row."""
        s, last, w = self.settings, self._full_step, self.last_weights
        return (s.speed == "fast" and s.mode == "loratorio" and w is not None and last is not None
                and step >= self.fast_rules.warmup and 0 < step - last < s.full_every and w.shape[1] == n_cond)

    @property
    def has_fast_steps(self) -> bool:
        """Whether speed fast runs masked passes between full steps: LoRAtorio mode, and a full step less often than
        every step (`full_every` 1 is full speed, exactly)."""
        s = self.settings
        return s.speed == "fast" and s.mode == "loratorio" and s.full_every > 1

    @property
    def corrects(self) -> bool:
        """Whether full steps keep the residual of the masked pass (speed fast, FastRules.correct "cond"; the
        reference must be the prompt rows, which are all the full step evaluates per LoRA)."""
        return self.has_fast_steps and self.fast_rules.correct == "cond" and self.settings.reference == "cond"

    def keep_residual(self, fused: Tensor, masked: Tensor, key: int = 0, x: Tensor | None = None,
                      sigma: Tensor | None = None) -> None:
        """Store ε_fused − ε_masked of some prompt rows (key: which cond rows, for hosts that split them); x and
        sigma when the predictions are x0 (ε = (x − x0)/σ), so that the residual carries across sigmas."""
        r = fused - masked if x is None else (masked - fused) / _sigma_view(sigma, fused)
        self.residuals[key] = r.detach()

    def corrected(self, masked: Tensor, key: int = 0, x: Tensor | None = None,
                  sigma: Tensor | None = None) -> Tensor:
        """A fast step's prompt rows plus the last full step's residual for the same rows (as kept by key)."""
        r = self.residuals.get(key)
        if r is None or r.shape != masked.shape:
            return masked
        return masked + r.to(masked.dtype) if x is None else masked - _sigma_view(sigma, masked) * r.to(masked.dtype)

    def row_masks(self, layout: BatchLayout, batch: int, weights: Tensor | None = None) -> Tensor:
        """Fast mode's per-row weights (N, batch, 1, H, W) from Ω (default: the last): cond rows their own map; each
        negative row its image's first map scaled by 1 − λ, the base taking λ (re-centring, linearised); other rows
        the base alone."""
        w = sharpened(self.last_weights if weights is None else weights, self.fast_rules.sharpen)
        masks = w.new_zeros(w.shape[0], batch, *w.shape[2:])
        masks[:, list(layout.cond_rows)] = w
        if layout.uncond_rows:
            keep = 1.0 if self.fast_rules.uncond == "rows" else 1.0 - mode_recentre(self.settings.mode,
                                                                                   self.settings.recentre)
            masks[:, list(layout.uncond_rows)] = w[:, layout.cond_of_uncond] * keep
        n = self.router.n_adapters
        if masks.shape[0] == len(self.composed) < n:
            # auto_global moved some LoRAs to every row: in the masked pass they weigh 1 on every row, as the full
            # steps' shared adapters apply them (the masked pass applies no shared adapter itself).
            full = masks.new_ones(n, *masks.shape[1:])
            full[list(self.composed)] = masks
            masks = full
        return masks

    def masks(self, weights: Tensor) -> RowMasks:
        """Per-row weights (N, B, 1, H, W) as the masks of a fast pass, under this composer's FastRules."""
        return RowMasks(weights, self.fast_rules.flat, self.fast_rules.text)

    def fast(self, fn: Callable[[Any], Tensor], inputs: Any, layout: BatchLayout, batch: int) -> Tensor:
        """One masked pass of the host's rows (plus base negative rows under FastRules.uncond == "rows")."""
        masks = self.row_masks(layout, batch)
        lam = mode_recentre(self.settings.mode, self.settings.recentre)
        extra = list(layout.uncond_rows) if self.fast_rules.uncond == "rows" and lam > 0 else []
        if extra:
            inputs = tree_map(lambda t: torch.cat([t, t[extra]]) if t.dim() and t.shape[0] == batch else t, inputs)
            masks = torch.cat([masks, masks.new_zeros(masks.shape[0], len(extra), *masks.shape[2:])], dim=1)
        with self.router.masked(self.masks(masks)):
            out = fn(inputs)
        if extra:
            fused = out[:batch].clone()
            fused[extra] = recentre_uncond(out[batch:], out[extra], lam)
            out = fused
        return out

    def fuse(self, preds: Tensor, layout: BatchLayout, step: int, x: Tensor | None = None,
             sigma: Tensor | None = None, *, base: bool | None = None) -> Tensor:
        """The fusion alone: patch weights, weighted sum and re-centring over `preds` (G, B, C, H, W) of `groups`.

        base: whether preds[0] is the base model's (default: as the mode evaluates it on a fresh step).
        """
        s = self.settings
        if s.mode == "switch":
            return preds[0]
        has_base = s.mode == "loratorio" if base is None else base
        base = preds[0] if has_base else None
        loras = preds[1:] if has_base else preds
        cond, unc = list(layout.cond_rows), list(layout.uncond_rows)
        weights = self._weights(loras, base, layout, step, x, sigma)
        self._full_step = step
        out = (base if base is not None else loras[0]).clone()
        out[cond] = weighted_sum(loras[:, cond], weights)
        if unc:
            w_unc = weights[:, layout.cond_of_uncond] if weights.shape[1] > 1 else weights
            fused = weighted_sum(loras[:, unc], w_unc)
            base_unc = base[unc] if base is not None else fused
            out[unc] = recentre_uncond(base_unc, fused, mode_recentre(s.mode, s.recentre))
        return out

    def _weights(self, loras: Tensor, base: Tensor | None, layout: BatchLayout, step: int, x: Tensor | None,
                 sigma: Tensor | None) -> Tensor:
        """Ω for this step: the last map while `reuse` allows, else freshly from the predictions."""
        s, cond = self.settings, list(layout.cond_rows)
        if self._reusable(step, len(cond)):
            if self.last_weights.shape[-2:] == loras.shape[-2:]:
                return self.last_weights
            if base is None:
                raise ValueError("the reused LoRAtorio weights are for another latent size; use one Composer per pass")
        eps_loras, eps_ref = loras[:, cond], None
        if base is not None:
            ref_rows = cond
            if s.reference == "uncond" and layout.uncond_rows:
                ref_rows = [layout.uncond_rows[j] for j in layout.uncond_of_cond]
            eps_ref = base[ref_rows]
            if x is not None:
                eps_loras = to_eps(x[cond], eps_loras, sigma[cond])
                eps_ref = to_eps(x[ref_rows], eps_ref, sigma[ref_rows])
        weights = mode_weights(s.mode, eps_loras, eps_ref, patch_size=s.patch_size, temperature=self.temperature(step),
                               top_k=s.top_k or None, step=step, min_share=s.min_share, relative=s.relative)
        weights = self._smoothed(weights, step)
        self.last_weights, self._weights_step = weights, step
        if self.auto_global > 0 and s.mode == "loratorio" and not self._globals_chosen and eps_ref is not None:
            self._choose_globals(eps_loras, eps_ref)
        return weights

    def _smoothed(self, weights: Tensor, step: int) -> Tensor:
        """Ω_t ← β·Ω_prev + (1 − β)·Ω_t (β = `smoothing`; Ω_prev: the last step's map, smoothed), a convex blend of two
        maps that each sum to 1 over the LoRAs, so Ω still does. A host may fuse several chunks of rows per step: the
        k-th map of a step blends with the k-th of the step before, and only where the shapes agree."""
        beta = self.settings.smoothing
        # Speed fast renews Ω only every `full_every` steps: there the past is that many steps old, and keeping it
        # lost on the miniature's tuning half (README), so fast mode uses fresh maps.
        if beta <= 0 or self.settings.mode != "loratorio" or self.has_fast_steps:
            return weights
        last = self._weights_step
        if step != last:
            # A new pass (step back to the start) has no past to keep.
            self._smooth_prev = self._smooth_now if last is not None and step > last else []
            self._smooth_now = []
        k = len(self._smooth_now)
        prev = self._smooth_prev[k] if k < len(self._smooth_prev) else None
        if prev is not None and prev.shape == weights.shape:
            weights = prev * beta + weights * (1 - beta)
        self._smooth_now.append(weights)
        return weights

    def temperature(self, step: int) -> float:
        """τ at this step: `temperature` throughout, or geometric from it to `temperature_end` over the steps."""
        s, total = self.settings, self.total_steps
        if not s.temperature_end or not total or total < 2:
            return s.temperature
        frac = min(1.0, step / (total - 1))
        return s.temperature ** (1 - frac) * s.temperature_end ** frac

    def _choose_globals(self, eps_loras: Tensor, eps_ref: Tensor) -> None:
        """After the first step, LoRAs whose divergence is spread evenly over the image apply to every row (merged,
        in effect) instead of competing per patch; at least one LoRA stays composed."""
        self._globals_chosen = True
        spread = divergence_spread(eps_loras, eps_ref, self.settings.patch_size).tolist()
        ranked = sorted(zip(spread, self.composed, strict=True), reverse=True)
        chosen = tuple(sorted(i for v, i in ranked[1:] if v < self.auto_global))
        if chosen:
            self.router.shared = chosen
            self.composed = tuple(i for i in self.composed if i not in chosen)
            log.info("LoRAtorio: LoRAs %s apply to the whole image (divergence spread %s)", list(chosen),
                     [round(v, 2) for v in spread])

    @property
    def auto_global(self) -> float:
        """The divergence-spread threshold below which a LoRA becomes global: the user's, else fast mode's own."""
        user = self.settings.auto_global
        return self.fast_rules.auto_global if user == 0 and self.has_fast_steps else user

    @property
    def display_weights(self) -> Tensor | None:
        """The last weights with one row per LoRA of the router: a global LoRA's row is 1 everywhere."""
        w, n = self.last_weights, self.router.n_adapters
        if w is None or w.shape[0] == n:
            return w
        full = w.new_ones((n, *w.shape[1:]))
        full[list(self.composed)] = w
        return full

    def _reusable(self, step: int, n_cond: int) -> bool:
        """Whether step falls within `reuse` steps after the last computed map, for the same number of cond rows."""
        s, w, last = self.settings, self.last_weights, self._weights_step
        return (s.reuse > 0 and s.mode == "loratorio" and w is not None and last is not None
                and 0 < step - last <= s.reuse and w.shape[1] == n_cond and w.shape[0] == len(self.composed))


def _sigma_view(sigma: Tensor, like: Tensor) -> Tensor:
    return sigma.to(like.dtype).reshape(-1, *[1] * (like.dim() - 1))


def sharpened(weights: Tensor, gamma: float) -> Tensor:
    """Ω_i^γ / Σ_j Ω_j^γ over the LoRAs (dim 0), per pixel; γ = inf gives the winner weight 1 (one-hot)."""
    if gamma == 1.0:
        return weights
    if math.isinf(gamma):
        return torch.zeros_like(weights).scatter_(0, weights.argmax(0, keepdim=True), 1.0)
    powered = weights.clamp_min(0) ** gamma
    return powered / powered.sum(0, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)


def _base_read(layout: BatchLayout, settings: Settings, batch: int | None) -> bool:
    """Whether the fusion reads the base prediction once Ω is known: to re-centre, or for rows it does not fuse."""
    if batch is None or len(layout.cond_rows) + len(layout.uncond_rows) != batch:
        return True
    return bool(layout.uncond_rows) and mode_recentre(settings.mode, settings.recentre) > 0
