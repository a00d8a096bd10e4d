"""Data-parallel generation (`processes`): two CPU worker processes on the embedded model give the one-process
answers on real prompts, resume a file, pass a worker's error back as it was, die with a killed parent, and refuse
what cannot run in parallel."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfalign.data.loaders import load_prompts
from selfalign.errors import ConfigError, DataError
from selfalign.generation import SamplingParams, generate_to_file, make_generator
from selfalign.generation.lean_backend import LeanGenerator
from selfalign.generation.parallel import ParallelGenerator

CHILD_ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}  # the checkout under test


@pytest.fixture(scope="module")
def prompts(data_dir):
    return load_prompts(data_dir / "prompts" / "unlabelled_pool.jsonl", limit=5)


@pytest.fixture(scope="module")
def one(embedded_model_dir):
    return LeanGenerator(str(embedded_model_dir), batch_size=3)


@pytest.fixture(scope="module")
def two(embedded_model_dir):
    gen = make_generator("lean", str(embedded_model_dir), batch_size=3, processes=2)
    yield gen
    gen.close()


def records(responses) -> list[tuple]:
    return [(r.key, r.response, r.num_tokens, r.finish_reason, r.model, r.model_sha256, r.sampling)
            for r in responses]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_two_processes_give_the_one_process_answers(one, two, prompts, temperature):
    # greedy and seeded sampling: each sample's seed is (seed, prompt id, sample index), wherever it runs
    assert isinstance(two, ParallelGenerator) and two.model_name == one.model_name
    params = SamplingParams(temperature=temperature, max_new_tokens=16, n=2, seed=5)
    batches: list[int] = []
    got = two.generate(prompts, params, on_batch=lambda b: batches.append(len(b)), progress=False)
    assert records(got) == records(one.generate(prompts, params, progress=False))
    assert sum(batches) == len(prompts) * 2 and len(batches) >= 2  # handed over as the workers finish batches
    if temperature:
        assert len({r.response for r in got}) > len(prompts)  # sampled: samples of a prompt differ


def test_a_file_begun_by_one_process_is_finished_by_two(one, two, prompts, tmp_path):
    params = SamplingParams(temperature=0.8, max_new_tokens=16, n=2, seed=9)
    whole = generate_to_file(one, prompts, params, tmp_path / "one.jsonl", progress=False)
    lines = (tmp_path / "one.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "two.jsonl").write_text("".join(lines[:5]) + lines[5][:20])  # 5 answers and a torn line
    two.model_name = one.model_name
    resumed = generate_to_file(two, prompts, params, tmp_path / "two.jsonl", progress=False)
    assert records(resumed) == records(whole)
    rows = [json.loads(x) for x in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert len(rows) == len(prompts) * 2  # only the missing answers were generated


def test_tokenizer_batch_size_and_encode_come_from_the_workers_backend(one, two, prompts):
    assert two.tokenizer.encode("Hello there") == one.tokenizer.encode("Hello there")
    assert two.batch_size == 2 * 3  # sequences in flight over both workers
    assert two.encode(prompts, 16) == one.encode(prompts, 16)


def test_a_workers_data_error_comes_back_as_it_was_and_the_next_call_starts_new_workers(two, prompts, data_dir):
    params = SamplingParams(temperature=0, max_new_tokens=10_000)  # over the model's context with any prompt
    with pytest.raises(DataError) as e:
        two.generate(prompts, params, progress=False)
    assert "unlabelled_pool.jsonl:" in str(e.value) and "context" in str(e.value)
    assert e.value.field == "prompt" and "\n" not in str(e.value)
    assert not two._procs  # every worker was stopped
    assert len(two.generate(prompts[:2], SamplingParams(temperature=0, max_new_tokens=4), progress=False)) == 2


def test_an_error_about_a_prompt_built_in_code_names_its_place_in_the_whole_list(two, prompts):
    # prompt 4 goes to worker 1 as the 2nd of its share: the error must still say 4
    from selfalign.data import Prompt

    built = [Prompt(p.id, p.messages) for p in prompts]
    built[3] = Prompt("long", [{"role": "user", "content": "word " * 9000}])
    with pytest.raises(DataError) as e:
        two.generate(built, SamplingParams(temperature=0, max_new_tokens=8), progress=False)
    assert str(e.value).startswith("<prompts>:4: field 'prompt': prompt 'long' is "), str(e.value)
    assert not hasattr(built[0], "_source")  # the caller's prompts are left as they were


def test_a_worker_that_dies_is_reported_and_the_others_are_stopped(embedded_model_dir, prompts):
    import threading

    from selfalign.errors import SelfalignError

    gen = make_generator("lean", str(embedded_model_dir), batch_size=1, processes=2)
    victim: list = []

    def kill_worker_1(batch):  # on the first answer, as a GPU's OOM killer would
        if not victim:
            victim.append(gen._procs[1])
            threading.Thread(target=os.kill, args=(gen._procs[1].pid, signal.SIGKILL)).start()

    try:
        with pytest.raises(SelfalignError, match=r"generation process 1 died \(exit code -9\); what was answered is "
                                                 r"kept"):
            gen.generate(prompts * 4, SamplingParams(temperature=0, max_new_tokens=24), on_batch=kill_worker_1,
                         progress=False)
        assert not gen._procs and not victim[0].is_alive()
    finally:
        gen.close()


def test_nothing_to_answer_starts_no_worker(embedded_model_dir, prompts):
    gen = make_generator("auto", str(embedded_model_dir), processes=2)
    skip = {(p.id, 0) for p in prompts}
    assert gen.generate(prompts, SamplingParams(max_new_tokens=4), skip=skip, progress=False) == []
    assert len(gen.encode(prompts, 16)) == len(prompts)  # the prompts are checked here, by this process
    with pytest.raises(DataError, match=r"unlabelled_pool.jsonl:1: field 'prompt': .* exceeds the model's context"):
        gen.encode(prompts, 10_000)
    assert not gen._procs


def test_backends_that_parallelise_themselves_are_refused(embedded_model_dir):
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        make_generator("vllm", str(embedded_model_dir), processes=2)
    with pytest.raises(ConfigError, match="concurrency"):
        make_generator("openai", "gpt-4", base_url="http://127.0.0.1:9", processes=2)


def test_a_killed_parent_takes_its_workers_with_it(tmp_path, data_dir):
    out = tmp_path / "answers.jsonl"
    cmd = [sys.executable, "-m", "selfalign.cli", "generate", "--prompts",
           str(data_dir / "prompts" / "unlabelled_pool.jsonl"), "--limit", "16", "--out", str(out),
           "--max-new-tokens", "32", "--quiet"]
    parent = subprocess.Popen(cmd + ["--processes", "2", "--batch-size", "2"], env=CHILD_ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while not (out.exists() and len(out.read_text().splitlines()) >= 2):
            assert parent.poll() is None and time.time() < deadline, parent.stderr.read().decode()[-2000:]
            time.sleep(0.2)
        workers = [pid for pid in children(parent.pid) if b"spawn_main" in cmdline(pid)]
        assert len(workers) == 2
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        time.sleep(3)
        assert [pid for pid in workers if alive(pid)] == []
        written = len(out.read_text().splitlines())
        time.sleep(2)
        assert len(out.read_text().splitlines()) == written  # nothing writes into the file any more
    finally:
        parent.kill()
    resumed = subprocess.run(cmd, env=CHILD_ENV, capture_output=True, text=True, timeout=600)  # in one process
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == len({r["prompt_id"] for r in rows}) == 16


def children(pid: int) -> list[int]:
    return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
