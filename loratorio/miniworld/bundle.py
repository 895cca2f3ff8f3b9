"""Loading and saving the bundled miniature: base model, one kohya-format LoRA per skill, and the judge."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from loratorio.core import LowRank, adapters_for_model, to_state_dict
from loratorio.miniworld.judge import Judge
from loratorio.miniworld.model import Denoiser, TextEncoder, UNet
from loratorio.miniworld.world import SKILL_TOKENS

WEIGHTS = Path(__file__).parent / "weights"


@dataclass
class Miniature:
    """Everything the benchmark and the demo need, in eval mode on the CPU."""

    text_encoder: TextEncoder
    unet: UNet
    loras: dict[str, dict[str, LowRank]]
    judge: Judge

    @property
    def denoiser(self) -> Denoiser:
        return Denoiser(self.unet)


def _prefixed(module: nn.Module, prefix: str) -> dict[str, Tensor]:
    return {f"{prefix}.{k}": v.detach().contiguous() for k, v in module.state_dict().items()}


def _load_prefixed(module: nn.Module, tensors: dict[str, Tensor], prefix: str) -> None:
    module.load_state_dict({k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")})


def save_base(path: Path, text_encoder: TextEncoder, unet: UNet) -> None:
    save_file({**_prefixed(text_encoder, "te"), **_prefixed(unet, "unet")}, str(path))


def save_lora(path: Path, adapters: dict[str, LowRank], trigger: str) -> None:
    """kohya format (`lora_unet_*.lora_down.weight` / `lora_up.weight` / `alpha`), with the trigger as metadata."""
    save_file(to_state_dict(adapters), str(path), metadata={"ss_trigger": trigger})


def save_judge(path: Path, judge: Judge) -> None:
    save_file(_prefixed(judge, "judge"), str(path))


def load_base(path: Path) -> tuple[TextEncoder, UNet]:
    """The base text encoder and UNet, in eval mode."""
    base = load_file(str(path))
    te, unet = TextEncoder(), UNet()
    _load_prefixed(te, base, "te")
    _load_prefixed(unet, base, "unet")
    return te.eval(), unet.eval()


def load(weights: Path = WEIGHTS) -> Miniature:
    """Load the miniature; LoRAs go through `adapters_for_model`, the same parser real LoRA files use."""
    te, unet = load_base(weights / "base.safetensors")
    judge = Judge()
    _load_prefixed(judge, load_file(str(weights / "judge.safetensors")), "judge")
    loras = {s: adapters_for_model(unet, load_file(str(weights / f"lora_{s}.safetensors"))) for s in SKILL_TOKENS}
    for m in (te, unet, judge):
        m.eval().requires_grad_(False)
    return Miniature(te, unet, loras, judge)

