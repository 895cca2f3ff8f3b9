"""Row-routed multi-adapter evaluation: peft's "mixed equals separate", slicing, merge equivalence, removal."""

import copy

import pytest
import torch
import torch.nn.functional as F

from loratorio.core import Callback, Dense, LowRank, MultiAdapter, RowRouting, evaluate, merged_weight
from tests.toy import make_lora, merged_copy


def run(unet, router, inputs, labels):
    with router.routed(labels):
        return unet(*inputs)


def test_lora_changes_output(unet, two_loras, inputs):
    with MultiAdapter(unet, two_loras) as router:
        base = run(unet, router, inputs, [None] * 6)
        for i in (0, 1):
            assert (run(unet, router, inputs, [i] * 6) - base).abs().mean() > 1e-2


def test_each_adapter_kind_is_live(unet, two_loras, inputs):
    """Every fixture layer's delta matters: dropping any one of them changes the LoRA's output."""
    with MultiAdapter(unet, [two_loras[0]]) as router:
        full = run(unet, router, inputs, [0] * 6)
    for name in two_loras[0]:
        partial = {k: v for k, v in two_loras[0].items() if k != name}
        with MultiAdapter(unet, [partial]) as router:
            assert not torch.allclose(run(unet, router, inputs, [0] * 6), full, atol=1e-6), name


@pytest.mark.parametrize("labels", [[None, 0, 1, None, 0, 1], [1, 1, 0, 0, None, None], [0, None, None, 1, 0, 1]])
def test_mixed_batch_equals_separate_runs(unet, two_loras, inputs, labels):
    with MultiAdapter(unet, two_loras) as router:
        separate = {a: run(unet, router, inputs, [a] * 6) for a in (None, 0, 1)}
        mixed = run(unet, router, inputs, labels)
    for row, label in enumerate(labels):
        torch.testing.assert_close(mixed[row], separate[label][row], rtol=1e-5, atol=1e-5)


def test_routed_equals_merged_weights(unet, two_loras, inputs):
    with MultiAdapter(unet, two_loras) as router:
        for i, lora in enumerate(two_loras):
            routed = run(unet, router, inputs, [i] * 6)
            torch.testing.assert_close(routed, merged_copy(unet, lora)(*inputs), rtol=1e-4, atol=1e-5)


def test_dense_and_callback_kinds_equal_low_rank(unet, two_loras, inputs):
    lora = two_loras[0]
    dense = {n: Dense(merged_weight(unet.get_submodule(n), a)) for n, a in lora.items()}
    callback = {n: Callback(lambda x, y, a=a, n=n: a.apply(unet.get_submodule(n), x, y.clone()))
                for n, a in lora.items()}
    with MultiAdapter(unet, [lora, dense, callback]) as router:
        outs = [run(unet, router, inputs, [i] * 6) for i in range(3)]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[2], outs[0], rtol=1e-5, atol=1e-6)


def test_multiplier_zero_is_base_and_scales(unet, inputs):
    off = make_lora(unet, seed=1, multiplier=0.0)
    with MultiAdapter(unet, [off]) as router:
        torch.testing.assert_close(run(unet, router, inputs, [0] * 6), unet(*inputs))


def test_host_split_sub_batches_equal_one_call(unet, two_loras, inputs):
    """A host that cuts the batch into in-order chunks (A1111 without batch_cond_uncond) still routes each row."""
    labels = [None, 0, 1, None, 0, 1]
    with MultiAdapter(unet, two_loras) as router:
        whole = run(unet, router, inputs, labels)
        with router.routed(labels):
            parts = [unet(*(t[i:i + 2] for t in inputs)) for i in (0, 2, 4)]
            again = unet(*inputs)  # the cursor wraps: a second full call after the chunks is routed from row 0
    torch.testing.assert_close(torch.cat(parts), whole)
    torch.testing.assert_close(again, whole)


def test_routing_slice_equals_routing_of_slice():
    routing = RowRouting((None, 0, 1, 1, 0, None))
    assert routing.slice(1, 4) == RowRouting((0, 1, 1))
    assert dict(routing.groups) == {0: (1, 4), 1: slice(2, 4)}


def test_permuting_rows_permutes_outputs(unet, two_loras, inputs):
    labels = [None, 0, 1, None, 0, 1]
    perm = torch.tensor([5, 3, 1, 0, 2, 4])
    with MultiAdapter(unet, two_loras) as router:
        out = run(unet, router, inputs, labels)
        permuted = run(unet, router, [t[perm] for t in inputs], [labels[i] for i in perm])
    torch.testing.assert_close(permuted, out[perm], rtol=1e-5, atol=1e-6)


