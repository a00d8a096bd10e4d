"""Training over several processes (`train.processes`, and sharded with `train.fsdp`), as gloo CPU processes on the
tiny model: the same steps and model as one process, a kill that takes the workers with it, resuming, and errors."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selfalign.data import Conversation, write_jsonl
from selfalign.errors import ConfigError, SelfalignError
from selfalign.training import DPOTrainConfig, SFTTrainConfig, train_sft

JOB = Path(__file__).with_name("resume_job.py")
CHILD_ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}  # the checkout under test



@pytest.fixture(autouse=True)
def _fail_rather_than_hang(monkeypatch):
    """A process left waiting on a collective its peers never reach fails after 2 minutes, not an hour."""
    monkeypatch.setenv("SELFALIGN_COLLECTIVE_TIMEOUT", "120")


def load_job():
    """The job as an importable module: its hook and callbacks travel to spawned workers by reference, and the
    workers find it on the sys.path spawn hands them."""
    if str(JOB.parent) not in sys.path:
        sys.path.insert(0, str(JOB.parent))
    return importlib.import_module("resume_job")


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train" / "log.jsonl").read_text().splitlines()]

COMPARED = ("loss", "grad_norm", "examples", "tokens", "loss_normaliser", "eps", "noisy", "rewards/accuracy")


def assert_same_training(a_dir, b_dir, a_log, b_log):
    assert [r["step"] for r in a_log] == [r["step"] for r in b_log] == [1, 2, 3]
    for a, b in zip(a_log, b_log):
        for k in COMPARED:
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (k, a, b)
    a = load_file(str(a_dir / "final" / "model.safetensors"))
    b = load_file(str(b_dir / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated", "fsdp"])
@pytest.mark.parametrize("kind", ["dpo", "dpo-cached", "sft"])
def test_two_processes_train_the_same_model_as_one(kind, fsdp, tmp_path, tiny_model_dir, real_pairs):
    # dpo: full fine-tuning with a live frozen reference (sharded too under fsdp), extrapolated log-probs and a
    # stateful noise hook; dpo-cached: reference log-probs scored before training; sft: LoRA (frozen and trainable
    # weights in one sharded layer). 5 pairs in batches of 2: every epoch ends with a batch of 1, which leaves one
    # process only padding to compute
    job = load_job()
    pairs_file = write_jsonl(tmp_path / "pairs.jsonl", real_pairs[:5])
    one = job.run(kind, str(tiny_model_dir), str(pairs_file), str(tmp_path / "one"), lora_dropout=0.0)
    two = job.run(kind, str(tiny_model_dir), str(pairs_file), str(tmp_path / "two"), processes=2, lora_dropout=0.0,
                  fsdp=fsdp)
    assert_same_training(tmp_path / "one", tmp_path / "two", one, two)
    if kind != "sft":
        assert any(r["examples"] == 1 for r in one)
    assert one[2]["loss"] != pytest.approx(one[0]["loss"], abs=1e-4)  # training moved the model
    if kind == "dpo":  # the stateful noise hook saw the whole micro-batch in each process, and decided as in one
        assert any(r["noisy"] > 0 for r in one)
    if kind == "dpo-cached":  # each process scored its share of the reference log-probs once
        caches = sorted((tmp_path / "two" / "train").glob("ref_logps.*.jsonl"))
        assert sorted(len(c.read_text().splitlines()) for c in caches) == [2, 3]


@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated-resumed-in-one", "fsdp-resumed-in-fsdp"])
def test_a_killed_multi_process_run_takes_its_workers_with_it_and_resumes(fsdp, tmp_path, tiny_model_dir,
                                                                          real_pairs):
    # the checkpoint a sharded run writes is gathered from the shards, and sharded out again when it resumes
    job = load_job()
    pairs_file = write_jsonl(tmp_path / "pairs.jsonl", real_pairs[:4])
    straight = job.run("dpo", str(tiny_model_dir), str(pairs_file), str(tmp_path / "a"))

    killed = subprocess.run([sys.executable, str(JOB), "dpo", str(tiny_model_dir), str(pairs_file),
                             str(tmp_path / "b"), "2", "2"] + (["fsdp"] if fsdp else []), capture_output=True,
                            text=True, timeout=600, env=CHILD_ENV)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    time.sleep(5)  # an orphaned worker would finish step 3 and write the final model in this time
    assert not (tmp_path / "b" / "final").exists()
    assert (tmp_path / "b" / "train" / "checkpoints" / "step-2").is_dir()
    assert [r["step"] for r in read_log(tmp_path / "b")] == [1, 2]

    resumed = job.run("dpo", str(tiny_model_dir), str(pairs_file), str(tmp_path / "b"), processes=2 if fsdp else 1,
                      fsdp=fsdp)
    assert_same_training(tmp_path / "a", tmp_path / "b", straight, resumed)
    assert any(r["noisy"] > 0 for r in straight)  # the hook's restored state mattered


def test_a_workers_error_comes_back_as_one_line(tmp_path, tiny_model_dir):
    cfg = SFTTrainConfig(max_steps=1, batch_size=2, processes=2, max_length=64, max_prompt_length=32)
    no_answer = [Conversation("c1", [{"role": "user", "content": "Hi"}])]  # nothing to train on
    with pytest.raises(SelfalignError, match="conversation 'c1': an SFT conversation must end with an assistant") as e:
        train_sft(str(tiny_model_dir), no_answer, cfg, tmp_path / "train", tmp_path / "final", verbose=False)
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)


def test_settings_that_cannot_work_with_several_processes_are_refused(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match=r"processes \(2\) is above batch_size \(1\)"):
        DPOTrainConfig(batch_size=1, processes=2)
    with pytest.raises(ValueError, match="processes must be >= 1"):
        DPOTrainConfig(processes=0)
    with pytest.raises(ValueError, match="fsdp shards the model over several processes"):
        DPOTrainConfig(fsdp=True)
    convs = [Conversation("c1", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])]
    cfg = SFTTrainConfig(max_steps=1, batch_size=2, processes=2, device="cpu:0", max_length=64, max_prompt_length=32)
    with pytest.raises(ConfigError, match="device must be auto, cuda or cpu, not 'cpu:0'"):
        train_sft(str(tiny_model_dir), convs, cfg, tmp_path / "train", tmp_path / "final", verbose=False)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            train_sft(str(tiny_model_dir), convs, SFTTrainConfig(**{**cfg.__dict__, "device": "cuda"}),
                      tmp_path / "train", tmp_path / "final", verbose=False)
    assert not (tmp_path / "train").exists()


def test_lora_with_dropout_trains_over_two_processes_and_the_log_is_written_once(tmp_path, tiny_model_dir,
                                                                                   real_pairs):
    job = load_job()
    pairs_file = write_jsonl(tmp_path / "pairs.jsonl", real_pairs[:4])
    job.run("sft", str(tiny_model_dir), str(pairs_file), str(tmp_path / "r"), processes=2)
    rows = [json.loads(line) for line in (tmp_path / "r" / "train" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert json.loads((tmp_path / "r" / "train" / "done.json").read_text())["steps"] == 3
