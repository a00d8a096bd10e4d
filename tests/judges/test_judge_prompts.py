"""Verdict-token reading, text parsing (garbage counted, never guessed), order combining, prompt files."""

from __future__ import annotations

import json
import math

import pytest

from selfalign.errors import SelfalignError
from selfalign.judges.prompts import (combine_orders, fill, label_probabilities, load_prompt, p_first,
                                      parse_label_text, parse_rating, prompts_dir, truncate_tokens)


def test_label_probabilities_openai_shape_variants_and_case():
    top = [{"token": "M", "logprob": math.log(0.6)}, {"token": " m", "logprob": math.log(0.1)},
           {"token": "m", "logprob": math.log(0.2)}, {"token": "The", "logprob": math.log(0.05)}]
    pm, pM = label_probabilities(top, ("m", "M"))
    assert pm == pytest.approx(0.3) and pM == pytest.approx(0.6)  # " m" and "m" both count; M is not m
    assert p_first((pm, pM)) == pytest.approx(1 / 3)
    assert label_probabilities({"A": -0.1, "x": -1.0}, ("A", "B"))[1] == 0.0


@pytest.mark.parametrize("top", [[], [{"token": "The", "logprob": -0.1}], [{"token": None, "logprob": "x"}],
                                 [{"token": "mm", "logprob": -0.1}], None, [1, "a"]])
def test_label_probabilities_garbage_is_none(top):
    assert label_probabilities(top, ("m", "M")) is None
    assert p_first(label_probabilities(top, ("m", "M"))) is None


@pytest.mark.parametrize("text,expected", [("m", 1.0), ("M", 0.0), (" M\n", 0.0), ('"m"', 1.0),
                                           ("[[A]]", None), ("I pick [[M]]", 0.0), ("[[C]]", 0.5),
                                           ("", None), ("mM", None), ("Both [[m]] and [[M]]", None),
                                           ("<garbage> ###", None), (None, None)])
def test_parse_label_text(text, expected):
    assert parse_label_text(text, ("m", "M")) == expected


def test_parse_label_text_fastchat_labels():
    assert parse_label_text("Explanation... [[A]]", ("A", "B")) == 1.0
    assert parse_label_text("so [[B]].", ("A", "B")) == 0.0
    assert parse_label_text("a tie: [[C]]", ("A", "B")) == 0.5
    assert parse_label_text("no verdict here", ("A", "B")) is None


@pytest.mark.parametrize("text,expected", [
    ("Rating: [[7]]", 7.0), ("[[8.5]]", 8.5), ("Rating: [5]", 5.0), ("seven", None), ("", None), (None, None),
    # FastChat run_judge_single: the FIRST [[n]] wins, the [n] backup only when there is no [[n]] at all
    ("first [[3]] then [[9]]", 3.0), ("see [2], so Rating: [[6]]", 6.0), ("[4] and [8]", 4.0),
    # no range check: FastChat keeps out-of-range ratings (only "no match" becomes -1)
    ("Rating: [[11]]", 11.0), ("[[0]]", 0.0), ("[[7.]]", 7.0),
    # FastChat's patterns allow no spaces or signs inside the brackets
    ("Rating: [[ 7 ]]", None), ("[ 5 ]", None), ("[[-3]]", None), ("[[7/10]]", None)])
def test_parse_rating_is_fastchats(text, expected):
    assert parse_rating(text) == expected


def test_parse_rating_agrees_with_fastchats_regexes():
    """The two patterns FastChat's llm_judge/common.py compiles, applied as run_judge_single applies them."""
    import re

    primary, backup = re.compile(r"\[\[(\d+\.?\d*)\]\]"), re.compile(r"\[(\d+\.?\d*)\]")
    texts = ["[[1]] x [[10]]", "Rating: [[5.5]] [6]", "[3] [[4]]", "[[ 2]] [7]", "[[12.25]]", "[x] [9.]", "none",
             "[[3]][[4]]", "[[[8]]]", "[10]]"]
    for text in texts:
        m = primary.search(text) or backup.search(text)
        assert parse_rating(text) == (float(m.group(1)) if m else None), text


def test_always_first_judge_is_neutralised_by_order_swap():
    p_a, consistent, parsed = combine_orders(1.0, 1.0)  # "first" in both orders
    assert p_a == 0.5 and consistent is False and parsed is True
    p_a, consistent, _ = combine_orders(0.9, 0.8)  # strong first-position bias, still prefers A slightly
    assert p_a == pytest.approx(0.55) and consistent is False
    p_a, consistent, _ = combine_orders(0.8, 0.3)  # both orders pick A
    assert p_a == pytest.approx(0.75) and consistent is True
    assert combine_orders(None, 0.2) == (pytest.approx(0.8), None, True)
    assert combine_orders(None, None) == (0.5, None, False)


