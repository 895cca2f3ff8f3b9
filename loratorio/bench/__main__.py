"""`python -m loratorio.bench <command>`: dispatch to a benchmark's own argument parser."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "quality": ("loratorio.bench.quality", "composition score and quality of every method on the CPU miniature"),
    "train": ("loratorio.bench.train", "train the miniature (base model, skill LoRAs, judge) from scratch"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print("usage: python -m loratorio.bench {" + ",".join(COMMANDS) + "} [options]")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:10s} {text}")
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
