"""A reward judge trained on GPT-4's own AlpacaEval preferences, its agreement measured on instructions it never saw.

    python benchmarks/reward_judge_indomain.py --pairs $DATA/alpaca_eval/balanced_pairs_dev.json \
        --out-dir /tmp/reward_indomain [--fold 0] [--folds 2]

The UltraFeedback-trained reward judge agrees with GPT-4 on 56% of the balanced pairs: it learned UltraFeedback's
taste, not GPT-4-Turbo's. Here the judge learns from GPT-4-Turbo's AlpacaEval annotations themselves. The pairs are
split into `--folds` groups by instruction (a hash of the normalised instruction, so every answer pair of one
instruction lands in the same fold); for fold k a reward model is trained on all the other folds and its held-out
accuracy on fold k is its agreement with GPT-4 there (a reward judge scores each answer once, so it has no ties and
no position effect: accuracy == agreement). Training on the balanced pairs matters: there GPT-4's preferred answer is
the shorter one exactly as often as the longer one, so the judge cannot learn "longer wins".

The training is the package's `selfalign judges train-crossfit` (`train_crossfit_reward_models`: frozen-layer features
computed once for all pairs, then one top-layer fit per fold); this script adds the length rule per fold and prints
the table RESULTS.md quotes. Each fold's model is saved under <out-dir>/fold<k>/ (a finished fold is not retrained)
and the folder is the `reward-crossfit` judge: `--judge reward-crossfit --judge-option models=<out-dir>`.
(Until Dec 3 2026, stop 13, this script trained each fold separately with `train_reward_model`, recomputing the
frozen features per fold; the 61.8% in RESULTS came from that version, commit 63f8e1d.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from selfalign.judges.reward import instruction_fold, train_crossfit_reward_models

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", required=True, help="alpaca_eval annotations (default use: balanced_pairs_dev.json)")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--train-layers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    summary = train_crossfit_reward_models(args.out_dir, pairs=args.pairs, folds=args.folds,
                                           max_length=args.max_length, train_layers=args.train_layers,
                                           epochs=args.epochs, seed=args.seed)
    rows = json.loads(Path(args.pairs).read_text(encoding="utf-8"))
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}  {' '.join(sys.argv)}")
    print("| held-out fold | train pairs | held-out pairs | agreement ± SE | length rule | train accuracy | training min |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for fold in summary["folds"]:
        k, n, acc = fold["fold"], fold["heldout_pairs"], fold["agreement"]
        held = [r for r in rows if instruction_fold(r["instruction"], args.folds) == k and r["preference"] != 1.5]
        longer = sum(1 for r in held
                     if (r["preference"] < 1.5) == (len(r["output_1"]) > len(r["output_2"]))) / len(held)
        print(f"| {k} of {args.folds} | {fold['train_pairs']} | {n} | {100 * acc:.1f}% ± "
              f"{100 * (acc * (1 - acc) / n) ** 0.5:.1f} | {100 * longer:.1f}% | {100 * fold['train_accuracy']:.1f}% | "
              f"{fold['seconds']['training'] / 60:.1f} |")
    print(f"\npooled over {args.folds} held-out folds: {100 * summary['pooled_agreement']:.1f}% ± "
          f"{100 * summary['pooled_standard_error']:.1f} (n = {summary['n']}), {summary['seconds'] / 60:.1f} min in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
