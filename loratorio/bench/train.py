"""`python -m loratorio.bench train`: train one regime of the miniature (base model, skill LoRAs, judge).

`--regime weak` (the default) is the original miniature; `--regime strong` trains the two-figure world with strong
LoRAs into `weights/strong/`. Every size and step count defaults to the regime's preset (loratorio.miniworld.train).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import torch

from loratorio.miniworld.train import PHASES, PRESETS, REGIMES, TrainConfig, train_all
from loratorio.miniworld.world import SKILL_TOKENS


def _flag(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loratorio.bench train", description=__doc__)
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for the safetensors files (default: the bundled weights of the regime)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 is fastest on a shared machine (no spin-waiting)")
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES,
                        help="retrain only these parts (LoRAs then reuse --out's base)")
    parser.add_argument("--skills", nargs="+", default=list(SKILL_TOKENS), choices=SKILL_TOKENS,
                        help="with the loras phase: train only these skills' LoRAs (to split a long run)")
    for f in dataclasses.fields(TrainConfig):
        kind = str if f.name in ("regime", "lora_dtype") else type(f.default)
        if kind is bool:
            kind = _flag
        choices = REGIMES if f.name == "regime" else None
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=None, choices=choices,
                            help=f"weak preset: {f.default}; strong: {getattr(PRESETS['strong'], f.name)}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    preset = PRESETS[args.regime or "weak"]
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    cfg = dataclasses.replace(preset, **{k: v for k, v in given.items() if v is not None})
    times = train_all(cfg, args.out, tuple(args.phases), tuple(args.skills))
    print(json.dumps({"config": dataclasses.asdict(cfg), **times}, indent=1))
    return 0
