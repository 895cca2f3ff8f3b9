"""Wall-clock cost of LoRAtorio on a running WebUI, with and without ControlNet (not a test: a measurement).

    LORATORIO_WEBUI_URL=http://127.0.0.1:7861 python3 -m tests.webui_timing [--steps 4 12] [--repeats 1]
        [--no-controlnet] [--modes batched fast]

Marginal seconds per step between a short and a long request (start-up and decoding cancel out), for plain LoRA and
LoRAtorio (auto, batched, sequential, and speed fast with a full step every 4), each without and (unless
--no-controlnet) with the ControlNet of tests/make_controlnet.py. Uses the environment of tests/test_webui_smoke.py
(the first two LoRAs of LORATORIO_LORAS) and LORATORIO_CONTROLNET of tests/test_webui_controlnet.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import urllib.request

from tests.test_webui_controlnet import MODEL, unit
from tests.test_webui_smoke import TWO, URL, txt2img

log = logging.getLogger("webui_timing")
MODES = ("auto", "batched", "sequential", "fast")


def controlnet_names() -> tuple[str, str]:
    """The host's names of the ControlNet model and of the pass-through preprocessor."""
    with urllib.request.urlopen(URL + "/controlnet/model_list", timeout=60) as resp:
        models = json.loads(resp.read())["model_list"]
    with urllib.request.urlopen(URL + "/controlnet/module_list", timeout=60) as resp:
        modules = json.loads(resp.read())["module_list"]
    return next(m for m in models if m.split(" [")[0] == MODEL), next(m for m in modules if m.lower() == "none")


def timed(steps: int, loratorio: dict | None, control: dict | None, repeats: int) -> float:
    scripts = {}
    if loratorio is not None:
        scripts["LoRAtorio"] = {"args": [loratorio]}
    if control is not None:
        scripts["ControlNet"] = {"args": [control]}
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        _, info = txt2img(TWO, steps=steps, alwayson_scripts=scripts)
        best = min(best, time.perf_counter() - start)
        warning = info["extra_generation_params"].get("LoRAtorio warning")
        if warning:
            raise RuntimeError(warning)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs=2, default=[4, 12])
    parser.add_argument("--repeats", type=int, default=1, help="requests per point; the fastest counts")
    parser.add_argument("--no-controlnet", action="store_true", help="time without ControlNet only")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="rows to time (plain LoRA is always timed: the ratios need it)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    short, long = args.steps
    rows = [("plain LoRA", None)] + [(f"LoRAtorio {e}", {"enabled": True, "evaluation": e})
                                     for e in ("auto", "batched", "sequential") if e in args.modes]
    if "fast" in args.modes:
        rows.append(("LoRAtorio fast (full every 4)", {"enabled": True, "speed": "fast", "full_every": 4}))
    txt2img(TWO, steps=2)  # warm-up: loads the LoRAs
    table = {}
    controls = [("no ControlNet", None)]
    if not args.no_controlnet:
        model, module = controlnet_names()
        controls.append(("ControlNet", unit(model, module=module)))
    for control_name, control in controls:
        for name, loratorio in rows:
            t_short = timed(short, loratorio, control, args.repeats)
            t_long = timed(long, loratorio, control, args.repeats)
            table[(name, control_name)] = (t_long - t_short) / (long - short)
            log.info("%-22s %-14s %6.2f s/step  (%d steps %.1f s, %d steps %.1f s)", name, control_name,
                     table[(name, control_name)], short, t_short, long, t_long)
    if args.no_controlnet:
        log.info("\n| | s/step | / plain LoRA |\n|---|---|---|")
        for name, _ in rows:
            a = table[(name, "no ControlNet")]
            log.info("| %s | %.2f | %.2f× |", name, a, a / table[("plain LoRA", "no ControlNet")])
        return
    log.info("\n| | no ControlNet | ControlNet | ControlNet / plain LoRA + ControlNet |\n|---|---|---|---|")
    reference = table[("plain LoRA", "ControlNet")]
    for name, _ in rows:
        a, b = table[(name, "no ControlNet")], table[(name, "ControlNet")]
        log.info("| %s | %.2f | %.2f | %.2f× |", name, a, b, b / reference)


if __name__ == "__main__":
    main()
