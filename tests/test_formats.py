"""Every LyCORIS format, applied from its factors: exact against independent maths, against each host's own formula
(the fakes transcribe A1111's network_*.py and Forge's merge_lora_to_weight), routed against separate, and with no
full-size copy per LoRA; and the fallback when an adapter fails mid-sampling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loratorio.core import (
    Bias,
    Chain,
    Dense,
    LoHa,
    LoKr,
    LowRank,
    Materialized,
    MultiAdapter,
    NormDelta,
    Rescaled,
    Settings,
    merged_weight,
    probe,
)
from loratorio.hosts import a1111, checks, forge
from loratorio.hosts.checks import FAULT_ENV
from tests import fake_forge as ff
from tests import formats
from tests import test_a1111 as ta
from tests import test_forge as tf
from tests.toy import CTX, make_lora, make_unet

HOLD_A = Settings(enabled=True, mode="switch", switch_interval=1000)
ON = Settings(enabled=True, patch_size=4, temperature=0.05)


def _x_for(layer: nn.Module, g: torch.Generator) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return torch.randn(3, layer.in_channels, 6, 6, generator=g)
    if isinstance(layer, nn.GroupNorm):
        return torch.randn(3, layer.num_channels, 4, 4, generator=g)
    if isinstance(layer, nn.LayerNorm):
        return torch.randn(3, 5, *layer.normalized_shape, generator=g)
    return torch.randn(3, 5, layer.in_features, generator=g)


def _forward(layer: nn.Module, x: torch.Tensor, dw=None, db=None) -> torch.Tensor:
    """The layer with its weight and bias replaced by W + dw, b + db (independent of the kinds' code)."""
    w = layer.weight + (0 if dw is None else dw)
    b = None if layer.bias is None else layer.bias + (0 if db is None else db)
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, w, b, layer.stride, layer.padding)
    if isinstance(layer, nn.GroupNorm):
        return F.group_norm(x, layer.num_groups, w, b, layer.eps)
    if isinstance(layer, nn.LayerNorm):
        return F.layer_norm(x, layer.normalized_shape, w, b, layer.eps)
    return F.linear(x, w, b)


def _core_cases(unet: nn.Module):
    """(layer name, kind, its ΔW and Δb by direct formulas: explicit products, torch.kron, W' of DoRA/IA3)."""
    g = torch.Generator().manual_seed(5)

    def r(*s):
        return torch.randn(*s, generator=g) * 0.3

    cases = []
    for name in ("ff1", "time", "res", "proj", "conv_in"):
        w = unet.get_submodule(name).weight.detach()
        o, i, k = w.shape[0], w.shape[1], tuple(w.shape[2:])
        kk = int(torch.tensor(k).prod()) if k else 1
        w1a, w1b, w2a, w2b = r(o, 2), r(2, i * kk), r(o, 3), r(3, i * kk)
        cases.append((name, LoHa(w1a, w1b, w2a, w2b, 0.5, multiplier=0.7),
                      ((w1a @ w1b) * (w2a @ w2b)).reshape(w.shape) * 0.35, None))
        (a, b), (c, d) = formats._split(o), formats._split(i)
        w1, w2 = r(a, c), r(b, d, *k)
        cases.append((name, LoKr(w1, w2, scale=0.5, multiplier=0.7),
                      torch.kron(w1[(...,) + (None,) * len(k)], w2).reshape(w.shape) * 0.35, None))
        w2_a, w2_b = r(b, 2), r(2, d * kk)
        kron = torch.kron(w1, w2_a @ w2_b).reshape(w.shape)
        cases.append((name, LoKr(w1=w1, w2_a=w2_a, w2_b=w2_b, scale=2.0), kron * 2.0, None))
        lora = LowRank(r(2, i, *k), r(o, 2, *(1,) * len(k)), multiplier=0.5)
        lora_dw = (lora.up.flatten(1) @ lora.down.flatten(1)).reshape(w.shape) * 0.5
        row, col = 1 + r(o), 1 + r(i)
        view_r, view_c = (-1,) + (1,) * (w.dim() - 1), (1, -1) + (1,) * (w.dim() - 2)
        w_new = (w + lora_dw) * row.view(view_r) * col.view(view_c)
        cases.append((name, Rescaled(lora, row, col, 0.8), (w_new - w) * 0.8, None))
        cases.append((name, Rescaled(None, row, None, 1.5), (w * row.view(view_r) - w) * 1.5, None))
        diff, db = r(*w.shape), r(o)
        cases.append((name, Dense(diff, db, 0.6, weight_scale=0.5), diff * 0.3, db * 0.6))
        cases.append((name, Chain((Rescaled(None, None, col, 1.0), Bias(db, 0.5))),
                      w * col.view(view_c) - w, db * 0.5))
        cases.append((name, Materialized(lambda diff=diff: (diff, None), 0.5), diff * 0.5, None))
    for name in formats.NORMS:
        n = unet.get_submodule(name).weight.shape[0]
        dw, db = r(n), r(n)
        cases.append((name, NormDelta(dw, db, 0.7, weight_scale=0.5), dw * 0.35, db * 0.7))
    return cases


