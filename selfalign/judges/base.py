"""The judge interfaces: pairwise comparison and single-answer grading, batched.

Evaluation (AlpacaEval-style win rates, MT-Bench grades, agreement with GPT-4) and the recipes (labelling
pairs, scoring refinements) use judges only through these two interfaces, so any judge — the length rule, a
local LLM, a reward model, an OpenAI-compatible API — plugs in anywhere.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field


@dataclass
class PairwiseItem:
    """Which of two answers to the prompt conversation `messages` is better? `reference` is an optional
    reference answer for reference-guided judging."""

    messages: list[dict]
    answer_a: str
    answer_b: str
    reference: str | None = None

    def __post_init__(self):  # a wrong type fails here, named, not deep inside a judge's prompt formatting
        if not (isinstance(self.messages, list) and self.messages and all(isinstance(m, dict) for m in self.messages)):
            raise TypeError(f"PairwiseItem.messages must be a non-empty list of chat messages (dicts), not "
                            f"{self.messages!r:.80}")
        for name in ("answer_a", "answer_b"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"PairwiseItem.{name} must be a string, not {type(getattr(self, name)).__name__}")
        if self.reference is not None and not isinstance(self.reference, str):
            raise TypeError(f"PairwiseItem.reference must be a string or None, not {type(self.reference).__name__}")


@dataclass
class PairwiseVerdict:
    """`p_a`: the judge's probability that answer A is better (0.5 = tie / no preference), already combined over
    both presentation orders where the judge judges both. `consistent`: whether the two orders agreed (None when
    only one order was judged). `parsed`: False when the judge's output could not be read (in any order judged);
    such verdicts are counted and reported, never silently dropped (AlpacaEval drops them from the win rate, as
    alpaca_eval does, unless asked to count them as ties; agreement metrics count them as 0.5)."""

    p_a: float
    consistent: bool | None = None
    parsed: bool = True
    details: dict = field(default_factory=dict)

    @property
    def preference(self) -> float:
        """alpaca_eval's convention: 1 = A (output_1) better, 2 = B (output_2) better, 1.5 = tie."""
        return 2.0 - self.p_a


@dataclass
class GradeItem:
    """Grade `answer` (the last assistant turn after `messages`) on a 1-10 scale; multi-turn grading passes the
    whole conversation in `messages`. `reference` is an optional reference answer."""

    messages: list[dict]
    answer: str
    reference: str | None = None
    turn: int = 1
    references: list[str] | None = None  # reference answers of every turn so far (MT-Bench multi-turn templates)
    category: str | None = None


@dataclass
class Grade:
    score: float | None  # None when no rating could be read (FastChat's -1): left out of means, counted
    raw: str = ""
    attempts: int = 1
    details: dict = field(default_factory=dict)


class PairwiseJudge(abc.ABC):
    name: str = "judge"

    def config(self) -> dict:
        """Everything that changes this judge's verdicts (model, prompt, budgets), JSON-able. The judgement cache
        keys on name + a hash of it, so a changed judge never reuses stale verdicts."""
        return {}

    @abc.abstractmethod
    def compare(self, items: list[PairwiseItem], progress: bool = False) -> list[PairwiseVerdict]:
        ...


class GradingJudge(abc.ABC):
    name: str = "grader"

    def config(self) -> dict:
        """As `PairwiseJudge.config`."""
        return {}

    @abc.abstractmethod
    def grade(self, items: list[GradeItem], progress: bool = False) -> list[Grade]:
        ...


def grades_single_answers(judge) -> bool:
    """Whether `judge` can grade one answer on its own (MT-Bench) rather than only compare two (a cached judge
    answers for the judge it wraps)."""
    return getattr(judge, "grades_single_answers", isinstance(judge, GradingJudge))
