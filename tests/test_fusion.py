"""patch_weights, compose and the modes: shapes, hand-computed cases, edge cases, numerics."""

import math

import pytest
import torch
import torch.nn.functional as F

from loratorio.core import compose, mode_weights, patch_similarity, patch_weights, switch_index, to_eps


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("hw,p", [((8, 8), 4), ((9, 7), 4), ((8, 8), 1), ((8, 8), 8), ((6, 5), 16), ((13, 13), 3)])
def test_weights_shape_and_sum(hw, p):
    eps_loras, ref = randn(3, 2, 4, *hw, seed=1), randn(2, 4, *hw, seed=2)
    w = patch_weights(eps_loras, ref, p, 0.1)
    assert w.shape == (3, 2, 1, *hw) and w.dtype == torch.float32
    torch.testing.assert_close(w.sum(0), torch.ones(2, 1, *hw))
    assert (w > 0).all()


def test_hand_computed_case():
    # One 2×2 latent, p = 1, 1 channel: cosines are ±1 per pixel.
    ref = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]]])
    lora_a = torch.tensor([[[[1.0, -1.0], [2.0, -3.0]]]])
    lora_b = -lora_a
    w = patch_weights(torch.stack([lora_a, lora_b]), ref, patch_size=1, temperature=0.5)
    high, low = math.exp(1 / 0.5), math.exp(-1 / 0.5)  # softmin: exp(−S/τ) for S = −1 and S = +1
    expect_a = torch.tensor([[low, high], [low, high]]) / (high + low)
    torch.testing.assert_close(w[0, 0, 0], expect_a)
    torch.testing.assert_close(w[1, 0, 0], 1 - expect_a)


def test_patch_cosine_uses_whole_patch_vector():
    g = torch.Generator().manual_seed(3)
    a, r = torch.randn(1, 1, 2, 4, 4, generator=g), torch.randn(1, 2, 4, 4, generator=g)
    sim = patch_similarity(a, r, 2)
    expect = F.cosine_similarity(a[0, 0, :, :2, 2:].flatten(), r[0, :, :2, 2:].flatten(), dim=0)
    torch.testing.assert_close(sim[0, 0, 0, 0, 1], expect)


def test_ragged_edge_patches_cover_the_remainder():
    """H, W not divisible by p: edge patches are the leftover rows/columns (ceil grid), not padded copies."""
    g = torch.Generator().manual_seed(4)
    a, r = torch.randn(1, 1, 2, 5, 5, generator=g), torch.randn(1, 2, 5, 5, generator=g)
    sim = patch_similarity(a, r, 4)
    assert sim.shape[-2:] == (2, 2)
    expect = F.cosine_similarity(a[0, 0, :, 4:, :4].flatten(), r[0, :, 4:, :4].flatten(), dim=0)
    torch.testing.assert_close(sim[0, 0, 0, 1, 0], expect)


def test_patch_at_least_latent_is_one_global_weight():
    eps_loras, ref = randn(2, 1, 4, 6, 6, seed=5), randn(1, 4, 6, 6, seed=6)
    w = patch_weights(eps_loras, ref, 64, 0.1)
    assert torch.unique(w[0]).numel() == 1


def test_more_divergent_lora_wins():
    ref = randn(1, 4, 8, 8, seed=7)
    close, far = ref + 0.01 * randn(1, 4, 8, 8, seed=8), randn(1, 4, 8, 8, seed=9)
    w = patch_weights(torch.stack([close, far]), ref, 4, 0.05)
    assert (w[1] > 0.9).all()


def test_top_k_masks_and_renormalises():
    eps_loras, ref = randn(4, 2, 4, 8, 8, seed=10), randn(2, 4, 8, 8, seed=11)
    w = patch_weights(eps_loras, ref, 4, 0.5, top_k=2)
    assert ((w > 0).sum(0) == 2).all()
    torch.testing.assert_close(w.sum(0), torch.ones(2, 1, 8, 8))
    sim = patch_similarity(eps_loras, ref, 4).repeat_interleave(4, -1).repeat_interleave(4, -2)
    kept_max = torch.where(w > 0, sim, -torch.inf).amax(0)
    dropped_min = torch.where(w == 0, sim, torch.inf).amin(0)
    assert (kept_max <= dropped_min).all()  # kept are the least similar to the base


