"""The SEFT reviser: decision tags, prompt formatting, labels from pairs and ranks, adaptive revision (stubbed)."""

from __future__ import annotations

import random

import pytest

from selfalign.data import PreferencePair, Response, read_records
from selfalign.data.loaders import load_preference_pairs
from selfalign.errors import ConfigError, DataError
from selfalign.generation.base import Generator
from selfalign.reviser import (TAGS, adaptive_examples, edit_distance, format_target, load_template, parse_decision,
                               normalized_edit_distance, reviser_messages, revise_adaptive, revision_labels,
                               revision_stats, tag_token_budget, token_overlap, warmup_examples)


# ------------------------------------------------------------------------------------------------ tags
@pytest.mark.parametrize("decision", ["none", "minor", "major"])
def test_every_tag_round_trips(decision):
    text = format_target(decision, "Paris is the capital.\n\nSecond line.")
    assert parse_decision(text) == (decision, "Paris is the capital.\n\nSecond line.")


@pytest.mark.parametrize("text,decision", [
    ("[NO REVISION]", "none"), ("  [minor revision]\nx", "minor"), ("[MAJOR  REVISION ] rest", "major"),
    ("\n[No Revision]\n", "none"),
])
def test_tags_tolerate_case_and_spacing(text, decision):
    assert parse_decision(text)[0] == decision


@pytest.mark.parametrize("text", ["", "Sure! Here is a better answer.", "[MINOR REVISON]", "[MAJOR REV",
                                  "NO REVISION", "[REVISION]", "[SMALL REVISION] text", "text [NO REVISION]"])
def test_missing_or_garbled_tag_is_none(text):
    decision, rest = parse_decision(text)
    assert decision is None and rest == text


def test_tag_budget_covers_every_tag(embedded_model_dir):
    from selfalign.models import load_tokenizer

    tok = load_tokenizer(str(embedded_model_dir))
    budget = tag_token_budget(tok)
    for tag in TAGS.values():
        ids = tok(tag, add_special_tokens=False)["input_ids"]
        assert len(ids) <= budget
        assert parse_decision(tok.decode(ids))[0] is not None
    assert budget < 16  # the decide pass is cheap: a handful of tokens, not a response


# ------------------------------------------------------------------------------------------------ prompts
def test_reviser_prompt_holds_instruction_and_response_and_keeps_history():
    template = load_template("adaptive_prompt.txt")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Name a colour."}]
    out = reviser_messages(msgs, "Blue.", template)
    assert out[:2] == msgs[:2] and out[-1]["role"] == "user"
    assert "### Instruction\nName a colour.\n### Response\nBlue." in out[-1]["content"]
    assert all(t in out[-1]["content"] for t in TAGS.values())
    assert "{" not in out[-1]["content"]
    assert "{response}" in load_template("warmup_prompt.txt")
    with pytest.raises(ConfigError):
        load_template("no_such_template.txt")


def test_placeholders_inside_the_instruction_are_left_as_written():
    # a coding question about templates: the filled-in instruction must not be filled in again
    msgs = [{"role": "user", "content": "Why does '{response}' print literally in my f-string?"}]
    out = reviser_messages(msgs, "Add the f prefix.", load_template("adaptive_prompt.txt"))[-1]["content"]
    assert "### Instruction\nWhy does '{response}' print literally in my f-string?\n### Response\nAdd the f prefix." \
        in out


# ------------------------------------------------------------------------------------------------ distances
def _naive(a, b):
    d = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, d[0] = d[:], i
        for j, y in enumerate(b, 1):
            d[j] = min(prev[j] + 1, d[j - 1] + 1, prev[j - 1] + (x != y))
    return d[-1]


def test_edit_distance_matches_the_textbook_dp():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 12))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 12))]
        assert edit_distance(a, b) == _naive(a, b)
    assert normalized_edit_distance("a b c", "a b c") == 0.0
    assert normalized_edit_distance("a b", "c d") == 1.0
    assert token_overlap("a b c", "a b c") == 1.0 and token_overlap("a", "b") == 0.0


# ------------------------------------------------------------------------------------------------ labels
def _pair(i, chosen, rejected, **meta):
    return PreferencePair(str(i), [{"role": "user", "content": f"q{i}"}], chosen, rejected, meta)


