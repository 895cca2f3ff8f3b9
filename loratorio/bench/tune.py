"""`python -m loratorio.bench tune`: LoRAtorio's options on the tuning half of both regimes (never the test half).

Every option is one named variant of the default settings; each runs on the same sets, seeds and noise, and is
reported with its score per regime (and on the two-character sets), its paired difference to Merge and to the
defaults, and its coverage statistics. The README's defaults were chosen from this table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from loratorio.bench.quality import (
    PAPER,
    REGIMES,
    SIDE_FRACTION_DEFAULT,
    Records,
    Variant,
    coverage_summary,
    paired,
    plan,
    run_variant,
    spread_summary,
    summary,
    variant,
)
from loratorio.core import Settings
from loratorio.miniworld.bundle import WEIGHTS, load
from loratorio.miniworld.sampling import SampleConfig

log = logging.getLogger(__name__)


def variants() -> dict[str, Variant]:
    """The grid: baselines, the defaults, then one option changed at a time (and the combinations tried)."""
    grid = [
        variant("Merge", "merge"), variant("Composite", "composite"), variant("Switch", "switch"),
        # The defaults are Settings' own (relative on since issue 13); the paper's settings switch later options off.
        variant("LoRAtorio (shipped defaults)", "loratorio"),
        variant("paper settings (absolute similarity)", "loratorio", **PAPER),
        variant("τ 0.02", "loratorio", temperature=0.02), variant("τ 0.2", "loratorio", temperature=0.2),
        variant("τ 1", "loratorio", temperature=1.0),
        variant("patch 1 (16×16 grid)", "loratorio", patch_size=1),
        variant("patch 4 (4×4 grid)", "loratorio", patch_size=4),
        variant("reference uncond", "loratorio", reference="uncond"),
        variant("min share 0.1", "loratorio", min_share=0.1), variant("min share 0.2", "loratorio", min_share=0.2),
        variant("relative", "loratorio", relative=True),
        variant("τ 0.2 → 0.02 over the steps", "loratorio", temperature=0.2, temperature_end=0.02),
        variant("τ 0.02 → 0.2 over the steps", "loratorio", temperature=0.02, temperature_end=0.2),
        variant("global: style", "loratorio", ["style"]),
        variant("global: style + background", "loratorio", ["style", "background"]),
        variant("auto global 0.5", "loratorio", auto_global=0.5),
        variant("auto global 0.7", "loratorio", auto_global=0.7),
        variant("auto global 1.0", "loratorio", auto_global=1.0),
        # Combinations of the options that helped alone on the weak half.
        variant("relative + τ 0.02", "loratorio", relative=True, temperature=0.02),
        variant("relative + τ 0.2", "loratorio", relative=True, temperature=0.2),
        variant("relative + τ 1", "loratorio", relative=True, temperature=1.0),
        variant("relative + min share 0.1", "loratorio", relative=True, min_share=0.1),
        variant("relative + auto global 0.7", "loratorio", relative=True, auto_global=0.7),
        variant("relative + auto global 0.7 + τ 0.2", "loratorio", relative=True, auto_global=0.7, temperature=0.2),
        variant("relative + global: style + background", "loratorio", ["style", "background"], relative=True),
    ]
    return {v.label: v for v in grid}


def main(argv: list[str] | None = None) -> int:
    names = list(variants())
    parser = argparse.ArgumentParser(prog="python -m loratorio.bench tune", description=__doc__)
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=REGIMES)
    parser.add_argument("--variants", nargs="+", default=names, choices=names, metavar="LABEL")
    parser.add_argument("--n", type=int, nargs="+", default=[2, 3, 4], dest="ns")
    parser.add_argument("--per-set", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--multiplier", type=float, default=1.0)
    parser.add_argument("--json", type=Path, default=Path("out/tune.json"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    grid = variants()
    # The defaults every variant departs from: SD1.5's 8×8 grid on the 16-px latent, and Settings' own values.
    config = SampleConfig(16, 4.5, Settings(enabled=True, patch_size=SIDE_FRACTION_DEFAULT, switch_interval=1))
    must = ["Merge", "LoRAtorio (shipped defaults)"]
    chosen = list(dict.fromkeys(must + args.variants))
    out: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "rows": {}}
    t0 = time.perf_counter()
    for regime in args.regimes:
        mini = load(args.weights, regime)
        items = plan(regime, args.ns, "tune", args.per_set, args.seed)
        records: dict[str, Records] = {}
        for label in chosen:
            t = time.perf_counter()
            records[label] = run_variant(mini, grid[label], items, config, args.multiplier)
            log.info("%s %s: %.3f in %.0f s", regime, label, summary(records[label], args.ns)["avg"],
                     time.perf_counter() - t)
        subsets = [("all", None)] + ([("two", ["two"])] if regime == "strong" else [])
        for label, rec in records.items():
            row = out["rows"].setdefault(label, {})
            for subset, kinds in subsets:
                key = regime if subset == "all" else f"{regime}-two"
                row[key] = {"summary": summary(rec, args.ns, kinds),
                            "vs_merge": paired(rec, records["Merge"], args.ns, kinds),
                            "vs_default": paired(rec, records["LoRAtorio (shipped defaults)"], args.ns, kinds)}
            if rec.coverage:
                row[f"{regime}-coverage"] = coverage_summary(rec)
            if rec.spread:
                row[f"{regime}-spread"] = spread_summary(rec, dict(grid[label].settings)["auto_global"])
    out["seconds"] = time.perf_counter() - t0
    print(format_tune(out["rows"], args.regimes))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    print(f"\ntotal {out['seconds']:.0f} s; wrote {args.json}")
    return 0


def format_tune(rows: dict[str, dict], regimes: list[str]) -> str:
    """Markdown: per variant and regime (and two-character subset) the score, − Merge and − defaults, ± SE."""
    keys = [k for r in regimes for k in ([r] if r == "weak" else [r, f"{r}-two"])]
    head = "| Variant | " + " | ".join(f"{k}: score | − Merge | − default" for k in keys) + " | lost LoRAs |"
    lines = [head, "|" + "---|" * (1 + 3 * len(keys) + 1)]
    for label, row in rows.items():
        cells = []
        for k in keys:
            if k not in row:
                cells.append("– | – | –")
                continue
            s, m, d = row[k]["summary"], row[k]["vs_merge"], row[k]["vs_default"]
            cells.append(f"{s['avg']:.3f} ± {s['se']:.3f} | {m['diff']:+.3f} ± {m['se']:.3f} | "
                         f"{d['diff']:+.3f} ± {d['se']:.3f}")
        lost = " / ".join(f"{row[f'{r}-coverage']['lost_share']:.2f}" for r in regimes if f"{r}-coverage" in row)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {lost or '–'} |")
    return "\n".join(lines)
