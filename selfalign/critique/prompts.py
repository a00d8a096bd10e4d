"""SRT prompt formats: the critic prompt (paper Table 1) and the stage-1 training / self-refinement sequences.

Templates are data files under selfalign/resources/srt/. Two sequence formats (METHODS.md §3.3, §3.7 item 1):

- `two_turn` (default, [R]): user x → assistant y → user "critique and refine" (the Requirements block) →
  assistant f + "### Improved Response" + r. Trained with loss on both assistant turns (y and f+r), everything
  else masked: that is Eq. 1, −log P(y, f, r | x) with the instruction masked, up to the fixed critique request.
  Turn 1 stays a plain answer, so the same model answers directly and stage-2 DPO pairs use the plain prompt.
- `critic_template`: one turn, user = the full Table-1 critic prompt holding x and y, assistant = f + r. Only the
  critique turn is a target (y is input): the "learn to critique given an answer" variant.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from selfalign.critique.parse import format_feedback_and_refinement
from selfalign.data import Conversation, Prompt
from selfalign.judges.prompts import fill

FORMATS = ("two_turn", "critic_template")


@lru_cache(maxsize=None)
def template(name: str) -> str:
    return resources.files("selfalign").joinpath("resources", "srt", name).read_text()


def critic_prompt(instruction: str, response: str) -> str:
    """Table-1 prompt for an external critic (and for scoring a refinement: put it in the response slot)."""
    # one pass: an instruction that itself contains "{response}" must stay as written
    return fill(template("critic_prompt.txt"), {"instruction": instruction, "response": response})


def self_critique_request() -> str:
    return template("self_critique_request.txt").strip()


def critique_messages(messages: list[dict], response: str, fmt: str = "two_turn") -> list[dict]:
    """The chat that asks a model to critique and refine `response` to the prompt `messages` (ends with a user turn).

    For `critic_template` (and for an external critic) the instruction is the last user turn; earlier turns of a
    multi-turn prompt are kept in front as context."""
    if fmt == "two_turn":
        return list(messages) + [{"role": "assistant", "content": response},
                                 {"role": "user", "content": self_critique_request()}]
    if fmt == "critic_template":
        return list(messages[:-1]) + [{"role": "user", "content": critic_prompt(messages[-1]["content"], response)}]
    raise ValueError(f"unknown SRT sequence format {fmt!r} (choose from {', '.join(FORMATS)})")


def critique_prompt(id: str, messages: list[dict], response: str, fmt: str = "two_turn", **meta) -> Prompt:
    return Prompt(id=str(id), messages=critique_messages(messages, response, fmt), meta=meta)


def training_conversation(id: str, messages: list[dict], response: str, feedback: str, refinement: str,
                          fmt: str = "two_turn", response_unfinished: bool = False, **meta) -> Conversation:
    """A stage-1 SFT example: the critique chat followed by the target feedback + refinement turn.
    `response_unfinished`: y was cut off at its token budget; in `two_turn`, where y is a target, its end-of-turn
    tokens then carry no loss (the model should not learn to stop there)."""
    target = format_feedback_and_refinement(feedback, refinement)
    if response_unfinished and fmt == "two_turn":
        meta = dict(meta, unfinished_turns=[len(messages)])  # y's index: right after the prompt's messages
    return Conversation(id=str(id), messages=critique_messages(messages, response, fmt) +
                        [{"role": "assistant", "content": target}], meta=dict(meta, format=fmt))


def default_train_on(fmt: str) -> str:
    """two_turn: loss on y and on f+r (Eq. 1); critic_template: y is input, only f+r is a target."""
    return "all" if fmt == "two_turn" else "last"
