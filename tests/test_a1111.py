"""A1111 host glue against fakes of the CFG denoiser and the built-in Lora extension (tests/fake_a1111.py)."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from loratorio.core import BatchLayout, Composer, MemoryBudget, MultiAdapter, Settings
from loratorio.hosts import a1111
from tests import fake_a1111 as fake
from tests.toy import CTX, make_lora, make_unet

STEPS = 4
SIGMAS = torch.tensor([6.0, 3.0, 1.5, 0.5, 0.0])
CFG = 4.0
ON = Settings(enabled=True, patch_size=4, temperature=0.05)


class Host:
    """One fake WebUI: UNet with host-merged LoRA layers, two networks, callbacks registered like the script does."""

    def __init__(self, dense=False, specs=None, names="ab"):
        """specs: per network, {layer: LowRank} or {layer: (module type, weights)} (default: kohya LoRAs)."""
        self.unet = make_unet()
        self.loras = [make_lora(self.unet, seed=1 + i) for i in range(len(names))]
        self.networks_module = fake.NetworksModule()
        self.sd_model = fake.make_sd_model(self.unet, self.networks_module)
        self.networks = [fake.Network(n, lo, self.sd_model, dense=dense)
                         for n, lo in zip(names, specs(self.unet) if specs else self.loras, strict=True)]
        self.networks_module.loaded_networks[:] = self.networks
        self.opts = fake.Opts()
        self.callbacks = fake.Callbacks([a1111.on_cfg_denoiser], [a1111.on_cfg_denoised])
        self.warnings: list[str] = []

    def denoiser(self, cls=fake.CFGDenoiser):
        return cls(self.sd_model, self.opts, self.callbacks, STEPS)

    def install(self, denoiser, settings=ON):
        p = SimpleNamespace(sampler=SimpleNamespace(model_wrap_cfg=denoiser), extra_generation_params={})
        return a1111.install(p, settings, sd_model=self.sd_model, networks_module=self.networks_module,
                             base_denoiser_cls=fake.CFGDenoiser, warn=self.warnings.append)


def conds(images=2, tokens=3, seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(images, tokens, CTX, generator=g)


def latent(images=2):
    return torch.randn(images, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * SIGMAS[0]


def simple(cond):
    return [[(i, 1.0)] for i in range(fake.crossattn(cond).shape[0])], cond


def sdxl_conds(images=2, seed=7):
    """SDXL's conditioning: crossattn, and the pooled `vector` (pooled text, size and crop embeddings; 2816 wide)."""
    g = torch.Generator().manual_seed(seed + 100)
    return {"crossattn": conds(images, seed=seed), "vector": torch.randn(images, 2816, generator=g)}


@torch.no_grad()
def sample(denoiser, x, cond, uncond, s_min_uncond=0.0, eps=False):
    """sample_euler over the fake CFG denoiser; ε-returning denoisers are turned into x0 the way DDIM does."""
    image_cond = torch.zeros(x.shape[0], 5, 1, 1)
    for i in range(STEPS):
        s = SIGMAS[i].repeat(x.shape[0])
        out = denoiser(x, s, uncond, cond, CFG, s_min_uncond, image_cond)
        den = x - SIGMAS[i] * out if eps else out
        x = x + (x - den) / SIGMAS[i] * (SIGMAS[i + 1] - SIGMAS[i])
    return x


