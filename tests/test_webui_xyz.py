"""Opt-in: LoRAtorio's X/Y/Z plot axes on a real, running WebUI through the API (pytest -m webui).

The plot runs as the selectable script "x/y/z plot" with positional script_args; they differ between hosts (reForge
adds a few), so they are laid out by label from /sdapi/v1/script-info, and the axis is picked by its label among the
X type dropdown's choices. Same environment as tests/test_webui_smoke.py.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.test_webui_smoke import BASE, TWO, URL, mean_diff, post, txt2img

pytestmark = [pytest.mark.webui, pytest.mark.skipif(not URL, reason="set LORATORIO_WEBUI_URL to a running WebUI")]


def script_info(name, img2img=False):
    with urllib.request.urlopen(URL + "/sdapi/v1/script-info", timeout=60) as resp:
        scripts = json.loads(resp.read())
    (found,) = [s for s in scripts if s["name"] == name and s["is_img2img"] == img2img]
    return found


def choice_labels(arg):
    """Gradio 3.41 lists dropdown choices as [label, value] pairs, Gradio 4 as well, older ones as plain labels."""
    return [c[0] if isinstance(c, (list, tuple)) else c for c in arg["choices"]]


def plot_args(axis, values, values_list=None):
    """The X/Y/Z plot's script_args: `axis` on X over `values` (text) or `values_list` (a choice axis), no Y/Z,
    and the cells' own images returned after the grid."""
    info = script_info("x/y/z plot")
    labels = [a["label"] for a in info["args"]]
    args = [a["value"] for a in info["args"]]
    x_type = labels.index("X type")
    options = choice_labels(info["args"][x_type])
    assert axis in options, f"{axis!r} is not an X/Y/Z plot axis here: {options[-12:]}"
    args[x_type] = options.index(axis)
    for name in ("Y type", "Z type"):
        args[labels.index(name)] = 0  # "Nothing"
    first_values = labels.index("X values")
    args[first_values] = values
    args[first_values + 1] = values_list or []  # the dropdown twin of the text box
    args[labels.index("Include Sub Images")] = True
    args[labels.index("Include Sub Grids")] = False
    return args


def decode(out, save_first=""):
    import base64
    import io

    from PIL import Image

    images = [Image.open(io.BytesIO(base64.b64decode(i))).convert("RGB") for i in out["images"]]
    if save_first:
        Path(save_first).parent.mkdir(parents=True, exist_ok=True)
        images[0].save(save_first)
    return [np.asarray(image, dtype=np.float64) for image in images]


def run_plot(axis, values, values_list=None, loratorio=None, save_grid=""):
    payload = {**BASE, "prompt": BASE["prompt"] + TWO, "script_name": "x/y/z plot",
               "script_args": plot_args(axis, values, values_list)}
    if loratorio is not None:
        payload["alwayson_scripts"] = {"LoRAtorio": {"args": loratorio}}
    out = post("/sdapi/v1/txt2img", payload)
    return decode(out, save_grid), json.loads(out["info"])["infotexts"]


def test_a_mode_axis_gives_three_different_cells_each_with_its_value():
    modes = ["loratorio", "composite", "switch"]
    shots = os.environ.get("LORATORIO_SCREENSHOTS", "")
    images, infotexts = run_plot("LoRAtorio mode", "", modes, loratorio=[{"enabled": True, "patch_size": 4}],
                                 save_grid=shots and os.path.join(shots, "xyz_mode.png"))
    assert len(images) == 4, infotexts  # the grid, then the three cells
    grid, cells = images[0], images[1:]
    assert grid.shape[1] >= 3 * cells[0].shape[1]
    assert cells[0].std() > 5 and np.isfinite(cells[0]).all()
    for (a, b) in [(0, 1), (1, 2), (0, 2)]:
        assert mean_diff(cells[a], cells[b]) > 0.5, (a, b)
    for mode, text in zip(modes, infotexts[1:], strict=True):
        assert f"LoRAtorio mode: {mode}," in text and "LoRAtorio patch size: 4," in text, text
        assert "LoRAtorio warning" not in text, text
    assert "X Type: LoRAtorio mode" in infotexts[0]


def test_a_temperature_axis_writes_each_value():
    images, infotexts = run_plot("LoRAtorio temperature", "0.01, 5", loratorio=[{"enabled": True, "patch_size": 4}])
    assert [t.split("LoRAtorio temperature: ")[1].split(",")[0] for t in infotexts[1:]] == ["0.01", "5.0"]
    assert mean_diff(images[1], images[2]) > 0.5


def test_the_on_off_axis_turns_it_off_per_cell_bit_identically():
    images, infotexts = run_plot("LoRAtorio enabled", "", ["True", "False"], loratorio=[{"enabled": False}])
    on, off = images[1], images[2]
    assert "LoRAtorio mode: loratorio" in infotexts[1] and "LoRAtorio" not in infotexts[2], infotexts
    plain, _ = txt2img(TWO)
    assert np.array_equal(off, plain[0]) and mean_diff(on, plain[0]) > 0.5


def test_a_bad_axis_value_is_refused_with_its_range():
    payload = {**BASE, "prompt": BASE["prompt"] + TWO, "script_name": "x/y/z plot",
               "script_args": plot_args("LoRAtorio patch size", "4, 0")}
    with pytest.raises(urllib.error.HTTPError) as err:
        post("/sdapi/v1/txt2img", payload)
    assert "'patch_size' must be in [1, 128]" in err.value.read().decode()
