"""The speed benchmark's command line, report and memory probe, on a tiny stand-in UNet (diffusers not needed)."""

import json
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loratorio.bench import speed
from loratorio.bench.__main__ import main as bench_main


class FakeUNet(nn.Module):
    """diffusers' call signature and target names (to_q … to_out.0, ff.net.*, resnets' conv1/conv2) on a few layers."""

    def __init__(self, cross_attention_dim: int = 8, **_: object) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.to_q, self.to_k, self.to_v = nn.Linear(8, 8), nn.Linear(cross_attention_dim, 8), \
            nn.Linear(cross_attention_dim, 8)
        self.to_out = nn.ModuleList([nn.Linear(8, 8)])
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x, t, encoder_hidden_states, added_cond_kwargs=None):
        b, _, h, w = x.shape
        tokens = self.conv1(x).flatten(2).transpose(1, 2)
        q, k, v = self.to_q(tokens), self.to_k(encoder_hidden_states), self.to_v(encoder_hidden_states)
        tokens = tokens + self.to_out[0](F.scaled_dot_product_attention(q, k, v))
        return SimpleNamespace(sample=self.conv2(tokens.transpose(1, 2).reshape(b, 8, h, w)))


def test_dispatcher_usage_and_unknown_command(capsys):
    assert bench_main([]) == 2 and bench_main(["nope"]) == 2
    assert "speed" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        bench_main(["speed", "--help"])
    assert exit_.value.code == 0 and "--plot" in capsys.readouterr().out