def test_fill_is_single_pass_and_keeps_json_braces():
    out = fill('{"a": """{x}""", "b": {y}} {z}', {"x": "has {y} inside", "y": "Y"})
    assert out == '{"a": """has {y} inside""", "b": Y} {z}'


def test_shipped_prompts_load_with_their_placeholders():
    names = sorted(p.stem for p in prompts_dir().glob("*.txt"))
    assert {"alpaca_eval_clf", "pair_v2", "single_v1", "single_math_v1", "single_v1_multi_turn",
            "single_math_v1_multi_turn"} <= set(names)
    clf = load_prompt("alpaca_eval_clf")
    assert clf.labels == ("m", "M") and clf.assistant_prefix == "" and clf.system.startswith("You are a highly")
    assert {"instruction", "output_1", "output_2"} <= clf.placeholders()
    msgs = clf.messages(instruction="I", output_1="X1", output_2="X2")
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[1]["content"].rstrip().endswith("## Best Model Identifier")
    assert '"output": """X1"""' in msgs[1]["content"] and '"instruction": """I""",' in msgs[1]["content"]
    pair = load_prompt("pair_v2")
    assert pair.labels == ("A", "B") and pair.assistant_prefix == "[["
    single = load_prompt("single_v1")
    assert single.labels is None and single.assistant_prefix == "Rating: [["


def test_grading_prompts_match_fastchat_verbatim(data_dir):
    fastchat = {json.loads(line)["name"]: json.loads(line)
                for line in (data_dir / "mt_bench" / "judge_prompts.jsonl").read_text().splitlines() if line.strip()}
    for ours, theirs in [("single_v1", "single-v1"), ("single_math_v1", "single-math-v1"),
                         ("single_v1_multi_turn", "single-v1-multi-turn"),
                         ("single_math_v1_multi_turn", "single-math-v1-multi-turn")]:
        p = load_prompt(ours)
        assert p.system == fastchat[theirs]["system_prompt"]
        assert p.user == fastchat[theirs]["prompt_template"]


def test_pair_v2_is_fastchats_pair_v2_less_exactly_what_its_header_says(data_dir):
    """pair_v2.txt is FastChat's pair-v2 with the explanation step and the tie option removed (no other edit), and
    its header says both."""
    theirs = {json.loads(line)["name"]: json.loads(line)
              for line in (data_dir / "mt_bench" / "judge_prompts.jsonl").read_text().splitlines()
              if line.strip()}["pair-v2"]
    edits = [(" Begin your evaluation by comparing the two responses and provide a short explanation.", ""),
             ("After providing your explanation, output", "Output"), (', and "[[C]]" for a tie', "")]
    system = theirs["system_prompt"]
    for old, new in edits:
        assert system.count(old) == 1
        system = system.replace(old, new)
    pair = load_prompt("pair_v2")
    assert pair.system == system
    assert pair.user == fill(theirs["prompt_template"], {"question": "{instruction}", "answer_a": "{output_1}",
                                                         "answer_b": "{output_2}"})
    header = (prompts_dir() / "pair_v2.txt").read_text().split("=== system ===")[0]
    assert "explanation" in header and '"[[C]]" for a tie' in header and "tie option" in header


def test_unknown_prompt_and_bad_file(tmp_path):
    with pytest.raises(SelfalignError, match="no judge prompt"):
        load_prompt("nope")
    bad = tmp_path / "bad.txt"
    bad.write_text("labels = m\n=== user ===\nhi\n")
    with pytest.raises(SelfalignError, match="two different"):
        load_prompt(str(bad))
    own = tmp_path / "own.txt"
    own.write_text("# mine\nlabels = 1 2\n=== user ===\nQ: {instruction}\n1: {output_1}\n2: {output_2}\n")
    p = load_prompt(str(own))
    assert p.system is None and p.labels == ("1", "2") and p.user.endswith("2: {output_2}")


def test_truncate_without_tokenizer_counts_four_chars_per_token():
    text, cut = truncate_tokens(None, "x" * 100, 10)
    assert cut and text.startswith("x" * 40) and "truncated" in text
    assert truncate_tokens(None, "short", 10) == ("short", False)
    assert truncate_tokens(None, "y" * 100, None) == ("y" * 100, False)


def test_a_pairwise_item_of_the_wrong_types_is_refused_by_name():
    from selfalign.judges.base import PairwiseItem

    m = [{"role": "user", "content": "q"}]
    with pytest.raises(TypeError, match="PairwiseItem.answer_a must be a string, not NoneType"):
        PairwiseItem(m, None, "b")
    with pytest.raises(TypeError, match="PairwiseItem.messages must be a non-empty list of chat messages"):
        PairwiseItem("q", "a", "b")
    with pytest.raises(TypeError, match="PairwiseItem.reference must be a string or None, not int"):
        PairwiseItem(m, "a", "b", reference=3)
    assert PairwiseItem(m, "a", "b").reference is None