def test_each_kind_adds_exactly_its_delta():
    """apply(layer, x, y.clone()) = layer(x) with W + ΔW: the Kronecker identity, the Khatri-Rao product, DoRA/IA3
    channel scales, norm and bias deltas; y itself is untouched by that call, so y' − y is the delta of any kind."""
    unet = make_unet()
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, kind, dw, db in _core_cases(unet):
            layer = unet.get_submodule(name)
            x = _x_for(layer, g)
            y = _forward(layer, x)
            before = y.clone()
            got = kind.apply(layer, x, y.clone())
            torch.testing.assert_close(got, _forward(layer, x, dw, db), rtol=1e-4, atol=1e-5,
                                       msg=lambda m, n=name, k=kind: f"{type(k).__name__} on {n}: {m}")
            assert torch.equal(y, before)
            assert (got - y).abs().max() > 1e-4  # the delta is not nothing
            if not isinstance(kind, (NormDelta, Chain)) and db is None:
                torch.testing.assert_close(merged_weight(layer, kind), dw, rtol=1e-4, atol=1e-6)


def test_probe_catches_a_misshapen_adapter_and_passes_good_ones():
    unet = make_unet()
    for name, kind, _, _ in _core_cases(unet):
        probe(unet.get_submodule(name), kind)
    wrong = LoKr(torch.randn(2, 2), torch.randn(4, 5))  # built for another layer's shape
    with pytest.raises(RuntimeError):
        probe(unet.ff1, wrong)
    with pytest.raises(ValueError, match="non-finite"):
        probe(unet.ff1, Dense(torch.full_like(unet.ff1.weight, float("nan"))))


def test_a_mixed_routed_batch_of_every_kind_equals_separate_runs():
    """peft's mixed-batch invariant for the new kinds: rows routed to a kind get exactly that kind's output."""
    unet = make_unet()
    tables: list[dict] = []
    for name, kind, _, _ in _core_cases(unet):
        free = [t for t in tables if name not in t]
        if free:
            free[0][name] = kind
        else:
            tables.append({name: kind})
    n = len(tables) + 1
    g = torch.Generator().manual_seed(2)
    x, sigma, ctx = torch.randn(n, 4, 8, 8, generator=g), torch.rand(n) + 0.5, torch.randn(n, 3, CTX, generator=g)
    labels = [None, *range(len(tables))]
    with torch.no_grad(), MultiAdapter(unet, tables) as router:
        with router.routed(labels):
            mixed = unet(x, sigma, ctx)
        for row, label in enumerate(labels):
            with router.routed([label] * n):
                alone = unet(x, sigma, ctx)
            torch.testing.assert_close(mixed[row], alone[row], rtol=1e-4, atol=1e-5)


# --- each host's own formula ------------------------------------------------------------------------------------

KIND_OF = {"lora": LowRank, "locon_tucker": LowRank, "loha": LoHa, "loha_tucker": LoHa, "lokr": LoKr,
           "lokr_w2ab": LoKr, "lokr_w1ab": LoKr, "lokr_tucker": LoKr, "dora": Rescaled, "dora_in": Rescaled,
           "loha_dora": Rescaled, "ia3": Rescaled, "ia3_in": Rescaled, "full": (Dense, NormDelta, Chain)}


