"""Training the miniature from scratch: base model on generic content, one LoRA per skill, the judge.

Every phase seeds its own generators, so one command with the same seed gives the same weights (up to the CPU's
thread-dependent float summation order).
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loratorio.core import LowRank, MultiAdapter
from loratorio.miniworld.bundle import (
    WEIGHTS,
    judge_classes,
    load_base,
    regime_dir,
    save_base,
    save_judge,
    save_lora,
)
from loratorio.miniworld.judge import Judge
from loratorio.miniworld.model import SIGMA_DATA, Denoiser, TextEncoder, UNet, encode_image, lora_targets, tokenize
from loratorio.miniworld.world import (
    CATEGORIES,
    HYBRIDS,
    SKILL_TOKENS,
    STRONG_CATEGORIES,
    VOCAB,
    VOCAB_STRONG,
    Attributes,
    Scene,
    caption,
    caption_scene,
    render_batch,
    render_scenes,
)

log = logging.getLogger(__name__)


REGIMES = ("weak", "strong")


@dataclass(frozen=True)
class TrainConfig:
    """Step counts and sizes; the defaults (the weak regime) finish in about a quarter of an hour on 2 CPU cores.

    regime "strong" trains another world: one- and two-figure scenes (`two_figures` of the base's and each LoRA's
    images have two figures), a judge of character presence, and LoRAs trained as users train theirs (see STRONG).
    """

    seed: int = 0
    base_steps: int = 1500
    base_images: int = 6000
    lora_steps: int = 300
    lora_images: int = 1200
    lora_rank: int = 4
    judge_steps: int = 1000
    judge_images: int = 6000
    batch: int = 48
    caption_dropout: float = 0.1
    regime: str = "weak"
    two_figures: float = 0.0
    # Character LoRAs' two-figure scenes: the character twice (False), or beside a generic figure on either side
    # (True), as users' character LoRAs learn from pictures shared with other people.
    shared_scenes: bool = False
    lora_lr: float = 2e-3
    lora_dtype: str = "float32"
    lora_batch: int = 48
    judge_blur: bool = False

    def __post_init__(self) -> None:
        if self.regime not in REGIMES:
            raise ValueError(f"regime must be one of {REGIMES}, got {self.regime!r}")
        if self.lora_dtype not in ("float32", "float16"):
            raise ValueError(f"lora_dtype must be float32 or float16, got {self.lora_dtype!r}")

    @property
    def vocab(self) -> tuple[str, ...]:
        return VOCAB if self.regime == "weak" else VOCAB_STRONG


# Strong LoRAs: 4× the rank, 4× the steps (1200 of 32 images against 300 of 48) at 1.5× the learning rate, on twice
# the images; saved in fp16 as most published LoRAs are. Its judge also learns on blurred renders, as the miniature
# model's samples are blurry (600 steps gave LoRAs whose ghost and scarf the judge missed most of the time).
STRONG = TrainConfig(regime="strong", base_steps=2000, base_images=8000, lora_steps=1200, lora_images=2400,
                     lora_rank=16, judge_steps=1500, judge_images=10000, two_figures=0.4, lora_lr=3e-3,
                     lora_dtype="float16", lora_batch=32, judge_blur=True)
PRESETS = {"weak": TrainConfig(), "strong": STRONG}


def _pool(attrs: list[Attributes], seed0: int, rng: random.Random) -> tuple[Tensor, list[list[str]]]:
    seeds = [seed0 + i for i in range(len(attrs))]
    return encode_image(render_batch(attrs, seeds)), [caption(a, s, rng) for a, s in zip(attrs, seeds, strict=True)]


def _scene_pool(scenes: list[Scene], seed0: int, rng: random.Random) -> tuple[Tensor, list[list[str]]]:
    seeds = [seed0 + i for i in range(len(scenes))]
    return encode_image(render_scenes(scenes, seeds)), [caption_scene(c, s, rng) for c, s in
                                                         zip(scenes, seeds, strict=True)]


def _training_scenes(cfg: TrainConfig, skill: str | None, count: int, rng: random.Random) -> list[Scene]:
    """A skill's scenes (everything else generic); `two_figures` of them have two figures, both showing the skill.

    A character LoRA thus learns to turn every figure into its character, as real character LoRAs do. With
    `shared_scenes` a character's two-figure scenes show it beside a generic figure instead.
    """
    one = Scene.from_skills([skill] if skill else [])
    out = []
    for _ in range(count):
        figures = one.figures
        if rng.random() < cfg.two_figures:
            kind = one.figures[0]
            if cfg.shared_scenes and kind:
                figures = (kind, 0) if rng.random() < 0.5 else (0, kind)
            else:
                figures = one.figures * 2
        out.append(Scene(figures, one.clothing, one.style, one.background))
    return out


def _edm_loss(den: Denoiser, x0: Tensor, ctx: Tensor, gen: torch.Generator) -> Tensor:
    """EDM's weighted denoising loss with log-normal σ (Karras et al. 2022, P_mean −1.2, P_std 1.2)."""
    sigma = (torch.randn(x0.shape[0], generator=gen) * 1.2 - 1.2).exp()
    noisy = x0 + torch.randn(x0.shape, generator=gen) * sigma.view(-1, 1, 1, 1)
    weight = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
    return (weight.view(-1, 1, 1, 1) * (den(noisy, sigma, ctx) - x0) ** 2).mean()


