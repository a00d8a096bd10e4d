"""Kill -9 a generation stage in a subprocess and resume it: nothing lost, nothing duplicated, same samples."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from selfalign.runs import ResumableJsonl, Run
from selfalign.errors import SelfalignError


def gen_cmd(prompts, out):
    return [sys.executable, "-m", "selfalign.cli", "generate", "--prompts", str(prompts), "--out", str(out),
            "--batch-size", "2", "--max-new-tokens", "8", "--n", "2", "--temperature", "0.8", "--seed", "7", "--quiet"]


def lines(path):
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


def test_kill_and_resume_generation(tmp_path, real_prompts):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in real_prompts[:4]))  # 4 prompts x 2 samples
    out = tmp_path / "killed.jsonl"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(gen_cmd(prompts, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(lines(out)) < 2 and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "generation finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(lines(out))
    assert 2 <= done_before < 8
    with open(out, "a") as f:  # what a kill in the middle of a write leaves behind
        f.write('{"prompt_id": "torn", "resp')

    subprocess.run(gen_cmd(prompts, out), env=env, check=True, capture_output=True)
    resumed = lines(out)
    keys = [(r["prompt_id"], r["sample_index"]) for r in resumed]
    assert len(keys) == 8 and len(set(keys)) == 8, "a record was lost or duplicated"

    straight = tmp_path / "straight.jsonl"
    subprocess.run(gen_cmd(prompts, straight), env=env, check=True, capture_output=True)
    by_key = {(r["prompt_id"], r["sample_index"]): r["response"] for r in lines(straight)}
    assert {k: r["response"] for k, r in zip(keys, resumed)} == by_key, "resumed samples differ from a straight run"


def test_resumable_jsonl_skips_done_keys(tmp_path):
    path = tmp_path / "x.jsonl"
    with ResumableJsonl(path, key=lambda r: r["k"]) as w:
        assert w.append([{"k": 1}, {"k": 2}]) == 2
    with ResumableJsonl(path, key=lambda r: r["k"]) as w:
        assert w.done == {1, 2}
        assert w.append([{"k": 2}, {"k": 3}]) == 1
    assert [json.loads(l)["k"] for l in path.read_text().splitlines()] == [1, 2, 3]


def test_resumable_jsonl_refuses_a_bad_line_before_good_ones(tmp_path):
    """Only a torn last line (no newline after it) comes from a crash; a bad complete line is an edit, and dropping it
    would drop every good record after it."""
    path = tmp_path / "x.jsonl"
    path.write_text('{"k": 1}\n{garbage\n{"k": 3}\n{"k": 4, "torn')
    before = path.read_bytes()
    with pytest.raises(SelfalignError, match=r"x.jsonl:2: not a JSON record: .*nothing was deleted"):
        ResumableJsonl(path, key=lambda r: r["k"])
    assert path.read_bytes() == before
    path.write_text('{"k": 1\n{"k": 2}\n')  # a hand edit broke the first line: fix it (the records after it count)
    with pytest.raises(SelfalignError, match=r"x.jsonl:1: not a JSON record: .*changed by hand"):
        ResumableJsonl(path, key=lambda r: r["k"])
    path.write_text('{"k": 1}\n\n{"k": 3}\n{"k": 4, "torn')  # a blank line is skipped; the torn tail is dropped
    with ResumableJsonl(path, key=lambda r: r["k"]) as w:
        assert w.done == {1, 3}
    assert path.read_text() == '{"k": 1}\n\n{"k": 3}\n'


@pytest.mark.parametrize("content, line, why", [
    ('[{"id": 1, "prompt": "a"}]', 1, "it does not hold JSON lines"),  # a JSON array given as the output
    ('{"id": 1, "prompt": "a"}\n', 1, "a line without this file's key fields"),  # another tool's JSONL
    ('{"id": 1, "prompt": "a"}', 1, "a line without this file's key fields"),  # ...without a final newline
    ("some notes", 1, "it does not hold JSON lines"),
    ("{draft notes", 1, "it does not hold JSON lines"),  # a cut record of this writer would start with {"
])
def test_resumable_jsonl_refuses_a_file_that_is_not_its_own_and_changes_nothing(tmp_path, content, line, why):
    path = tmp_path / "prompts.json"
    path.write_text(content)
    with pytest.raises(SelfalignError, match=rf"prompts.json:{line}: not a file of records this command writes "
                                             rf"\({why}\); nothing was changed"):
        ResumableJsonl(path, key=lambda r: r["k"])
    assert path.read_text() == content
    with pytest.raises(SelfalignError, match="is a folder; give a file path"):
        ResumableJsonl(tmp_path, key=lambda r: r["k"])
    with pytest.raises(SelfalignError, match="cannot create its folder"):
        ResumableJsonl(path / "under_a_file.jsonl", key=lambda r: r["k"])


def test_resumable_jsonl_keeps_a_whole_last_record_that_lost_only_its_newline(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"k": 1}\n{"k": 2}')
    with ResumableJsonl(path, key=lambda r: r["k"]) as w:
        assert w.done == {1, 2}
        w.append([{"k": 3}])
    assert path.read_text() == '{"k": 1}\n{"k": 2}\n{"k": 3}\n'


def test_run_stages_skip_when_done_and_refuse_changed_config(tmp_path):
    calls = []
    run = Run(tmp_path / "run", {"a": 1}, recipe="test", seed=0)
    assert run.stage("one", lambda: calls.append(1) or {"n": 1}) == {"n": 1}
    run = Run(tmp_path / "run", {"a": 1}, recipe="test", seed=0)  # same command again
    assert run.stage("one", lambda: calls.append(2) or {"n": 2}) == {"n": 1}
    assert calls == [1]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["one"]["status"] == "done" and manifest["versions"]["torch"]
    with pytest.raises(SelfalignError, match="config differs"):
        Run(tmp_path / "run", {"a": 2}, recipe="test")
    # the message names each changed key, dotted, with both values (a sampling batch_size may change: see
    # test_a_run_resumes_on_other_hardware_and_under_a_newer_selfalign)
    Run(tmp_path / "nested", {"sampling": {"temperature": 0.8, "seed": 1}, "b": [1]}, recipe="test")
    with pytest.raises(SelfalignError) as err:
        Run(tmp_path / "nested", {"sampling": {"temperature": 0.4, "seed": 1}, "b": [1]}, recipe="test")
    assert "(sampling.temperature: 0.8 -> 0.4); use a new --run-dir" in str(err.value)
    # how often progress is printed changes nothing a run computes: a resume may change it, and it is recorded
    Run(tmp_path / "logging", {"train": {"log_steps": 1, "lr": 1.0}}, recipe="test")
    run = Run(tmp_path / "logging", {"train": {"log_steps": 5, "lr": 1.0}}, recipe="test")
    assert json.loads(run.manifest_path.read_text())["config"]["train"]["log_steps"] == 5
    with pytest.raises(SelfalignError, match=r"\(train.lr: 1.0 -> 2.0\)"):
        Run(tmp_path / "logging", {"train": {"log_steps": 1, "lr": 2.0}}, recipe="test")
    # an API critic that moved (another port or host) is reached at its new address; its model name stays locked
    Run(tmp_path / "moved", {"critic": {"base_url": "http://127.0.0.1:8000/v1", "model": "m"}}, recipe="test")
    Run(tmp_path / "moved", {"critic": {"base_url": "http://10.0.0.2:8000/v1", "model": "m"}}, recipe="test")
    with pytest.raises(SelfalignError, match=r"\(critic.model: 'm' -> 'n'\)"):
        Run(tmp_path / "moved", {"critic": {"base_url": "http://10.0.0.2:8000/v1", "model": "n"}}, recipe="test")


def test_a_run_resumes_on_other_hardware_and_under_a_newer_selfalign(tmp_path):
    # how many GPUs a training stage runs on, and whether it shards the model, change no step's result
    Run(tmp_path / "gpus", {"train": {"processes": 1, "fsdp": False, "lr": 1.0}}, recipe="test")
    Run(tmp_path / "gpus", {"train": {"processes": 8, "fsdp": True, "lr": 1.0}}, recipe="test")
    # nor do generation's processes and a backend's memory options; a dtype does change the answers
    Run(tmp_path / "gen", {"sampling": {"processes": 1, "options": {"dtype": "bfloat16"}}}, recipe="test")
    Run(tmp_path / "gen", {"sampling": {"processes": 4, "options": {"dtype": "bfloat16", "max_cache_gb": 20,
                                                                   "gpu_memory_utilization": 0.5}}}, recipe="test")
    with pytest.raises(SelfalignError, match=r"\(sampling.options.dtype: 'bfloat16' -> 'float32'\)"):
        Run(tmp_path / "gen", {"sampling": {"processes": 4, "options": {"dtype": "float32"}}}, recipe="test")
    # a run that ran out of memory resumes with smaller generation batches, a smaller reference-scoring batch and
    # other checkpointing; a training batch decides the steps and stays
    first = {"sampling": {"batch_size": 64}, "train": {"learning_rate": 1e-5, "batch_size": 8, "save_steps": 50,
                                                      "keep_checkpoints": 1, "reference_batch_size": 8}}
    Run(tmp_path / "oom", first, recipe="test")
    Run(tmp_path / "oom", {"sampling": {"batch_size": 16}, "train": {**first["train"], "save_steps": 10,
                                                                    "keep_checkpoints": 2, "reference_batch_size": 2}},
        recipe="test")
    with pytest.raises(SelfalignError, match=r"\(train.batch_size: 8 -> 4\)"):
        Run(tmp_path / "oom", {"sampling": {"batch_size": 16}, "train": {**first["train"], "batch_size": 4}},
            recipe="test")
    # a run started before a setting existed resumes when that setting is at its default (the old behaviour), at
    # any depth and for a whole new section; another value of it is a change
    defaults = {"train": {"processes": 1, "fsdp": False, "new_knob": 0.5, "lr": 2e-5}, "extra": {"on": False}}
    Run(tmp_path / "old", {"train": {"lr": 1.0}}, recipe="test")
    Run(tmp_path / "old", {"train": {"lr": 1.0, "new_knob": 0.5}, "extra": {"on": False}}, recipe="test",
        defaults=defaults)
    Run(tmp_path / "older", {"train": {"lr": 1.0}}, recipe="test")
    with pytest.raises(SelfalignError, match=r"\(train.new_knob: None -> 0.7\)"):
        Run(tmp_path / "older", {"train": {"lr": 1.0, "new_knob": 0.7}}, recipe="test", defaults=defaults)
    with pytest.raises(SelfalignError, match="config differs"):  # without the defaults, as before
        Run(tmp_path / "older", {"train": {"lr": 1.0, "new_knob": 0.5}}, recipe="test")


def test_a_file_is_resumed_only_with_its_own_model_and_sampling(tmp_path, real_prompts):
    from selfalign.data.records import Prompt
    from selfalign.errors import DataError
    from selfalign.generation import SamplingParams, generate_to_file
    from selfalign.generation.base import Generator

    class Echo(Generator):
        """Answers with the prompt's first words: the check under test runs before any answer is generated."""

        def __init__(self, name):
            self.model_name, self.calls = name, 0

        def generate(self, prompts, params, on_batch=None, skip=None, progress=True):
            self.calls += 1
            out = [self._response(p, " ".join(p.text.split()[:3]), params, s, "stop", 3, "echo")
                   for p in prompts for s in range(params.n) if (p.id, s) not in (skip or set())]
            on_batch(out)
            return out

    prompts = [Prompt.from_dict(r) for r in real_prompts[:3]]
    out = tmp_path / "answers.jsonl"
    params = SamplingParams(temperature=0.7, max_new_tokens=8, seed=1)
    generate_to_file(Echo("model-a"), prompts[:2], params, out, progress=False)
    again = Echo("model-a")
    assert len(generate_to_file(again, prompts, params, out, progress=False)) == 3  # resumed: only prompt 3 is new
    with pytest.raises(DataError, match=r"answers\.jsonl:1: field 'model': holds answers by model 'model-a', not "
                                        r"'model-b'"):
        generate_to_file(Echo("model-b"), prompts, params, out, progress=False)
    with pytest.raises(DataError, match=r"answers\.jsonl:1: field 'sampling\.max_new_tokens': was sampled with "
                                        r"max_new_tokens=8, not 16"):
        generate_to_file(Echo("model-a"), prompts, SamplingParams(temperature=0.7, max_new_tokens=16, seed=1), out,
                         progress=False)
    # more samples per prompt, and prompts the file has not seen under other settings, are fine
    more = generate_to_file(Echo("model-a"), prompts, SamplingParams(temperature=0.7, max_new_tokens=8, seed=1, n=2),
                            out, progress=False)
    assert len(more) == 6
    other = [Prompt(id="new", messages=[{"role": "user", "content": "Hello there"}])]
    assert len(generate_to_file(Echo("model-b"), other, SamplingParams(temperature=0), out, progress=False)) == 1
    # greedy answers do not depend on the seed, so a greedy resume under another seed is the same run
    assert len(generate_to_file(Echo("model-b"), other, SamplingParams(temperature=0, seed=5), out,
                                progress=False)) == 1
    # another prompt under an id the file already answered (another prompt file, or an edited prompt) is refused:
    # keeping the old answer would give it another question's answer
    edited = [Prompt(id=prompts[0].id, messages=[{"role": "user", "content": "What is 2+2?"}])]
    with pytest.raises(DataError, match=rf"answers\.jsonl:1: field 'messages': holds an answer to another prompt "
                                        rf"with id '{prompts[0].id}'"):
        generate_to_file(Echo("model-a"), edited, params, out, progress=False)