def a1111_host(fmt: str) -> ta.Host:
    """A fake A1111 with network a in format `fmt` (the host's module types and formulas) and a kohya network b."""
    return ta.Host(specs=lambda unet: [formats.a1111_network_specs(formats.file_weights(fmt, unet, 1)),
                                       make_lora(unet, seed=2)])


def forge_host(fmt: str, reforge: bool) -> tf.Host:
    unet = ff.make_diffusion_model(forge_linear=False)
    weights = formats.file_weights(fmt, unet, 1)
    file = ff.FilePatches(formats.forge_patches(weights), formats.forge_patches(weights, reforge=True))
    return tf.Host(reforge, files=[file, make_lora(unet, seed=2)])


def _unwrap(adapter):
    """Forge binds each kind to its layer in a Callback(partial(kind.apply, layer))."""
    fn = getattr(adapter, "fn", None)
    return fn.func.__self__ if fn is not None and hasattr(fn, "func") else adapter


@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_a1111_routed_format_equals_the_hosts_merge(fmt):
    """Switch mode holding network a on every step is base + a's routed delta: it must equal the host's own
    calc_updown merge of a alone, for every format; and the kind holds the file's factors, not a full ΔW."""
    host = a1111_host(fmt)
    x, c, u = ta.latent(), ta.conds(), ta.conds(seed=8)
    got, state = ta.run(host, HOLD_A, x=x, cond=ta.simple(c), uncond=u)
    assert not host.warnings and state.failed is None
    kinds = {type(a) for per in state.router.targets.values() for i, a in per.items() if i == 0}
    expected = KIND_OF[fmt] if isinstance(KIND_OF[fmt], tuple) else (KIND_OF[fmt],)
    assert kinds and all(issubclass(k, expected) for k in kinds), kinds
    host.networks_module.loaded_networks[:] = host.networks[:1]
    plain = ta.sample(host.denoiser(), x, ta.simple(c), u)
    torch.testing.assert_close(got, plain, rtol=1e-4, atol=1e-4)
    host.networks_module.loaded_networks[:] = []
    assert (plain - ta.sample(host.denoiser(), x, ta.simple(c), u)).abs().mean() > 1e-3  # the format does something


@pytest.mark.parametrize("reforge", [False, True], ids=["forge", "reforge"])
@pytest.mark.parametrize("fmt", formats.FORGE_FORMATS)
def test_forge_routed_format_equals_the_hosts_merge(fmt, reforge):
    """The same on Forge's merge_lora_to_weight (reForge's weight adapters): LoRA a held by Switch = the host's
    merge of a alone; and a mixed routed batch equals separate runs with the kinds the glue built."""
    host = forge_host(fmt, reforge)
    x, c, u = tf.latent(), tf.prompt(), tf.prompt(seed=8)
    got, state = tf.run(host, HOLD_A, x=x, cond=[c], uncond=u)
    assert not host.warnings and state.failed is None
    kinds = {type(_unwrap(a)) for per in state.router.targets.values() for i, a in per.items() if i == 0}
    expected = KIND_OF[fmt] if isinstance(KIND_OF[fmt], tuple) else (KIND_OF[fmt],)
    assert kinds and all(issubclass(k, expected) for k in kinds), kinds
    alone = tf.Host(reforge, files=host.loras[:1])
    alone.reset()
    plain = tf.sample(alone, x, [c], u)
    torch.testing.assert_close(got, plain, rtol=1e-4, atol=1e-4)
    assert (plain - tf.sample(tf.Host(reforge, files=[{}]), x, [c], u)).abs().mean() > 1e-3

    host.reset()
    state = host.install(ON)
    unet = host.sd_model.forge_objects.unet
    unet.refresh_loras()  # our clone loads with base weights
    model = unet.model.diffusion_model
    g = torch.Generator().manual_seed(4)
    xs, ts, ctx = torch.randn(3, 4, 8, 8, generator=g), torch.rand(3) + 0.5, torch.randn(3, 3, CTX, generator=g)
    with torch.no_grad():
        with state.router.routed([None, 0, 1]):
            mixed = model(xs, ts, ctx)
        for row, label in enumerate([None, 0, 1]):
            with state.router.routed([label] * 3):
                torch.testing.assert_close(mixed[row], model(xs, ts, ctx)[row], rtol=1e-4, atol=1e-5)
    forge.remove(state)


