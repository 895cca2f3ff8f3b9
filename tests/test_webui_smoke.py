"""Opt-in smoke tests against a real, running WebUI with this extension installed (pytest -m webui).

Set LORATORIO_WEBUI_URL (e.g. http://127.0.0.1:7861). The same tests run for SD1.5 and SDXL; the environment names
the model and the LoRAs (tests/webui/make_models.py writes both sets):

  LORATORIO_LORAS       2 or 3 LoRA names composed together (default "lora_a,lora_b"); the first two are also used
                        alone and in the routed-equals-merged check; a third enables the global-LoRA test
  LORATORIO_TE_LORA     a LoRA with text-encoder parts (on both encoders for SDXL); its tests skip without it
  LORATORIO_CHECKPOINT  part of the loaded checkpoint's name that the tests insist on (e.g. "sdxl-random"), so that an
                        SDXL run cannot silently test another model; unset: whatever is loaded
  LORATORIO_SIZE        image side in pixels (default 64; 256 for SDXL on a CPU)
  LORATORIO_STEPS       sampling steps (default 4)

Forge 2.x and reForge serve the same /sdapi/v1 API and alwayson_scripts args, so this file is their smoke test too.
Skipped cleanly when no WebUI is set.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import urllib.error
import urllib.request

import numpy as np
import pytest

from loratorio.core import Settings

URL = os.environ.get("LORATORIO_WEBUI_URL", "")
LORAS = os.environ.get("LORATORIO_LORAS", "lora_a,lora_b").split(",")
TE_LORA = os.environ.get("LORATORIO_TE_LORA", "")
CHECKPOINT = os.environ.get("LORATORIO_CHECKPOINT", "")
SIZE = int(os.environ.get("LORATORIO_SIZE", "64"))
pytestmark = [pytest.mark.webui, pytest.mark.skipif(not URL, reason="set LORATORIO_WEBUI_URL to a running WebUI")]

BASE = {"prompt": "a cat in a garden", "negative_prompt": "", "seed": 1234,
        "steps": int(os.environ.get("LORATORIO_STEPS", "4")), "width": SIZE, "height": SIZE, "cfg_scale": 5,
        "sampler_name": "Euler"}
ALL = "".join(f" <lora:{name}:1>" for name in LORAS)
TWO = f" <lora:{LORAS[0]}:1> <lora:{LORAS[1]}:1>"  # the first two LoRAs alone
HIRES = {"enable_hr": True, "hr_scale": 1.25, "hr_upscaler": "Latent", "denoising_strength": 0.6,
         "hr_second_pass_steps": 2}


def post(path, payload):
    req = urllib.request.Request(URL + path, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=3600) as resp:
        return json.loads(resp.read())


@functools.lru_cache(maxsize=1)
def options():
    with urllib.request.urlopen(URL + "/sdapi/v1/options", timeout=60) as resp:
        return json.loads(resp.read())


def hires_extras():
    """Forge 2.x reads hr_additional_modules unguarded in hires fix, and its API defaults it to None."""
    return {"hr_additional_modules": ["Use same choices"]} if "forge_additional_modules" in options() else {}


def decode(out):
    from PIL import Image

    images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(i))).convert("RGB"), dtype=np.float64)
              for i in out["images"]]
    return images, json.loads(out["info"])


@functools.lru_cache(maxsize=32)
def _plain(path, payload_json):
    """Plain requests (LoRAtorio off) are deterministic on these hosts: each is made once per session."""
    return decode(post(path, json.loads(payload_json)))


def generate(path, prompt_suffix="", loratorio=None, **overrides):
    payload = {**BASE, **overrides, "prompt": BASE["prompt"] + prompt_suffix}
    if loratorio is None:
        return _plain(path, json.dumps(payload, sort_keys=True))
    payload["alwayson_scripts"] = {"LoRAtorio": {"args": loratorio}}
    return decode(post(path, payload))


def txt2img(prompt_suffix="", loratorio=None, **overrides):
    return generate("/sdapi/v1/txt2img", prompt_suffix, loratorio, **overrides)


def img2img(prompt_suffix="", loratorio=None, **overrides):
    return generate("/sdapi/v1/img2img", prompt_suffix, loratorio, **overrides)


def mean_diff(a, b):
    return float(np.abs(a - b).mean())


def assert_contrast(image):
    """A comparison means something only if the image is a real one: not flat, not black (the hosts' NaN)."""
    assert image.std() > 8 and image.mean() > 4, (image.mean(), image.std())


def assert_composed(info):
    params = info["extra_generation_params"]
    assert "LoRAtorio warning" not in params, params.get("LoRAtorio warning")
    assert params["LoRAtorio mode"] in ("loratorio", "composite", "switch")


def skip_if_the_host_requantises_its_merge():
    """A1111's FP8 weight re-quantises each merged LoRA weight to fp8 (networks.py: `weight.copy_((weight + updown)
    .to(fp8))`) while LoRAtorio adds the exact delta, so the host's plain LoRA is no reference within 1/255 there.
    With "Lora functional" the host adds the delta in the forward, and the comparison holds again."""
    o = options()
    if o.get("fp8_storage", "Disable") != "Disable" and not o.get("lora_functional", False):
        pytest.skip("A1111 FP8 weight re-quantises the host's merged LoRA: no exact reference")


@pytest.fixture(scope="module", autouse=True)
def expected_checkpoint():
    if CHECKPOINT:
        assert CHECKPOINT in options()["sd_model_checkpoint"], options()["sd_model_checkpoint"]


def test_enabled_differs_from_plain_and_writes_infotext():
    plain, _ = txt2img(ALL)
    assert_contrast(plain[0])
    composed, info = txt2img(ALL, [{"enabled": True, "patch_size": 4}])
    assert_composed(info)
    assert info["extra_generation_params"]["LoRAtorio patch size"] == "4"
    assert mean_diff(plain[0], composed[0]) > 0.5


def test_smoothing_changes_the_composition_and_writes_infotext():
    plain, _ = txt2img(ALL)
    assert_contrast(plain[0])
    fresh, _ = txt2img(ALL, [{"enabled": True, "patch_size": 4}])
    again, _ = txt2img(ALL, [{"enabled": True, "patch_size": 4}])
    smooth, info = txt2img(ALL, [{"enabled": True, "patch_size": 4, "smoothing": 0.8}])
    assert_composed(info)
    assert info["extra_generation_params"]["LoRAtorio smoothing"] == "0.8"
    # At this size the random LoRAs' maps barely change over the steps, so the effect is small; composition is
    # deterministic here, so any difference is the smoothing's.
    assert np.array_equal(fresh[0], again[0]) and mean_diff(fresh[0], smooth[0]) > 0


def test_single_lora_is_plain_lora():
    plain, _ = txt2img(f" <lora:{LORAS[0]}:1>")
    assert_contrast(plain[0])
    single, info = txt2img(f" <lora:{LORAS[0]}:1>", [{"enabled": True, "recentre": 0.0}])
    assert mean_diff(plain[0], single[0]) <= 1.0  # 1/255 of the pixel range
    assert "needs 2 or more LoRAs" in info["extra_generation_params"]["LoRAtorio warning"]


def test_routed_lora_equals_host_merged_lora():
    """Switch mode holding LoRA a for every step runs base + a's routed delta: it must match the host's merge.

    LoRA b's text-encoder multiplier is 0, so both requests encode the prompt alike.
    """
    skip_if_the_host_requantises_its_merge()
    plain, _ = txt2img(f" <lora:{LORAS[0]}:1>")
    assert_contrast(plain[0])
    routed, info = txt2img(f" <lora:{LORAS[0]}:1> <lora:{LORAS[1]}:0:1>",
                           [{"enabled": True, "mode": "switch", "switch_interval": 1000}])
    assert_composed(info)
    assert mean_diff(plain[0], routed[0]) <= 1.0


@pytest.mark.skipif(len(LORAS) < 3, reason="needs a third LoRA name in LORATORIO_LORAS")
def test_global_lora_stays_merged_while_the_others_are_composed():
    """LoRA c global, a and b composed in Switch mode holding a: base + c merged + a routed = the host's a + c.

    b's text-encoder multiplier is 0, so both requests encode the prompt alike.
    """
    skip_if_the_host_requantises_its_merge()
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
    before, _ = txt2img(ALL)
    txt2img(ALL, [{"enabled": True}])
    after, _ = decode(post("/sdapi/v1/txt2img", {**BASE, "prompt": BASE["prompt"] + ALL,
                                                "alwayson_scripts": {"LoRAtorio": {"args": [False]}}}))
    assert np.array_equal(before[0], after[0])


def test_positional_args_and_timestep_sampler_with_batch_and_hires():
    images, info = txt2img(ALL, [True, "loratorio", 4, 0.05, 0.5, 0, "cond", "auto", 5, 0.0, 1.0, False],
                           sampler_name="DDIM", batch_size=2, **HIRES, **hires_extras())
    assert len(images) == 2 and images[0].shape[0] == int(SIZE * HIRES["hr_scale"])
    assert_composed(info)
    assert_contrast(images[1])


def test_multistep_sampler_dpmpp_2m():
    plain, _ = txt2img(ALL, sampler_name="DPM++ 2M")
    assert_contrast(plain[0])
    composed, info = txt2img(ALL, [{"enabled": True, "patch_size": 4}], sampler_name="DPM++ 2M")
    assert_composed(info)
    assert mean_diff(plain[0], composed[0]) > 0.5


@functools.lru_cache(maxsize=1)
def sampler_names():
    with urllib.request.urlopen(URL + "/sdapi/v1/samplers", timeout=60) as resp:
        return {s["name"] for s in json.loads(resp.read())}


# Samplers that call the model more than once per step (Heun, DPM2 a, the SDE ones), step back up the noise
# schedule (Restart), carry model outputs across steps (UniPC, a timestep sampler on A1111) or denoise to x0 at every
# step (LCM): LoRAtorio counts the host's model calls as its steps, and speed fast picks its full steps by that count.
@pytest.mark.parametrize("speed", ["full", "fast"])
@pytest.mark.parametrize("sampler", ["Heun", "DPM2 a", "DPM++ SDE", "DPM++ 2M SDE", "Restart", "UniPC", "LCM"])
def test_every_kind_of_sampler_composes(sampler, speed):
    if sampler not in sampler_names():
        pytest.skip(f"no sampler {sampler!r} on this host")
    plain, _ = txt2img(ALL, sampler_name=sampler)
    assert_contrast(plain[0])
    composed, info = txt2img(ALL, [{"enabled": True, "patch_size": 4, "speed": speed, "full_every": 2}],
                             sampler_name=sampler)
    assert_composed(info)
    assert info["extra_generation_params"]["LoRAtorio speed"] == speed
    assert np.isfinite(composed[0]).all() and composed[0].std() > 5
    assert mean_diff(plain[0], composed[0]) > 0.5


def test_img2img():
    from PIL import Image

    init, _ = txt2img("")
    buf = io.BytesIO()
    Image.fromarray(init[0].astype(np.uint8)).save(buf, format="PNG")
    extra = {"init_images": [base64.b64encode(buf.getvalue()).decode()], "denoising_strength": 0.6}
    plain, _ = img2img(ALL, **extra)
    assert_contrast(plain[0])
    composed, info = img2img(ALL, [{"enabled": True, "patch_size": 4}], **extra)
    assert_composed(info)
    assert mean_diff(plain[0], composed[0]) > 0.5


def test_refiner_field_left_empty_is_no_model_swap():
    images, info = txt2img(ALL, [{"enabled": True, "patch_size": 4}], refiner_checkpoint="", refiner_switch_at=0.8)
    assert_composed(info)
    assert_contrast(images[0])


@pytest.mark.skipif(not TE_LORA, reason="set LORATORIO_TE_LORA to a LoRA with text-encoder parts")
def test_text_encoder_lora_is_encoded_as_the_host_does():
    """The TE parts change the prompt's encoding (the host loaded them); LoRAtorio leaves that encoding to the host:
    routed (switch mode holding the TE LoRA) equals the host's own merge of it, text encoders included."""
    with_te, _ = txt2img(f" <lora:{TE_LORA}:1>")
    unet_only, _ = txt2img(f" <lora:{TE_LORA}:0:1>")
    assert_contrast(with_te[0])
    assert mean_diff(with_te[0], unet_only[0]) > 0.5
    other = next(name for name in LORAS if name != TE_LORA)
    routed, info = txt2img(f" <lora:{TE_LORA}:1> <lora:{other}:0:1>",
                           [{"enabled": True, "mode": "switch", "switch_interval": 1000}])
    assert_composed(info)
    assert mean_diff(with_te[0], routed[0]) <= 1.0
    composed, info = txt2img(f" <lora:{TE_LORA}:1> <lora:{other}:1>", [{"enabled": True, "patch_size": 4}])
    assert_composed(info)
    assert mean_diff(with_te[0], composed[0]) > 0.5


def test_bad_value_is_an_error_and_the_server_keeps_serving():
    with pytest.raises(urllib.error.HTTPError) as err:
        txt2img(ALL, [{"enabled": True, "patch_size": 0}])
    assert err.value.code == 422  # the client's mistake, not a server error
    assert "'patch_size' must be in [1, 128]" in err.value.read().decode()
    images, _ = decode(post("/sdapi/v1/txt2img", {**BASE, "prompt": BASE["prompt"] + ALL}))  # not the cached one
    assert images


def test_fast_speed_composes_without_warning_and_writes_infotext():
    full, _ = txt2img(ALL, [{"enabled": True, "patch_size": 4}])
    plain, _ = txt2img(ALL)
    fast, info = txt2img(ALL, [{"enabled": True, "patch_size": 4, "speed": "fast", "full_every": 2}])
    params = info["extra_generation_params"]
    assert "LoRAtorio warning" not in params, params.get("LoRAtorio warning")
    assert params["LoRAtorio speed"] == "fast" and params["LoRAtorio full every"] == "2"
    assert fast[0].std() > 1.0 and np.isfinite(fast[0]).all()  # a real image, not flat
    assert mean_diff(fast[0], full[0]) > 0.0  # steps 1 and 3 were one masked pass, not base + every LoRA
    assert mean_diff(fast[0], plain[0]) > 0.5  # and not the host's merge
    # Without `full_every` the request gets the core's default interval, and the infotext records it.
    default, info = txt2img(ALL, [{"enabled": True, "patch_size": 4, "speed": "fast"}])
    params = info["extra_generation_params"]
    assert "LoRAtorio warning" not in params, params.get("LoRAtorio warning")
    assert params["LoRAtorio full every"] == str(Settings().full_every) and np.isfinite(default[0]).all()


def test_fast_speed_with_a_full_step_every_step_is_full_speed():
    full, _ = txt2img(ALL, [{"enabled": True, "patch_size": 4}])
    every, info = txt2img(ALL, [{"enabled": True, "patch_size": 4, "speed": "fast", "full_every": 1}])
    assert "LoRAtorio warning" not in info["extra_generation_params"]
    assert np.array_equal(full[0], every[0])


def test_fast_speed_positional_with_and_prompt_batch_hires_and_timestep_sampler():
    args = [True, "loratorio", 4, 0.05, 0.5, 0, "cond", "auto", 5, 0.0, 1.0, False, 0, "fast", 2]
    images, info = txt2img(ALL + " AND a dog", args, sampler_name="DDIM", batch_size=2, enable_hr=True, hr_scale=1.5,
                           hr_upscaler="Latent", denoising_strength=0.6, hr_second_pass_steps=3, **hires_extras())
    params = info["extra_generation_params"]
    assert len(images) == 2 and "LoRAtorio warning" not in params, params.get("LoRAtorio warning")
    assert params["LoRAtorio speed"] == "fast"
    images, info = txt2img(ALL, args, sampler_name="DPM++ 2M", cfg_scale=1.0, steps=5)
    assert "LoRAtorio warning" not in info["extra_generation_params"]
