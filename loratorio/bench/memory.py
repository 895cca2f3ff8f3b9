"""`python -m loratorio.bench memory`: peak memory of plain LoRA and of LoRAtorio (batched, chunked, sequential), and
the number of chunks the memory estimator picks for the batched call under a device budget.

On a GPU the peaks are measured at the requested latent size (torch.cuda.max_memory_allocated). On the CPU they are
the process's peak RSS above each call's start, measured at small latents in fp32 and extrapolated to the target
latent and dtype: activations scale with rows × latent pixels (PyTorch's SDPA keeps attention linear in the tokens)
and with the dtype's size; the extrapolation is checked by measuring at two latent sizes.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import platform
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from loratorio.bench.speed import (
    SD15,
    SDXL,
    TINY,
    PeakMemory,
    build_unet,
    machine,
    make_inputs,
    make_loras,
    model_fn,
    target_names,
)
from loratorio.core import VALUES_PER_PIXEL, Chunker, MemoryBudget, MultiAdapter, evaluate

METHODS = ("plain", "batched", "chunked", "sequential")
GIB = 2**30


def _fixed_mmap_threshold() -> None:
    """Make glibc return every freed tensor to the OS at once (mallopt M_MMAP_THRESHOLD, which also stops the
    threshold from growing), so that RSS follows the live tensors and each call's peak above its start is its own."""
    if platform.system() != "Linux":
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        pass


