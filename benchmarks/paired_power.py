"""What pairing by instruction buys when comparing two models' AlpacaEval-style win rates, on the real GPT-4
annotations of six models in shared/data (each judged on all 805 instructions by weighted_alpaca_eval_gpt4_turbo).

    python benchmarks/paired_power.py [--subsets 500] [--size 100]

For each of the 15 model pairs: the difference of their win rates; its paired standard error (`selfalign eval
compare`, the `Δ (paired)` column of a run's table) and the unpaired one (the two rows' errors combined, what reading
two table rows by eye amounts to), on all 805 instructions; then, over seeded subsets of `--size` instructions (the
recipes' evaluation size), how often each test finds the difference (|z| > 1.96).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from selfalign.data.loaders import shared_data_dir
from selfalign.evaluation.compare import paired_difference
from selfalign.evaluation.lc import read_annotations

SIX = ["alpaca-7b", "falcon-7b-instruct", "gemma-7b-it", "Qwen-14B-Chat", "claude-2", "gpt-3.5-turbo-1106"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subsets", type=int, default=500)
    ap.add_argument("--size", type=int, default=100)
    args = ap.parse_args()
    folder = shared_data_dir() / "alpaca_eval" / "annotations"
    wins = {}
    for name in SIX:
        frame = read_annotations(folder / f"{name}.json")
        wins[name] = dict(zip(frame["instruction"], frame["preference"] - 1.0))
    instructions = sorted(set.intersection(*(set(w) for w in wins.values())))
    rng = np.random.default_rng(0)
    subsets = [rng.choice(len(instructions), args.size, replace=False) for _ in range(args.subsets)]
    print(f"{len(instructions)} instructions judged for all six; {args.subsets} seeded subsets of {args.size}\n")
    print(f"| A | B | B - A (805) | paired s.e. | unpaired s.e. | ratio | found at {args.size}: paired | unpaired |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    ratios, found = [], {"paired": 0, "unpaired": 0}
    for i, a in enumerate(SIX):
        for b in SIX[i + 1:]:
            pa = np.array([wins[a][k] for k in instructions]) * 100
            pb = np.array([wins[b][k] for k in instructions]) * 100
            full = paired_difference(folder / f"{a}.json", folder / f"{b}.json")  # the package's own number
            unpaired = math.hypot(pa.std(ddof=1), pb.std(ddof=1)) / math.sqrt(len(pa))
            assert abs(full["difference"] - (pb - pa).mean()) < 1e-9
            hits = {"paired": 0, "unpaired": 0}
            for idx in subsets:
                d = pb[idx] - pa[idx]
                se_p = d.std(ddof=1) / math.sqrt(len(d))
                se_u = math.hypot(pa[idx].std(ddof=1), pb[idx].std(ddof=1)) / math.sqrt(len(d))
                hits["paired"] += abs(d.mean()) > 1.96 * se_p
                hits["unpaired"] += abs(d.mean()) > 1.96 * se_u
            ratios.append(full["standard_error"] / unpaired)
            for k in found:
                found[k] += hits[k]
            print(f"| {a} | {b} | {full['difference']:+.2f} | {full['standard_error']:.2f} | {unpaired:.2f} | "
                  f"{ratios[-1]:.2f} | {100 * hits['paired'] / args.subsets:.0f}% | "
                  f"{100 * hits['unpaired'] / args.subsets:.0f}% |")
    total = 15 * args.subsets
    print(f"\npaired s.e. / unpaired s.e.: median {np.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f});"
          f" differences found at {args.size} instructions: paired {100 * found['paired'] / total:.0f}%, unpaired "
          f"{100 * found['unpaired'] / total:.0f}% of {total} comparisons")


if __name__ == "__main__":
    t = time.time()
    main()
    print(f"({time.time() - t:.1f} s)")
