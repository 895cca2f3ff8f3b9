"""`python -m loratorio.bench quality`: composition score and image quality of every method on the CPU miniature.

Protocol (ComposLoRA in miniature): composition sets of one character plus N−1 other categories, N = 2..4; fixed
steps, CFG and per-image seeds, the same noise for every method; a judge trained on the generator's ground truth
scores whether each requested skill is present. Also sweeps LoRAtorio's patch size and temperature.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from loratorio.core import FastRules, Settings
from loratorio.core.masked import FLAT_RULES, TEXT_RULES
from loratorio.miniworld.bundle import WEIGHTS, Miniature, load
from loratorio.miniworld.judge import composition_score, confidence, frechet_distance, requested_present
from loratorio.miniworld.model import LATENT
from loratorio.miniworld.sampling import METHODS, SampleConfig, sample
from loratorio.miniworld.world import CATEGORIES, SKILL_TOKENS, Attributes, composition_sets, render_batch

log = logging.getLogger(__name__)

LABELS = {"base": "Base (no LoRA)", "merge": "Merge", "switch": "Switch", "composite": "Composite",
          "loratorio": "LoRAtorio", "loratorio_fast": "LoRAtorio fast",
          "loratorio_dynamic": "LoRAtorio-dynamic (8 loaded, top-k=N)",
          "merge_all": "Merge-all (8 loaded)", "real": "Real renders (judge ceiling)"}
# SD1.5's default patch of 8 latent px is 1/8 of its 64-px latent side; the same fraction of our 16-px latent is 2.
SIDE_FRACTION_DEFAULT = LATENT[-1] // 8


@dataclass
class Cell:
    """Accumulated judge outputs for one method and one N."""

    scores: list[Tensor] = field(default_factory=list)
    confidence: list[Tensor] = field(default_factory=list)
    present: list[Tensor] = field(default_factory=list)
    requested: list[Tensor] = field(default_factory=list)
    features: list[Tensor] = field(default_factory=list)
    real_features: list[Tensor] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        present, requested = torch.cat(self.present), torch.cat(self.requested)
        per_cat = {c: float(present[:, i].sum() / requested[:, i].sum().clamp_min(1))
                   for i, c in enumerate(CATEGORIES)}
        scores = torch.cat(self.scores)
        return {"score": float(scores.mean()), "se": float(scores.std() / math.sqrt(len(scores))),
                "confidence": float(torch.cat(self.confidence).mean()),
                "fd": frechet_distance(torch.cat(self.features), torch.cat(self.real_features)),
                "images": len(present), **{f"present_{c}": v for c, v in per_cat.items()},
                "per_image": [round(float(v), 4) for v in scores]}


def seeds_for(set_index: int, n: int, per_set: int, seed0: int) -> list[int]:
    """Per-image seeds fixed by (N, set, repeat): identical for every method."""
    return [seed0 * 1_000_000 + n * 10_000 + set_index * 100 + k for k in range(per_set)]


@torch.no_grad()
def evaluate_method(mini: Miniature, method: str, ns: Sequence[int], per_set: int, seed0: int,
                    config: SampleConfig) -> dict[int, dict[str, float]]:
    """Judge one method over every composition set of each N."""
    out = {}
    for n in ns:
        cell = Cell()
        for j, skills in enumerate(composition_sets(n)):
            seeds = seeds_for(j, n, per_set, seed0)
            want = [Attributes.from_skills(skills)] * len(seeds)
            if method == "real":
                images = render_batch(want, seeds)
            else:
                images, _ = sample(mini, skills, method, seeds, config)
            _judge(mini, cell, images, want, seeds)
        out[n] = cell.summary()
    return out


def _judge(mini: Miniature, cell: Cell, images: Tensor, want: list[Attributes], seeds: list[int]) -> None:
    logits = mini.judge(images)
    cell.scores.append(composition_score(logits, want))
    cell.confidence.append(confidence(logits))
    cell.present.append(requested_present(logits, want))
    cell.requested.append(torch.tensor([a.as_tuple() for a in want]) > 0)
    cell.features.append(mini.judge.features(images))
    cell.real_features.append(mini.judge.features(render_batch(want, seeds)))


@torch.no_grad()
def single_lora_fidelity(mini: Miniature, per_set: int, seed0: int, config: SampleConfig) -> dict[str, float]:
    """Each LoRA alone with its trigger (N = 1): does the judge find its skill? Checks LoRAs and judge together."""
    out = {}
    for i, skill in enumerate(SKILL_TOKENS):
        seeds = seeds_for(i, 1, per_set, seed0)
        images, _ = sample(mini, [skill], "loratorio", seeds, config)
        want = [Attributes.from_skills([skill])] * len(seeds)
        out[skill] = float(composition_score(mini.judge(images), want).mean())
    return out


def mean_over_n(cells: dict[int, dict[str, float]], key: str) -> float:
    return sum(c[key] for c in cells.values()) / len(cells)


def label(method: str) -> str:
    """A table row's name; 'loratorio_fast@4' is LoRAtorio fast with a full step every 4."""
    name, _, every = method.partition("@")
    return LABELS.get(name, name) + (f" (full every {every})" if every else "")


