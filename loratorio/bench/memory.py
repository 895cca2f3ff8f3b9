"""`python -m loratorio.bench memory`: peak memory of plain LoRA and of LoRAtorio (batched, chunked, sequential), and
the number of chunks the memory estimator picks for the batched call under a device budget.

Three ways to measure, by --device:
- cuda: torch.cuda.max_memory_allocated above each call's start, at the requested latent size.
- meta (the default without a GPU): the model runs on PyTorch's meta device (shapes, no data, no compute), and every
  tensor an operation allocates is counted until it is freed; the peak of the live bytes is what CUDA's allocator
  would report as allocated, less kernels' workspaces. Attention is counted as a fused kernel (flash /
  memory-efficient SDPA, xformers: the output only), as the hosts run it on a GPU. Measured at the table's size.
- cpu: the process's peak RSS above each call's start, at small latents in fp32, extrapolated to the target latent
  and dtype. On SDXL at small latents a constant of about 120 MiB (likely oneDNN's reordered copy of the largest conv
  weight, made per call) hides the activations, so the meta count is the one to read there.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import platform
import weakref
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

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
from loratorio.core import VALUES_PER_PIXEL, Chunker, MemoryBudget, MultiAdapter, activation_peak, evaluate
from loratorio.core.masked import MaskStack
from loratorio.core.routing import stacked_bytes

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


class FusedAttention(TorchFunctionMode):
    """scaled_dot_product_attention as a fused kernel allocates it: the output, no tokens × tokens matrix (on the meta
    device PyTorch would take the math path and count every attention matrix)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q = args[0] if args else kwargs["query"]
            v = args[2] if len(args) > 2 else kwargs["value"]
            return q.new_empty(*q.shape[:-1], v.shape[-1])
        return func(*args, **kwargs)


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages operations allocate while the mode is on, each counted until it is freed; `peak`
    is the most alive at once. Views and in-place results share an input's storage and count nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._alive: set[int] = set()

    def _freed(self, key: int, size: int) -> None:
        self._alive.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, Tensor):
                continue
            # PyTorch keeps one Python object per storage while it lives, so its id names the storage.
            storage = t.untyped_storage()
            key = id(storage)
            if key in inputs or key in self._alive:
                continue
            size = storage.nbytes()
            self._alive.add(key)
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key, size)
        return out


class CountedPeak:
    """PeakMemory's interface for the meta device: the live-bytes peak of the calls run through `run`."""

    resettable = True

    def __init__(self) -> None:
        self.peak = self.kept = 0

    def reset(self) -> None:
        self.peak = self.kept = 0

    def run(self, call: Any) -> None:
        with FusedAttention(), LiveBytes() as live:
            call()
        self.peak = max(self.peak, live.peak)
        self.kept = live.live  # allocated by the call and still alive after it: what the router caches

    def read(self) -> tuple[float, float]:
        return self.peak / 2**20, self.peak / 2**20


