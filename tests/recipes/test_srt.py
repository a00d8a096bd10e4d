"""SRT: masking of the stage-1 sequences, retries and drop counting, pair building, self-refinement, and a complete
two-stage run (with an OpenAI-compatible stand-in critic) that resumes."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from selfalign.data import Critique, Prompt, Response
from selfalign.generation import Generator, SamplingParams
from selfalign.recipes.srt import (CritiqueConfig, critique_responses, filter_critiques, preference_pairs,
                                   self_refine)
from selfalign.recipes.srt_prompts import (critic_prompt, default_train_on, self_critique_request,
                                           training_conversation)

X = [{"role": "user", "content": "Name the capital of France."}]
Y = "It is Paris."
F = "1. Weaknesses: too terse.\n2. Advice: add one fact about the city.\nOverall Score: [[5]]"
R = "The capital of France is Paris, its largest city."


def good_critique(response: str, score: int) -> str:
    return (f"1. Identify Weaknesses: the response is short and lacks detail.\n2. Offer Actionable Advice: add one "
            f"more sentence of explanation.\nOverall Score: [[{score}]]\n\n### Improved Response\n"
            f"{response} More detail follows here.")


def critiqued_response(text: str) -> str:
    """The answer inside a critic prompt (Table-1 template) or a two-turn self-critique chat."""
    m = re.search(r"### Response\n(.*?)\n\n### Requirements", text, re.S)
    return m.group(1) if m else text


def length_score(response: str) -> int:
    return max(1, min(10, 1 + len(response.split()) // 4))


# ------------------------------------------------------------------------------------------------ masking
@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir):
    from selfalign.models import load_tokenizer

    return load_tokenizer(str(embedded_model_dir))


def spans(tokenizer, ids, labels):
    """Text of the trained (label != -100) and the masked tokens."""
    trained = tokenizer.decode([t for t, l in zip(ids, labels) if l != -100])
    masked = tokenizer.decode([t for t, l in zip(ids, labels) if l == -100])
    return trained, masked


def test_two_turn_masks_instruction_and_critique_request(tokenizer):
    from selfalign.training import encode_conversation

    conv = training_conversation("a", X, Y, F, R, "two_turn")
    assert [m["role"] for m in conv.messages] == ["user", "assistant", "user", "assistant"]
    assert default_train_on("two_turn") == "all"
    ex = encode_conversation(tokenizer, conv.messages, train_on="all", max_length=2048, max_prompt_length=1024)
    trained, masked = spans(tokenizer, ex.input_ids, ex.labels)
    # Eq. 1: loss on y, f and r; the instruction and the fixed critique request carry none
    assert X[0]["content"] in masked and X[0]["content"] not in trained
    assert "Identify Weaknesses" in masked and "Identify Weaknesses" not in trained
    assert Y in trained and R in trained and "Overall Score: [[5]]" in trained
    # every instruction token position is -100
    instr = tokenizer(X[0]["content"], add_special_tokens=False)["input_ids"]
    ids = ex.input_ids
    start = next(i for i in range(len(ids)) if ids[i:i + len(instr)] == instr)
    assert all(l == -100 for l in ex.labels[start:start + len(instr)])
    # train_on=last: the response becomes input too
    last = encode_conversation(tokenizer, conv.messages, train_on="last", max_length=2048, max_prompt_length=1024)
    trained, masked = spans(tokenizer, last.input_ids, last.labels)
    assert Y in masked and Y not in trained and R in trained


def test_critic_prompt_fills_each_placeholder_once():
    text = critic_prompt("What does str.format do with '{response}'?", "It fills it in.")
    assert "What does str.format do with '{response}'?" in text and "It fills it in." in text
    assert "{instruction}" not in text


def test_a_cut_off_response_is_trained_without_its_end_of_turn(tokenizer):
    from selfalign.training import encode_conversations

    conv = training_conversation("a", X, Y, F, R, "two_turn", response_unfinished=True)
    assert conv.meta["unfinished_turns"] == [1] and conv.messages[1]["content"] == Y
    ex = encode_conversations(tokenizer, [conv], train_on="all", max_length=2048, max_prompt_length=1024)[0]
    trained, _ = spans(tokenizer, ex.input_ids, ex.labels)
    assert Y + "<|im_end|>" not in trained and Y in trained
    assert trained.endswith(R + "<|im_end|>\n")  # the critique turn still ends as usual
    assert "unfinished_turns" not in training_conversation("a", X, Y, F, R, "critic_template",
                                                           response_unfinished=True).meta  # y is input there


def test_critic_template_format_masks_instruction_and_response(tokenizer):
    from selfalign.training import encode_conversation

    conv = training_conversation("a", X, Y, F, R, "critic_template")
    assert [m["role"] for m in conv.messages] == ["user", "assistant"]
    assert conv.messages[0]["content"] == critic_prompt(X[0]["content"], Y)
    ex = encode_conversation(tokenizer, conv.messages, train_on=default_train_on("critic_template"),
                             max_length=2048, max_prompt_length=1024)
    trained, masked = spans(tokenizer, ex.input_ids, ex.labels)
    assert X[0]["content"] in masked and Y in masked and Y not in trained
    assert trained.strip().startswith("1. Weaknesses") and R in trained


# ------------------------------------------------------------------------------------------------ pairs and filters
def crit(pid: str, score, refinement_score) -> Critique:
    return Critique(prompt_id=pid, messages=X, response=f"answer {pid}", feedback=F, score=score,
                    refinement=f"refined {pid}", meta={"refinement_score": refinement_score})


def test_pairs_keep_only_strictly_improving_refinements():
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


def test_malformed_critiques_are_retried_then_dropped_and_counted(tmp_path):
    def rule(p: Prompt, params: SamplingParams) -> str:
        answer = critiqued_response(p.messages[-1]["content"])
        if p.id == "never":
            return "I cannot help with that."  # no score on every attempt
        if p.id == "late" and params.temperature == 0:
            return "Looks fine but it could say more. Overall Score: [[7]]"  # no refinement, fixed by a re-sample
        if p.id == "same":
            return f"The answer is fine, nothing to add. Overall Score: [[9]]\n### Improved Response\n{answer}"
        return good_critique(answer, length_score(answer))

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


def test_self_refine_returns_the_refinement_with_original_and_critique_in_meta():
    def rule(p: Prompt, params: SamplingParams) -> str:
        if p.messages[-1]["content"] == self_critique_request():
            answer = p.messages[-2]["content"]
            return "broken" if "bad" in answer else good_critique(answer, 4)
        return "A short answer." if "good" in p.messages[-1]["content"] else "A bad answer."

    prompts = [Prompt.from_text("g", "a good question"), Prompt.from_text("b", "a bad question")]
    out = self_refine(ScriptedGenerator(rule), prompts, SamplingParams(temperature=0, max_new_tokens=16))
    assert [r.prompt_id for r in out] == ["g", "b"]
    assert out[0].response == "A short answer. More detail follows here."
    assert out[0].meta["original"] == "A short answer." and out[0].meta["score"] == 4
    assert "Overall Score: [[4]]" in out[0].meta["critique"] and out[0].meta["refine_status"] == "refined"
    assert out[1].response == "A bad answer." and out[1].meta["refine_status"] == "no_score"  # falls back


# ------------------------------------------------------------------------------------------------ end to end
class StandInCritic(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint that critiques like a (very simple) strong critic: deterministic feedback, a
    length-based score, a refinement that adds a sentence. About one answer in three gets garbage at T = 0 (then a
    good critique on retry), one in six always (dropped); refinements are always scored."""

    requests: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StandInCritic.requests.append({"auth": self.headers.get("Authorization"), "body": body})
        last = body["messages"][-1]["content"]
        answer = critiqued_response(last) if "### Requirements" not in last or "### Response" in last \
            else body["messages"][-2]["content"]  # Table-1 prompt, or a two-turn self-critique chat
        h = zlib.crc32(answer.encode()) % 6
        rescoring = answer.endswith("More detail follows here.")
        if "### Requirements" not in last:  # a plain question: answer it
            text = f"A plain answer about {last[:30]!r}."
        elif not rescoring and (h == 0 or (h in (1, 2) and body.get("temperature") == 0)):
            text = "Sure! Here is my review of the response."
        else:
            text = good_critique(answer, length_score(answer))
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                           "usage": {"completion_tokens": len(text.split())}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture
def critic_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandInCritic)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    StandInCritic.requests = []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


