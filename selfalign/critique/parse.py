"""Parsing critic output in the SRT format (Hu et al. 2024, paper Table 1; METHODS.md §3.3).

A critic answer looks like

    1. Weaknesses: ...            (language feedback: weaknesses and actionable advice)
    2. Advice: ...
    Overall Score: [[6]]
    ### Improved Response
    <the refined answer>

`parse_critique` splits it strictly: feedback = the text before `### Improved Response` (it must hold language
feedback besides the score line), score = the one `[[n]]` in the feedback (1..10), refinement = the text after the
heading (non-empty and not the original answer). Anything else is rejected with a reason code (the paper's Rule 1:
feedback, score and improved response must all be present). `parse_score` reads only the score, for scoring a
refinement independently with the same template.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# reason codes, in the order they are checked
REASONS = ("empty", "no_score", "ambiguous_score", "score_out_of_range", "no_feedback", "no_refinement",
           "empty_refinement", "identical_refinement", "truncated")

_SCORE = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_OVERALL = re.compile(r"(?:#+\s*)?overall\s+score\s*[:：]?\s*", re.IGNORECASE)
_IMPROVED = re.compile(r"^[ \t]*#{1,6}[ \t]*improved[ \t]+response[ \t]*:?[ \t]*$"  # a heading line, or
                       r"|#{2,6}[ \t]*improved[ \t]+response[ \t]*:?",  # "###Improved Response" inline
                       re.IGNORECASE | re.MULTILINE)
_LEADING_FEEDBACK = re.compile(r"^\s*#{1,6}\s*feedback\s*:?\s*", re.IGNORECASE)
# template headings a critic sometimes echoes after its refinement; anything from them on is not the refinement
_TRAILING_TEMPLATE = re.compile(r"^[ \t]*#{1,6}[ \t]*(instruction|response|requirements|feedback)[ \t]*:?[ \t]*$",
                                re.IGNORECASE | re.MULTILINE)
MIN_FEEDBACK_CHARS = 10  # language feedback besides the score line (Rule 1: weaknesses and advice must be there)


@dataclass
class ParsedCritique:
    feedback: str | None = None  # weaknesses + advice + the score line, as the critic wrote them
    score: float | None = None
    refinement: str | None = None
    reason: str | None = None  # None when the critique is valid, else one of REASONS

    @property
    def ok(self) -> bool:
        return self.reason is None


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def parse_score(text: str | None, min_score: float = 1, max_score: float = 10) -> tuple[float | None, str | None]:
    """The `[[n]]` score of a critique (only the part before `### Improved Response`). Returns (score, reason)."""
    if not text or not text.strip():
        return None, "empty"
    head = _IMPROVED.split(text, maxsplit=1)[0]
    values = {float(m.group(1)) for m in _SCORE.finditer(head)}
    if not values:
        return None, "no_score"
    if len(values) > 1:
        # several different [[n]]: prefer the one that follows "Overall Score", else it is ambiguous
        overall = [m for m in _SCORE.finditer(head) if _OVERALL.search(head[max(0, m.start() - 40):m.start()])]
        if len({float(m.group(1)) for m in overall}) != 1:
            return None, "ambiguous_score"
        values = {float(overall[0].group(1))}
    score = values.pop()
    if not min_score <= score <= max_score:
        return score, "score_out_of_range"
    return score, None


_FOLLOWUP_SCORE = re.compile(r"overall\s+score\s*[:：]?\s*\[*\s*(\d+(?:\.\d+)?)\s*\]*", re.IGNORECASE)


def parse_followup_score(text: str | None, min_score: float = 1, max_score: float = 10
                         ) -> tuple[float | None, str | None]:
    """The rating in a reply to the score follow-up question: "[[n]]" as in a critique, or "Overall Score: n"
    without the brackets, or a reply that is just the number (the question asks for nothing else)."""
    score, reason = parse_score(text, min_score, max_score)
    if reason != "no_score":
        return score, reason
    m = _FOLLOWUP_SCORE.search(text) or re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*\.?\s*", text)
    if m is None:
        return None, "no_score"
    score = float(m.group(1))
    return (score, None) if min_score <= score <= max_score else (score, "score_out_of_range")


def insert_score_line(text: str, score: float) -> str:
    """`text` with the line "Overall Score: [[n]]" added at the end of its feedback, i.e. right before the improved
    response heading (or at the end when there is none): how a score obtained by a follow-up question is put back
    where the Table-1 format wants it."""
    line = f"Overall Score: [[{int(score) if float(score).is_integer() else score}]]"
    m = _IMPROVED.search(text)
    if m is None:
        return f"{text.rstrip()}\n\n{line}"
    return f"{text[:m.start()].rstrip()}\n\n{line}\n\n{text[m.start():]}"


def parse_critique(text: str | None, response: str | None = None, min_score: float = 1, max_score: float = 10,
                   finish_reason: str | None = None) -> ParsedCritique:
    """Strictly split critic output into feedback, score and refinement (see the module docstring).

    `response`: the critiqued answer; a refinement equal to it (ignoring whitespace and case) is rejected.
    `finish_reason="length"` with an otherwise valid critique is rejected as `truncated` (a cut-off refinement).
    """
    if not text or not text.strip():
        return ParsedCritique(reason="empty")
    text = _LEADING_FEEDBACK.sub("", text, count=1)
    score, reason = parse_score(text, min_score, max_score)
    if reason:
        return ParsedCritique(score=score, reason=reason)
    parts = _IMPROVED.split(text, maxsplit=1)
    feedback = parts[0].strip()
    without_score = _SCORE.sub("", _OVERALL.sub("", feedback))
    if len(re.sub(r"[\W_]+", "", without_score)) < MIN_FEEDBACK_CHARS:
        return ParsedCritique(feedback=feedback, score=score, reason="no_feedback")
    if len(parts) < 2:
        return ParsedCritique(feedback=feedback, score=score, reason="no_refinement")
    refinement = _TRAILING_TEMPLATE.split(parts[1], maxsplit=1)[0].strip()
    if not refinement:
        return ParsedCritique(feedback=feedback, score=score, reason="empty_refinement")
    if response is not None and _norm(refinement) == _norm(response):
        return ParsedCritique(feedback=feedback, score=score, refinement=refinement, reason="identical_refinement")
    if finish_reason == "length":
        return ParsedCritique(feedback=feedback, score=score, refinement=refinement, reason="truncated")
    return ParsedCritique(feedback=feedback, score=score, refinement=refinement)


def format_feedback_and_refinement(feedback: str, refinement: str) -> str:
    """The training target of the critique turn: feedback (with its score line), the heading, the refinement."""
    return f"{feedback.strip()}\n\n### Improved Response\n{refinement.strip()}"
