"""Paired win-rate differences between evaluations of the same instructions (same judge, same references).

    python benchmarks/paired_winrate.py runs/spa-evidence/eval round0=initial round1=round0

Each `A=B` names two evaluation folders under the first argument (each with alpaca_eval's annotations.json); prints
the mean per-instruction difference of the preferences (A - B), in win-rate points, with its paired standard error.
The package does the computation (`selfalign eval compare B A` prints the same difference with its CI and p-value;
a run's eval/summary.md has it against the first row); this script keeps RESULTS.md's earlier commands working.
"""

from __future__ import annotations

import sys
from pathlib import Path

from selfalign.evaluation.compare import paired_difference


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    root = Path(argv[0])
    for spec in argv[1:]:
        a, _, b = spec.partition("=")
        result = paired_difference(root / b, root / a)  # A's win rate minus B's
        print(f"{a} - {b}: {result['difference']:+.2f} ± {result['standard_error']:.2f} (n = {result['n']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