def format_table(table: dict[str, dict[int, dict[str, float]]], ns: Sequence[int]) -> str:
    """Markdown table: composition score ± standard error per N and averaged, judge confidence and feature FD."""
    head = "| Method | " + " | ".join(f"N={n}" for n in ns) + " | Avg | Confidence | FD to real |"
    lines = [head, "|" + "---|" * (len(ns) + 4)]
    for method, cells in table.items():
        scores = " | ".join(f"{cells[n]['score']:.3f} ± {cells[n]['se']:.3f}" for n in ns)
        avg_se = math.sqrt(sum(cells[n]["se"] ** 2 for n in ns)) / len(ns)
        lines.append(f"| {label(method)} | {scores} | {mean_over_n(cells, 'score'):.3f} ± {avg_se:.3f} | "
                     f"{mean_over_n(cells, 'confidence'):.3f} | {mean_over_n(cells, 'fd'):.2f} |")
    return "\n".join(lines)


def paired_difference(cells: dict[int, dict], ref: dict[int, dict], n: int) -> tuple[float, float]:
    """Mean and standard error of per-image score differences (same seeds and noise for both methods)."""
    d = torch.tensor(cells[n]["per_image"]) - torch.tensor(ref[n]["per_image"])
    return float(d.mean()), float(d.std() / math.sqrt(len(d)))


def format_fast(table: dict[str, dict[int, dict[str, float]]], ns: Sequence[int]) -> str:
    """Speed fast against full LoRAtorio, image by image: the paired difference of scores ± its standard error."""
    fast = [m for m in table if m.startswith("loratorio_fast")]
    if "loratorio" not in table or not fast:
        return ""
    lines = ["| fast − full LoRAtorio | " + " | ".join(f"N={n}" for n in ns) + " | Avg |",
             "|" + "---|" * (len(ns) + 2)]
    for method in fast:
        diffs = [paired_difference(table[method], table["loratorio"], n) for n in ns]
        avg, avg_se = sum(d for d, _ in diffs) / len(ns), math.sqrt(sum(se**2 for _, se in diffs)) / len(ns)
        lines.append(f"| {label(method)} | " + " | ".join(f"{d:+.3f} ± {se:.3f}" for d, se in diffs) +
                     f" | {avg:+.3f} ± {avg_se:.3f} |")
    return "\n".join(lines)


def run_sweep(mini: Miniature, ns: Sequence[int], per_set: int, seed0: int, config: SampleConfig,
              patch_sizes: Sequence[int], temperatures: Sequence[float]) -> list[dict[str, float]]:
    """LoRAtorio over a patch-size × temperature grid (same seeds and noise as the table, fewer per set)."""
    rows = []
    for p in patch_sizes:
        for tau in temperatures:
            settings = Settings(**{**config.settings.to_dict(), "patch_size": p, "temperature": tau})
            cells = evaluate_method(mini, "loratorio", ns, per_set, seed0,
                                    SampleConfig(config.steps, config.cfg, settings))
            row = {"patch_size": p, "temperature": tau, "score": mean_over_n(cells, "score"),
                   "confidence": mean_over_n(cells, "confidence"), "fd": mean_over_n(cells, "fd"),
                   **{f"score_n{n}": cells[n]["score"] for n in ns}}
            log.info("sweep %s", row)
            rows.append(row)
    return rows


def format_sweep(rows: list[dict[str, float]], patch_sizes: Sequence[int], temperatures: Sequence[float]) -> str:
    """Patch size (rows) × τ (columns) grid of the mean composition score."""
    lines = ["| patch \\ τ | " + " | ".join(str(t) for t in temperatures) + " |",
             "|" + "---|" * (len(temperatures) + 1)]
    for p in patch_sizes:
        cells = [next(r for r in rows if r["patch_size"] == p and r["temperature"] == t) for t in temperatures]
        lines.append(f"| {p} ({LATENT[-1] // p}×{LATENT[-1] // p} grid) | " +
                     " | ".join(f"{c['score']:.3f}" for c in cells) + " |")
    return "\n".join(lines)


