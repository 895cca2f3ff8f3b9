"""`python -m loratorio.bench quality`: composition score and image quality of every method on the CPU miniature.

Protocol (ComposLoRA in miniature): composition sets of one character plus N−1 other categories, N = 2..4; fixed
steps, CFG and per-image seeds, the same noise for every method; a judge trained on the generator's ground truth
scores whether each requested skill is present. Two regimes: "weak" (the original miniature: small LoRAs that barely
interfere) and "strong" (LoRAs trained as users train theirs, and two-character sets whose two figures must both be
found, and distinct). Sets are split once into a tuning half and a test half (world.split_sets); this command reports
one half (the test half by default), every method at every LoRA strength of the sweep.
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

from loratorio.core import FastRules, Settings, merged_weight
from loratorio.core.masked import TEXT_RULES
from loratorio.miniworld.bundle import WEIGHTS, Miniature, load
from loratorio.miniworld.judge import composition_score, confidence, frechet_distance, requested_present, targets
from loratorio.miniworld.sampling import METHODS, SampleConfig, divergence_spread, sample
from loratorio.miniworld.world import (
    SKILL_TOKENS,
    SPLIT_SEED_OFFSET,
    category_of,
    composition_sets,
    render_batch,
    render_scenes,
    split_sets,
    two_character_sets,
)

log = logging.getLogger(__name__)

REGIMES = ("weak", "strong")
LABELS = {"base": "Base (no LoRA)", "merge": "Merge", "switch": "Switch", "composite": "Composite",
          "loratorio": "LoRAtorio", "loratorio_fast": "LoRAtorio fast",
          "loratorio_dynamic": "LoRAtorio-dynamic (8 loaded, top-k=N)",
          "merge_all": "Merge-all (8 loaded)", "real": "Real renders (judge ceiling)",
          "loratorio_paper": "LoRAtorio, paper settings"}
# The paper's method as the project shipped it before issue 13: every option added since switched off.
PAPER = {"temperature": 0.05, "recentre": 0.5, "min_share": 0.0, "auto_global": 0.0, "relative": False,
         "temperature_end": 0.0, "global_loras": "", "smoothing": 0.0}
CHOICES = ["real", "loratorio_paper", *METHODS]


def label(method: str) -> str:
    """A table row's name; 'loratorio_fast@4' is LoRAtorio fast with a full step every 4."""
    name, _, every = method.partition("@")
    return LABELS[name] + (f" (full every {every})" if every else "")


def method_variant(method: str) -> Variant:
    """A method of the table: the sampling method, LoRAtorio with the paper's settings (`loratorio_paper`), or
    LoRAtorio fast with a full step every k (`loratorio_fast@k`)."""
    if method == "loratorio_paper":
        return variant(LABELS[method], "loratorio", **PAPER)
    name, _, every = method.partition("@")
    if every:
        return variant(label(method), name, full_every=int(every))
    return variant(LABELS[method], method)


def expand_fast(methods: Sequence[str], intervals: Sequence[int]) -> list[str]:
    """`loratorio_fast` as one method per full-step interval."""
    out = []
    for m in methods:
        out += [f"{m}@{k}" for k in intervals] if m == "loratorio_fast" else [m]
    return out
# SD1.5's default patch of 8 latent px is 1/8 of its 64-px latent side; the same fraction of our 16-px latent is 2.
SIDE_FRACTION_DEFAULT = 2
# A composed LoRA whose step-averaged weight is highest on under this share of the latent has (nearly) lost its skill.
LOST_SHARE = 0.05


@dataclass(frozen=True)
class Item:
    """One composition set of one half, with its per-image seeds (identical for every method)."""

    n: int
    kind: str  # "one": a character + N−1 other categories; "two": both characters + N−2 others
    index: int
    skills: tuple[str, ...]
    seeds: tuple[int, ...]


def seeds_for(set_index: int, n: int, per_set: int, seed0: int, kind: str = "one", first: int = 0) -> list[int]:
    """Per-image seeds fixed by (kind, N, set, repeat); the weak regime's "one" sets keep the original numbers."""
    offset = 0 if kind == "one" else 50
    return [seed0 * 1_000_000 + n * 10_000 + (offset + set_index) * 100 + first + k for k in range(per_set)]