def test_a_model_fingerprint_needs_weights_and_covers_an_adapters_base(tmp_path, embedded_model_dir):
    import torch
    from safetensors.torch import save_file

    from selfalign.runs import model_fingerprint

    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not hashed")
    # an empty fingerprint would be one cache key shared by every such folder
    with pytest.raises(SelfalignError, match="pickled: no .safetensors or .gguf weight file"):
        model_fingerprint(tmp_path / "pickled")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file({"lora_A": torch.zeros(2, 2)}, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(embedded_model_dir)}))
    fp = model_fingerprint(adapter)
    assert set(fp) == {"adapter_model.safetensors", "base_model"}
    assert fp["base_model"] == model_fingerprint(embedded_model_dir)


def test_a_manifest_says_where_the_run_started_and_where_its_models_are(tmp_path, monkeypatch, capsys,
                                                                        embedded_model_dir):
    import shutil

    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir(), elsewhere.mkdir()
    monkeypatch.chdir(here)
    run = Run("run", {"a": 1}, recipe="test")
    shutil.copytree(embedded_model_dir, here / "run" / "final")
    run.record_model("final", "run/final")
    manifest = json.loads((here / "run" / "manifest.json").read_text())
    assert manifest["cwd"] == str(here)
    assert manifest["models"]["final"]["path"] == str(here / "run" / "final")  # not cwd-relative
    Run(here / "run", {"a": 1}, recipe="test")  # resumed from where it started: nothing to say
    assert "was started in" not in capsys.readouterr().err
    monkeypatch.chdir(elsewhere)
    Run(here / "run", {"a": 1}, recipe="test")
    assert f"was started in {here}; relative paths" in capsys.readouterr().err


def test_checkpoint_folders_are_named_with_their_run():
    from selfalign.models import model_name

    assert model_name("runs/spa/final") == "spa/final"
    assert model_name("runs/spa/round1/final") == "round1/final"
    assert model_name("out/checkpoint-500") == "out/checkpoint-500"
    assert model_name("models/my-policy") == "my-policy" and model_name("smollm2-135m") == "smollm2-135m"
