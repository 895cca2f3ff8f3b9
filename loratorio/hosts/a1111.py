"""AUTOMATIC1111 v1.10 glue: the built-in Lora extension's networks as routed adapters, and the CFG denoiser's step.

How a step runs (design/a1111.md §4, §8):
1. `install` wraps the pass's CFG denoiser's inner model (`model_wrap`) in `RoutedInnerModel` and hooks the UNet.
2. `on_cfg_denoiser` records where the prompt and negative rows sit in this step's batch.
3. Each inner-model call evaluates base + every LoRA on its rows (LoRAs unmerged for the call) and records them.
4. `on_cfg_denoised` fuses the recorded predictions and writes them into the host's `x_out` in place; the host's
   own CFG, masks and callbacks run after it unchanged.
Host objects come in as arguments (sd_model, the `networks` module, the denoiser), so tests drive this with fakes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from loratorio.core import (
    VALUES_PER_PIXEL,
    Adapter,
    BatchLayout,
    Callback,
    Composer,
    Dense,
    LoHa,
    LoKr,
    LowRank,
    Materialized,
    MemoryBudget,
    MultiAdapter,
    NormDelta,
    Rescaled,
    Settings,
    SettingsError,
    activation_peak,
    in_window,
    merged_weight,
    tree_map,
)
from loratorio.hosts.checks import dry_run, inject_fault
from loratorio.maps import accumulate

log = logging.getLogger(__name__)

UNET_PREFIX = "diffusion_model_"


class Declined(Exception):
    """LoRAtorio cannot run this generation; the message says why, and sampling goes on normally."""


def module_adapter(nm: Any, layer: nn.Module) -> Adapter:
    """One host NetworkModule as an adapter applied from its factors, by the formulas of the host's network_*.py.

    The scale is the module's calc_scale() (alpha/dim) and the strength its multiplier(), as finalize_updown applies
    them; DoRA's magnitude goes through apply_weight_decompose's formula. What has no native kind here (OFT, GLoRA,
    a `bias` entry, dyn_dim) is rebuilt by the module's own calc_updown while the layer runs.
    """
    if isinstance(layer, (nn.GroupNorm, nn.LayerNorm)):
        if getattr(nm, "w_norm", None) is not None:
            return NormDelta(nm.w_norm, getattr(nm, "b_norm", None), nm.multiplier(), nm.calc_scale())
        return Callback(nm.forward)
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        return Callback(nm.forward)  # MultiheadAttention and the like: the module's own delta forward, y + f(x)
    scale, strength = nm.calc_scale(), nm.multiplier()
    kind = type(nm).__name__
    plain = getattr(nm, "bias", None) is None and getattr(nm.network, "dyn_dim", None) is None
    inner: Adapter | None = None
    if plain and kind == "NetworkModuleIa3" and isinstance(layer, nn.Linear):
        # network_ia3: ΔW = W·w (rows, or columns when on_input) · scale · multiplier.
        vec = 1 + nm.w.flatten().float() * scale
        return Rescaled(None, None if nm.on_input else vec, vec if nm.on_input else None, strength)
    if plain and kind == "NetworkModuleFull":
        return Dense(nm.weight, getattr(nm, "ex_bias", None), strength, scale)
    if plain and getattr(nm, "up_model", None) is not None and getattr(nm, "down_model", None) is not None:
        mid = nm.mid_model.weight if getattr(nm, "mid_model", None) is not None else None
        # LowRank with alpha=None multiplies by exactly its multiplier: here the host's scale (· strength below).
        inner = LowRank(nm.down_model.weight.detach(), nm.up_model.weight.detach(), None,
                        None if mid is None else mid.detach(), scale)
    elif plain and kind == "NetworkModuleHada":
        inner = LoHa(nm.w1a, nm.w1b, nm.w2a, nm.w2b, scale, nm.t1, nm.t2)
    elif plain and kind == "NetworkModuleLokr":
        inner = LoKr(nm.w1, nm.w2, nm.w1a, nm.w1b, nm.w2a, nm.w2b, nm.t2, scale)
    if inner is None:
        return Materialized(partial(_host_updown, nm, layer))
    dora = getattr(nm, "dora_scale", None)
    if dora is None:
        if isinstance(inner, LowRank):
            inner.multiplier = scale * strength
        else:
            inner.multiplier = strength
        return inner
    return Rescaled(inner, *a1111_dora(dora, _base_weight(layer), merged_weight(layer, inner)), strength)


def _base_weight(layer: nn.Module) -> Tensor:
    """The layer's unmerged weight: the host's backup while LoRAs are merged in, else the weight itself."""
    weight = getattr(layer, "network_weights_backup", None)
    return layer.weight if weight is None or isinstance(weight, tuple) else weight


def _host_updown(nm: Any, layer: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The module's ΔW and Δbias by its own calc_updown against the base weight (multiplier included)."""
    with torch.no_grad():
        weight = _base_weight(layer)
        return nm.calc_updown(weight.to(layer.weight.device))


