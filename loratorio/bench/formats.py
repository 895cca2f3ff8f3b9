"""`python -m loratorio.bench formats`: one SD-sized layer with a LoHa and a LoKr, applied from the factors (as
LoRAtorio does) against a precomputed full-size ΔW (what a Dense adapter per LoRA costs), ms per call on CPU."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from loratorio.core import Dense, LoHa, LoKr, merged_weight


def _ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loratorio.bench formats", description=__doc__)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    layers = [("conv 640→640 3×3, 2×16×16", nn.Conv2d(640, 640, 3, padding=1), torch.randn(2, 640, 16, 16)),
              ("linear 1280→1280, 2×256 tokens", nn.Linear(1280, 1280), torch.randn(2, 256, 1280))]
    print("| layer | kind | base layer | from the factors | full-size ΔW | ΔW / factors |")
    print("|---|---|---|---|---|---|")
    for name, layer, x in layers:
        o, i = layer.weight.shape[:2]
        kk = layer.weight[0, 0].numel()
        kinds = [LoHa(*(torch.randn(*s, generator=g) for s in ((o, 4), (4, i * kk), (o, 4), (4, i * kk))), 0.5),
                 LoKr(torch.randn(8, 8, generator=g), w2_a=torch.randn(o // 8, 8, generator=g),
                      w2_b=torch.randn(8, i // 8 * kk, generator=g))]
        with torch.no_grad():
            y = layer(x)
            base = _ms(lambda layer=layer, x=x: layer(x), args.repeats)
            for kind in kinds:
                dense = Dense(merged_weight(layer, kind))
                factors = _ms(lambda k=kind, layer=layer, x=x, y=y: k.apply(layer, x, y.clone()), args.repeats)
                full = _ms(lambda layer=layer, x=x, y=y, d=dense: d.apply(layer, x, y.clone()), args.repeats)
                print(f"| {name} | {type(kind).__name__} | {base:.1f} ms | {factors:.1f} ms | {full:.1f} ms | "
                      f"{full / factors:.1f}× |")
    return 0
