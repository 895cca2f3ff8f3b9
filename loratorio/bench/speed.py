"""`python -m loratorio.bench speed`: time and peak memory of one sampling step, LoRAtorio against its baselines.

Uses diffusers' UNet2DConditionModel with SD1.5 (or SDXL) layer shapes and random weights, and synthetic LoRAs on
the usual targets. diffusers is a benchmark-only dependency (requirements-bench.txt), imported only here.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from loratorio.core import (
    BatchLayout,
    Composer,
    FastRules,
    LowRank,
    MultiAdapter,
    Settings,
    evaluate,
    merged_weight,
    tree_repeat,
)
from loratorio.core.masked import TEXT_RULES

SD15 = {"sample_size": 64, "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768,
        "attention_head_dim": 8, "layers_per_block": 2}
SDXL = {"sample_size": 128, "block_out_channels": (320, 640, 1280), "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048,
        "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816}
# Smoke tests only: diffusers' dummy sizes, so the whole benchmark runs in seconds; its numbers mean nothing.
TINY = {"sample_size": 8, "block_out_channels": (32, 64), "cross_attention_dim": 32, "attention_head_dim": 8,
        "layers_per_block": 1, "norm_num_groups": 8,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")}

# kohya's usual SD targets: attention projections, feed-forward, resnet convs.
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1", "conv2")
KINDS = ("base", "merged", "remerge", "sequential", "batched", "fast", "fast_full", "floor", "fusion")
LABELS = {"base": "plain base, batch 2", "merged": "merged LoRAs, batch 2 (plain LoRA)",
          "remerge": "re-merge on LoRA change", "sequential": "LoRAtorio sequential",
          "batched": "LoRAtorio full step (batched)", "fast": "LoRAtorio fast step (masked, batch 2)",
          "fast_full": "LoRAtorio fast's full step (base + LoRAs on the prompt, masked pass)",
          "floor": "floor: base, 2(N+1) rows", "fusion": "fusion alone"}


def load_unet_class() -> type:
    """diffusers' UNet2DConditionModel, or a clear exit if the benchmark-only dependency is missing."""
    try:
        from diffusers import UNet2DConditionModel
    except ImportError as e:
        raise SystemExit(f"the speed benchmark needs diffusers: pip install -r requirements-bench.txt ({e})") from e
    return UNet2DConditionModel


def build_unet(config: dict, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """The UNet from its config alone, with random weights (no download)."""
    torch.manual_seed(seed)
    with torch.device(device):
        unet = load_unet_class()(**config)
    if dtype != torch.float32:  # diffusers builds in fp32; casting a float32 model would only print a warning
        unet = unet.to(dtype)
    return unet.eval().requires_grad_(False)


def target_names(unet: nn.Module) -> list[str]:
    """Names of the Linear / Conv2d layers a typical SD LoRA targets."""
    return [name for name, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
            and any(f".{name}".endswith(f".{t}") for t in TARGETS)]


def make_loras(unet: nn.Module, names: Sequence[str], n: int, rank: int, seed: int) -> list[dict[str, LowRank]]:
    """N random LoRAs of `rank` on `names`, on the UNet's device and dtype; non-zero `up`, so deltas do real work."""
    g = torch.Generator().manual_seed(seed)
    loras = []
    for _ in range(n):
        lora = {}
        for name in names:
            w = unet.get_submodule(name).weight
            kernel = tuple(w.shape[2:])
            down = torch.randn(rank, w.shape[1], *kernel, generator=g) / math.sqrt(w[0].numel())
            up = torch.randn(w.shape[0], rank, *(1 for _ in kernel), generator=g) * (0.1 / math.sqrt(rank))
            lora[name] = LowRank(down.to(w.device, w.dtype), up.to(w.device, w.dtype), alpha=float(rank))
        loras.append(lora)
    return loras


def make_inputs(config: dict, latent: int, device: torch.device, dtype: torch.dtype, seed: int) -> tuple:
    """One image's CFG batch (cond and uncond rows): latent, timestep, text context and SDXL's extra conditioning."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, latent, latent, generator=g).to(device, dtype)
    t = torch.full((2,), 500, dtype=torch.long, device=device)
    ctx = torch.randn(2, 77, config["cross_attention_dim"], generator=g).to(device, dtype)
    if config.get("addition_embed_type") != "text_time":
        return x, t, ctx
    extra = {"text_embeds": torch.randn(2, 1280, generator=g).to(device, dtype),
             "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * 2).to(device, dtype)}
    return x, t, ctx, extra


def model_fn(unet: nn.Module) -> Callable[[tuple], Tensor]:
    """The UNet as LoRAtorio's evaluate() calls it: one pytree of inputs in, ε out."""
    def fn(args: tuple) -> Tensor:
        x, t, ctx, *extra = args
        return unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=extra[0] if extra else None).sample
    return fn