def _batches(n: int, batch: int, gen: torch.Generator, steps: int):
    for _ in range(steps):
        yield torch.randint(0, n, (batch,), generator=gen)


def _captions(caps: list[list[str]], idx: Tensor, dropout: float, gen: torch.Generator,
              vocab: tuple[str, ...] = VOCAB) -> Tensor:
    # Caption dropout trains the empty prompt as the unconditional branch that CFG needs.
    drop = torch.rand(len(idx), generator=gen) < dropout
    return tokenize([[] if d else caps[i] for i, d in zip(idx.tolist(), drop.tolist(), strict=True)], vocab)


def _lr(step: int, steps: int, peak: float) -> float:
    """Short linear warm-up, then cosine decay."""
    warm = max(1, steps // 20)
    return peak * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / steps))


def train_base(cfg: TrainConfig) -> tuple[TextEncoder, UNet]:
    """Text encoder + UNet on generic content only (no skill ever appears, nor any trigger)."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.regime == "weak":
        x0, caps = _pool([Attributes()] * cfg.base_images, 10_000_000, random.Random(cfg.seed))
    else:
        rng = random.Random(cfg.seed)
        x0, caps = _scene_pool(_training_scenes(cfg, None, cfg.base_images, rng), 10_000_000, rng)
    te, unet = TextEncoder(vocab_size=len(cfg.vocab)), UNet()
    ema = copy.deepcopy(nn.ModuleList([te, unet])).requires_grad_(False)
    den = Denoiser(unet)
    params = [*te.parameters(), *unet.parameters()]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    for step, idx in enumerate(_batches(len(x0), cfg.batch, gen, cfg.base_steps)):
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg.base_steps, 2e-3)
        loss = _edm_loss(den, x0[idx], te(_captions(caps, idx, cfg.caption_dropout, gen, cfg.vocab)), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():  # EMA: short runs gain most from weight averaging
            decay = min(0.995, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), params, strict=True):
                e.lerp_(p, 1 - decay)
        if step % 250 == 0:
            log.info("base step %d/%d loss %.4f", step, cfg.base_steps, loss.item())
    te_ema, unet_ema = ema
    return te_ema.eval(), unet_ema.eval()


def train_lora(cfg: TrainConfig, te: TextEncoder, unet: UNet, skill: str, index: int) -> dict[str, LowRank]:
    """One skill's LoRA on the frozen base: images with that skill (everything else generic), trigger in caption."""
    seed = cfg.seed + 1000 * (index + 1)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if cfg.regime == "weak":
        x0, caps = _pool([Attributes.from_skills([skill])] * cfg.lora_images, 20_000_000 + 100_000 * index,
                         random.Random(seed))
    else:
        rng = random.Random(seed)
        x0, caps = _scene_pool(_training_scenes(cfg, skill, cfg.lora_images, rng), 20_000_000 + 100_000 * index, rng)
    te.requires_grad_(False)
    unet.requires_grad_(False)
    adapters = {}
    for name in lora_targets(unet):
        layer = unet.get_submodule(name)
        fan_in = layer.weight[0].numel()
        kernel = layer.weight.shape[2:]
        down = torch.randn(cfg.lora_rank, layer.weight.shape[1], *kernel, generator=gen) / math.sqrt(fan_in)
        up = torch.zeros(layer.weight.shape[0], cfg.lora_rank, *([1, 1] if kernel else []))
        adapters[name] = LowRank(down.requires_grad_(), up.requires_grad_(), alpha=float(cfg.lora_rank))
    params = [t for a in adapters.values() for t in (a.down, a.up)]
    opt = torch.optim.AdamW(params, lr=cfg.lora_lr, weight_decay=0.0)
    den = Denoiser(unet)
    # Training goes through MultiAdapter with every row routed to the one adapter: the code path inference uses.
    with MultiAdapter(unet, [adapters]) as router:
        for step, idx in enumerate(_batches(len(x0), cfg.lora_batch, gen, cfg.lora_steps)):
            for g in opt.param_groups:
                g["lr"] = _lr(step, cfg.lora_steps, cfg.lora_lr)
            ctx = te(_captions(caps, idx, cfg.caption_dropout, gen, cfg.vocab))
            with router.routed([0] * len(idx)):
                loss = _edm_loss(den, x0[idx], ctx, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    log.info("lora %s final loss %.4f", skill, loss.item())
    return {k: LowRank(a.down.detach().clone(), a.up.detach().clone(), a.alpha) for k, a in adapters.items()}


def random_attributes(n: int, rng: random.Random) -> list[Attributes]:
    """Every slot uniform over generic/none and its two skills: the judge sees all combinations."""
    return [Attributes(*(rng.randrange(3) for _ in CATEGORIES)) for _ in range(n)]


def random_scenes(n: int, rng: random.Random) -> list[Scene]:
    """One or two figures, each generic, knight, ghost or (one in five) a hybrid; every slot uniform."""
    def kind() -> int:
        return 3 + rng.randrange(len(HYBRIDS)) if rng.random() < 0.2 else rng.randrange(3)
    return [Scene(tuple(kind() for _ in range(rng.randint(1, 2))), *(rng.randrange(3) for _ in range(3)))
            for _ in range(n)]


def _judge_data(cfg: TrainConfig, n: int, rng: random.Random, seed0: int) -> tuple[Tensor, Tensor]:
    seeds = [seed0 + i for i in range(n)]
    if cfg.regime == "weak":
        attrs = random_attributes(n, rng)
        return render_batch(attrs, seeds), torch.tensor([a.as_tuple() for a in attrs])
    scenes = random_scenes(n, rng)
    return render_scenes(scenes, seeds), torch.tensor([s.labels() for s in scenes])


def _blur(img: Tensor) -> Tensor:
    """A 3×3 binomial blur per channel, edges replicated."""
    k = torch.tensor([1.0, 2.0, 1.0])
    kernel = (k[:, None] * k[None, :] / 16).expand(img.shape[1], 1, 3, 3)
    return F.conv2d(F.pad(img, (1, 1, 1, 1), mode="replicate"), kernel, groups=img.shape[1])


def train_judge(cfg: TrainConfig) -> tuple[Judge, dict[str, float]]:
    """The judge on ground-truth renders (light noise augmentation for robustness); returns held-out accuracy."""
    torch.manual_seed(cfg.seed + 7)
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    rng = random.Random(cfg.seed + 7)
    imgs, labels = _judge_data(cfg, cfg.judge_images, rng, 30_000_000)
    judge = Judge(classes=judge_classes(cfg.regime))
    opt = torch.optim.AdamW(judge.parameters(), lr=3e-3, weight_decay=1e-4)
    for step, idx in enumerate(_batches(len(imgs), 96, gen, cfg.judge_steps)):
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg.judge_steps, 3e-3)
        noise_std = torch.rand(len(idx), 1, 1, 1, generator=gen) * (0.15 if cfg.judge_blur else 0.1)
        x = imgs[idx]
        if cfg.judge_blur:
            amount = torch.rand(len(idx), 1, 1, 1, generator=gen)
            x = torch.lerp(x, _blur(x), amount)
        x = x + torch.randn(x.shape, generator=gen) * noise_std
        loss = F.cross_entropy(judge(x.clamp(0, 1)).flatten(0, 1), labels[idx].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    judge.eval()
    test, truth = _judge_data(cfg, 1000, random.Random(cfg.seed + 8), 40_000_000)
    with torch.no_grad():
        pred = judge(test).argmax(-1)
    cats = CATEGORIES if cfg.regime == "weak" else STRONG_CATEGORIES
    acc = {c: float((pred[:, i] == truth[:, i]).float().mean()) for i, c in enumerate(cats)}
    log.info("judge held-out accuracy %s", acc)
    return judge, acc


PHASES = ("base", "loras", "judge")


def train_all(cfg: TrainConfig = TrainConfig(), out: Path | None = None, phases: tuple[str, ...] = PHASES,
              skills: tuple[str, ...] = SKILL_TOKENS) -> dict[str, float]:
    """Base, then the eight LoRAs, then the judge; writes safetensors under `out`; returns seconds per phase.

    phases: a subset retrains only those parts; LoRAs need `out`'s base when "base" is left out. Each phase seeds
    itself, so a subset gives the same files as the full run.
    """
    out = regime_dir(cfg.regime, WEIGHTS) if out is None else out
    unknown = set(phases) - set(PHASES)
    if unknown:
        raise ValueError(f"unknown phases {sorted(unknown)}; choose from {PHASES}")
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    if "base" in phases:
        t = time.perf_counter()
        te, unet = train_base(cfg)
        save_base(out / "base.safetensors", te, unet)
        times["base"] = time.perf_counter() - t
    if "loras" in phases:
        t = time.perf_counter()
        if "base" not in phases:
            te, unet = load_base(out / "base.safetensors", len(cfg.vocab))
        for i, skill in enumerate(SKILL_TOKENS):
            if skill in skills:
                lora = train_lora(cfg, te, unet, skill, i)
                save_lora(out / f"lora_{skill}.safetensors", lora, skill, getattr(torch, cfg.lora_dtype))
        times["loras"] = time.perf_counter() - t
    if "judge" in phases:
        t = time.perf_counter()
        judge, acc = train_judge(cfg)
        save_judge(out / "judge.safetensors", judge)
        times["judge"] = time.perf_counter() - t
        times.update({f"judge_acc_{k}": v for k, v in acc.items()})
    return times
