"""Resident memory of a real WebUI server with 1, 2 and 3 composed LoRAs of each format (test-only tooling).

    python -m tests.webui_memory --url URL --pid PID --lora-dir DIR [--formats ...] [--kohya styleA] [--json OUT]

For each format and k = 1, 2, 3 it sends the same txt2img twice with k files of that format (lyco_<fmt>,
lyco_<fmt>_2, lyco_<fmt>_3) and the kohya LoRA: once plain (the host merges them) and once with LoRAtorio, and
samples the server's resident memory (VmRSS of PID and its children) every 50 ms during each request. LoRAtorio's
extra memory per composed LoRA is the growth of its request's peak from k = 1 to k = 3, over the 2 LoRAs added,
against the target of 2x the file's size in the model's dtype (fp32 on the rigs); the table also gives the plain
request's peaks (the host's own merge of the same files). Prints a Markdown table (of earlier runs: --from-json).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

from tests.test_webui_smoke import post


def tree_rss(pid: int) -> int:
    """VmRSS in bytes of pid and all its descendants."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            continue
    return total


def peak_during(pid: int, fn) -> tuple[int, int, object]:
    """(RSS before, peak RSS while fn runs, fn's result)."""
    before, peak, done = tree_rss(pid), [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(pid))
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        result = fn()
    finally:
        done.set()
        thread.join()
    return before, max(peak[0], tree_rss(pid)), result


def fp32_size(path: str) -> int:
    """Bytes of the file's tensors in fp32 (the model's dtype on the rigs)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return sum(4 * _numel(f.get_slice(k).get_shape()) for k in f.keys())


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def table(rows: list[dict], formats: list[str]) -> str:
    """Markdown: per format, the server's peak RSS during the plain and the LoRAtorio request with k files, and
    LoRAtorio's growth per extra LoRA (its peak from k = 1 to the last k, over the LoRAs added) against the file."""
    mib = 2**20
    lines = ["| format | file in fp32 | plain peak, k = 1 / 2 / 3 | LoRAtorio peak, k = 1 / 2 / 3 | "
             "LoRAtorio − plain | LoRAtorio per extra LoRA | per LoRA / file |", "|---|---|---|---|---|---|---|"]
    for fmt in formats:
        ks = [r for r in rows if r["format"] == fmt and "k" in r]
        if not ks:
            continue
        size = ks[0]["fp32_size"]
        per_lora = (ks[-1]["loratorio_peak"] - ks[0]["loratorio_peak"]) / max(len(ks) - 1, 1)
        lines.append(f"| {fmt} | {size / mib:.0f} MiB | "
                     + " / ".join(f"{r['plain_peak'] / mib:.0f}" for r in ks) + " MiB | "
                     + " / ".join(f"{r['loratorio_peak'] / mib:.0f}" for r in ks) + " MiB | "
                     + " / ".join(f"{r['extra'] / mib:+.0f}" for r in ks) + f" MiB | {per_lora / mib:+.0f} MiB | "
                     f"{per_lora / size:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--lora-dir", required=True)
    parser.add_argument("--formats", nargs="+", default=["locon", "loha", "lokr", "lokr_w1ab", "dora", "ia3", "full",
                                                          "kohya_locon"])
    parser.add_argument("--kohya", default="styleA")
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--json")
    parser.add_argument("--from-json", nargs="+", help="print the table of earlier runs' JSON files and exit")
    args = parser.parse_args(argv)
    if args.from_json:
        rows = [r for path in args.from_json for r in json.load(open(path))]
        print(table(rows, list(dict.fromkeys(r["format"] for r in rows))))
        return
    os.environ["LORATORIO_WEBUI_URL"] = args.url
    base = {"prompt": "a cat in a garden", "negative_prompt": "", "seed": 1234, "steps": 4, "width": 64,
            "height": 64, "cfg_scale": 5, "sampler_name": "Euler"}
    rows = []
    for fmt in args.formats:
        names = [f"lyco_{fmt}"] + [f"lyco_{fmt}_{i}" for i in range(2, args.copies + 1)]
        size = fp32_size(os.path.join(args.lora_dir, names[0] + ".safetensors"))
        for k in range(1, args.copies + 1):
            prompt = base["prompt"] + "".join(f" <lora:{n}:1>" for n in names[:k]) + f" <lora:{args.kohya}:1>"
            payload = {**base, "prompt": prompt}
            _, plain, _ = peak_during(args.pid, lambda p=payload: post("/sdapi/v1/txt2img", p))
            on = {**payload, "alwayson_scripts": {"LoRAtorio": {"args": [{"enabled": True}]}}}
            before, peak, out = peak_during(args.pid, lambda p=on: post("/sdapi/v1/txt2img", p))
            warning = json.loads(out["info"])["extra_generation_params"].get("LoRAtorio warning")
            rows.append({"format": fmt, "k": k, "plain_peak": plain, "loratorio_peak": peak, "before": before,
                         "extra": peak - plain, "fp32_size": size, "warning": warning})
            print(f"{fmt} k={k}: plain peak {plain / 2**20:.0f} MiB, LoRAtorio peak {peak / 2**20:.0f} MiB, "
                  f"extra {(peak - plain) / 2**20:+.0f} MiB{'  WARNING ' + warning if warning else ''}", flush=True)
    print(table(rows, args.formats))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