def a1111_dora(magnitude: Tensor, weight: Tensor, delta: Tensor) -> tuple[Tensor | None, Tensor]:
    """(row, col) of apply_weight_decompose: W' = (W + ΔW)·m / |W + ΔW| with the norm over each input column.

    The hosts' norm is always per column; a magnitude stored per output row (LyCORIS' wd_on_output, shape (out, 1…))
    then broadcasts against it, so W'[o, i] = (W + ΔW)[o, i]·m[o]/n[i]: row = m, col = 1/n.
    """
    merged = weight.float() + delta.to(weight.device).float()
    norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
    m = magnitude.to(weight.device).float()
    if m.dim() >= 2 and m.shape[0] == merged.shape[0] and m.shape[0] != 1 and m.shape[1] == 1:
        return m.flatten(), 1 / norm
    if m.shape[0] == 1 and m.numel() == merged.shape[1]:
        return None, m.flatten() / norm
    raise Declined(f"a DoRA magnitude of shape {tuple(m.shape)} fits neither axis of a {tuple(merged.shape)} weight")


def unet_adapters(networks: list, sd_model: Any) -> list[dict[nn.Module, Adapter]]:
    """Per loaded network, its UNet layers (looked up on the current model, not the possibly stale sd_module)."""
    mapping = sd_model.network_layer_mapping
    out = []
    for net in networks:
        table: dict[nn.Module, Adapter] = {}
        for key, nm in net.modules.items():
            layer = mapping.get(key)
            if key.startswith(UNET_PREFIX) and layer is not None:
                table[layer] = module_adapter(nm, layer)
        out.append(table)
    return out


@dataclass
class StepRecord:
    """What one sampling step's model calls produced, in the host's row order."""

    layout: BatchLayout | None = None
    x_in: Tensor | None = None
    sigma_in: Tensor | None = None
    step: int = 0
    preds: list[Tensor] = field(default_factory=list)
    # (inner model, x, sigma, kwargs) of each call composed so far: what a failure later in the step re-runs plainly.
    calls: list[tuple] = field(default_factory=list)
    broken: bool = False  # a call of this step failed: its other calls' rows are re-run plainly in end_step
    rows: int = 0  # rows of every model call of the step, composed or not (== cond rows when uncond was skipped)
    fast: bool = False  # one masked pass per call (speed fast between full steps)
    correct: bool = False  # speed fast's full step: base + LoRAs on the cond rows; every row masked in end_step


def cond_layout(x_in: Tensor, n_cond: int, n_images: int) -> BatchLayout:
    """A1111's CFG batch: cond rows per image (more than one with AND), then one uncond row per image.

    The uncond block is x itself and cond rows are contiguous copies of x[i] in image order, so a forward scan
    recovers each cond row's image.
    """
    if n_cond == n_images:
        return BatchLayout.cond_then_uncond(n_images)
    x = x_in[n_cond:n_cond + n_images]
    image, owner = 0, []
    for row in range(n_cond):
        while image < n_images and not torch.equal(x_in[row], x[image]):
            image += 1
        if image == n_images:
            raise Declined("could not match AND sub-prompt rows to images")
        owner.append(image)
    return BatchLayout(tuple(range(n_cond)), tuple(range(n_cond, n_cond + n_images)), tuple(owner))


