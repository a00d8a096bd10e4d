"""SRT: a complete two-stage run (with an OpenAI-compatible stand-in critic) that resumes, stage-2 DPO, and
`selfalign generate --self-refine`. The critique machinery it composes is tested in tests/critique/."""

from __future__ import annotations

import hashlib
import json
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from selfalign.critique import preference_pairs, self_critique_request


# ------------------------------------------------------------------------------------------------ end to end
class StandInCritic(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint that critiques like a (very simple) strong critic: deterministic feedback, a
    length-based score, a refinement that adds a sentence. About one answer in three gets garbage at T = 0 (then a
    good critique on retry), one in six always (dropped); refinements are always scored."""

    requests: list = []
    text = None  # the critic_text fixture's helpers

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StandInCritic.requests.append({"auth": self.headers.get("Authorization"), "body": body})
        last = body["messages"][-1]["content"]
        answer = self.text.answer_in(last) if "### Requirements" not in last or "### Response" in last \
            else body["messages"][-2]["content"]  # Table-1 prompt, or a two-turn self-critique chat
        h = zlib.crc32(answer.encode()) % 6
        rescoring = answer.endswith("More detail follows here.")
        if "### Requirements" not in last:  # a plain question: answer it
            text = f"A plain answer about {last[:30]!r}."
        elif not rescoring and (h == 0 or (h in (1, 2) and body.get("temperature") == 0)):
            text = "Sure! Here is my review of the response."
        else:
            text = self.text.good(answer, self.text.length_score(answer))
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
def critic_url(critic_text):
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandInCritic)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    StandInCritic.requests, StandInCritic.text = [], critic_text
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
    # before the run folder was made, one one-token chat request checked the endpoint (it has no GET /models)
    probe = StandInCritic.requests[0]
    assert probe["body"]["max_tokens"] == 1 and probe["auth"] == "Bearer sk-test"
    # the API critic got the Table-1 prompt at T = 0 with the key as a Bearer header
    first = StandInCritic.requests[1]
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


def test_stage2_dpo_starts_from_m_self_with_beta_0_01(tmp_path, monkeypatch, critic_text):
    from selfalign.config import config_to_dict
    from selfalign.data import write_jsonl
    from selfalign.recipes import srt
    from selfalign.runs import Run

    config = srt.Config()
    assert config.stage2_train.beta == 0.01 and config.stage1_train.train_on == "all"
    run = Run(tmp_path / "r", config_to_dict(config), "srt")
    pairs, _ = preference_pairs([critic_text.critique("up", 4, 7), critic_text.critique("same", 6, 6)])
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


def test_skipped_stages_pass_their_model_through_and_the_control_says_why_it_has_none(tmp_path, monkeypatch):
    """on_empty: skip with no valid critique in either stage: M_self = M_final = M_base, DIR/final links to it, and
    the control stage is recorded as skipped (it used to vanish from the manifest and from status)."""
    from selfalign.config import load_config
    from selfalign.models import resolve_model
    from selfalign.recipes import srt

    config = load_config(srt.Config, "configs/srt-smoke.yaml", ["eval.instructions=0"])
    seen = {}
    monkeypatch.setattr(srt, "answer", lambda config, run, stage, model, label: seen.setdefault(stage, model) and {})
    monkeypatch.setattr(srt, "critique_stage1", lambda config, run: {"kept": 0})
    monkeypatch.setattr(srt, "critique_stage2", lambda config, run, m_self: {"pairs": 0})
    monkeypatch.setattr(srt, "train_stage1", lambda config, run: {"skipped": "no valid critiques", "examples": 0})
    monkeypatch.setattr(srt, "train_stage2", lambda config, run, m_self: {"skipped": "no pairs", "pairs": 0})
    monkeypatch.setattr(srt, "train_baseline", lambda config, run: pytest.fail("the control trained on nothing"))
    out = srt.run(config, str(tmp_path / "srt"))
    assert seen == {"stage1": config.model, "stage2": config.model}
    assert out["stages"]["baseline/train"]["result"] == {
        "skipped": "stage 1 had no valid critiques: no refinements to train on"}
    assert (tmp_path / "srt" / "final").resolve() == resolve_model(config.model).resolve()


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


def test_stage2_dpo_really_trains_on_score_improving_pairs(tmp_path, embedded_model_dir, critic_text):
    """The stage-2 DPO for real (the smoke run's tiny M_self rarely writes a parseable self-critique, so its stage 2
    usually has no pairs): one β = 0.01 step from the embedded model on the pairs `preference_pairs` keeps."""
    from selfalign.config import config_to_dict
    from selfalign.data import write_jsonl
    from selfalign.recipes import srt
    from selfalign.runs import Run

    config = srt.Config(stage2_train=srt.DPOTrainConfig(beta=0.01, learning_rate=5e-7, max_steps=1, batch_size=2,
                                                        max_length=96, max_prompt_length=48, save_steps=0))
    run = Run(tmp_path / "r", config_to_dict(config), "srt")
    pairs, _ = preference_pairs([critic_text.critique(i, s, s_r) for i, s, s_r in [("a", 3, 8), ("b", 5, 7),
                                                                                   ("c", 7, 4)]])
    write_jsonl(run.path("stage2", "pairs.jsonl"), pairs)
    out = srt.train_stage2(config, run, str(embedded_model_dir))
    assert out["pairs"] == 2 and out["beta"] == 0.01 and out["steps"] == 1
    assert (run.root / "stage2" / "final" / "config.json").exists()