def plot(path: Path, table: dict[str, dict[int, dict[str, float]]], ns: Sequence[int],
         sweep: list[dict[str, float]], temperatures: Sequence[float]) -> bool:
    """Chart of score per N and of the sweep; needs matplotlib (requirements-bench.txt), skipped without it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install -r requirements-bench.txt); no chart written")
        return False
    fig, axes = plt.subplots(1, 2 if sweep else 1, figsize=(13 if sweep else 8, 4), squeeze=False)
    ax = axes[0][0]
    for method, cells in table.items():
        ax.plot(list(ns), [cells[n]["score"] for n in ns], marker="o", label=label(method))
    ax.set(xlabel="N (skills per prompt)", ylabel="composition score", title="Miniature ComposLoRA", xticks=list(ns),
           ylim=(0, 1.05))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if sweep:
        ax = axes[0][1]
        for p in sorted({r["patch_size"] for r in sweep}):
            pts = [next(r for r in sweep if r["patch_size"] == p and r["temperature"] == t) for t in temperatures]
            ax.plot(list(temperatures), [r["score"] for r in pts], marker="o", label=f"patch {p}")
        ax.set(xscale="log", xlabel="temperature τ", ylabel="mean composition score", title="LoRAtorio sweep")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loratorio.bench quality", description=__doc__)
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--methods", nargs="+", default=["real", *METHODS], choices=["real", *METHODS])
    parser.add_argument("--n", type=int, nargs="+", default=[2, 3, 4], dest="ns")
    parser.add_argument("--per-set", type=int, default=4, help="images (seeds) per composition set")
    parser.add_argument("--seed", type=int, default=0, help="seed offset; repeat with others to measure variance")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--cfg", type=float, default=4.5)
    parser.add_argument("--patch-size", type=int, default=SIDE_FRACTION_DEFAULT)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--recentre", type=float, default=0.5)
    parser.add_argument("--switch-interval", type=int, default=1)
    parser.add_argument("--full-every", type=int, nargs="+", default=[2, 4, 8],
                        help="loratorio_fast: one row per full-step interval")
    defaults = FastRules()
    parser.add_argument("--fast-text", choices=TEXT_RULES, default=defaults.text,
                        help="loratorio_fast: cross-attention's rule (see FastRules)")
    parser.add_argument("--fast-flat", choices=FLAT_RULES, default=defaults.flat,
                        help="loratorio_fast: the rule of layers with no spatial output (time embedding)")
    parser.add_argument("--fast-uncond", choices=("scaled", "rows"), default=defaults.uncond,
                        help="loratorio_fast: the re-centred negative in the masked rows, or in extra base rows")
    parser.add_argument("--sweep-patch", type=int, nargs="*", default=[1, 2, 4, 8, 16])
    parser.add_argument("--sweep-temperature", type=float, nargs="*", default=[0.01, 0.05, 0.2, 1.0])
    parser.add_argument("--sweep-per-set", type=int, default=1, help="seeds per set in the sweep (52 images a point)")
    parser.add_argument("--json", type=Path, default=Path("out/quality.json"))
    parser.add_argument("--plot", type=Path, default=Path("out/quality.png"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 avoids spin-waits when shared)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    mini = load(args.weights)
    settings = Settings(enabled=True, patch_size=args.patch_size, temperature=args.temperature,
                        recentre=args.recentre, switch_interval=args.switch_interval)
    config = SampleConfig(args.steps, args.cfg, settings, FastRules(args.fast_flat, args.fast_text, args.fast_uncond))
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    table: dict[str, dict[int, dict[str, float]]] = {}
    runs = [(m, config) for m in args.methods if m != "loratorio_fast"]
    if "loratorio_fast" in args.methods:
        runs += [(f"loratorio_fast@{k}", dataclasses.replace(
            config, settings=dataclasses.replace(settings, full_every=k))) for k in args.full_every]
    for name, cfg in runs:
        t = time.perf_counter()
        table[name] = evaluate_method(mini, name.partition("@")[0], args.ns, args.per_set, args.seed, cfg)
        timings[name] = time.perf_counter() - t
        log.info("%s done in %.0f s: %s", name, timings[name],
                 {n: round(c["score"], 4) for n, c in table[name].items()})
    fidelity = single_lora_fidelity(mini, args.per_set, args.seed, config)
    sweep = []
    if args.sweep_patch and args.sweep_temperature:
        t = time.perf_counter()
        sweep = run_sweep(mini, args.ns, args.sweep_per_set, args.seed, config, args.sweep_patch,
                          args.sweep_temperature)
        timings["sweep"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    print(format_table(table, args.ns))
    if format_fast(table, args.ns):
        print("\nSpeed fast against full LoRAtorio (paired by image):\n" + format_fast(table, args.ns))
    print("\nSingle LoRA alone (N=1), score per skill:", json.dumps({k: round(v, 3) for k, v in fidelity.items()}))
    if sweep:
        print("\nLoRAtorio sweep, mean composition score over N:\n" + format_sweep(sweep, args.sweep_patch,
                                                                                  args.sweep_temperature))
    print(f"\ntotal {timings['total']:.0f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "table": table, "single_lora": fidelity, "sweep": sweep, "timings_s": timings}
    args.json.write_text(json.dumps(report, indent=1))
    if plot(args.plot, table, args.ns, sweep, args.sweep_temperature):
        print(f"wrote {args.json} and {args.plot}")
    return 0
