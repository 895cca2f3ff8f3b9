"""The entry script on a fake Forge 2.x: detection by feature probing, dispatch to the Forge glue, clean-up."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from loratorio.hosts import forge
from tests import fake_forge as fake
from tests.test_forge import Host, latent, prompt, sample
from tests.test_script import load_entry, module


@pytest.fixture
def forge_env(monkeypatch):
    host = Host()
    host_modules = {
        "backend": module("backend"),
        "backend.patcher": module("backend.patcher"),
        "backend.patcher.unet": module("backend.patcher.unet", UnetPatcher=fake.UnetPatcher),
        "backend.patcher.lora": module("backend.patcher.lora", merge_lora_to_weight=fake.merge),
        "backend.memory_management": module("backend.memory_management", get_free_memory=fake.get_free_memory,
                                             soft_empty_cache=fake.soft_empty_cache),
        "networks": host.networks,
    }
    callbacks = {"on_cfg_denoiser": None, "on_cfg_denoised": None}
    entry, reports = load_entry(monkeypatch, host_modules, host.sd_model, callbacks, "loratorio_entry_script_forge")
    return SimpleNamespace(host=host, entry=entry, script=entry.LoratorioScript(), reports=reports)


def test_detects_forge_and_composes_through_the_clone(forge_env):
    env, args = forge_env, {"enabled": True, "patch_size": 4}
    assert env.entry.HOST == "forge"
    p = env.host.p
    p.extra_generation_params = {}
    env.host.reset()
    env.script.process(p, args)
    env.script.process_before_every_sampling(p, args)
    assert "LoRAtorio warning" not in p.extra_generation_params, p.extra_generation_params
    assert isinstance(env.script.state, forge.GenerationState)
    assert p.sd_model.forge_objects.unet is not env.host.after
    x, c, u = latent(), prompt(), prompt(seed=8)
    composed = sample(env.host, x, [c], u)
    env.script.postprocess(p, SimpleNamespace(images=[], infotexts=[]))
    assert env.script.state is None
    env.host.reset()
    assert (composed - sample(env.host, x, [c], u)).abs().mean() > 1e-3


def test_install_failure_is_reported_and_nothing_is_assigned(forge_env, monkeypatch):
    env, args = forge_env, {"enabled": True}
    p = env.host.p
    p.extra_generation_params = {}
    env.host.reset()
    env.script.process(p, args)
    monkeypatch.setattr(forge, "all_at_once", lambda *a: 1 / 0)
    env.script.process_before_every_sampling(p, args)
    assert env.reports and "could not start" in p.extra_generation_params["LoRAtorio warning"]
    assert p.sd_model.forge_objects.unet is env.host.after
    assert all(not m._forward_hooks for m in env.host.after.model.modules())
    x, c, u = latent(), prompt(), prompt(seed=8)
    env.host.reset()
    assert torch.isfinite(sample(env.host, x, [c], u)).all()


def test_unreadable_lora_is_a_clear_warning_and_nothing_is_assigned(forge_env, monkeypatch):
    """A file the glue cannot read is declined inside install(), with its cause, before the host is touched."""
    env, args = forge_env, {"enabled": True}
    p = env.host.p
    p.extra_generation_params = {}
    env.host.reset()
    env.script.process(p, args)
    monkeypatch.setattr(forge, "source_adapters", lambda *a: 1 / 0)
    env.script.process_before_every_sampling(p, args)
    warning = p.extra_generation_params["LoRAtorio warning"]
    assert not env.reports and "division by zero" in warning and "sampled normally" in warning
    assert p.sd_model.forge_objects.unet is env.host.after


def test_bad_api_value_fails_the_sampling_call_and_is_undone(forge_env):
    """Forge's denoiser never calls the inner model, so the refusal rides on a clone's model_function_wrapper."""
    env, args = forge_env, {"enabled": True, "patch_size": 0}
    p = env.host.p
    p.extra_generation_params = {}
    env.host.reset()
    with pytest.raises(ValueError, match="'patch_size' must be in"):
        env.script.process(p, args)
    env.script.process_before_every_sampling(p, args)
    refused = p.sd_model.forge_objects.unet
    assert refused is not env.host.after and "model_function_wrapper" not in env.host.after.model_options
    with pytest.raises(ValueError, match="'patch_size' must be in") as err:
        sample(env.host, latent(), [prompt()], prompt(seed=8))
    assert vars(err.value).get("status_code", 500) == 422  # what the host's API answers (api.py), not a 500
    env.script.process(p, {"enabled": False})  # the next request starts clean
    assert p.sd_model.forge_objects.unet is env.host.after
    env.script.process_before_every_sampling(p, {"enabled": False})
    assert p.sd_model.forge_objects.unet is env.host.after
