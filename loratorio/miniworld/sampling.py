"""Sampling the miniature with every composition method, through the same `Composer` engine the WebUI hosts use.

A host-style CFG denoiser builds the [cond, uncond] batch and hands the engine its x0 model; DPM-Solver++(2M) then
steps on the guided x0, so every method sees the same noise, steps and guidance.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from loratorio.core import (
    BatchLayout,
    Composer,
    FastRules,
    LowRank,
    MultiAdapter,
    Settings,
    evaluate,
    merged_weight,
    to_eps,
)
from loratorio.core.fusion import divergence_spread as core_spread
from loratorio.miniworld.bundle import Miniature
from loratorio.miniworld.model import LATENT, Denoiser, UNet, decode_latent, karras_sigmas, tokenize
from loratorio.miniworld.world import SKILL_TOKENS

METHODS = ("base", "merge", "switch", "composite", "loratorio", "loratorio_fast", "loratorio_dynamic", "merge_all")


@dataclass(frozen=True)
class SampleConfig:
    """Sampler settings shared by every method (ComposLoRA fixes steps, CFG and seeds the same way)."""

    steps: int = 16
    cfg: float = 4.5
    # Patch 2 of a 16-px latent is the fraction of the side (1/8) that SD1.5's patch 8 is of its 64-px latent;
    # a switch every step matches ComposLoRA's 5 of 200 steps better than 5 of our 16.
    settings: Settings = field(default_factory=lambda: Settings(enabled=True, patch_size=2, switch_interval=1))
    fast_rules: FastRules = FastRules()  # loratorio_fast: settings.full_every sets its interval


def noise(seeds: Sequence[int], sigma_max: float) -> Tensor:
    """Initial latents, one generator per seed, so an image's noise never depends on its batch."""
    return torch.stack([torch.randn(*LATENT, generator=torch.Generator().manual_seed(s)) for s in seeds]) * sigma_max


def dpmpp_2m(denoise: Callable[[Tensor, Tensor, int], Tensor], x: Tensor, sigmas: Tensor) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), as k-diffusion's sample_dpmpp_2m."""
    old = None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, s.repeat(x.shape[0]), i)
        if s_next == 0:
            x = denoised
            break
        h = s.log() - s_next.log()
        d = denoised
        if old is not None:
            r = (sigmas[i - 1].log() - s.log()) / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
        x = (s_next / s) * x - (-h).expm1() * d
        old = denoised  # the raw prediction, as k-diffusion keeps it, not the extrapolated one
    return x


def merged_unet(unet: UNet, loras: Sequence[dict[str, LowRank]]) -> UNet:
    """A copy of the UNet with every LoRA's ΔW summed into its weights: the host's own multi-LoRA behaviour."""
    model = copy.deepcopy(unet)
    with torch.no_grad():
        for lora in loras:
            for name, adapter in lora.items():
                layer = model.get_submodule(name)
                layer.weight += merged_weight(layer, adapter)
    return model


def scaled(lora: dict[str, LowRank], multiplier: float) -> dict[str, LowRank]:
    """The LoRA at another strength, as `<lora:name:multiplier>` sets it (same factors, scale × multiplier)."""
    if multiplier == 1.0:
        return lora
    return {k: LowRank(a.down, a.up, a.alpha, a.mid, multiplier=a.multiplier * multiplier) for k, a in lora.items()}


def global_names(settings: Settings, skills: Sequence[str]) -> list[str]:
    """The prompt's LoRAs that `global_loras` names (a name not in the prompt is ignored, as the hosts do)."""
    return [s for s in skills if s in settings.global_list()]


@torch.no_grad()
def divergence_spread(mini: Miniature, skills: Sequence[str], seeds: Sequence[int],
                      config: SampleConfig = SampleConfig(), multiplier: float = 1.0) -> dict[str, float]:
    """Per LoRA, what `auto_global` reads at the first step: the spread (std/mean over patches) of its divergence
    from the base, averaged over the images; low for a LoRA that changes the whole image alike (a style)."""
    b = len(seeds)
    ctx = mini.text_encoder(tokenize([mini.prompt(skills)] * b, mini.vocab))
    sigma = karras_sigmas(config.steps)[0].repeat(b)
    x = noise(seeds, float(sigma[0]))
    with MultiAdapter(mini.unet, [scaled(mini.loras[s], multiplier) for s in skills]) as router:
        preds = evaluate(lambda a: mini.denoiser(*a), (x, sigma, ctx), router)
    eps = to_eps(x, preds, sigma)
    spread = core_spread(eps[1:], eps[0], config.settings.patch_size)
    return {s: float(c) for s, c in zip(skills, spread, strict=True)}


