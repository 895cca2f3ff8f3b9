"""Speed fast: the masked pass (Σ_i Ω_i ⊙ Δ_i per layer), its cross-attention blend, its schedule, and the hosts."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loratorio.core import (
    BatchLayout,
    Callback,
    Composer,
    Dense,
    FastRules,
    LoHa,
    LoKr,
    LowRank,
    MultiAdapter,
    Settings,
    merged_weight,
)
from loratorio.core.masked import RowMasks
from loratorio.hosts import a1111, forge
from tests.toy import CTX, make_lora, make_unet, merged_copy

# A tiny threshold of the user's own keeps both LoRAs composed: fast mode's automatic globals (FastRules.auto_global)
# would move the toy LoRAs, whose divergence is spread alike over the latent, to every row.
FAST = dict(enabled=True, patch_size=4, temperature=0.05, speed="fast", full_every=3, auto_global=1e-6)


class Attention(nn.Module):
    """SD's attention layer shape: to_q/to_k/to_v/to_out; keys and values from `context` when one is given."""

    def __init__(self, dim: int, ctx: int) -> None:
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(ctx, dim, bias=False)
        self.to_v = nn.Linear(ctx, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.calls = 0

    def forward(self, x, context=None):
        self.calls += 1
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        return self.to_out((q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).softmax(-1) @ v)


class PerPosition(nn.Module):
    """Every layer sees one latent position alone: 1×1 convs (one stride 2), token Linears, cross-attention queries,
    nearest upsampling. A region of the output then depends only on that region of the input (2×2-aligned)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(4, 8, 1)
        self.down = nn.Conv2d(8, 16, 1, stride=2)
        self.attn = Attention(16, CTX)
        self.ff = nn.Linear(16, 16)
        self.up = nn.Conv2d(16, 8, 1)
        self.conv_out = nn.Conv2d(8, 4, 1)

    def forward(self, x, sigma, context):
        h = F.silu(self.conv_in(x))
        d = self.down(h)
        b, c, hh, ww = d.shape
        t = d.flatten(2).transpose(1, 2)
        t = t + self.attn(t, context=context)
        t = t + self.ff(F.gelu(t))
        d = t.transpose(1, 2).reshape(b, c, hh, ww)
        return self.conv_out(F.silu(self.up(F.interpolate(d, scale_factor=2.0)) + h))


def low_rank(g, layer, rank=2, mid=False):
    if isinstance(layer, nn.Conv2d):
        down = torch.randn(rank, layer.in_channels, 1, 1, generator=g) * 0.4
        up = torch.randn(layer.out_channels, rank, 1, 1, generator=g) * 0.4
        return LowRank(down, up, alpha=1.0, mid=torch.randn(rank, rank, 1, 1, generator=g) if mid else None)
    return LowRank(torch.randn(rank, layer.in_features, generator=g) * 0.4,
                   torch.randn(layer.out_features, rank, generator=g) * 0.4, alpha=1.0)


def per_position_loras(model):
    """LoRA 0 all low-rank; LoRA 1 mixes kinds: Tucker mid, Dense, LoHa and LoKr (the y' − y path) and a host
    Callback."""
    g = torch.Generator().manual_seed(4)
    names = ("conv_in", "down", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out", "ff", "up", "conv_out")
    first = {n: low_rank(g, model.get_submodule(n)) for n in names}
    second = {n: low_rank(g, model.get_submodule(n), mid=n == "conv_in") for n in names}
    for n in ("ff", "attn.to_v"):
        second[n] = Dense(merged_weight(model.get_submodule(n), second[n]))
    second["attn.to_q"] = LoHa(*(torch.randn(shape, generator=g) * 0.5 for shape in ((16, 2), (2, 16), (16, 3),
                                                                                       (3, 16))))
    # up: Conv2d 16 -> 8, 1x1; ΔW = w1 (2, 4) ⊗ w2 (4, 4, 1, 1): 8 outputs, 16 inputs in 4 groups of 4.
    second["up"] = LoKr(w1=torch.randn(2, 4, generator=g) * 0.5, w2=torch.randn(4, 4, 1, 1, generator=g) * 0.5)
    conv_out = second["conv_out"]
    second["conv_out"] = Callback(lambda x, y: conv_out.apply(model.conv_out, x, y.clone()))
    return [first, second]


def data(rows=2, side=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 4, side, side, generator=g), torch.rand(rows, generator=g) + 0.5,
            torch.randn(rows, 3, CTX, generator=g))


def routed(router, model, inputs, label):
    with router.routed([label] * inputs[0].shape[0]):
        return model(*inputs)


@torch.no_grad()
def test_one_hot_masks_route_each_region_to_its_lora_on_per_position_layers():
    torch.manual_seed(0)
    model = PerPosition().eval()
    inputs = data()
    masks = torch.zeros(2, 2, 1, 8, 8)
    masks[0, :, :, :, :4] = 1  # left half: LoRA 0; right half: LoRA 1
    masks[1, :, :, :, 4:] = 1
    with MultiAdapter(model, per_position_loras(model)) as router:
        only = [routed(router, model, inputs, i) for i in (0, 1)]
        with router.masked(masks):
            got = model(*inputs)
        assert router._mask_stacks[model.ff].ids == (0,) and router._mask_stacks[model.ff].generic == (1,)
    torch.testing.assert_close(got[..., :4], only[0][..., :4], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[..., 4:], only[1][..., 4:], rtol=1e-5, atol=1e-6)
    for half in (slice(0, 4), slice(4, 8)):
        assert (only[0][..., half] - only[1][..., half]).abs().mean() > 1e-2  # the LoRAs differ everywhere


def scaled(lora, c):
    return {n: dataclasses.replace(a, multiplier=a.multiplier * c) for n, a in lora.items()}


@torch.no_grad()
def test_constant_masks_equal_the_merged_model_scaled_per_lora():
    """Linear deltas weighted by constants c_i on every layer (time embedding and text tokens included) are the
    merged model with ΔW_i scaled by c_i: per row, including a row whose weights sum below 1 (re-centred negative)."""
    unet = make_unet()
    lora0 = make_lora(unet, seed=1)
    lora1 = {n: Dense(merged_weight(unet.get_submodule(n), a)) for n, a in make_lora(unet, seed=2).items()}
    weights = [(0.3, 0.7), (0.15, 0.35)]
    x, sigma, ctx = data()
    masks = torch.tensor(weights).t()[:, :, None, None, None].expand(2, 2, 1, 8, 8)
    with MultiAdapter(unet, [lora0, lora1]) as router, router.masked(masks):
        got = unet(x, sigma, ctx)
    for row, (c0, c1) in enumerate(weights):
        merged = merged_copy(merged_copy(unet, scaled(lora0, c0)), scaled(lora1, c1))
        torch.testing.assert_close(got[row], merged(x, sigma, ctx)[row], rtol=1e-4, atol=1e-5)
    assert (got[0] - unet(x, sigma, ctx)[0]).abs().mean() > 1e-2


@torch.no_grad()
def test_the_router_keeps_one_copy_of_the_factors_when_routed_and_masked_calls_alternate():
    """Speed fast alternates routed full steps and masked passes; each kind stacks its own copy of the factors, and
    holding both doubled the LoRAs' memory. Only the current kind is kept; a rebuilt stack gives the same output."""
    unet = make_unet()
    router = MultiAdapter(unet, [make_lora(unet, seed=1), make_lora(unet, seed=2)])
    inputs = data()
    masks = torch.full((2, 2, 1, 8, 8), 0.5)
    with router:
        first = routed_rows(router, unet, inputs, [0, 1])
        held_routed = router.cached_bytes
        with router.masked(masks):
            masked = unet(*inputs)
        held_masked = router.cached_bytes
        assert held_routed > 0 and held_masked > 0 and not router._stacks
        again = routed_rows(router, unet, inputs, [0, 1])
        assert router.cached_bytes == held_routed and not router._mask_stacks
        with router.masked(masks):
            masked_again = unet(*inputs)
        assert router.cached_bytes == held_masked
    assert torch.equal(first, again) and torch.equal(masked, masked_again)
    assert router.cached_bytes == 0  # removal drops both


def routed_rows(router, model, inputs, labels):
    with router.routed(labels):
        return model(*inputs)


class AttentionModel(nn.Module):
    def __init__(self, positional: bool) -> None:
        super().__init__()
        self.attn = Attention(16, 16)  # context as wide as x, so that it also runs as self-attention
        self.positional = positional

    def forward(self, x, context=None):
        return self.attn(x, context) if self.positional else self.attn(x, context=context)


@pytest.mark.parametrize("positional", [False, True], ids=["context=", "positional context"])
@torch.no_grad()
def test_cross_attention_runs_once_per_lora_and_blends_exactly(positional):
    """Soft masks, one row summing to 1 and one to 0.6 (the base takes the rest): Σ_j Ω_j ⊙ attention_j."""
    torch.manual_seed(0)
    model = AttentionModel(positional).eval()
    g = torch.Generator().manual_seed(2)
    loras = [{n: low_rank(g, model.get_submodule(n)) for n in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out")}
             for _ in range(2)]
    x, ctx = torch.randn(2, 16, 16, generator=g), torch.randn(2, 3, 16, generator=g)
    w = torch.rand(2, 2, 1, 4, 4, generator=g)
    w = w / w.sum(0, keepdim=True)
    w[:, 1] *= 0.6
    with MultiAdapter(model, loras) as router:
        outs = [routed(router, model, (x, ctx), i) for i in (0, 1)]
        base = model(x, context=ctx)
        model.attn.calls = 0
        with router.masked(w):
            got = model(x, context=ctx)
        assert model.attn.calls == 3  # LoRA 0, LoRA 1, and the base for the row that sums to 0.6
        tokens = w.reshape(2, 2, 16, 1)
        expect = tokens[0] * outs[0] + tokens[1] * outs[1] + (1 - tokens.sum(0)) * base
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)
        model.attn.calls = 0
        with router.masked(w):
            model(x)  # self-attention: one pass, keys and values masked per token
        assert model.attn.calls == 1


@torch.no_grad()
def test_removal_restores_everything_even_after_a_failing_blend():
    torch.manual_seed(0)
    model = PerPosition().eval()
    inputs = data()
    before = model(*inputs)
    hooks = [(m, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()]
    router = MultiAdapter(model, per_position_loras(model)).install()
    expect = routed(router, model, inputs, 1)
    model.attn.to_out.forward = lambda t: 1 / 0  # fails inside the blend's first pass, with LoRA 0 forced
    with pytest.raises(ZeroDivisionError), router.masked(torch.full((2, 2, 1, 8, 8), 0.5)):
        model(*inputs)
    del model.attn.to_out.forward
    torch.testing.assert_close(routed(router, model, inputs, 1), expect)  # no adapter left forced
    router.remove()
    assert all(dict(m._forward_hooks) == h and dict(m._forward_pre_hooks) == p for m, h, p in hooks)
    assert torch.equal(model(*inputs), before)


def test_masks_follow_the_latent_pyramid_and_reject_bad_shapes():
    w = torch.rand(2, 1, 1, 7, 5)
    masks = RowMasks(w / w.sum(0))
    assert masks.level(35) == (7, 5) and masks.level(12) == (4, 3) and masks.level(4) == (2, 2) and \
        masks.level(77) is None
    tokens = masks.for_output(torch.zeros(1, 12, 3))
    assert tokens.shape == (2, 1, 12, 1)
    torch.testing.assert_close(tokens.sum(0), torch.ones(1, 12, 1))  # area-averaged weights still sum to 1
    flat = masks.for_output(torch.zeros(1, 9))
    torch.testing.assert_close(flat.reshape(2), masks.weights.mean(dim=(1, 2, 3, 4)))
    text = RowMasks(masks.weights * 0.5, text="full").for_output(torch.zeros(1, 77, 3))  # not an image level
    torch.testing.assert_close(text.reshape(2), torch.full((2,), 0.5))  # every LoRA at the row's total
    with pytest.raises(ValueError, match=r"\(N, B, 1, H, W\)"):
        RowMasks(torch.zeros(2, 1, 7, 5))
    with MultiAdapter(make_unet(), [{}]) as router, pytest.raises(ValueError, match="masks name 2"):
        with router.masked(torch.zeros(2, 1, 1, 8, 8)):
            pass


UNCORRECTED = FastRules(correct="none")


def schedule_run(settings, steps=7, rules=UNCORRECTED):
    """Outputs of a 7-step run; by_hand[k]: steps 3 and 4's masked pass of every row with the weights then."""
    unet = make_unet()
    loras = [make_lora(unet, seed=1), make_lora(unet, seed=2)]
    x, sigma, ctx = data(4)
    rows, outs, by_hand = [], [], {}

    def fn(a):
        rows.append(a[0].shape[0])
        return unet(*a)

    with torch.no_grad(), MultiAdapter(unet, loras) as router:
        composer = Composer(router, settings, fast_rules=rules)
        for step in range(steps):
            inputs = (x + step, sigma, ctx)
            outs.append(composer(fn, inputs, BatchLayout.cond_then_uncond(2), step))
            if step in (3, 4):  # the masked pass by hand, with the negative's map scaled by 1 − λ
                w = composer.last_weights
                with router.masked(torch.cat([w, w * (1 - settings.recentre)], dim=1)):
                    by_hand[step] = unet(*inputs)
    return rows, outs, by_hand


def test_fast_schedule_evaluates_fully_every_k_steps_and_masks_in_between():
    rows, outs, by_hand = schedule_run(Settings(**FAST))
    assert rows == [12, 4, 4, 12, 4, 4, 12]  # base + 2 LoRAs on 4 rows, then one pass of the host's 4 rows
    torch.testing.assert_close(outs[4], by_hand[4])
    full_rows, full_outs, _ = schedule_run(Settings(**{**FAST, "speed": "full"}))
    assert full_rows == [12] * 7
    torch.testing.assert_close(outs[3], full_outs[3])  # a full step is LoRAtorio as ever
    assert (outs[4] - full_outs[4]).abs().mean() > 1e-4
    assert schedule_run(Settings(**{**FAST, "full_every": 1}))[0] == [12] * 7


def test_corrected_fast_mode_fuses_the_prompt_exactly_and_carries_the_residual():
    """FastRules.correct "cond": a full step evaluates base + LoRAs on the prompt rows only (the fused prompt is
    LoRAtorio's), the negative comes from the masked pass; a fast step adds ε_fused − ε_masked of the last full
    step to its prompt rows."""
    rows, outs, by_hand = schedule_run(Settings(**FAST), rules=FastRules())
    assert rows == [6, 4, 4, 4, 6, 4, 4, 4, 6, 4]  # (base + 2 LoRAs) × 2 prompt rows, then the masked pass
    _, full_outs, _ = schedule_run(Settings(**{**FAST, "speed": "full"}))
    torch.testing.assert_close(outs[3][:2], full_outs[3][:2])
    torch.testing.assert_close(outs[3][2:], by_hand[3][2:])
    residual = full_outs[3][:2] - by_hand[3][:2]
    assert residual.abs().mean() > 1e-4  # the masked pass is not the fusion: there is something to carry
    torch.testing.assert_close(outs[4][:2], by_hand[4][:2] + residual)
    torch.testing.assert_close(outs[4][2:], by_hand[4][2:])
    uncorrected = schedule_run(Settings(**FAST))[1]
    assert (outs[4] - uncorrected[4]).abs().mean() > 1e-4
    every, every_outs, _ = schedule_run(Settings(**{**FAST, "full_every": 1}), rules=FastRules())
    assert every == [12] * 7  # a full step at every step is full speed, exactly
    torch.testing.assert_close(every_outs, full_outs, rtol=0, atol=0)


def test_the_residual_is_kept_in_eps_space_for_x0_predictions():
    """Hosts that hand over x0: the residual kept at one sigma is the same ε correction at another."""
    with MultiAdapter(make_unet(), [{}]) as router:
        composer = Composer(router, Settings(**FAST))
        x, fused, masked = (torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
        sigma = torch.tensor([2.0, 3.0])
        composer.keep_residual(fused, masked, 0, x, sigma)
        eps = lambda x0, s: (x - x0) / s.reshape(-1, 1, 1, 1)  # noqa: E731
        later, sigma2 = torch.randn(2, 4, 8, 8), torch.tensor([0.5, 1.0])
        out = composer.corrected(later, 0, x, sigma2)
        torch.testing.assert_close(eps(out, sigma2) - eps(later, sigma2), eps(fused, sigma) - eps(masked, sigma))
        # another row count than the kept residual: left as it is
        torch.testing.assert_close(composer.corrected(later[:1], 0, x[:1], sigma2[:1]), later[:1])


HOST_FAST = Settings(enabled=True, patch_size=4, temperature=0.05, speed="fast", full_every=2, auto_global=1e-6)
AUTO_GLOBALS = dataclasses.replace(HOST_FAST, auto_global=0.0)  # fast mode's own threshold: the toy LoRAs go global


@pytest.mark.parametrize("case", ["one call", "batch_cond_uncond off", "AND prompt", "skipped uncond", "timesteps",
                                  "automatic globals"])
def test_a1111_fast_mode_matches_the_engine_at_plain_lora_rows(case):
    from tests import fake_a1111 as fake
    from tests import test_a1111 as a1

    host, x, u = a1.Host(), a1.latent(), a1.conds(seed=8)
    cond, layout = a1.simple(a1.conds()), BatchLayout.cond_then_uncond(2)
    if case == "AND prompt":
        cond, layout = ([[(0, 1.0), (1, 0.5)], [(2, 1.0)]], a1.conds(images=3, seed=9)), BatchLayout((0, 1, 2), (3, 4),
                                                                                                   (0, 0, 1))
    host.opts.batch_cond_uncond = case != "batch_cond_uncond off"
    host.opts.s_min_uncond_all = case == "skipped uncond"
    if case == "skipped uncond":
        layout = BatchLayout((0, 1))
    rows = []
    host.unet.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    cls = fake.CFGDenoiserTimesteps if case == "timesteps" else fake.CFGDenoiser
    settings = AUTO_GLOBALS if case == "automatic globals" else HOST_FAST
    got, state = a1.run(host, settings, cls=cls, x=x, cond=cond, uncond=u, eps=case == "timesteps",
                        s_min_uncond=100.0 if case == "skipped uncond" else 0.0)
    assert not host.warnings and state.failed is None
    host_rows = rows[:]
    expect = a1.reference(host, x, cond, u, layout, settings)
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-4)
    n, n_cond = len(layout.cond_rows) + len(layout.uncond_rows), len(layout.cond_rows)
    # Steps 0 and 2: base + 2 LoRAs on the cond rows, then the masked pass of the host's rows; 1 and 3: the latter.
    # With a LoRA made global after step 0, step 2 evaluates base + 1 LoRA.
    composed = 2 if case != "automatic globals" else 1
    assert sum(host_rows) == (3 * n_cond + n) + ((1 + composed) * n_cond + n) + 2 * n
    full, _ = a1.run(host, a1.ON, cls=cls, x=x, cond=cond, uncond=u, eps=case == "timesteps",
                     s_min_uncond=100.0 if case == "skipped uncond" else 0.0)
    assert (got - full).abs().mean() > 1e-4


@pytest.mark.parametrize("case", ["forge", "reforge", "one chunk per call", "AND prompt", "cfg 1",
                                  "automatic globals"])
def test_forge_fast_mode_matches_the_engine_at_plain_lora_rows(case):
    from tests import test_forge as fg

    host, x, u = fg.Host(reforge=case == "reforge"), fg.latent(), fg.prompt(seed=8)
    cond = [fg.prompt(), fg.prompt(seed=9, strength=0.5)] if case == "AND prompt" else [fg.prompt()]
    cfg = 1.0 if case == "cfg 1" else fg.CFG
    calls: list = []
    settings = AUTO_GLOBALS if case == "automatic globals" else HOST_FAST
    got, state = fg.run(host, settings, x=x, cond=cond, uncond=u, cfg=cfg, calls=calls,
                        max_chunks=1 if case == "one chunk per call" else None)
    assert not host.warnings and state.failed is None
    seen = [s["rows"] for s in host.after.model.diffusion_model.seen]
    chunks = len(cond) + (cfg != 1.0)
    # 2 images; full steps: 3 groups on the cond chunks, then the masked pass of every chunk; fast steps: the latter.
    # With a LoRA made global after step 0, step 2 evaluates 2 groups.
    groups = 3 if case != "automatic globals" else 2
    assert sum(seen) == (3 * 2 * len(cond) + 2 * chunks) + (groups * 2 * len(cond) + 2 * chunks) + 2 * 2 * chunks
    torch.testing.assert_close(got, fg.reference(host, x, cond, u, cfg=cfg, settings=settings), rtol=1e-4,
                               atol=1e-4)
    full, _ = fg.run(host, fg.ON, x=x, cond=cond, uncond=u, cfg=cfg)
    assert (got - full).abs().mean() > 1e-4


def test_sharpened_masks_keep_each_pixels_winner_and_sum_to_one():
    from loratorio.core.engine import sharpened

    w = torch.softmax(torch.randn(3, 2, 1, 4, 4, generator=torch.Generator().manual_seed(0)), 0)
    assert sharpened(w, 1.0) is w
    for gamma in (2.0, float("inf")):
        s = sharpened(w, gamma)
        assert torch.allclose(s.sum(0), torch.ones_like(s[0]))
        assert torch.equal(s.argmax(0), w.argmax(0))
        assert (s.max(0).values >= w.max(0).values - 1e-6).all()  # the winner only gains
    assert set(sharpened(w, float("inf")).unique().tolist()) == {0.0, 1.0}


def test_a1111_a_failure_in_the_corrected_full_steps_masked_pass_falls_back_to_the_host(monkeypatch):
    """The masked pass runs in end_step: if it fails, the step's rows are the host's own, and so is the rest (the
    image equals a run whose composition window ends before that step)."""
    from tests import test_a1111 as a1

    host, x, c, u = a1.Host(), a1.latent(), a1.simple(a1.conds()), a1.conds(seed=8)
    want, _ = a1.run(host, dataclasses.replace(HOST_FAST, end=0.5), x=x, cond=c, uncond=u)
    denoiser = host.denoiser()
    state = host.install(denoiser, HOST_FAST)
    real = state.composer.keep_residual

    def flaky(*args, **kwargs):
        if state.composer._full_step == 2:  # the step just fused (the host's record is already closed)
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(state.composer, "keep_residual", flaky)
    got = a1.sample(denoiser, x, c, u)
    a1111.remove(state)
    assert state.failed and "boom" in host.warnings[0] and len(host.warnings) == 1
    torch.testing.assert_close(got, want)


def test_forge_a_failure_in_the_corrected_full_steps_masked_pass_falls_back_to_the_host(monkeypatch):
    from tests import test_forge as fg

    host, x, c, u = fg.Host(), fg.latent(), fg.prompt(), fg.prompt(seed=8)
    want, _ = fg.run(host, dataclasses.replace(HOST_FAST, end=0.5), x=x, cond=[c], uncond=u)
    host.reset()
    state = host.install(HOST_FAST)
    real = state.composer.keep_residual

    def flaky(*args, **kwargs):
        if state.composer._full_step == 2:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(state.composer, "keep_residual", flaky)
    try:
        got = fg.sample(host, x, [c], u)
    finally:
        forge.remove(state)
    assert state.failed and "boom" in host.warnings[0] and len(host.warnings) == 1
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_fast_rules_refuse_unknown_values():
    for bad in ({"correct": "all"}, {"uncond": "base"}, {"sharpen": 0.0}, {"auto_global": -1.0}):
        with pytest.raises(ValueError, match="correct must be"):
            FastRules(**bad)
