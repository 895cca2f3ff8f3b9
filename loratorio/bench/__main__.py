"""`python -m loratorio.bench <command> [options]`: dispatch to one benchmark module's `main(argv)`."""

from __future__ import annotations

import importlib
import sys

# Each command is a module with `main(argv: list[str]) -> int`; imported only when chosen, so one benchmark's
# optional dependencies never stop another from running.
COMMANDS = {
    "speed": "loratorio.bench.speed",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m loratorio.bench {{{','.join(COMMANDS)}}} [options]  (--help after a command)",
              file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