class Merger:
    """The host's merge path (A1111 without the functional forward): W = backup + Σ ΔW, restored from a backup."""

    def __init__(self, unet: nn.Module, names: Sequence[str]) -> None:
        self.layers = {name: unet.get_submodule(name) for name in names}
        # A1111 keeps its backups on the CPU; keeping them on the device only flatters this baseline.
        self.backup = {name: layer.weight.detach().clone() for name, layer in self.layers.items()}

    def merge(self, loras: Sequence[dict[str, LowRank]]) -> None:
        for name, layer in self.layers.items():
            layer.weight.copy_(self.backup[name])
            for lora in loras:
                layer.weight.add_(merged_weight(layer, lora[name]).to(layer.weight.dtype))

    def restore(self) -> None:
        for name, layer in self.layers.items():
            layer.weight.copy_(self.backup[name])


class PeakMemory:
    """Peak memory of one call: CUDA max allocated, or on CPU the peak RSS since a reset of the high-water mark.

    On Linux the RSS peak is reset through /proc/self/clear_refs; where that is impossible the number is the
    process's peak so far (monotone), and `resettable` says so.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.resettable = device.type == "cuda" or _reset_hwm()
        self._start = 0

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            _reset_hwm()
            self._start = _proc_status_bytes("VmRSS")

    def read(self) -> tuple[float, float]:
        """(peak MiB, MiB above the level at reset)."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _proc_status_bytes("VmHWM")
        return peak / 2**20, max(peak - self._start, 0) / 2**20


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5": reset the peak RSS to the current RSS (Linux ≥ 4.0, proc(5))
        return True
    except OSError:
        return False


def _proc_status_bytes(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE)
        if match:
            return int(match.group(1)) * 1024
    except OSError:
        pass
    import resource  # not on Windows; only reached off Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if platform.system() == "Darwin" else 1024)


@dataclass
class Row:
    """One timed kind of work; setup and cleanup run untimed around each call."""

    name: str
    run: Callable[[], object]
    setup: Callable[[], object] | None = None
    cleanup: Callable[[], object] | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(rows: Sequence[Row], repeats: int, warmup: int, device: torch.device,
            clock: Callable[[], float] = time.perf_counter) -> dict[str, dict[str, Any]]:
    """Median seconds and peak memory per row; rows are interleaved per repeat so that drift hits them alike."""
    mem = PeakMemory(device)
    times: dict[str, list[float]] = {row.name: [] for row in rows}
    peaks: dict[str, tuple[float, float]] = {row.name: (0.0, 0.0) for row in rows}
    for i in range(warmup + repeats):
        for row in rows:
            if row.setup:
                row.setup()
            _sync(device)
            mem.reset()
            start = clock()
            row.run()
            _sync(device)
            elapsed = clock() - start
            peak = mem.read()
            if row.cleanup:
                row.cleanup()
            if i >= warmup:
                times[row.name].append(elapsed)
                peaks[row.name] = max(peaks[row.name], peak)
    return {name: {"median_s": statistics.median(ts), "times_s": ts, "peak_mib": peaks[name][0],
                   "extra_mib": peaks[name][1], "memory_resettable": mem.resettable} for name, ts in times.items()}


