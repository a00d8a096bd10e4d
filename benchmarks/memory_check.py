"""Does `train.memory_check` foretell a training run's peak memory? For SFT and DPO at a few batch sizes, on real
UltraFeedback pairs and the embedded model: the check's figure (the peak of the forward and backward of a
micro-batch no step can outweigh, with stand-ins for AdamW's state resident), against the peak of the same training
run with no check, one epoch, so that its heaviest batches do come up.

    python benchmarks/memory_check.py [--device cpu|cuda] [--model smollm2-135m] [--pairs 16] [--max-length 512]
    python benchmarks/memory_check.py --device cuda --model .gpu/tok --random-init smollm2-1.7b   # gpu_run.sh --memory

Each run is a process of its own. On a CPU a peak is the process's peak resident size (VmHWM), reset as training
starts, read before the final model is saved; on CUDA it is the allocator's peak (torch.cuda.max_memory_allocated)
over the same span. A check is good when it is at or above the run's peak, and not far above.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path



def one(kind: str, batch_size: int, checkpointing: bool, check: bool, args) -> dict:
    """One training run in this process: the check's figures, or the run's measured peak (GiB)."""
    import torch

    from selfalign.data.loaders import load_preference_pairs, shared_data_dir
    from selfalign.data.records import Conversation
    from selfalign.training import DPOTrainConfig, SFTTrainConfig, memory, train_dpo, train_sft, trainer

    pairs = load_preference_pairs(Path(shared_data_dir()) / "preferences" / "ultrafeedback_binarized_train_1k.jsonl",
                                  limit=args.pairs)
    settings = dict(epochs=1, batch_size=batch_size, max_length=args.max_length, max_prompt_length=args.max_length // 2,
                    gradient_checkpointing=checkpointing, save_steps=0, device=args.device,
                    memory_check="always" if check else "never")
    cuda = args.device.startswith("cuda")
    peak = {}
    fit, save_final = trainer.fit, trainer.save_final

    def measured_fit(*a, **kw):  # the run's peak from the start of training, as the check sees it
        memory._reset_peak(args.device)
        return fit(*a, **kw)

    def measured_save(*a, **kw):  # ...to the end of the last step (saving copies weights: not the steps' memory)
        peak["gb"] = memory._peak(args.device) / 2**30
        return save_final(*a, **kw)

    trainer.fit, trainer.save_final = measured_fit, measured_save
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "sft":
            data = [Conversation(id=p.id, messages=[*p.messages, {"role": "assistant", "content": p.chosen}])
                    for p in pairs]
            summary = train_sft(args.model, data, SFTTrainConfig(**settings), f"{tmp}/train", f"{tmp}/final",
                                verbose=False)
        else:
            summary = train_dpo(args.model, pairs, DPOTrainConfig(**settings), f"{tmp}/train", f"{tmp}/final",
                                verbose=False)
    if check:
        return summary["memory_check"]
    return {"peak_gb": peak["gb"], "steps": summary["steps"],
            "device": f"{torch.cuda.get_device_name()}" if cuda else "cpu"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pairs", type=int, default=16, help="UltraFeedback pairs (SFT trains on their chosen answers)")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch-sizes", type=int, nargs=2, default=(2, 8), metavar=("SMALL", "LARGE"),
                    help="micro-batch sizes; the larger is also run with gradient checkpointing")
    ap.add_argument("--random-init", default=None, help="random weights of this SmolLM2 shape (fast_generation.py's "
                    "SHAPES; memory does not depend on weight values), with --model's tokenizer")
    ap.add_argument("--one", nargs=4, metavar=("KIND", "BATCH", "CHECKPOINTING", "CHECK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        kind, batch, checkpointing, check = args.one
        print(json.dumps(one(kind, int(batch), checkpointing == "1", check == "1", args)))
        return
    if args.random_init:  # one folder for every run, as a trained model's would be
        import torch
        from fast_generation import random_model

        from selfalign.models import load_tokenizer

        folder = Path(tempfile.mkdtemp(prefix="memory-check-"))
        model = random_model(args.random_init, args.device, torch.float32)
        model.save_pretrained(folder, safe_serialization=True)
        load_tokenizer(args.model).save_pretrained(folder)
        del model
        args.model = str(folder)
    small, large = args.batch_sizes
    rows = []
    for kind, batch, checkpointing in [(kind, *case) for kind in ("sft", "dpo")
                                       for case in ((small, False), (large, False), (large, True))]:
        got = {}
        for check in (True, False):
            cmd = [sys.executable, __file__, "--device", args.device, "--model", args.model, "--pairs",
                   str(args.pairs), "--max-length", str(args.max_length), "--one", kind, str(batch),
                   str(int(checkpointing)), str(int(check))]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
            got[check] = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append((kind, batch, checkpointing, got[True], got[False]))
        print(f"{kind} batch {batch} checkpointing {checkpointing}: check {got[True]['needed_gb']:.2f} GiB, run "
              f"{got[False]['peak_gb']:.2f} GiB", file=sys.stderr)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    model = f"{args.random_init} shape, random init" if args.random_init else args.model
    print(f"# {model}, {args.pairs} UltraFeedback pairs, max_length {args.max_length}, 1 epoch, "
          f"{args.device} ({rows[0][4]['device']}); {platform.node()}; commit {commit}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print("| objective | batch | gradient checkpointing | steps | check: needed (GiB; AdamW's state in it) | run's "
          "peak, no check (GiB) | needed / run's peak |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for kind, batch, checkpointing, check, run in rows:
        print(f"| {kind} | {batch} | {'on' if checkpointing else 'off'} | {run['steps']} | {check['needed_gb']:.2f} "
              f"({check['optimizer_gb']:.2f}) | {run['peak_gb']:.2f} | {check['needed_gb'] / run['peak_gb']:.2f} |")


if __name__ == "__main__":
    main()
