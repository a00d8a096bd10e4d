"""Did model B beat model A? A paired comparison of two AlpacaEval-style evaluations on the same instructions.

Two win rates against the reference, each ± its own standard error, overlap even when one model is clearly better:
most of each error is which instructions were drawn, and both models share that draw. Pairing by instruction
removes it (as the papers' "win rate vs the initial model" rows do): for every instruction both evaluations judged,
d = 100 x (p_B - p_A), with p in [0, 1] the judge's preference for the model's answer over the reference (a tie
0.5), and the difference is mean(d) ± sd(d) / sqrt(n). The p-value is the normal approximation to that mean
(n is 100+ in the evaluations selfalign runs). alpaca_eval has no such command; it compares models only through
their separate leaderboard rows.

Both sides must be judged by the same judge against the same reference: otherwise the difference measures the
judges. Unjudged (unparsed) instructions are left out of both sides, as alpaca_eval drops them.
"""

from __future__ import annotations

import math
from pathlib import Path

from selfalign.errors import DataError


def annotations_file(path: str | Path) -> Path:
    """An evaluation's annotations: `path` itself, or `path`/annotations.json for an `eval alpaca --out` folder (or a
    run's `eval/<label>` folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "annotations.json"
        if not path.exists():
            raise DataError("no annotations.json here: give an `eval alpaca --out` folder, a run's eval/<label> "
                            "folder, or an annotations file", path=str(path.parent))
    return path


def _judged(path: Path) -> tuple[dict[str, float], dict]:
    """{instruction: preference for output_2 in [0, 1]} of an annotations file (unjudged rows left out), and who
    made it: {"model", "judge", "reference"}."""
    from selfalign.evaluation.lc import annotation_judge, read_annotations

    frame = read_annotations(path)  # validates instruction, outputs and preference, naming file and line
    who = {"model": _one(frame["generator_2"]), "reference": _one(frame["generator_1"]),
           "judge": str(annotation_judge(path, frame))}  # one judge per file
    wins: dict[str, float] = {}
    for line, instruction, p in zip(frame["line"], frame["instruction"], frame["preference"]):
        if math.isnan(p):
            continue
        if instruction in wins and wins[instruction] != float(p) - 1.0:  # a repeat of the same verdict is one
            raise DataError("instruction judged twice, with different verdicts: pairing needs one verdict per "
                            "instruction", path=str(path), line=line, field="instruction")
        wins[instruction] = float(p) - 1.0
    return wins, who


def _one(values) -> str:
    names = {str(v) for v in values}
    return names.pop() if len(names) == 1 else " / ".join(sorted(names))


def paired_difference(a: str | Path, b: str | Path) -> dict:
    """B's win rate minus A's, paired by instruction (see the module docstring). `a`, `b`: annotations files or
    evaluation folders. Returns difference, standard_error, ci95, z, p_value, n (shared judged instructions),
    b_better / a_better / same (instructions), win_rate_a / win_rate_b on those instructions, and a, b (model,
    judge, reference of each)."""
    path_a, path_b = annotations_file(a), annotations_file(b)
    wins_a, who_a = _judged(path_a)
    wins_b, who_b = _judged(path_b)
    for key, what in (("judge", "judge"), ("reference", "reference model")):
        if who_a[key] != who_b[key]:
            raise DataError(f"judged with {what} {who_b[key]!r}, but {path_a} with {who_a[key]!r}: a paired "
                            f"difference needs the same {what} on both sides (`selfalign eval alpaca --outputs "
                            f"<folder>/model_outputs.json` judges existing answers again)", path=str(path_b))
    shared = [i for i in wins_b if i in wins_a]
    if len(shared) < 2:
        side = next(((p, w) for p, w in ((path_a, wins_a), (path_b, wins_b)) if len(w) < 2), None)
        if side is not None:  # the instructions may well be the same: one side has (almost) no readable verdict
            raise DataError(f"only {len(side[1])} instruction(s) with a verdict (a row whose preference is null has "
                            f"none): a paired difference needs two or more on both sides", path=str(side[0]))
        raise DataError(f"only {len(shared)} judged instruction(s) in common with {path_a}: a paired difference "
                        "needs the same instructions (the same --limit and --seed, or the same --instructions file)",
                        path=str(path_b))
    d = [100.0 * (wins_b[i] - wins_a[i]) for i in shared]
    n = len(d)
    mean = sum(d) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)
    z = mean / se if se > 0 else None  # every difference equal: no spread to test against (JSON has no inf)
    return {
        # clipped to the difference's own range: the normal approximation runs past +-100 on a handful of items
        "difference": mean, "standard_error": se, "ci95": (max(-100.0, mean - 1.96 * se), min(100.0, mean + 1.96 * se)),
        "z": z, "p_value": None if z is None else math.erfc(abs(z) / math.sqrt(2)),
        "n": n, "b_better": sum(x > 0 for x in d), "a_better": sum(x < 0 for x in d), "same": sum(x == 0 for x in d),
        "win_rate_a": 100.0 * sum(wins_a[i] for i in shared) / n,
        "win_rate_b": 100.0 * sum(wins_b[i] for i in shared) / n,
        "only_a": len(wins_a) - n, "only_b": len(wins_b) - n,
        "a": {**who_a, "annotations": str(path_a)}, "b": {**who_b, "annotations": str(path_b)},
    }


def describe(result: dict) -> str:
    """`paired_difference`'s result as the few lines `selfalign eval compare` prints."""
    a, b = result["a"]["model"], result["b"]["model"]
    lo, hi = result["ci95"]
    lines = [f"{b} (B) vs {a} (A): {result['n']} instructions judged for both, judge {result['a']['judge']}, "
             f"reference {result['a']['reference']}",
             f"win rate vs the reference   A {result['win_rate_a']:.2f}   B {result['win_rate_b']:.2f}",
             f"difference B - A            {result['difference']:+.2f} ± {result['standard_error']:.2f} "
             f"(95% CI {lo:+.2f} .. {hi:+.2f}; " + ("every instruction's difference is the same, so no test"
                                                     if result["z"] is None else
                                                     f"z {result['z']:.2f}, p {result['p_value']:.3g}")
             + "; paired by instruction)",
             f"B judged better on {result['b_better']}, worse on {result['a_better']}, the same on {result['same']}"]
    if Path(result["a"]["annotations"]).resolve() == Path(result["b"]["annotations"]).resolve():
        lines.append("A and B are the same evaluation: the difference is 0 by construction")
    if result["only_a"] or result["only_b"]:
        lines.append(f"left out: {result['only_a']} instruction(s) judged only for A, {result['only_b']} only for B")
    return "\n".join(lines)