@torch.no_grad()
def reference(host, x, cond_rows, uncond, layout, settings=ON, merged=()):
    """The same sampling done directly with the core engine: the glue must reproduce it.

    Cond and uncond rows are evaluated in separate UNet calls per contiguous run, so contexts of different token
    lengths work as they do in the host. `merged`: indices of networks the host keeps merged for every row; the
    other networks are composed.
    """
    saved = list(host.networks_module.loaded_networks)
    host.networks_module.loaded_networks[:] = [host.networks[i] for i in merged]
    composed = [lo for i, lo in enumerate(host.loras) if i not in merged]
    conds_list, tensor = cond_rows
    owner = [i for i, c in enumerate(conds_list) for _ in c]
    weights = [w for c in conds_list for _, w in c]
    n = len(owner)

    def den_fn(a):
        xs, ss, idx = a
        outs = []
        for is_uncond, rows in itertools.groupby(range(len(idx)), key=lambda r: bool(idx[r] >= n)):
            sl = list(rows)
            sl = slice(sl[0], sl[-1] + 1)
            ctx = uncond[idx[sl] - n] if is_uncond else tensor[idx[sl]]
            outs.append(xs[sl] - ss[sl].view(-1, 1, 1, 1) * host.unet(xs[sl], ss[sl], ctx))
        return torch.cat(outs)

    with MultiAdapter(host.unet, composed) as router:
        composer = Composer(router, settings)
        for i in range(STEPS):
            x_in = torch.cat([x[owner], x]) if layout.uncond_rows else x[owner]
            s_in = SIGMAS[i].repeat(x_in.shape[0])
            out = composer(den_fn, (x_in, s_in, torch.arange(x_in.shape[0])), layout, i, x_in, s_in)
            if layout.uncond_rows:
                unc = out[n:]
                den = unc.clone()
                for row, (img, w) in enumerate(zip(owner, weights, strict=True)):
                    den[img] += (out[row] - unc[img]) * (w * CFG)
            else:
                den = out[[c[0][0] for c in conds_list]]
            x = x + (x - den) / SIGMAS[i] * (SIGMAS[i + 1] - SIGMAS[i])
    host.networks_module.loaded_networks[:] = saved
    return x


def run(host, settings=ON, cls=fake.CFGDenoiser, **kw):
    denoiser = host.denoiser(cls)
    state = host.install(denoiser, settings)
    try:
        return sample(denoiser, **kw), state
    finally:
        a1111.remove(state)


def test_composes_exactly_like_the_core_engine():
    host, x, c, u = Host(), latent(), conds(), conds(seed=8)
    got, state = run(host, x=x, cond=simple(c), uncond=u)
    assert state.composer.batched and not host.warnings
    torch.testing.assert_close(got, reference(host, x, simple(c), u, BatchLayout.cond_then_uncond(2)))
    plain = sample(host.denoiser(), x, simple(c), u)
    assert (got - plain).abs().mean() > 1e-3  # LoRAtorio is not the host's merge


@pytest.mark.parametrize("case", ["batch_cond_uncond off", "different token lengths", "timestep sampler",
                                  "sequential", "dense modules"])
def test_host_variants_reproduce_the_engine(case):
    host = Host(dense=case == "dense modules")
    x, c, u = latent(), conds(), conds(seed=8)
    if case == "different token lengths":  # the host then evaluates cond and uncond in separate calls
        u = torch.cat([u, conds(tokens=2, seed=11)], dim=1)
    if case == "batch_cond_uncond off":
        host.opts.batch_cond_uncond = False
    settings = Settings(**{**ON.to_dict(), "evaluation": "sequential"}) if case == "sequential" else ON
    cls = fake.CFGDenoiserTimesteps if case == "timestep sampler" else fake.CFGDenoiser
    got, state = run(host, settings, cls=cls, x=x, cond=simple(c), uncond=u, eps=case == "timestep sampler")
    assert state.composer.batched == (case != "sequential")
    assert state.eps_space == (case == "timestep sampler")
    expect = reference(host, x, simple(c), u, BatchLayout.cond_then_uncond(2))
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-4)


def test_and_prompts_fuse_each_sub_prompt_and_pair_uncond_with_its_image():
    host, x, u = Host(), latent(), conds(seed=8)
    tensor = conds(images=3, seed=9)
    cond = ([[(0, 1.0), (1, 0.5)], [(2, 1.0)]], tensor)
    got, _ = run(host, x=x, cond=cond, uncond=u)
    layout = BatchLayout((0, 1, 2), (3, 4), (0, 0, 1))
    torch.testing.assert_close(got, reference(host, x, cond, u, layout))


def test_skipped_uncond_steps_use_the_fused_cond():
    host, x, c, u = Host(), latent(), conds(), conds(seed=8)
    host.opts.s_min_uncond_all = True
    got, _ = run(host, x=x, cond=simple(c), uncond=u, s_min_uncond=100.0)
    torch.testing.assert_close(got, reference(host, x, simple(c), u, BatchLayout((0, 1))))


def test_disabled_is_bit_identical_to_the_host():
    host, x, c, u = Host(), latent(), conds(), conds(seed=8)
    with_callbacks = sample(host.denoiser(), x, simple(c), u)
    host.callbacks = fake.Callbacks()
    assert torch.equal(with_callbacks, sample(host.denoiser(), x, simple(c), u))