def plan(regime: str, ns: Sequence[int], half: str, per_set: int, seed0: int) -> list[Item]:
    """The sets (and seeds) of one half of a regime: "tune", "test", or "all"."""
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    items = []
    for n in ns:
        groups = [("one", composition_sets(n))]
        if regime == "strong":
            groups.append(("two", two_character_sets(n)))
        for kind, sets in groups:
            chosen = range(len(sets)) if half == "all" else split_sets(sets, half, f"{kind}-{n}")
            # A group of one set sits in both halves; the test half then draws other seeds.
            first = SPLIT_SEED_OFFSET if len(sets) == 1 and half == "test" else 0
            for j in chosen:
                items.append(Item(n, kind, j, tuple(sets[j]), tuple(seeds_for(j, n, per_set, seed0, kind, first))))
    return items


@dataclass(frozen=True)
class Variant:
    """A method with its settings: `settings` override the run's LoRAtorio settings; `global_categories` name the
    categories whose LoRA the variant lists in `global_loras` for each set (as a user would name their style LoRA)."""

    label: str
    method: str
    settings: tuple[tuple[str, object], ...] = ()
    global_categories: tuple[str, ...] = ()

    def config(self, base: SampleConfig, skills: Sequence[str]) -> SampleConfig:
        values = {**base.settings.to_dict(), **dict(self.settings)}
        if self.global_categories:
            values["global_loras"] = ",".join(s for s in skills if category_of(s) in self.global_categories)
        return dataclasses.replace(base, settings=Settings(**values))


def variant(label: str, method: str, global_categories: Sequence[str] = (), **settings: object) -> Variant:
    return Variant(label, method, tuple(sorted(settings.items())), tuple(global_categories))


@dataclass
class Records:
    """Per-image results of one variant on one plan, in plan order."""

    score: list[float] = field(default_factory=list)
    n: list[int] = field(default_factory=list)
    kind: list[str] = field(default_factory=list)
    present: list[Tensor] = field(default_factory=list)
    requested: list[Tensor] = field(default_factory=list)
    confidence: list[float] = field(default_factory=list)
    features: list[Tensor] = field(default_factory=list)
    real_features: list[Tensor] = field(default_factory=list)
    # LoRAtorio only: per image and composed LoRA, (skill, mean weight, share of the latent it wins, judged present)
    coverage: list[list[tuple[str, float, float, bool]]] = field(default_factory=list)
    spread: list[dict[str, float]] = field(default_factory=list)  # per set, each LoRA's divergence spread

    def mask(self, ns: Sequence[int] | None = None, kinds: Sequence[str] | None = None) -> list[bool]:
        return [(ns is None or n in ns) and (kinds is None or k in kinds) for n, k in zip(self.n, self.kind,
                                                                                       strict=True)]


@torch.no_grad()
def run_variant(mini: Miniature, v: Variant, items: Sequence[Item], config: SampleConfig,
                multiplier: float = 1.0) -> Records:
    """Sample and judge every set of the plan with one variant."""
    rec = Records()
    for item in items:
        want = [mini.request(item.skills)] * len(item.seeds)
        maps = None
        if v.method == "real":
            images = _real(mini, want, list(item.seeds))
        else:
            cfg = v.config(config, item.skills)
            if cfg.settings.auto_global:
                # What the automatic rule reads at the first step, to report which LoRAs it makes global.
                spread = divergence_spread(mini, item.skills, item.seeds, cfg, multiplier)
                rec.spread.append(spread)
            info: dict = {}
            images, maps = sample(mini, item.skills, v.method, item.seeds, cfg, multiplier, info)
        logits = mini.judge(images)
        present = requested_present(logits, want)
        rec.score += composition_score(logits, want).tolist()
        rec.n += [item.n] * len(want)
        rec.kind += [item.kind] * len(want)
        rec.present += list(present)
        rec.requested += list(targets(want) > 0)
        rec.confidence += confidence(logits).tolist()
        rec.features += list(mini.judge.features(images))
        rec.real_features += list(mini.judge.features(_real(mini, want, list(item.seeds))))
        if maps is not None and v.method == "loratorio":
            rows = [info["loras"].index(s) for s in info["composed"]]
            rec.coverage += _coverage(mini, info["composed"], maps[rows], present)
    return rec


