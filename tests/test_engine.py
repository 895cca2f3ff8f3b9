"""The engine over a host-style CFG batch, inside a toy Euler sampling loop (k-diffusion's sample_euler)."""


import pytest
import torch

from loratorio.core import (
    BatchLayout,
    Composer,
    FastRules,
    MultiAdapter,
    Settings,
    evaluate,
    recentre_uncond,
    weighted_sum,
)
from tests.toy import CTX, Denoiser, merged_copy

STEPS = 6
SIGMAS = torch.linspace(8.0, 0.0, STEPS + 1)
CFG = 5.0


def euler(denoise, x):
    """Algorithm 2 of Karras et al. 2022 without churn, as sample_euler does it."""
    for i in range(STEPS):
        s = SIGMAS[i].repeat(x.shape[0])
        d = (x - denoise(x, s, i)) / SIGMAS[i]
        x = x + d * (SIGMAS[i + 1] - SIGMAS[i])
    return x


def cfg_step(model_call, cond, uncond):
    """A host's CFG denoiser: batch [cond rows, uncond rows], then uncond + w·(cond − uncond)."""
    def denoise(x, sigma, step):
        b = x.shape[0]
        inputs = (torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([cond, uncond]))
        out = model_call(inputs, step)
        return out[b:] + CFG * (out[:b] - out[b:])
    return denoise


@pytest.fixture
def setting():
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, 4, 8, 8, generator=g) * SIGMAS[0], torch.randn(2, 3, CTX, generator=g), \
        torch.randn(2, 3, CTX, generator=g)


def merged_model(unet, lora):
    return Denoiser(merged_copy(unet, lora))


