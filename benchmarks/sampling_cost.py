"""What sampling costs on top of greedy decoding, per backend, on the same real prompts.

A user walkthrough saw sampled generation run ~3x slower than greedy on a loaded box. This measures it on one
machine, in one process, alternating the settings so that background load hits them alike:
  greedy (temperature 0), T 0.7 / top_p 0.9 (the recipes' default), T 1.0 / top_p 1.0 (full-vocabulary draw).
Tokens/s counts generated tokens (end-of-turn token included). Answers differ in length between settings (greedy
ones repeat to the budget more often), so the table gives tokens/s, not seconds per prompt.

    OMP_NUM_THREADS=1 python benchmarks/sampling_cost.py --prompts 32 --max-new-tokens 64 --repeats 2
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from selfalign.data.loaders import load_prompts, shared_data_dir  # noqa: E402
from selfalign.generation import SamplingParams, make_generator  # noqa: E402

SETTINGS = {"greedy": (0.0, 1.0), "T0.7 top_p0.9": (0.7, 0.9), "T1.0 top_p1.0": (1.0, 1.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--backends", default="lean,transformers")
    ap.add_argument("--prompts", type=int, default=32, help="real prompts from prompts/unlabelled_pool.jsonl")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    prompts = load_prompts(shared_data_dir() / "prompts" / "unlabelled_pool.jsonl", limit=args.prompts)
    results: dict[tuple[str, str], list[float]] = {}
    tokens: dict[tuple[str, str], int] = {}
    for backend in args.backends.split(","):
        gen = make_generator(backend, args.model)
        gen.generate(prompts[:2], SamplingParams(temperature=0, max_new_tokens=4), progress=False)  # warm-up
        for _ in range(args.repeats):
            for name, (temperature, top_p) in SETTINGS.items():
                params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=args.max_new_tokens,
                                        seed=1)
                t0 = time.perf_counter()
                out = gen.generate(prompts, params, progress=False)
                seconds = time.perf_counter() - t0
                n = sum(r.num_tokens or 0 for r in out)
                results.setdefault((backend, name), []).append(n / seconds)
                tokens[(backend, name)] = n
        gen.close()

    print(f"\n{platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    print(f"{args.prompts} prompts, {args.max_new_tokens} new tokens, {args.repeats} alternating repeats (median)\n")
    print("| backend | setting | tokens | tokens/s | vs greedy |")
    print("|---|---|---:|---:|---:|")
    for backend in args.backends.split(","):
        greedy = statistics.median(results[(backend, "greedy")])
        for name in SETTINGS:
            rate = statistics.median(results[(backend, name)])
            print(f"| {backend} | {name} | {tokens[(backend, name)]} | {rate:.1f} | {rate / greedy:.2f}x |")


if __name__ == "__main__":
    main()
