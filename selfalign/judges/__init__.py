"""Judges: pairwise and single-answer, behind the interfaces in selfalign.judges.base.

    make_judge("length")                              the "longer answer wins" floor
    make_judge("local", model="qwen2.5-coder-1.5b")   a local LLM reading verdict-token probabilities, both orders
    make_judge("reward", model=DIR)                   a Bradley-Terry reward model trained by `selfalign judges
                                                      train-reward` (each answer scored once)
    make_judge("reward-crossfit", models=DIR)         reward models trained on GPT-4's AlpacaEval preferences, one
                                                      per instruction fold; each instruction judged by the model
                                                      that never trained on it
    make_judge("api", base_url=..., model=...)        an OpenAI-compatible API judge (alpaca_eval's verdict-token
                                                      protocol with logprobs; parses text when there are none)

`cache=True` (or a path) wraps the judge in a JSONL judgement cache (selfalign.judges.cache).
"""

from __future__ import annotations

import inspect
import sys

from selfalign.errors import SelfalignError
from selfalign.judges.base import (Grade, GradeItem, GradingJudge, PairwiseItem, PairwiseJudge,
                                   PairwiseVerdict)

JUDGES = ("length", "local", "reward", "reward-crossfit", "api")


def _judge_class(name: str):
    if name == "length":
        from selfalign.judges.length import LengthJudge

        return LengthJudge
    if name == "local":
        from selfalign.judges.local import LocalJudge

        return LocalJudge
    if name == "reward":
        from selfalign.judges.reward import RewardJudge

        return RewardJudge
    if name == "reward-crossfit":
        from selfalign.judges.reward import CrossFitRewardJudge

        return CrossFitRewardJudge
    if name == "api":
        from selfalign.judges.api import APIJudge

        return APIJudge
    raise SelfalignError(f"unknown judge '{name}' (known: {', '.join(JUDGES)})")


def make_judge(name: str, cache: bool | str | None = None, **options):
    """A judge by name, configured by keyword options; `cache=True` or a path adds the judgement cache."""
    cls = _judge_class(str(name).lower())
    params = {k: p for k, p in inspect.signature(cls.__init__).parameters.items()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}  # a judge with no __init__ shows object's
    unknown = sorted(k for k in options if k not in params or k in ("self", "model_obj", "tokenizer"))
    if unknown:
        valid = ", ".join(k for k in params if k not in ("self", "model_obj", "tokenizer", "generator")) or "none"
        raise SelfalignError(f"judge '{name}' has no option {', '.join(unknown)} (options: {valid})")
    judge = cls(**options)
    if cache:
        from selfalign.judges.cache import CachedJudge

        judge = CachedJudge(judge, None if cache is True else cache)
    return judge


def check_judge(name: str, options: dict | None = None, endpoint: str = "refuse") -> None:
    """Fail now, not hours into a run, on a judge that cannot work here: an unknown name or option, a reward model
    never trained, an API judge without base_url, a local judge whose model is not on this machine. Judges load
    their weights on first use, so this builds one and loads nothing. An API judge's endpoint gets one request
    (`APIJudge.check_reachable`); `endpoint`: "refuse" raises if it is down or refuses the key, "warn" says so on
    stderr (a rerun whose verdicts are all cached needs no endpoint), "skip" sends nothing."""
    try:
        judge = make_judge(name, **(options or {}))
    except (TypeError, ValueError) as e:  # a constructor's own check of an option's value
        raise SelfalignError(f"judge '{name}': {e}") from None
    from selfalign.judges.local import LocalJudge

    if isinstance(judge, LocalJudge):
        from selfalign.models import resolve_model

        resolve_model(judge.model_spec)
    from selfalign.judges.api import APIJudge

    if isinstance(judge, APIJudge) and endpoint != "skip":  # one request: is the endpoint up, is the key taken?
        try:
            judge.check_reachable()
        except SelfalignError as e:
            if endpoint == "refuse":
                raise
            print(f"selfalign: note: {e} (verdicts not already cached will fail until it answers)", file=sys.stderr)
        finally:
            judge.close()


__all__ = ["JUDGES", "Grade", "GradeItem", "GradingJudge", "PairwiseItem", "PairwiseJudge", "PairwiseVerdict",
           "check_judge", "make_judge"]
