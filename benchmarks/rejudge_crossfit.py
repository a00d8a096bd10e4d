"""Re-judge saved AlpacaEval-style evaluations with the in-domain reward judges, each instruction by a judge that
never trained on it.

    python benchmarks/rejudge_crossfit.py --models /tmp/reward_indomain --out-dir /tmp/rejudge \
        runs/spa-evidence/eval/initial runs/spa-evidence/eval/round0 ...

The judges come from benchmarks/reward_judge_indomain.py: <models>/fold<k> was trained on GPT-4's preferences for
every instruction outside fold k. Those preferences compare other models' answers with the same GPT-4-Turbo
reference outputs the evaluation uses, so a judge may have learned something about a reference answer itself; an
instruction in fold k is therefore judged only by fold<k>'s model: the package judge `reward-crossfit` does that
routing, so for one folder this equals `selfalign eval alpaca --outputs DIR/model_outputs.json --judge reward-crossfit
--judge-option models=MODELS`. Each evaluation folder must hold alpaca_eval's model_outputs.json (every selfalign
evaluation writes one). Per folder: annotations.json and metrics.json in <out-dir>/<run>-<stage>/, and one markdown
row; `--paired A=B` adds the paired difference of two
labels over their common instructions (win-rate points ± paired standard error).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path


def label_of(eval_dir: Path) -> str:
    run = eval_dir.parent.parent.name if eval_dir.parent.name == "eval" else eval_dir.parent.name
    return f"{run}-{eval_dir.name}"


def main(argv: list[str] | None = None) -> int:
    from selfalign.evaluation.alpaca import evaluate_outputs, load_model_outputs
    from selfalign.judges import make_judge

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("eval_dirs", nargs="+", type=Path)
    ap.add_argument("--models", required=True, type=Path, help="folder with fold0/, fold1/, ... reward judges")
    ap.add_argument("--out-dir", required=True, type=Path)
    ap.add_argument("--paired", action="append", default=[], metavar="A=B", help="labels to difference")
    args = ap.parse_args(argv)

    judge = make_judge("reward-crossfit", models=str(args.models), cache=str(args.out_dir / "judge_cache.jsonl"))
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}  {' '.join(sys.argv)}")
    print("| evaluation | win rate | s.e. | LC win rate | n | avg length |")
    print("|---|---:|---:|---:|---:|---:|")
    prefs: dict[str, dict[str, float]] = {}
    for eval_dir in args.eval_dirs:
        label = label_of(eval_dir)
        outputs = load_model_outputs(eval_dir / "model_outputs.json")
        m = evaluate_outputs(outputs, judge, args.out_dir / label, progress=False)
        rows = json.loads((args.out_dir / label / "annotations.json").read_text())
        prefs[label] = {r["instruction"]: r["preference"] for r in rows}
        lc = m.get("length_controlled_winrate")
        print(f"| {label} | {m['win_rate']:.2f} | {m['standard_error']:.2f} | "
              f"{'n/a' if lc is None else f'{lc:.2f}'} | {m['n_total']} | {m['avg_length']} |")
    for spec in args.paired:
        a, _, b = spec.partition("=")
        common = [i for i in prefs[a] if i in prefs[b]]
        diffs = [100 * (prefs[a][i] - prefs[b][i]) for i in common]
        mean = sum(diffs) / len(diffs)
        se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
        print(f"\npaired {a} - {b}: {mean:+.2f} ± {se:.2f} (n = {len(common)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
