"""`selfalign eval agreement`: how often a judge agrees with GPT-4 (or human) labels on real annotated pairs.

Input formats (a JSON array or JSONL; the kind is detected per row):

- alpaca_eval annotations: `instruction`, `output_1`, `output_2`, `preference` in [1, 2] (1 = output_1 better;
  a number or a numeric string), e.g. `alpaca_eval/balanced_pairs_dev.json` or `annotations/<model>.json`;
- LLMBar / MT-Bench human pairs: `instruction`, `output_1`, `output_2`, `label` 1 | 2.

Scoring. GPT-4's side is the sign of preference - 1.5; **ties (preference exactly 1.5) are excluded** and counted
in `n_ties_excluded`. The judge's side is the sign of p_a - 0.5, where p_a is its probability that output_1 is
better (both orders combined where the judge judges both); a judge's own tie (p_a = 0.5, which is also what an
unparseable verdict gives) earns half a point: it is counted, never dropped, and unparseable verdicts are
reported in `n_unparsed`. `agreement` is the mean point, `standard_error` its binomial standard error
(sample std / sqrt(n)). On the same items the length rule ("longer output wins") is scored too, with
`gold_first_rate` (how often GPT-4 prefers output_1: on balanced_pairs_dev.json output_1 is always the GPT-4-Turbo
baseline, which GPT-4-Turbo prefers ~76% of the time) as the other reference point: an order-debiased judge
cannot get it from position, only from content.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from selfalign.data.io import iter_json_rows, write_jsonl
from selfalign.errors import DataError, SelfalignError
from selfalign.judges.base import PairwiseItem, PairwiseVerdict


@dataclass
class LabeledPair:
    item: PairwiseItem
    gold: float  # alpaca_eval convention: 1 = output_1 better, 2 = output_2 better, 1.5 = tie
    line: int
    meta: dict = field(default_factory=dict)


def _gold(row: dict) -> float:
    if row.get("preference") is not None:
        value = row["preference"]
        name = "preference"
    elif row.get("label") is not None:
        value = row["label"]
        name = "label"
    else:
        raise DataError("needs 'preference' (alpaca_eval, in [1, 2]) or 'label' (1 or 2)", field="preference")
    if isinstance(value, bool):
        raise DataError(f"expected a number, got {value!r}", field=name)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise DataError(f"expected a number, got {value!r}", field=name) from None
    if name == "label" and value not in (1.0, 2.0):
        raise DataError(f"expected 1 or 2, got {value:g}", field=name)
    if not 1.0 <= value <= 2.0 or math.isnan(value):
        raise DataError(f"expected a value in [1, 2], got {value:g}", field=name)
    return value


def load_labeled_pairs(path: str | Path, limit: int | None = None, offset: int = 0) -> list[LabeledPair]:
    """Rows `offset` .. `offset + limit - 1` of an annotated pair file (ties included; scoring excludes them)."""
    out = []
    for i, (line, row) in enumerate(iter_json_rows(path)):
        if i < offset:
            continue
        if limit is not None and len(out) >= limit:
            break
        try:
            for key in ("instruction", "output_1", "output_2"):
                if not isinstance(row.get(key), str):
                    raise DataError("missing or not a string", field=key)
            if not row["instruction"].strip():
                raise DataError("must not be empty", field="instruction")
            gold = _gold(row)
        except DataError as e:
            raise DataError(e.reason, path=str(path), line=line, field=e.field) from None
        messages = [{"role": "user", "content": row["instruction"]}]
        meta = {k: row[k] for k in ("id", "dataset", "subset", "generator_1", "generator_2", "model_1", "model_2")
                if k in row}
        out.append(LabeledPair(PairwiseItem(messages, row["output_1"], row["output_2"]), gold, line, meta))
    if not out:
        raise DataError(f"no pairs (offset {offset}, limit {limit})", path=str(path))
    return out


def _credit(p_a: float, gold: float) -> float:
    """1 when the judge picks GPT-4's side, 0 when the other, 0.5 for a judge tie."""
    if p_a == 0.5:
        return 0.5
    return 1.0 if (p_a > 0.5) == (gold < 1.5) else 0.0


def _mean_se(points: list[float]) -> tuple[float | None, float | None]:
    n = len(points)
    if not n:
        return None, None
    mean = sum(points) / n
    if n < 2:
        return mean, None
    var = sum((x - mean) ** 2 for x in points) / (n - 1)
    return mean, math.sqrt(var / n)


