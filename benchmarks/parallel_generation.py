"""Does generation over several processes give the answers of one process, and at what speed? The issue-8 workload
(real prompts, 2 samples each, 200 new tokens, sampled at T 0.7) answered by the lean backend on the embedded model
in 1 process, then in N worker processes (`processes: N`, generation/parallel.py); then tokens/s, and how many
answers are the same text.

    python benchmarks/parallel_generation.py [--prompts 64] [--processes 2]

On a CPU the workers share the machine's cores (each takes cores/N threads), so the seconds show what splitting the
cores and loading the model N times costs or gains; on a machine with N GPUs each worker has a GPU of its own, which
is what the setting is for. The time includes starting the workers and loading the model in each (a recipe pays it
once per generation stage).
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time
from pathlib import Path

if __name__ == "__main__":  # the workers are spawned: they import this file, which must not run again in them
    import torch

    from selfalign.data.loaders import load_prompts, shared_data_dir
    from selfalign.generation import SamplingParams, make_generator
    from selfalign.models import DEFAULT_MODEL

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64, help="real prompts from prompts/unlabelled_pool.jsonl")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--batch-size", type=int, default=None, help="per process (default: the backend's)")
    args = ap.parse_args()

    prompts = load_prompts(Path(shared_data_dir()) / "prompts" / "unlabelled_pool.jsonl", limit=args.prompts)
    params = SamplingParams(temperature=0.7, max_new_tokens=args.max_new_tokens, n=args.samples, seed=0)
    runs = {}
    for processes in (1, args.processes):
        t0 = time.perf_counter()
        gen = make_generator("lean", args.model, batch_size=args.batch_size, processes=processes)
        answers = gen.generate(prompts, params, progress=False)
        gen.close()
        runs[processes] = (time.perf_counter() - t0, answers)

    base_seconds, base = runs[1]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# {args.prompts} prompts x {args.samples} samples, {args.max_new_tokens} new tokens, T 0.7, lean, "
          f"{args.model}; {platform.node()}, {torch.get_num_threads()} threads, "
          f"{'cuda x' + str(torch.cuda.device_count()) if torch.cuda.is_available() else 'cpu'}; commit {commit}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print("| processes | answers | tokens | wall s (incl. load) | tokens/s | vs 1 process | same text as 1 process |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for processes, (seconds, answers) in runs.items():
        tokens = sum(r.num_tokens for r in answers)
        same = sum(a.response == b.response for a, b in zip(base, answers))
        assert [a.key for a in answers] == [b.key for b in base]
        print(f"| {processes} | {len(answers)} | {tokens} | {seconds:.1f} | {tokens / seconds:.0f} | "
              f"{base_seconds / seconds:.2f}x | {same} of {len(base)} |")
