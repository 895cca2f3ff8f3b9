"""Loading and saving the bundled miniature: base model, one kohya-format LoRA per skill, and the judge."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from loratorio.core import LowRank, adapters_for_model, to_state_dict
from loratorio.miniworld.judge import Judge
from loratorio.miniworld.model import Denoiser, TextEncoder, UNet
from loratorio.miniworld.world import SKILL_TOKENS, VOCAB, VOCAB_STRONG, Attributes, Scene

WEIGHTS = Path(__file__).parent / "weights"


def regime_dir(regime: str, weights: Path = WEIGHTS) -> Path:
    """Where a regime's files live: the weak regime (the original miniature) at the top, the strong one below it."""
    if regime not in ("weak", "strong"):
        raise ValueError(f"regime must be weak or strong, got {regime!r}")
    return weights if regime == "weak" else weights / "strong"


def judge_classes(regime: str) -> tuple[int, ...]:
    """Values per judged category: 3 per slot; the strong regime's two characters are present or absent."""
    return (3, 3, 3, 3) if regime == "weak" else (2, 2, 3, 3, 3)


@dataclass
class Miniature:
    """Everything the benchmark and the demo need, in eval mode on the CPU."""

    text_encoder: TextEncoder
    unet: UNet
    loras: dict[str, dict[str, LowRank]]
    judge: Judge
    regime: str = "weak"

    @property
    def denoiser(self) -> Denoiser:
        return Denoiser(self.unet)

    @property
    def vocab(self) -> tuple[str, ...]:
        return VOCAB if self.regime == "weak" else VOCAB_STRONG

    def request(self, skills: Sequence[str]) -> Attributes | Scene:
        """What the judge should find for a prompt listing `skills` (two characters: a two-figure scene)."""
        return Attributes.from_skills(skills) if self.regime == "weak" else Scene.from_skills(skills)

    def prompt(self, skills: Sequence[str]) -> list[str]:
        """The prompt's words: the triggers, plus "two" where the strong regime's request has two figures."""
        return list(skills) if self.regime == "weak" else self.request(skills).prompt()


def _prefixed(module: nn.Module, prefix: str) -> dict[str, Tensor]:
    return {f"{prefix}.{k}": v.detach().contiguous() for k, v in module.state_dict().items()}


def _load_prefixed(module: nn.Module, tensors: dict[str, Tensor], prefix: str) -> None:
    module.load_state_dict({k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")})


def save_base(path: Path, text_encoder: TextEncoder, unet: UNet) -> None:
    save_file({**_prefixed(text_encoder, "te"), **_prefixed(unet, "unet")}, str(path))


def save_lora(path: Path, adapters: dict[str, LowRank], trigger: str, dtype: torch.dtype = torch.float32) -> None:
    """kohya format (`lora_unet_*.lora_down.weight` / `lora_up.weight` / `alpha`), with the trigger as metadata."""
    tensors = {k: v.to(dtype) if k.endswith(".weight") else v for k, v in to_state_dict(adapters).items()}
    save_file(tensors, str(path), metadata={"ss_trigger": trigger})


def save_judge(path: Path, judge: Judge) -> None:
    save_file(_prefixed(judge, "judge"), str(path))


def load_base(path: Path, vocab_size: int = len(VOCAB)) -> tuple[TextEncoder, UNet]:
    """The base text encoder and UNet, in eval mode."""
    base = load_file(str(path))
    te, unet = TextEncoder(vocab_size=vocab_size), UNet()
    _load_prefixed(te, base, "te")
    _load_prefixed(unet, base, "unet")
    return te.eval(), unet.eval()


def load(weights: Path = WEIGHTS, regime: str = "weak") -> Miniature:
    """Load one regime of the miniature; LoRAs go through `adapters_for_model`, the parser real LoRA files use.

    fp16 LoRA files (the strong regime's) are widened to fp32 on load, as the WebUIs do for an fp32 model.
    """
    folder = regime_dir(regime, weights)
    te, unet = load_base(folder / "base.safetensors", len(VOCAB if regime == "weak" else VOCAB_STRONG))
    judge = Judge(classes=judge_classes(regime))
    _load_prefixed(judge, load_file(str(folder / "judge.safetensors")), "judge")
    loras = {}
    for s in SKILL_TOKENS:
        tensors = {k: v.float() for k, v in load_file(str(folder / f"lora_{s}.safetensors")).items()}
        loras[s] = adapters_for_model(unet, tensors)
    for m in (te, unet, judge):
        m.eval().requires_grad_(False)
    return Miniature(te, unet, loras, judge, regime)

