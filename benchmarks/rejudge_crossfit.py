"""Re-judge saved AlpacaEval-style evaluations with the in-domain reward judges, each instruction by a judge that
never trained on it.

    python benchmarks/rejudge_crossfit.py --models /tmp/reward_indomain --out-dir /tmp/rejudge \
        runs/spa-evidence/eval/initial runs/spa-evidence/eval/round0 ...

The judges come from benchmarks/reward_judge_indomain.py: <models>/fold<k> was trained on GPT-4's preferences for
every instruction outside fold k. Those preferences compare other models' answers with the same GPT-4-Turbo
reference outputs the evaluation uses, so a judge may have learned something about a reference answer itself; an
instruction in fold k is therefore judged only by fold<k>'s model (cross-fitting). Each evaluation folder must hold
alpaca_eval's model_outputs.json (every selfalign evaluation writes one). Per folder: the merged annotations.json and
metrics.json in <out-dir>/<run>-<stage>/, and one markdown row; `--paired A=B` adds the paired difference of two
labels over their common instructions (win-rate points ± paired standard error).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reward_judge_indomain import fold_of  # noqa: E402  (the same instruction folds the judges were trained on)


def label_of(eval_dir: Path) -> str:
    run = eval_dir.parent.parent.name if eval_dir.parent.name == "eval" else eval_dir.parent.name
    return f"{run}-{eval_dir.name}"


def main(argv: list[str] | None = None) -> int:
    from selfalign.data.io import write_json
    from selfalign.evaluation.alpaca import evaluate_outputs, load_model_outputs
    from selfalign.evaluation.lc import evaluate_annotations
    from selfalign.judges import make_judge

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("eval_dirs", nargs="+", type=Path)
    ap.add_argument("--models", required=True, type=Path, help="folder with fold0/, fold1/, ... reward judges")
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--out-dir", required=True, type=Path)
    ap.add_argument("--paired", action="append", default=[], metavar="A=B", help="labels to difference")
    args = ap.parse_args(argv)

    judges = [make_judge("reward", model=str(args.models / f"fold{k}"),
                         cache=str(args.out_dir / f"judge_cache.fold{k}.jsonl")) for k in range(args.folds)]
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}  {' '.join(sys.argv)}")
    print("| evaluation | win rate | s.e. | LC win rate | n | avg length |")
    print("|---|---:|---:|---:|---:|---:|")
    prefs: dict[str, dict[str, float]] = {}
    for eval_dir in args.eval_dirs:
        label = label_of(eval_dir)
        outputs = load_model_outputs(eval_dir / "model_outputs.json")
        out = args.out_dir / label
        merged: dict[str, dict] = {}
        for k, judge in enumerate(judges):
            part = [o for o in outputs if fold_of(o["instruction"], args.folds) == k]
            if part:
                evaluate_outputs(part, judge, out / f"fold{k}", progress=False)
                for row in json.loads((out / f"fold{k}" / "annotations.json").read_text()):
                    merged[row["instruction"]] = row
        rows = [merged[o["instruction"]] for o in outputs]
        write_json(out / "annotations.json", rows)
        m = evaluate_annotations(out / "annotations.json")
        write_json(out / "metrics.json", m)
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