@pytest.mark.parametrize("k", [None, 0, 4, 9])
def test_top_k_at_least_n_is_no_mask(k):
    eps_loras, ref = randn(4, 1, 4, 8, 8, seed=12), randn(1, 4, 8, 8, seed=13)
    torch.testing.assert_close(patch_weights(eps_loras, ref, 4, 0.5, top_k=k), patch_weights(eps_loras, ref, 4, 0.5))


def test_single_lora_weight_is_one():
    w = patch_weights(randn(1, 2, 4, 8, 8), randn(2, 4, 8, 8, seed=1), 2, 0.01)
    assert torch.equal(w, torch.ones_like(w))


def test_all_zero_patch_is_uniform_not_nan():
    eps_loras, ref = randn(3, 1, 4, 8, 8), randn(1, 4, 8, 8, seed=1)
    eps_loras[:, :, :, :4, :4] = 0
    ref[:, :, 4:, 4:] = 0
    w = patch_weights(eps_loras, ref, 4, 0.01)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w[:, :, :, :4, :4], torch.full((3, 1, 1, 4, 4), 1 / 3))
    torch.testing.assert_close(w[:, :, :, 4:, 4:], torch.full((3, 1, 1, 4, 4), 1 / 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    eps_loras, ref = randn(3, 2, 4, 16, 16, seed=14), randn(2, 4, 16, 16, seed=15)
    big = 300.0  # fp16 squares of 300 summed over C·p·p overflow unless the similarity runs in fp32
    half_loras, half_ref = (eps_loras * big).to(dtype), (ref * big).to(dtype)
    w_half = patch_weights(half_loras, half_ref, 8, 0.05)
    w_full = patch_weights(half_loras.double(), half_ref.double(), 8, 0.05)
    assert w_half.dtype == torch.float32 and torch.isfinite(w_half).all()
    torch.testing.assert_close(w_half, w_full.float(), rtol=1e-4, atol=1e-5)


def test_compose_single_lora_without_recentre_is_that_lora():
    base_c, base_u = randn(2, 4, 8, 8, seed=1), randn(2, 4, 8, 8, seed=2)
    lc, lu = randn(1, 2, 4, 8, 8, seed=3), randn(1, 2, 4, 8, 8, seed=4)
    w = patch_weights(lc, base_c, 4, 0.05)
    cond, uncond = compose(base_c, base_u, lc, lu, w, recentre=0.0)
    assert torch.equal(cond, lc[0]) and torch.equal(uncond, lu[0])


def test_compose_recentre_mixes_base_uncond():
    base_c, base_u = randn(1, 4, 8, 8, seed=1), randn(1, 4, 8, 8, seed=2)
    lc, lu = randn(2, 1, 4, 8, 8, seed=3), randn(2, 1, 4, 8, 8, seed=4)
    w = patch_weights(lc, base_c, 4, 0.05)
    _, uncond = compose(base_c, base_u, lc, lu, w, recentre=0.5)
    torch.testing.assert_close(uncond, 0.5 * base_u + 0.5 * (w * lu).sum(0))
    _, only_base = compose(base_c, base_u, lc, lu, w, recentre=1.0)
    torch.testing.assert_close(only_base, base_u)
    with pytest.raises(ValueError, match="recentre"):
        compose(base_c, base_u, lc, lu, w, recentre=1.5)


def test_two_identical_loras_equal_one():
    base_c, base_u = randn(1, 4, 8, 8, seed=1), randn(1, 4, 8, 8, seed=2)
    lc, lu = randn(1, 1, 4, 8, 8, seed=3), randn(1, 1, 4, 8, 8, seed=4)
    one = compose(base_c, base_u, lc, lu, patch_weights(lc, base_c, 4, 0.05))
    lc2, lu2 = lc.repeat(2, 1, 1, 1, 1), lu.repeat(2, 1, 1, 1, 1)
    two = compose(base_c, base_u, lc2, lu2, patch_weights(lc2, base_c, 4, 0.05))
    for a, b in zip(one, two, strict=True):
        torch.testing.assert_close(a, b)


def test_x0_space_and_eps_space_agree():
    x, sigma = randn(2, 4, 8, 8, seed=1), torch.tensor([3.0, 0.7])
    eps = {k: randn(*s, seed=i) for i, (k, s) in enumerate(
        [("bc", (2, 4, 8, 8)), ("bu", (2, 4, 8, 8)), ("lc", (3, 2, 4, 8, 8)), ("lu", (3, 2, 4, 8, 8))])}
    s = sigma.view(-1, 1, 1, 1)
    x0 = {k: x - s * v for k, v in eps.items()}
    torch.testing.assert_close(to_eps(x, x0["lc"], sigma), eps["lc"], rtol=1e-5, atol=1e-5)
    w = patch_weights(eps["lc"], eps["bc"], 4, 0.05)
    w_x0 = patch_weights(to_eps(x, x0["lc"], sigma), to_eps(x, x0["bc"], sigma), 4, 0.05)
    torch.testing.assert_close(w, w_x0, rtol=1e-4, atol=1e-5)
    c_eps, u_eps = compose(eps["bc"], eps["bu"], eps["lc"], eps["lu"], w)
    c_x0, u_x0 = compose(x0["bc"], x0["bu"], x0["lc"], x0["lu"], w)
    torch.testing.assert_close(c_x0, x - s * c_eps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(u_x0, x - s * u_eps, rtol=1e-5, atol=1e-5)


def test_modes():
    lc, ref = randn(3, 2, 4, 8, 8), randn(2, 4, 8, 8, seed=1)
    torch.testing.assert_close(mode_weights("composite", lc).expand(3, 2, 1, 8, 8), torch.full((3, 2, 1, 8, 8), 1 / 3))
    assert [switch_index(s, 3, 5) for s in (0, 4, 5, 14, 15)] == [0, 0, 1, 2, 0]
    sw = mode_weights("switch", lc, step=7, switch_interval=5)
    assert sw.flatten().tolist() == [0.0, 1.0, 0.0]
    torch.testing.assert_close(mode_weights("loratorio", lc, ref, patch_size=4), patch_weights(lc, ref, 4, 0.05))
    with pytest.raises(ValueError, match="mode must be"):
        mode_weights("merge", lc)
    with pytest.raises(ValueError, match="reference"):
        mode_weights("loratorio", lc)


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="patch_size"):
        patch_weights(randn(2, 1, 4, 8, 8), randn(1, 4, 8, 8), 0, 0.1)
    with pytest.raises(ValueError, match="temperature"):
        patch_weights(randn(2, 1, 4, 8, 8), randn(1, 4, 8, 8), 4, 0.0)
    with pytest.raises(ValueError, match="expected eps_loras"):
        patch_weights(randn(2, 4, 8, 8), randn(1, 4, 8, 8), 4, 0.1)


def test_relative_lets_a_local_skill_win_where_a_global_one_diverges_more():
    """Similarity (N=2, one image, 2×2 patches): LoRA 0 diverges strongly everywhere (a style); LoRA 1 barely, except
    in one patch (a hat). Absolute SoftMin gives LoRA 1 no patch; relative gives it its own patch, and only that one.
    Weights still sum to 1, and with one patch relative is uniform (nothing stands out)."""
    from loratorio.core.fusion import softmin_weights

    sim = torch.tensor([[[[0.20, 0.20], [0.20, 0.25]]], [[[0.90, 0.90], [0.90, 0.50]]]])[:, :, None]  # (2, 1, 1, 2, 2)
    absolute = softmin_weights(sim, 0.05)
    relative = softmin_weights(sim, 0.05, relative=True)
    assert (absolute[1] < 0.01).all()
    assert relative[1, 0, 0, 1, 1] > 0.99 and (relative[1, 0, 0].flatten()[:3] < 0.5).all()
    torch.testing.assert_close(relative.sum(0), torch.ones_like(relative[0]))
    one = softmin_weights(sim[..., :1, :1], 0.05, relative=True)
    torch.testing.assert_close(one, torch.full_like(one, 0.5))
