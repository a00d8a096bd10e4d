"""Host time per decode step of the lean loop, with the model's arithmetic made negligible.

Why: on a GPU the device does a step's arithmetic in a few milliseconds, and the host's share (recording tokens,
retiring and admitting sequences, building the next step's inputs, launching kernels or a graph replay) must fit
beside it. Issue #8 asks for 35k tokens/s at 256 rows, i.e. 7.3 ms per step in all. This runs the real loop with a
one-layer model of width 64 (random init) whose output head keeps only the first 512 tokens of the embedded
tokenizer's vocabulary, so what is left of each step is the loop's own host work plus tiny CPU kernels: an upper bound for
the host's share on this CPU. End-of-sequence tokens are ignored, so every sequence runs max_new_tokens steps.

    python benchmarks/host_overhead.py --rows 64,256 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import torch

from selfalign.data import Prompt
from selfalign.generation import SamplingParams
from selfalign.generation.lean_backend import LeanGenerator
from selfalign.models import load_tokenizer


VOCAB = 512


def tiny_generator(rows: int, decode: str, overlap: bool) -> LeanGenerator:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer("smollm2-135m", "left")
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    gen = LeanGenerator("smollm2-135m", batch_size=rows, model_obj=LlamaForCausalLM(cfg).eval(),
                        tokenizer=tok, decode=decode, overlap=overlap)
    gen.decoder.lm_head = gen.decoder.lm_head[:VOCAB]  # logits over the first VOCAB tokens only
    gen.eos_ids = set()  # every sequence runs the full max_new_tokens
    return gen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="64,256")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--prompt-words", type=int, default=100)
    args = ap.parse_args()
    table = []
    for rows in [int(r) for r in args.rows.split(",")]:
        prompts = [Prompt(id=f"p{i}", messages=[{"role": "user", "content": f"{i} " + "word " * args.prompt_words}])
                   for i in range(rows)]
        for decode, overlap in (("static", False), ("static", True), ("grouped", False)):
            for name, params in (("greedy", SamplingParams(temperature=0, max_new_tokens=args.max_new_tokens)),
                                 ("T 0.7 top-p 0.9", SamplingParams(temperature=0.7, top_p=0.9,
                                                                   max_new_tokens=args.max_new_tokens, seed=0))):
                gen = tiny_generator(rows, decode, overlap)
                gen.generate(prompts[:2], params, progress=False)  # warm-up
                # the prefill is timed apart: a one-step run costs the prefill plus one step
                t0 = time.perf_counter()
                gen.generate(prompts, SamplingParams(**{**params.to_dict(), "max_new_tokens": 1}), progress=False)
                prefill = time.perf_counter() - t0
                t0 = time.perf_counter()
                gen.generate(prompts, params, progress=False)
                total = time.perf_counter() - t0
                per_step = (total - prefill) / (args.max_new_tokens - 1) * 1e3
                table.append((rows, decode + (", overlapped" if overlap else ""), name, per_step))
                print(f"rows {rows}, {table[-1][1]}, {name}: {per_step:.2f} ms per step", flush=True)
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, 1-layer width-64 model, {VOCAB}-token head, "
          f"{args.prompt_words}-word prompts, {args.max_new_tokens} new tokens")
    print("| rows | steps | sampling | host ms per step |")
    print("|---:|---|---|---:|")
    for rows, steps, name, ms in table:
        print(f"| {rows} | {steps} | {name} | {ms:.2f} |")


if __name__ == "__main__":
    main()