@torch.no_grad()
def sample(mini: Miniature, skills: Sequence[str], method: str, seeds: Sequence[int],
           config: SampleConfig = SampleConfig(), multiplier: float = 1.0,
           info: dict | None = None) -> tuple[Tensor, Tensor | None]:
    """Images (B, 3, 32, 32) for the prompt listing `skills`, and LoRAtorio's step-averaged Ω (N, B, 1, 16, 16).

    multiplier: every LoRA's strength. LoRAs named in the settings' `global_loras` are merged into the model for
    every row and leave the composition; with fewer than two left, every LoRA is merged (as on the hosts).
    Ω's rows are the composed LoRAs'; one made global by `auto_global` shows 1 everywhere after the first step.
    info: if given, receives "loras" (Ω's rows) and "composed" (those that competed per patch to the end).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    b = len(seeds)
    ctx = mini.text_encoder(tokenize([mini.prompt(skills)] * b + [[]] * b, mini.vocab))
    sigmas = karras_sigmas(config.steps)
    x = noise(seeds, float(sigmas[0]))
    maps: list[Tensor] = []
    lora = {s: scaled(mini.loras[s], multiplier) for s in SKILL_TOKENS}
    names = list(SKILL_TOKENS) if method == "loratorio_dynamic" else list(skills)
    glob = global_names(config.settings, names) if method not in ("base", "merge", "merge_all") else []
    names = [s for s in names if s not in glob]
    if method in ("base", "merge", "merge_all") or len(names) < 2:
        pool = {"base": [], "merge": [lora[s] for s in skills],
                "merge_all": [lora[s] for s in SKILL_TOKENS]}.get(method, [lora[s] for s in glob + names])
        den = Denoiser(merged_unet(mini.unet, pool)) if pool else mini.denoiser

        def model(xin: Tensor, sin: Tensor, _step: int) -> Tensor:
            return den(xin, sin, ctx)
        return decode_latent(_run(model, x, sigmas, config.cfg)), None
    mode = "loratorio" if method.startswith("loratorio") else method
    top_k = len(skills) - len(glob) if method == "loratorio_dynamic" else 0
    speed = "fast" if method == "loratorio_fast" else "full"
    settings = Settings(**{**config.settings.to_dict(), "enabled": True, "mode": mode, "top_k": top_k, "speed": speed})
    unet = merged_unet(mini.unet, [lora[s] for s in glob]) if glob else mini.unet
    den = Denoiser(unet)
    layout = BatchLayout.cond_then_uncond(b)
    with MultiAdapter(unet, [lora[s] for s in names]) as router:
        composer = Composer(router, settings, fast_rules=config.fast_rules)
        composer.total_steps = config.steps

        def model(xin: Tensor, sin: Tensor, step: int) -> Tensor:
            out = composer(lambda a: den(*a), (xin, sin, ctx), layout, step, xin, sin)
            if mode == "loratorio":
                maps.append(composer.display_weights)
            return out
        images = decode_latent(_run(model, x, sigmas, config.cfg))
    if info is not None:
        info["loras"], info["composed"] = names, [names[i] for i in composer.composed]
    return images, (torch.stack(maps).mean(0) if maps else None)


def _run(model: Callable[[Tensor, Tensor, int], Tensor], x: Tensor, sigmas: Tensor, cfg: float) -> Tensor:
    def denoise(x: Tensor, sigma: Tensor, step: int) -> Tensor:
        out = model(torch.cat([x, x]), torch.cat([sigma, sigma]), step)
        cond, uncond = out.chunk(2)
        return uncond + cfg * (cond - uncond)
    return dpmpp_2m(denoise, x, sigmas)