class InnerModelProxy(nn.Module):
    """Stands in for the CFG denoiser's inner model (k-diffusion or timestep wrapper) for one sampling pass.

    An nn.Module because the host's denoiser registers `model_wrap` as a child module; every attribute but the
    call is the original's (samplers read sigmas, alphas and helpers off it).
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)


class RoutedInnerModel(InnerModelProxy):
    """The inner model for a LoRAtorio pass: each call goes through the generation state."""

    def __init__(self, inner: nn.Module, state: GenerationState) -> None:
        super().__init__(inner)
        # Plain Python state, not a submodule: bypass nn.Module's attribute bookkeeping.
        object.__setattr__(self, "state", state)

    def forward(self, x: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
        return self.state.model_call(self.inner, x, sigma, kwargs)


class RefusingInnerModel(InnerModelProxy):
    """The inner model for a request with invalid LoRAtorio settings: the first call raises the settings error.

    A1111 reports and swallows exceptions from script hooks, so an API request with a bad value would otherwise
    answer 200 with a silently plain image; raising from the sampling call makes the request fail with the message.
    """

    def __init__(self, inner: nn.Module, message: str) -> None:
        super().__init__(inner)
        object.__setattr__(self, "message", message)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        raise SettingsError(self.message)


def refuse(denoiser: Any, message: str) -> Callable[[], None]:
    """Make this pass fail with `message`; returns the undo."""
    original = denoiser.inner_model
    denoiser.model_wrap = RefusingInnerModel(original, message)

    def undo() -> None:
        if isinstance(getattr(denoiser, "model_wrap", None), RefusingInnerModel):
            denoiser.model_wrap = original
    return undo


@dataclass
class GenerationState:
    """One generation's LoRAtorio state: settings, the routed UNet, the networks, warnings and weight maps."""

    settings: Settings
    networks_module: Any
    router: MultiAdapter
    composer: Composer
    eps_space: bool
    networks: list = field(default_factory=list)
    global_networks: list = field(default_factory=list)
    record: StepRecord = field(default_factory=StepRecord)
    failed: str | None = None
    denoiser: Any = None
    original_wrap: Any = None
    map_sum: Tensor | None = None
    map_steps: int = 0
    warn: Callable[[str], None] = log.warning

    @contextmanager
    def base_weights(self) -> Iterator[None]:
        """Leave only the global networks in the host's loaded list for one call: its layers then compute with the
        base weights plus the globals merged (the host re-merges a layer when the list changes), for every row."""
        loaded = self.networks_module.loaded_networks
        saved = list(loaded)
        loaded[:] = [n for n in saved if any(n is g for g in self.global_networks)]
        try:
            yield
        finally:
            loaded[:] = saved

    def active(self, step: int, total: int) -> bool:
        return self.failed is None and in_window(step, total, self.settings.start, self.settings.end)

    def begin_step(self, x_in: Tensor, sigma_in: Tensor, n_cond: int, n_images: int, step: int, total: int) -> None:
        """cfg_denoiser callback: note this step's layout; steps outside the window run the host's plain path."""
        self.record = StepRecord()
        self.composer.total_steps = total
        if not self.active(step, total):
            return
        try:
            layout = cond_layout(x_in, n_cond, n_images)
            fast = self.composer.fast_step(step, len(layout.cond_rows))
            self.record = StepRecord(layout, x_in, sigma_in, step, fast=fast,
                                     correct=not fast and self.composer.corrects)
        except Declined as exc:
            self.fail(str(exc))

    def model_call(self, inner: Any, x: Tensor, sigma: Tensor, kwargs: dict) -> Tensor:
        """One host model call: base + LoRAs on these rows, recorded; the host's plain call when not composing."""
        rec = self.record
        rec.rows += x.shape[0]
        if rec.layout is None or self.failed is not None:
            return inner(x, sigma, **kwargs)
        try:
            # When A1111 skips the uncond rows it cuts x and sigma but not image_cond; the model reads only the
            # first len(x) rows of it, so cutting here keeps every tensor row-aligned for batching.
            cut = _cut(kwargs, x.shape[0])
            if rec.fast:
                out = self.fast_call(inner, x, sigma, cut)
                rec.calls.append((inner, x, sigma, kwargs))
                return out
            if rec.correct:
                out = self.cond_rows_call(inner, x, sigma, cut)
                rec.calls.append((inner, x, sigma, kwargs))
                return out
            with self.base_weights():
                preds = self.composer.predict(lambda a: inner(a[0], a[1], **a[2]), (x, sigma, cut), rec.step)
        except Exception as exc:  # noqa: BLE001 - host boundary: any failure means plain sampling, not a crash
            log.debug("LoRAtorio step failed", exc_info=True)
            self.fail(f"{type(exc).__name__}: {exc}")
            rec.broken = True
            # The host's own call, outside base_weights(): its layers merge its LoRAs again; our hooks have no
            # routing now, so nothing of LoRAtorio runs in it.
            return inner(x, sigma, **kwargs)
        rec.preds.append(preds)
        rec.calls.append((inner, x, sigma, kwargs))
        return preds[0]

    def fast_call(self, inner: Any, x: Tensor, sigma: Tensor, kwargs: dict) -> Tensor:
        """Speed fast: this call's rows in one pass, each LoRA masked by the last weight map (the host's calls cover
        the step's rows in order, so a running offset finds each call's rows)."""
        rec = self.record
        layout = rec.layout
        total = len(layout.cond_rows) + len(layout.uncond_rows)
        start = rec.rows - x.shape[0]  # model_call counted this call's rows already
        masks = self.composer.row_masks(layout, total)[:, start:start + x.shape[0]]
        with self.base_weights(), self.router.masked(self.composer.masks(masks)):
            return inner(x, sigma, **kwargs)

    def cond_rows_call(self, inner: Any, x: Tensor, sigma: Tensor, kwargs: dict) -> Tensor:
        """A corrected full step (speed fast): base + LoRAs on this call's cond rows (A1111 puts them first); the
        rows it returns are placeholders, as end_step writes every row of the step."""
        rec = self.record
        start = rec.rows - x.shape[0]  # model_call counted this call's rows already
        k = max(0, min(x.shape[0], len(rec.layout.cond_rows) - start))
        if k:
            with self.base_weights():
                rec.preds.append(self.composer.predict(lambda a: inner(a[0], a[1], **a[2]),
                                                       (x[:k], sigma[:k], _cut(kwargs, k)), rec.step))
        return torch.zeros_like(x)

    def end_step(self, x_out: Tensor) -> None:
        """cfg_denoised callback: fuse the recorded predictions into the host's x_out, in place.

        If composing failed at any point of the step, the rows our calls produced are re-run by the host's plain
        call instead, so the step is the host's own.
        """
        rec, self.record = self.record, StepRecord()
        if rec.layout is None or not (rec.preds or rec.fast):
            return
        if self.failed is None and not rec.broken:
            try:
                if rec.fast:
                    self.correct_fast(x_out, rec)  # x_out holds the masked passes' predictions
                    self.accumulate_maps(rec.layout)
                elif rec.correct:
                    self.masked_into(x_out, rec)
                else:
                    self.fuse_into(x_out, rec)
                return
            except Exception as exc:  # noqa: BLE001 - host boundary
                log.debug("LoRAtorio fusion failed", exc_info=True)
                self.fail(f"{type(exc).__name__}: {exc}")
        self.replay(x_out, rec)

    def fuse_into(self, x_out: Tensor, rec: StepRecord) -> None:
        """The step's fusion, written into x_out."""
        preds = torch.cat(rec.preds, dim=1)
        rows = preds.shape[1]
        layout = rec.layout
        if rows == len(layout.cond_rows):  # the host skipped uncond (NGMS / skip early CFG)
            layout = BatchLayout(layout.cond_rows)
        x = sigma = None
        if not self.eps_space:
            x, sigma = rec.x_in[:rows], rec.sigma_in[:rows]
        fused = self.composer.fuse(preds, layout, rec.step, x, sigma)
        x_out[:rows] = fused
        _fill_standins(x_out, rows, layout)
        self.accumulate_maps(rec.layout)

    def _x0_args(self, rec: StepRecord, n: int) -> tuple[Tensor | None, Tensor | None]:
        """(x, sigma) of the first n rows when the denoiser returns x0; (None, None) when it returns ε."""
        return (None, None) if self.eps_space else (rec.x_in[:n], rec.sigma_in[:n])

    def correct_fast(self, x_out: Tensor, rec: StepRecord) -> None:
        """A fast step's cond rows plus the last corrected full step's residual (FastRules.correct)."""
        n = len(rec.layout.cond_rows)
        x_out[:n] = self.composer.corrected(x_out[:n], 0, *self._x0_args(rec, n))
        _fill_standins(x_out, rec.rows, BatchLayout(rec.layout.cond_rows) if rec.rows == n else rec.layout)

    def masked_into(self, x_out: Tensor, rec: StepRecord) -> None:
        """A corrected full step: the fused cond rows (Ω from them), every recorded call's rows by one masked pass
        with that Ω, and the residual ε_fused − ε_masked of the cond rows kept for the fast steps."""
        layout, n = rec.layout, len(rec.layout.cond_rows)
        x, sigma = self._x0_args(rec, n)
        fused = self.composer.fuse(torch.cat(rec.preds, dim=1), BatchLayout(tuple(range(n))), rec.step, x, sigma,
                                   base=True)
        used = layout if rec.rows > n else BatchLayout(layout.cond_rows)  # the host may have skipped the uncond
        masks = self.composer.row_masks(used, rec.rows)
        start = 0
        for inner, cx, cs, kwargs in rec.calls:
            k = cx.shape[0]
            with self.base_weights(), self.router.masked(self.composer.masks(masks[:, start:start + k])):
                x_out[start:start + k] = inner(cx, cs, **_cut(kwargs, k))
            start += k
        self.composer.keep_residual(fused, x_out[:n].clone(), 0, x, sigma)
        x_out[:n] = fused
        _fill_standins(x_out, rec.rows, used)
        self.accumulate_maps(layout)

    def replay(self, x_out: Tensor, rec: StepRecord) -> None:
        """The host's plain calls for the rows our composed calls produced (A1111 fills x_out in call order)."""
        start = 0
        for inner, x, sigma, kwargs in rec.calls:
            x_out[start:start + x.shape[0]] = inner(x, sigma, **kwargs)
            start += x.shape[0]
        if rec.rows == len(rec.layout.cond_rows):  # the host skipped uncond: its stand-ins copy the cond rows
            _fill_standins(x_out, rec.rows, BatchLayout(rec.layout.cond_rows))

    def accumulate_maps(self, layout: BatchLayout) -> None:
        """Running mean of each image's weight map (its first cond row), for the 'show maps' images."""
        w = self.composer.display_weights
        if not self.settings.show_maps or w is None or w.shape[1] != len(layout.cond_rows):
            return
        firsts = [layout.uncond_of_cond.index(j) for j in range(len(layout.uncond_rows))] or [0]
        self.map_sum, self.map_steps = accumulate(self.map_sum, self.map_steps, w[:, firsts, 0].float().cpu())

    def fail(self, reason: str) -> None:
        """Stop composing for the rest of this pass, and say so once (console and infotext)."""
        if self.failed is None:
            self.failed = reason
            self.warn(f"LoRAtorio stopped: {reason}; the rest was sampled normally")


