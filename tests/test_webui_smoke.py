"""Opt-in smoke tests against a real, running WebUI with this extension installed (pytest -m webui).

Set LORATORIO_WEBUI_URL (e.g. http://127.0.0.1:7861) and LORATORIO_LORAS (two LoRA names, default
"lora_a,lora_b"; a third name enables the global-LoRA test); the LoRAs should have UNet weights only, so that prompts
with and without a tag differ only in the UNet. Skipped cleanly when no WebUI is set. Forge 2.x and reForge serve the
same /sdapi/v1 API and alwayson_scripts args, so this file is their smoke test too (point LORATORIO_WEBUI_URL at
them).
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

URL = os.environ.get("LORATORIO_WEBUI_URL", "")
LORAS = os.environ.get("LORATORIO_LORAS", "lora_a,lora_b").split(",")
pytestmark = [pytest.mark.webui, pytest.mark.skipif(not URL, reason="set LORATORIO_WEBUI_URL to a running WebUI")]

BASE = {"prompt": "a cat in a garden", "negative_prompt": "", "seed": 1234, "steps": 4, "width": 64,
        "height": 64, "cfg_scale": 5, "sampler_name": "Euler"}
TWO = f" <lora:{LORAS[0]}:1> <lora:{LORAS[1]}:1>"


def post(path, payload):
    req = urllib.request.Request(URL + path, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())


def hires_extras():
    """Forge 2.x reads hr_additional_modules unguarded in hires fix, and its API defaults it to None."""
    with urllib.request.urlopen(URL + "/sdapi/v1/options", timeout=60) as resp:
        forge = "forge_additional_modules" in json.loads(resp.read())
    return {"hr_additional_modules": ["Use same choices"]} if forge else {}


def txt2img(prompt_suffix="", loratorio=None, **overrides):
    payload = {**BASE, **overrides, "prompt": BASE["prompt"] + prompt_suffix}
    if loratorio is not None:
        payload["alwayson_scripts"] = {"LoRAtorio": {"args": loratorio}}
    out = post("/sdapi/v1/txt2img", payload)
    from PIL import Image

    images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(i))).convert("RGB"), dtype=np.float64)
              for i in out["images"]]
    return images, json.loads(out["info"])


def mean_diff(a, b):
    return float(np.abs(a - b).mean())


def test_enabled_differs_from_plain_and_writes_infotext():
    plain, _ = txt2img(TWO)
    composed, info = txt2img(TWO, [{"enabled": True, "patch_size": 4}])
    params = info["extra_generation_params"]
    assert "LoRAtorio warning" not in params, params.get("LoRAtorio warning")
    assert params["LoRAtorio patch size"] == "4" and params["LoRAtorio mode"] == "loratorio"
    assert mean_diff(plain[0], composed[0]) > 0.5


def test_single_lora_is_plain_lora():
    plain, _ = txt2img(f" <lora:{LORAS[0]}:1>")
    single, info = txt2img(f" <lora:{LORAS[0]}:1>", [{"enabled": True, "recentre": 0.0}])
    assert mean_diff(plain[0], single[0]) <= 1.0  # 1/255 of the pixel range
    assert "needs 2 or more LoRAs" in info["extra_generation_params"]["LoRAtorio warning"]


def test_routed_lora_equals_host_merged_lora():
    """Switch mode holding LoRA a for every step runs base + a's routed delta: it must match the host's merge.

    LoRA b's text-encoder multiplier is 0, so both requests encode the prompt alike.
    """
    plain, _ = txt2img(f" <lora:{LORAS[0]}:1>")
    routed, info = txt2img(f" <lora:{LORAS[0]}:1> <lora:{LORAS[1]}:0:1>",
                           [{"enabled": True, "mode": "switch", "switch_interval": 1000}])
    assert "LoRAtorio warning" not in info["extra_generation_params"]
    assert mean_diff(plain[0], routed[0]) <= 1.0


@pytest.mark.skipif(len(LORAS) < 3, reason="needs a third LoRA name in LORATORIO_LORAS")
def test_global_lora_stays_merged_while_the_others_are_composed():
    """LoRA c global, a and b composed in Switch mode holding a: base + c merged + a routed = the host's a + c.

    b's text-encoder multiplier is 0, so both requests encode the prompt alike.
    """
    plain, _ = txt2img(f" <lora:{LORAS[0]}:1> <lora:{LORAS[2]}:1>")
    routed, info = txt2img(f" <lora:{LORAS[0]}:1> <lora:{LORAS[1]}:0:1> <lora:{LORAS[2]}:1>",
                           [{"enabled": True, "mode": "switch", "switch_interval": 1000, "global_loras": LORAS[2]}])
    params = info["extra_generation_params"]
    assert "LoRAtorio warning" not in params, params.get("LoRAtorio warning")
    assert params["LoRAtorio global LoRAs"] == LORAS[2].lower()
    assert mean_diff(plain[0], routed[0]) <= 1.0
    without, _ = txt2img(f" <lora:{LORAS[0]}:1>")
    assert mean_diff(plain[0], without[0]) > 0.5  # c changes the image, so the check above can fail


def test_disabled_after_enabled_is_bit_identical():
    before, _ = txt2img(TWO)
    txt2img(TWO, [{"enabled": True}])
    after, _ = txt2img(TWO, [False])
    assert np.array_equal(before[0], after[0])


def test_positional_args_and_timestep_sampler_with_batch_and_hires():
    images, info = txt2img(TWO, [True, "loratorio", 4, 0.05, 0.5, 0, "cond", "auto", 5, 0.0, 1.0, False],
                           sampler_name="DDIM", batch_size=2, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent",
                           denoising_strength=0.6, hr_second_pass_steps=3, **hires_extras())
    assert len(images) == 2 and "LoRAtorio warning" not in info["extra_generation_params"]


def test_bad_value_is_an_error_and_the_server_keeps_serving():
    with pytest.raises(urllib.error.HTTPError) as err:
        txt2img(TWO, [{"enabled": True, "patch_size": 0}])
    assert "'patch_size' must be in [1, 128]" in err.value.read().decode()
    images, _ = txt2img(TWO)
    assert images