def test_remove_leaves_host_exactly_as_before():
    host = Host()
    denoiser = host.denoiser()
    original_wrap, loaded = denoiser.inner_model, list(host.networks_module.loaded_networks)
    hooks = [(m, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in host.unet.modules()]
    state = host.install(denoiser)
    assert isinstance(denoiser.model_wrap, a1111.RoutedInnerModel)
    sample(denoiser, latent(), simple(conds()), conds(seed=8))
    a1111.remove(state)
    a1111.remove(state)  # idempotent
    assert denoiser.model_wrap is original_wrap and not hasattr(denoiser, "loratorio_state")
    assert host.networks_module.loaded_networks == loaded
    assert all(dict(m._forward_hooks) == h and dict(m._forward_pre_hooks) == pre for m, h, pre in hooks)


def test_exception_inside_a_step_falls_back_to_plain_sampling(monkeypatch):
    host, x, c, u = Host(), latent(), conds(), conds(seed=8)
    denoiser = host.denoiser()
    state = host.install(denoiser)
    real_predict = state.composer.predict

    def flaky(fn, inputs, step):
        if step == 2:
            raise RuntimeError("boom")
        return real_predict(fn, inputs, step)

    monkeypatch.setattr(state.composer, "predict", flaky)
    got = sample(denoiser, x, simple(c), u)
    a1111.remove(state)
    assert state.failed and "boom" in host.warnings[0] and len(host.warnings) == 1
    assert host.networks_module.loaded_networks == host.networks
    assert torch.isfinite(got).all()
    # From the failed step on, the host's own (merged-LoRA) prediction was used.
    s = SIGMAS[3].repeat(2)
    after = denoiser(x, s, u, simple(c), CFG, 0.0, torch.zeros(2, 5, 1, 1))
    torch.testing.assert_close(after, host.denoiser()(x, s, u, simple(c), CFG, 0.0, torch.zeros(2, 5, 1, 1)))


@pytest.mark.parametrize("dense", [False, True], ids=["low-rank", "dense"])
def test_global_lora_is_merged_for_every_row_and_leaves_the_composition(dense):
    host, x, c, u = Host(dense=dense, names="abg"), latent(), conds(), conds(seed=8)
    settings = Settings(**{**ON.to_dict(), "global_loras": " G , nowhere"})
    got, state = run(host, settings, x=x, cond=simple(c), uncond=u)
    assert state.networks == host.networks[:2] and state.global_networks == host.networks[2:]
    assert host.warnings == ["LoRAtorio: global LoRA(s) nowhere not among the prompt's LoRAs; ignored"]
    assert host.networks_module.loaded_networks == host.networks  # restored after each call
    layout = BatchLayout.cond_then_uncond(2)
    torch.testing.assert_close(got, reference(host, x, simple(c), u, layout, merged=(2,)))
    without = reference(host, x, simple(c), u, layout, merged=())
    assert (got - without).abs().mean() > 1e-3  # composing all three is another image


def test_auto_global_runs_as_the_core_engine_and_shows_the_global_map():
    host, x, c, u = Host(names="abg"), latent(), conds(), conds(seed=8)
    settings = Settings(**{**ON.to_dict(), "auto_global": 10.0, "show_maps": True})
    got, state = run(host, settings, x=x, cond=simple(c), uncond=u)
    assert len(state.composer.composed) == 1 and len(state.router.shared) == 2 and not host.warnings
    layout = BatchLayout.cond_then_uncond(2)
    torch.testing.assert_close(got, reference(host, x, simple(c), u, layout, settings))
    assert (got - reference(host, x, simple(c), u, layout)).abs().mean() > 1e-3
    maps = state.map_sum / state.map_steps
    assert maps.shape[0] == 3 and all(maps[i].min() > 0.5 for i in state.router.shared)


def test_too_few_composed_loras_besides_the_global_ones_sample_normally():
    host = Host(names="abg")
    settings = Settings(**{**ON.to_dict(), "global_loras": "a,g"})
    assert host.install(host.denoiser(), settings) is None
    assert "2 or more LoRAs in the prompt with a UNet weight besides 2 global; found 1" in host.warnings[-1]


def test_declines_clearly():
    host = Host()
    host.networks_module.loaded_networks[:] = host.networks[:1]
    assert host.install(host.denoiser()) is None
    assert "needs 2 or more LoRAs" in host.warnings[-1]
    host.networks_module.loaded_networks[:] = host.networks
    host.sd_model.cond_stage_key = "edit"
    assert host.install(host.denoiser()) is None
    assert "InstructPix2Pix" in host.warnings[-1]


def test_wrapped_unet_forward_means_sequential_in_auto_mode():
    host = Host()
    original = host.unet.forward
    host.unet.forward = lambda *a, **k: original(*a, **k)  # what ControlNet does to the UNet instance
    state = host.install(host.denoiser())
    assert not state.composer.batched
    a1111.remove(state)
    host.unet.forward = original  # ControlNet's restore: the class's forward bound to the UNet, left in its dict
    state = host.install(host.denoiser())
    assert state.composer.batched
    a1111.remove(state)


def controlnet_p(host, denoiser, kind="ControlNet", hint_images=1, batch_option="All ControlNet units for all "
                 "images in a batch", style_align=False, underneath=False):
    """p with sd-webui-controlnet's hook in place, as scripts/hook.py leaves it (UnetHook.hook)."""
    unet = host.unet
    unet._original_forward = (lambda *a, **k: unet.__class__.forward(unet, *a, **k)) if underneath else unet.forward

    def forward_webui(self, *args, **kwargs):
        return self._original_forward(*args, **kwargs)

    unet.forward = forward_webui.__get__(unet)
    param = SimpleNamespace(control_model_type=SimpleNamespace(name=kind), hint_cond=torch.zeros(hint_images, 3, 8, 8),
                            hr_hint_cond=None)
    script = SimpleNamespace(latest_network=SimpleNamespace(model=unet, control_params=[param]),
                             ui_batch_option_state=[batch_option, style_align])
    return SimpleNamespace(sampler=SimpleNamespace(model_wrap_cfg=denoiser), extra_generation_params={},
                           scripts=SimpleNamespace(alwayson_scripts=[SimpleNamespace(), script]))


@pytest.mark.parametrize("case, batched", [
    ({}, True),
    ({"kind": "T2I_Adapter"}, True),
    ({"kind": "AttentionInjection"}, False),  # reference-only caches latents at the first call's batch size
    ({"hint_images": 2}, False),
    ({"batch_option": "Each ControlNet unit for each image in a batch"}, False),
    ({"style_align": True}, False),
    ({"underneath": True}, False),
])
def test_auto_is_batched_under_controlnet_only_when_its_units_work_row_by_row(case, batched):
    host = Host()
    denoiser = host.denoiser()
    p = controlnet_p(host, denoiser, **case)
    state = a1111.install(p, ON, sd_model=host.sd_model, networks_module=host.networks_module,
                          base_denoiser_cls=fake.CFGDenoiser, warn=host.warnings.append)
    assert state.composer.batched is batched and host.warnings == []
    x, c, u = latent(), conds(), conds(seed=8)
    assert torch.isfinite(sample(denoiser, x, simple(c), u)).all()  # the calls go through the wrapper
    a1111.remove(state)
    p.scripts.alwayson_scripts[1].latest_network.model = None  # the hook of another model: not evidence
    state = a1111.install(p, ON, sd_model=host.sd_model, networks_module=host.networks_module,
                          base_denoiser_cls=fake.CFGDenoiser, warn=host.warnings.append)
    assert not state.composer.batched
    a1111.remove(state)


def test_refiner_swap_is_reported():
    host, x, c, u = Host(), latent(), conds(), conds(seed=8)
    denoiser = host.denoiser()
    state = host.install(denoiser)
    image_cond = torch.zeros(2, 5, 1, 1)
    denoiser(x, SIGMAS[:1].repeat(2), u, simple(c), CFG, 0.0, image_cond)
    denoiser.model_wrap = None  # apply_refiner -> update_inner_model
    denoiser(x, SIGMAS[1:2].repeat(2), u, simple(c), CFG, 0.0, image_cond)
    a1111.remove(state)
    assert state.failed and "refiner" in host.warnings[0]


def test_weight_maps_accumulate_per_image():
    host = Host()
    settings = Settings(**{**ON.to_dict(), "show_maps": True})
    _, state = run(host, settings, x=latent(), cond=simple(conds()), uncond=conds(seed=8))
    assert state.map_steps == STEPS and state.map_sum.shape == (2, 2, 8, 8)
    torch.testing.assert_close(state.map_sum.sum(0), torch.full((2, 8, 8), float(STEPS)))


def test_install_failing_midway_leaves_no_hook(monkeypatch):
    host = Host()
    denoiser = host.denoiser()
    original = denoiser.inner_model
    monkeypatch.setattr(a1111.RoutedInnerModel, "__init__", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        host.install(denoiser)
    assert denoiser.model_wrap is original and not hasattr(denoiser, "loratorio_state")
    assert host.unet._forward_pre_hooks == {} and all(
        len(m._forward_hooks) == 1 for m in host.unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))


def paired_rows(seen, cond, uncond):
    """Checks that every row of every recorded model call carries a (crossattn, vector) pair exactly as the host built
    it (the row is found by its crossattn); returns the number of rows seen."""
    host_rows = [(cond["crossattn"][i], cond["vector"][i]) for i in range(cond["vector"].shape[0])]
    host_rows += [(uncond["crossattn"][i], uncond["vector"][i]) for i in range(uncond["vector"].shape[0])]
    rows = 0
    for call in seen:
        for ctx, vector in zip(call["crossattn"], call["vector"], strict=True):
            match = [j for j, (c, _) in enumerate(host_rows) if torch.equal(c, ctx)]
            assert len(match) == 1 and torch.equal(host_rows[match[0]][1], vector)
            rows += 1
    return rows


@pytest.mark.parametrize("chunks", [1, 4])
def test_sdxl_vector_reaches_every_row_of_the_batched_call_unchanged(chunks, monkeypatch):
    """SDXL (sgm) conditioning is a dict; its pooled `vector` must follow each row into the G-fold batch."""
    host, x, c, u = Host(), latent(), sdxl_conds(), sdxl_conds(seed=8)
    expect, _ = run(host, x=x, cond=simple(c), uncond=u)
    if chunks > 1:  # 3 rows a call: 12 rows in 4 chunks that cut through the copies of the host's 4 rows
        monkeypatch.setattr(a1111, "memory_budget", lambda *a, **k: MemoryBudget(lambda: 3, lambda n, shape: n))
    host.sd_model.seen_conds.clear()
    got, state = run(host, x=x, cond=simple(c), uncond=u)
    assert not host.warnings and state.composer.chunker.most_chunks == chunks
    assert paired_rows(host.sd_model.seen_conds, c, u) == STEPS * 3 * 4  # base + 2 LoRAs, 2 images × cond/uncond
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    assert (got - sample(host.denoiser(), x, simple(c), u)).abs().mean() > 1e-3


def test_sdxl_routed_lora_equals_the_host_merge():
    """Switch mode holding LoRA a is base + a's routed delta: equal to the host's merge of a alone, vector included."""
    host, x, c, u = Host(), latent(), sdxl_conds(), sdxl_conds(seed=8)
    held = Settings(**{**ON.to_dict(), "mode": "switch", "switch_interval": 1000})
    got, _ = run(host, held, x=x, cond=simple(c), uncond=u)
    host.networks_module.loaded_networks[:] = host.networks[:1]
    merged = sample(host.denoiser(), x, simple(c), u)
    host.networks_module.loaded_networks[:] = host.networks[1:]
    other = sample(host.denoiser(), x, simple(c), u)
    torch.testing.assert_close(got, merged, rtol=1e-4, atol=1e-4)
    assert (got - other).abs().mean() > 1e-3


def test_oom_above_k_rows_still_gives_the_image_for_every_k():
    """The UNet runs out of memory above k rows: each step is retried in smaller chunks, with the same result."""
    host, x, c, u = Host(), latent(), sdxl_conds(), sdxl_conds(seed=8)
    expect, _ = run(host, x=x, cond=simple(c), uncond=u)
    for k in range(1, 13):  # the batched call has 12 rows
        def oom(module, args, k=k):
            if args[0].shape[0] > k:
                raise torch.cuda.OutOfMemoryError(f"CUDA out of memory: {args[0].shape[0]} rows")

        handle = host.unet.register_forward_pre_hook(oom)
        try:
            got, state = run(host, x=x, cond=simple(c), uncond=u)
        finally:
            handle.remove()
        assert not host.warnings and state.failed is None
        assert (state.composer.chunker.ooms > 0) == (k < 12) and state.composer.chunker.cap in (None, *range(1, k + 1))
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
