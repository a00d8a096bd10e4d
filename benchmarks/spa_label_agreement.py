"""SPA self-labelling accuracy: how often the implicit-reward label of a round agrees with a reference judge.

    python benchmarks/spa_label_agreement.py runs/spa-evidence --judge reward --judge length

For every round{i}/labels.jsonl of an SPA run (pairs already ordered chosen > rejected by the implicit reward
log pi_prev(y|x) - log pi_init(y|x)), the judge compares the same two answers; agreement is the share of pairs where
the judge also prefers the chosen one (p > 0.5; ties count half). Also reported: agreement on the most and least
confident halves (confidence = the implicit-reward margin the labeller recorded), and how often the chosen answer is
the longer one (the implicit reward of a DPO model is known to favour length).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from selfalign.data.io import read_records
from selfalign.data.records import PreferencePair
from selfalign.judges import PairwiseItem, make_judge


def confidence(pair: PreferencePair) -> float:
    meta = pair.meta or {}
    for key in ("confidence", "margin", "reward_margin"):
        if key in meta and meta[key] is not None:
            return float(meta[key])
    return 0.0


def agreement(p_chosen: list[float]) -> tuple[float, float]:
    hits = [1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0 for p in p_chosen]
    mean = sum(hits) / len(hits)
    return mean, math.sqrt(mean * (1 - mean) / len(hits)) if len(hits) > 1 else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--judge", action="append", default=[],
                    help="judge name, optionally with options: reward:model=DIR (repeatable; default reward)")
    args = ap.parse_args()
    rounds = sorted(Path(args.run_dir).glob("round*/labels.jsonl"))
    if not rounds:
        print(f"{args.run_dir}: no round*/labels.jsonl", file=sys.stderr)
        return 2
    print("| round | judge | pairs | agreement ± SE | most confident half | least confident half | chosen is longer |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in args.judge or ["reward"]:
        base, _, rest = name.partition(":")
        judge = make_judge(base, **dict(kv.split("=", 1) for kv in rest.split(",") if kv))
        for path in rounds:
            pairs = read_records(path, PreferencePair)
            verdicts = judge.compare([PairwiseItem(p.messages, p.chosen, p.rejected) for p in pairs])
            p_chosen = [v.p_a for v in verdicts]
            order = sorted(range(len(pairs)), key=lambda k: -confidence(pairs[k]))
            half = len(order) // 2
            top, _ = agreement([p_chosen[k] for k in order[:half]]) if half else (float("nan"), 0)
            low, _ = agreement([p_chosen[k] for k in order[half:]])
            mean, se = agreement(p_chosen)
            longer = sum(len(p.chosen) > len(p.rejected) for p in pairs) / len(pairs)
            print(f"| {path.parent.name} | {name} | {len(pairs)} | {100 * mean:.1f} ± {100 * se:.1f} | "
                  f"{100 * top:.1f} | {100 * low:.1f} | {100 * longer:.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
