"""Paired win-rate differences between evaluations of the same instructions (same judge, same references).

    python benchmarks/paired_winrate.py runs/spa-evidence/eval round0=initial round1=round0

Each `A=B` names two evaluation folders under the first argument (each with alpaca_eval's annotations.json); prints
the mean per-instruction difference of the preferences, in win-rate points, with its paired standard error.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def preferences(folder: Path) -> dict[str, float]:
    return {r["instruction"]: r["preference"] for r in json.loads((folder / "annotations.json").read_text())}


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    root = Path(argv[0])
    for spec in argv[1:]:
        a, _, b = spec.partition("=")
        pa, pb = preferences(root / a), preferences(root / b)
        # an unreadable verdict has no preference (null): the instruction leaves the comparison for both
        diffs = [100 * (pa[i] - pb[i]) for i in pa if pb.get(i) is not None and pa[i] is not None]
        mean = sum(diffs) / len(diffs)
        se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
        print(f"{a} - {b}: {mean:+.2f} ± {se:.2f} (n = {len(diffs)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