def test_two_stage_srt_run_end_to_end_and_resume(tmp_path, critic_url, monkeypatch):
    from selfalign.cli import main

    monkeypatch.setenv("SRT_TEST_KEY", "sk-test")
    run_dir = tmp_path / "srt"
    args = ["run", "srt", "configs/srt-smoke.yaml", "--run-dir", str(run_dir), "--set", "critic.backend=openai",
            "--set", f"critic.base_url={critic_url}", "--set", "critic.api_key_env=SRT_TEST_KEY",
            "--set", "critic.model=stand-in"]
    assert main(args) == 0
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stages = manifest["stages"]
    for name in ("data", "eval/base", "stage1/generate", "stage1/critique", "stage1/train", "eval/stage1",
                 "eval/stage1+self-refine", "stage2/generate", "stage2/critique", "stage2/train", "eval/stage2",
                 "eval/stage2+self-refine", "baseline/train", "eval/sft_refinements"):
        assert stages[name]["status"] == "done", name
    # the API critic got the Table-1 prompt at T = 0 with the key as a Bearer header
    first = StandInCritic.requests[0]
    assert first["auth"] == "Bearer sk-test" and first["body"]["temperature"] == 0
    assert "### Requirements" in first["body"]["messages"][-1]["content"]
    # rescoring a refinement needs only its score: those requests stop at the improved-response heading
    table1 = [r["body"] for r in StandInCritic.requests if "### Requirements" in r["body"]["messages"][-1]["content"]]
    rescoring = [b for b in table1 if "More detail follows here." in b["messages"][-1]["content"]]
    assert rescoring and all(b.get("stop") == ["### Improved Response"] for b in rescoring)
    assert all("stop" not in b for b in table1 if b not in rescoring)
    s1 = stages["stage1/critique"]["result"]
    assert s1["responses"] == 6 and s1["kept"] + s1["dropped_total"] == 6 and s1["kept"] >= 1
    critiques = [json.loads(l) for l in (run_dir / "stage1" / "critiques.jsonl").read_text().splitlines()]
    assert len(critiques) == s1["kept"]
    assert sum(s1["score_distribution"].values()) == s1["parsed"]  # the critic's score distribution is reported
    assert sum(s1["refinement_score_distribution"].values()) == s1["parsed"]
    assert all(c["meta"]["refinement_score"] >= c["score"] for c in critiques)
    assert (run_dir / "stage1" / "final" / "config.json").exists()
    assert stages["stage1/train"]["result"]["train_on"] == "all"
    sft = [json.loads(l) for l in (run_dir / "stage1" / "sft.jsonl").read_text().splitlines()]
    assert [m["role"] for m in sft[0]["messages"]] == ["user", "assistant", "user", "assistant"]
    # disjoint prompt slices
    p1, p2 = ({json.loads(l)["id"] for l in (run_dir / "data" / f"stage{i}_prompts.jsonl").read_text().splitlines()}
              for i in (1, 2))
    assert len(p1) == len(p2) == 6 and not p1 & p2
    # stage 2: every self-critique is accounted for; pairs (if any) improve the score strictly
    s2 = stages["stage2/critique"]["result"]
    assert s2["responses"] == 6 and s2["pairs"] + s2["dropped_total"] == 6
    pairs = [json.loads(l) for l in (run_dir / "stage2" / "pairs.jsonl").read_text().splitlines()]
    assert all(p["meta"]["refinement_score"] > p["meta"]["score"] for p in pairs)
    t2 = stages["stage2/train"]["result"]
    assert t2.get("skipped") or t2["beta"] == 0.01
    summary = (run_dir / "eval" / "summary.md").read_text()
    for label in ("base", "stage1", "stage1+self-refine", "stage2", "stage2+self-refine", "sft_refinements"):
        assert f"| {label} |" in summary
    # the control trains M_base on instruction -> critic refinement only, for exactly the kept critiques
    control = [json.loads(l) for l in (run_dir / "baseline" / "sft.jsonl").read_text().splitlines()]
    assert [c["messages"][-1]["content"] for c in control] == [c["refinement"] for c in critiques]
    assert all([m["role"] for m in c["messages"]] == ["user", "assistant"] for c in control)
    assert stages["baseline/train"]["result"]["examples"] == len(critiques)
    assert (run_dir / "baseline" / "final" / "config.json").exists()
    assert (run_dir / "final").exists()

    # resume: forget the last stages, rerun; earlier artifacts are untouched and nothing earlier re-runs
    before = {p: digest(run_dir / p) for p in ("stage1/critiques.jsonl", "stage1/sft.jsonl", "stage1/final",
                                                "stage2/responses.jsonl")}
    n_requests = len(StandInCritic.requests)
    for name in ("stage2/critique", "stage2/train", "eval/stage2", "eval/stage2+self-refine"):
        del manifest["stages"][name]
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    assert main(args) == 0
    after = json.loads((run_dir / "manifest.json").read_text())
    assert all(after["stages"][n]["status"] == "done" for n in stages)
    assert {p: digest(run_dir / p) for p in before} == before
    assert len(StandInCritic.requests) == n_requests  # the critic was not asked again
    assert after["stages"]["stage2/critique"]["result"] == s2