def test_sequential_equals_batched_evaluation(unet, two_loras, inputs):
    fn = lambda args: unet(*args)  # noqa: E731
    with MultiAdapter(unet, two_loras) as router:
        batched = evaluate(fn, inputs, router, batched=True)
        sequential = evaluate(fn, inputs, router, batched=False)
        chunked = evaluate(fn, inputs, router, batched=True, max_rows=12)
        separate = torch.stack([run(unet, router, inputs, [a] * 6) for a in (None, 0, 1)])
    assert batched.shape == (3, 6, 4, 8, 8)
    for other in (sequential, chunked, separate):
        torch.testing.assert_close(batched, other, rtol=1e-5, atol=1e-5)


def snapshot(module):
    """Everything install() may touch: hook dicts, instance attributes (a replaced forward) and parameters."""
    return [(name, dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._forward_hooks_with_kwargs),
             sorted(m.__dict__), {k: v.clone() for k, v in m.state_dict().items()})
            for name, m in module.named_modules()]


def assert_same(before, after):
    assert len(before) == len(after)
    for b, a in zip(before, after, strict=True):
        assert b[:5] == a[:5]
        for k in b[5]:
            assert torch.equal(b[5][k], a[5][k])


def test_remove_restores_module_exactly(unet, two_loras, inputs):
    before, out_before = snapshot(unet), unet(*inputs)
    router = MultiAdapter(unet, two_loras).install()
    assert snapshot(unet) != before  # the hooks were really there
    run(unet, router, inputs, [0] * 6)
    router.remove()
    assert_same(before, snapshot(unet))
    assert "forward" not in unet.to_q.__dict__
    assert torch.equal(unet(*inputs), out_before)


def test_remove_after_forward_raised(unet, two_loras, inputs):
    before = snapshot(unet)
    with pytest.raises(ValueError, match="rows"):
        with MultiAdapter(unet, two_loras) as router:
            with router.routed([0] * 5):  # wrong row count: the layer refuses it
                unet(*inputs)
    assert_same(before, snapshot(unet))
    assert router.slot.full is None


def test_no_routing_is_base_output(unet, two_loras, inputs):
    base = unet(*inputs)
    with MultiAdapter(unet, two_loras):
        assert torch.equal(unet(*inputs), base)


def test_validation(unet, two_loras):
    with pytest.raises(ValueError, match="no module named"):
        MultiAdapter(unet, [{"nope": two_loras[0]["to_q"]}])
    with pytest.raises(ValueError, match="LowRank deltas go on Linear and Conv2d layers"):
        MultiAdapter(unet, [{"": two_loras[0]["to_q"]}])
    router = MultiAdapter(unet, two_loras)
    with pytest.raises(ValueError, match="adapters \\[2\\]"):
        with router.routed([2]):
            pass
    with router:
        with pytest.raises(RuntimeError, match="already installed"):
            router.install()


def test_layer_without_that_adapter_is_base(unet, inputs):
    """A LoRA need not target every layer: rows routed to it see base weights elsewhere."""
    only_q = {"to_q": LowRank(torch.randn(2, 8), torch.randn(8, 2))}
    with MultiAdapter(unet, [only_q]) as router:
        out = run(unet, router, inputs, [0] * 6)
    ref = copy.deepcopy(unet)
    with torch.no_grad():
        ref.to_q.weight += merged_weight(ref.to_q, only_q["to_q"])
    torch.testing.assert_close(out, ref(*inputs), rtol=1e-4, atol=1e-5)


def test_block_layout_of_routings():
    """evaluate()'s layout (one run of equal length per adapter, back to back) is recognised; anything else is not."""
    assert RowRouting((None, None, 0, 0, 1, 1)).block == (2, 2, (0, 1))
    assert RowRouting((1, 1, 0, 0, None, None)).block == (0, 2, (1, 0))
    assert RowRouting((None, 0, 1, None, 0, 1)).block is None  # an adapter's rows are not contiguous
    assert RowRouting((0, 0, 1, None, None)).block is None  # runs of unequal length
    assert RowRouting((0, None, 1)).block is None  # a gap between the runs
    assert RowRouting((None, None)).block is None


LINEAR_TARGETS = ("to_q", "to_k", "to_v", "to_out", "ff1", "ff2", "time")