def measure(unet: torch.nn.Module, names: list[str], config: dict, latent: int, ns: Sequence[int], rank: int,
            device: torch.device, dtype: torch.dtype, seed: int, repeats: int) -> dict[str, dict[str, float]]:
    """MiB above each call's start, per N and method (the largest of `repeats` calls after one warm-up), with the
    rows of the largest single model call each method makes."""
    fn, inputs = model_fn(unet), make_inputs(config, latent, device, dtype, seed)
    mem, out = CountedPeak() if device.type == "meta" else PeakMemory(device), {}

    kept: dict[str, float] = {}

    def peak_of(run: Any, method: str = "plain") -> float:
        best = 0.0
        for i in range(repeats + 1):  # the first call builds what the router caches (stacked factors): not counted
            mem.reset()
            if isinstance(mem, CountedPeak):
                mem.run(run)
                if not i:
                    kept[method] = mem.kept / 2**20
            else:
                run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:
                best = max(best, mem.read()[1])
        return best

    # plain: the host's merged LoRAs, one call of its 2 rows (prompt and negative). Merging changes weight values,
    # not memory, so it is measured as the base call (a merge would need a backup of every target weight).
    plain = peak_of(partial(fn, inputs))
    for n in ns:
        loras = make_loras(unet, names, n, rank, seed + n)
        router = MultiAdapter(unet, loras)
        groups = n + 1
        half = math.ceil(groups / 2) * 2  # rows of the first of two chunks
        runs = {
            "batched": (partial(evaluate, fn, inputs, router, batched=True), 2 * groups),
            "chunked": (partial(evaluate, fn, inputs, router, batched=True, chunker=Chunker(max_rows=half)), half),
            "sequential": (partial(evaluate, fn, inputs, router, batched=False), 2),
        }
        peaks, call_rows = {"plain": plain}, {"plain": 2}
        with router:
            for method, (run, rows) in runs.items():
                peaks[method], call_rows[method] = peak_of(run, method), rows
        factors = sum(a.down.numel() * a.down.element_size() + a.up.numel() * a.up.element_size()
                      for lora in loras for a in lora.values())
        # Counted on meta: what the router keeps once built (its stacked copy of the Linear layers' factors).
        cache = max(kept.values(), default=0.0)
        kept.clear()
        out[str(n)] = {**peaks, "rows": 2 * groups, "call_rows": call_rows, "factors_mib": factors / 2**20,
                       "router_cache_mib": cache, "mask_cache_mib": mask_stack_bytes(router) / 2**20}
        print(f"latent {latent} N={n}: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in peaks.items()), flush=True)
    return out


def mask_stack_bytes(router: MultiAdapter) -> int:
    """Bytes of the factors' copy that speed fast's masked passes stack (every low-rank LoRA of a layer as one
    rank-Σr LoRA). The router holds it instead of the routed copy, not beside it (tests/test_fast.py); counted by
    building it, because a masked pass reads its masks' values, which the meta device does not have."""
    return stacked_bytes(MaskStack.build(module, table, router.n_adapters) for module, table in router.targets.items())


def fit(measured: dict[str, dict[str, Any]]) -> tuple[float, float]:
    """Least squares MiB = c + a · (rows of the call × latent pixels) over every measured call: (a, c)."""
    xs, ys = [], []
    for latent, per_n in measured.items():
        for r in per_n.values():
            for method in METHODS:
                xs.append(r["call_rows"][method] * int(latent) ** 2)
                ys.append(r[method])
    x, y = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    a = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    return a, float(y.mean() - a * x.mean())


def chunks_under(budget_gib: float, rows: int, latent: int, weights: float, peak: Any) -> int:
    """Calls the Chunker plans for `rows` rows when `budget_gib` holds the weights and the rest is free (0: not even
    one row fits)."""
    free = budget_gib * GIB - weights
    chunker = Chunker(MemoryBudget(free=lambda: int(free), peak=lambda r, shape: peak(r)))
    chunker.run(lambda a, b: torch.zeros(b - a), rows, 2, (4, latent, latent))
    return chunker.most_chunks if free >= peak(1) else 0


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
    # Extrapolation: activations grow with rows × latent pixels (fitted over every measured call) and with the
    # dtype's size; weights and LoRA factors are counted in the target dtype.
    elem = torch.empty((), dtype=dtype).element_size()
    ratio = torch.empty((), dtype=getattr(torch, args.target_dtype)).element_size() / elem
    a, c = fit(measured)
    pixels = args.target_latent ** 2

    def activations(rows: int) -> float:
        return (c + a * rows * pixels) * 2**20 * ratio

    weights = sum(p.numel() for p in unet.parameters()) * elem * ratio
    # The chunks are what the hosts' estimator plans (A1111: the core's calibrated values per pixel), where it has one.
    core = VALUES_PER_PIXEL.get(family)
    if core is not None:
        estimate = activation_peak(core, getattr(torch, args.target_dtype))

        def planned(rows: int) -> float:
            return estimate(rows, (4, args.target_latent, args.target_latent))
    else:
        planned = activations
    last = measured[str(args.latent[-1])]
    table = {}
    for n in args.n:
        row = last[str(n)]
        fixed = weights + (row["factors_mib"] + row.get("router_cache_mib", 0.0)) * 2**20 * ratio
        held = fixed + args.resident * GIB
        # Plain LoRA is the host's merge: the weights only (A1111's backup of the patched weights not counted).
        table[str(n)] = {**{f"{m}_gib": ((weights if m == "plain" else fixed) + activations(row["call_rows"][m])) / GIB
                            for m in METHODS},
                         "rows": row["rows"],
                         "chunks": {str(b): chunks_under(b, row["rows"], args.target_latent, held, planned)
                                    for b in args.budgets}}
    return {"machine": machine(device), "args": vars(args), "model": family, "measured_mib": measured,
            "target": table, "weights_gib": weights / GIB, "fit_mib_per_row_pixel": a, "fit_fixed_mib": c,
            "values_per_pixel": a * 2**20 / elem, "core_values_per_pixel": VALUES_PER_PIXEL.get(family)}


def format_table(report: dict[str, Any]) -> str:
    args = report["args"]
    how = {"meta": "tensors allocated, counted on the meta device, attention fused", "cuda": "CUDA allocated"}
    kind = report["machine"]["device"].split(":")[0]
    lines = [f"measured: MiB above each call's start ({report['args']['dtype']}, {report['machine']['device']}: "
             f"{how.get(kind, 'process RSS')})",
             "latent | N | rows | " + " | ".join(METHODS), "---|---|---|" + "---|" * len(METHODS)]
    for latent, per_n in report["measured_mib"].items():
        for n, r in per_n.items():
            lines.append(f"{latent} | {n} | {r['rows']} | " + " | ".join(f"{r[m]:.0f}" for m in METHODS))
    lines += ["", "N | LoRA factors | the router's copy: routed calls | speed fast's masked passes (MiB; one of the "
              "two is held at a time)", "---|---|---|---|"]
    for n, r in report["measured_mib"][str(args["latent"][-1])].items():
        lines.append(f"{n} | {r['factors_mib']:.0f} | {r['router_cache_mib']:.0f} | {r['mask_cache_mib']:.0f}")
    side = args["target_latent"] * 8
    budgets = args["budgets"]
    lines += ["", f"{report['model']} {side}×{side}, {args['target_dtype']}: peak GiB (UNet weights "
              f"{report['weights_gib']:.2f} GiB + LoRA factors and the router's copy + activations); chunks the "
              f"estimator picks "
              f"with {args['resident']:g} GiB of other models resident (0: not even one group fits)",
              "N | rows | " + " | ".join(METHODS) + " | " + " | ".join(f"chunks @ {b:g} GB" for b in budgets),
              "---|---|" + "---|" * (len(METHODS) + len(budgets))]
    for n, r in report["target"].items():
        lines.append(f"{n} | {r['rows']} | " + " | ".join(f"{r[m + '_gib']:.1f}" for m in METHODS) + " | "
                     + " | ".join(str(r["chunks"][str(b)]) for b in budgets))
    lines.append(f"\nfit over the measured calls: {report['fit_fixed_mib']:.0f} MiB + "
                 f"{report['values_per_pixel']:.0f} values per row and latent pixel (the core's estimate: "
                 f"{report['core_values_per_pixel']})")
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m loratorio.bench memory", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if cuda else "meta",
                   help="cuda: measured; meta (default without a GPU): allocations counted; cpu: RSS, extrapolated")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="measured in: float32 on the CPU, "
                   "else float16")
    p.add_argument("--latent", type=int, nargs="+", help="latent sides measured (default: the target's; 24 32 on "
                   "the CPU)")
    p.add_argument("--target-latent", type=int, default=128, help="latent side of the table (128: 1024×1024 px)")
    p.add_argument("--target-dtype", choices=("float32", "float16", "bfloat16"), default="float16")
    p.add_argument("--n", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--budgets", type=float, nargs="+", default=[8, 12, 16, 24], help="device memory, GB (GiB)")
    p.add_argument("--resident", type=float, default=0.0, metavar="GIB",
                   help="other models on the device beside the UNet (SDXL's text encoders and VAE in fp16: 1.7)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--sd15", action="store_true", help="SD1.5 shapes instead of SDXL")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # smoke tests only
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    on_cpu = torch.device(args.device).type == "cpu"
    args.dtype = args.dtype or ("float32" if on_cpu else "float16")
    args.latent = args.latent or ([24, 32] if on_cpu else [args.target_latent])
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