def _real(mini: Miniature, want: list, seeds: list[int]) -> Tensor:
    return render_batch(want, seeds) if mini.regime == "weak" else render_scenes(want, seeds)


def _coverage(mini: Miniature, composed: list[str], maps: Tensor,
              present: Tensor) -> list[list[tuple[str, float, float, bool]]]:
    """Per image: each composed LoRA's mean weight, the share of the latent where it has the largest weight, and
    whether the judge found its skill."""
    cats = [_judge_column(mini, s) for s in composed]
    winner = maps.argmax(0)  # (B, 1, H, W)
    out = []
    for b in range(maps.shape[1]):
        rows = []
        for i, skill in enumerate(composed):
            rows.append((skill, float(maps[i, b].mean()), float((winner[b] == i).float().mean()),
                         bool(present[b, cats[i]])))
        out.append(rows)
    return out


def _judge_column(mini: Miniature, skill: str) -> int:
    """The judge's category index that checks a skill."""
    cat = category_of(skill)
    if mini.regime == "weak":
        return ("character", "clothing", "style", "background").index(cat)
    return ("knight", "ghost").index(skill) if cat == "character" else ("clothing", "style", "background").index(
        cat) + 2


def summary(rec: Records, ns: Sequence[int], kinds: Sequence[str] | None = None) -> dict[str, float]:
    """Mean score per N and averaged over N, each with its standard error (per-image, N's treated as independent)."""
    out: dict[str, float] = {}
    means, ses = [], []
    for n in ns:
        s = torch.tensor([x for x, m in zip(rec.score, rec.mask([n], kinds), strict=True) if m])
        if len(s) == 0:
            continue
        mean, se = float(s.mean()), float(s.std() / math.sqrt(len(s))) if len(s) > 1 else 0.0
        out[f"n{n}"], out[f"se_n{n}"], out[f"images_n{n}"] = mean, se, len(s)
        means.append(mean)
        ses.append(se)
    out["avg"] = sum(means) / len(means)
    out["se"] = math.sqrt(sum(se * se for se in ses)) / len(ses)
    return out


def paired(rec: Records, ref: Records, ns: Sequence[int], kinds: Sequence[str] | None = None) -> dict[str, float]:
    """Mean over N of (variant − reference) on the same images, with its paired standard error."""
    means, ses = [], []
    for n in ns:
        mask = rec.mask([n], kinds)
        d = torch.tensor([a - b for a, b, m in zip(rec.score, ref.score, mask, strict=True) if m])
        if len(d) == 0:
            continue
        means.append(float(d.mean()))
        ses.append(float(d.std() / math.sqrt(len(d))) if len(d) > 1 else 0.0)
    return {"diff": sum(means) / len(means), "se": math.sqrt(sum(s * s for s in ses)) / len(ses)}


def quality(rec: Records, ns: Sequence[int]) -> dict[str, float]:
    """Judge confidence and feature Fréchet distance to the real renders, each averaged over N."""
    conf, fd = [], []
    for n in ns:
        mask = rec.mask([n])
        if not any(mask):
            continue
        conf.append(sum(c for c, m in zip(rec.confidence, mask, strict=True) if m) / sum(mask))
        feats = torch.stack([f for f, m in zip(rec.features, mask, strict=True) if m])
        real = torch.stack([f for f, m in zip(rec.real_features, mask, strict=True) if m])
        fd.append(frechet_distance(feats, real))
    return {"confidence": sum(conf) / len(conf), "fd": sum(fd) / len(fd)}