def test_stage2_dpo_starts_from_m_self_with_beta_0_01(tmp_path, monkeypatch):
    from selfalign.config import config_to_dict
    from selfalign.data import write_jsonl
    from selfalign.recipes import srt
    from selfalign.runs import Run

    config = srt.Config()
    assert config.stage2_train.beta == 0.01 and config.stage1_train.train_on == "all"
    run = Run(tmp_path / "r", config_to_dict(config), "srt")
    pairs, _ = preference_pairs([crit("up", 4, 7), crit("same", 6, 6)])
    write_jsonl(run.path("stage2", "pairs.jsonl"), pairs)
    seen = {}

    def fake_train_dpo(model, pairs, cfg, out_dir, final_dir, **kw):
        seen.update(model=model, ids=[p.id for p in pairs], beta=cfg.beta, ref=kw.get("ref_model"))
        return {"steps": 1}

    monkeypatch.setattr(srt, "train_dpo", fake_train_dpo)
    out = srt.train_stage2(config, run, "/models/m_self")
    assert seen == {"model": "/models/m_self", "ids": ["up"], "beta": 0.01, "ref": None}  # ref defaults to M_self
    assert out["pairs"] == 1 and out["beta"] == 0.01
    write_jsonl(run.path("stage2", "pairs.jsonl"), [])
    with pytest.raises(Exception, match="no DPO pairs"):
        srt.train_stage2(config, run, "/models/m_self")
    config.on_empty = "skip"
    assert srt.train_stage2(config, run, "/models/m_self")["skipped"]


