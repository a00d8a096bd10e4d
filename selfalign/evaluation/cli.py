"""`selfalign eval ...`: evaluation commands.

`register(subparsers)` adds the `eval` command and its own sub-commands. Each sub-command has one `_add_<name>`
function that builds its parser and points it at its `cmd_<name>` handler; to add one (alpaca, mtbench, agreement),
write those two functions and add a line to `register`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from selfalign.errors import SelfalignError


def register(subparsers) -> argparse._SubParsersAction:
    p = subparsers.add_parser("eval", help="evaluate models and judges offline (AlpacaEval LC win rate, ...)",
                              description="Offline evaluation commands.")
    eval_sub = p.add_subparsers(dest="eval_command", required=True, metavar="EVAL_COMMAND")
    _add_lc(eval_sub)
    _add_alpaca(eval_sub)
    _add_mtbench(eval_sub)
    _add_compare(eval_sub)
    from selfalign.evaluation.agreement import add_agreement_command

    add_agreement_command(eval_sub)
    return eval_sub


# ------------------------------------------------------------------------------------------------ eval lc
def _add_lc(eval_sub) -> None:
    p = eval_sub.add_parser(
        "lc", help="AlpacaEval 2.0 win rate and length-controlled win rate of an annotations file",
        description="Win rate, its standard error and the length-controlled (LC) win rate of one model's "
        "alpaca_eval annotations (JSON array or JSONL of records with instruction, output_1 = baseline, output_2 = "
        "model, preference in [1, 2]). Offline: the per-instruction difficulty ships with selfalign. Instructions "
        "are matched to AlpacaEval by their text, so any order or subset works (LC needs at least 10).")
    p.add_argument("--annotations", required=True, help="annotations file (.json or .jsonl)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--glm", choices=["v1_surrogate", "noreg", "v1"], default=None,
                   help="v1_surrogate (default): alpaca_eval's length_controlled_v1 with the missing gamed-baseline "
                   "rows replaced by a fitted slope prior; noreg: alpaca_eval's length_controlled_noreg; v1: "
                   "length_controlled_v1's fit on the given gamed-baseline files, needs --gamed (the default when "
                   "--gamed is given); all three use selfalign's rebuilt instruction difficulty")
    p.add_argument("--gamed", action="append", default=[], metavar="FILE",
                   help="annotations of a gamed baseline (gpt4_1106_preview_verbose / _concise vs gpt4_1106_preview);"
                   " give both, for --glm v1. Not gpt4_gamed.json: that is an adversarial entry, not a gamed baseline")
    p.add_argument("--difficulty", default=None, help="instruction difficulty CSV (default: the shipped one)")
    p.set_defaults(fn=cmd_lc)


def cmd_lc(args) -> int:
    from selfalign.evaluation.lc import evaluate_annotations

    glm = args.glm or ("v1" if args.gamed else "v1_surrogate")
    if args.gamed and glm != "v1":
        raise SelfalignError("--gamed is only used by --glm v1")
    for path in args.gamed:  # the adversarial entry would fit the length term to answers cut to ten characters
        from selfalign.data.io import iter_json_rows

        first = next((row for _, row in iter_json_rows(path)), {})
        if Path(path).stem == "gpt4_gamed" or (isinstance(first, dict) and first.get("generator_2") == "gpt4_gamed"):
            raise SelfalignError(f"--gamed {path}: gpt4_gamed is AlpacaEval's adversarial entry, not a gamed "
                                 "baseline; give gpt4_1106_preview_verbose and gpt4_1106_preview_concise")
    m = evaluate_annotations(args.annotations, args.difficulty, glm=glm, gamed_paths=args.gamed)
    if args.json:
        print(json.dumps(m))
        return 0
    se = "n/a" if m["standard_error"] is None else f"{m['standard_error']:.2f}"
    print(f"model        {m['generator'] or '?'} vs baseline {m['baseline'] or '?'}: {m['n_total']} annotations, "
          f"{m['n_wins']} wins, {m['n_wins_base']} losses, {m['n_draws']} draws, avg length {m['avg_length']}"
          + (f"; {m['n_dropped']} without a preference dropped" if m.get("n_dropped") else "")
          + (f"; {m['n_repeated']} repeat an instruction given above (each counted, as alpaca_eval counts them)"
             if m.get("n_repeated") else ""))
    print(f"win rate     {m['win_rate']:.2f} ± {se}")
    _print_lc(m)
    return 0


def _print_lc(m: dict) -> None:
    if m.get("length_controlled_winrate") is None:
        print(f"LC win rate  n/a ({m.get('lc_note', 'not computed')})")
    else:
        print(f"LC win rate  {m['length_controlled_winrate']:.2f} ± {m['lc_standard_error']:.2f}  ({m['glm']})")


# ------------------------------------------------------------------------------------------------ eval alpaca / mtbench
def _add_model_and_judge_flags(p, default_judge: str, why: str,
                               judges: str = "length, local, reward, reward-crossfit, api") -> None:
    from selfalign.cli import add_backend_flags

    add_backend_flags(p)
    p.add_argument("--judge", default=default_judge,
                   help=f"judge name: {judges} (default %(default)s: {why})")
    p.add_argument("--judge-option", action="append", default=[], metavar="KEY=VALUE",
                   help="judge option, e.g. model=qwen2.5-coder-1.5b (repeatable)")
    p.add_argument("--out", required=True, help="output folder (resumed if it exists)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="answer length limit (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (eval alpaca: also which subset --limit picks)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _judge_from_args(args):
    """The judge, checked (unknown option, bad value, a model not on this machine) before any model loads."""
    from selfalign.config import parse_override
    from selfalign.judges import check_judge, make_judge

    options = {}
    for text in args.judge_option:
        try:
            keys, value = parse_override(text)
        except SelfalignError:  # its message names a config override (train.beta=0.1), not the flag that was given
            raise SelfalignError(f"--judge-option {text}: expected key=value (e.g. --judge-option "
                                 "model=smollm2-135m)") from None
        options[".".join(keys)] = value
    try:
        # an endpoint that is down or refuses the key: refused on a first run (all answers would be generated before
        # the first verdict fails), a note on a rerun, whose verdicts may all be cached
        cache = Path(args.out) / f"judge_cache.{args.judge}.jsonl"
        check_judge(args.judge, options, endpoint="warn" if cache.exists() else "refuse")
    except SelfalignError as e:  # said with the flags that chose the judge
        flags = " ".join(f"--judge-option {text}" for text in args.judge_option) or f"--judge {args.judge}"
        raise SelfalignError(f"{flags}: {e}") from None
    # the cache lives in the output folder: a re-run or a resumed run never pays for a judgement twice
    return make_judge(args.judge, cache=str(cache), **options)


def _check_out_and_limit(args) -> None:
    """Said at once, before any model loads: --out must be a folder (not a file), --limit and --max-new-tokens at
    least 1."""
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise SelfalignError(f"--out {args.out}: is a file; give a folder (created if missing)")
    if args.limit is not None and args.limit < 1:
        raise SelfalignError(f"--limit must be at least 1, not {args.limit}")
    if getattr(args, "outputs", None) is None and args.max_new_tokens < 1:  # answers are generated: said now
        raise SelfalignError(f"--max-new-tokens must be at least 1, not {args.max_new_tokens}")


def _make_out_dir(args) -> None:
    """The --out folder, made once every input is checked (a refused command leaves no empty folder)."""
    try:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SelfalignError(f"--out {args.out}: cannot create the folder ({e.strerror})") from None


def _add_alpaca(eval_sub) -> None:
    p = eval_sub.add_parser(
        "alpaca", help="AlpacaEval-2.0-style: answer the instructions, judge against GPT-4-Turbo references, WR + LC",
        description="Answer AlpacaEval's 805 instructions (or a seeded subset with --limit, or --instructions FILE), "
        "judge each answer against the reference output (default: GPT-4-Turbo's, from the shared data) with a "
        "pairwise judge, and report win rate, standard error and length-controlled win rate. Writes "
        "model_outputs.json and annotations.json in alpaca_eval's formats, and metrics.json. Resumable.")
    # reward-crossfit: the judge that agrees best with GPT-4 on the length-balanced pairs (61.8%, RESULTS "Judge
    # agreement") at ~2.6 s a pair on a CPU; the local LLM judge reached 53% there at ~74 CPU-s a pair
    _add_model_and_judge_flags(p, "reward-crossfit", "the reward judge trained on GPT-4's AlpacaEval preferences, "
                               "cross-fitted by instruction; train it once with `selfalign judges train-crossfit`")
    p.add_argument("--limit", type=int, default=None, help="a seeded random subset of this many instructions")
    p.add_argument("--instructions", default=None, help="instruction file (default: AlpacaEval's eval_set.jsonl)")
    p.add_argument("--reference", default=None, help="reference outputs (default: GPT-4-Turbo's)")
    p.add_argument("--outputs", default=None, metavar="MODEL_OUTPUTS",
                   help="judge these existing answers (alpaca_eval model_outputs.json: instruction, output; or the "
                   "answers file of `selfalign generate`) instead of generating; no model is loaded. Re-judges a "
                   "run's saved eval/<stage>/model_outputs.json")
    p.add_argument("--unparsed-as-tie", action="store_true",
                   help="count a verdict the judge could not read as a tie (1.5) instead of dropping it from the win "
                   "rate and n_total as alpaca_eval does (the default; the count is reported either way)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.set_defaults(fn=cmd_alpaca)


def cmd_alpaca(args) -> int:
    from selfalign.cli import generator_from_args
    from selfalign.data.loaders import load_alpaca_eval_set, load_reference_outputs
    from selfalign.evaluation.alpaca import check_references, evaluate_alpaca
    from selfalign.generation import SamplingParams

    if args.outputs and (args.limit is not None or args.instructions):
        raise SelfalignError("--outputs judges the given answers: drop --limit / --instructions")
    _check_out_and_limit(args)
    references = load_reference_outputs(args.reference)
    judge = _judge_from_args(args)
    if args.outputs:
        from selfalign.evaluation.alpaca import evaluate_outputs, load_model_outputs

        outputs = load_model_outputs(args.outputs)
        check_references([o["instruction"] for o in outputs], references, args.outputs)
        _make_out_dir(args)
        m = evaluate_outputs(outputs, judge, args.out, references, progress=not args.quiet,
                             unparsed_as_tie=args.unparsed_as_tie)
    else:
        instructions = load_alpaca_eval_set(args.instructions, limit=args.limit, seed=args.seed)
        if args.limit is not None and args.limit > len(instructions):  # the table's n says it too, after hours
            print(f"selfalign: note: --limit {args.limit} is more than the {len(instructions)} instructions of "
                  f"{args.instructions or 'AlpacaEval'}: answering all of them", file=sys.stderr)
        check_references([p.text for p in instructions], references, args.instructions or "AlpacaEval's eval set")
        # a rerun with every answer on file loads no model; a model that is not there is refused before --out is made
        gen = generator_from_args(args, deferred=True)
        _make_out_dir(args)
        m = evaluate_alpaca(gen, judge, args.out, instructions=instructions, references=references,
                            params=SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens,
                                                  seed=args.seed), progress=not args.quiet,
                            unparsed_as_tie=args.unparsed_as_tie)
    if args.json:
        print(json.dumps(m, default=str))
        return 0
    how = "counted as ties" if args.unparsed_as_tie else "dropped, as alpaca_eval drops them"
    print(f"{m['model']} vs reference, judge {m['annotator']}: {m['n_total']} instructions with a verdict, "
          f"{m['n_unparsed']} unparsed verdicts ({how})")
    print(f"win rate     {m['win_rate']:.2f} ± {m['standard_error'] or 0:.2f}")
    _print_lc(m)
    return 0


# ------------------------------------------------------------------------------------------------ eval compare
def _add_compare(eval_sub) -> None:
    p = eval_sub.add_parser(
        "compare", help="did model B beat model A? the paired win-rate difference of two AlpacaEval-style evaluations",
        description="B's win rate minus A's over the instructions both evaluations judged, paired by instruction, "
        "with its standard error, 95% CI and p-value (normal approximation). Far tighter than comparing the two "
        "win rates' own error bars: both share the draw of instructions. Both must be judged by the same judge "
        "against the same reference. A and B: `eval alpaca --out` folders, a run's eval/<label> folders, or "
        "annotations files.")
    p.add_argument("a", metavar="A", help="the evaluation to compare against (e.g. the initial model's)")
    p.add_argument("b", metavar="B", help="the evaluation of the model that should be better")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(fn=cmd_compare)


def cmd_compare(args) -> int:
    from selfalign.evaluation.compare import describe, paired_difference

    result = paired_difference(args.a, args.b)
    print(json.dumps(result) if args.json else describe(result))
    return 0


def _add_mtbench(eval_sub) -> None:
    p = eval_sub.add_parser(
        "mtbench", help="MT-Bench-style: two-turn answers to the 80 questions, graded 1-10 by a judge",
        description="Answer MT-Bench's 80 two-turn questions (FastChat's per-category temperatures; --limit N keeps "
        "max(1, N // 8) per category), grade every turn with a single-answer judge (reference-guided for math, "
        "reasoning, coding; the multi-turn template for turn 2), report per-category and overall scores and how many "
        "grades could not be parsed. Resumable.")
    # grading 1-10 needs a judge that reads and writes: an LLM (a reward model only compares)
    _add_model_and_judge_flags(p, "local", "Qwen2.5-Coder-1.5B, single-answer grades", judges="local, api")
    p.add_argument("--limit", type=int, default=None,
                   help="keep the first max(1, limit // 8) questions of each of the 8 categories (so any --limit "
                   "under 16 keeps 8 questions)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.set_defaults(fn=cmd_mtbench, max_new_tokens=1024)


def cmd_mtbench(args) -> int:
    from selfalign.cli import generator_from_args
    from selfalign.evaluation.mtbench import evaluate_mtbench, require_grading_judge

    _check_out_and_limit(args)
    judge = _judge_from_args(args)
    require_grading_judge(judge)  # said before the model loads, not after the answers
    gen = generator_from_args(args, deferred=True)  # a model that is not there is refused before --out is made
    _make_out_dir(args)
    m = evaluate_mtbench(gen, judge, args.out, limit=args.limit,
                         max_new_tokens=args.max_new_tokens, seed=args.seed, progress=not args.quiet)
    if m["n_grades"] and m["n_unparsed"] == m["n_grades"]:  # "score None" and exit 0 would read as a finished run
        raise SelfalignError(
            f"no grade could be read from the judge's {m['n_grades']} judgments: see what judge {m['judge']} wrote "
            f"in {Path(args.out) / 'judgments.jsonl'} (a grade is read from \"[[N]]\": is --judge-option "
            "grade_max_tokens too small, or does the model not follow that format?); the answers and judgments are "
            "kept")
    if args.json:
        print(json.dumps(m, default=str))
        return 0
    print(f"{m['model']}, judge {m['judge']}: score {m['score']:.2f} over {m['n_grades'] - m['n_unparsed']} grades "
          f"({m['n_unparsed']} unparsed)")
    for cat, score in m["per_category"].items():  # FastChat's table shows two decimals
        print(f"  {cat:<12} {'n/a (no grade read)' if score is None else f'{score:.2f}'}")
    return 0
