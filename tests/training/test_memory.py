"""The memory check before training (`train.memory_check`): it measures the longest micro-batch, changes nothing the
run computes, and stops a run that cannot fit in one line before its first step."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from selfalign.errors import SelfalignError
from selfalign.models import load_model
from selfalign.training import DPOTrainConfig, train_dpo
from selfalign.training import memory
from selfalign.training.data import encode_pairs
from selfalign.training.noise import SelfRefinementHook
from selfalign.training.trainer import DPOObjective


def test_the_heaviest_batch_has_the_most_trained_tokens_at_the_longest_width(tokenizer, real_pairs):
    # a long prompt with a short answer: its logits weigh less than a shorter example's long answer
    assert memory.heaviest_batch([5, 40, 7, 33, 12], [4, 3, 1, 20, 9], 2) == ([4, 3], 40)
    assert memory.heaviest_batch([5, 40], [1, 2], 4) == ([0, 1], 40)  # fewer examples than a batch: all of them
    exs = encode_pairs(tokenizer, real_pairs[:2], max_length=256, max_prompt_length=128)
    objective = DPOObjective(exs, tokenizer.pad_token_id, DPOTrainConfig(), ref_logps=torch.zeros(2, 2))
    batch = objective.collate([0, 1])
    wide = memory.widen(batch, batch["input_ids"].shape[1] + 5, tokenizer.pad_token_id)
    assert wide["input_ids"].shape == (4, batch["input_ids"].shape[1] + 5)
    assert (wide["attention_mask"][:, -5:] == 0).all() and (wide["labels"][:, -5:] == -100).all()
    assert (wide["input_ids"][:, -5:] == tokenizer.pad_token_id).all() and wide["ids"] == batch["ids"]
    assert torch.equal(wide["labels"][:, :-5], batch["labels"])


def train(tmp_path, model_dir, pairs, name, check, **overrides):
    # SPA's noise hook from the first step, logging its flags: the check's pass must not reach it
    hook = SelfRefinementHook(alpha=0.1, noisy_fraction=0.25, window=6, warmup_fraction=0.0,
                              log_path=tmp_path / name / "flags.jsonl")
    cfg = DPOTrainConfig(max_steps=4, batch_size=2, max_length=128, max_prompt_length=64, learning_rate=1e-3,
                         warmup_ratio=0.0, save_steps=0, memory_check=check, **overrides)
    summary = train_dpo(str(model_dir), pairs, cfg, tmp_path / name / "train", tmp_path / name / "final",
                        noise_hook=hook, extrapolation_lambda=0.5, verbose=True)
    return summary, load_file(tmp_path / name / "final" / "model.safetensors"), hook


def test_the_check_measures_and_changes_nothing(tmp_path, tiny_model_dir, real_pairs, capsys):
    checked, weights, hook = train(tmp_path, tiny_model_dir, real_pairs, "checked", "always")
    plain, plain_weights, plain_hook = train(tmp_path, tiny_model_dir, real_pairs, "plain", "never")
    assert hook.state_dict() == plain_hook.state_dict() and hook.seen == 8  # 4 steps of 2 pairs: the steps only
    assert weights.keys() == plain_weights.keys()
    assert all(torch.equal(weights[k], plain_weights[k]) for k in weights)  # bit-identical
    assert (tmp_path / "checked" / "flags.jsonl").read_text() == (tmp_path / "plain" / "flags.jsonl").read_text()
    assert (tmp_path / "checked" / "flags.jsonl").read_text()  # the hook did flag pairs, in the steps only
    logs = [(tmp_path / run / "train" / "log.jsonl").read_text().splitlines() for run in ("checked", "plain")]
    assert [json.loads(r)["loss"] for r in logs[0]] == [json.loads(r)["loss"] for r in logs[1]]
    report = checked["memory_check"]
    assert "memory_check" not in plain
    assert report["device"] == "cpu" and report["examples"] == 2 and 0 < report["trained_tokens"] < 4 * 128
    assert 0 < report["tokens"] <= 128
    # on a CPU the peak is the process's resident size, the loaded model and the libraries included
    assert 0 < report["optimizer_gb"] < report["needed_gb"] < report["available_gb"], report
    assert report["optimizer_gb"] == pytest.approx(2 * 4 * sum(v.numel() for v in weights.values()) / 2**30,
                                                   abs=1e-3)  # two fp32 moments per trained weight (tied: once)
    assert "[train] memory check: the heaviest micro-batch (2 examples of up to " in capsys.readouterr().err


def test_a_batch_that_cannot_fit_stops_the_run_before_its_first_step(tmp_path, tiny_model_dir, real_pairs,
                                                                      monkeypatch):
    monkeypatch.setattr(memory, "_available", lambda device: 2**20)  # a device with 1 MiB
    with pytest.raises(SelfalignError) as err:
        train(tmp_path, tiny_model_dir, real_pairs, "small", "always")
    message = str(err.value)
    assert "\n" not in message and message.startswith("train: the heaviest micro-batch (2 examples of up to "), message
    assert "where 0.0 GiB is available: lower train.batch_size" in message and "train.memory_check: never" in message
    assert not (tmp_path / "small" / "train" / "log.jsonl").exists()  # no step was taken
    assert not (tmp_path / "small" / "final").exists()
    # and a pass that runs out of memory says so, in one line, the same way
    monkeypatch.undo()

    def out_of_memory(self, *args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(DPOObjective, "loss", out_of_memory)
    with pytest.raises(SelfalignError, match=r"^train: the heaviest micro-batch \(2 examples of up to \d+ tokens, "
                                             r"\d+ trained\) "
                                             r"ran out of memory on cpu in its forward and backward beside AdamW's "
                                             r"state: lower "):
        train(tmp_path, tiny_model_dir, real_pairs, "oom", "always")


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_the_check_restores_the_random_generator_and_drops_its_gradients(grad_accum, tiny_model_dir, tokenizer,
                                                                         real_pairs):
    policy = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    policy.train()
    for module in policy.modules():  # attention dropout: the pass draws random numbers
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
    exs = encode_pairs(tokenizer, real_pairs[:4], max_length=64, max_prompt_length=32)
    cfg = DPOTrainConfig(max_length=64, max_prompt_length=32)
    objective = DPOObjective(exs, tokenizer.pad_token_id, cfg, reference=policy)
    params = [p for p in policy.parameters() if p.requires_grad]
    before = torch.random.get_rng_state()
    torch.nn.functional.dropout(torch.ones(4), 0.5, training=True)  # (draws: the state moves)
    moved = torch.random.get_rng_state()
    assert not torch.equal(before, moved)
    result = memory.check_memory(policy, objective, params, 2, grad_accum, "cpu", None, 10)
    assert torch.equal(torch.random.get_rng_state(), moved)
    assert all(p.grad is None for p in params)
    assert result.examples == 2 and 0 < result.tokens <= 64 and result.trained_tokens > 0


def test_a_figure_near_the_limit_passes_with_a_warning(capsys):
    memory.report(memory.MemoryCheck("cuda:0", 4, 1024, 2100, needed_gb=75.0, optimizer_gb=12.6, available_gb=79.1))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs 75.00 GiB on cuda:0 (AdamW's state 12.60 of it) of 79.1 GiB available: " \
        "close to the limit" in err, err
    memory.report(memory.MemoryCheck("cuda:0", 4, 1024, 2100, needed_gb=31.2, optimizer_gb=12.6, available_gb=79.1))
    assert "close to the limit" not in capsys.readouterr().err