def test_generate_self_refine_cli(tmp_path, critic_url, prompts_file):
    from selfalign.cli import main

    out = tmp_path / "out.jsonl"
    args = ["generate", "--backend", "openai", "--base-url", critic_url, "--model", "stand-in", "--prompts",
            str(prompts_file), "--out", str(out), "--temperature", "0", "--max-new-tokens", "32", "--self-refine",
            "--quiet"]
    assert main(args) == 0
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 4
    for r in rows:
        assert r["meta"]["original"].startswith("A plain answer about")
        if r["meta"]["refine_status"] == "refined":
            assert r["response"] == r["meta"]["original"] + " More detail follows here."
            assert "Overall Score: [[" in r["meta"]["critique"]
        else:
            assert r["response"] == r["meta"]["original"]
    assert any(r["meta"]["refine_status"] == "refined" for r in rows)
    # the critique request was the two-turn self-critique chat at T = 0
    crit = [q["body"] for q in StandInCritic.requests if len(q["body"]["messages"]) == 3]
    assert len(crit) == 4 and all(b["temperature"] == 0 for b in crit)
    assert crit[0]["messages"][-1]["content"] == self_critique_request()


def test_stage2_dpo_really_trains_on_score_improving_pairs(tmp_path, embedded_model_dir):
    """The stage-2 DPO for real (the smoke run's tiny M_self rarely writes a parseable self-critique, so its stage 2
    usually has no pairs): one β = 0.01 step from the embedded model on the pairs `preference_pairs` keeps."""
    from selfalign.config import config_to_dict
    from selfalign.data import write_jsonl
    from selfalign.recipes import srt
    from selfalign.runs import Run

    config = srt.Config(stage2_train=srt.DPOTrainConfig(beta=0.01, learning_rate=5e-7, max_steps=1, batch_size=2,
                                                        max_length=96, max_prompt_length=48, save_steps=0))
    run = Run(tmp_path / "r", config_to_dict(config), "srt")
    pairs, _ = preference_pairs([crit("a", 3, 8), crit("b", 5, 7), crit("c", 7, 4)])
    write_jsonl(run.path("stage2", "pairs.jsonl"), pairs)
    out = srt.train_stage2(config, run, str(embedded_model_dir))
    assert out["pairs"] == 2 and out["beta"] == 0.01 and out["steps"] == 1
    assert (run.root / "stage2" / "final" / "config.json").exists()


def test_a_critique_missing_only_its_score_gets_it_from_a_follow_up_turn(tmp_path):
    from selfalign.recipes.srt import SCORE_FOLLOWUP

    def rule(p: Prompt, params: SamplingParams) -> str:
        if p.messages[-1]["content"] == SCORE_FOLLOWUP:  # the follow-up turn, after the critic's own critique
            assert p.messages[-2]["role"] == "assistant" and "Add one concrete example." in p.messages[-2]["content"]
            return "Overall Score: 3" if p.id != "mute" else "I would rather not rate it."  # as Qwen answers
        answer = critiqued_response(p.messages[-1]["content"])
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
    asked = [json.loads(l)["prompt_id"] for l in (tmp_path / "critique" / "attempt0_score.jsonl").read_text().splitlines()]
    assert sorted(asked) == ["fixed", "mute"]
    # switched off, the same critiques are dropped
    off, dropped_off, _ = critique_responses(ScriptedGenerator(rule), responses, "critic_template",
                                             CritiqueConfig(retries=0, max_new_tokens=64, score_followup=False),
                                             tmp_path / "off", "scripted", rescore=True, progress=False)
    assert off == [] and len(dropped_off) == 3
