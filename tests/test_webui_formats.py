"""Opt-in real-host matrix (pytest -m webui): every LyCORIS format of tests/lycoris_files.py on a running WebUI.

Set LORATORIO_WEBUI_URL; the files (lyco_<format>.safetensors) must be in the host's LoRA folder. Optional:
LORATORIO_WEBUI_LOG (the server's log file: no "unmatched"/"not loaded" lines may appear during a test),
LORATORIO_KOHYA (the kohya LoRA to compose with, default styleA), LORATORIO_FORMATS (comma list, default all),
LORATORIO_FAULT_LORA (a LoRA name the server was started with as LORATORIO_TEST_FAULT: the fallback test).

Per format: composed with the kohya LoRA it answers 200 with the LoRAtorio infotext, no warning and an image that
differs from plain; the format's LoRA held by Switch for every step (the kohya LoRA at text-encoder weight 0, so the
prompt encodes alike) equals the host's plain LoRA within 1/255. A format the host itself cannot load is skipped,
with the host's log line as the reason.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.test_webui_smoke import URL, mean_diff, txt2img

FORMATS = os.environ.get("LORATORIO_FORMATS", "locon,loha,lokr,lokr_w1ab,dora,ia3,full,kohya_locon").split(",")
KOHYA = os.environ.get("LORATORIO_KOHYA", "styleA")
LOG = os.environ.get("LORATORIO_WEBUI_LOG", "")
FAULT = os.environ.get("LORATORIO_FAULT_LORA", "")
BAD_LOG = ("unmatched", "not loaded", "mismatch", "networks with errors", "error", "traceback")
pytestmark = [pytest.mark.webui, pytest.mark.skipif(not URL, reason="set LORATORIO_WEBUI_URL to a running WebUI")]


class Log:
    """The server log's lines written since construction."""

    def __init__(self) -> None:
        self.start = os.path.getsize(LOG) if LOG else 0

    def new(self) -> list[str]:
        if not LOG:
            return []
        with open(LOG, errors="replace") as f:
            f.seek(self.start)
            return f.read().splitlines()

    def bad(self) -> list[str]:
        return [line for line in self.new() if any(b in line.lower() for b in BAD_LOG)]


def has_contrast(image: np.ndarray) -> bool:
    return bool(np.isfinite(image).all() and image.std() > 5.0)


_PLAIN: dict[str, tuple[np.ndarray, list[str]]] = {}


def plain_lora(name: str) -> np.ndarray:
    """The host's own image with `name` alone (once per session); skip when the host cannot load the file by itself
    (e.g. IA3 on Forge/reForge, which have no IA3 loader): the log line is the reason."""
    if name not in _PLAIN:
        log = Log()
        images, _ = txt2img(f" <lora:{name}:1>" if name else "")
        _PLAIN[name] = images[0], log.bad()
    image, bad = _PLAIN[name]
    if bad:
        pytest.skip(f"the host itself does not load {name}: {bad[0][:200]}")
    assert has_contrast(image)
    return image


@pytest.mark.parametrize("fmt", FORMATS)
def test_format_composes_with_a_kohya_lora(fmt):
    name = f"lyco_{fmt}"
    plain_lora(name)
    two = f" <lora:{name}:1> <lora:{KOHYA}:1>"
    log = Log()
    plain, _ = txt2img(two)
    composed, info = txt2img(two, [{"enabled": True}])
    params = info["extra_generation_params"]
    assert "LoRAtorio warning" not in params, params.get("LoRAtorio warning")
    assert params["LoRAtorio mode"] == "loratorio"
    assert has_contrast(plain[0]) and has_contrast(composed[0])
    assert mean_diff(plain[0], composed[0]) > 0.5
    assert not log.bad(), log.bad()[:3]


@pytest.mark.parametrize("fmt", FORMATS)
def test_format_held_by_switch_equals_the_hosts_plain_lora(fmt):
    """LoRAtorio's routed delta of the format's LoRA alone = the host's own merge of it (λ = 0, N = 1)."""
    name = f"lyco_{fmt}"
    plain = [plain_lora(name)]
    log = Log()
    routed, info = txt2img(f" <lora:{name}:1> <lora:{KOHYA}:0:1>",
                           [{"enabled": True, "mode": "switch", "switch_interval": 1000}])
    assert "LoRAtorio warning" not in info["extra_generation_params"], info["extra_generation_params"]
    assert mean_diff(plain[0], plain_lora("")) > 0.5  # the format's LoRA changes the image at all
    diff = mean_diff(plain[0], routed[0])
    print(f"{fmt}: mean |routed - host| = {diff:.3f} levels, max {np.abs(plain[0] - routed[0]).max():.0f}")
    assert diff <= 1.0  # 1/255 of the pixel range
    assert not log.bad(), log.bad()[:3]


@pytest.mark.skipif(not FAULT, reason="start the server with LORATORIO_TEST_FAULT=<name> and set LORATORIO_FAULT_LORA")
def test_an_adapter_failing_mid_sampling_falls_back_to_the_host():
    """The fault hook makes FAULT's adapters raise in the second model call: 200, a warning in the infotext, the
    rest sampled by the host (= a run composing only the first step), and the model left exactly as it was."""
    two = f" <lora:{FAULT}:1> <lora:{KOHYA}:1>"
    before, _ = txt2img(two)
    failed, info = txt2img(two, [{"enabled": True}])
    warning = info["extra_generation_params"].get("LoRAtorio warning", "")
    assert "LoRAtorio stopped" in warning and "LORATORIO_TEST_FAULT" in warning, warning
    assert "sampled normally" in warning
    assert has_contrast(failed[0])
    first_step_only, _ = txt2img(two, [{"enabled": True, "end": 0.25}])
    assert mean_diff(failed[0], first_step_only[0]) <= 1.0
    after, _ = txt2img(two)
    assert np.array_equal(before[0], after[0])