def compose_sampler(unet, loras, settings, space="x0"):
    den = Denoiser(unet)
    router = MultiAdapter(unet, loras).install()
    composer = Composer(router, settings, batched=settings.evaluation != "sequential")

    def call(inputs, step):
        x, sigma, ctx = inputs
        if space == "x0":
            return composer(lambda a: den(*a), inputs, BatchLayout.cond_then_uncond(x.shape[0] // 2), step, x, sigma)
        eps = composer(lambda a: unet(*a), inputs, BatchLayout.cond_then_uncond(x.shape[0] // 2), step)
        return x - sigma.view(-1, 1, 1, 1) * eps
    return call, router, composer


def test_single_lora_without_recentre_reproduces_plain_lora_sampling(unet, two_loras, setting):
    x, cond, uncond = setting
    plain = merged_model(unet, two_loras[0])
    expect = euler(cfg_step(lambda a, _: plain(*a), cond, uncond), x)
    call, router, _ = compose_sampler(unet, two_loras[:1], Settings(enabled=True, recentre=0.0))
    got = euler(cfg_step(call, cond, uncond), x)
    router.remove()
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-4)
    assert (got - euler(cfg_step(lambda a, _: Denoiser(unet)(*a), cond, uncond), x)).abs().mean() > 1e-2


@pytest.mark.parametrize("evaluation", ["batched", "sequential"])
def test_two_loras_compose_in_x0_and_eps_space_alike(unet, two_loras, setting, evaluation):
    x, cond, uncond = setting
    s = Settings(enabled=True, patch_size=4, temperature=0.05, evaluation=evaluation)
    outs = {}
    for space in ("x0", "eps"):
        call, router, composer = compose_sampler(unet, two_loras, s, space)
        outs[space] = euler(cfg_step(call, cond, uncond), x)
        router.remove()
    torch.testing.assert_close(outs["x0"], outs["eps"], rtol=1e-3, atol=1e-3)
    w = composer.last_weights
    assert w.shape == (2, 2, 1, 8, 8) and 0.0 < w[0].mean() < 1.0
    for lora in two_loras:
        single = merged_model(unet, lora)
        assert (outs["x0"] - euler(cfg_step(lambda a, _, m=single: m(*a), cond, uncond), x)).abs().mean() > 1e-3


def test_modes_differ_and_switch_is_one_lora(unet, two_loras, setting):
    x, cond, uncond = setting
    results = {}
    for mode in ("loratorio", "composite", "switch"):
        call, router, _ = compose_sampler(unet, two_loras, Settings(enabled=True, mode=mode, switch_interval=100))
        results[mode] = euler(cfg_step(call, cond, uncond), x)
        router.remove()
    assert (results["loratorio"] - results["composite"]).abs().mean() > 1e-3
    first = merged_model(unet, two_loras[0])
    torch.testing.assert_close(results["switch"], euler(cfg_step(lambda a, _: first(*a), cond, uncond), x),
                               rtol=1e-4, atol=1e-4)


def test_composite_is_mean_of_lora_predictions(unet, two_loras, setting):
    x, cond, uncond = setting
    inputs = (torch.cat([x, x]), SIGMAS[:1].repeat(4), torch.cat([cond, uncond]))
    call, router, _ = compose_sampler(unet, two_loras, Settings(enabled=True, mode="composite"))
    got = call(inputs, 0)
    router.remove()
    mean = sum(merged_model(unet, lo)(*inputs) for lo in two_loras) / 2
    torch.testing.assert_close(got, mean, rtol=1e-4, atol=1e-4)


def test_and_prompts_and_skipped_uncond_layouts(unet, two_loras, setting):
    """AND: two cond rows for image 0; NGMS: no uncond rows at all. Each cond row is fused on its own weights."""
    x, cond, uncond = setting
    sigma = SIGMAS[1].repeat(5)
    xs = torch.stack([x[0], x[0], x[1], x[0], x[1]])
    ctx = torch.cat([cond[:1], uncond[:1], cond[1:], uncond])
    layout = BatchLayout(cond_rows=(0, 1, 2), uncond_rows=(3, 4), uncond_of_cond=(0, 0, 1))
    den = Denoiser(unet)
    with MultiAdapter(unet, two_loras) as router:
        composer = Composer(router, Settings(enabled=True, patch_size=4))
        full = composer(lambda a: den(*a), (xs, sigma, ctx), layout, 1, xs, sigma)
        w = composer.last_weights
        skip = composer(lambda a: den(*a), (xs[:3], sigma[:3], ctx[:3]), BatchLayout((0, 1, 2)), 1, xs[:3], sigma[:3])
        per_row = [composer(lambda a: den(*a), (xs[i:i + 1], sigma[:1], ctx[i:i + 1]), BatchLayout((0,)), 1,
                            xs[i:i + 1], sigma[:1]) for i in range(3)]
    torch.testing.assert_close(skip, full[:3])
    torch.testing.assert_close(torch.cat(per_row), full[:3], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(w[:, 0], w[:, 1])  # the AND sub-prompts got their own maps


def test_uncond_reference_and_layout_validation(unet, two_loras, setting):
    x, cond, uncond = setting
    inputs = (torch.cat([x, x]), SIGMAS[1].repeat(4), torch.cat([cond, uncond]))
    with MultiAdapter(unet, two_loras) as router:
        outs = [Composer(router, Settings(enabled=True, reference=r, patch_size=4))(lambda a: unet(*a), inputs,
                                                                      BatchLayout.cond_then_uncond(2), 0)
                for r in ("cond", "uncond")]
    assert not torch.allclose(outs[0], outs[1])
    with pytest.raises(ValueError, match="uncond_of_cond"):
        BatchLayout((0, 1), (2, 3), (0, 0))


def reuse_run(unet, loras, settings, setting, steps=5):
    """Composer over `steps` steps of fixed inputs with changing sigma; the rows of each model call, and the maps."""
    x, cond, uncond = setting
    rows, maps, outs = [], [], []
    den = Denoiser(unet)

    def fn(a):
        rows.append(a[0].shape[0])
        return den(*a)
    with MultiAdapter(unet, loras) as router:
        composer = Composer(router, settings)
        for step in range(steps):
            sigma = SIGMAS[step].repeat(4)
            inputs = (torch.cat([x, x]) + step, sigma, torch.cat([cond, uncond]))
            outs.append(composer(fn, inputs, BatchLayout.cond_then_uncond(2), step, inputs[0], sigma))
            maps.append(composer.last_weights)
        preds = [evaluate(lambda a: den(*a), (torch.cat([x, x]) + s, SIGMAS[s].repeat(4), torch.cat([cond, uncond])),
                          router) for s in range(steps)]
    return rows, maps, outs, preds


@pytest.mark.parametrize("recentre", [0.5, 0.0])
def test_reuse_keeps_the_map_for_k_steps(unet, two_loras, setting, recentre):
    settings = Settings(enabled=True, reuse=2, recentre=recentre, patch_size=4)
    rows, maps, outs, preds = reuse_run(unet, two_loras, settings, setting)
    assert [maps[i] is maps[0] for i in range(5)] == [True, True, True, False, False]
    assert maps[4] is maps[3]
    # Fresh steps evaluate base + 2 LoRAs on 4 rows; reusing steps skip the base only when nothing reads it.
    reused_rows = 12 if recentre else 8
    assert rows == [12, reused_rows, reused_rows, 12, reused_rows]
    for step in (1, 2, 4):  # a reusing step is the fusion of this step's predictions with the kept map
        base, loras, w = preds[step][0], preds[step][1:], maps[step]
        expect = torch.cat([weighted_sum(loras[:, :2], w),
                            recentre_uncond(base[2:], weighted_sum(loras[:, 2:], w), recentre)])
        torch.testing.assert_close(outs[step], expect, rtol=1e-5, atol=1e-5)
    fresh = reuse_run(unet, two_loras, Settings(enabled=True, recentre=recentre, patch_size=4), setting)
    torch.testing.assert_close(outs[3], fresh[2][3])  # step 3 recomputed: as without reuse
    assert (outs[1] - fresh[2][1]).abs().mean() > 1e-4  # and reuse really changed step 1


def test_reuse_restarts_when_steps_restart(unet, two_loras, setting):
    """A new pass (steps from 0 again) or another cond-row count never reuses an old map."""
    x, cond, uncond = setting
    inputs = (torch.cat([x, x]), SIGMAS[1].repeat(4), torch.cat([cond, uncond]))
    with MultiAdapter(unet, two_loras) as router:
        composer = Composer(router, Settings(enabled=True, reuse=5))
        composer(lambda a: unet(*a), inputs, BatchLayout.cond_then_uncond(2), 3)
        first = composer.last_weights
        composer(lambda a: unet(*a), inputs, BatchLayout.cond_then_uncond(2), 0)
        assert composer.last_weights is not first
        second = composer.last_weights
        composer(lambda a: unet(*a), tuple(t[1:3] for t in inputs), BatchLayout((0,), (1,), (0,)), 1)
        assert composer.last_weights is not second and composer.last_weights.shape[1] == 1


class _Router:
    """What the Composer reads off a router when it only fuses: the LoRA count and the shared adapters."""

    n_adapters = 3
    shared: tuple[int, ...] = ()


def test_auto_global_moves_evenly_divergent_loras_to_every_row():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 4, 8, 8, generator=g)
    local = base.clone()
    local[..., :2, :2] += 3 * torch.randn(4, 2, 2, generator=g)  # diverges in one corner only
    even = base + 0.5 * torch.randn(1, 4, 8, 8, generator=g)  # diverges alike everywhere
    other = base.clone()
    other[..., 4:, 6:] += 3 * torch.randn(4, 4, 2, generator=g)  # diverges in another corner
    preds = torch.stack([base, local, even, other])  # base, then three LoRAs
    router = _Router()
    composer = Composer(router, Settings(enabled=True, patch_size=2, auto_global=1.0))
    composer.fuse(preds, BatchLayout((0,)), 0)
    assert composer.composed == (0, 2) and router.shared == (1,)
    assert composer.groups(1) == (None, 0, 2)
    composer.fuse(preds[[0, 1, 3]], BatchLayout((0,)), 1)  # later steps: the composed LoRAs only
    shown = composer.display_weights
    assert shown.shape[0] == 3 and torch.equal(shown[1], torch.ones_like(shown[1]))
    torch.testing.assert_close(shown[[0, 2]], composer.last_weights)
    off = Composer(_Router(), Settings(enabled=True, patch_size=2))
    off.fuse(preds, BatchLayout((0,)), 0)
    assert off.composed == (0, 1, 2) and off.router.shared == ()
    # every LoRA even: the most spread one still competes (with itself), never none
    flat = Composer(_Router(), Settings(enabled=True, patch_size=2, auto_global=10.0))
    flat.fuse(preds, BatchLayout((0,)), 0)
    assert len(flat.composed) == 1 and len(flat.router.shared) == 2


def test_fast_mode_makes_evenly_divergent_loras_global_where_the_user_left_auto_global_off():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 4, 8, 8, generator=g)
    local = base.clone()
    local[..., :2, :2] += 3 * torch.randn(4, 2, 2, generator=g)
    even = base + 1.0  # a style: diverges alike everywhere (spread about 0.4, under fast mode's 0.5)
    preds = torch.stack([base, local, even])

    def composed(rules=None, **settings):
        router = _Router()
        router.n_adapters = 2
        composer = Composer(router, Settings(enabled=True, patch_size=2, **settings), fast_rules=rules or FastRules())
        composer.fuse(preds, BatchLayout((0,)), 0)
        return composer.composed, composer.router.shared

    assert composed(speed="fast") == ((0,), (1,))
    assert composed() == ((0, 1), ())  # full speed: the user's 0 is off
    assert composed(speed="fast", full_every=1) == ((0, 1), ())  # every step full: exactly full speed
    assert composed(FastRules(auto_global=0.0), speed="fast") == ((0, 1), ())
    assert composed(speed="fast", auto_global=0.01) == ((0, 1), ())  # the user's own threshold wins


def test_smoothing_blends_each_map_with_the_last_steps_chunk_by_chunk():
    """smoothing β: Ω_t = β·Ω_{t−1} + (1 − β)·Ω_t, the k-th fuse of a step with the k-th of the step before (hosts
    fuse chunks of rows separately, so chunks never mix); still a partition of 1; a new pass starts without a past."""
    g = torch.Generator().manual_seed(3)
    preds = [torch.randn(4, 1, 4, 8, 8, generator=g) for _ in range(4)]  # base + 3 LoRAs, one cond row
    calls = [(0, preds[0]), (0, preds[1]), (1, preds[2]), (1, preds[3]), (0, preds[2])]

    def maps(**kw):
        composer, out = Composer(_Router(), Settings(enabled=True, patch_size=2, **kw)), []
        for step, p in calls:
            composer.fuse(p, BatchLayout((0,)), step)
            out.append(composer.last_weights.clone())
        return out

    fresh, smooth = maps(), maps(smoothing=0.75)
    assert not torch.allclose(fresh[0], fresh[2]) and not torch.allclose(fresh[0], fresh[1])
    torch.testing.assert_close(smooth[:2], fresh[:2])  # the first step has no past
    torch.testing.assert_close(smooth[2], 0.75 * fresh[0] + 0.25 * fresh[2])  # chunk 1 with chunk 1
    torch.testing.assert_close(smooth[3], 0.75 * fresh[1] + 0.25 * fresh[3])  # chunk 2 with chunk 2
    torch.testing.assert_close(smooth[3].sum(0), torch.ones_like(smooth[3][0]))
    torch.testing.assert_close(smooth[4], fresh[4])  # back to step 0: a new pass
    assert all(torch.equal(a, b) for a, b in zip(maps(smoothing=0.0), fresh, strict=True))
    # Speed fast renews the map only every few steps: it keeps them fresh (full every 1 is full speed: smoothed).
    assert all(torch.equal(a, b) for a, b in zip(maps(smoothing=0.75, speed="fast"), fresh, strict=True))
    torch.testing.assert_close(maps(smoothing=0.75, speed="fast", full_every=1), smooth)


def test_temperature_schedule_runs_geometrically_over_the_steps():
    composer = Composer(_Router(), Settings(enabled=True, temperature=0.2, temperature_end=0.02))
    assert composer.temperature(3) == 0.2  # no step count known: constant
    composer.total_steps = 5
    taus = [composer.temperature(i) for i in range(5)]
    assert taus[0] == pytest.approx(0.2) and taus[-1] == pytest.approx(0.02)
    assert taus[2] == pytest.approx((0.2 * 0.02) ** 0.5)
    assert Composer(_Router(), Settings(enabled=True, temperature=0.2)).temperature(4) == 0.2