def agreement_metrics(pairs: list[LabeledPair], verdicts: list[PairwiseVerdict]) -> dict:
    """Agreement of `verdicts` with the pairs' labels, and the length rule's on the same (non-tie) items."""
    scored = [(p, v) for p, v in zip(pairs, verdicts) if p.gold != 1.5]
    points = [_credit(v.p_a, p.gold) for p, v in scored]
    soft = [v.p_a if p.gold < 1.5 else 1.0 - v.p_a for p, v in scored]
    lengths = []
    longer_picked = []
    for p, v in scored:
        la, lb = len(p.item.answer_a), len(p.item.answer_b)
        lengths.append(_credit(1.0 if la > lb else 0.0 if la < lb else 0.5, p.gold))
        if la != lb and v.p_a != 0.5:
            longer_picked.append(1.0 if (v.p_a > 0.5) == (la > lb) else 0.0)
    agreement, se = _mean_se(points)
    length_agreement, length_se = _mean_se(lengths)
    consistency = [v.consistent for _, v in scored if v.consistent is not None]
    n = len(scored)
    return {
        "n": n,
        "n_ties_excluded": len(pairs) - n,
        "ties": "excluded",
        "agreement": agreement,
        "standard_error": se,
        "soft_agreement": sum(soft) / n if n else None,
        "position_consistency": (sum(consistency) / len(consistency)) if consistency else None,
        "n_consistency": len(consistency),
        "n_unparsed": sum(1 for _, v in scored if not v.parsed),
        "n_judge_ties": sum(1 for _, v in scored if v.p_a == 0.5),
        "n_truncated": sum(1 for _, v in scored if v.details.get("truncated")),
        "prefers_longer": (sum(longer_picked) / len(longer_picked)) if longer_picked else None,
        "gold_first_rate": (sum(1 for p, _ in scored if p.gold < 1.5) / n) if n else None,
        "length_rule": {"agreement": length_agreement, "standard_error": length_se},
    }


def run_agreement(judge, pairs: list[LabeledPair], progress: bool = True) -> tuple[dict, list[PairwiseVerdict]]:
    """Judge every pair (through the judge's cache, if it has one) and score the verdicts."""
    hits0 = getattr(judge, "cache_hits", 0)
    judged0 = getattr(judge, "judged", None)
    t0, c0 = time.perf_counter(), time.process_time()
    verdicts = judge.compare([p.item for p in pairs], progress=progress)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    if len(verdicts) != len(pairs):
        raise SelfalignError(f"judge '{judge.name}' returned {len(verdicts)} verdicts for {len(pairs)} pairs")
    metrics = agreement_metrics(pairs, verdicts)
    judged = (getattr(judge, "judged") - judged0) if judged0 is not None else len(pairs)
    metrics.update({
        "judge": judge.name,
        "judge_id": getattr(judge, "id", None),
        "judge_config": judge.config(),
        "n_judged": judged,
        "n_cached": getattr(judge, "cache_hits", 0) - hits0,
        "seconds": round(seconds, 3),
        "seconds_per_judgement": round(seconds / judged, 3) if judged else None,
        # CPU time (all threads of this process), which a busy shared machine does not inflate the way it does
        # wall time; includes loading the judge model
        "cpu_seconds": round(cpu, 3),
        "cpu_seconds_per_judgement": round(cpu / judged, 3) if judged else None,
    })
    return metrics, verdicts


# ------------------------------------------------------------------------------------------------ CLI
def _parse_options(pairs: list[str]) -> dict:
    out = {}
    for kv in pairs:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            # --set is --judge-option's alias: named as `eval alpaca` and `eval mtbench` name it
            raise SelfalignError(f"--judge-option {kv}: expected key=value (e.g. --judge-option prompt=pair_v2)")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


def add_agreement_command(eval_sub) -> None:
    p = eval_sub.add_parser(
        "agreement", help="agreement of a judge with GPT-4 (or human) labels on annotated pairs",
        description="Run a judge (length, local, reward, reward-crossfit, api) over annotated pairs (alpaca_eval "
        "annotations: "
        "instruction, output_1, output_2, preference in [1, 2]; or LLMBar / MT-Bench human pairs with label 1|2) "
        "and report its agreement with the labels, its standard error, its position consistency, and the length "
        "rule's agreement on the same items. Ties (preference 1.5) are excluded; a judge's own tie or unparseable "
        "verdict counts half. Verdicts are cached (JSONL), so a rerun or a resumed run pays only for new items. "
        "The honest test is alpaca_eval/balanced_pairs_dev.json, where the length rule scores 50%.")
    p.add_argument("--judge", required=True, help="length, local, reward, reward-crossfit or api")
    p.add_argument("--pairs", required=True, help="annotated pairs (.json array or .jsonl)")
    p.add_argument("--limit", type=int, default=None, help="judge only N pairs")
    p.add_argument("--offset", type=int, default=0, help="skip the first N pairs (default %(default)s)")
    p.add_argument("--model", default=None, help="judge model (local: model spec; reward: trained folder; "
                   "reward-crossfit: the folder of fold models; api: served model name)")
    p.add_argument("--base-url", default=None, help="api judge: OpenAI-compatible endpoint, e.g. "
                   "http://127.0.0.1:8000/v1")
    p.add_argument("--judge-option", "--set", dest="set", action="append", default=[], metavar="KEY=VALUE",
                   help="judge option, as `eval alpaca` takes it, e.g. --judge-option prompt=pair_v2 --judge-option "
                   "max_answer_tokens=384 (repeatable; --set is the same)")
    p.add_argument("--cache", default=None, help="judgement cache JSONL (default: ~/.cache/selfalign/judgements/"
                   "<judge>-<config hash>.jsonl)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write a judgement cache")
    p.add_argument("--out", default=None, help="write one JSON line per pair (label, verdict) here")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_agreement)


