"""Opt-in: LoRAtorio next to ControlNet on a real, running WebUI through the API (pytest -m webui).

A1111 needs the sd-webui-controlnet extension, Forge has ControlNet built in. The ControlNet model is a random-weight
SD1.5-shaped one made by tests/make_controlnet.py from the server's checkpoint (start the server with
`--controlnet-dir` pointing at it); LORATORIO_CONTROLNET names it (default "control_sd15_random"). Skips without
it. Same environment as tests/test_webui_smoke.py.

"The hint reaches every row" is checked through an invariant: with both LoRAs at a tiny multiplier every model that
LoRAtorio evaluates (the base and each LoRA) is the base model to within rounding, so LoRAtorio + ControlNet must
give the image of the bare model + ControlNet. A row evaluated without the hint moves the image by a large part of
ControlNet's own effect: the base rows through the re-centred negative, the LoRA rows through the fused prediction.
"""

from __future__ import annotations

import base64
import io
import json
import os
import urllib.error
import urllib.request

import numpy as np
import pytest

from tests.test_webui_smoke import LORAS, TWO, URL, mean_diff, txt2img

pytestmark = [pytest.mark.webui, pytest.mark.skipif(not URL, reason="set LORATORIO_WEBUI_URL to a running WebUI")]

MODEL = os.environ.get("LORATORIO_CONTROLNET", "control_sd15_random")
TINY = f" <lora:{LORAS[0]}:0.002> <lora:{LORAS[1]}:0.002>"


@pytest.fixture(scope="module")
def model_name():
    """The host's full name of the ControlNet model ("name [hash]" on A1111); skip when there is none."""
    try:
        with urllib.request.urlopen(URL + "/controlnet/model_list", timeout=60) as resp:
            models = json.loads(resp.read())["model_list"]
    except urllib.error.HTTPError:
        pytest.skip("no ControlNet API on this WebUI (A1111: install sd-webui-controlnet)")
    names = [m for m in models if m.split(" [")[0] == MODEL]
    if not names:
        pytest.skip(f"no ControlNet model {MODEL!r} (tests/make_controlnet.py, --controlnet-dir); have {models}")
    return names[0]


@pytest.fixture(scope="module")
def none_module():
    """The host's name of the pass-through preprocessor ("none" in sd-webui-controlnet, "None" in Forge)."""
    with urllib.request.urlopen(URL + "/controlnet/module_list", timeout=60) as resp:
        modules = json.loads(resp.read())["module_list"]
    return next(m for m in modules if m.lower() == "none")


def hint(kind, size=64):
    """A hint image as base64 PNG: a bright disc, or horizontal stripes."""
    from PIL import Image

    yy, xx = np.mgrid[:size, :size]
    if kind == "disc":
        pixels = ((yy - size / 2) ** 2 + (xx - size / 3) ** 2 < (size / 4) ** 2) * 255
    else:
        pixels = ((yy // 8) % 2) * 255
    buf = io.BytesIO()
    Image.fromarray(np.repeat(pixels[..., None], 3, axis=2).astype(np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def unit(model, kind="disc", module="none"):
    return {"enabled": True, "module": module, "model": model, "image": hint(kind), "weight": 1.0,
            "resize_mode": "Just Resize", "processor_res": 64, "pixel_perfect": False, "control_mode": "Balanced",
            "guidance_start": 0.0, "guidance_end": 1.0}


def run(prompt_suffix="", loratorio=None, control=None):
    scripts = {}
    if loratorio is not None:
        scripts["LoRAtorio"] = {"args": [loratorio]}
    if control is not None:
        scripts["ControlNet"] = {"args": [control]}
    images, info = txt2img(prompt_suffix, alwayson_scripts=scripts) if scripts else txt2img(prompt_suffix)
    params = info["extra_generation_params"]
    assert "LoRAtorio warning" not in params, params["LoRAtorio warning"]
    return images[0], params


def test_the_controlnet_model_changes_the_image(model_name, none_module):
    bare, _ = run()
    disc, params = run(control=unit(model_name, module=none_module))
    stripes, _ = run(control=unit(model_name, "stripes", module=none_module))
    assert bare.std() > 5 and np.isfinite(disc).all() and disc.std() > 5
    assert any(k.startswith("ControlNet") for k in params), params
    assert mean_diff(disc, bare) > 3.0 and mean_diff(disc, stripes) > 3.0


@pytest.mark.parametrize("evaluation", ["auto", "batched", "sequential"])
def test_the_hint_reaches_the_base_and_every_lora_row(model_name, none_module, evaluation):
    reference, _ = run(control=unit(model_name, module=none_module))
    bare, _ = run()
    composed, params = run(TINY, {"enabled": True, "patch_size": 4, "evaluation": evaluation},
                           control=unit(model_name, module=none_module))
    assert params["LoRAtorio evaluation"] == evaluation
    effect = mean_diff(reference, bare)
    assert mean_diff(composed, reference) < 0.05 * effect, (mean_diff(composed, reference), effect)


def test_the_hint_reaches_every_row_in_speed_fast(model_name, none_module):
    """Speed fast calls the UNet three ways: the full steps' prompt rows (base and each LoRA), the masked pass of the
    host's rows, and that pass again on a full step for the residual. Each must see the hint, or the image moves
    away from the bare model + ControlNet by a part of ControlNet's effect (the residual carries a missing hint of the
    full step into the fast steps)."""
    reference, _ = run(control=unit(model_name, module=none_module))
    bare, _ = run()
    composed, params = run(TINY, {"enabled": True, "patch_size": 4, "speed": "fast", "full_every": 2},
                           control=unit(model_name, module=none_module))
    assert params["LoRAtorio speed"] == "fast" and params["LoRAtorio full every"] == "2"
    effect = mean_diff(reference, bare)
    assert mean_diff(composed, reference) < 0.05 * effect, (mean_diff(composed, reference), effect)


@pytest.mark.parametrize("speed", ["full", "fast"])
def test_composition_with_controlnet(model_name, none_module, speed):
    settings = {"enabled": True, "patch_size": 4, "speed": speed, "full_every": 2}
    plain_lora, _ = run(TWO, control=unit(model_name, module=none_module))
    composed, _ = run(TWO, settings, control=unit(model_name, module=none_module))
    without_control, _ = run(TWO, settings)
    assert np.isfinite(composed).all() and composed.std() > 5
    assert mean_diff(composed, without_control) > 3.0 and mean_diff(composed, plain_lora) > 0.5