def rows_for(unet: nn.Module, loras: list[dict[str, LowRank]], inputs: tuple,
             merger: Merger, kinds: Sequence[str] = KINDS, rules: FastRules | None = None) -> list[Row]:
    """The kinds of step for N = len(loras), in the order they are interleaved."""
    fn, n = model_fn(unet), len(loras)
    router = MultiAdapter(unet, loras)
    layout = BatchLayout.cond_then_uncond(1)
    x, sigma = inputs[0], torch.full((2,), 5.0, device=inputs[0].device)
    composers = {b: Composer(router, Settings(enabled=True), batched=b) for b in (False, True)}
    # A fast step right after a full one (step 0 computes Ω, step 1 reuses it as masks), as sampling meets it.
    fast_settings = Settings(enabled=True, speed="fast", full_every=100)
    # Every LoRA composed: the cost without fast mode's automatic globals, which would move random LoRAs (their
    # divergence spread alike) to every row and so shrink the full steps.
    rules = rules or FastRules(auto_global=0.0)
    fast = Composer(router, fast_settings, fast_rules=rules)
    fast_full = Composer(router, fast_settings, fast_rules=rules)  # step 0 of its own: always full
    floor_inputs = tree_repeat(inputs, n + 1)
    with router:
        preds = evaluate(fn, inputs, router, batched=True)
        if "fast" in kinds:
            fast(fn, inputs, layout, 0, x, sigma)
    rows = [
        Row("base", lambda: fn(inputs)),
        Row("remerge", lambda: merger.merge(loras)),
        Row("merged", lambda: fn(inputs), cleanup=merger.restore),
        Row("sequential", lambda: composers[False](fn, inputs, layout, 0, x, sigma), router.install, router.remove),
        Row("batched", lambda: composers[True](fn, inputs, layout, 0, x, sigma), router.install, router.remove),
        Row("fast", lambda: fast(fn, inputs, layout, 1, x, sigma), router.install, router.remove),
        Row("fast_full", lambda: fast_full(fn, inputs, layout, 0, x, sigma), router.install, router.remove),
        Row("floor", lambda: fn(floor_inputs)),
        Row("fusion", lambda: composers[True].fuse(preds, layout, 0, x, sigma)),
    ]
    # "merged" needs the merge that "remerge" makes (restored after it), and "fast" its full steps: they go together.
    wanted = set(kinds) | ({"remerge"} if "merged" in kinds else set()) | ({"fast_full"} if "fast" in kinds else set())
    return [row for row in rows if row.name in wanted]


