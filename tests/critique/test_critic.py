"""Running a critic (retries, score follow-ups, rescoring, Rule 2) and self-refinement, against scripted critics."""

from __future__ import annotations

import json

from selfalign.critique import (SCORE_FOLLOWUP, CritiqueConfig, critique_responses, filter_critiques,
                                preference_pairs, self_critique_request, self_refine)
from selfalign.data import Prompt, Response
from selfalign.generation import Generator, SamplingParams


def test_pairs_keep_only_strictly_improving_refinements(critic_text):
    crit, X = critic_text.critique, critic_text.prompt
    cs = [crit("up", 4, 7), crit("same", 6, 6), crit("down", 8, 3), crit("unscored", 5, None)]
    pairs, dropped = preference_pairs(cs)
    assert [p.id for p in pairs] == ["up"]
    assert pairs[0].chosen == "refined up" and pairs[0].rejected == "answer up" and pairs[0].messages == X
    assert pairs[0].meta == {"score": 4, "refinement_score": 7, "rejected_unfinished": False}
    cut = crit("cut", 4, 7)
    cut.meta["response_finish_reason"] = "length"  # y' hit its token budget: no loss on its end-of-turn tokens
    assert preference_pairs([cut])[0][0].meta["rejected_unfinished"] is True
    assert {d["prompt_id"]: d["reason"] for d in dropped} == {"same": "not_improved", "down": "not_improved",
                                                             "unscored": "refinement_unscored"}
    # stage 1's Rule 2 keeps ties (s_r >= s_y)
    kept, _ = filter_critiques(cs, strict=False)
    assert [c.prompt_id for c in kept] == ["up", "same"]


# ------------------------------------------------------------------------------------------------ retries
class ScriptedGenerator(Generator):
    """Answers a critique chat by a rule of the caller; counts the calls."""

    def __init__(self, rule):
        self.rule, self.calls, self.model_name = rule, [], "scripted"

    def generate(self, prompts, params, on_batch=None, skip=None, progress=True):
        skip = skip or set()
        out = []
        for p in prompts:
            for s in range(params.n):
                if (p.id, s) in skip:
                    continue
                self.calls.append((p.id, params.temperature, params.seed))
                out.append(self._response(p, self.rule(p, params), params, s, "stop", 10, "scripted"))
        if on_batch:
            on_batch(out)
        return out


def test_malformed_critiques_are_retried_then_dropped_and_counted(tmp_path, critic_text):
    X = critic_text.prompt

    def rule(p: Prompt, params: SamplingParams) -> str:
        answer = critic_text.answer_in(p.messages[-1]["content"])
        if p.id == "never":
            return "I cannot help with that."  # no score on every attempt
        if p.id == "late" and params.temperature == 0:
            return "Looks fine but it could say more. Overall Score: [[7]]"  # no refinement, fixed by a re-sample
        if p.id == "same":
            return f"The answer is fine, nothing to add. Overall Score: [[9]]\n### Improved Response\n{answer}"
        return critic_text.good(answer, critic_text.length_score(answer))

    responses = [Response(prompt_id=i, messages=X, response=f"Answer number {i}.", model="m")
                 for i in ("ok", "late", "never", "same")]
    responses.append(Response(prompt_id="blank", messages=X, response="  ", model="m"))
    gen = ScriptedGenerator(rule)
    c = CritiqueConfig(retries=2, retry_temperature=0.3, max_new_tokens=64)
    critiques, dropped, stats = critique_responses(gen, responses, "critic_template", c, tmp_path, "scripted",
                                                   rescore=True, progress=False)
    assert [x.prompt_id for x in critiques] == ["ok", "late"]
    assert critiques[1].meta["attempt"] == 1 and critiques[0].meta["attempt"] == 0
    assert all(x.meta["refinement_score"] >= x.score for x in critiques)
    reasons = {d["prompt_id"]: d["reason"] for d in dropped}
    assert reasons == {"never": "no_score", "same": "identical_refinement", "blank": "empty_response"}
    assert stats["recovered_by_retry"] == 1
    assert stats["critique_attempts"][0] == {"ok": 1, "no_refinement": 1, "no_score": 1, "identical_refinement": 1}
    # bounded: "never" was asked 1 + retries times, first greedily then at the retry temperature with new seeds
    never = [(t, s) for i, t, s in gen.calls if i == "never"]
    assert never == [(0.0, 0), (0.3, 1), (0.3, 2)]
    # resumable: a second pass reads every attempt from disk and asks nothing
    gen2 = ScriptedGenerator(rule)
    again, _, _ = critique_responses(gen2, responses, "critic_template", c, tmp_path, "scripted", rescore=True,
                                     progress=False)
    assert gen2.calls == [] and [x.to_dict() for x in again] == [x.to_dict() for x in critiques]