def _cut(kwargs: dict, rows: int) -> dict:
    """The call's tensors cut to its first `rows` rows (A1111 cuts x and sigma but not image_cond when it skips the
    uncond rows; the model reads only the first rows of it)."""
    return tree_map(lambda t: t[:rows] if t.dim() and t.shape[0] > rows else t, kwargs)


def _fill_standins(x_out: Tensor, rows: int, layout: BatchLayout) -> None:
    """When the host skipped the uncond rows it appends stand-ins, copies of each image's first cond row: keep them
    copies of what the cond rows now hold."""
    if rows < x_out.shape[0]:
        first = [layout.cond_rows[layout.uncond_of_cond.index(j)] if layout.uncond_rows else j
                 for j in range(x_out.shape[0] - rows)]
        x_out[rows:] = x_out[first]


def uses_eps(denoiser: Any, base_cls: type) -> bool:
    """Timestep samplers' denoisers return ε and override get_pred_x0; k-diffusion ones return x0 (a1111.md §4)."""
    return type(denoiser).get_pred_x0 is not base_cls.get_pred_x0


# sd-webui-controlnet's model types whose UNet hook only adds residuals (or attention inputs) computed from each row's
# own x, timestep, context and cond/uncond mark (scripts/hook.py, v1.1.455): any batch layout gives every row the same
# control. The others cache latents at the first call's batch size (reference, inpaint) or index rows by position.
ROW_WISE_CONTROL = frozenset({"ControlNet", "ControlLoRA", "ControlNetUnion", "T2I_Adapter", "T2I_StyleAdapter",
                              "IPAdapter"})