def test_stacked_path_is_taken_and_equals_the_per_adapter_loop(unet, two_loras, inputs, monkeypatch):
    labels = [None, None, 0, 0, 1, 1]
    with MultiAdapter(unet, two_loras) as router:
        stacked = run(unet, router, inputs, labels)
        built = {key[0] for key, stack in router._stacks.items() if stack is not None}
        assert built == {unet.get_submodule(name) for name in LINEAR_TARGETS}  # convs take the loop
        monkeypatch.setattr(RowRouting, "block", property(lambda self: None))
        looped = run(unet, router, inputs, labels)
    torch.testing.assert_close(stacked, looped, rtol=1e-5, atol=1e-5)
    assert (stacked[2:] - unet(*inputs)[2:]).abs().mean() > 1e-2  # the LoRA rows are not the base's


def test_unequal_ranks_and_a_missing_layer_in_one_block(unet, inputs):
    """Zero-padded ranks add nothing; a layer one LoRA lacks falls back to the loop, base weights for that LoRA."""
    small, big = make_lora(unet, seed=1, rank=2), make_lora(unet, seed=2, rank=3)
    del big["to_q"]
    labels = [None, None, 0, 0, 1, 1]
    with MultiAdapter(unet, [small, big]) as router:
        mixed = run(unet, router, inputs, labels)
        assert router._stacks[(unet.to_k, (0, 1))] is not None and router._stacks[(unet.to_q, (0, 1))] is None
    torch.testing.assert_close(mixed[2:4], merged_copy(unet, small)(*inputs)[2:4], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mixed[4:], merged_copy(unet, big)(*inputs)[4:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mixed[:2], unet(*inputs)[:2])


def test_reinstall_reads_changed_multipliers(unet, inputs):
    """Stacks fold each LoRA's scale in; remove() drops them, so a changed multiplier counts after install()."""
    lora = make_lora(unet, seed=1)
    router = MultiAdapter(unet, [lora])
    with router:
        on = run(unet, router, inputs, [0] * 6)
    for adapter in lora.values():
        adapter.multiplier = 0.0
    with router:
        off = run(unet, router, inputs, [0] * 6)
    torch.testing.assert_close(off, unet(*inputs))
    assert (on - off).abs().mean() > 1e-2


@pytest.mark.parametrize("kind", ["linear", "conv", "conv_mid"])
def test_low_rank_apply_on_non_contiguous_rows(kind):
    """The fused in-place accumulate and its fallback for a non-contiguous output give the same delta."""
    g = torch.Generator().manual_seed(0)
    if kind == "linear":
        layer, x = torch.nn.Linear(8, 6), torch.randn(3, 5, 8, generator=g)
        lora = LowRank(torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g), alpha=1.0)
        expect = layer(x) + F.linear(F.linear(x, lora.down), lora.up) * 0.5
        y_odd, x_odd = layer(x).transpose(0, 1), x.transpose(0, 1)
    else:
        layer, x = torch.nn.Conv2d(4, 6, 3, padding=1), torch.randn(3, 4, 5, 5, generator=g)
        mid = torch.randn(2, 2, 3, 3, generator=g) if kind == "conv_mid" else None
        down = torch.randn(2, 4, 1, 1, generator=g) if mid is not None else torch.randn(2, 4, 3, 3, generator=g)
        lora = LowRank(down, torch.randn(6, 2, 1, 1, generator=g), alpha=1.0, mid=mid)
        h = F.conv2d(F.conv2d(x, down), mid, padding=1) if mid is not None else F.conv2d(x, down, padding=1)
        expect = layer(x) + F.conv2d(h, lora.up) * 0.5
        y_odd, x_odd = layer(x).to(memory_format=torch.channels_last), x
    with torch.no_grad():
        torch.testing.assert_close(lora.apply(layer, x, layer(x)), expect, rtol=1e-5, atol=1e-5)
        assert not y_odd.is_contiguous()
        got = lora.apply(layer, x_odd, y_odd)
    torch.testing.assert_close(got if kind != "linear" else got.transpose(0, 1), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("labels", [[None, 0, None, 0, None, 0], [0, 0, 0, None, None, None]],
                         ids=["interleaved", "block"])
def test_shared_adapter_applies_to_every_row_on_top_of_its_own(unet, two_loras, inputs, labels):
    with MultiAdapter(unet, two_loras) as router:
        router.shared = (1,)
        got = run(unet, router, inputs, labels)
        with pytest.raises(ValueError, match="already apply to every row"):
            run(unet, router, inputs, [1] * 6)
    with_b = merged_copy(unet, two_loras[1])
    both = merged_copy(with_b, two_loras[0])
    for row, label in enumerate(labels):
        want = (both if label == 0 else with_b)(*(t[row:row + 1] for t in inputs))[0]
        torch.testing.assert_close(got[row], want, rtol=1e-4, atol=1e-5)
