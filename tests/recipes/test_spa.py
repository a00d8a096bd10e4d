"""SPA: implicit-reward labelling, the self-refinement smoothing, and a complete two-round run with resume."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from selfalign.cli import main
from selfalign.data import PreferencePair
from selfalign.data.loaders import load_preference_pairs
from selfalign.training.implicit_reward import label_by_implicit_reward, label_samples_by_implicit_reward
from selfalign.training.noise import SelfRefinementHook


def test_hook_smooths_exactly_the_configured_fraction_after_warmup():
    hook = SelfRefinementHook(alpha=0.1, noisy_fraction=0.1, window=50, warmup_fraction=0.2)
    g = torch.Generator().manual_seed(0)

    def state(step, b=10):
        zeros = torch.zeros(b)
        return SimpleNamespace(step=step, max_steps=100, beta=0.1, ids=[f"{step}-{k}" for k in range(b)],
                               policy_chosen=torch.randn(b, generator=g), policy_rejected=zeros,
                               reference_chosen=zeros, reference_rejected=zeros, extrapolated_chosen=None,
                               extrapolated_rejected=None, weights=torch.ones(b))

    for step in range(20):  # warm-up: 20% of 100 steps, no smoothing at all
        assert hook(state(step)).sum() == 0
    eps_total, n = 0.0, 0
    for step in range(20, 100):
        window = sorted(hook.window)
        tau = (window[5] + window[6]) / 2  # the code's percentile: entries ⌊50·0.1⌋ and +1 of the sorted window
        s = state(step)
        eps = hook(s)
        m = 0.1 * s.policy_chosen
        assert torch.equal(eps, 0.1 * (m <= tau).float())
        eps_total += float(eps.sum())
        n += 10
    share = eps_total / 0.1 / n
    assert 0.05 < share < 0.2, share  # about K = 10% of the pairs are flagged after warm-up
    assert len(hook.flagged) == round(eps_total / 0.1)


def test_hook_uses_extrapolated_logps_when_given():
    hook = SelfRefinementHook(window=2, warmup_fraction=0.0)
    one = torch.ones(2)
    s = SimpleNamespace(step=5, max_steps=10, beta=1.0, ids=["a", "b"], policy_chosen=one * 9, policy_rejected=0 * one,
                        reference_chosen=0 * one, reference_rejected=0 * one,
                        extrapolated_chosen=torch.tensor([-1.0, 1.0]), extrapolated_rejected=0 * one, weights=one)
    assert hook(s).tolist() == pytest.approx([0.1, 0.0])  # m = (-1, 1) <= τ = 0: only the first is flagged


def test_hook_log_goes_back_to_the_checkpoint_on_resume(tmp_path):
    log = tmp_path / "noisy.jsonl"
    hook = SelfRefinementHook(window=2, warmup_fraction=0.0, log_path=log)
    one = torch.ones(2)

    def state(step, margins):
        return SimpleNamespace(step=step, max_steps=10, beta=1.0, ids=["a", "b"], policy_chosen=torch.tensor(margins),
                               policy_rejected=0 * one, reference_chosen=0 * one, reference_rejected=0 * one,
                               extrapolated_chosen=None, extrapolated_rejected=None, weights=one)

    hook(state(0, [-1.0, 1.0]))  # flags "a" at step 1 (τ = 0 until the window is full)
    saved = hook.state_dict()  # the checkpoint after step 1
    hook(state(1, [-5.0, -5.0]))  # step 2 flags both, then the run is killed
    assert len(log.read_text().splitlines()) == 3
    resumed = SelfRefinementHook(window=2, warmup_fraction=0.0, log_path=log)
    resumed.load_state_dict(saved)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1]
    resumed(state(1, [5.0, -5.0]))  # the redone step 2 (another device might flag other pairs): only its own flags
    assert [(r["step"], r["id"]) for r in map(json.loads, log.read_text().splitlines())] == [(1, "a"), (2, "b")]


@pytest.fixture(scope="module")
def perturbed_model(embedded_model_dir, tmp_path_factory):
    """A second, slightly different policy: the embedded model with noise on its last layer's MLP."""
    from selfalign.models import load_model, load_tokenizer

    model = load_model(str(embedded_model_dir))
    torch.manual_seed(0)
    with torch.no_grad():
        w = model.model.layers[-1].mlp.down_proj.weight
        w.add_(0.05 * w.std() * torch.randn_like(w))
    out = tmp_path_factory.mktemp("perturbed")
    model.save_pretrained(out)
    load_tokenizer(str(embedded_model_dir)).save_pretrained(out)
    return out


