"""kohya / peft / LyCORIS state dicts to adapters, and back."""

import pytest
import torch

from loratorio.core import (
    LoHa,
    LoKr,
    LowRank,
    MultiAdapter,
    adapters_for_model,
    merged_weight,
    to_adapter,
    to_state_dict,
)
from loratorio.core.lora_file import group_keys


def test_kohya_round_trip_gives_same_outputs(unet, two_loras, inputs):
    sd = to_state_dict(two_loras[0])
    assert "lora_unet_to_q.lora_down.weight" in sd and "lora_unet_conv_in.lora_mid.weight" in sd
    parsed = adapters_for_model(unet, sd)
    assert set(parsed) == set(two_loras[0])
    outs = []
    with MultiAdapter(unet, [two_loras[0], parsed]) as router:
        for i in (0, 1):
            with router.routed([i] * 6):
                outs.append(unet(*inputs))
    torch.testing.assert_close(outs[0], outs[1])


def test_peft_keys_and_missing_alpha():
    a = to_adapter(group_keys({"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.ones(4, 2)})["m"])
    assert isinstance(a, LowRank) and a.scale == 1.0


def test_loha_from_its_factors():
    g = torch.Generator().manual_seed(0)
    w1a, w1b, w2a, w2b = (torch.randn(*s, generator=g) for s in ((4, 2), (2, 3), (4, 2), (2, 3)))
    a = to_adapter({"w1a": w1a, "w1b": w1b, "w2a": w2a, "w2b": w2b, "alpha": torch.tensor(1.0)})
    assert isinstance(a, LoHa)
    torch.testing.assert_close(merged_weight(torch.nn.Linear(3, 4), a), (w1a @ w1b) * (w2a @ w2b) * 0.5)


def test_lokr_from_its_factors():
    w1, w2 = torch.randn(2, 2), torch.randn(3, 4)
    a = to_adapter({"k1": w1, "k2": w2})
    assert isinstance(a, LoKr)
    torch.testing.assert_close(merged_weight(torch.nn.Linear(8, 6), a), torch.kron(w1, w2))


def test_dora_needs_the_base_weight_and_scales_rows():
    layer = torch.nn.Linear(3, 4)
    parts = {"down": torch.randn(2, 3), "up": torch.randn(4, 2), "dora": torch.rand(4, 1) + 0.5}
    with pytest.raises(ValueError, match="base weight"):
        to_adapter(parts)
    a = to_adapter(parts, 0.5, layer.weight.detach())
    w = layer.weight.detach()
    expect = (w + parts["up"] @ parts["down"]) * parts["dora"] / (w.norm(dim=1, keepdim=True) + 1.1920929e-07)
    torch.testing.assert_close(merged_weight(layer, a), (expect - w) * 0.5)


def test_full_diff():
    layer = torch.nn.Linear(3, 2)
    a = to_adapter({"diff": torch.ones(2, 3), "diff_b": torch.ones(2)}, multiplier=0.5)
    torch.testing.assert_close(merged_weight(layer, a), torch.full((2, 3), 0.5))


def test_bad_keys_are_errors(unet):
    with pytest.raises(ValueError, match="unrecognised LoRA key"):
        group_keys({"x.weird": torch.ones(1)})
    with pytest.raises(ValueError, match="matches no module"):
        adapters_for_model(unet, {"lora_unet_nope.lora_down.weight": torch.ones(1, 1),
                                  "lora_unet_nope.lora_up.weight": torch.ones(1, 1)})
    with pytest.raises(ValueError, match="incomplete"):
        to_adapter({"down": torch.ones(1, 1)})
