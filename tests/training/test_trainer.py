"""The training loop on a tiny random-init model: resume after SIGKILL, the reference cache, accumulation, the SPA
noise hook with extrapolated log-probs, and saved models."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selfalign.data import write_jsonl
from selfalign.models import load_model
from selfalign.training import DPOTrainConfig, LoraConfig, train_dpo
from selfalign.training.data import collate_pairs, encode_pairs
from selfalign.training.forward import sequence_logps_of
from selfalign.training.losses import dpo_loss, sequence_logps
from selfalign.training.refcache import pair_logps
from selfalign.training.trainer import DPOObjective

JOB = Path(__file__).with_name("resume_job.py")
CHILD_ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}  # the checkout under test


def load_job():
    spec = importlib.util.spec_from_file_location("resume_job", JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train" / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["dpo", "sft"])
def test_resume_after_kill_matches_uninterrupted_run(kind, tmp_path, tiny_model_dir, real_pairs):
    job = load_job()
    pairs_file = write_jsonl(tmp_path / "pairs.jsonl", real_pairs[:4])
    straight = job.run(kind, str(tiny_model_dir), str(pairs_file), str(tmp_path / "a"))

    killed = subprocess.run([sys.executable, str(JOB), kind, str(tiny_model_dir), str(pairs_file),
                             str(tmp_path / "b"), "2"], capture_output=True, text=True, timeout=600,
                            env=CHILD_ENV)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (tmp_path / "b" / "train" / "checkpoints" / "step-2").is_dir()
    assert not (tmp_path / "b" / "final").exists()
    assert [r["step"] for r in read_log(tmp_path / "b")] == [1, 2]
    # weights get the permissions the umask gives the files beside them (safetensors alone writes 0600)
    step2 = tmp_path / "b" / "train" / "checkpoints" / "step-2"
    assert mode(step2 / "trainable.safetensors") == mode(step2 / "state.pt")

    resumed = job.run(kind, str(tiny_model_dir), str(pairs_file), str(tmp_path / "b"))
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for a, b in zip(straight, resumed):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6), (a, b)
    assert resumed[2]["loss"] != pytest.approx(resumed[1]["loss"], abs=1e-4)  # the steps do differ
    if kind == "dpo":
        assert any(r["noisy"] > 0 for r in straight)  # the hook's state mattered
    a = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert mode(tmp_path / "b" / "final" / "model.safetensors") == mode(tmp_path / "b" / "final" / "config.json")


def mode(path) -> int:
    return path.stat().st_mode & 0o777


class Boom:
    """Stands in for the reference model: any use of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"reference model used ({name})")


def test_reference_cache_hit_does_not_run_the_model(tmp_path, tiny_model_dir, tokenizer, real_pairs):
    model = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    exs = encode_pairs(tokenizer, real_pairs[:5], max_length=64, max_prompt_length=32)
    cache = tmp_path / "ref.jsonl"
    first = pair_logps(model, exs[:3], tokenizer.pad_token_id, batch_size=2, cache=cache)
    assert len(cache.read_text().splitlines()) == 3
    with torch.no_grad():
        direct = sequence_logps_of(model, collate_pairs(exs[:3], tokenizer.pad_token_id))
    assert torch.allclose(first, direct.view(2, 3).T, atol=1e-4)

    assert torch.equal(pair_logps(Boom(), exs[:3], tokenizer.pad_token_id, cache=cache), first)
    both = pair_logps(model, exs, tokenizer.pad_token_id, cache=cache)  # only the 2 new pairs run
    assert torch.equal(both[:3], first) and len(cache.read_text().splitlines()) == 5
    changed = encode_pairs(tokenizer, real_pairs[:1], max_length=48, max_prompt_length=32)  # other tokens
    with pytest.raises(AssertionError, match="reference model used"):
        pair_logps(Boom(), changed, tokenizer.pad_token_id, cache=cache)


