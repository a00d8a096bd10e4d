"""Does training over several processes compute what one process computes? SFT, DPO and ORPO on the embedded model
and real UltraFeedback pairs, each trained in 1 process, in 2 processes (data parallel) and in 2 processes with the
model sharded (FSDP), from the same start with the same config; then the logged losses and gradient norms, and the
final weights, are compared with the single-process run's.

    python benchmarks/distributed_training.py [--pairs 16] [--steps 4] [--out runs/distributed]

On a CPU the processes are gloo workers sharing the cores, so the seconds show the cost of the machinery (spawn,
model loads, collectives), not a speed-up; on a machine with N GPUs, `--processes N` times the real thing.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import time
from pathlib import Path

from safetensors.torch import load_file

from selfalign.data import Conversation
from selfalign.data.loaders import load_preference_pairs, shared_data_dir
from selfalign.models import DEFAULT_MODEL
from selfalign.training import DPOTrainConfig, ORPOTrainConfig, SFTTrainConfig, train_dpo, train_orpo, train_sft


def train(method: str, pairs, out: Path, **settings) -> float:
    """Seconds to train `method` into `out` (replaced if there)."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    if method == "sft":
        convs = [Conversation(p.id, p.messages + [{"role": "assistant", "content": p.chosen}]) for p in pairs]
        train_sft(DEFAULT_MODEL, convs, SFTTrainConfig(**settings), out / "train", out / "final", verbose=False)
    elif method == "dpo":
        train_dpo(DEFAULT_MODEL, pairs, DPOTrainConfig(**settings), out / "train", out / "final", verbose=False)
    else:
        train_orpo(DEFAULT_MODEL, pairs, ORPOTrainConfig(**settings), out / "train", out / "final", verbose=False)
    return time.perf_counter() - t0


def compare(a: Path, b: Path) -> tuple[float, float, float]:
    """(max |loss difference|, max relative grad-norm difference, max |weight difference|) of two trainings."""
    rows = [[json.loads(line) for line in (p / "train" / "log.jsonl").read_text().splitlines()] for p in (a, b)]
    loss = max(abs(x["loss"] - y["loss"]) for x, y in zip(*rows))
    grad = max(abs(x["grad_norm"] - y["grad_norm"]) / x["grad_norm"] for x, y in zip(*rows))
    wa, wb = (load_file(str(p / "final" / "model.safetensors")) for p in (a, b))
    assert wa.keys() == wb.keys()
    return loss, grad, max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=16, help="UltraFeedback training pairs")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--out", default="runs/distributed")
    args = ap.parse_args()
    pairs = load_preference_pairs(shared_data_dir() / "preferences" / "ultrafeedback_binarized_train_1k.jsonl",
                                  limit=args.pairs)
    common = dict(max_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                  max_prompt_length=args.max_length // 2, save_steps=0, warmup_ratio=0.0, learning_rate=1e-5)
    settings = {"1 process": {}, f"{args.processes} processes": {"processes": args.processes},
                f"{args.processes} processes, fsdp": {"processes": args.processes, "fsdp": True}}
    rows = []
    for method in ("sft", "dpo", "orpo"):
        base = Path(args.out) / method
        for label, extra in settings.items():
            seconds = train(method, pairs, base / label.replace(" ", "_").replace(",", ""), **common, **extra)
            diffs = compare(base / "1_process", base / label.replace(" ", "_").replace(",", ""))
            rows.append((method, label, seconds, *diffs))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"\n{args.pairs} pairs, {args.steps} steps of {args.batch_size}, max_length {args.max_length}, "
          f"{DEFAULT_MODEL}; {platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}, "
          f"commit {commit}\n")
    print("| method | run | wall s | max abs loss diff vs 1 process | max rel grad-norm diff | max abs weight diff |")
    print("|---|---|---:|---:|---:|---:|")
    for method, label, seconds, loss, grad, weight in rows:
        print(f"| {method} | {label} | {seconds:.1f} | {loss:.2e} | {grad:.2e} | {weight:.2e} |")


if __name__ == "__main__":
    main()