def test_forge_equal_shaped_dense_layers_keep_their_own_deltas():
    """The reported Forge failure: TensorHolder matched tensors by id(), and the id of a freed temporary (one layer's
    ΔW) was reused by the next one, so a layer got another layer's tensor: a shape error on time_embed, or silently
    a wrong delta where shapes agree. Each kept tensor must stay the tensor it was given."""
    holder = forge.TensorHolder()
    first = torch.randn(8, 4) - torch.zeros(8, 4)  # a temporary ΔW, as merge(...) - w was in module_adapter
    freed_id = id(first)
    holder.keep(first)
    del first
    for _ in range(10000):  # another temporary that lands on the freed tensor's id (if the holder let it go)
        other = torch.randn(16, 8)
        if id(other) == freed_id:
            break
    got = holder.keep(other)
    assert got.shape == other.shape and torch.equal(got, other)


# --- the fallback: an adapter that raises mid-sampling ----------------------------------------------------------


@pytest.mark.parametrize("separate", [False, True], ids=["one call per step", "cond and uncond calls"])
def test_a1111_adapter_failing_mid_sampling_falls_back_to_the_host(monkeypatch, separate):
    """LORATORIO_TEST_FAULT makes LoRA a's adapters raise in the second model call. One call per step: step 0 is
    composed, the rest is the host's own sampling. Two calls per step: the failure is in step 0's second call, the
    first call's rows are re-run plainly, and the whole image is the host's."""
    x, c, u = ta.latent(), ta.conds(), ta.conds(seed=8)
    host = ta.Host()
    host.opts.batch_cond_uncond = not separate
    window = Settings(**{**ON.to_dict(), "end": 0.25})
    expect = ta.sample(host.denoiser(), x, ta.simple(c), u) if separate else \
        ta.run(host, window, x=x, cond=ta.simple(c), uncond=u)[0]
    monkeypatch.setenv(FAULT_ENV, "a")
    got, state = ta.run(host, ON, x=x, cond=ta.simple(c), uncond=u)
    assert state.failed and FAULT_ENV in state.failed
    assert "LoRAtorio stopped" in host.warnings[-1] and "sampled normally" in host.warnings[-1]
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    assert all(not m._forward_hooks or m.network_layer_name for m in host.unet.modules())  # only the host's hooks
    assert sum(len(m._forward_hooks) for m in host.unet.modules()) == sum(
        isinstance(m, (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)) for m in host.unet.modules())


def test_a1111_fusion_failure_replays_the_step_with_the_host(monkeypatch):
    host = ta.Host()
    x, c, u = ta.latent(), ta.conds(), ta.conds(seed=8)
    plain = ta.sample(host.denoiser(), x, ta.simple(c), u)

    def broken(*args, **kwargs):
        raise RuntimeError("fusion broke")

    monkeypatch.setattr(a1111.Composer, "fuse", broken)
    got, state = ta.run(host, ON, x=x, cond=ta.simple(c), uncond=u)
    assert "fusion broke" in state.failed
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reforge", [False, True], ids=["forge", "reforge"])
@pytest.mark.parametrize("separate", [False, True], ids=["one call per step", "uncond then cond calls"])
def test_forge_adapter_failing_mid_sampling_falls_back_to_the_host(monkeypatch, reforge, separate):
    """On Forge/reForge the fallback must not route rows through the adapters that failed: the hooks go, the host
    re-merges its own patches into our clone, and the step's earlier chunks are re-run by the host's plain call."""
    x, c, u = tf.latent(), tf.prompt(), tf.prompt(seed=8)
    host = tf.Host(reforge)
    chunks = 1 if separate else None
    host.reset()
    plain = tf.sample(host, x, [c], u, max_chunks=chunks)
    window = Settings(**{**ON.to_dict(), "end": 0.25})
    expect = plain if separate else tf.run(host, window, x=x, cond=[c], uncond=u, max_chunks=chunks)[0]
    monkeypatch.setenv(FAULT_ENV, "lora_a")
    got, state = tf.run(host, ON, x=x, cond=[c], uncond=u, max_chunks=chunks)
    assert state.failed and FAULT_ENV in state.failed and "sampled normally" in host.warnings[-1]
    assert not state.router.installed
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    if reforge:  # the model is marked as merged with the host's own patches
        assert host.after.model.current_weight_patches_uuid == host.after.patches_uuid
    else:
        assert host.after.lora_loader.loaded_hash == str(list(host.after.lora_patches.keys()))
    monkeypatch.delenv(FAULT_ENV)
    host.reset()
    torch.testing.assert_close(tf.sample(host, x, [c], u, max_chunks=chunks), plain)  # the model is as it was


