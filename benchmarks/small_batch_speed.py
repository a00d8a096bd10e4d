"""Lean vs transformers on small jobs (a handful of answers), where the lean loop's batching has little to win.

    python benchmarks/small_batch_speed.py [--sizes 4 16] [--max-new-tokens 48]

Greedy answers to the first prompts of shared/data/prompts/unlabelled_pool.jsonl on the embedded model; each backend
twice, alternating, model load excluded. The "Fast generation" tables measure the recipes' workload (64 prompts x 2
samples x 200 tokens); this is the other end, e.g. `selfalign generate --limit 8` or a tiny `eval --limit`.
"""

from __future__ import annotations

import argparse
import time

from selfalign.data.loaders import load_prompts, shared_data_dir
from selfalign.generation import SamplingParams, make_generator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()
    prompts = load_prompts(shared_data_dir() / "prompts" / "unlabelled_pool.jsonl", limit=max(args.sizes))
    params = SamplingParams(temperature=0, max_new_tokens=args.max_new_tokens)
    print("| answers | backend | seconds | tokens | tokens/s |\n|---:|---|---:|---:|---:|")
    for n in args.sizes:
        for backend in ("lean", "transformers", "lean", "transformers"):
            gen = make_generator(backend, model="smollm2-135m")
            t = time.perf_counter()
            out = gen.generate(prompts[:n], params, progress=False)
            seconds = time.perf_counter() - t
            tokens = sum(r.num_tokens for r in out)
            print(f"| {n} | {backend} | {seconds:.2f} | {tokens} | {tokens / seconds:.1f} |", flush=True)
            gen.close()


if __name__ == "__main__":
    main()