def test_edit_distance_labels_split_at_the_median_of_real_pairs(data_dir):
    pairs = load_preference_pairs(data_dir / "preferences" / "ultrafeedback_binarized_train_1k.jsonl", limit=40)
    labels = revision_labels(pairs, "edit_distance")
    gaps = [normalized_edit_distance(p.rejected, p.chosen) for p in pairs]
    assert [l["gap"] for l in labels] == pytest.approx(gaps)
    for l in labels:
        assert l["decision"] == ("minor" if l["gap"] <= l["threshold"] else "major")
    minor = sum(l["decision"] == "minor" for l in labels)
    assert 18 <= minor <= 22  # median split: about half
    fixed = revision_labels(pairs, "edit_distance", minor_max=0.0)
    assert all(l["decision"] == "major" for l, g in zip(fixed, gaps) if g > 0)


def test_small_edit_is_minor_and_rewrite_is_major():
    pairs = [_pair(0, "The capital of France is Paris.", "The capital of France is Lyon."),
             _pair(1, "The capital of France is Paris.", "I do not know, sorry about that really."),
             _pair(2, "one two three four five", "one two three four six"),
             _pair(3, "one two three four five", "alpha beta gamma")]
    labels = revision_labels(pairs, "edit_distance", minor_max=0.3)
    assert [l["decision"] for l in labels] == ["minor", "major", "minor", "major"]
    lengths = revision_labels([_pair(0, "a b c d", "a b c"), _pair(1, "a b c d e f g h i j", "a")], "length_ratio",
                              minor_max=0.5)
    assert [l["decision"] for l in lengths] == ["minor", "major"]


def test_rank_and_rating_labels():
    ranked = [_pair(k, "best", f"rank {r}", rejected_rank=r) for k, r in enumerate([2, 3, 4, 7])]
    assert [l["decision"] for l in revision_labels(ranked, "rank")] == ["minor", "minor", "major", "major"]
    rated = [_pair(0, "a", "b", score_chosen=9.0, score_rejected=8.0),
             _pair(1, "a", "b", score_chosen=9.0, score_rejected=2.0)]
    assert [l["decision"] for l in revision_labels(rated, "rating", minor_max=2)] == ["minor", "major"]
    with pytest.raises(DataError):
        revision_labels([_pair(0, "a", "b")], "rank")  # unranked pairs (the shared data) cannot use ranks
    with pytest.raises(ConfigError):
        revision_labels([_pair(0, "a", "b")], "judge")  # no judge given


def test_judge_labels_use_preference_strength():
    from selfalign.judges.base import PairwiseVerdict

    class ScriptedJudge:  # p(chosen > rejected) as a judge would give it
        def compare(self, items, progress=False):
            return [PairwiseVerdict(p_a={"weak": 0.55, "strong": 0.97, "mid": 0.8}[it.answer_b], consistent=True)
                    for it in items]

    pairs = [_pair(0, "good", "weak"), _pair(1, "good", "strong"), _pair(2, "good", "mid")]
    labels = revision_labels(pairs, "judge", minor_max=0.8, judge=ScriptedJudge())
    assert [l["gap"] for l in labels] == [0.55, 0.97, 0.8]
    assert [l["decision"] for l in labels] == ["minor", "major", "minor"]


def test_training_examples():
    template = load_template("adaptive_prompt.txt")
    pairs = [_pair(0, "good", "bad"), _pair(1, "fine", "poor")]
    labels = [{"decision": "minor", "gap": 0.1}, {"decision": "major", "gap": 0.9}]
    ex = adaptive_examples(pairs, labels, template)
    assert len(ex) == 4
    assert ex[0].messages[-1]["content"] == "[NO REVISION]\ngood"
    assert "### Response\ngood" in ex[0].messages[-2]["content"]
    assert ex[1].messages[-1]["content"] == "[MINOR REVISION]\ngood"
    assert "### Response\nbad" in ex[1].messages[-2]["content"]
    assert ex[3].messages[-1]["content"] == "[MAJOR REVISION]\nfine"
    assert adaptive_examples(pairs, labels, template, "tag_only")[0].messages[-1]["content"] == "[NO REVISION]"
    warm = warmup_examples(pairs, load_template("warmup_prompt.txt"))
    assert warm[0].messages[-1]["content"] == "good" and "### Response\nbad" in warm[0].messages[-2]["content"]


