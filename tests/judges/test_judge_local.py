"""The local verdict-token judge on real balanced pairs, with the small embedded model (smollm2-135m) as judge so
the test stays fast; the benchmarks use qwen2.5-coder-1.5b."""

from __future__ import annotations

import json
import math

import pytest

from selfalign.judges.base import GradeItem, PairwiseItem
from selfalign.judges.local import LocalJudge, grading_fields

MODEL = "smollm2-135m"
BUDGET = dict(max_answer_tokens=48, max_instruction_tokens=48)


@pytest.fixture(scope="module")
def judge(embedded_model_dir):
    return LocalJudge(model=MODEL, batch_size=4, **BUDGET)


@pytest.fixture(scope="module")
def balanced(data_dir) -> list[dict]:
    return json.loads((data_dir / "alpaca_eval" / "balanced_pairs_dev.json").read_text())[:2]


def items_of(rows) -> list[PairwiseItem]:
    return [PairwiseItem([{"role": "user", "content": r["instruction"]}], r["output_1"], r["output_2"]) for r in rows]


@pytest.fixture(scope="module")
def verdicts(judge, balanced):
    calls = judge.forward_calls
    out = judge.compare(items_of(balanced))
    assert judge.forward_calls - calls == 4  # one forward pass per order per pair, nothing generated
    return out


def test_local_judge_on_two_real_balanced_pairs(verdicts):
    for v in verdicts:
        assert 0.0 < v.p_a < 1.0 and v.parsed and isinstance(v.consistent, bool)
        (p_ab, p_ba), = v.details["p_first"]
        assert v.p_a == pytest.approx((p_ab + 1 - p_ba) / 2)  # both orders combined
        assert v.consistent == ((p_ab > 0.5) == (p_ba < 0.5))
        (m1, m2), = v.details["label_mass"]
        assert 0.0 < m1 <= 1.0 and 0.0 < m2 <= 1.0
        assert v.details["method"] == "verdict-token-probability" and v.details["prompts"] == ["alpaca_eval_clf"]
    # the GPT-4-Turbo answer (output_1) of the first pair is long: its cut is reported in the verdict
    assert "answer_a" in verdicts[0].details["truncated"]


def test_batched_left_padded_and_shared_prefix_match_one_by_one(judge, balanced, verdicts):
    items = items_of(balanced)
    batched = verdicts  # batch of 4, left-padded, sharing the template's preamble cache
    single = LocalJudge(model=MODEL, batch_size=1, share_prefix=False, model_obj=judge._model,
                        tokenizer=judge._tok, **BUDGET).compare(items)
    for b, s in zip(batched, single):
        for x, y in zip(b.details["p_first"][0], s.details["p_first"][0]):
            assert x == pytest.approx(y, abs=1e-4)
    assert judge._preambles["alpaca_eval_clf"] is not None and len(judge._preambles["alpaca_eval_clf"][0]) > 16


def test_prompt_ensemble_and_single_order(judge, balanced):
    items = items_of(balanced[:1])
    both = LocalJudge(model=MODEL, prompt="alpaca_eval_clf,pair_v2", model_obj=judge._model, tokenizer=judge._tok,
                      **BUDGET).compare(items)[0]
    assert len(both.details["p_first"]) == 2 and both.details["prompts"] == ["alpaca_eval_clf", "pair_v2"]
    one = LocalJudge(model=MODEL, both_orders=False, model_obj=judge._model, tokenizer=judge._tok,
                     **BUDGET).compare(items)[0]
    assert one.consistent is None and one.p_a == pytest.approx(one.details["p_first"][0][0])


def test_grade_is_expected_rating(judge):
    grade, = judge.grade([GradeItem([{"role": "user", "content": "What is the capital of France?"}],
                                    "The capital of France is Paris.")])
    dist = grade.details["distribution"]
    assert set(dist) == {str(r) for r in range(1, 11)} and sum(dist.values()) == pytest.approx(1.0, abs=1e-4)
    assert 1.0 <= grade.score <= 10.0
    assert grade.score == pytest.approx(sum(int(r) * p for r, p in dist.items()), abs=1e-3)
    assert grade.details["prompt"] == "single_v1" and grade.raw.startswith("[[")


def test_grading_template_selection():
    q1 = [{"role": "user", "content": "Q1"}]
    assert grading_fields(GradeItem(q1, "A1"))[0] == "single_v1"
    name, fields = grading_fields(GradeItem(q1, "A1", reference="R1"))
    assert name == "single_math_v1" and fields["ref_answer_1"] == "R1"
    convo = q1 + [{"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    name, fields = grading_fields(GradeItem(convo, "A2", turn=2))
    assert name == "single_v1_multi_turn"
    assert fields == {"question_1": "Q1", "answer_1": "A1", "question_2": "Q2", "answer_2": "A2"}
    name, fields = grading_fields(GradeItem(convo, "A2", reference="R2", turn=2, references=["R1", "R2"]))
    assert name == "single_math_v1_multi_turn" and (fields["ref_answer_1"], fields["ref_answer_2"]) == ("R1", "R2")


def test_label_tokens_are_single_tokens(judge):
    for label in ("m", "M", "A", "B"):
        ids = judge.label_ids(label)
        assert ids and all(len(judge.tokenizer.decode([i]).strip()) == 1 for i in ids)
    assert not math.isnan(judge.seconds)


def test_pointwise_mode_grades_each_answer_once(judge):
    m = [{"role": "user", "content": "What is the capital of France?"}]
    items = [PairwiseItem(m, "Paris.", "I like turtles."), PairwiseItem(m, "I like turtles.", "Paris.")]
    point = LocalJudge(model=MODEL, mode="pointwise", model_obj=judge._model, tokenizer=judge._tok, **BUDGET)
    calls = point.forward_calls
    v = point.compare(items)
    assert point.forward_calls - calls == 2  # two distinct answers, one prompt pass each
    assert v[0].p_a == pytest.approx(1 - v[1].p_a) and v[0].consistent is True
    ga, gb = v[0].details["grades"]
    assert v[0].p_a == pytest.approx(1 / (1 + math.exp(-(ga - gb))))
    assert point.config()["mode"] == "pointwise" and "mode" not in judge.config()
    with pytest.raises(ValueError, match="mode"):
        LocalJudge(model=MODEL, mode="listwise")


def test_scoring_reads_the_cache_without_the_deprecation_warning(judge, balanced):
    """transformers >= 5.24 names the output's KV cache `cache`; reading the old `past_key_values` logs
    "`past_key_values`/`cache_params` are deprecated" (once per process, through the library's own logger, which
    does not propagate to the root one: the handler goes on that logger, and the once-cache is cleared first)."""
    import logging

    from transformers.utils import logging as hf_logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = hf_logging.get_logger("transformers")
    hf_logging.warning_once.cache_clear()
    logger.addHandler(handler)
    try:
        fresh = LocalJudge(model=MODEL, model_obj=judge._model, tokenizer=judge._tok, **BUDGET)
        fresh.compare(items_of(balanced[:1]))  # the shared-preamble cache
        fresh.grade([GradeItem([{"role": "user", "content": "What is the capital of France?"}], "Paris.")])
    finally:
        logger.removeHandler(handler)
    assert fresh._preambles["alpaca_eval_clf"] is not None  # the preamble path did run
    assert not [r for r in records if "deprecated" in r.getMessage()]
