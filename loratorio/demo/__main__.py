"""`python -m loratorio.demo --out demo.png`: one labelled grid of Base, Merge, Composite, Switch, LoRAtorio and
LoRAtorio's per-LoRA weight maps (Ω, bright = that LoRA wins), one row per seed, from the bundled miniature."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from loratorio.core import Settings
from loratorio.miniworld.bundle import WEIGHTS, load
from loratorio.miniworld.png import heatmap, label, write_png
from loratorio.miniworld.sampling import SampleConfig, sample
from loratorio.miniworld.world import SKILL_TOKENS

COLUMNS = (("base", "BASE"), ("merge", "MERGE"), ("composite", "COMPOSITE"), ("switch", "SWITCH"),
           ("loratorio", "LORATORIO"))
SCALE, PAD = 4, 4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loratorio.demo", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo.png"))
    parser.add_argument("--skills", nargs="+", default=["knight", "hat", "sky"], choices=SKILL_TOKENS,
                        help="the prompt's triggers, character first (ComposLoRA order)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[11, 12, 13])
    parser.add_argument("--patch-size", type=int, default=2, help="latent px; the latent is 16×16")
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--regime", default="weak", choices=("weak", "strong"),
                        help="strong: strong LoRAs, and two characters in the prompt make a two-figure scene")
    parser.add_argument("--multiplier", type=float, default=1.0, help="every LoRA's strength")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny model: one thread is fastest and never fights a busy machine
    start = time.perf_counter()
    mini = load(args.weights, args.regime)
    config = SampleConfig(settings=Settings(enabled=True, patch_size=args.patch_size,
                                            temperature=args.temperature, switch_interval=1))
    columns = []
    maps = None
    for method, _ in COLUMNS:
        images, w = sample(mini, args.skills, method, args.seeds, config, args.multiplier)
        columns.append(images)
        maps = w if w is not None else maps
    # Ω averaged over steps, 16×16 latent -> 32×32 image pixels (each latent pixel covers 2×2).
    for i in range(len(args.skills)):
        columns.append(torch.stack([heatmap(m[0]) for m in maps[i]]).repeat_interleave(2, -2).repeat_interleave(2, -1))
    titles = [t for _, t in COLUMNS] + [f"MAP {s}" for s in args.skills]
    write_png(args.out, _sheet(columns, titles, "PROMPT = " + " ".join(mini.prompt(args.skills))))
    print(f"wrote {args.out} ({len(args.seeds)} seeds × {len(titles)} columns) in {time.perf_counter() - start:.1f} s")
    return 0


def _sheet(columns: list[torch.Tensor], titles: list[str], caption: str) -> torch.Tensor:
    """Columns of (B, 3, 32, 32) images under their titles, with a caption line on top."""
    cell = 32 * SCALE
    rows = columns[0].shape[0]
    width = len(columns) * (cell + PAD) + PAD
    parts = [label(caption, width), torch.ones(3, 2, width)]
    head = torch.ones(3, 14, width)
    for j, title in enumerate(titles):
        x = PAD + j * (cell + PAD)
        head[:, :, x:x + cell] = label(title, cell)
    parts.append(head)
    for r in range(rows):
        row = torch.ones(3, cell + PAD, width)
        for j, col in enumerate(columns):
            x = PAD + j * (cell + PAD)
            row[:, PAD:, x:x + cell] = col[r].repeat_interleave(SCALE, -2).repeat_interleave(SCALE, -1)
        parts.append(row)
    parts.append(torch.ones(3, PAD, width))
    return torch.cat(parts, dim=1)


if __name__ == "__main__":
    sys.exit(main())