def test_self_refine_returns_the_refinement_with_original_and_critique_in_meta(critic_text):
    def rule(p: Prompt, params: SamplingParams) -> str:
        if p.messages[-1]["content"] == self_critique_request():
            answer = p.messages[-2]["content"]
            return "broken" if "bad" in answer else critic_text.good(answer, 4)
        return "A short answer." if "good" in p.messages[-1]["content"] else "A bad answer."

    prompts = [Prompt.from_text("g", "a good question"), Prompt.from_text("b", "a bad question")]
    out = self_refine(ScriptedGenerator(rule), prompts, SamplingParams(temperature=0, max_new_tokens=16))
    assert [r.prompt_id for r in out] == ["g", "b"]
    assert out[0].response == "A short answer. More detail follows here."
    assert out[0].meta["original"] == "A short answer." and out[0].meta["score"] == 4
    assert "Overall Score: [[4]]" in out[0].meta["critique"] and out[0].meta["refine_status"] == "refined"
    assert out[1].response == "A bad answer." and out[1].meta["refine_status"] == "no_score"  # falls back


def test_a_critique_missing_only_its_score_gets_it_from_a_follow_up_turn(tmp_path, critic_text):
    X = critic_text.prompt

    def rule(p: Prompt, params: SamplingParams) -> str:
        if p.messages[-1]["content"] == SCORE_FOLLOWUP:  # the follow-up turn, after the critic's own critique
            assert p.messages[-2]["role"] == "assistant" and "Add one concrete example." in p.messages[-2]["content"]
            return "Overall Score: 3" if p.id != "mute" else "I would rather not rate it."  # as Qwen answers
        answer = critic_text.answer_in(p.messages[-1]["content"])
        if p.id == "nothing":
            return "No comment."  # not a critique at all: no follow-up can fix it
        # weaknesses, advice and a refinement, but no rating (what Qwen2.5-Coder-1.5B writes)
        return (f"The answer is too short and gives no example.\nAdd one concrete example.\n"
                f"### Improved Response\n{answer} For example, this one.")

    responses = [Response(prompt_id=i, messages=X, response=f"Answer number {i}.", model="m")
                 for i in ("fixed", "mute", "nothing")]
    gen = ScriptedGenerator(rule)
    c = CritiqueConfig(retries=0, max_new_tokens=64)
    critiques, dropped, stats = critique_responses(gen, responses, "critic_template", c, tmp_path, "scripted",
                                                   rescore=True, progress=False)
    assert [x.prompt_id for x in critiques] == ["fixed"]
    fixed = critiques[0]
    assert fixed.score == 3 and fixed.feedback.endswith("Overall Score: [[3]]")
    assert fixed.refinement == "Answer number fixed. For example, this one."
    assert fixed.meta["score_followup"] == "Overall Score: 3" and fixed.meta["refinement_score"] == 3
    assert {d["prompt_id"]: d["reason"] for d in dropped} == {"mute": "no_score", "nothing": "no_score"}
    assert stats["recovered_by_score_followup"] == 1
    assert stats["critique_attempts"][0] == {"no_score": 3, "ok_after_score_followup": 1}
    # "nothing" got no follow-up (a score would not make it a critique); "mute" got one, which failed
    asked = [json.loads(line)["prompt_id"]
             for line in (tmp_path / "critique" / "attempt0_score.jsonl").read_text().splitlines()]
    assert sorted(asked) == ["fixed", "mute"]
    # switched off, the same critiques are dropped
    off, dropped_off, _ = critique_responses(ScriptedGenerator(rule), responses, "critic_template",
                                             CritiqueConfig(retries=0, max_new_tokens=64, score_followup=False),
                                             tmp_path / "off", "scripted", rescore=True, progress=False)
    assert off == [] and len(dropped_off) == 3
