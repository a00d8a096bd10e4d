"""Does a judge rank models as GPT-4 does? System-level agreement on real AlpacaEval answers.

    python benchmarks/judge_system_level.py --judge reward-crossfit --limit 100 --out-dir /tmp/system_level \
        $DATA/alpaca_eval/annotations/*.json

Pair-level agreement (`selfalign eval agreement`) says how often a judge picks GPT-4's side of one comparison. An
evaluation's user cares about the next level: does the judge's win rate order models as GPT-4-Turbo's does, and how
far are its absolute numbers from GPT-4's? For each alpaca_eval annotation file (real answers of a real model, with
GPT-4-Turbo's verdicts against the GPT-4-Turbo reference), this takes the same seeded instruction subset
`selfalign eval alpaca --limit N` uses, judges the model's answers against the references with the judge (through
`evaluate_outputs`, the code `selfalign eval alpaca --outputs` runs), and puts its win rate beside GPT-4's on the very
same items (mean of preference - 1, as alpaca_eval computes it). The judge's win rate is alpaca_eval's too: the mean of its
soft preferences, so a judge whose probabilities hug 0.5 pulls every model toward 50; the discrete win rate counts
only which side it picks. Prints one row per model and the rank correlation.
Judgements are cached per model under --out-dir, so a rerun only prints.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):  # average ranks over ties
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else float("nan")


def main(argv: list[str] | None = None) -> int:
    from selfalign.config import parse_override
    from selfalign.data.loaders import load_alpaca_eval_set, load_reference_outputs
    from selfalign.evaluation.alpaca import evaluate_outputs
    from selfalign.judges import make_judge

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("annotations", nargs="+", help="alpaca_eval annotation files, one per model")
    ap.add_argument("--judge", default="reward-crossfit")
    ap.add_argument("--judge-option", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--limit", type=int, default=100, help="seeded instruction subset, as `eval alpaca --limit`")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", required=True)
    args = ap.parse_args(argv)

    options = {}
    for text in args.judge_option:
        keys, value = parse_override(text)
        options[".".join(keys)] = value
    out_dir = Path(args.out_dir)
    judge = make_judge(args.judge, cache=str(out_dir / f"judge_cache.{args.judge}.jsonl"), **options)
    subset = {p.messages[-1]["content"] for p in load_alpaca_eval_set(None, limit=args.limit, seed=args.seed)}
    references = load_reference_outputs()
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {' '.join(sys.argv)}")
    print(f"| model | n | GPT-4-Turbo win rate (same items) | {args.judge} win rate ± s.e. | judge − GPT-4 | "
          "judge discrete win rate | judge LC win rate | avg length |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    gpt4, ours, discrete = [], [], []
    for path in args.annotations:
        rows = [r for r in json.loads(Path(path).read_text(encoding="utf-8")) if r["instruction"] in subset]
        model = rows[0]["generator_2"]
        outputs = [{"instruction": r["instruction"], "output": r["output_2"], "generator": model} for r in rows]
        t0 = time.time()
        m = evaluate_outputs(outputs, judge, out_dir / model, references, progress=False)
        g = 100 * sum(r["preference"] - 1 for r in rows) / len(rows)
        gpt4.append(g)
        ours.append(m["win_rate"])
        discrete.append(m["discrete_win_rate"])
        lc = m.get("length_controlled_winrate")
        print(f"| {model} | {len(rows)} | {g:.1f} | {m['win_rate']:.1f} ± {m['standard_error']:.1f} | "
              f"{m['win_rate'] - g:+.1f} | {m['discrete_win_rate']:.1f} | {'n/a' if lc is None else f'{lc:.1f}'} | {m['avg_length']} |",
              flush=True)
        print(f"  ({time.time() - t0:.0f} s)", file=sys.stderr)
    if len(gpt4) > 2:
        print(f"\nSpearman rank correlation with GPT-4-Turbo's win rates over {len(gpt4)} models: "
              f"{spearman(gpt4, ours):.2f} (win rate), {spearman(gpt4, discrete):.2f} (discrete win rate)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
