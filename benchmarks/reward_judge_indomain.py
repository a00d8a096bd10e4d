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

Each fold's model is saved under <out-dir>/fold<k>/ (a finished fold is not retrained) and is usable as a judge:
`--judge reward --judge-option model=<out-dir>/fold<k>`; all folds together, each instruction judged by the
model that never trained on it: `--judge reward-crossfit --judge-option models=<out-dir>`. Prints one markdown row per fold and the pooled agreement.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from selfalign.judges.reward import CONFIG_FILE, instruction_fold, train_reward_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", required=True, help="alpaca_eval annotations (default use: balanced_pairs_dev.json)")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--fold", type=int, action="append", default=None, help="held-out fold(s) to run (default all)")
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--train-layers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    rows = json.loads(Path(args.pairs).read_text(encoding="utf-8"))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folds = args.fold if args.fold is not None else list(range(args.folds))
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}  {' '.join(sys.argv)}")
    print("| held-out fold | train pairs | held-out pairs | agreement ± SE | length rule | train accuracy | minutes |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    pooled = []
    for k in folds:
        held = [r for r in rows if instruction_fold(r["instruction"], args.folds) == k]
        train = [r for r in rows if instruction_fold(r["instruction"], args.folds) != k]
        train_file, held_file = out_dir / f"fold{k}_train.json", out_dir / f"fold{k}_heldout.json"
        train_file.write_text(json.dumps(train, ensure_ascii=False))
        held_file.write_text(json.dumps(held, ensure_ascii=False))
        model_dir = out_dir / f"fold{k}"
        if (model_dir / CONFIG_FILE).exists():
            cfg = json.loads((model_dir / CONFIG_FILE).read_text())
        else:
            cfg = train_reward_model(model_dir, train_data=train_file, eval_data=held_file, n_pairs=0, n_eval=None,
                                     max_length=args.max_length, train_layers=args.train_layers, epochs=args.epochs,
                                     seed=args.seed, allow_eval_instructions=True)
        last = cfg["history"][-1]
        n = cfg["eval_data"]["n_pairs"]
        acc = last["heldout_accuracy"]
        se = math.sqrt(acc * (1 - acc) / n)
        longer = sum(1 for r in held
                     if (r["preference"] < 1.5) == (len(r["output_1"]) > len(r["output_2"]))) / len(held)
        pooled += [acc] * n
        print(f"| {k} of {args.folds} | {cfg['train_data']['n_pairs']} | {n} | {100 * acc:.1f}% ± {100 * se:.1f} | "
              f"{100 * longer:.1f}% | {100 * last['train_accuracy']:.1f}% | {cfg['seconds']['total'] / 60:.1f} |")
    if len(folds) > 1:
        acc = sum(pooled) / len(pooled)
        print(f"\npooled over {len(folds)} held-out folds: {100 * acc:.1f}% ± "
              f"{100 * math.sqrt(acc * (1 - acc) / len(pooled)):.1f} (n = {len(pooled)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