def test_train_dpo_fills_the_cache_once(tmp_path, tiny_model_dir, real_pairs):
    cfg = DPOTrainConfig(max_steps=1, batch_size=2, max_length=64, max_prompt_length=32, save_steps=0)
    summary = train_dpo(str(tiny_model_dir), real_pairs[:4], cfg, tmp_path / "train", tmp_path / "final",
                        verbose=False)
    assert summary["reference_cached"]
    [cache] = (tmp_path / "train").glob("ref_logps.*.jsonl")
    rows = cache.read_text()
    assert len(rows.splitlines()) == 4
    log = read_log(tmp_path)
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    assert log[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    # a second run in the same folder (e.g. resuming) reads the cache instead of recomputing it
    (tmp_path / "train" / "done.json").unlink()
    train_dpo(str(tiny_model_dir), real_pairs[:4], cfg, tmp_path / "train", tmp_path / "final", verbose=False)
    assert cache.read_text() == rows


def test_grad_accumulation_matches_one_big_batch(tmp_path, tiny_model_dir, real_pairs):
    common = dict(max_steps=1, max_length=64, max_prompt_length=32, learning_rate=1e-3, warmup_ratio=0.0,
                  save_steps=0, group_by_length=False)
    big = train_dpo(str(tiny_model_dir), real_pairs[:4], DPOTrainConfig(batch_size=4, **common), tmp_path / "a/train",
                    tmp_path / "a/final", verbose=False)
    acc = train_dpo(str(tiny_model_dir), real_pairs[:4], DPOTrainConfig(batch_size=2, grad_accum=2, **common),
                    tmp_path / "b/train", tmp_path / "b/final", verbose=False)
    assert big["final"]["examples"] == acc["final"]["examples"] == 4
    for k in ("loss", "grad_norm", "rewards/accuracy"):
        assert acc["final"][k] == pytest.approx(big["final"][k], abs=1e-5)
    # Adam's first step moves each weight by lr * g / (|g| + 1e-8). Where |g| is within a few 1e-8 of zero, float
    # rounding in the summed gradient (one sum or two) decides that size: compare the weights whose gradient is
    # clearly non-zero (the big batch moved them by >= 0.9 lr), and require they are nearly all of them.
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    a = load_file(str(tmp_path / "a/final/model.safetensors"))
    b = load_file(str(tmp_path / "b/final/model.safetensors"))
    firm = {k: (a[k] - start[k]).abs() >= 0.9e-3 for k in a}
    assert sum(int(m.sum()) for m in firm.values()) > 0.9 * sum(t.numel() for t in a.values())
    assert all(torch.allclose(a[k][m], b[k][m], rtol=0, atol=1e-6) for k, m in firm.items())


def test_one_epoch_sees_each_pair_once_when_grad_accum_does_not_divide_it(tmp_path, tiny_model_dir, real_pairs):
    # 5 batches of 1 pair, 2 per step: 3 steps, the last one holding the 5th batch alone (not one of epoch 2's)
    cfg = DPOTrainConfig(batch_size=1, grad_accum=2, epochs=1, max_length=64, max_prompt_length=32, save_steps=0)
    summary = train_dpo(str(tiny_model_dir), real_pairs[:5], cfg, tmp_path / "train", tmp_path / "final", verbose=False)
    rows = [json.loads(line) for line in (tmp_path / "train" / "log.jsonl").read_text().splitlines()]
    assert summary["steps"] == 3
    assert [r["examples"] for r in rows] == [2, 2, 1]


def test_the_sft_log_counts_examples_and_the_tokens_the_loss_averages_over(tmp_path, tiny_model_dir, real_pairs):
    from selfalign.data import Conversation
    from selfalign.training import SFTTrainConfig, train_sft

    convs = [Conversation(p.id, p.messages + [{"role": "assistant", "content": p.chosen}]) for p in real_pairs[:5]]
    cfg = SFTTrainConfig(batch_size=2, epochs=1, max_length=64, max_prompt_length=32, save_steps=0)
    train_sft(str(tiny_model_dir), convs, cfg, tmp_path / "train", tmp_path / "final", verbose=False)
    rows = [json.loads(line) for line in (tmp_path / "train" / "log.jsonl").read_text().splitlines()]
    assert sorted(r["examples"] for r in rows) == [1, 2, 2]
    assert all(r["loss_normaliser"] > r["examples"] for r in rows)  # trained tokens, not conversations


def test_noise_hook_gets_extrapolated_logps_and_sets_eps(tiny_model_dir, tokenizer, real_pairs):
    policy = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    reference = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    with torch.no_grad():  # make policy != reference
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    exs = encode_pairs(tokenizer, real_pairs[:2], max_length=64, max_prompt_length=32)
    seen = []

    def hook(state):
        seen.append(state)
        return torch.tensor([0.3, 0.0])

    cfg = DPOTrainConfig(beta=0.1, max_length=64, max_prompt_length=32)
    lam = 0.5
    objective = DPOObjective(exs, tokenizer.pad_token_id, cfg, reference=reference, noise_hook=hook,
                             extrapolation_lambda=lam)
    batch = objective.collate([0, 1])
    loss, metrics = objective.loss(policy, batch, step=3, max_steps=10)

    with torch.no_grad():
        hp = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        hr = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    pol, ref = sequence_logps(hp, batch["labels"]), sequence_logps(hr, batch["labels"])
    ext = sequence_logps((1 + lam) * hp - lam * hr, batch["labels"])
    [s] = seen
    assert (s.step, s.max_steps, s.beta, s.ids) == (3, 10, 0.1, [e.id for e in exs])
    assert torch.allclose(torch.cat([s.policy_chosen, s.policy_rejected]), pol, atol=1e-4)
    assert torch.allclose(torch.cat([s.reference_chosen, s.reference_rejected]), ref, atol=1e-4)
    assert torch.allclose(torch.cat([s.extrapolated_chosen, s.extrapolated_rejected]), ext, atol=1e-4)
    assert not torch.allclose(ext, pol, atol=1e-2)  # extrapolation is not a no-op here
    expected, _ = dpo_loss(pol[:2], pol[2:], ref[:2], ref[2:], 0.1, eps=torch.tensor([0.3, 0.0]), reduction="sum")
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert metrics["noisy"].item() == 1.0 and metrics["eps"].item() == pytest.approx(0.3)
    loss.backward()  # the hook's tensors are detached; the loss still trains the policy
    assert policy.model.embed_tokens.weight.grad is not None


@pytest.mark.parametrize("merge", [True, False])
def test_lora_final_model_loads(merge, tmp_path, tiny_model_dir, real_pairs, tokenizer):
    cfg = DPOTrainConfig(max_steps=2, batch_size=2, max_length=64, max_prompt_length=32, learning_rate=5e-3,
                         warmup_ratio=0.0, save_steps=0, merge_lora=merge,
                         lora=LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    summary = train_dpo(str(tiny_model_dir), real_pairs[:4], cfg, tmp_path / "train", tmp_path / "final",
                        verbose=False)
    assert read_log(tmp_path)[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # reference = base at step 1
    final = Path(summary["final_dir"])
    assert (final / "adapter_config.json").exists() != merge
    assert (final / "model.safetensors").exists() == merge
    assert "chat_template" in (final / "tokenizer_config.json").read_text() or (final / "chat_template.jinja").exists()
    trained = load_model(str(final), device="cpu")
    base = load_model(str(tiny_model_dir), device="cpu")
    batch = collate_pairs(encode_pairs(tokenizer, real_pairs[:2], 64, 32), tokenizer.pad_token_id)
    with torch.no_grad():
        assert not torch.allclose(sequence_logps_of(trained, batch), sequence_logps_of(base, batch), atol=1e-4)


def test_resume_refuses_a_checkpoint_made_for_other_settings_or_data(tmp_path, tiny_model_dir, real_pairs):
    from selfalign.errors import ConfigError, DataError

    class Killed(Exception):
        pass

    def kill(step, path):
        raise Killed

    common = dict(batch_size=2, max_length=64, max_prompt_length=32, save_steps=2)
    train, final = tmp_path / "train", tmp_path / "final"
    with pytest.raises(Killed):
        train_dpo(str(tiny_model_dir), real_pairs[:4], DPOTrainConfig(max_steps=4, **common), train, final,
                  on_checkpoint=kill, verbose=False)
    # more steps would resume the old schedule's learning rate and run out of planned batches; other data would
    # take the saved batch indices to other pairs
    with pytest.raises(ConfigError, match=r"step-2: .*max_steps 4 -> 6"):
        train_dpo(str(tiny_model_dir), real_pairs[:4], DPOTrainConfig(max_steps=6, **common), train, final,
                  verbose=False)
    with pytest.raises(ConfigError, match=r"examples 4 -> 3"):
        train_dpo(str(tiny_model_dir), real_pairs[:3], DPOTrainConfig(max_steps=4, **common), train, final,
                  verbose=False)
    with pytest.raises(ConfigError, match=r"grad_accum 1 -> 2"):
        train_dpo(str(tiny_model_dir), real_pairs[:4], DPOTrainConfig(max_steps=4, grad_accum=2, **common), train,
                  final, verbose=False)
    # a checkpoint whose optimizer state has other parameter groups (an older selfalign's) is a clear error too
    state_path = train / "checkpoints" / "step-2" / "state.pt"
    state = torch.load(state_path, weights_only=True)
    saved_optimizer = state["optimizer"]
    state["optimizer"] = {"state": {}, "param_groups": saved_optimizer["param_groups"][:1]}
    torch.save(state, state_path)
    with pytest.raises(ConfigError, match=r"step-2: its optimizer state does not fit this training"):
        train_dpo(str(tiny_model_dir), real_pairs[:4], DPOTrainConfig(max_steps=4, **common), train, final,
                  verbose=False)
    state["optimizer"] = saved_optimizer
    torch.save(state, state_path)
    summary = train_dpo(str(tiny_model_dir), real_pairs[:4], DPOTrainConfig(max_steps=4, **common), train, final,
                        verbose=False)
    assert summary["resumed_from"] == 2 and summary["steps"] == 4
    with pytest.raises(DataError, match="no training examples"):
        train_dpo(str(tiny_model_dir), [], DPOTrainConfig(max_steps=4, **common), tmp_path / "empty",
                  tmp_path / "empty_final", verbose=False)


def test_weight_decay_spares_biases_and_norm_weights(tmp_path, tiny_model_dir, real_pairs):
    common = dict(max_steps=1, batch_size=2, max_length=64, max_prompt_length=32, learning_rate=1e-2,
                  warmup_ratio=0.0, save_steps=0)
    for name, wd in (("plain", 0.0), ("decayed", 0.5)):
        train_dpo(str(tiny_model_dir), real_pairs[:2], DPOTrainConfig(weight_decay=wd, **common),
                  tmp_path / name / "train", tmp_path / name / "final", verbose=False)
    plain = load_file(str(tmp_path / "plain" / "final" / "model.safetensors"))
    decayed = load_file(str(tmp_path / "decayed" / "final" / "model.safetensors"))
    # one step from the same start with the same gradients: only the decay can tell the two runs apart
    vectors = [k for k in plain if plain[k].ndim == 1]
    matrices = [k for k in plain if plain[k].ndim >= 2]
    assert vectors and matrices
    assert all(torch.equal(plain[k], decayed[k]) for k in vectors)
    assert all(not torch.equal(plain[k], decayed[k]) for k in matrices)


def test_orpo_step_loss_is_the_papers_formula_and_training_raises_the_odds_ratio(tmp_path, tiny_model_dir,
                                                                                   real_pairs, tokenizer):
    from selfalign.training import ORPOTrainConfig, train_orpo

    pairs = real_pairs[:4]
    config = ORPOTrainConfig(max_steps=12, batch_size=4, max_length=64, max_prompt_length=32, learning_rate=3e-3,
                             warmup_ratio=0.0, save_steps=0, group_by_length=False, odds_ratio_weight=0.5)
    # step 1's loss from a plain full forward of the start model (not the trainer's head-on-response-rows path):
    # mean token NLL of chosen + lambda x -log sigmoid(log odds(chosen) - log odds(rejected)), averaged over pairs
    batch = collate_pairs(encode_pairs(tokenizer, pairs, 64, 32), tokenizer.pad_token_id)
    with torch.no_grad():
        logits = load_model(str(tiny_model_dir)).eval()(input_ids=batch["input_ids"],
                                                        attention_mask=batch["attention_mask"]).logits
    mean = sequence_logps(logits, batch["labels"]) / (batch["labels"][:, 1:] != -100).sum(-1)
    odds = mean - torch.log(1 - torch.exp(mean))
    expected = (-mean[:4] - 0.5 * torch.nn.functional.logsigmoid(odds[:4] - odds[4:])).mean()
    summary = train_orpo(str(tiny_model_dir), pairs, config, tmp_path / "train", tmp_path / "final", verbose=False)
    log = read_log(tmp_path)
    assert log[0]["loss"] == pytest.approx(float(expected), abs=1e-5)
    assert log[0]["examples"] == 4 and log[0]["loss_normaliser"] == 4  # averaged over pairs, not tokens
    # the preference is learned: chosen's odds rise against rejected's (swapped halves would lower them)
    assert log[-1]["log_odds_ratio"] > log[0]["log_odds_ratio"] + 0.5 and log[-1]["rewards/accuracy"] == 1.0
    assert log[-1]["nll"] < log[0]["nll"]
    assert summary["steps"] == 12 and (tmp_path / "final" / "model.safetensors").exists()
    from selfalign.training.evaluate import orpo_metrics  # the held-out scoring computes the same loss

    assert orpo_metrics(str(tiny_model_dir), pairs, config)["loss"] == pytest.approx(log[0]["loss"], abs=1e-5)


def test_a_non_finite_step_stops_training_before_a_nan_model_is_saved(tmp_path, tiny_model_dir, real_pairs):
    from selfalign.data import Conversation
    from selfalign.errors import SelfalignError
    from selfalign.training import SFTTrainConfig, train_sft

    convs = [Conversation(p.id, p.messages + [{"role": "assistant", "content": p.chosen}]) for p in real_pairs[:4]]
    config = SFTTrainConfig(max_steps=4, batch_size=4, max_length=64, max_prompt_length=32, learning_rate=1e30,
                            warmup_ratio=0.0, save_steps=0)  # one step to weights of 1e30: the next loss is not finite
    with pytest.raises(SelfalignError, match=r"step \d: the loss \(.*\) or the gradient norm \(.*\) is not finite; "
                                             r"the step was not applied"):
        train_sft(str(tiny_model_dir), convs, config, tmp_path / "train", tmp_path / "final", verbose=False)
    assert not (tmp_path / "final").exists()