@pytest.mark.parametrize("reforge", [False, True], ids=["forge", "reforge"])
def test_forge_adapter_failing_outside_the_window_falls_back_to_the_host(monkeypatch, reforge):
    """Steps outside start/end still run every LoRA through our hooks (the merge, routed): a failure there must fall
    back too, not escape to the host (a real Forge answered HTTP 500): step 0 composed, the rest the host's merge."""
    x, c, u = tf.latent(), tf.prompt(), tf.prompt(seed=8)
    host = tf.Host(reforge)
    host.reset()
    window = Settings(**{**ON.to_dict(), "end": 0.25})
    expect = tf.run(host, window, x=x, cond=[c], uncond=u)[0]
    monkeypatch.setenv(FAULT_ENV, "lora_a")
    got, state = tf.run(host, window, x=x, cond=[c], uncond=u)
    assert state.failed and FAULT_ENV in state.failed and "sampled normally" in host.warnings[-1]
    assert not state.router.installed
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)


def test_the_fault_hook_is_inert_unless_set(monkeypatch):
    tables = [{nn.Linear(2, 2): LowRank(torch.ones(1, 2), torch.ones(2, 1))}]
    monkeypatch.delenv(FAULT_ENV, raising=False)
    assert checks.inject_fault(tables, ["a"]) is tables
    monkeypatch.setenv(FAULT_ENV, "other")
    assert checks.inject_fault(tables, ["a"]) is tables


def test_probe_passes_layers_stored_in_fp8():
    """A1111's "FP8 weight" (and Forge's fp8 UNet) store Linear/Conv weights as float8: the dry run computes in fp32
    as the hosts do, instead of failing every LoRA (seen on the real A1111 with SDXL)."""
    g = torch.Generator().manual_seed(0)
    cases = [(nn.Linear(8, 6), (2, 8), (6, 2)), (nn.Conv2d(4, 6, 3, padding=1), (2, 4, 3, 3), (6, 2, 1, 1))]
    for layer, down, up in cases:
        layer.to(torch.float8_e4m3fn)
        col = torch.rand(layer.weight.shape[1], generator=g) + 0.5
        for adapter in (LowRank(torch.randn(*down, generator=g), torch.randn(*up, generator=g)),
                        Rescaled(None, None, col)):
            probe(layer, adapter)


@pytest.mark.parametrize("layer", [nn.Linear(8, 6), nn.Conv2d(8, 6, 1)])
def test_low_rank_adds_into_a_narrower_output_as_under_autocast(layer):
    """Under CPU autocast (A1111's FP8 weight) a layer's output is bf16 while its input may be fp32 (the first
    layers): the in-place accumulation must cast, on the per-adapter path and the routed grouped one."""
    g = torch.Generator().manual_seed(0)
    conv = isinstance(layer, nn.Conv2d)
    adapter = LowRank(torch.randn(2, 8, *([1, 1] if conv else []), generator=g),
                      torch.randn(6, 2, *([1, 1] if conv else []), generator=g))
    x = torch.randn(3, 8, 4, 4, generator=g) if conv else torch.randn(3, 5, 8, generator=g)
    with torch.no_grad():
        y = layer(x)
        want = adapter.apply(layer, x, y.clone())
        got = adapter.apply(layer, x, y.to(torch.bfloat16))
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)
        if not conv:
            with MultiAdapter(layer, [{"": adapter}]) as router, torch.autocast("cpu", dtype=torch.bfloat16):
                with router.routed((0, 0, 0)):
                    routed = layer(x)
            torch.testing.assert_close(routed.float(), want, rtol=0.05, atol=0.05)