def test_missing_diffusers_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` raise ImportError
    with pytest.raises(SystemExit, match="requirements-bench.txt"):
        speed.load_unet_class()


def test_speed_report_on_a_stand_in_unet(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(speed, "load_unet_class", lambda: FakeUNet)
    out = tmp_path / "r.json"
    argv = ["speed", "--device", "cpu", "--tiny", "--latent", "4", "--n", "1", "3", "--repeats", "2", "--warmup", "0",
            "--json", str(out), "--plot", str(tmp_path / "p.png")]
    assert bench_main(argv) == 0
    report = json.loads(out.read_text())
    assert report["targets"] == 6 and list(report["per_n"]) == ["1", "3"]
    for r in report["per_n"].values():
        assert set(r["rows"]) == set(speed.KINDS) and all(len(row["times_s"]) == 2 for row in r["rows"].values())
        t = {k: v["median_s"] for k, v in r["rows"].items()}
        assert r["batched_over_floor"] == pytest.approx(t["batched"] / t["floor"])
        assert r["sequential_over_batched"] == pytest.approx(t["sequential"] / t["batched"])
        assert r["full_over_merged"] == pytest.approx(t["batched"] / t["merged"])
        # 20 steps with a full one every 4 (steps 0, 4, 8, 12, 16): 5 full steps and 15 fast ones.
        run = 5 * t["fast_full"] + 15 * t["fast"]
        assert r["fast_over_merged"]["4"] == pytest.approx(run / (20 * t["merged"]))
        assert r["lora_factors_mib"] > 0
    evals = report["per_n"]["3"]["row_evaluations_per_image_step"]["4"]
    assert evals == {"merged": 2.0, "full": 8.0, "fast": pytest.approx((5 * 6 + 15 * 2) / 20)}
    printed = capsys.readouterr().out
    assert "batched/floor" in printed and "fast/merged (full every 4)" in printed
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "p.png").stat().st_size > 0
    except ImportError:
        assert "matplotlib is not installed" in printed


def test_speed_times_only_the_kinds_asked_for(monkeypatch, tmp_path):
    monkeypatch.setattr(speed, "load_unet_class", lambda: FakeUNet)
    out = tmp_path / "r.json"
    argv = ["speed", "--device", "cpu", "--tiny", "--latent", "4", "--n", "2", "--repeats", "1", "--warmup", "0",
            "--kinds", "merged", "batched", "fast", "--full-every", "8", "--json", str(out)]
    assert bench_main(argv) == 0
    r = json.loads(out.read_text())["per_n"]["2"]
    assert set(r["rows"]) == {"merged", "remerge", "batched", "fast", "fast_full"}
    assert list(r["fast_over_merged"]) == ["8"]
    assert "batched_over_floor" not in r


def test_merger_restores_the_base_weights():
    unet = FakeUNet()
    names = speed.target_names(unet)
    before = {n: unet.get_submodule(n).weight.clone() for n in names}
    merger = speed.Merger(unet, names)
    with torch.no_grad():
        merger.merge(speed.make_loras(unet, names, 2, 4, seed=0))
        assert not torch.equal(unet.to_q.weight, before["to_q"])
        merger.restore()
    assert all(torch.equal(unet.get_submodule(n).weight, w) for n, w in before.items())


def test_cpu_peak_memory_sees_a_transient_allocation():
    mem = speed.PeakMemory(torch.device("cpu"))
    if not mem.resettable:
        pytest.skip("no resettable RSS high-water mark on this OS")
    mem.reset()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del block
    peak, extra = mem.read()
    assert extra >= 48 and peak >= extra
    mem.reset()
    assert mem.read()[1] < 32  # the reset forgot the earlier peak


def test_real_diffusers_unet_smoke(tmp_path):
    pytest.importorskip("diffusers")
    argv = ["speed", "--device", "cpu", "--tiny", "--latent", "8", "--n", "2", "--repeats", "1", "--warmup", "0",
            "--json", str(tmp_path / "r.json")]
    assert bench_main(argv) == 0
    r = json.loads((tmp_path / "r.json").read_text())["per_n"]["2"]
    assert r["batched_over_floor"] > 0 and r["rows"]["batched"]["median_s"] > 0


def test_memory_report_on_a_stand_in_unet(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(speed, "load_unet_class", lambda: FakeUNet)
    out = tmp_path / "m.json"
    argv = ["memory", "--device", "cpu", "--tiny", "--latent", "8", "16", "--n", "1", "3", "--target-latent", "32",
            "--budgets", "0.000001", "1", "--json", str(out)]
    assert bench_main(argv) == 0
    report = json.loads(out.read_text())
    assert list(report["measured_mib"]) == ["8", "16"] and list(report["target"]) == ["1", "3"]
    for n, rows in (("1", 4), ("3", 8)):
        r = report["target"][n]
        assert r["rows"] == rows and r["chunks"] == {"1e-06": 0, "1.0": 1}  # nothing fits / everything fits
        assert r["batched_gib"] >= r["plain_gib"] > 0
    assert "chunks @ 1 GB" in capsys.readouterr().out


def test_chunks_under_a_budget():
    from loratorio.bench.memory import GIB, chunks_under

    # 8 rows of 1 GiB each over 2 GiB of weights: 10 GiB holds all rows, 6 GiB two groups (4 rows) a call
    def per_row(rows):
        return rows * GIB

    assert chunks_under(10, 8, 16, 2 * GIB, per_row) == 1
    assert chunks_under(6.5, 8, 16, 2 * GIB, per_row) == 2
    assert chunks_under(3, 8, 16, 2 * GIB, per_row) == 8  # one row a call: below one group
    assert chunks_under(2.5, 8, 16, 2 * GIB, per_row) == 0


def test_fit_recovers_a_linear_law():
    from loratorio.bench.memory import fit

    measured = {str(lat): {"1": {"call_rows": {"plain": 2, "batched": 4, "chunked": 2, "sequential": 2},
                                  **{m: 50 + 0.01 * rows * lat**2 for m, rows in
                                     (("plain", 2), ("batched", 4), ("chunked", 2), ("sequential", 2))}}}
                for lat in (8, 16)}
    a, c = fit(measured)
    assert a == pytest.approx(0.01) and c == pytest.approx(50)


def test_live_bytes_count_allocations_until_freed_and_nothing_for_views():
    from loratorio.bench.memory import LiveBytes

    mib = 2**18  # fp32 values in 1 MiB
    x = torch.empty(mib, device="meta")  # before the mode: not counted
    with LiveBytes() as live:
        y = x * 2  # 1 MiB
        z = y + 1  # 2 MiB alive
        del y  # 1 MiB
        w = z.view(2, -1).t()  # a view: nothing new
        z.add_(1)  # in place: nothing new
        v = x.view(-1)[:10]  # a view of a tensor made before the mode: nothing
    assert live.peak == 2 * 2**20 and live.live == 2**20
    del z, w, v


def test_fused_attention_counts_the_output_not_the_attention_matrix():
    from loratorio.bench.memory import FusedAttention, LiveBytes

    q = torch.empty(1, 1, 4096, 8, device="meta")
    with LiveBytes() as math_path:
        F.scaled_dot_product_attention(q, q, q)
    with FusedAttention(), LiveBytes() as fused:
        out = F.scaled_dot_product_attention(q, q, value=q[..., :4])
    assert out.shape == (1, 1, 4096, 4) and fused.peak == out.numel() * 4
    assert math_path.peak >= 4096 * 4096 * 4  # what the fused kernel spares


def test_memory_report_counted_on_the_meta_device(monkeypatch, tmp_path):
    monkeypatch.setattr(speed, "load_unet_class", lambda: FakeUNet)
    out = tmp_path / "m.json"
    argv = ["memory", "--device", "meta", "--tiny", "--n", "1", "2", "3", "--target-latent", "16", "--json", str(out)]
    assert bench_main(argv) == 0
    report = json.loads(out.read_text())
    assert report["args"]["dtype"] == "float16" and list(report["measured_mib"]) == ["16"]
    m = {n: r["batched"] for n, r in report["measured_mib"]["16"].items()}
    # Each LoRA adds two rows to the batched call, and the same bytes each time.
    assert m["3"] - m["2"] == pytest.approx(m["2"] - m["1"], rel=0.01) and m["2"] > m["1"]
    assert report["measured_mib"]["16"]["1"]["plain"] < m["1"]
    # The router's stacked factors, built by the first call and kept: counted once, as memory held, not per call.
    assert all(r["router_cache_mib"] > 0 for r in report["measured_mib"]["16"].values())
    # Speed fast's copy: every LoRA's factors once (equal ranks: N times one LoRA's), at least the routed copy.
    per_n = report["measured_mib"]["16"]
    assert per_n["3"]["mask_cache_mib"] == pytest.approx(3 * per_n["1"]["mask_cache_mib"], rel=1e-6)
    assert all(r["mask_cache_mib"] >= r["router_cache_mib"] > 0 for r in per_n.values())