# ------------------------------------------------------------------------------------------------ adaptive revision
class StubReviser(Generator):
    """Answers from a script: the decide pass returns `tags[response]`; the continue pass returns a revision."""

    model_name = "stub"

    def __init__(self, tags: dict[str, str]):
        self.tags = tags
        self.calls: list[tuple[int, list]] = []  # (max_new_tokens, prompts)

    def generate(self, prompts, params, on_batch=None, skip=None, progress=True):
        self.calls.append((params.max_new_tokens, list(prompts)))
        out = []
        for p in prompts:
            if (p.id, 0) in (skip or set()):
                continue
            response = p.messages[-1]["content"].split("### Response\n", 1)[1].split("\n\nImprove", 1)[0]
            if "assistant_prefix" in p.meta:
                text = f"REVISED({response})"
            else:
                text = self.tags[response][:params.max_new_tokens * 4]
            out.append(self._response(p, text, params, 0, "stop", len(text) // 4, "stub"))
        if on_batch:
            on_batch(out)
        return out


def _responses(texts):
    return [Response(f"p{k}", [{"role": "user", "content": f"question {k}"}], t, "policy", meta={"origin": "internal"})
            for k, t in enumerate(texts)]


def test_no_revision_is_verbatim_and_generates_no_continuation(tmp_path):
    original = "  Keep me exactly:\n\ttabs, trailing spaces   \n\n\u00e9\u00e8 \U0001F600  "
    stub = StubReviser({original: "[NO REVISION]\nsomething the reviser would rewrite"})
    revs = revise_adaptive(stub, _responses([original]), load_template("adaptive_prompt.txt"), tag_budget=8,
                           max_new_tokens=64, decisions_path=tmp_path / "tags.jsonl",
                           continuations_path=tmp_path / "cont.jsonl")
    assert len(revs) == 1 and revs[0].decision == "none"
    assert revs[0].revised == original and revs[0].revised.encode() == original.encode()
    assert [c[0] for c in stub.calls] == [8], "only the tag-length decide pass may run for [NO REVISION]"
    assert not (tmp_path / "cont.jsonl").exists() or not (tmp_path / "cont.jsonl").read_text()
    # through the JSONL record too
    from selfalign.data import Revision, write_jsonl

    write_jsonl(tmp_path / "revisions.jsonl", revs)
    assert read_records(tmp_path / "revisions.jsonl", Revision)[0].revised.encode() == original.encode()


def test_mixed_decisions_continue_only_the_revisions(tmp_path):
    texts = ["good answer", "slightly off", "totally wrong", "garbled one"]
    stub = StubReviser({"good answer": "[NO REVISION]", "slightly off": "[MINOR REVISION]",
                        "totally wrong": "[MAJOR REVISION]", "garbled one": "I think [MAJOR"})
    revs = revise_adaptive(stub, _responses(texts), load_template("adaptive_prompt.txt"), tag_budget=8,
                           max_new_tokens=64, decisions_path=tmp_path / "tags.jsonl",
                           continuations_path=tmp_path / "cont.jsonl", fallback="none")
    assert [r.decision for r in revs] == ["none", "minor", "major", "none"]
    assert [r.revised for r in revs] == ["good answer", "REVISED(slightly off)", "REVISED(totally wrong)",
                                         "garbled one"]
    assert [r.meta["tag_status"] for r in revs] == ["ok", "ok", "ok", "fallback"]
    (tags_max, tag_prompts), (cont_max, cont_prompts) = stub.calls
    assert tags_max == 8 and len(tag_prompts) == 4 and cont_max == 64
    assert [p.meta["assistant_prefix"] for p in cont_prompts] == ["[MINOR REVISION]\n", "[MAJOR REVISION]\n"]
    stats = revision_stats(revs, total=4)
    assert stats["count_none"] == 2 and stats["count_minor"] == 1 and stats["count_major"] == 1
    assert stats["share_none"] == 0.5 and stats["tag_fallbacks"] == 1 and stats["identical_to_original"] == 2
    assert 0 < stats["mean_edit_distance"] < 1 and stats["mean_edit_distance_revised"] == 1.0

    # resume: both files are complete, so nothing is generated again and the result is the same
    again = StubReviser(stub.tags)
    revs2 = revise_adaptive(again, _responses(texts), load_template("adaptive_prompt.txt"), tag_budget=8,
                            max_new_tokens=64, decisions_path=tmp_path / "tags.jsonl",
                            continuations_path=tmp_path / "cont.jsonl", fallback="none")
    assert [r.to_dict() for r in revs2] == [r.to_dict() for r in revs] and again.calls == []


def test_a_target_is_unfinished_when_the_text_it_hands_on_was_cut_off(tmp_path):
    from selfalign.data import Revision
    from selfalign.reviser import revision_unfinished

    texts = ["kept but cut", "revised from a cut one", "kept whole"]
    responses = _responses(texts)
    responses[0].finish_reason = responses[1].finish_reason = "length"
    stub = StubReviser({"kept but cut": "[NO REVISION]", "revised from a cut one": "[MAJOR REVISION]",
                        "kept whole": "[NO REVISION]"})
    revs = revise_adaptive(stub, responses, load_template("adaptive_prompt.txt"), 8, 64, tmp_path / "t.jsonl",
                           tmp_path / "c.jsonl")
    assert [r.meta["original_finish_reason"] for r in revs] == ["length", "length", None]
    # the rewrite finished (stub: "stop"), so only the kept cut-off answer is unfinished
    assert [revision_unfinished(r) for r in revs] == [True, False, False]
    cut_rewrite = Revision("p", revs[1].messages, "a", "b", "minor", {"finish_reason": "length"})
    empty_rewrite = Revision("p", revs[1].messages, "a", "a", "major", {"finish_reason": "stop", "empty_revision": True,
                                                                         "original_finish_reason": "length"})
    assert revision_unfinished(cut_rewrite) and revision_unfinished(empty_rewrite)


@pytest.mark.parametrize("fallback,expected", [("major", ["major"]), ("minor", ["minor"]), ("drop", [])])
def test_tag_fallbacks(tmp_path, fallback, expected):
    stub = StubReviser({"x y": "Here you go"})
    revs = revise_adaptive(stub, _responses(["x y"]), load_template("adaptive_prompt.txt"), 8, 64,
                           tmp_path / "t.jsonl", tmp_path / "c.jsonl", fallback=fallback)
    assert [r.decision for r in revs] == expected
    assert revision_stats(revs, total=1)["dropped"] == (1 if fallback == "drop" else 0)
    with pytest.raises(ConfigError):
        revise_adaptive(stub, [], load_template("adaptive_prompt.txt"), 8, 64, tmp_path / "a", tmp_path / "b",
                        fallback="keep")


def test_reviser_quality_judges_only_changed_answers_and_counts_each_side(data_dir):
    """Held-out pairs: the rejected answer should come back better (by the judge), the chosen one verbatim."""
    from selfalign.data import Revision
    from selfalign.judges.base import PairwiseJudge, PairwiseVerdict
    from selfalign.reviser import judge_revisions, quality_inputs, quality_markdown

    pairs = load_preference_pairs(data_dir / "preferences" / "ultrafeedback_binarized_train_1k.jsonl", limit=3)
    inputs = quality_inputs(pairs, "uf")
    assert [r.meta["origin"] for r in inputs] == ["rejected", "chosen"] * 3
    assert inputs[0].prompt_id == f"{pairs[0].id}:rejected" and inputs[1].response == pairs[0].chosen

    class LongerWins(PairwiseJudge):
        name = "longer"
        seen = 0

        def compare(self, items, progress=False):
            LongerWins.seen += len(items)
            return [PairwiseVerdict(p_a=1.0 if len(it.answer_a) > len(it.answer_b) else 0.0, consistent=True)
                    for it in items]

    # the reviser lengthens the 3 rejected answers, returns 2 chosen verbatim and shortens the third
    revisions = []
    for k, r in enumerate(inputs):
        if r.meta["origin"] == "rejected":
            revised, decision = r.response + " More.", "minor"
        else:
            revised, decision = (r.response, "none") if k < 4 else (r.response[:5], "major")
        revisions.append(Revision(prompt_id=r.prompt_id, messages=r.messages, original=r.response, revised=revised,
                                  decision=decision, meta=dict(r.meta)))
    rows, sides = judge_revisions(revisions, LongerWins())
    assert LongerWins.seen == 4  # the two verbatim answers are not judged
    assert [row["p_revised_better"] for row in rows if row["side"] == "chosen"] == [None, None, 0.0]
    rej, cho = sides["rejected"], sides["chosen"]
    assert rej["judged_better"]["count"] == 3 and rej["judged_better"]["share"] == 1.0
    assert cho["unchanged"]["count"] == 2 and cho["judged_better_of_changed"]["n"] == 1
    assert cho["decisions"]["count_none"] == 2 and cho["decisions"]["count_major"] == 1
    text = quality_markdown("t", {"judge": "longer", **sides})
    assert "judged better than the original by `longer`: 1.000 ± 0.000 (3/3)" in text
    assert "returned verbatim: 0.667 ± 0.272 (2/3)" in text and "| chosen | 2 | 0 | 1 | 0 | 2 | 0 |" in text
