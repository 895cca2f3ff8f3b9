"""X/Y/Z plot axes: registration into a fake of the host's xyz_grid module, and cells run the way the plot runs them.

The fake plot follows scripts/xyz_grid.py (A1111 v1.10.1; Forge and reForge alike): `AxisOption(label, type, apply,
format_value, confirm, cost, choices, prepare)`, `confirm(p, values)` before the first cell, then per cell
`pc = copy(p)`, each axis's `apply(pc, value, values)` and the processing of `pc`, whose extra_generation_params dict
is the one of `p` (the copy is shallow).
"""

from __future__ import annotations

import types
from copy import copy
from types import SimpleNamespace

import pytest
import torch

from loratorio.core.modes import MODES
from loratorio.hosts import xyz
from tests import fake_a1111 as fake
from tests.test_a1111 import Host, conds, latent, sample, simple
from tests.test_script import load_entry, module


class AxisOption:
    def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
        self.label, self.type, self.apply, self.format_value = label, type, apply, format_value
        self.confirm, self.cost, self.choices, self.prepare = confirm, cost, choices, prepare


def fake_plot_module():
    mod = types.ModuleType("xyz_grid.py")
    mod.AxisOption = AxisOption
    mod.axis_options = [AxisOption("Nothing", str, lambda p, x, xs: None), AxisOption("Seed", int, None)]
    return mod


@pytest.fixture
def plot_env(monkeypatch):
    host = Host()
    before_ui, host_callbacks = [], []
    callbacks = {"on_before_ui": before_ui.append, "on_cfg_denoiser": host_callbacks.append,
                 "on_cfg_denoised": host_callbacks.append}
    host_modules = {
        "modules.sd_samplers_cfg_denoiser": module("modules.sd_samplers_cfg_denoiser", CFGDenoiser=fake.CFGDenoiser),
        "networks": host.networks_module,
    }
    entry, _ = load_entry(monkeypatch, host_modules, host.sd_model, callbacks, "loratorio_entry_script_xyz")
    host.callbacks = fake.Callbacks([host_callbacks[0]], [host_callbacks[1]])
    plot = fake_plot_module()
    script_class = type("Script", (), {"__module__": "xyz_grid.py"})
    entry.scripts.scripts_data.append(SimpleNamespace(script_class=script_class, path="scripts/xyz_grid.py",
                                                      basedir=".", module=plot))
    assert len(before_ui) == 1
    before_ui[0]()
    return SimpleNamespace(host=host, entry=entry, script=entry.LoratorioScript(), plot=plot, before_ui=before_ui[0])


def option(plot, label):
    (found,) = [o for o in plot.axis_options if o.label == label]
    return found


def run_cells(env, p, args, axis, values):
    """The plot's cell loop for one axis: confirm, then copy, apply, process, sample and postprocess each cell."""
    opt = option(env.plot, axis)
    values = [opt.type(v) for v in values]
    opt.confirm(p, values)
    cells = []
    for value in values:
        pc = copy(p)
        pc.sampler = SimpleNamespace(model_wrap_cfg=env.host.denoiser())
        opt.apply(pc, value, values)
        env.script.process(pc, *args)
        infotext = {k: v for k, v in pc.extra_generation_params.items() if k.startswith("LoRAtorio")}
        env.script.process_before_every_sampling(pc, *args)
        image = sample(pc.sampler.model_wrap_cfg, latent(), simple(conds()), conds(seed=8))
        env.script.postprocess(pc, SimpleNamespace(images=[], infotexts=[]), *args)
        cells.append((infotext, image, env.script.settings))
    return cells


def new_p():
    return SimpleNamespace(extra_generation_params={}, sampler=None)


