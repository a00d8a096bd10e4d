"""Generation throughput of selfalign's local backend against plain `model.generate`, on the same prompts.

Three ways to answer the same real prompts with the same model and settings:
  1. plain `model.generate`, one prompt at a time;
  2. plain `model.generate`, batched in file order (left padding, no sorting);
  3. selfalign's TransformersGenerator (length-sorted, left-padded batches).
Tokens/s counts generated tokens up to and including the end-of-turn token (padding after it is not counted).

    python benchmarks/generation_speed.py --prompts 32 --max-new-tokens 128 --batch-size 16
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from selfalign.data.loaders import load_prompts, shared_data_dir  # noqa: E402
from selfalign.generation import SamplingParams  # noqa: E402
from selfalign.generation.transformers_backend import TransformersGenerator  # noqa: E402
from selfalign.models import encode_prompt  # noqa: E402


def count_new(tokens: list[int], eos: set[int]) -> int:
    for k, t in enumerate(tokens):
        if t in eos:
            return k + 1
    return len(tokens)


def plain_generate(gen: TransformersGenerator, prompts, batch_size: int, max_new_tokens: int) -> tuple[int, float]:
    tok, model, eos = gen.tokenizer, gen.model, set(gen.eos_ids)
    total, t0 = 0, time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        texts = [tok.decode(encode_prompt(tok, p.messages)) for p in chunk]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=gen.eos_ids)
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            total += count_new(row, eos)
    return total, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=32, help="real prompts from prompts/unlabelled_pool.jsonl")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()

    prompts = load_prompts(shared_data_dir() / "prompts" / "unlabelled_pool.jsonl", limit=args.prompts)
    gen = TransformersGenerator(args.model, batch_size=args.batch_size, dtype=args.dtype)
    params = SamplingParams(temperature=0, max_new_tokens=args.max_new_tokens)
    gen.generate(prompts[:2], SamplingParams(temperature=0, max_new_tokens=4), progress=False)  # warm-up

    rows = []
    n_single = min(8, len(prompts))  # one-at-a-time is slow: time a prefix and report its rate
    toks, secs = plain_generate(gen, prompts[:n_single], 1, args.max_new_tokens)
    rows.append((f"model.generate, 1 prompt at a time ({n_single} prompts)", toks, secs))
    toks, secs = plain_generate(gen, prompts, args.batch_size, args.max_new_tokens)
    rows.append((f"model.generate, batched {args.batch_size}, file order", toks, secs))
    t0 = time.perf_counter()
    out = gen.generate(prompts, params, progress=False)
    secs = time.perf_counter() - t0
    rows.append((f"selfalign transformers backend, batch {args.batch_size}, length-sorted",
                 sum(r.num_tokens or 0 for r in out), secs))

    base = rows[0][1] / rows[0][2]
    print(f"# {datetime.date.today()} {platform.node()} {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"model {args.model}, dtype {next(gen.model.parameters()).dtype}, {len(prompts)} prompts, "
          f"max_new_tokens {args.max_new_tokens}, greedy")
    print("| method | new tokens | seconds | tokens/s | vs 1-at-a-time |")
    print("|---|---:|---:|---:|---:|")
    for name, toks, secs in rows:
        print(f"| {name} | {toks} | {secs:.1f} | {toks / secs:.1f} | {toks / secs / base:.2f}x |")


if __name__ == "__main__":
    main()
