"""Forge 2.x / reForge glue against fakes of the UnetPatcher, LoRA patches and sampling_function (fake_forge.py)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from loratorio.core import BatchLayout, Composer, MemoryBudget, MultiAdapter, Settings, merged_weight
from loratorio.hosts import forge
from tests import fake_forge as fake
from tests.toy import CTX, make_lora

STEPS = 4
SIGMAS = torch.tensor([6.0, 3.0, 1.5, 0.5, 0.0])
CFG = 4.0
ON = Settings(enabled=True, patch_size=4, temperature=0.05)


def loras(count=2):
    unet = fake.make_diffusion_model(forge_linear=False)
    return [make_lora(unet, seed=1 + i) for i in range(count)]


class Host:
    """One fake Forge (or reForge) with two LoRAs merged by the host, and the glue's arguments."""

    def __init__(self, reforge=False, multipliers=None, files=None, count=2):
        self.loras = files or loras(count)
        self.reforge = reforge
        self.sd_model, self.networks = fake.make_host(self.loras, reforge, multipliers)
        self.after = self.sd_model.forge_objects_after_applying_lora.unet
        self.warnings: list[str] = []
        self.denoiser = fake.Denoiser(total_steps=STEPS)
        self.p = SimpleNamespace(sd_model=self.sd_model, sampler=SimpleNamespace(model_wrap_cfg=self.denoiser))
        if reforge:
            targets = eval(self.sd_model.current_lora_hash)  # noqa: S307 - our own str(list) of the fake
            self.backend = forge.Backend("reforge", lambda e, w, k: fake.merge(e, w, k),
                                         fake.reforge_loader(self.loras, targets))
        else:
            self.backend = forge.Backend("forge", lambda e, w, k: fake.merge(e, w, k))

    def reset(self):
        """processing.py: forge_objects = forge_objects_after_applying_lora.shallow_copy() before each call."""
        self.sd_model.forge_objects = SimpleNamespace(unet=self.after)

    def install(self, settings=ON):
        return forge.install(self.p, settings, backend=self.backend, networks_module=self.networks,
                             warn=self.warnings.append)


def prompt(images=2, seed=7, strength=1.0):
    g = torch.Generator().manual_seed(seed)
    return {"c_crossattn": torch.randn(images, 3, CTX, generator=g), "strength": strength}


