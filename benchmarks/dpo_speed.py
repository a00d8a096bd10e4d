"""DPO training speed: selfalign's trainer vs TRL's DPOTrainer, same model, same pairs, same batch size.

    python benchmarks/dpo_speed.py                                   # embedded smollm2-135m on this machine
    python benchmarks/dpo_speed.py --random-init smollm2-1.7b        # GPU: a random-init SmolLM2-1.7B shape

Throughput = non-padding tokens (prompt + response, chosen and rejected) processed per second over the timed
optimizer steps after `--warmup` steps; each step is a full forward + backward + optimizer update at the same batch
size. Both use the same chat template, the same truncation (keep the start, `--max-length`), fp32 on CPU / bf16
autocast on GPU, the fused AdamW, one concatenated chosen+rejected forward. Rows:

  selfalign, ref cache      reference log-probs computed once before training (our default for a frozen reference)
  selfalign, live ref       reference forward every step (what SPA's extrapolated log-probs need)
  TRL, precompute on/off    DPOTrainer with precompute_ref_log_probs True / False

selfalign additionally groups batches by length (less padding, so the same number of real tokens costs less);
`--no-group-by-length` turns that off for a like-for-like batch composition. Reference-pass time (the cache build /
TRL's precompute) happens before training in both and is not in the timed steps; it is printed separately.
As a parity check the script compares the two frameworks' cached reference log-probs pair by pair.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from selfalign.data.loaders import load_preference_pairs, shared_data_dir  # noqa: E402
from selfalign.models import encode_prompt, load_tokenizer, resolve_model  # noqa: E402

SHAPES = {  # random-init shapes for GPU runs (no download needed)
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, max_position_embeddings=8192, rope_theta=130000.0),
}


def random_init_model(shape: str, folder: Path) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer("smollm2-135m")
    cfg = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **SHAPES[shape])
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return str(folder)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ selfalign
def run_selfalign(model: str, pairs, args, cache: bool, group: bool) -> dict:
    from selfalign.training import DPOTrainConfig, train_dpo

    cfg = DPOTrainConfig(max_steps=args.warmup + args.steps, batch_size=args.batch_size, max_length=args.max_length,
                         max_prompt_length=args.max_length - 1, learning_rate=5e-7, warmup_ratio=0.0, save_steps=0,
                         cache_reference=cache, group_by_length=group, reference_batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        summary = train_dpo(model, pairs, cfg, Path(d) / "train", Path(d) / "final", verbose=False)
        setup = time.perf_counter() - t0 - summary["seconds"]
        rows = [json.loads(x) for x in (Path(d) / "train" / "log.jsonl").read_text().splitlines()]
        ref = {}
        for f in (Path(d) / "train").glob("ref_logps.*.jsonl"):
            ref = {r["id"]: (r["chosen"], r["rejected"]) for r in map(json.loads, f.read_text().splitlines())}
    timed = rows[args.warmup:]
    return {"tokens": sum(r["tokens"] for r in timed), "seconds": sum(r["seconds"] for r in timed),
            "setup_s": setup, "ref": ref}


# ------------------------------------------------------------------------------------------------ TRL
def run_trl(model: str, pairs, args, precompute: bool) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class CountingDPOTrainer(DPOTrainer):
        """Counts the non-padding tokens of every batch it trains on (public `compute_loss` extension point)."""

        tokens = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.tokens += int(inputs["attention_mask"].sum())
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.rows, self.trainer = [], None

        def on_step_begin(self, *a, **k):
            sync()
            self.t0, self.tok0 = time.perf_counter(), self.trainer.tokens

        def on_step_end(self, *a, **k):
            sync()
            self.rows.append((time.perf_counter() - self.t0, self.trainer.tokens - self.tok0))

    data = Dataset.from_list([{"prompt": p.messages, "chosen": [{"role": "assistant", "content": p.chosen}],
                               "rejected": [{"role": "assistant", "content": p.rejected}], "id": p.id}
                              for p in pairs])
    cuda = torch.cuda.is_available()
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as d:
        cfg = DPOConfig(output_dir=d, per_device_train_batch_size=args.batch_size, max_steps=args.warmup + args.steps,
                        learning_rate=5e-7, lr_scheduler_type="cosine", warmup_steps=0, beta=0.1,
                        max_length=args.max_length, truncation_mode="keep_start",
                        precompute_ref_log_probs=precompute, precompute_ref_batch_size=args.batch_size,
                        logging_steps=1, save_strategy="no", report_to="none", use_cpu=not cuda, bf16=cuda,
                        disable_tqdm=True, dataloader_num_workers=0, seed=42,
                        model_init_kwargs={"dtype": torch.float32})
        t0 = time.perf_counter()
        trainer = CountingDPOTrainer(model=model, args=cfg, train_dataset=data,
                                     processing_class=load_tokenizer(model, padding_side="left"), callbacks=[timer])
        timer.trainer = trainer
        assert len(trainer.train_dataset) == len(pairs), "TRL dropped pairs: the comparison would be unfair"
        setup = time.perf_counter() - t0
        trainer.train()
        ref = {}
        if precompute:
            ds = trainer.train_dataset
            ref = {i: (c, r) for i, c, r in zip(ds["id"], ds["ref_chosen_logps"], ds["ref_rejected_logps"])}
    timed = timer.rows[args.warmup:]
    return {"tokens": sum(t for _, t in timed), "seconds": sum(s for s, _ in timed), "setup_s": setup, "ref": ref}


# ------------------------------------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="model spec (short name, folder)")
    ap.add_argument("--random-init", choices=sorted(SHAPES), help="benchmark a random-init model of this shape")
    ap.add_argument("--pairs", type=int, default=16, help="real UltraFeedback pairs (first N of the 1k train file)")
    ap.add_argument("--batch-size", type=int, default=4, help="pairs per step (2x sequences)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps")
    ap.add_argument("--steps", type=int, default=3, help="timed steps")
    ap.add_argument("--modes", default="selfalign-cache,selfalign-live,trl-precompute,trl-live",
                    help="comma-separated subset of: selfalign-cache, selfalign-live, selfalign-cache-nogroup, "
                         "trl-precompute, trl-live")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run the modes round-robin this many times (spreads a shared machine's load fairly)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    # TRL drops pairs whose prompt alone fills max_length; keep prompts under half of it so both train on the same
    # pairs (the first N that qualify).
    tok = load_tokenizer("smollm2-135m")
    pairs = [p for p in load_preference_pairs(shared_data_dir() / "preferences" /
                                              "ultrafeedback_binarized_train_1k.jsonl")
             if len(encode_prompt(tok, p.messages)) < args.max_length // 2][:args.pairs]
    tmp = tempfile.TemporaryDirectory()
    model = random_init_model(args.random_init, Path(tmp.name)) if args.random_init else str(resolve_model(args.model))
    runners = {
        "selfalign-cache": lambda: run_selfalign(model, pairs, args, cache=True, group=True),
        "selfalign-live": lambda: run_selfalign(model, pairs, args, cache=False, group=True),
        "selfalign-cache-nogroup": lambda: run_selfalign(model, pairs, args, cache=True, group=False),
        "trl-precompute": lambda: run_trl(model, pairs, args, precompute=True),
        "trl-live": lambda: run_trl(model, pairs, args, precompute=False),
    }
    results: dict[str, dict] = {}
    for rep in range(args.repeats):
        for mode in args.modes.split(","):
            print(f"running {mode} ({rep + 1}/{args.repeats}) ...", file=sys.stderr, flush=True)
            r = runners[mode]()
            agg = results.setdefault(mode, {"tokens": 0, "seconds": 0.0, "setup_s": 0.0, "runs": [], "ref": r["ref"]})
            agg["tokens"] += r["tokens"]
            agg["seconds"] += r["seconds"]
            agg["setup_s"] += r["setup_s"] / args.repeats
            agg["runs"].append(round(r["tokens"] / r["seconds"], 1))
            print(f"  {mode}: {r['tokens']} tokens in {r['seconds']:.1f} s = {agg['runs'][-1]} tokens/s "
                  f"(setup {r['setup_s']:.1f} s)", file=sys.stderr, flush=True)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(f"\nDPO training speed: {args.random_init or args.model}, {args.pairs} pairs, batch {args.batch_size} pairs, "
          f"max_length {args.max_length}, {args.steps} timed steps after {args.warmup}, {device}, "
          f"torch {torch.__version__}, python {platform.python_version()}")
    print(f"{'mode':<26}{'tokens':>9}{'seconds':>10}{'tokens/s':>11}{'setup s':>10}  per-repeat tokens/s")
    for mode, r in results.items():
        r["tokens_per_s"] = r["tokens"] / r["seconds"] if r["seconds"] else float("nan")
        print(f"{mode:<26}{r['tokens']:>9}{r['seconds']:>10.1f}{r['tokens_per_s']:>11.1f}{r['setup_s']:>10.1f}  "
              f"{r['runs']}")
    for ours, theirs in (("selfalign-cache", "trl-precompute"), ("selfalign-live", "trl-live"),
                         ("selfalign-cache-nogroup", "trl-precompute")):
        if ours in results and theirs in results:
            print(f"ratio {ours} / {theirs}: {results[ours]['tokens_per_s'] / results[theirs]['tokens_per_s']:.2f}")
    a, b = results.get("selfalign-cache", {}).get("ref"), results.get("trl-precompute", {}).get("ref")
    if a and b:
        diffs = [abs(a[i][k] - b[i][k]) for i in a.keys() & b.keys() for k in (0, 1)]
        print(f"reference log-prob parity (selfalign cache vs TRL precompute, {len(diffs) // 2} pairs): "
              f"max |diff| {max(diffs):.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps({m: {k: v for k, v in r.items() if k != "ref"}
                                               for m, r in results.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