def _check_replaceable(path: Path) -> None:
    """--out is rewritten whole: refuse a file that is not an earlier --out of this command (an annotations.json
    given by mistake would be lost)."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb") as f:
        first = f.readline(1 << 20)
    try:
        row = json.loads(first)
    except ValueError:
        row = None
    if not (isinstance(row, dict) and {"line", "gold", "p_a"} <= set(row)):
        raise SelfalignError(f"--out {path}: holds something other than this command's verdicts; nothing was "
                             "changed: give a new file (or remove it)")


def cmd_agreement(args) -> int:
    from selfalign.judges import check_judge, make_judge

    if args.limit is not None and args.limit < 1:
        raise SelfalignError("--limit must be at least 1")
    if args.offset < 0:
        raise SelfalignError("--offset must be >= 0")
    options = _parse_options(args.set)
    if args.model is not None:  # reward-crossfit's models are a folder of folds, its option `models`
        options["models" if args.judge == "reward-crossfit" else "model"] = args.model
    if args.base_url is not None:
        options["base_url"] = args.base_url
    for flag in ("out", "cache"):  # files: a folder given by mistake is said now, not after all the judging
        path = getattr(args, flag)
        if path is not None and Path(path).is_dir():
            raise SelfalignError(f"--{flag} {path}: is a folder; give a file path")
    if args.out is not None:
        _check_replaceable(Path(args.out))
    pairs = load_labeled_pairs(args.pairs, args.limit, args.offset)
    check_judge(args.judge, options, endpoint="warn")  # its verdicts may all be cached
    judge = make_judge(args.judge, cache=False if args.no_cache else (args.cache or True), **options)
    metrics, verdicts = run_agreement(judge, pairs, progress=not args.quiet and not args.json)
    metrics.update({"pairs": str(args.pairs), "offset": args.offset})
    if args.out:
        # a JSON array's pairs are also numbered: several pairs of a compact array start on one line
        write_jsonl(args.out, [{"line": int(p.line), **({"record": p.line.record} if hasattr(p.line, "record") else {}),
                                "gold": p.gold, **p.meta, "p_a": v.p_a, "consistent": v.consistent,
                                "parsed": v.parsed, "details": v.details} for p, v in zip(pairs, verdicts)])
    if args.json:
        print(json.dumps(metrics))
        return 0
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    se = lambda x: "" if x is None else f" ± {100 * x:.1f}"  # noqa: E731
    print(f"judge                 {metrics['judge']} ({metrics['judge_id'] or 'uncached'})")
    print(f"pairs                 {args.pairs} [{args.offset}:{args.offset + len(pairs)}]: n = {metrics['n']} "
          f"({metrics['n_ties_excluded']} ties excluded)")
    print(f"agreement             {pct(metrics['agreement'])}{se(metrics['standard_error'])}  "
          f"(soft {pct(metrics['soft_agreement'])})")
    print(f"length rule           {pct(metrics['length_rule']['agreement'])}"
          f"{se(metrics['length_rule']['standard_error'])}")
    print(f"position consistency  {pct(metrics['position_consistency'])} of {metrics['n_consistency']}")
    print(f"prefers longer        {pct(metrics['prefers_longer'])}; labels prefer output_1 "
          f"{pct(metrics['gold_first_rate'])}")
    print(f"unparsed / ties       {metrics['n_unparsed']} / {metrics['n_judge_ties']}; truncated "
          f"{metrics['n_truncated']}")
    spj = metrics["seconds_per_judgement"]
    cpj = metrics["cpu_seconds_per_judgement"]
    print(f"time                  {metrics['seconds']:.1f} s wall, {metrics['cpu_seconds']:.1f} s CPU; "
          f"{metrics['n_judged']} judged ({'n/a' if spj is None else f'{spj:.2f} s'} wall, "
          f"{'n/a' if cpj is None else f'{cpj:.2f} s'} CPU each), {metrics['n_cached']} from cache")
    return 0
