"""Lean decode-step time against the number of rows decoded together: what a generation batch size buys.

    python benchmarks/decode_step_rows.py --model qwen2.5-coder-1.5b --rows 8,16,32,64

One LeanDecoder.decode_step over a KV cache of random values (speed does not depend on them), each row at a random
position in --positions, best of --repeats steps after one warm-up; fp32 on CPU. Prints a table of ms per step and
tokens/s (rows / step time).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from selfalign.generation.lean_backend import LeanGenerator  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", default="8,16,32,64,128")
    ap.add_argument("--positions", default="500,800", help="low,high: each row's position is drawn from this range")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    low, high = (int(x) for x in args.positions.split(","))
    dec = LeanGenerator(args.model, batch_size=max(rows), dtype="float32", device="cpu").decoder
    torch.manual_seed(0)
    results = []
    with torch.inference_mode():
        for b in rows:
            dec.allocate(b, high + 1)
            dec.cache.normal_()
            tokens = torch.randint(0, dec.lm_head.shape[0], (b,))
            positions = torch.randint(low, high, (b,)).sort(descending=True).values
            dec.decode_step(tokens, positions)
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                dec.decode_step(tokens, positions)
                best = min(best, time.perf_counter() - t0)
            results.append((b, best))
            print(f"rows {b}: {best * 1000:.0f} ms/step", flush=True)
            dec.release()
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, model {args.model}, fp32, positions {low}-{high}")
    print("| rows | ms per step | tokens/s |")
    print("|---:|---:|---:|")
    for b, s in results:
        print(f"| {b} | {s * 1000:.0f} | {b / s:.1f} |")


if __name__ == "__main__":
    main()