def direct_logp(model, tok, messages, response):
    """log π(response | prompt) by a plain forward pass, independent of the batched code under test."""
    from selfalign.models import encode_prompt_response

    ids, n = encode_prompt_response(tok, messages, response)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return float(logp[n - 1:].sum())


def test_implicit_reward_picks_the_higher_reward(embedded_model_dir, perturbed_model, data_dir, tmp_path):
    from selfalign.models import load_model, load_tokenizer

    pairs = load_preference_pairs(data_dir / "preferences" / "ultrafeedback_binarized_eval_200.jsonl", limit=4)
    # short answers keep the check cheap and untruncated
    candidates = [PreferencePair(p.id, p.messages, p.chosen[:200], p.rejected[:200]) for p in pairs]
    labelled = label_by_implicit_reward(candidates, str(perturbed_model), str(embedded_model_dir), beta=0.1,
                                        max_length=512, max_prompt_length=400, cache_dir=tmp_path)
    tok = load_tokenizer(str(embedded_model_dir))
    policy, reference = load_model(str(perturbed_model)), load_model(str(embedded_model_dir))
    swapped = 0
    for cand, lab in zip(candidates, labelled):
        r = {y: direct_logp(policy, tok, cand.messages, y) - direct_logp(reference, tok, cand.messages, y)
             for y in (cand.chosen, cand.rejected)}
        assert lab.chosen == max(r, key=r.get), "the answer with the higher implicit reward must be chosen"
        assert lab.meta["reward_chosen"] == pytest.approx(r[lab.chosen], abs=1e-3)
        assert lab.meta["reward_rejected"] == pytest.approx(r[lab.rejected], abs=1e-3)
        swapped += lab.meta["swapped"]
    assert any(l.meta["reward_chosen"] != l.meta["reward_rejected"] for l in labelled)
    # the cache: labelling again reads every log-prob from disk
    again = label_by_implicit_reward(candidates, str(perturbed_model), str(embedded_model_dir), beta=0.1,
                                     max_length=512, max_prompt_length=400, cache_dir=tmp_path)
    assert [l.chosen for l in again] == [l.chosen for l in labelled]


def test_a_cut_off_answer_is_scored_without_the_end_token_it_never_produced(embedded_model_dir, perturbed_model,
                                                                            data_dir, tmp_path):
    pairs = load_preference_pairs(data_dir / "preferences" / "ultrafeedback_binarized_eval_200.jsonl", limit=4)
    plain = [PreferencePair(p.id, p.messages, p.chosen[:200], p.rejected[:200]) for p in pairs]
    cut = [PreferencePair(p.id, p.messages, p.chosen, p.rejected, {"chosen_unfinished": True}) for p in plain]
    common = dict(beta=0.1, max_length=512, max_prompt_length=400, cache_dir=tmp_path)
    whole = label_by_implicit_reward(plain, str(perturbed_model), str(embedded_model_dir), **common)
    flagged = label_by_implicit_reward(cut, str(perturbed_model), str(embedded_model_dir), **common)
    for cand, w, f in zip(plain, whole, flagged):
        reward = {w.chosen: w.meta["reward_chosen"], w.rejected: w.meta["reward_rejected"]}
        flagged_reward = {f.chosen: f.meta["reward_chosen"], f.rejected: f.meta["reward_rejected"]}
        # the unflagged answer scores the same; the cut-off one loses its end-of-turn term
        assert flagged_reward[cand.rejected] == pytest.approx(reward[cand.rejected], abs=1e-4)
        assert flagged_reward[cand.chosen] != pytest.approx(reward[cand.chosen], abs=1e-4)
        # the flags follow the answers when the labelling swaps them
        assert f.meta["chosen_unfinished"] == (f.chosen == cand.chosen)
        assert f.meta["rejected_unfinished"] == (f.rejected == cand.chosen)
        assert not w.meta["chosen_unfinished"] and not w.meta["rejected_unfinished"]


