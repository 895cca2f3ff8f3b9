"""The entry script's lifecycle against fake `modules` / `gradio` packages (A1111's Script API surface)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from loratorio.core import ARG_ORDER, MemoryBudget
from tests import fake_a1111 as fake
from tests.test_a1111 import Host, conds, latent, sample, simple

ROOT = Path(__file__).resolve().parents[1]


class Component:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        self.value = kwargs.get("value", args[0] if args else None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def module(name, **attrs):
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    mod.__dict__.update(attrs)
    return mod


def load_entry(monkeypatch, host_modules: dict, sd_model, callbacks: dict, name: str):
    """Install fake host modules (the shared `modules.*` plus `host_modules`) and load scripts/loratorio.py."""
    reports = []

    class Script:
        pass

    mods = {
        "gradio": module("gradio", Slider=Component, Dropdown=Component, Checkbox=Component, Row=Component,
                         Accordion=Component, Textbox=Component),
        "modules": module("modules"),
        "modules.scripts": module("modules.scripts", Script=Script, AlwaysVisible=object(), scripts_data=[]),
        "modules.script_callbacks": module("modules.script_callbacks",
                                           **{"on_before_ui": lambda f: None, **callbacks}),
        "modules.errors": module("modules.errors", report=lambda msg, exc_info=False: reports.append(msg)),
        "modules.shared": module("modules.shared", sd_model=sd_model),
        "modules.ui_components": module("modules.ui_components", InputAccordion=Component),
        "modules.devices": module("modules.devices", device=torch.device("cpu")),
        **host_modules,
    }
    for mod_name, mod in mods.items():
        monkeypatch.setitem(sys.modules, mod_name, mod)
    for sub in ("errors", "script_callbacks", "scripts", "shared", "ui_components", "sd_samplers_cfg_denoiser",
                "devices"):
        if f"modules.{sub}" in mods:
            monkeypatch.setattr(mods["modules"], sub, mods[f"modules.{sub}"], raising=False)
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "loratorio.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    return entry, reports


@pytest.fixture
def script_env(monkeypatch):
    host = Host()
    registered = {}
    callbacks = {"on_cfg_denoiser": lambda f: registered.setdefault("denoiser", f),
                 "on_cfg_denoised": lambda f: registered.setdefault("denoised", f)}
    host_modules = {
        "modules.sd_samplers_cfg_denoiser": module("modules.sd_samplers_cfg_denoiser", CFGDenoiser=fake.CFGDenoiser),
        "networks": host.networks_module,
    }
    entry, reports = load_entry(monkeypatch, host_modules, host.sd_model, callbacks, "loratorio_entry_script")
    host.callbacks = fake.Callbacks([registered["denoiser"]], [registered["denoised"]])
    return SimpleNamespace(host=host, entry=entry, script=entry.LoratorioScript(), reports=reports)


def make_p(host):
    denoiser = host.denoiser()
    return SimpleNamespace(sampler=SimpleNamespace(model_wrap_cfg=denoiser), extra_generation_params={}), denoiser


def test_ui_order_and_infotext_fields(script_env):
    components = script_env.script.ui(False)
    assert len(components) == len(ARG_ORDER)
    assert components[ARG_ORDER.index("patch_size")].kwargs["label"] == "Patch size"
    assert components[ARG_ORDER.index("global_loras")].kwargs["label"] == "Global LoRAs"
    keys = [k for _, k in script_env.script.infotext_fields if isinstance(k, str)]
    assert "LoRAtorio patch size" in keys and script_env.entry.HOST == "a1111"
    # relative's default changed: PNG Info of an older LoRAtorio image restores it off; of a new one, as written;
    # of an image without LoRAtorio, leaves the checkbox alone.
    named = [n for n in ARG_ORDER if n != "show_maps"]  # show maps is not restored
    relative = dict(zip(named, script_env.script.infotext_fields, strict=True))["relative"][1]
    assert relative({"LoRAtorio mode": "loratorio"}) == "False"
    assert relative({"LoRAtorio mode": "loratorio", "LoRAtorio relative": "True"}) == "True"
    assert relative({"Steps": "20"}) is None


def test_enabled_run_installs_composes_and_cleans_up(script_env):
    env = script_env
    p, denoiser = make_p(env.host)
    env.script.process(p, {"enabled": True, "patch_size": 4})
    assert p.extra_generation_params["LoRAtorio patch size"] == "4"
    env.script.process_before_every_sampling(p, {"enabled": True, "patch_size": 4})
    assert env.script.state is not None and "LoRAtorio warning" not in p.extra_generation_params
    x, c, u = latent(), conds(), conds(seed=8)
    composed = sample(denoiser, x, simple(c), u)
    env.script.postprocess(p, SimpleNamespace(images=[], infotexts=[]))
    assert env.script.state is None and not isinstance(denoiser.model_wrap, env.entry.a1111.RoutedInnerModel)
    plain = sample(env.host.denoiser(), x, simple(c), u)
    assert (composed - plain).abs().mean() > 1e-3


def test_disabled_changes_nothing(script_env):
    env = script_env
    p, denoiser = make_p(env.host)
    args = [False]
    env.script.process(p, *args)
    env.script.process_before_every_sampling(p, *args)
    assert p.extra_generation_params == {} and denoiser.model_wrap is None
    x, c, u = latent(), conds(), conds(seed=8)
    assert torch.equal(sample(denoiser, x, simple(c), u), sample(env.host.denoiser(), x, simple(c), u))


def test_bad_api_value_fails_the_request_with_a_clear_error(script_env):
    """A1111 reports and swallows hook exceptions, so the script raises again from the first sampling call."""
    env = script_env
    p, denoiser = make_p(env.host)
    with pytest.raises(ValueError, match="unknown LoRAtorio setting"):
        env.script.process(p, {"enabled": True, "tau": 1})
    args = {"enabled": True, "temperature": -1}
    with pytest.raises(ValueError, match="'temperature' must be in"):
        env.script.process(p, args)
    env.script.process_before_every_sampling(p, args)
    with pytest.raises(ValueError, match="'temperature' must be in") as err:
        sample(denoiser, latent(), simple(conds()), conds(seed=8))
    assert vars(err.value).get("status_code", 500) == 422  # what the host's API answers (api.py), not a 500
    env.script.postprocess(p, SimpleNamespace(images=[], infotexts=[]), args)
    assert not isinstance(denoiser.model_wrap, env.entry.a1111.InnerModelProxy)
    p2, denoiser2 = make_p(env.host)  # the next request is clean
    env.script.process(p2, {"enabled": False})
    env.script.process_before_every_sampling(p2, {"enabled": False})
    assert denoiser2.model_wrap is None


def test_positional_args_in_ui_order(script_env):
    p, _ = make_p(script_env.host)
    script_env.script.process(p, True, "composite", 4, 0.1, 0.5, 0, "cond", "auto", 5, 0.0, 1.0, False)
    assert p.extra_generation_params["LoRAtorio mode"] == "composite"


def test_show_maps_adds_images(script_env):
    env = script_env
    p, denoiser = make_p(env.host)
    args = {"enabled": True, "patch_size": 4, "show_maps": True}
    env.script.process(p, args)
    env.script.process_before_every_sampling(p, args)
    sample(denoiser, latent(), simple(conds()), conds(seed=8))
    env.script.postprocess_batch(p, args)
    processed = SimpleNamespace(images=[], infotexts=[])
    env.script.postprocess(p, processed, args)
    assert len(processed.images) == 4  # 2 images × 2 LoRAs
    assert processed.images[0].size == (64, 64) and "weight map: a" in processed.infotexts[0]


def test_install_failure_is_reported_and_sampling_is_plain(script_env, monkeypatch):
    env = script_env
    p, denoiser = make_p(env.host)
    env.script.process(p, {"enabled": True})
    monkeypatch.setattr(env.entry.a1111, "unet_adapters", lambda *a: 1 / 0)
    env.script.process_before_every_sampling(p, {"enabled": True})
    assert env.reports and "could not start" in p.extra_generation_params["LoRAtorio warning"]
    assert denoiser.model_wrap is None and env.host.unet._forward_pre_hooks == {}


def test_chunking_goes_into_the_infotext_and_the_console_once(script_env, monkeypatch, caplog):
    """A budget that fits one copy of the host's rows: base and two LoRAs take 3 calls ('LoRAtorio chunks')."""
    env, args = script_env, {"enabled": True, "patch_size": 4}
    x, c, u = latent(), conds(), conds(seed=8)
    p, denoiser = make_p(env.host)
    env.script.process(p, args)
    env.script.process_before_every_sampling(p, args)
    one_call = sample(denoiser, x, simple(c), u)
    env.script.postprocess_batch(p, args)
    assert "LoRAtorio chunks" not in p.extra_generation_params

    rows = 2 * x.shape[0]  # cond and uncond rows of two images
    tight = MemoryBudget(free=lambda: rows, peak=lambda n, shape: n)  # one byte a row, `rows` bytes free
    monkeypatch.setattr(env.entry.a1111, "memory_budget", lambda *a, **k: tight)
    p, denoiser = make_p(env.host)
    env.script.process(p, args)
    with caplog.at_level(logging.INFO, logger="loratorio"):
        for _ in range(2):  # two batches of one generation: one console line
            env.script.process_before_every_sampling(p, args)
            chunked = sample(denoiser, x, simple(c), u)
            env.script.postprocess_batch(p, args)
            assert p.extra_generation_params["LoRAtorio chunks"] == 3
    assert sum("split into 3 chunks" in r.getMessage() for r in caplog.records) == 1
    torch.testing.assert_close(chunked, one_call, rtol=1e-5, atol=1e-5)
