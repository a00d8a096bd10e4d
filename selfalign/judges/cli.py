"""`selfalign judges ...`: judge commands (`train-reward`). Agreement with GPT-4 is `selfalign eval agreement`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from selfalign.errors import SelfalignError


def _check_training_flags(args) -> None:
    """Said before the backbone loads (an untrained model must never be saved over a trained one)."""
    if args.epochs < 1:
        raise SelfalignError(f"--epochs must be at least 1, not {args.epochs}")
    if args.max_length < 16:
        raise SelfalignError(f"--max-length must be at least 16 tokens, not {args.max_length}")
    if args.train_layers < 0:
        raise SelfalignError(f"--train-layers must be >= 0 (0: the head alone), not {args.train_layers}")
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise SelfalignError(f"--out {args.out}: is a file; give a folder")


def _note_replaced(out: Path) -> None:
    """Say which trained model a new one will replace (it is replaced only once the new one is saved whole)."""
    from selfalign.judges.reward import CONFIG_FILE

    try:
        old = json.loads((out / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return
    accuracy = (old.get("history") or [{}])[-1].get("heldout_accuracy")
    print(f"selfalign: note: {out} holds a reward model trained {old.get('created_at', '?')} on "
          f"{(old.get('train_data') or {}).get('n_pairs', '?')} pairs of {(old.get('train_data') or {}).get('file')}"
          + (f" (held-out accuracy {accuracy:.3f})" if isinstance(accuracy, (int, float)) else "")
          + "; it is replaced when this training finishes (give --out elsewhere to keep it)", file=sys.stderr)


def cmd_train_reward(args) -> int:
    from selfalign.judges.reward import default_reward_dir, train_reward_model

    _check_training_flags(args)
    if args.n_pairs < 0 or args.n_pairs == 1:
        raise SelfalignError("--n-pairs must be 0 (all) or at least 2")
    if args.n_eval < -1:
        raise SelfalignError(f"--n-eval must be -1 (all), 0 (none) or a count, not {args.n_eval}")
    out = args.out or default_reward_dir()
    _note_replaced(Path(out))
    cfg = train_reward_model(out, base=args.base, train_data=args.pairs, eval_data=args.eval_pairs,
                             n_pairs=args.n_pairs, n_eval=None if args.n_eval < 0 else args.n_eval,
                             max_length=args.max_length,
                             train_layers=args.train_layers, epochs=args.epochs, seed=args.seed,
                             allow_eval_instructions=args.allow_eval_instructions, progress=not args.quiet)
    last = cfg["history"][-1]
    print(json.dumps({"out": str(out), "n_pairs": cfg["train_data"]["n_pairs"], **last, "seconds": cfg["seconds"]}))
    return 0


def cmd_train_crossfit(args) -> int:
    from selfalign.judges.reward import default_crossfit_dir, train_crossfit_reward_models

    _check_training_flags(args)
    summary = train_crossfit_reward_models(args.out, pairs=args.pairs, folds=args.folds, base=args.base,
                                           max_length=args.max_length, train_layers=args.train_layers,
                                           epochs=args.epochs, seed=args.seed, progress=not args.quiet)
    print(json.dumps({"out": str(args.out or default_crossfit_dir()), **{k: summary[k] for k in (
        "pooled_agreement", "pooled_standard_error", "n", "seconds")},
        "folds": [{k: r[k] for k in ("fold", "train_pairs", "heldout_pairs", "agreement")} for r in summary["folds"]]}))
    return 0


def _add_model_flags(p) -> None:
    """The reward model's shape and training flags, the same for both training commands."""
    p.add_argument("--max-length", type=int, default=384, help="tokens per prompt + answer (default %(default)s)")
    p.add_argument("--train-layers", type=int, default=2, help="top decoder layers trained (default %(default)s)")
    p.add_argument("--epochs", type=int, default=4, help="passes over the pairs (default %(default)s)")
    p.add_argument("--base", default="smollm2-135m", help="backbone model (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)


def register(subparsers) -> argparse._SubParsersAction:
    p = subparsers.add_parser("judges", help="judge utilities: train the Bradley-Terry reward-model judges",
                              description="Judge utilities. Judges themselves are used through `selfalign eval "
                              "agreement --judge length|local|reward|reward-crossfit|api`, `selfalign eval alpaca` "
                              "and `eval mtbench`, and by the recipes.")
    sub = p.add_subparsers(dest="judges_command", required=True, metavar="JUDGES_COMMAND")
    t = sub.add_parser(
        "train-reward", help="train the reward-model judge on real preference pairs",
        description="Train a Bradley-Terry reward model (SmolLM2-135M backbone, top layers + scalar head; the frozen "
        "layers' output is computed once per sequence) on preference pairs (id, prompt, chosen, rejected), and save "
        "it as safetensors with a config recording its data, hyperparameters and held-out accuracy. Pairs whose "
        "prompt is an AlpacaEval or MT-Bench instruction are never trained on.")
    t.add_argument("--out", default=None, help="output folder (default ~/.cache/selfalign/reward/smollm2-135m-uf, "
                   "where `--judge reward` looks)")
    t.add_argument("--pairs", default=None, help="training pairs: a preference-pair file or alpaca_eval annotations "
                   "(default: shared preferences/ultrafeedback_binarized_train_1k.jsonl)")
    t.add_argument("--eval-pairs", default=None, help="held-out pairs for accuracy (default: shared preferences/"
                   "ultrafeedback_binarized_eval_200.jsonl)")
    t.add_argument("--n-pairs", type=int, default=300, help="training pairs, a seeded sample; 0 = all "
                   "(default %(default)s)")
    t.add_argument("--n-eval", type=int, default=100, help="held-out pairs; -1 = all, 0 = none "
                   "(default %(default)s)")
    _add_model_flags(t)
    t.add_argument("--allow-eval-instructions", action="store_true",
                   help="train on AlpacaEval / MT-Bench prompts too (e.g. on GPT-4's AlpacaEval annotations); hold "
                   "out by instruction when you measure agreement")
    t.add_argument("--quiet", action="store_true", help="no progress output")
    t.set_defaults(fn=cmd_train_reward, resumable=False)  # one short training: a rerun starts over

    c = sub.add_parser(
        "train-crossfit", help="train the default AlpacaEval judge: reward models on GPT-4's own preferences, "
        "cross-fitted by instruction",
        description="Train the `reward-crossfit` judge (the default judge of `selfalign eval alpaca`): the "
        "GPT-4-annotated pairs (default: the shared alpaca_eval/balanced_pairs_dev.json, where the preferred answer is "
        "the shorter one as often as the longer one) are split into folds by instruction; each fold's model is trained "
        "on the other folds and judges only its own fold's instructions, so no instruction is judged by a model that "
        "saw GPT-4's verdicts on it. Prints each fold's held-out agreement with GPT-4 and the pooled agreement. "
        "About 40 min on 2 CPU cores, once; a finished fold is not retrained.")
    c.add_argument("--out", default=None, help="output folder (default ~/.cache/selfalign/reward/"
                   "alpaca-gpt4-crossfit, where `--judge reward-crossfit` looks)")
    c.add_argument("--pairs", default=None, help="alpaca_eval annotations to train on (default: the shared "
                   "balanced_pairs_dev.json)")
    c.add_argument("--folds", type=int, default=2, help="instruction folds (default %(default)s)")
    _add_model_flags(c)
    c.add_argument("--quiet", action="store_true", help="no progress output")
    c.set_defaults(fn=cmd_train_crossfit)
    return sub


def main(argv: list[str] | None = None) -> int:
    """`python -m selfalign.judges.cli train-reward ...` works before `judges` is wired into `selfalign`."""
    import sys

    parser = argparse.ArgumentParser(prog="selfalign")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["judges", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.fn(args) or 0
    except SelfalignError as e:
        print(f"selfalign: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
