"""Install-time checks shared by the host glues, and the test-only fault hook.

`dry_run` runs every adapter once on a tiny input before the host is changed, so that a format the glue misreads
fails where sampling normally costs nothing. `inject_fault` is for tests only: it does nothing unless the
LORATORIO_TEST_FAULT environment variable names a LoRA, and then makes that LoRA's adapters raise mid-sampling.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from functools import partial

from torch import Tensor, nn

from loratorio.core import Adapter, Callback, probe

FAULT_ENV = "LORATORIO_TEST_FAULT"


def dry_run(root: nn.Module, tables: list[dict[nn.Module, Adapter]], names: Iterable[str]) -> None:
    """probe() every adapter on its layer; ValueError naming the LoRA and the layer on the first that fails."""
    paths = {m: n for n, m in root.named_modules()}
    for name, table in zip(names, tables, strict=True):
        for layer, adapter in table.items():
            try:
                probe(layer, adapter)
            except Exception as exc:  # noqa: BLE001 - any failure here means "do not compose", said with its cause
                raise ValueError(f"{name} on {paths.get(layer, type(layer).__name__)}: {type(exc).__name__}: "
                                 f"{exc}") from exc


def inject_fault(tables: list[dict[nn.Module, Adapter]], names: list[str]) -> list[dict[nn.Module, Adapter]]:
    """Test-only, inert by default: with LORATORIO_TEST_FAULT=<LoRA name>, that LoRA's adapters raise once they have
    run one model call's worth of layers, i.e. in the middle of sampling, after the install-time dry run."""
    target = os.environ.get(FAULT_ENV)
    if not target or target not in names:
        return tables
    out = list(tables)
    i = names.index(target)
    counter = [0]
    out[i] = {layer: Callback(partial(_faulty, adapter, layer, counter, len(tables[i])))
              for layer, adapter in tables[i].items()}
    return out


def _faulty(adapter: Adapter, layer: nn.Module, counter: list[int], limit: int, x: Tensor, y: Tensor) -> Tensor:
    counter[0] += 1
    if counter[0] > limit:
        raise RuntimeError(f"{FAULT_ENV}: injected failure (test only)")
    return adapter.apply(layer, x, y)