def measure(unet: torch.nn.Module, names: list[str], config: dict, latent: int, ns: Sequence[int], rank: int,
            device: torch.device, dtype: torch.dtype, seed: int, repeats: int) -> dict[str, dict[str, float]]:
    """MiB above each call's start, per N and method (the largest of `repeats` calls after one warm-up)."""
    fn, inputs = model_fn(unet), make_inputs(config, latent, device, dtype, seed)
    mem, out = PeakMemory(device), {}
    for n in ns:
        loras = make_loras(unet, names, n, rank, seed + n)
        router = MultiAdapter(unet, loras)
        groups = n + 1
        half = math.ceil(groups / 2) * 2  # rows of the first of two chunks

        # plain: the host's merged LoRAs, one call of its 2 rows (prompt and negative). Merging changes weight values,
        # not memory, so it is measured as the base call (a merge would need a backup of every target weight).
        runs = {
            "plain": partial(fn, inputs),
            "batched": partial(evaluate, fn, inputs, router, batched=True),
            "chunked": partial(evaluate, fn, inputs, router, batched=True, chunker=Chunker(max_rows=half)),
            "sequential": partial(evaluate, fn, inputs, router, batched=False),
        }
        peaks = {}
        for method, run in runs.items():
            if method != "plain":
                router.install()
            try:
                best = 0.0
                for i in range(repeats + 1):
                    mem.reset()
                    run()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    if i:
                        best = max(best, mem.read()[1])
                peaks[method] = best
            finally:
                router.remove()
        factors = sum(a.down.numel() * a.down.element_size() + a.up.numel() * a.up.element_size()
                      for lora in loras for a in lora.values())
        out[str(n)] = {**peaks, "rows": 2 * groups, "factors_mib": factors / 2**20}
        print(f"latent {latent} N={n}: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in peaks.items()), flush=True)
    return out


def chunks_under(budget_gib: float, rows: int, latent: int, weights: float, peak_per_row: float) -> int:
    """Calls the Chunker plans for `rows` rows when `budget_gib` holds the weights and the rest is free."""
    free = budget_gib * GIB - weights
    budget = MemoryBudget(free=lambda: int(free), peak=lambda r, shape: r * peak_per_row)
    chunker = Chunker(budget)
    chunker.run(lambda a, b: torch.zeros(b - a), rows, 2, (4, latent, latent))
    return chunker.most_chunks if free >= peak_per_row else 0


def run_memory(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    family = "tiny" if args.tiny else "sd15" if args.sd15 else "sdxl"
    config = {"tiny": TINY, "sd15": SD15, "sdxl": SDXL}[family]
    if device.type == "cpu":
        _fixed_mmap_threshold()
    unet = build_unet(config, device, dtype, args.seed)
    names = target_names(unet)
    measured = {}
    with torch.inference_mode():
        for latent in args.latent:
            measured[str(latent)] = measure(unet, names, config, latent, args.n, args.rank, device, dtype, args.seed,
                                            args.repeats)
    target_size = torch.empty((), dtype=getattr(torch, args.target_dtype)).element_size()
    weights = sum(p.numel() for p in unet.parameters()) * target_size
    # Extrapolation: each method's MiB above the call's start, per latent pixel and dtype byte, at the largest
    # latent measured, times the target's pixels and dtype size; the fixed part (weights, LoRA factors) added.
    base = measured[str(max(args.latent))]
    scale = (args.target_latent / max(args.latent)) ** 2 * target_size / torch.empty((), dtype=dtype).element_size()
    table = {}
    for n in args.n:
        row = base[str(n)]
        factors = row["factors_mib"] * 2**20 * target_size / torch.empty((), dtype=dtype).element_size()
        peak = {m: (weights + factors + row[m] * 2**20 * scale) / GIB for m in METHODS}
        per_row = row["batched"] * 2**20 * scale / row["rows"]
        table[str(n)] = {**{f"{m}_gib": peak[m] for m in METHODS}, "rows": row["rows"],
                         "chunks": {str(b): chunks_under(b, row["rows"], args.target_latent, weights + factors,
                                                         per_row) for b in args.budgets}}
    pixels = max(args.latent) ** 2
    elem = torch.empty((), dtype=dtype).element_size()
    values = max(base[str(n)]["batched"] * 2**20 / (base[str(n)]["rows"] * pixels * elem) for n in args.n)
    return {"machine": machine(device), "args": vars(args), "model": family, "measured_mib": measured,
            "target": table, "weights_gib": weights / GIB, "values_per_pixel": values,
            "core_values_per_pixel": VALUES_PER_PIXEL.get(family)}


def format_table(report: dict[str, Any]) -> str:
    args = report["args"]
    lines = [f"measured: MiB above each call's start ({report['args']['dtype']}, {report['machine']['device']})",
             "latent | N | rows | " + " | ".join(METHODS), "---|---|---|" + "---|" * len(METHODS)]
    for latent, per_n in report["measured_mib"].items():
        for n, r in per_n.items():
            lines.append(f"{latent} | {n} | {r['rows']} | " + " | ".join(f"{r[m]:.0f}" for m in METHODS))
    side = args["target_latent"] * 8
    budgets = args["budgets"]
    lines += ["", f"{report['model']} {side}×{side}, {args['target_dtype']}: peak GiB (UNet weights "
              f"{report['weights_gib']:.2f} GiB + LoRA factors + activations); chunks the estimator picks "
              f"(0: not even one group fits)",
              "N | rows | " + " | ".join(METHODS) + " | " + " | ".join(f"chunks @ {b} GB" for b in budgets),
              "---|---|" + "---|" * (len(METHODS) + len(budgets))]
    for n, r in report["target"].items():
        lines.append(f"{n} | {r['rows']} | " + " | ".join(f"{r[m + '_gib']:.1f}" for m in METHODS) + " | "
                     + " | ".join(str(r["chunks"][str(b)]) for b in budgets))
    lines.append(f"\nmeasured activation values per row and latent pixel: {report['values_per_pixel']:.0f} "
                 f"(the core's estimate: {report['core_values_per_pixel']})")
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m loratorio.bench memory", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="measured in: float16 on CUDA, "
                   "else float32")
    p.add_argument("--latent", type=int, nargs="+", help="latent sides measured (default: 128 on CUDA, 12 16 on CPU)")
    p.add_argument("--target-latent", type=int, default=128, help="latent side of the table (128: 1024×1024 px)")
    p.add_argument("--target-dtype", choices=("float32", "float16", "bfloat16"), default="float16")
    p.add_argument("--n", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--budgets", type=float, nargs="+", default=[8, 12, 16, 24], help="device memory, GB (GiB)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--sd15", action="store_true", help="SD1.5 shapes instead of SDXL")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # smoke tests only
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    on_cuda = torch.device(args.device).type == "cuda"
    args.dtype = args.dtype or ("float16" if on_cuda else "float32")
    args.latent = args.latent or ([128] if on_cuda else [12, 16])
    if min(args.n) < 1 or args.repeats < 1:
        p.error("--n and --repeats must be >= 1")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run_memory(args)
    print(format_table(report))
    print(f"\n{report['machine']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0
