"""SRT critic-output parsing: real-looking critiques and the malformed kinds a critic produces."""

from __future__ import annotations

import pytest

from selfalign.critique import REASONS, format_feedback_and_refinement, parse_critique, parse_score

ANSWER = "Paris is the capital of France."

GOOD = """1. Identify Weaknesses: The response is correct but very short; it gives no context about the city.
2. Offer Actionable Advice: Mention that Paris is also France's largest city and its political centre.
3. Overall Score: [[6]]

### Improved Response
Paris is the capital of France. It is also the country's largest city and the seat of its government."""


def test_parses_a_well_formed_critique():
    p = parse_critique(GOOD, ANSWER)
    assert p.ok and p.reason is None
    assert p.score == 6
    assert p.feedback.startswith("1. Identify Weaknesses") and "Overall Score: [[6]]" in p.feedback
    assert "Improved Response" not in p.feedback
    assert p.refinement == ("Paris is the capital of France. It is also the country's largest city and the seat of "
                            "its government.")


def test_tolerates_whitespace_heading_variants_and_an_echoed_feedback_heading():
    text = ("### Feedback\n**Weaknesses:** lacks detail about history.\n**Advice:** add a sentence on it.\n"
            "Overall Score: [[ 7.5 ]]\n###Improved Response:\nParis, on the Seine, has been France's capital for "
            "centuries.\n### Instruction\nsomething the critic echoed")
    p = parse_critique(text, ANSWER)
    assert p.ok, p.reason
    assert p.score == 7.5
    assert not p.feedback.lower().startswith("### feedback")
    assert p.refinement == "Paris, on the Seine, has been France's capital for centuries."


def test_the_refinement_may_contain_its_own_markdown_headings():
    text = GOOD.replace("It is also", "### Facts\nIt is also")
    p = parse_critique(text, ANSWER)
    assert p.ok and "### Facts" in p.refinement


@pytest.mark.parametrize("text, reason", [
    ("", "empty"),
    ("   \n", "empty"),
    ("The answer is too short. Add detail.\n### Improved Response\nLonger answer here.", "no_score"),
    ("Weak. Overall Score: 6/10\n### Improved Response\nBetter.", "no_score"),  # strict: [[n]] only
    ("Too short, add detail. Overall Score: [[11]]\n### Improved Response\nBetter.", "score_out_of_range"),
    ("Too short, add detail. Overall Score: [[0]]\n### Improved Response\nBetter.", "score_out_of_range"),
    ("Too short [[3]], add detail [[8]].\n### Improved Response\nBetter.", "ambiguous_score"),
    ("Overall Score: [[5]]\n### Improved Response\nBetter answer.", "no_feedback"),
    ("The answer lacks detail; add some history. Overall Score: [[5]]", "no_refinement"),
    ("The answer lacks detail; add some history. Overall Score: [[5]]\n### Improved Response\n   ", "empty_refinement"),
    ("The answer lacks detail; add some history. Overall Score: [[5]]\n### Improved Response\n"
     "paris is the capital of   France.", "identical_refinement"),
    ("<|im_end|> ### ### [[ ]] 🙂 asdf qwer", "no_score"),
])
def test_malformed_critiques_are_rejected_with_a_reason(text, reason):
    p = parse_critique(text, ANSWER)
    assert not p.ok
    assert p.reason == reason
    assert reason in REASONS


def test_the_overall_score_wins_over_other_bracketed_numbers():
    text = ("Step [[2]] of the answer is wrong; fix the date.\nOverall Score: [[4]]\n### Improved Response\nFixed.")
    assert parse_critique(text, ANSWER).score == 4


def test_a_truncated_critique_is_rejected_only_when_asked():
    assert parse_critique(GOOD, ANSWER, finish_reason="length").reason == "truncated"
    assert parse_critique(GOOD, ANSWER, finish_reason="stop").ok
    assert parse_critique(GOOD, ANSWER).ok


def test_parse_score_reads_only_the_feedback_part():
    assert parse_score(GOOD) == (6, None)
    # a [[n]] inside the refinement does not count
    assert parse_score("Fine. Overall Score: [[8]]\n### Improved Response\nUse [[9]] brackets.") == (8, None)
    assert parse_score("no rating at all") == (None, "no_score")
    assert parse_score(None) == (None, "empty")


def test_training_target_round_trips_through_the_parser():
    p = parse_critique(GOOD, ANSWER)
    again = parse_critique(format_feedback_and_refinement(p.feedback, p.refinement), ANSWER)
    assert (again.feedback, again.score, again.refinement) == (p.feedback, p.score, p.refinement)


def test_followup_score_reads_the_forms_a_critic_replies_with():
    from selfalign.critique import parse_followup_score

    assert parse_followup_score("Overall Score: 2") == (2.0, None)  # Qwen2.5-Coder-1.5B's reply
    assert parse_followup_score("Overall Score: [[7]]") == (7.0, None)
    assert parse_followup_score(" 8. ") == (8.0, None)
    assert parse_followup_score("Overall score: 11") == (11.0, "score_out_of_range")
    assert parse_followup_score("I would rather not rate it.") == (None, "no_score")
    assert parse_followup_score("It deserves 5 out of 10 and maybe 6.") == (None, "no_score")  # not guessed


def test_insert_score_line_goes_before_the_improved_response():
    from selfalign.critique import insert_score_line, parse_critique

    text = "Too short.\nAdd an example.\n\n### Improved Response\nA longer answer."
    spliced = insert_score_line(text, 4)
    assert spliced == "Too short.\nAdd an example.\n\nOverall Score: [[4]]\n\n### Improved Response\nA longer answer."
    parsed = parse_critique(spliced, "A short answer.")
    assert parsed.ok and parsed.score == 4 and parsed.refinement == "A longer answer."
    assert insert_score_line("Feedback only.", 6) == "Feedback only.\n\nOverall Score: [[6]]"
