"""`python -m loratorio.bench train`: train the whole miniature (base, eight LoRAs, judge) in one command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import torch

from loratorio.miniworld.bundle import WEIGHTS
from loratorio.miniworld.train import PHASES, TrainConfig, train_all


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loratorio.bench train", description=__doc__)
    parser.add_argument("--out", type=Path, default=WEIGHTS, help="directory for the safetensors files")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 is fastest on a shared machine (no spin-waiting)")
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES,
                        help="retrain only these parts (LoRAs then reuse --out's base)")
    for f in dataclasses.fields(TrainConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    times = train_all(cfg, args.out, tuple(args.phases))
    print(json.dumps({"config": dataclasses.asdict(cfg), **times}, indent=1))
    return 0