def spread_summary(rec: Records, threshold: float) -> dict[str, dict[str, float]]:
    """Per category: mean divergence spread, and how often the automatic rule (spread < threshold) makes it global
    (the rule keeps the most spread LoRA composed; that is ignored here)."""
    out: dict[str, dict[str, float]] = {}
    for per_set in rec.spread:
        for skill, value in per_set.items():
            cat = out.setdefault(category_of(skill), {"n": 0, "spread": 0.0, "global": 0.0})
            cat["n"] += 1
            cat["spread"] += value
            cat["global"] += value < threshold
    return {c: {"spread": v["spread"] / v["n"], "global_share": v["global"] / v["n"]} for c, v in out.items()}


def coverage_summary(rec: Records) -> dict[str, float]:
    """How often a composed LoRA wins (almost) nothing, and how often its skill is then missing."""
    rows = [r for image in rec.coverage for r in image]
    if not rows:
        return {}
    lost = [r for r in rows if r[2] < LOST_SHARE]
    images_with_lost = sum(any(r[2] < LOST_SHARE for r in image) for image in rec.coverage)
    return {"loras": len(rows), "lost_share": len(lost) / len(rows),
            "images_with_lost": images_with_lost / len(rec.coverage),
            "present_when_lost": sum(r[3] for r in lost) / max(1, len(lost)),
            "present_when_kept": sum(r[3] for r in rows if r[2] >= LOST_SHARE) / max(1, len(rows) - len(lost)),
            "mean_min_weight": sum(min(r[1] for r in image) for image in rec.coverage) / len(rec.coverage)}


@torch.no_grad()
def single_lora_report(mini: Miniature, per_set: int, seed0: int, config: SampleConfig) -> dict[str, dict]:
    """Each LoRA alone with its trigger (N = 1): its skill score, and ‖ΔW‖ / ‖W‖ over the layers it adapts."""
    out = {}
    for i, skill in enumerate(SKILL_TOKENS):
        seeds = seeds_for(i, 1, per_set, seed0)
        images, _ = sample(mini, [skill], "merge", seeds, config)
        want = [mini.request([skill])] * len(seeds)
        delta2 = weight2 = 0.0
        for name, adapter in mini.loras[skill].items():
            layer = mini.unet.get_submodule(name)
            delta2 += float(merged_weight(layer, adapter).pow(2).sum())
            weight2 += float(layer.weight.pow(2).sum())
        out[skill] = {"score": float(composition_score(mini.judge(images), want).mean()),
                      "delta_rel": math.sqrt(delta2 / weight2)}
    return out


def _fmt(mean: float, se: float | None = None) -> str:
    return f"{mean:.3f}" if se is None else f"{mean:.3f} ± {se:.3f}"


def format_table(rows: dict[str, dict], ns: Sequence[int], with_quality: bool = True) -> str:
    """Markdown: score per N, average ± SE, difference to Merge on the same images ± paired SE, quality columns."""
    head = "| Method | " + " | ".join(f"N={n}" for n in ns) + " | Avg ± SE | − Merge ± SE |"
    head += " Confidence | FD to real |" if with_quality else ""
    lines = [head, "|" + "---|" * (len(ns) + 3 + (2 if with_quality else 0))]
    for label, r in rows.items():
        s = r["summary"]
        cells = " | ".join(_fmt(s[f"n{n}"]) if f"n{n}" in s else "–" for n in ns)
        vs = _fmt(r["vs_merge"]["diff"], r["vs_merge"]["se"]) if "vs_merge" in r else "–"
        line = f"| {label} | {cells} | {_fmt(s['avg'], s['se'])} | {vs} |"
        if with_quality:
            line += f" {r['quality']['confidence']:.3f} | {r['quality']['fd']:.2f} |"
        lines.append(line)
    return "\n".join(lines)


def sweep_multipliers(sweep: dict[str, dict[str, dict]]) -> list[float]:
    """The multipliers a stored sweep holds (its keys), in order: what a report merged by --from-json can show."""
    return sorted({float(k) for by_m in sweep.values() for k in by_m})