def test_more_than_two_samples_pick_the_best_and_the_worst_or_a_random_other(embedded_model_dir, perturbed_model,
                                                                            data_dir, tmp_path):
    from selfalign.models import load_model, load_tokenizer

    pairs = load_preference_pairs(data_dir / "preferences" / "ultrafeedback_binarized_eval_200.jsonl", limit=3)
    # K = 3 distinct answers per prompt: its two rated answers and the next prompt's chosen one (off topic)
    groups = [(p.id, p.messages, [p.chosen[:200], p.rejected[:200], q.chosen[:200]]) for p, q in zip(pairs, pairs[1:])]
    assert all(len(set(answers)) == 3 for _, _, answers in groups)
    common = dict(beta=0.1, max_length=512, max_prompt_length=400, cache_dir=tmp_path)
    worst = label_samples_by_implicit_reward(groups, str(perturbed_model), str(embedded_model_dir), **common)
    other = label_samples_by_implicit_reward(groups, str(perturbed_model), str(embedded_model_dir),
                                             rejected="max_chosen", seed=3, **common)
    tok = load_tokenizer(str(embedded_model_dir))
    policy, reference = load_model(str(perturbed_model)), load_model(str(embedded_model_dir))
    for (gid, messages, answers), w, o in zip(groups, worst, other):
        r = [direct_logp(policy, tok, messages, y) - direct_logp(reference, tok, messages, y) for y in answers]
        best = max(range(3), key=r.__getitem__)
        assert (w.chosen, w.rejected) == (answers[best], answers[min(range(3), key=r.__getitem__)])
        assert w.meta["reward_chosen"] == pytest.approx(r[best], abs=1e-3)
        assert w.meta["reward_rejected"] == pytest.approx(min(r), abs=1e-3)
        assert o.chosen == answers[best] and o.rejected != o.chosen and o.meta["rejected_sample"] != best
    again = label_samples_by_implicit_reward(groups, str(perturbed_model), str(embedded_model_dir),
                                             rejected="max_chosen", seed=3, **common)
    assert [p.rejected for p in again] == [p.rejected for p in other]  # seeded


def test_candidate_groups_drop_identical_and_optionally_truncated_answers(tmp_path, data_dir):
    from selfalign.data import Response, write_jsonl
    from selfalign.recipes import spa
    from selfalign.runs import Run

    p = load_preference_pairs(data_dir / "preferences" / "ultrafeedback_binarized_eval_200.jsonl", limit=3)
    rows = [  # prompt 0: two distinct answers, one cut off; prompt 1: the same text twice; prompt 2: three answers
        (p[0], [(p[0].chosen, "stop"), (p[0].rejected, "length")]),
        (p[1], [(p[1].chosen, "stop"), (p[1].chosen + " ", "stop")]),
        (p[2], [(p[2].chosen, "length"), (p[2].rejected, "stop"), (p[2].chosen[:50], "stop")]),
    ]
    run = Run(tmp_path, {}, "spa")
    write_jsonl(run.path("round1", "generations.jsonl"),
                [Response(prompt_id=q.id, messages=q.messages, response=text, model="m", sample_index=k,
                          finish_reason=why) for q, answers in rows for k, (text, why) in enumerate(answers)])
    groups, unfinished, dropped = spa.candidate_groups(spa.Config(samples_per_prompt=3), run, 1)
    assert [(g[0], len(g[2])) for g in groups] == [(p[0].id, 2), (p[2].id, 3)]
    assert unfinished == [{1}, {0}]  # the cut-off answers, by their index among the distinct ones
    assert dropped == {"identical_dropped": 1, "truncated_dropped": 0, "too_few_left": 0}
    groups, unfinished, dropped = spa.candidate_groups(spa.Config(samples_per_prompt=3, drop_truncated=True), run, 1)
    assert [(g[0], g[2]) for g in groups] == [(p[2].id, [p[2].rejected, p[2].chosen[:50]])]
    assert unfinished == [set()]
    assert dropped == {"identical_dropped": 1, "truncated_dropped": 2, "too_few_left": 1}


