"""Fitting the batched call into memory: chunks chosen from a budget, and retries after out-of-memory errors."""

from __future__ import annotations

import pytest
import torch

from loratorio.core import (
    BatchLayout,
    Chunker,
    Composer,
    MemoryBudget,
    MultiAdapter,
    Settings,
    activation_peak,
    evaluate,
    is_out_of_memory,
)
from loratorio.core.memory import plan_chunks
from tests.toy import CTX, Denoiser


class OomModel:
    """The toy denoiser, but any call of more than `limit` rows raises `error` before computing (as a device would).

    Records the rows of every call that ran and every SDXL-style `vector` row it saw.
    """

    def __init__(self, unet, limit=None, error=None):
        self.den, self.limit = Denoiser(unet), limit
        self.error = error or (lambda rows: torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried {rows} rows"))
        self.calls, self.failed, self.vectors = [], [], []

    def __call__(self, inputs):
        x, sigma, cond = inputs
        if self.limit is not None and x.shape[0] > self.limit:
            self.failed.append(x.shape[0])
            raise self.error(x.shape[0])
        self.calls.append(x.shape[0])
        self.vectors.append(cond["vector"])
        # The pooled vector shifts the context, as SDXL's label embedding shifts the UNet's time embedding.
        return self.den(x, sigma, cond["crossattn"] + cond["vector"][:, None, :CTX])


def sdxl_inputs(batch=2, seed=0):
    """x, sigma and an SDXL-style conditioning dict: crossattn and a pooled `vector` (size/crop embeddings in it)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    sigma = torch.rand(batch, generator=g) * 5 + 0.5
    cond = {"crossattn": torch.randn(batch, 3, CTX, generator=g), "vector": torch.randn(batch, 2816, generator=g)}
    return x, sigma, cond


class Release:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1


def budget(free, per_row=1.0, release=None):
    return MemoryBudget(free=lambda: free, peak=lambda rows, shape: rows * per_row, release=release or (lambda: None))


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_oom_above_k_rows_gives_the_unchunked_result_for_every_k(unet, two_loras, batch):
    inputs = sdxl_inputs(batch)
    total = 3 * batch
    with MultiAdapter(unet, two_loras) as router:
        never = OomModel(unet)
        expected = evaluate(never, inputs, router, batched=True)
        assert never.calls == [total]
        for k in range(1, total + 1):
            model, release = OomModel(unet, limit=k), Release()
            chunker = Chunker(MemoryBudget(free=lambda: None, peak=lambda r, s: 0.0, release=release))
            got = evaluate(model, inputs, router, batched=True, chunker=chunker)
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
            assert sum(model.calls) == total and max(model.calls) <= k
            assert release.calls == len(model.failed) == chunker.ooms >= (k < total)
            assert chunker.most_chunks == len(model.calls)


@pytest.mark.parametrize("error", [
    lambda rows: RuntimeError(f"CUDA out of memory. Tried to allocate {rows} GiB"),
    lambda rows: RuntimeError("HIP out of memory. Tried to allocate 2.00 GiB"),
    lambda rows: RuntimeError("MPS backend out of memory (MPS allocated: 5 GB)"),
    lambda rows: RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: you "
                              "tried to allocate 123 bytes."),
])
def test_plain_runtime_error_forms_of_oom_are_retried(unet, two_loras, error):
    inputs = sdxl_inputs(2)
    with MultiAdapter(unet, two_loras) as router:
        expected = evaluate(OomModel(unet), inputs, router)
        model = OomModel(unet, limit=2, error=error)
        got = evaluate(model, inputs, router)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert model.failed and max(model.calls) == 2


def test_other_errors_and_oom_on_a_single_unit_propagate(unet, two_loras):
    inputs = sdxl_inputs(2)
    with MultiAdapter(unet, two_loras) as router:
        with pytest.raises(ValueError, match="bad"):
            evaluate(OomModel(unet, limit=0, error=lambda rows: ValueError("bad")), inputs, router)
        with pytest.raises(RuntimeError, match="size mismatch"):
            evaluate(OomModel(unet, limit=0, error=lambda rows: RuntimeError("size mismatch")), inputs, router)
        model = OomModel(unet, limit=0)
        with pytest.raises(torch.cuda.OutOfMemoryError):
            evaluate(model, inputs, router)
        assert model.failed[-1] == 1  # halved down to one row before giving up
        # Forge keeps a host chunk (its unit) in one call: below it, the error is the host's to handle.
        model = OomModel(unet, limit=1)
        with pytest.raises(torch.cuda.OutOfMemoryError):
            evaluate(model, inputs, router, chunker=Chunker(), unit=2)
        assert model.failed[-1] == 2


def test_is_out_of_memory():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("x"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(RuntimeError("expected scalar type Half"))
    assert not is_out_of_memory(ValueError("out of memory"))  # only the errors torch raises


def test_learned_cap_holds_for_later_calls(unet, two_loras):
    inputs = sdxl_inputs(2)
    with MultiAdapter(unet, two_loras) as router:
        model, chunker = OomModel(unet, limit=3), Chunker()
        evaluate(model, inputs, router, chunker=chunker)
        first = len(model.failed)
        evaluate(model, inputs, router, chunker=chunker)
    assert first >= 1 and len(model.failed) == first  # the second step starts at the size that fitted
    assert chunker.cap == 2


@pytest.mark.parametrize(("free", "calls"), [
    (100, [6]),  # everything fits: one call
    (4, [4, 2]),  # two groups of two rows fit: as few chunks as fit, whole groups
    (3, [2, 2, 2]),  # one group per call
    (1, [1] * 6),  # less than a group: rows
])
def test_budget_picks_as_few_chunks_as_fit(unet, two_loras, free, calls):
    inputs = sdxl_inputs(2)
    with MultiAdapter(unet, two_loras) as router:
        expected = evaluate(OomModel(unet), inputs, router)
        model, chunker = OomModel(unet), Chunker(budget(free))
        got = evaluate(model, inputs, router, chunker=chunker)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert sorted(model.calls, reverse=True) == calls and chunker.most_chunks == len(calls)


def test_chunks_are_balanced_and_aligned():
    assert plan_chunks(12, 8, 2) == [6, 6]  # two chunks either way; the even split lowers the peak
    assert plan_chunks(10, 4, 2) == [4, 4, 2]
    assert plan_chunks(6, 5, 2) == [4, 2]  # whole groups of 2 rows
    assert plan_chunks(6, 1, 2) == [1] * 6
    assert plan_chunks(12, 5, 6, unit=2) == [4, 4, 4]  # below a group: whole units
    assert plan_chunks(5, 4, 2) == [3, 2]  # rows left after an OOM mid-group: in units
    assert Chunker(budget(free=8)).rows_per_call(12, 2, (4, 8, 8)) == 8
    assert Chunker(budget(free=5)).rows_per_call(12, 2, (4, 8, 8)) == 4  # whole groups
    assert Chunker(budget(free=5)).rows_per_call(12, 6, (4, 8, 8), unit=2) == 4  # whole units below a group
    assert Chunker(budget(free=0)).rows_per_call(12, 2, (4, 8, 8)) == 1  # never less than one unit
    assert Chunker(budget(free=None)).rows_per_call(12, 2, (4, 8, 8)) == 12  # no device budget: one call
    with pytest.raises(ValueError, match="whole units"):
        Chunker().run(lambda a, b: torch.zeros(b - a), 6, 2, None, unit=4)


def test_sequential_stays_within_one_group_and_splits_below_it(unet, two_loras):
    inputs = sdxl_inputs(2)
    with MultiAdapter(unet, two_loras) as router:
        expected = evaluate(OomModel(unet), inputs, router)
        model, chunker = OomModel(unet, limit=1), Chunker()
        got = evaluate(model, inputs, router, batched=False, chunker=chunker)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert model.failed == [2] and model.calls == [1] * 6
    assert chunker.most_chunks == 1  # sequential calls are not chunking


def test_every_row_gets_its_own_conditioning_unchanged(unet, two_loras):
    """SDXL's pooled vector (with the size and crop embeddings) reaches each row of every chunk as the host gave it."""
    inputs = sdxl_inputs(3)
    vector = inputs[2]["vector"]
    for limit in (None, 9, 4, 2, 1):
        with MultiAdapter(unet, two_loras) as router:
            model = OomModel(unet, limit=limit)
            evaluate(model, inputs, router, chunker=Chunker())
        seen = torch.cat(model.vectors)
        assert seen.shape == (9, 2816)
        assert torch.equal(seen, vector.repeat(3, 1))


def test_composer_with_a_budget_equals_one_call(unet, two_loras):
    x, sigma, cond = sdxl_inputs(2)
    inputs = (torch.cat([x, x]), torch.cat([sigma, sigma]), {k: torch.cat([v, v]) for k, v in cond.items()})
    layout = BatchLayout.cond_then_uncond(2)
    settings = Settings(enabled=True, patch_size=4)
    with MultiAdapter(unet, two_loras) as router:
        plain = Composer(router, settings)(OomModel(unet), inputs, layout, 0, inputs[0], inputs[1])
        peak = activation_peak(2.0, torch.float32)  # 2 values per latent pixel: 4·64·2 = 512 bytes a row
        composer = Composer(router, settings, budget=MemoryBudget(free=lambda: 4 * 512, peak=peak))
        model = OomModel(unet)
        chunked = composer(model, inputs, layout, 0, inputs[0], inputs[1])
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    assert model.calls == [4, 4, 4] and composer.chunker.most_chunks == 3