def format_sweep(sweep: dict[str, dict[str, dict]], multipliers: Sequence[float]) -> str:
    """Markdown: average score ± SE per method (rows) and LoRA multiplier (columns)."""
    lines = ["| Method | " + " | ".join(f"×{m:g}" for m in multipliers) + " |", "|" + "---|" * (len(multipliers) + 1)]
    for label, by_m in sweep.items():
        lines.append(f"| {label} | " + " | ".join(_fmt(by_m[str(m)]["avg"], by_m[str(m)]["se"]) for m in multipliers)
                     + " |")
    return "\n".join(lines)


def plot_sweep(path: Path, panels: dict[str, dict[str, dict[str, dict]]]) -> bool:
    """One panel per regime (and subset): score against LoRA multiplier, one line per method; needs matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install -r requirements-bench.txt); no chart written")
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels) + 2.2, 4), squeeze=False)
    for ax, (title, sweep) in zip(axes[0], panels.items(), strict=True):
        multipliers = sweep_multipliers(sweep)
        for label, by_m in sweep.items():
            ys = [by_m[str(m)]["avg"] for m in multipliers]
            es = [by_m[str(m)]["se"] for m in multipliers]
            ax.errorbar(list(multipliers), ys, yerr=es, marker="o", capsize=2, label=label)
        ax.set(xlabel="LoRA multiplier (all LoRAs)", ylabel="composition score", title=title, ylim=(0, 1.02),
               xticks=list(multipliers))
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loratorio.bench quality", description=__doc__)
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=REGIMES)
    parser.add_argument("--half", default="test", choices=("tune", "test", "all"))
    parser.add_argument("--methods", nargs="+", default=CHOICES, choices=CHOICES)
    parser.add_argument("--n", type=int, nargs="+", default=[2, 3, 4], dest="ns")
    parser.add_argument("--per-set", type=int, default=4, help="images (seeds) per composition set")
    parser.add_argument("--seed", type=int, default=0, help="seed offset; repeat with others to measure variance")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--cfg", type=float, default=4.5)
    parser.add_argument("--patch-size", type=int, default=SIDE_FRACTION_DEFAULT)
    parser.add_argument("--temperature", type=float, default=Settings().temperature)
    parser.add_argument("--recentre", type=float, default=Settings().recentre)
    parser.add_argument("--min-share", type=float, default=Settings().min_share)
    parser.add_argument("--switch-interval", type=int, default=1)
    parser.add_argument("--fast-text", choices=TEXT_RULES, default=FastRules().text,
                        help="loratorio_fast: the cross-attention rule (FastRules.text)")
    parser.add_argument("--full-every", type=int, nargs="+", default=[2, 4, 8],
                        help="loratorio_fast: one row per full-step interval")
    parser.add_argument("--multipliers", type=float, nargs="*", default=[0.5, 0.75, 1.0, 1.5],
                        help="strength sweep: every LoRA at each multiplier (1 is the main table's)")
    parser.add_argument("--sweep-methods", nargs="*", choices=CHOICES[1:],
                        default=["merge", "switch", "composite", "loratorio_paper", "loratorio"])
    parser.add_argument("--single-images", type=int, default=None,
                        help="images per LoRA alone in the single-LoRA report (default: --per-set)")
    parser.add_argument("--json", type=Path, default=Path("out/quality.json"))
    parser.add_argument("--from-json", type=Path, nargs="+", default=[],
                        help="sample nothing: print and plot the regimes of earlier --json reports together")
    parser.add_argument("--plot", type=Path, default=Path("out/strength.png"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 avoids spin-waits when shared)")
    args = parser.parse_args(argv)
    if args.single_images is not None and args.single_images < 1:
        parser.error("--single-images must be at least 1")
    args.methods = expand_fast(args.methods, args.full_every)
    args.sweep_methods = expand_fast(args.sweep_methods, args.full_every)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    settings = Settings(enabled=True, patch_size=args.patch_size, temperature=args.temperature,
                        recentre=args.recentre, switch_interval=args.switch_interval, min_share=args.min_share)
    config = SampleConfig(args.steps, args.cfg, settings, FastRules(text=args.fast_text))
    t0 = time.perf_counter()
    report: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "regimes": {}}
    report["args"]["from_json"] = [str(p) for p in args.from_json]
    panels: dict[str, dict] = {}
    for path in args.from_json:
        stored = json.loads(path.read_text())
        for regime, out in stored["regimes"].items():
            # Each regime is printed with the options of the run that sampled it, not this command's defaults.
            out.setdefault("args", stored["args"])
            report["regimes"][regime] = out
    for regime in [] if args.from_json else args.regimes:
        mini = load(args.weights, regime)
        items = plan(regime, args.ns, args.half, args.per_set, args.seed)
        kinds_list = [("all", None)] + ([("two", ["two"])] if regime == "strong" else [])
        records: dict[tuple[str, float], Records] = {}
        for method in dict.fromkeys([*args.methods, *args.sweep_methods]):
            mults = [1.0] + [m for m in args.multipliers if m != 1.0] if method in args.sweep_methods else [1.0]
            for m in mults:
                t = time.perf_counter()
                records[(method, m)] = run_variant(mini, method_variant(method), items, config, m)
                log.info("%s %s ×%g: %.3f in %.0f s", regime, method, m,
                         summary(records[(method, m)], args.ns)["avg"], time.perf_counter() - t)
        out: dict = {"args": {k: v for k, v in report["args"].items() if k != "from_json"}, "tables": {}, "sweep": {},
                     "counts": {}}
        for subset, kinds in kinds_list:
            if kinds and not any(k in kinds for i in items for k in [i.kind]):
                continue
            chosen = [i for i in items if kinds is None or i.kind in kinds]
            out["counts"][subset] = {"sets": len(chosen), "images": sum(len(i.seeds) for i in chosen)}
            rows = {}
            for method in args.methods:
                rec = records[(method, 1.0)]
                row = {"summary": summary(rec, args.ns, kinds), "quality": quality(rec, args.ns)}
                if method != "merge" and ("merge", 1.0) in records:
                    row["vs_merge"] = paired(rec, records[("merge", 1.0)], args.ns, kinds)
                if method.startswith("loratorio_fast") and ("loratorio", 1.0) in records:
                    row["vs_loratorio"] = paired(rec, records[("loratorio", 1.0)], args.ns, kinds)
                if rec.coverage:
                    row["coverage"] = coverage_summary(rec)
                rows[label(method)] = row
            out["tables"][subset] = rows
            sweep = {label(m): {str(k): summary(records[(m, k)], args.ns, kinds) for k in args.multipliers}
                     for m in args.sweep_methods}
            out["sweep"][subset] = sweep
        out["single_lora"] = single_lora_report(mini, args.single_images or args.per_set, args.seed, config)
        report["regimes"][regime] = out
    report["seconds"] = time.perf_counter() - t0
    for regime, out in report["regimes"].items():
        run = out.get("args", report["args"])
        for subset, sweep in out["sweep"].items():
            if sweep_multipliers(sweep):
                panels[f"{regime} LoRAs" + (", two-character sets" if subset == "two" else "")] = sweep
        for subset, rows in out["tables"].items():
            count = out["counts"][subset]
            print(f"\n{regime} regime, {run['half']} half, {subset} sets ({count['sets']} sets, {count['images']} "
                  "images):")
            print(format_table(rows, run["ns"], with_quality=subset == "all"))
            fast = {k: r["vs_loratorio"] for k, r in rows.items() if "vs_loratorio" in r}
            for name, d in fast.items():
                print(f"{name} − LoRAtorio (paired): {_fmt(d['diff'], d['se'])}")
            multipliers = sweep_multipliers(out["sweep"].get(subset, {}))
            if multipliers:
                print(f"\nstrength sweep ({regime}, {subset} sets), average score over N:")
                print(format_sweep(out["sweep"][subset], multipliers))
        print(f"\nsingle LoRAs ({regime}): " + json.dumps({k: {kk: round(vv, 3) for kk, vv in v.items()}
                                                        for k, v in out["single_lora"].items()}))
    print(f"\ntotal {report['seconds']:.0f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    if panels and plot_sweep(args.plot, panels):
        print(f"wrote {args.json} and {args.plot}")
    return 0
