"""Opt-in (requirements-formats.txt): files written by the LyCORIS trainer library itself, on a tiny SD-shaped UNet,
read by each host's loader (the fakes' transcriptions) and applied by LoRAtorio's kinds: every layer of every format
must add exactly the host's ΔW. Pins the shapes the trainer writes (Tucker cores, factored LoKr halves, DoRA axes),
which the hand-written factors of test_formats.py only assume. Skips cleanly without lycoris-lora/diffusers."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("lycoris")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from loratorio.hosts import a1111, forge  # noqa: E402
from tests import fake_a1111 as fa  # noqa: E402
from tests import fake_forge as ff  # noqa: E402
from tests import lycoris_files as gen  # noqa: E402
from tests.formats import WeightAdapter  # noqa: E402

TINY_UNET = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
                 norm_num_groups=8)
TINY_CLIP = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("lycoris")
    saved = gen.SD15_UNET, gen.CLIP_L
    gen.SD15_UNET, gen.CLIP_L = TINY_UNET, TINY_CLIP
    try:
        gen.main([str(out), "--dtype", "fp32"])
        unet, _ = gen.base_models(None)
    finally:
        gen.SD15_UNET, gen.CLIP_L = saved
    return out, unet


def _layers(path, unet):
    from safetensors.torch import load_file

    by_module = {f"lora_unet_{n.replace('.', '_')}": m for n, m in unet.named_modules() if n}
    grouped = defaultdict(dict)
    for key, value in load_file(str(path)).items():
        name, part = key.split(".", 1)
        grouped[name][part] = value
    unet_parts = {k: v for k, v in grouped.items() if k.startswith("lora_unet_")}
    assert unet_parts and set(unet_parts) <= set(by_module), set(unet_parts) - set(by_module)
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in grouped)
    return [(by_module[k], w) for k, w in unet_parts.items()]


def _a1111_module(layer, w):
    net = SimpleNamespace(unet_multiplier=0.8, te_multiplier=1.0, dyn_dim=None)
    if "lora_down.weight" in w:
        from loratorio.core import LowRank

        alpha = float(w["alpha"]) if "alpha" in w else None
        return fa.NetworkModuleLora(net, layer, LowRank(w["lora_down.weight"], w["lora_up.weight"], alpha,
                                                        w.get("lora_mid.weight")), w.get("dora_scale"))
    for prefix, cls in (("hada_", fa.NetworkModuleHada), ("lokr_", fa.NetworkModuleLokr),
                        ("on_input", fa.NetworkModuleIa3), ("diff", fa.NetworkModuleFull),
                        ("w_norm", fa.NetworkModuleNorm)):
        if any(k.startswith(prefix) for k in w):
            return cls(net, layer, w)
    raise AssertionError(sorted(w))


def _x(layer):
    g = torch.Generator().manual_seed(0)
    if isinstance(layer, nn.Conv2d):
        return torch.randn(2, layer.in_channels, 6, 6, generator=g)
    if isinstance(layer, nn.GroupNorm):
        return torch.randn(2, layer.num_channels, 4, 4, generator=g)
    if isinstance(layer, nn.LayerNorm):
        return torch.randn(2, 3, *layer.normalized_shape, generator=g)
    return torch.randn(2, 3, layer.in_features, generator=g)


@pytest.mark.parametrize("fmt", gen.ALL)
def test_a1111_kinds_equal_the_host_formula_on_trainer_written_files(files, fmt):
    out, unet = files
    with torch.no_grad():
        for layer, w in _layers(out / f"lyco_{fmt}.safetensors", unet):
            nm = _a1111_module(layer, w)
            x = _x(layer)
            y = layer(x)
            expect = nm.forward(x, y)
            kind = a1111.module_adapter(nm, layer)
            assert type(kind).__name__ not in ("Materialized", "Callback"), type(kind)
            torch.testing.assert_close(kind.apply(layer, x, y.clone()), expect, rtol=1e-4, atol=1e-5)


def _forge_entries(w, reforge):
    alpha = float(w["alpha"]) if "alpha" in w else None
    dora = w.get("dora_scale")
    if "lora_down.weight" in w:
        v = ("lora", (w["lora_up.weight"], w["lora_down.weight"], alpha, w.get("lora_mid.weight"), dora))
        return {"weight": WeightAdapter("lora", (*v[1], None)) if reforge else v}
    if "hada_w1_a" in w:
        v = ("loha", (w["hada_w1_a"], w["hada_w1_b"], alpha, w["hada_w2_a"], w["hada_w2_b"], w.get("hada_t1"),
                      w.get("hada_t2"), dora))
    elif any(k.startswith("lokr_") for k in w):
        v = ("lokr", (w.get("lokr_w1"), w.get("lokr_w2"), alpha, w.get("lokr_w1_a"), w.get("lokr_w1_b"),
                      w.get("lokr_w2_a"), w.get("lokr_w2_b"), w.get("lokr_t2"), dora))
    elif "w_norm" in w:
        return {"weight": ("diff", (w["w_norm"],)), "bias": ("diff", (w["b_norm"],))}
    elif "diff" in w:
        return {"weight": ("diff", (w["diff"],)), **({"bias": ("diff", (w["diff_b"],))} if "diff_b" in w else {})}
    else:
        return None  # IA3: neither Forge nor reForge loads it
    return {"weight": WeightAdapter(*v) if reforge else v}


@pytest.mark.parametrize("reforge", [False, True], ids=["forge", "reforge"])
@pytest.mark.parametrize("fmt", [f for f in gen.ALL if f != "ia3"])
def test_forge_kinds_equal_the_host_formula_on_trainer_written_files(files, fmt, reforge):
    out, unet = files
    holder = forge.TensorHolder()
    backend = forge.Backend("reforge" if reforge else "forge", ff.merge)
    with torch.no_grad():
        for layer, w in _layers(out / f"lyco_{fmt}.safetensors", unet):
            entries = _forge_entries(w, reforge)
            parts = {p: [[0.8, v, 1.0, None, None]] for p, v in entries.items()}
            root = nn.Module()
            root.layer = layer
            params = dict(layer.named_parameters())
            kind = forge.module_adapter(root, "layer", parts, backend, lambda k, p=params: p[k.split(".")[-1]], holder)
            inner = kind.fn.func.__self__
            assert type(inner).__name__ != "Materialized", type(inner)
            merged = {p: ff.merge(parts[p], params[p].detach(), p) for p in parts}
            x = _x(layer)
            expect = torch.func.functional_call(layer, {**dict(layer.named_parameters()), **merged}, (x,))
            torch.testing.assert_close(kind.apply(layer, x, layer(x)), expect, rtol=1e-4, atol=1e-5)