def run_speed(args: argparse.Namespace) -> dict[str, Any]:
    """Build the model once, then measure every row for each N; returns the JSON-ready report."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    config = TINY if args.tiny else SDXL if args.sdxl else SD15
    unet = build_unet(config, device, dtype, args.seed)
    names = target_names(unet)
    inputs = make_inputs(config, args.latent, device, dtype, args.seed)
    merger = Merger(unet, names)
    per_n: dict[str, Any] = {}
    with torch.inference_mode():
        for n in args.n:
            loras = make_loras(unet, names, n, args.rank, args.seed + n)
            clock = time.process_time if args.clock == "cpu" else time.perf_counter
            rules = FastRules(text=args.fast_text, auto_global=0.0)  # every LoRA composed (see rows_for)
            rows = measure(rows_for(unet, loras, inputs, merger, args.kinds, rules), args.repeats, args.warmup,
                           device, clock)
            per_n[str(n)] = summarise(rows, loras, args.steps, args.full_every)
            print(f"N={n} done: " + ", ".join(f"{k} {v:.3f}" for k, v in per_n[str(n)].items()
                                              if isinstance(v, float) and "_over_" in k), flush=True)
    return {"machine": machine(device), "args": vars(args), "model": "tiny" if args.tiny else
            "sdxl" if args.sdxl else "sd15", "targets": len(names), "per_n": per_n}


def full_steps(steps: int, full_every: int) -> int:
    """How many of `steps` are full in speed fast: step 0, then every `full_every`-th (Composer.fast_step)."""
    return -(-steps // full_every)


def row_evaluations(n: int, steps: int, full_every: int) -> dict[str, float]:
    """UNet row-evaluations per image and step (device-independent): plain LoRA 2 (prompt, negative); LoRAtorio
    2(N+1); fast N+1 prompt rows and the 2-row masked pass on its full steps, 2 on its fast steps."""
    full = full_steps(steps, full_every)
    return {"merged": 2.0, "full": 2.0 * (n + 1), "fast": (full * (n + 3) + (steps - full) * 2) / steps}


def summarise(rows: dict[str, dict[str, Any]], loras: list[dict[str, LowRank]], steps: int = 20,
              full_every: Sequence[int] = (4,)) -> dict[str, Any]:
    """Headline ratios of one N; fast_over_merged is a whole sampling run of `steps` at each full-step interval."""
    t = {k: v["median_s"] for k, v in rows.items()}
    factors = sum(a.down.numel() * a.down.element_size() + a.up.numel() * a.up.element_size()
                  for lora in loras for a in lora.values())
    out: dict[str, Any] = {"lora_factors_mib": factors / 2**20, "rows": rows}
    if {"batched", "floor"} <= t.keys():
        out["batched_over_floor"] = t["batched"] / t["floor"]
    if {"sequential", "batched"} <= t.keys():
        out["sequential_over_batched"] = t["sequential"] / t["batched"]
    if {"fusion", "batched"} <= t.keys():
        out["fusion_over_batched"] = t["fusion"] / t["batched"]
    if {"batched", "merged"} <= t.keys():
        out["full_over_merged"] = t["batched"] / t["merged"]
    if {"fast_full", "fast", "merged"} <= t.keys():
        out["fast_step_over_merged"] = t["fast"] / t["merged"]
        out["fast_full_step_over_merged"] = t["fast_full"] / t["merged"]
        out["fast_over_merged"] = {}
        out["row_evaluations_per_image_step"] = {}
        for k in full_every:
            full = full_steps(steps, k)
            run = full * t["fast_full"] + (steps - full) * t["fast"]
            out["fast_over_merged"][str(k)] = run / (steps * t["merged"])
            out["row_evaluations_per_image_step"][str(k)] = row_evaluations(len(loras), steps, k)
    return out


def machine(device: torch.device) -> dict[str, Any]:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": str(device)}
    try:
        import diffusers
        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        try:
            with open("/proc/cpuinfo") as f:
                info["cpu"] = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE).group(1)
        except (OSError, AttributeError):
            info["cpu"] = platform.processor()
    return info


RATIOS = (("batched_over_floor", "batched/floor", "{:.3f}"), ("sequential_over_batched", "seq/batched", "{:.2f}"),
          ("fusion_over_batched", "fusion share", "{:.2%}"), ("full_over_merged", "full/merged", "{:.2f}"),
          ("fast_step_over_merged", "fast step/merged", "{:.2f}"),
          ("fast_full_step_over_merged", "fast's full step/merged", "{:.2f}"))


def format_table(report: dict[str, Any]) -> str:
    """Milliseconds per step for each row kind, the headline ratios, and peak memory above each call's start."""
    per_n = report["per_n"]
    kinds = [k for k in KINDS if k in next(iter(per_n.values()))["rows"]]
    ratios = [r for r in RATIOS if r[0] in next(iter(per_n.values()))]
    head = ["N", *kinds, *(label for _, label, _ in ratios)]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for n, r in per_n.items():
        ms = [f"{r['rows'][k]['median_s'] * 1e3:.1f}" for k in kinds]
        lines.append(" | ".join([n, *ms, *(fmt.format(r[key]) for key, _, fmt in ratios)]))
    first = next(iter(per_n.values()))
    if "fast_over_merged" in first:
        every = list(first["fast_over_merged"])
        steps = report["args"]["steps"]
        head = ["N", "full/merged", *(f"fast/merged (full every {k})" for k in every),
                "UNet rows per image and step: merged, full", *(f"fast (every {k})" for k in every)]
        lines += ["", f"cost against plain LoRA (merged, same rows) over {steps} steps", " | ".join(head),
                  " | ".join("---" for _ in head)]
        for n, r in per_n.items():
            evals = r["row_evaluations_per_image_step"]
            lines.append(" | ".join([n, f"{r['full_over_merged']:.2f}",
                                     *(f"{r['fast_over_merged'][k]:.2f}" for k in every),
                                     f"{evals[every[0]]['merged']:.0f}, {evals[every[0]]['full']:.0f}",
                                     *(f"{evals[k]['fast']:.2f}" for k in every)]))
    mem_head = ["N", *(k for k in kinds if k != "remerge"), "LoRA factors"]
    lines += ["", "extra peak memory, MiB above the level at each call's start", " | ".join(mem_head),
              " | ".join("---" for _ in mem_head)]
    for n, r in per_n.items():
        lines.append(" | ".join([n, *(f"{r['rows'][k]['extra_mib']:.0f}" for k in mem_head[1:-1]),
                                 f"{r['lora_factors_mib']:.0f}"]))
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str) -> bool:
    """Time per step against N, one line per row kind; False (with a message) if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path} (pip install matplotlib)")
        return False
    ns = [int(n) for n in report["per_n"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind in (k for k in KINDS if k in report["per_n"][str(ns[0])]["rows"]):
        ys = [report["per_n"][str(n)]["rows"][kind]["median_s"] * 1e3 for n in ns]
        ax.plot(ns, ys, marker="o", linestyle="--" if kind in ("remerge", "fusion") else "-", label=LABELS[kind])
    args = report["args"]
    ax.set(xlabel="N (LoRAs)", ylabel="ms per step (median)", yscale="log", xticks=ns,
           title=f"LoRAtorio step time, {report['model']} {args['latent']}² latent, {args['device']} {args['dtype']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m loratorio.bench speed", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="default: float16 on CUDA, else float32")
    p.add_argument("--latent", type=int, help="latent side (image side / 8); default 64 on CUDA, 32 on CPU")
    p.add_argument("--n", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="numbers of LoRAs to compose")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (typical: 8 to 64)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per row; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per row first")
    p.add_argument("--json", metavar="PATH", help="write the full report (ratios and raw timings) as JSON")
    p.add_argument("--plot", metavar="PATH", help="write time against N as a PNG (needs matplotlib)")
    p.add_argument("--sdxl", action="store_true", help="SDXL layer shapes instead of SD1.5")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # smoke tests only
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
                   help="which kinds of step to time (merged brings remerge, which makes its merge)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps for the whole-run fast/merged ratio")
    p.add_argument("--full-every", type=int, nargs="+", default=[2, 4, 6, 8],
                   help="speed fast's full-step intervals to report fast/merged for")
    p.add_argument("--fast-text", choices=TEXT_RULES, default=FastRules().text,
                   help="speed fast's cross-attention rule (FastRules.text)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: this process's CPU time, steadier on a shared CPU machine (use with --threads 1)")
    args = p.parse_args(argv)
    on_cuda = torch.device(args.device).type == "cuda"
    args.dtype = args.dtype or ("float16" if on_cuda else "float32")
    args.latent = args.latent or (64 if on_cuda else 32)
    if args.clock == "cpu" and on_cuda:
        p.error("--clock cpu measures CPU work only; GPU steps need the wall clock")
    if min(args.n) < 1 or args.repeats < 1 or args.warmup < 0 or args.rank < 1:
        p.error("--n and --rank must be >= 1, --repeats >= 1 and --warmup >= 0")
    if args.steps < 1 or min(args.full_every) < 1:
        p.error("--steps and --full-every must be >= 1")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run_speed(args)
    print(format_table(report))
    print(f"\n{report['machine']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(report, args.plot)
    return 0
