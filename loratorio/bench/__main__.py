"""`python -m loratorio.bench <command> [options]`: dispatch to one benchmark module's `main(argv)`."""

from __future__ import annotations

import importlib
import sys

# Each command is a module with `main(argv: list[str]) -> int`, imported only when chosen, so one benchmark's
# optional dependencies (diffusers, matplotlib) never stop another from running.
COMMANDS = {
    "speed": ("loratorio.bench.speed", "time and memory per step: plain, merged, LoRAtorio batched/sequential, floor"),
    "memory": ("loratorio.bench.memory", "peak memory: plain LoRA vs LoRAtorio batched/chunked/sequential, chunks per "
               "device budget"),
    "quality": ("loratorio.bench.quality", "composition score and quality of every method on the CPU miniature"),
    "train": ("loratorio.bench.train", "train the miniature (base model, skill LoRAs, judge) from scratch"),
    "formats": ("loratorio.bench.formats", "LoHa/LoKr from their factors vs a full-size ΔW, one SD-sized layer"),
    "tune": ("loratorio.bench.tune", "LoRAtorio's options on the miniature's tuning half (chose the defaults)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print("usage: python -m loratorio.bench {" + ",".join(COMMANDS) + "} [options]  (--help after a command)")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:10s} {text}")
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    return importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