def test_two_round_spa_run_end_to_end_and_resume(tmp_path, capsys):
    run_dir = tmp_path / "spa"
    assert main(["run", "spa", "configs/spa-smoke.yaml", "--run-dir", str(run_dir)]) == 0
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stages = manifest["stages"]
    for name in ("data", "round0/train", "round1/generate", "round1/label", "round1/train", "round2/train",
                 "eval/initial", "eval/round0", "eval/round1", "eval/round2"):
        assert stages[name]["status"] == "done", name
    gens = (run_dir / "round1" / "generations.jsonl").read_text().splitlines()
    assert len(gens) == 12  # 6 prompts x 2 samples
    labels = [json.loads(l) for l in (run_dir / "round1" / "labels.jsonl").read_text().splitlines()]
    assert labels and all(l["meta"]["reward_chosen"] >= l["meta"]["reward_rejected"] for l in labels)
    assert all(0.5 <= l["meta"]["confidence"] <= 1 for l in labels)
    p1 = {json.loads(l)["id"] for l in (run_dir / "data" / "round1_prompts.jsonl").read_text().splitlines()}
    p2 = {json.loads(l)["id"] for l in (run_dir / "data" / "round2_prompts.jsonl").read_text().splitlines()}
    assert p1 and p2 and not p1 & p2, "round prompt slices must be disjoint"
    assert stages["round1/train"]["result"]["lambda"] == 0.5 and stages["round2/train"]["result"]["lambda"] == 0.25
    assert (run_dir / "final" / "config.json").exists()
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert list(summary) == ["initial", "round0", "round1", "round2"]
    assert "| round2 |" in (run_dir / "eval" / "summary.md").read_text()
    # every round paired with the initial model over the same judged instructions
    assert all(summary[r]["vs_initial"]["n"] == summary["initial"]["n_total"] for r in ("round0", "round1", "round2"))
    assert "| Δ vs initial (paired) |" in (run_dir / "eval" / "summary.md").read_text()
    # the run's HTML report: the evaluations, each DPO stage's reward curves, the stages
    capsys.readouterr()
    assert main(["report", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / "report.html")
    page = (run_dir / "report.html").read_text()
    for text in ("<h3>round0/train</h3>", "<h3>round2/train</h3>", "implicit rewards", "reward accuracy",
                 "paired difference from initial", "<td>eval/round2</td><td>done</td>", "state: finished"):
        assert text in page, text
    assert page.count("<svg") == 3 * 4 + 2  # 3 DPO stages x (loss, rewards, accuracy, lr) + 2 evaluation charts

    # a run killed after round 1's training: forget round 2 and resume with the same command
    for name in [s for s in stages if s.startswith(("round2", "eval/round2"))]:
        del manifest["stages"][name]
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    before = (run_dir / "round1" / "labels.jsonl").read_text()
    capsys.readouterr()
    assert main(["run", "spa", "configs/spa-smoke.yaml", "--run-dir", str(run_dir)]) == 0
    again = json.loads((run_dir / "manifest.json").read_text())
    assert again["stages"]["round2/train"]["status"] == "done"
    assert (run_dir / "round1" / "labels.jsonl").read_text() == before  # finished stages were not redone
    assert len(again["resumed_at"]) == 1


def test_the_sampling_stage_runs_its_sections_processes_and_options(tmp_path, data_dir, monkeypatch):
    # sampling.processes and sampling.options reach the generator the stage builds, and the stage answers with it
    from selfalign.data import Response, read_records, write_jsonl
    from selfalign.data.loaders import load_prompts
    from selfalign.generation import make_generator
    from selfalign.generation.parallel import ParallelGenerator
    from selfalign.recipes import spa
    from selfalign.runs import Run

    built = []

    def spy(*args, **kwargs):
        built.append((args, kwargs))
        built.append(make_generator(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(spa, "make_generator", spy)
    run = Run(tmp_path, {}, "spa")
    write_jsonl(run.path("data", "round1_prompts.jsonl"),
                load_prompts(data_dir / "prompts" / "unlabelled_pool.jsonl", limit=3))
    config = spa.Config(samples_per_prompt=2, sampling=spa.SamplingConfig(
        max_new_tokens=6, batch_size=2, processes=2, options={"dtype": "float32", "max_cache_gb": 0.5}))
    summary = spa.generate(config, run, 1, "smollm2-135m")
    assert built[0] == (("auto", "smollm2-135m"), {"batch_size": 2, "processes": 2, "dtype": "float32",
                                                  "max_cache_gb": 0.5})
    assert isinstance(built[1], ParallelGenerator) and not built[1]._procs  # closed after the stage
    answers = read_records(run.path("round1", "generations.jsonl"), Response)
    assert summary["responses"] == len(answers) == 6 and {a.model for a in answers} == {"round0"}
