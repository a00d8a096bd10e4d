"""Critique and refinement in the SRT format (Hu et al. 2024; METHODS.md §3): the parts the SRT recipe composes,
usable on their own.

- `parse`: split a critic's text into feedback, score and refinement (Rule 1), with reason codes for what fails.
- `prompts`: the critic prompt (paper Table 1) and the self-critique / training sequences, in two formats.
- `critic`: run a critic over answers with retries, score follow-ups and independent rescoring (Rule 2); keep the
  improved ones or make preference pairs from them.
- `self_refine`: answer, self-critique and refine as one generator (SRT inference).
"""

from selfalign.critique.critic import (RESCORE_STOP, SCORE_FOLLOWUP, CritiqueConfig, critique_responses,
                                       critique_with_retries, filter_critiques, preference_pairs)
from selfalign.critique.parse import (REASONS, ParsedCritique, format_feedback_and_refinement, insert_score_line,
                                      parse_critique, parse_followup_score, parse_score)
from selfalign.critique.prompts import (FORMATS, critic_prompt, critique_messages, critique_prompt, default_train_on,
                                        self_critique_request, training_conversation)
from selfalign.critique.self_refine import SelfRefineGenerator, self_refine

__all__ = ["FORMATS", "REASONS", "RESCORE_STOP", "SCORE_FOLLOWUP", "CritiqueConfig", "ParsedCritique",
           "SelfRefineGenerator", "critic_prompt", "critique_messages", "critique_prompt", "critique_responses",
           "critique_with_retries", "default_train_on", "filter_critiques", "format_feedback_and_refinement",
           "insert_score_line", "parse_critique", "parse_followup_score", "parse_score", "preference_pairs",
           "self_critique_request", "self_refine", "training_conversation"]