def _own_forward(unet: nn.Module, forward: Any) -> bool:
    return getattr(forward, "__func__", None) is type(unet).forward and getattr(forward, "__self__", None) is unet


def unet_is_wrapped(unet: nn.Module) -> bool:
    """Another extension (ControlNet, …) replaced this UNet's forward: it may assume the host's batch layout.

    A forward that is the class's own, bound to this module, is not a wrapper: sd-webui-controlnet "restores" the
    UNet by assigning the saved bound method, which stays in the instance dict for every later generation.
    """
    forward = vars(unet).get("forward")
    return forward is not None and not _own_forward(unet, forward)


def controlnet_takes_any_batch(p: Any, unet: nn.Module) -> bool:
    """Whether the only wrapper of the UNet is sd-webui-controlnet's and all its units work row by row.

    Its hook (the script's `latest_network`, a UnetHook) computes each row's control from that row alone, so
    LoRAtorio's one call of (N+1)·B rows gives every row, base and LoRAs, the same hint as the host's own call.
    """
    forward = vars(unet).get("forward")
    if getattr(getattr(forward, "__func__", None), "__name__", None) != "forward_webui":
        return False
    if not _own_forward(unet, getattr(unet, "_original_forward", None)):
        return False  # another wrapper underneath ControlNet's
    for script in getattr(getattr(p, "scripts", None), "alwayson_scripts", None) or []:
        hook = getattr(script, "latest_network", None)
        if hook is None or getattr(hook, "model", None) is not unet:
            continue
        batch_options = getattr(script, "ui_batch_option_state", None) or ["", False]
        # "Each ControlNet unit for each image in a batch" and style align pick rows by their position.
        if str(batch_options[0]).startswith("Each") or batch_options[1]:
            return False
        return all(_row_wise(param) for param in hook.control_params or [])
    return False


