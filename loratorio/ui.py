"""The LoRAtorio accordion (Gradio 3 on A1111 / reForge, Gradio 4 on Forge), built from the Settings definition.

Components are returned in `ARG_ORDER`, so the API's positional args, the UI and the infotext share one list.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

from loratorio.core import ARG_ORDER, Settings
from loratorio.core.settings import LEGACY, infotext_key

ADVANCED = ("reference", "evaluation", "switch_interval", "start", "end", "reuse", "full_every", "min_share",
            "auto_global", "temperature_end", "relative", "smoothing")
STEPS = {"patch_size": 1, "temperature": 0.005, "recentre": 0.05, "top_k": 1, "switch_interval": 1, "start": 0.05,
         "end": 0.05, "reuse": 1, "full_every": 1, "min_share": 0.01, "auto_global": 0.05, "temperature_end": 0.005,
         "smoothing": 0.05}
SLIDER_MAX = {"patch_size": 32, "temperature": 1.0, "top_k": 8, "switch_interval": 50, "reuse": 20, "full_every": 20,
              "min_share": 0.5, "auto_global": 2.0, "temperature_end": 1.0}


def _component(gr: Any, f: dataclasses.Field, elem_id: str) -> Any:
    meta, default = f.metadata, f.default
    label = meta["label"][:1].upper() + meta["label"][1:]  # "Global LoRAs", not str.capitalize()'s "Global loras"
    kwargs = {"label": label, "value": default, "elem_id": f"{elem_id}_{f.name}"}
    if meta["help"]:
        kwargs["info"] = meta["help"]
    if meta["choices"]:
        return gr.Dropdown(choices=list(meta["choices"]), **kwargs)
    if f.type in (bool, "bool"):
        return gr.Checkbox(**kwargs)
    if f.type in (str, "str"):
        return gr.Textbox(**kwargs)
    # Slider ranges are the everyday ones; the API accepts the full validated range.
    return gr.Slider(minimum=meta["lo"], maximum=SLIDER_MAX.get(f.name, meta["hi"]), step=STEPS[f.name], **kwargs)


def build(gr: Any, input_accordion: Any, is_img2img: bool) -> list[Any]:
    """The accordion's components in ARG_ORDER; `input_accordion` is the host's InputAccordion class."""
    tab = "img2img" if is_img2img else "txt2img"
    elem_id = f"loratorio_{tab}"
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    made: dict[str, Any] = {}
    with input_accordion(False, label="LoRAtorio", elem_id=elem_id) as enabled:
        made["enabled"] = enabled
        with gr.Row():
            for name in ("mode", "speed", "patch_size", "temperature"):
                made[name] = _component(gr, fields[name], elem_id)
        with gr.Row():
            for name in ("recentre", "top_k", "show_maps"):
                made[name] = _component(gr, fields[name], elem_id)
        made["global_loras"] = _component(gr, fields["global_loras"], elem_id)
        with gr.Accordion("Advanced", open=False):
            for name in ADVANCED:
                made[name] = _component(gr, fields[name], elem_id)
    return [made[name] for name in ARG_ORDER]


def infotext_fields(components: list[Any]) -> list[tuple[Any, Any]]:
    """(component, infotext key) pairs for "paste parameters"; `enabled` follows the presence of our keys."""
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    mode_key = infotext_key(fields["mode"])
    pairs: list[tuple[Any, Any]] = [(components[0], lambda params: mode_key in params)]
    for name, component in zip(ARG_ORDER[1:], components[1:], strict=True):
        if name in LEGACY:
            pairs.append((component, partial(_legacy, infotext_key(fields[name]), mode_key, str(LEGACY[name]))))
        elif name != "show_maps":
            pairs.append((component, infotext_key(fields[name])))
    return pairs


def _legacy(key: str, mode_key: str, legacy: str, params: dict) -> Any:
    """A LoRAtorio infotext without this key predates it: its value then was `legacy`; no LoRAtorio keys: no change."""
    if key in params:
        return params[key]
    return legacy if mode_key in params else None
