"""The three baselines (SFT, DPO, ORPO) trained from the embedded model on the same real UltraFeedback pairs, then
scored on the same held-out pairs: did each learn the preference, and what did it cost?

    python benchmarks/baselines_heldout.py [--pairs 64] [--held-out 100] [--out runs/baselines]

Each baseline is its shipped recipe config (configs/<name>.yaml) with the sizes below set by --set, run through
`selfalign run`'s own code into OUT/<name> (resumable: a rerun reuses finished runs). Every final model, and the
starting model, is then scored on the held-out pairs of ultrafeedback_binarized_eval_200 (instructions the training
pairs do not have), encoded as in training:
- DPO accuracy: the share of pairs whose chosen answer gains more summed log-prob over the starting model than the
  rejected one (DPO's implicit reward, beta x log pi/pi_start; the starting model itself scores 0 by definition);
- ORPO accuracy: the share whose chosen answer has the higher mean token log-prob (ORPO's odds are monotone in it);
- chosen NLL: the chosen answers' mean token negative log-likelihood (what SFT minimises).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

from selfalign.config import load_config
from selfalign.data import Conversation, PreferencePair, read_records
from selfalign.models import DEFAULT_MODEL
from selfalign.recipes import config_path, get
from selfalign.training import DPOTrainConfig, ORPOTrainConfig
from selfalign.training.evaluate import orpo_metrics, preference_metrics

BASELINES = ("sft", "dpo", "orpo")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=64, help="training pairs (the first N of the dpo config's file)")
    ap.add_argument("--held-out", type=int, default=100, help="held-out pairs scored")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--out", default="runs/baselines")
    args = ap.parse_args()
    sizes = [f"limit={args.pairs}", f"train.max_length={args.max_length}",
             f"train.max_prompt_length={args.max_length // 2}", "train.save_steps=4"]
    seconds = {}
    for name in BASELINES:
        module = get(name)
        extra = [] if name == "sft" else [f"eval_limit={args.held_out}"]
        config = load_config(module.Config, config_path(name), sizes + extra)
        module.run(config, str(Path(args.out) / name))
        # the train stage's own time, as its manifest recorded it (a rerun reuses finished runs)
        manifest = json.loads((Path(args.out) / name / "manifest.json").read_text())
        seconds[name] = manifest["stages"]["train"]["seconds"]
    pairs = read_records(Path(args.out) / "dpo" / "data" / "eval.jsonl", PreferencePair)
    trained = {[m for m in c.messages if m["role"] == "user"][-1]["content"].strip()
               for c in read_records(Path(args.out) / "sft" / "data" / "sft.jsonl", Conversation)}
    overlap = sum(p.prompt.strip() in trained for p in pairs)
    if overlap:  # dpo and orpo drop held-out pairs that share a training instruction; sft's split is not checked
        raise SystemExit(f"{overlap} held-out pairs share an instruction with sft's training data")
    scoring = dict(max_length=args.max_length, max_prompt_length=args.max_length // 2)
    rows = []
    for label, model in [("start", DEFAULT_MODEL)] + [(n, str(Path(args.out) / n / "final")) for n in BASELINES]:
        dpo = preference_metrics(model, DEFAULT_MODEL, pairs, DPOTrainConfig(**scoring))
        orpo = orpo_metrics(model, pairs, ORPOTrainConfig(**scoring))
        rows.append((label, dpo["rewards/accuracy"], orpo["rewards/accuracy"], orpo["nll"], seconds.get(label)))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"\n{args.pairs} training pairs, {len(pairs)} held-out pairs, max_length {args.max_length}; "
          f"{platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}, commit {commit}\n")
    print("| model | DPO accuracy (vs start) | ORPO accuracy (mean log-prob) | chosen NLL | train s |")
    print("|---|---:|---:|---:|---:|")
    for label, dpo_acc, orpo_acc, nll, took in rows:
        dpo_cell = "n/a" if label == "start" else f"{100 * dpo_acc:.1f}%"  # rewards are 0 against itself
        print(f"| {label} | {dpo_cell} | {100 * orpo_acc:.1f}% | {nll:.4f} | "
              f"{'' if took is None else f'{took:.0f}'} |")


if __name__ == "__main__":
    main()