def test_every_setting_but_show_maps_becomes_one_axis_once(plot_env):
    env = plot_env
    env.before_ui()  # a second call (the UI built again) adds nothing
    labels = [o.label for o in env.plot.axis_options]
    wanted = ["LoRAtorio enabled", "LoRAtorio mode", "LoRAtorio patch size", "LoRAtorio temperature",
              "LoRAtorio recentre", "LoRAtorio top k", "LoRAtorio start", "LoRAtorio end"]
    assert all(labels.count(w) == 1 for w in wanted), labels
    assert "LoRAtorio show maps" not in labels and len(labels) == len(set(labels))
    assert option(env.plot, "LoRAtorio patch size").type is int
    assert option(env.plot, "LoRAtorio temperature").type is float
    assert option(env.plot, "LoRAtorio mode").choices() == list(MODES)
    assert option(env.plot, "LoRAtorio enabled").choices() == ["True", "False"]


def test_axis_values_override_the_args_per_cell_and_land_in_each_infotext(plot_env):
    env, p = plot_env, new_p()
    cells = run_cells(env, p, [{"enabled": True, "patch_size": 4}], "LoRAtorio temperature", ["0.01", "0.2", "5"])
    assert [c[0]["LoRAtorio temperature"] for c in cells] == ["0.01", "0.2", "5.0"]
    assert [c[2].temperature for c in cells] == [0.01, 0.2, 5.0] and all(c[2].patch_size == 4 for c in cells)
    assert all("LoRAtorio warning" not in c[0] for c in cells)
    images = [c[1] for c in cells]
    assert images[0].std() > 0.1 and torch.isfinite(images[0]).all()
    assert all((a - b).abs().mean() > 1e-4 for a, b in [(images[0], images[1]), (images[1], images[2])])
    assert not hasattr(p, xyz.ATTR)  # the plot's own p never carries a cell's value


def test_on_off_axis_leaves_no_stale_keys_and_off_is_the_host(plot_env):
    env, p = plot_env, new_p()
    cells = run_cells(env, p, [{"enabled": True, "patch_size": 4}], "LoRAtorio enabled", ["True", "False"])
    assert cells[0][0]["LoRAtorio patch size"] == "4"
    assert cells[1][0] == {} and not cells[1][2].enabled
    plain = sample(env.host.denoiser(), latent(), simple(conds()), conds(seed=8))
    assert torch.equal(cells[1][1], plain) and (cells[0][1] - plain).abs().mean() > 1e-3


def test_a_value_axis_turns_it_on_and_an_explicit_off_wins_in_any_order(plot_env):
    env = plot_env
    temperature, enabled = option(env.plot, "LoRAtorio temperature"), option(env.plot, "LoRAtorio enabled")
    for order in ([temperature, 0.3], [enabled, "False"]), ([enabled, "False"], [temperature, 0.3]):
        pc = new_p()
        for opt, value in order:
            opt.apply(pc, value, [value])
        env.script.process(pc, False)
        assert not env.script.settings.enabled and pc.extra_generation_params == {}
    pc = new_p()
    temperature.apply(pc, 0.3, [0.3])
    env.script.process(pc, False)
    assert env.script.settings.enabled and pc.extra_generation_params["LoRAtorio temperature"] == "0.3"


@pytest.mark.parametrize("axis, value, message", [
    ("LoRAtorio patch size", 0, r"'patch_size' must be in \[1, 128\]"),
    ("LoRAtorio mode", "blend", r"'mode' must be one of"),
    ("LoRAtorio enabled", "maybe", r"'enabled' must be a bool"),
])
def test_a_bad_axis_value_stops_the_plot_before_the_first_cell(plot_env, axis, value, message):
    with pytest.raises(ValueError, match=message):
        option(plot_env.plot, axis).confirm(new_p(), [value])


def test_finding_the_plot_module():
    plot = fake_plot_module()
    data = [SimpleNamespace(script_class=type("S", (), {"__module__": "other.py"}), module=object()),
            SimpleNamespace(script_class=type("S", (), {"__module__": "scripts.xyz_grid"}), module=plot)]
    assert xyz.find_module(data) is plot
    assert xyz.register_with(data[:1]) == []
