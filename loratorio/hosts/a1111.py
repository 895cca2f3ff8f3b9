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
from typing import Any

import torch
from torch import Tensor, nn

from loratorio.core import (
    Adapter,
    BatchLayout,
    Callback,
    Composer,
    Dense,
    LowRank,
    MultiAdapter,
    Settings,
    in_window,
    tree_map,
)
from loratorio.maps import accumulate

log = logging.getLogger(__name__)

UNET_PREFIX = "diffusion_model_"


class Declined(Exception):
    """LoRAtorio cannot run this generation; the message says why, and sampling goes on normally."""


def module_adapter(nm: Any, layer: nn.Module) -> Adapter:
    """One host NetworkModule as an adapter: its low-rank factors where it has them, else its ΔW, else its forward."""
    plain_lora = (getattr(nm, "up_model", None) is not None and getattr(nm, "down_model", None) is not None
                  and getattr(nm.network, "dyn_dim", None) is None and getattr(nm, "dora_scale", None) is None
                  and getattr(nm, "bias", None) is None)
    if plain_lora and isinstance(layer, (nn.Linear, nn.Conv2d)):
        mid = nm.mid_model.weight if getattr(nm, "mid_model", None) is not None else None
        # The host's scale is multiplier · calc_scale(); LowRank with alpha=None multiplies by exactly that.
        return LowRank(nm.down_model.weight.detach(), nm.up_model.weight.detach(), None,
                       None if mid is None else mid.detach(), nm.multiplier() * nm.calc_scale())
    if isinstance(layer, (nn.Linear, nn.Conv2d)):
        # LoHa, LoKr, full, DoRA…: ΔW once per generation, against the base weight (the backup if merged now).
        weight = getattr(layer, "network_weights_backup", None)
        weight = layer.weight if weight is None or isinstance(weight, tuple) else weight
        with torch.no_grad():
            updown, ex_bias = nm.calc_updown(weight.to(layer.weight.device))
        return Dense(updown.detach(), None if ex_bias is None else ex_bias.detach())
    # Norm layers and anything else: the module's own delta forward, y + f(x).
    return Callback(nm.forward)


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
        raise ValueError(self.message)


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
            self.record = StepRecord(cond_layout(x_in, n_cond, n_images), x_in, sigma_in, step)
        except Declined as exc:
            self.fail(str(exc))

    def model_call(self, inner: Any, x: Tensor, sigma: Tensor, kwargs: dict) -> Tensor:
        """One host model call: base + LoRAs on these rows, recorded; the host's plain call when not composing."""
        rec = self.record
        if rec.layout is None or self.failed is not None:
            return inner(x, sigma, **kwargs)
        try:
            # When A1111 skips the uncond rows it cuts x and sigma but not image_cond; the model reads only the
            # first len(x) rows of it, so cutting here keeps every tensor row-aligned for batching.
            kwargs = tree_map(lambda t: t[: x.shape[0]] if t.dim() and t.shape[0] > x.shape[0] else t, kwargs)
            with self.base_weights():
                preds = self.composer.predict(lambda a: inner(a[0], a[1], **a[2]), (x, sigma, kwargs), rec.step)
        except Exception as exc:  # noqa: BLE001 - host boundary: any failure means plain sampling, not a crash
            log.debug("LoRAtorio step failed", exc_info=True)
            self.fail(f"{type(exc).__name__}: {exc}")
            return inner(x, sigma, **kwargs)
        rec.preds.append(preds)
        return preds[0]

    def end_step(self, x_out: Tensor) -> None:
        """cfg_denoised callback: fuse the recorded predictions into the host's x_out, in place."""
        rec, self.record = self.record, StepRecord()
        if rec.layout is None or self.failed is not None or not rec.preds:
            return
        try:
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
            if rows < x_out.shape[0]:
                # The host's stand-in uncond rows are copies of each image's first cond row: keep them so.
                first = [layout.cond_rows[layout.uncond_of_cond.index(j)] if layout.uncond_rows else j
                         for j in range(x_out.shape[0] - rows)]
                x_out[rows:] = fused[first]
            self.accumulate_maps(rec.layout)
        except Exception as exc:  # noqa: BLE001 - host boundary
            log.debug("LoRAtorio fusion failed", exc_info=True)
            self.fail(f"{type(exc).__name__}: {exc}")

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
        self.record = StepRecord()


def uses_eps(denoiser: Any, base_cls: type) -> bool:
    """Timestep samplers' denoisers return ε and override get_pred_x0; k-diffusion ones return x0 (a1111.md §4)."""
    return type(denoiser).get_pred_x0 is not base_cls.get_pred_x0


def unet_is_wrapped(unet: nn.Module) -> bool:
    """Another extension (ControlNet, …) replaced this UNet's forward: it may assume the host's batch layout."""
    return "forward" in vars(unet)


def install(p: Any, settings: Settings, *, sd_model: Any, networks_module: Any, base_denoiser_cls: type,
            warn: Any) -> GenerationState | None:
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
    tables = unet_adapters(networks, sd_model)
    empty = [n.name for n, t in zip(networks, tables, strict=True) if not t]
    if empty:
        warn(f"LoRAtorio: {', '.join(empty)} change no UNet layer of this model; sampled normally")
        return None
    batched = settings.evaluation == "batched" or (settings.evaluation == "auto" and not unet_is_wrapped(unet))
    router = MultiAdapter(unet, tables)
    state = GenerationState(settings, networks_module, router, Composer(router, settings, batched=batched),
                            uses_eps(denoiser, base_denoiser_cls), networks, global_networks, denoiser=denoiser,
                            warn=warn)
    state.original_wrap = denoiser.inner_model
    try:
        router.install()
        denoiser.model_wrap = RoutedInnerModel(state.original_wrap, state)
        # Kept so that a model swap mid-pass (the refiner drops model_wrap) can still be noticed and reported.
        denoiser.loratorio_state = state
    except BaseException:
        remove(state)
        raise
    log.info("LoRAtorio: %d LoRAs composed, %d global, mode %s, %s evaluation", len(networks),
             len(global_networks), settings.mode, "batched" if batched else "sequential")
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