def latent(images=2):
    return torch.randn(images, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * SIGMAS[0]


@torch.no_grad()
def sample(host, x, cond, uncond, cfg=CFG, max_chunks=None, calls=None):
    """sample_euler through the fake sampling_function, with the patcher in forge_objects at that time."""
    unet = host.sd_model.forge_objects.unet
    unet.refresh_loras()  # sampling_prepare -> load_models_gpu -> refresh_loras
    sampler = fake.Sampler(max_chunks, calls if calls is not None else [])
    for i in range(STEPS):
        host.denoiser.step = i
        sigma = SIGMAS[i].repeat(x.shape[0])
        den = fake.sampling_function(unet, x, sigma, [uncond], cond, cfg, sampler)
        x = x + (x - den) / SIGMAS[i] * (SIGMAS[i + 1] - SIGMAS[i])
    return x


@torch.no_grad()
def reference(host, x, cond, uncond, cfg=CFG, settings=ON, merged=()):
    """The same sampling done directly with the core engine on an unmerged model (A1111's batch layout).

    merged: indices of LoRAs merged into the model's weights for every row; the others are composed.
    """
    model = fake.KModel(fake.make_diffusion_model(forge_linear=False))
    for i in merged:
        for name, lora in host.loras[i].items():
            layer = model.diffusion_model.get_submodule(name)
            layer.weight += merged_weight(layer, lora)
    composed = [lo for i, lo in enumerate(host.loras) if i not in merged]
    b, m = x.shape[0], len(cond)
    with_uncond = cfg != 1.0
    layout = BatchLayout(tuple(range(m * b)), tuple(range(m * b, (m + 1) * b)) if with_uncond else (),
                         tuple(i for _ in range(m) for i in range(b)) if with_uncond else ())
    ctx = torch.cat([c["c_crossattn"] for c in cond] + ([uncond["c_crossattn"]] if with_uncond else []))
    strengths = [c["strength"] for c in cond]
    with MultiAdapter(model.diffusion_model, composed) as router:
        composer = Composer(router, settings)
        for i in range(STEPS):
            copies = m + 1 if with_uncond else m
            x_in, s_in = torch.cat([x] * copies), SIGMAS[i].repeat(copies * b)
            out = composer(lambda a: model.apply_model(a[0], a[1], c_crossattn=a[2]), (x_in, s_in, ctx), layout,
                           i, x_in, s_in)
            cond_pred = sum(out[j * b:(j + 1) * b] * s for j, s in enumerate(strengths)) / (sum(strengths) + 1e-37)
            uncond_pred = out[m * b:] if with_uncond else torch.zeros_like(x)
            e = sum(strengths)
            den = uncond_pred + (cond_pred - uncond_pred) * cfg * (e if abs(e - 1) > 1e-9 else 1.0)
            x = x + (x - den) / SIGMAS[i] * (SIGMAS[i + 1] - SIGMAS[i])
    return x


def run(host, settings=ON, **kw):
    host.reset()
    state = host.install(settings)
    try:
        return sample(host, **kw), state
    finally:
        forge.remove(state)


@pytest.mark.parametrize("reforge", [False, True], ids=["forge", "reforge"])
def test_composes_exactly_like_the_core_engine(reforge):
    host, x, c, u = Host(reforge), latent(), prompt(), prompt(seed=8)
    got, state = run(host, x=x, cond=[c], uncond=u)
    assert state is not None and state.batched and not host.warnings
    torch.testing.assert_close(got, reference(host, x, [c], u), rtol=1e-4, atol=1e-4)
    host.reset()
    plain = sample(host, x, [c], u)  # the host's own merge of both LoRAs
    assert (got - plain).abs().mean() > 1e-3


@pytest.mark.parametrize("reforge", [False, True], ids=["forge", "reforge"])
def test_global_lora_stays_merged_for_every_row_and_leaves_the_composition(reforge):
    host, x, c, u = Host(reforge, count=3), latent(), prompt(), prompt(seed=8)
    settings = Settings(**{**ON.to_dict(), "global_loras": "LoRA_C"})
    got, state = run(host, settings, x=x, cond=[c], uncond=u)
    assert [s.name for s in state.networks] == ["lora_a", "lora_b"] and not host.warnings
    torch.testing.assert_close(got, reference(host, x, [c], u, merged=(2,)), rtol=1e-4, atol=1e-4)
    assert (got - reference(host, x, [c], u)).abs().mean() > 1e-3  # composing all three is another image
    host.reset()
    torch.testing.assert_close(sample(host, x, [c], u), plain_of(host, x, c, u))  # the host's own patcher is intact


@pytest.mark.parametrize("reforge", [False, True], ids=["forge", "reforge"])
def test_auto_global_runs_as_the_core_engine(reforge):
    host, x, c, u = Host(reforge, count=3), latent(), prompt(), prompt(seed=8)
    settings = Settings(**{**ON.to_dict(), "auto_global": 10.0})
    got, state = run(host, settings, x=x, cond=[c], uncond=u)
    assert len(state.composer.composed) == 1 and len(state.router.shared) == 2 and not host.warnings
    torch.testing.assert_close(got, reference(host, x, [c], u, settings=settings), rtol=1e-4, atol=1e-4)
    assert (got - reference(host, x, [c], u)).abs().mean() > 1e-3


def test_auto_global_leaves_the_merged_steps_alone():
    """Steps outside the window run every LoRA at once: a global LoRA must not be added twice there."""
    host, x, c = Host(count=3), latent(), prompt()
    host.reset()
    state = host.install(Settings(**{**ON.to_dict(), "auto_global": 10.0}))
    try:
        clone = host.sd_model.forge_objects.unet
        clone.refresh_loras()  # stripped: base weights
        state.router.shared = (0, 1)  # as if the first step had made two LoRAs global
        args = {"input": x, "timestep": SIGMAS[1].repeat(2), "c": {"c_crossattn": c["c_crossattn"]},
                "cond_or_uncond": [0]}
        with torch.no_grad():
            got = state.merged(lambda a: clone.model.apply_model(a["input"], a["timestep"],
                                                                 c_crossattn=a["c"]["c_crossattn"]), args)
        assert state.router.shared == (0, 1)
    finally:
        forge.remove(state)
    fresh = Host(count=3)
    fresh.reset()
    unet = fresh.sd_model.forge_objects.unet
    unet.refresh_loras()
    with torch.no_grad():
        want = unet.model.apply_model(x, SIGMAS[1].repeat(2), c_crossattn=c["c_crossattn"])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def plain_of(host, x, c, u):
    """The host's merge of every LoRA, sampled on a fresh host."""
    fresh = Host(host.reforge, count=len(host.loras))
    fresh.reset()
    return sample(fresh, x, [c], u)


@pytest.mark.parametrize("case", ["uncond first, one chunk per call", "AND prompt", "AND prompt, one chunk per call",
                                  "sequential", "reference uncond", "composite", "switch"])
def test_host_batching_does_not_change_the_result(case):
    host, x, u = Host(), latent(), prompt(seed=8)
    cond = [prompt()]
    if "AND" in case:
        cond = [prompt(), prompt(seed=9, strength=0.5)]
    values = ON.to_dict()
    if case == "sequential":
        values["evaluation"] = "sequential"
    if case == "reference uncond":
        values["reference"] = "uncond"
    if case in ("composite", "switch"):
        values.update(mode=case, switch_interval=1)
    settings = Settings(**values)
    calls: list = []
    got, _ = run(host, settings, x=x, cond=cond, uncond=u, max_chunks=1 if "one chunk" in case else None,
                 calls=calls)
    if "one chunk" in case:
        assert calls[0] == [1] and all(len(k) == 1 for k in calls)  # uncond alone, first
    torch.testing.assert_close(got, reference(host, x, cond, u, settings=settings), rtol=1e-4, atol=1e-4)
    assert not host.warnings


def test_one_call_returns_the_fused_uncond_and_consistent_transformer_options():
    """When cond and uncond share a call, the host's own uncond_pred is already the re-centred one (post-cfg hooks
    see it); the UNet sees cond_or_uncond / cond_indices for the G-fold batch it actually runs."""
    host, x, c, u = Host(), latent(), prompt(), prompt(seed=8)
    given = []
    host.after.set_model_sampler_cfg_function(lambda args: given.append(args["uncond_denoised"]) or args["cond"])
    host.reset()
    state = host.install()
    host.sd_model.forge_objects.unet.refresh_loras()
    sampler = fake.Sampler()
    fake.sampling_function(host.sd_model.forge_objects.unet, x, SIGMAS[0].repeat(2), [u], [c], CFG, sampler)
    forge.remove(state)
    torch.testing.assert_close(sampler.uncond_preds[0], given[0])
    for seen in host.after.model.diffusion_model.seen:
        to = seen["to"]
        assert len(to["cond_or_uncond"]) * 2 == seen["rows"] == to["cond_mark"].shape[0]
        assert sorted(to["cond_indices"] + to["uncond_indices"]) == list(range(seen["rows"]))
    assert host.after.model.diffusion_model.seen[-1]["rows"] == 12  # [uncond, cond] × (base + 2 LoRAs)


def test_separate_calls_equal_one_call():
    host, x, c, u = Host(), latent(), prompt(), prompt(seed=8)
    one, _ = run(host, x=x, cond=[c], uncond=u)
    separate, _ = run(host, x=x, cond=[c], uncond=u, max_chunks=1)
    torch.testing.assert_close(one, separate, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reforge", [False, True], ids=["forge", "reforge"])
def test_cfg_scale_1_composes_the_prompt_only(reforge):
    host, x, c, u = Host(reforge), latent(), prompt(), prompt(seed=8)
    calls: list = []
    got, _ = run(host, x=x, cond=[c], uncond=u, cfg=1.0, calls=calls)
    assert all(k == [0] for k in calls)  # the host's CFG-1 optimisation still skips the negative prompt
    torch.testing.assert_close(got, reference(host, x, [c], u, cfg=1.0), rtol=1e-4, atol=1e-4)


def test_rows_get_their_own_lora():
    """Each group of a batched call equals the host with only that LoRA merged; base equals no LoRA."""
    host, x = Host(), latent()
    host.reset()
    state = host.install(Settings(**{**ON.to_dict(), "mode": "loratorio"}))
    unet = host.sd_model.forge_objects.unet
    unet.refresh_loras()
    sigma, ctx = SIGMAS[1].repeat(2), prompt()["c_crossattn"]
    preds = state.composer.predict(lambda a: unet.model.apply_model(a[0], a[1], c_crossattn=a[2]), (x, sigma, ctx), 0)
    forge.remove(state)
    for group, keep in enumerate([[], [0], [1]]):
        only = fake.UnetPatcher(unet.model)
        only.lora_patches = {k: v for i, (k, v) in enumerate(host.after.lora_patches.items()) if i in keep}
        only.refresh_loras()
        torch.testing.assert_close(preds[group], unet.model.apply_model(x, sigma, c_crossattn=ctx), rtol=1e-4,
                                   atol=1e-4)
    assert (preds[1] - preds[2]).abs().mean() > 1e-3


def test_clones_and_never_mutates_the_host_patchers():
    host = Host()
    original = host.sd_model.forge_objects_original.unet
    before = (dict(host.after.lora_patches), copy.deepcopy(host.after.model_options), dict(original.lora_patches),
              list(host.after.extra_model_patchers_during_sampling))
    host.reset()
    state = host.install()
    unet = host.sd_model.forge_objects.unet
    assert unet is not host.after and unet.lora_patches == {} and forge.KEY in unet.model_options
    assert (dict(host.after.lora_patches), host.after.model_options, dict(original.lora_patches),
            list(host.after.extra_model_patchers_during_sampling)) == before
    holder = unet.extra_model_patchers_during_sampling[-1].model
    assert isinstance(holder, forge.TensorHolder) and len(list(holder.parameters())) > 0
    assert "memory_peak_estimation_modifier" not in unet.model_options  # the host reserves for plain rows
    forge.remove(state)


def test_chains_existing_wrapper_cfg_function_and_modifiers():
    host, x, c, u = Host(), latent(), prompt(), prompt(seed=8)
    seen = {"wrapper": 0, "cfg": 0, "modifier": 0}

    def wrapper(apply_model, args):
        seen["wrapper"] += 1
        return apply_model(args["input"], args["timestep"], **args["c"])

    def cfg(args):
        seen["cfg"] += 1
        return args["uncond"] + (args["cond"] - args["uncond"]) * args["cond_scale"]

    def modifier(*args):
        seen["modifier"] += 1
        return args

    for patcher in (host.after,):
        patcher.set_model_unet_function_wrapper(wrapper)
        patcher.set_model_sampler_cfg_function(cfg)
        patcher.add_conditioning_modifier(modifier)
    got, state = run(host, x=x, cond=[c], uncond=u)
    assert all(v >= STEPS for v in seen.values()) and not state.batched  # auto: another wrapper, sequential
    torch.testing.assert_close(got, reference(host, x, [c], u), rtol=1e-4, atol=1e-4)


def test_hires_double_call_is_idempotent():
    """Forge calls process_before_every_sampling once on our own clone, then again after a reset."""
    host, x, c, u = Host(), latent(), prompt(), prompt(seed=8)
    once, _ = run(host, x=x, cond=[c], uncond=u)
    host.reset()
    first = host.install()
    forge.remove(first)  # the script's _remove() before installing again
    second = host.install()  # forge_objects.unet is still our first clone
    unet = host.sd_model.forge_objects.unet
    assert second is not None and len(second.networks) == 2 and not host.warnings
    assert unet.model_options["conditioning_modifiers"].__len__() == 1
    assert len(unet.extra_model_patchers_during_sampling) == 1
    twice = sample(host, x, [c], u)
    forge.remove(second)
    torch.testing.assert_close(twice, once)


def test_remove_restores_every_module_and_passes_through():
    host, x, c, u = Host(), latent(), prompt(), prompt(seed=8)
    model = host.after.model.diffusion_model
    hooks = [(m, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()]
    _, state = run(host, x=x, cond=[c], uncond=u)
    forge.remove(state)  # idempotent
    assert all(dict(m._forward_hooks) == h and dict(m._forward_pre_hooks) == pre for m, h, pre in hooks)
    host.reset()
    merged = sample(host, x, [c], u)
    reference_host = Host()
    reference_host.reset()
    torch.testing.assert_close(merged, sample(reference_host, x, [c], u))


def test_exception_in_a_step_falls_back_to_merged_loras(monkeypatch):
    host, x, c, u = Host(), latent(), prompt(), prompt(seed=8)
    host.reset()
    state = host.install()
    real = state.composer.predict

    def flaky(fn, inputs, step, **kwargs):
        if step == 2:
            raise RuntimeError("boom")
        return real(fn, inputs, step, **kwargs)

    monkeypatch.setattr(state.composer, "predict", flaky)
    got = sample(host, x, [c], u)
    assert state.failed and len(host.warnings) == 1 and "boom" in host.warnings[0]
    assert torch.isfinite(got).all()
    # From the failed step on, every row goes through every LoRA: the host's merge.
    unet = host.sd_model.forge_objects.unet
    sigma = SIGMAS[3].repeat(2)
    after = fake.sampling_function(unet, x, sigma, [u], [c], CFG, fake.Sampler())
    forge.remove(state)
    host.reset()
    host.after.refresh_loras()
    torch.testing.assert_close(after, fake.sampling_function(host.after, x, sigma, [u], [c], CFG, fake.Sampler()),
                               rtol=1e-4, atol=1e-4)


def test_window_outside_is_the_host_merge():
    host, x, c, u = Host(), latent(), prompt(), prompt(seed=8)
    got, _ = run(host, Settings(**{**ON.to_dict(), "start": 0.0, "end": 0.01}), x=x, cond=[c], uncond=u)
    host.reset()
    # Step 0 composes (start=0); the rest must be the merge, so it differs from both full runs but stays finite.
    assert torch.isfinite(got).all()
    host.reset()
    settings = Settings(**{**ON.to_dict(), "start": 0.9})
    late, _ = run(host, settings, x=x, cond=[c], uncond=u)
    host.reset()
    torch.testing.assert_close(late, sample(host, x, [c], u), rtol=1e-4, atol=1e-4)


def test_dense_fallback_for_other_patch_types():
    host = Host()
    diff = {k: [[1.0, (torch.randn_like(dict(host.after.model.named_parameters())[k]) * 0.1,), 1.0, None, None]]
            for k in ("diffusion_model.to_out.weight", "diffusion_model.res.weight", "diffusion_model.to_q.weight")}
    first = next(iter(host.after.lora_patches))
    host.after.lora_patches[("/loras/full.safetensors", 1.0, 1.0, False)] = diff
    host.reset()
    state = host.install(Settings(**{**ON.to_dict(), "mode": "switch", "switch_interval": 100}))
    assert state is not None and len(state.networks) == 3
    tables = state.router.targets
    adapters = [a for per in tables.values() for i, a in per.items() if i == 2]
    assert adapters and all(isinstance(a.fn.func.__self__, forge.Dense) for a in adapters)
    forge.remove(state)
    del host.after.lora_patches[("/loras/full.safetensors", 1.0, 1.0, False)]
    assert first in host.after.lora_patches


def split_on_output_slices(host, names=("to_q", "res"), at=3):
    """LoRA a's patches for `names` as two entries on output slices (Flux's fused qkv from diffusers-format keys)."""
    file = next(iter(host.after.lora_patches))
    patches = dict(host.after.lora_patches[file])
    for name in names:
        lora = host.loras[0][name]
        out = lora.up.shape[0]
        patches[f"diffusion_model.{name}.weight"] = [
            [file[1], ("lora", (lora.up[start:stop], lora.down, lora.alpha, lora.mid, None)), 1.0,
             (0, start, stop - start), None] for start, stop in ((0, at), (at, out))]
    host.after.lora_patches = {**host.after.lora_patches, file: patches}


def test_entries_on_output_slices_stay_low_rank_and_exact():
    host, x, c, u = Host(), latent(), prompt(), prompt(seed=8)
    whole, _ = run(host, x=x, cond=[c], uncond=u)
    sliced_host = Host()
    split_on_output_slices(sliced_host)
    got, state = run(sliced_host, x=x, cond=[c], uncond=u)
    assert state is not None and not sliced_host.warnings
    kinds = {m: a.fn.func for m, per in state.router.targets.items() for i, a in per.items() if i == 0}
    layers = sliced_host.after.model.diffusion_model
    assert kinds[layers.to_q] is forge._sliced and kinds[layers.res] is forge._sliced
    torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-5)
    host.reset()
    sliced_host.reset()  # the host's own merge of the sliced entries agrees too (so the fake is a fair stand-in)
    torch.testing.assert_close(sample(sliced_host, x, [c], u), sample(host, x, [c], u), rtol=1e-5, atol=1e-5)


def test_declines_clearly():
    host = Host()
    host.after.lora_patches = dict(list(host.after.lora_patches.items())[:1])
    host.reset()
    assert host.install() is None and "needs 2 or more LoRAs" in host.warnings[-1]
    host = Host()
    host.after.model.diffusion_model.emb = torch.nn.Embedding(3, 8)
    patches = dict(host.after.lora_patches)
    key = next(iter(patches))
    patches[key] = {**patches[key], "diffusion_model.emb.weight": [[1.0, (torch.ones(3, 8),), 1.0, None, None]]}
    host.after.lora_patches = patches
    host.reset()
    assert host.install() is None and "Embedding" in host.warnings[-1]
    assert host.sd_model.forge_objects.unet is host.after  # nothing was assigned


def test_reforge_strips_with_a_new_uuid_and_reads_each_file():
    host = Host(reforge=True, multipliers=[1.0, 0.5])
    host.reset()
    state = host.install()
    unet = host.sd_model.forge_objects.unet
    assert unet.patches == {} and unet.patches_uuid != host.after.patches_uuid and host.after.patches
    assert [s.multiplier for s in state.networks] == [1.0, 0.5]
    assert [s.name for s in state.networks] == ["lora_a", "lora_b"]
    forge.remove(state)


def test_weight_maps_accumulate_per_image():
    host = Host()
    _, state = run(host, Settings(**{**ON.to_dict(), "show_maps": True}), x=latent(), cond=[prompt()],
                   uncond=prompt(seed=8))
    assert state.map_steps == STEPS and state.map_sum.shape == (2, 2, 8, 8)
    torch.testing.assert_close(state.map_sum.sum(0), torch.full((2, 8, 8), float(STEPS)))


def sdxl_prompt(images=2, seed=7):
    """Forge's SDXL conditioning: c_crossattn and the pooled vector `y` (pooled text, size and crop embeddings)."""
    g = torch.Generator().manual_seed(seed + 100)
    return {**prompt(images, seed), "y": torch.randn(images, 2816, generator=g)}


@pytest.mark.parametrize("free", [None, 3], ids=["one call", "one host chunk per call"])
@pytest.mark.parametrize("reforge", [False, True], ids=["forge", "reforge"])
def test_sdxl_y_reaches_every_row_unchanged(reforge, free, monkeypatch):
    """Each row of each call carries its own (context, y) pair, and each b rows the kind cond_or_uncond names."""
    host, x, c, u = Host(reforge), latent(), sdxl_prompt(), sdxl_prompt(seed=8)
    expect, _ = run(host, x=x, cond=[c], uncond=u)
    if free is not None:  # less than the 4 rows of one copy fit: one host chunk (b = 2 rows, the unit) per call
        monkeypatch.setattr(forge, "memory_budget", lambda *a: MemoryBudget(lambda: free, lambda n, shape: n))
    seen = host.after.model.diffusion_model.seen
    seen.clear()
    got, state = run(host, x=x, cond=[c], uncond=u)
    assert not host.warnings and state.composer.chunker.most_chunks == (1 if free is None else 6)
    rows = 0
    for call in seen:
        kinds = call["to"]["cond_or_uncond"]
        assert len(kinds) * 2 == call["rows"] == call["y"].shape[0]
        for r in range(call["rows"]):
            source = (c, u)[kinds[r // 2]]  # the host's cond (0) or uncond (1) chunk
            assert torch.equal(call["context"][r], source["c_crossattn"][r % 2])
            assert torch.equal(call["y"][r], source["y"][r % 2])
            rows += 1
    assert rows == STEPS * 3 * 4  # base + 2 LoRAs over 2 images × cond/uncond
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    host.reset()
    assert (got - sample(host, x, [c], u)).abs().mean() > 1e-3


@pytest.mark.parametrize("reforge", [False, True], ids=["forge", "reforge"])
def test_oom_above_k_rows_still_gives_the_image_for_every_k(reforge):
    """Down to one host chunk (b rows, the unit on Forge) a call that runs out of memory is redone in halves."""
    host, x, c, u = Host(reforge), latent(), sdxl_prompt(), sdxl_prompt(seed=8)
    expect, _ = run(host, x=x, cond=[c], uncond=u)
    model = host.after.model.diffusion_model
    for k in range(2, 13):  # 12 rows: 3 groups of the host's 2 chunks × b = 2 images
        def oom(module, args, kwargs, k=k):
            if args[0].shape[0] > k:
                raise RuntimeError(f"CUDA out of memory. Tried to allocate {args[0].shape[0]} rows")

        handle = model.register_forward_pre_hook(oom, with_kwargs=True)
        try:
            got, state = run(host, x=x, cond=[c], uncond=u)
        finally:
            handle.remove()
        assert not host.warnings and state.failed is None and (state.composer.chunker.ooms > 0) == (k < 12)
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)


def test_every_model_call_gets_its_own_controlnet_lists():
    """Forge's UNet pops ControlNet's residuals off c["control"] (apply_control); sequential evaluation calls it once
    per model with the same inputs, and the failure replay calls it again: each call needs the full lists."""
    seen = []

    def call(a):
        residuals = a["c"]["control"]["output"]
        seen.append(len(residuals))
        while residuals:
            residuals.pop()
        return a["input"]

    control = {"output": [torch.ones(2, 1), torch.ones(2, 1)]}
    args = {"input": torch.zeros(2, 4, 8, 8), "timestep": torch.ones(2), "c": {"control": control},
            "cond_or_uncond": [0, 1]}
    inputs = (args["input"], args["timestep"], {"control": control}, torch.arange(2))
    for _ in range(3):
        forge._expanded_call(call, args, 1, inputs)
    assert seen == [2, 2, 2] and len(control["output"]) == 2


def test_reforge_reload_is_unet_only_so_the_host_logs_no_unloaded_text_encoder_keys(monkeypatch):
    """reForge's load_lora_for_models warns "lora key not loaded" for each key its map lacks; our reload passes no
    clip (the prompt pass applied the text encoder), so it must not pass text-encoder keys either (seen on reForge)."""
    import sys
    from types import ModuleType

    seen: list[dict] = []

    def load_lora_for_models(unet, clip, state_dict, strength_model, strength_clip, filename=""):
        assert clip is None and strength_clip == 0
        seen.append(state_dict)
        return SimpleNamespace(patches={"k": state_dict}), None

    modules = {name: ModuleType(name) for name in ("ldm_patched", "ldm_patched.modules",
                                                   "ldm_patched.modules.model_management",
                                                   "ldm_patched.modules.lora", "ldm_patched.modules.sd")}
    modules["ldm_patched.modules.sd"].load_lora_for_models = load_lora_for_models
    modules["ldm_patched.modules.lora"].calculate_weight = lambda entries, w, key: w
    modules["ldm_patched.modules.model_management"].get_free_memory = lambda device=None: 0
    modules["ldm_patched.modules.model_management"].soft_empty_cache = lambda force=False: None
    modules["ldm_patched.modules"].model_management = modules["ldm_patched.modules.model_management"]
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    unet_keys = ["lora_unet_down_blocks_0_proj_in.lora_up.weight", "lora_unet_mid_block_conv1.lokr_w1",
                 "diffusion_model.input_blocks.1.1.proj_in.diff", "lycoris_time_embed_0.alpha"]
    te_keys = ["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", "lora_te1_text_model_x.alpha",
               "lora_te2_text_model_y.dora_scale", "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora.up.weight",
               "text_encoder_2.text_model.z.alpha", "text_encoders.clip_l.w.weight",
               "lora_prior_te_text_model_q.alpha"]
    files = {"/loras/a.safetensors": {k: torch.ones(1) for k in unet_keys + te_keys}}
    networks_module = SimpleNamespace(load_lora_state_dict=files.__getitem__)
    sd_model = SimpleNamespace(forge_objects_original=SimpleNamespace(unet=object()))
    backend = forge.reforge_backend(sd_model, networks_module)
    backend.load_file("/loras/a.safetensors", 0.5)
    assert sorted(seen[0]) == sorted(unet_keys)
