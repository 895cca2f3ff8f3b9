"""LoRAtorio's settings as X/Y/Z plot axes (A1111, Forge and reForge share scripts/xyz_grid.py's AxisOption API).

The plot shallow-copies the processing object for each cell and calls every axis's `apply(p, value, values)` on the
copy before processing it. These axes leave their value in a fresh per-cell dict on that copy; the entry script's
`process` lays it over the script's own args, so the cell samples and writes its infotext with the axis value.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Any

from loratorio.core import Settings
from loratorio.core.settings import INFOTEXT_PREFIX, field_value, infotext_key

log = logging.getLogger(__name__)

ATTR = "loratorio_xyz"
# How the host names a loaded script module: A1111/Forge/reForge load scripts/xyz_grid.py as "xyz_grid.py".
MODULE_NAMES = ("xyz_grid.py", "scripts.xyz_grid")
# Settings that make no sense per cell: show_maps adds images to a cell, which the grid cannot lay out.
NO_AXIS = frozenset({"show_maps"})


def axis_fields() -> list[dataclasses.Field]:
    """The settings offered as axes: every field of Settings but NO_AXIS, so a new setting becomes an axis too."""
    return [f for f in dataclasses.fields(Settings) if f.name not in NO_AXIS]


def find_module(scripts_data: Iterable[Any]) -> Any | None:
    """The host's loaded xyz_grid module, from modules.scripts.scripts_data (ScriptClassData entries)."""
    for data in scripts_data:
        if getattr(data.script_class, "__module__", None) in MODULE_NAMES and getattr(data, "module", None):
            return data.module
    return None


def register(xyz_module: Any) -> list[str]:
    """Append one AxisOption per setting to the plot's `axis_options` (once); the labels added."""
    existing = {option.label for option in xyz_module.axis_options}
    added = []
    for f in axis_fields():
        label = infotext_key(f)  # "LoRAtorio temperature": the grid legend reads like the infotext
        if label not in existing:
            xyz_module.axis_options.append(_option(xyz_module.AxisOption, f, label))
            added.append(label)
    return added


def register_with(scripts_data: Iterable[Any]) -> list[str]:
    """on_before_ui: find the plot among the loaded scripts (all are loaded by then) and add the axes."""
    module = find_module(scripts_data)
    if module is None:
        log.info("LoRAtorio: no X/Y/Z plot script is loaded; no LoRAtorio axes added")
        return []
    return register(module)


def with_overrides(settings: Settings, p: Any) -> Settings:
    """This cell's settings: its axis values over the script's args. A value axis alone also turns LoRAtorio on."""
    overrides = getattr(p, ATTR, None)
    if not overrides:
        return settings
    return Settings.from_dict({**settings.to_dict(), "enabled": True, **overrides})


def clear_infotext(params: dict) -> None:
    """Drop LoRAtorio's keys: the plot's cells share one extra_generation_params dict, so a cell with LoRAtorio off
    would otherwise carry the previous cell's values."""
    for key in [k for k in params if isinstance(k, str) and k.startswith(f"{INFOTEXT_PREFIX} ")]:
        del params[key]


def _option(axis_option: type, f: dataclasses.Field, label: str) -> Any:
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    choices = None
    if f.metadata["choices"]:
        choices = _constant(list(f.metadata["choices"]))
    elif kind == "bool":
        choices = _constant(["True", "False"])
    value_type = {"int": int, "float": float}.get(kind, str)
    return axis_option(label, value_type, _apply(f.name), confirm=_confirm(f.name), choices=choices)


def _constant(values: list[str]) -> Callable[[], list[str]]:
    return lambda: list(values)


def _apply(name: str) -> Callable[[Any, Any, list], None]:
    def apply(p: Any, value: Any, values: list) -> None:
        # A new dict per cell: the plot's copy of p is shallow, and a shared dict would leak into later cells.
        setattr(p, ATTR, {**getattr(p, ATTR, {}), name: field_value(name, value)})
    return apply


def _confirm(name: str) -> Callable[[Any, list], None]:
    def confirm(p: Any, values: list) -> None:
        """Checked by the plot before the first cell, so a bad value stops the plot with the setting's range."""
        for value in values:
            field_value(name, value)
    return confirm