def _row_wise(param: Any) -> bool:
    kind = getattr(getattr(param, "control_model_type", None), "name", None)
    hints = [getattr(param, "hint_cond", None), getattr(param, "hr_hint_cond", None)]
    # One hint image broadcasts over any number of rows; a hint per image would not line up with repeated rows.
    return kind in ROW_WISE_CONTROL and all(not isinstance(h, Tensor) or h.shape[0] == 1 for h in hints)


def batched_evaluation(p: Any, settings: Settings, unet: nn.Module) -> bool:
    """evaluation=auto: one batched call unless a UNet wrapper that needs the host's batch shape is in place."""
    if settings.evaluation != "auto":
        return settings.evaluation == "batched"
    return not unet_is_wrapped(unet) or controlnet_takes_any_batch(p, unet)


def memory_budget(unet: nn.Module, sd_model: Any, device: torch.device | None = None) -> MemoryBudget:
    """CUDA: free memory (the driver's free plus torch's cached free blocks) against the calibrated estimate.

    Elsewhere there is no device budget (CPU: the model shares RAM with everything else; MPS: unified memory), and
    only the out-of-memory retry applies.
    """
    param = next(unet.parameters(), None)
    device = device or (param.device if param is not None else torch.device("cpu"))
    dtype = param.dtype if param is not None and param.element_size() >= 2 else torch.float16  # fp8: fp16 compute
    peak = activation_peak(VALUES_PER_PIXEL["sdxl" if getattr(sd_model, "is_sdxl", False) else "sd15"], dtype)
    if device.type == "cuda":
        def free() -> int:
            return (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
                    - torch.cuda.memory_allocated(device))

        return MemoryBudget(free, peak, torch.cuda.empty_cache)
    release = torch.mps.empty_cache if device.type == "mps" else lambda: None
    return MemoryBudget(lambda: None, peak, release)


def install(p: Any, settings: Settings, *, sd_model: Any, networks_module: Any, base_denoiser_cls: type,
            warn: Any, device: torch.device | None = None) -> GenerationState | None:
    """Take over this sampling pass, or return None (with a warning) when LoRAtorio cannot or need not run."""
    networks = [n for n in networks_module.loaded_networks if n.unet_multiplier != 0]
    global_networks, networks, missing = settings.split_globals(networks, lambda n: (n.name, n.mentioned_name))
    if missing:
        warn(f"LoRAtorio: global LoRA(s) {', '.join(missing)} not among the prompt's LoRAs; ignored")
    if len(networks) < 2:
        also = f" besides {len(global_networks)} global" if global_networks else ""
        warn(f"LoRAtorio needs 2 or more LoRAs in the prompt with a UNet weight{also}; found {len(networks)}, "
             "sampled normally")
        return None
    if getattr(sd_model, "cond_stage_key", None) == "edit":
        warn("LoRAtorio does not support InstructPix2Pix (edit) models; sampled normally")
        return None
    denoiser = p.sampler.model_wrap_cfg
    unet = sd_model.model.diffusion_model
    names = [n.name for n in networks]
    try:
        tables = unet_adapters(networks, sd_model)
        empty = [n for n, t in zip(names, tables, strict=True) if not t]
        if empty:
            raise Declined(f"{', '.join(empty)} change no UNet layer of this model")
        dry_run(unet, tables, names)
    except (Declined, ValueError) as exc:
        warn(f"LoRAtorio: {exc}; sampled normally")
        return None
    tables = inject_fault(tables, names)
    batched = batched_evaluation(p, settings, unet)
    router = MultiAdapter(unet, tables)
    composer = Composer(router, settings, batched=batched, budget=memory_budget(unet, sd_model, device))
    state = GenerationState(settings, networks_module, router, composer, uses_eps(denoiser, base_denoiser_cls),
                            networks, global_networks, denoiser=denoiser, warn=warn)
    state.original_wrap = denoiser.inner_model
    try:
        router.install()
        denoiser.model_wrap = RoutedInnerModel(state.original_wrap, state)
        # Kept so that a model swap mid-pass (the refiner drops model_wrap) can still be noticed and reported.
        denoiser.loratorio_state = state
    except BaseException:
        remove(state)
        raise
    log.info("LoRAtorio: %d LoRAs composed, %d global, mode %s, %s evaluation, speed %s", len(networks),
             len(global_networks), settings.mode, "batched" if batched else "sequential", settings.speed)
    return state


def remove(state: GenerationState | None) -> None:
    """Undo `install`: the denoiser's inner model and the UNet's hooks are as before; safe to call twice."""
    if state is None:
        return
    state.router.remove()
    denoiser = state.denoiser
    if denoiser is not None:
        if isinstance(getattr(denoiser, "model_wrap", None), RoutedInnerModel):
            denoiser.model_wrap = state.original_wrap
        if getattr(denoiser, "loratorio_state", None) is state:
            del denoiser.loratorio_state
    state.record = StepRecord()


def state_of(inner_model: Any) -> GenerationState | None:
    """The LoRAtorio state behind a denoiser's inner model, if this pass is ours."""
    return inner_model.state if isinstance(inner_model, RoutedInnerModel) else None


def on_cfg_denoiser(params: Any) -> None:
    """script_callbacks.on_cfg_denoiser: record the layout of this step's batch."""
    denoiser = params.denoiser
    state = state_of(getattr(denoiser, "model_wrap", None))
    if state is None:
        orphan = getattr(denoiser, "loratorio_state", None)
        if orphan is not None:
            orphan.fail(f"the model was swapped at step {denoiser.step} (refiner); LoRAtorio composed the steps "
                        "before it")
        return
    text_cond = params.text_cond
    n_cond = (text_cond["crossattn"] if isinstance(text_cond, dict) else text_cond).shape[0]
    text_uncond = params.text_uncond
    n_images = (text_uncond["crossattn"] if isinstance(text_uncond, dict) else text_uncond).shape[0]
    state.begin_step(params.x, params.sigma, n_cond, n_images, denoiser.step, denoiser.total_steps or 0)


def on_cfg_denoised(params: Any) -> None:
    """script_callbacks.on_cfg_denoised: fuse this step in place (the host ignores a reassigned params.x)."""
    state = state_of(params.inner_model)
    if state is not None:
        state.end_step(params.x)
