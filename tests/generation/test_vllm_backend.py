"""The vLLM adapter, against a stand-in `vllm` module (vLLM needs CUDA; this machine has none). The stand-in records
every call, so the tests check what selfalign asks of vLLM: the prompt token ids, one seeded request per sample,
greedy decoded once, the stop tokens, resume, and the prompt-log-prob arithmetic of `sequence_logprobs`."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import pytest

from selfalign.data.loaders import load_prompts
from selfalign.errors import SelfalignError
from selfalign.generation import SamplingParams, generate_to_file, make_generator
from selfalign.generation.base import sequence_seed
from selfalign.models import encode_prompt, load_tokenizer


@dataclass
class Logprob:
    logprob: float


class StandInSamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class StandInLLM:
    """Answers with tokens derived from the request's seed (greedy: a fixed text), finish_reason 'stop'; prompt
    log-probs: -0.1 * (position) for the actual token at every position."""

    instances: list = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls: list = []
        self.tok = load_tokenizer(kwargs["model"])
        StandInLLM.instances.append(self)

    def generate(self, prompts, sampling_params, use_tqdm=True):
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        self.calls.append((prompts, params))
        outs = []
        for prompt, p in zip(prompts, params):
            ids = prompt["prompt_token_ids"]
            text = "The greedy answer." if p.temperature == 0 else f"Sampled answer {p.seed % 997}."
            completion = types.SimpleNamespace(token_ids=self.tok.encode(text, add_special_tokens=False),
                                               finish_reason="stop", text=text)
            logprobs = [None] + [{t: Logprob(-0.1 * k)} for k, t in enumerate(ids) if k > 0]
            outs.append(types.SimpleNamespace(outputs=[completion], prompt_logprobs=logprobs))
        return outs


@pytest.fixture
def vllm_module(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = StandInLLM
    module.SamplingParams = StandInSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    StandInLLM.instances = []
    return module


@pytest.fixture(scope="module")
def prompts(data_dir):
    return load_prompts(data_dir / "prompts" / "unlabelled_pool.jsonl", limit=3)


def test_sampling_one_seeded_request_per_sample(vllm_module, embedded_model_dir, prompts):
    gen = make_generator("vllm", str(embedded_model_dir), batch_size=8, dtype="auto")
    llm = StandInLLM.instances[-1]
    assert llm.kwargs["model"] == str(embedded_model_dir) and llm.kwargs["trust_remote_code"] is False
    params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=32, n=2, seed=5)
    out = gen.generate(prompts, params, progress=False)
    (sent, sps), = llm.calls
    tok = load_tokenizer(str(embedded_model_dir))
    # the prompt tokens are selfalign's own rendering, the same the other backends decode from
    assert [s["prompt_token_ids"] for s in sent] == [encode_prompt(tok, p.messages) for p in prompts for _ in (0, 1)]
    assert [sp.seed for sp in sps] == [sequence_seed(5, p.id, k) for p in prompts for k in (0, 1)]
    assert all(sp.n == 1 and sp.temperature == 0.7 and sp.top_p == 0.9 and sp.max_tokens == 32 for sp in sps)
    assert tok.eos_token_id in sps[0].stop_token_ids
    assert [(r.prompt_id, r.sample_index) for r in out] == [(p.id, k) for p in prompts for k in (0, 1)]
    assert out[0].response == f"Sampled answer {sequence_seed(5, prompts[0].id, 0) % 997}."
    assert all(r.finish_reason == "stop" and r.sampling["backend"] == "vllm" and r.num_tokens > 0 for r in out)


def test_greedy_decodes_each_prompt_once(vllm_module, embedded_model_dir, prompts):
    gen = make_generator("vllm", str(embedded_model_dir))
    out = gen.generate(prompts, SamplingParams(temperature=0, max_new_tokens=16, n=3), progress=False)
    (sent, sps), = StandInLLM.instances[-1].calls
    assert len(sent) == len(prompts) and all(sp.temperature == 0.0 and sp.seed is None for sp in sps)
    assert len(out) == 9 and {r.response for r in out} == {"The greedy answer."}


def test_resume_asks_only_for_missing_samples(vllm_module, embedded_model_dir, prompts, tmp_path):
    gen = make_generator("vllm", str(embedded_model_dir))
    params = SamplingParams(temperature=1.0, max_new_tokens=16, n=2, seed=1)
    path = tmp_path / "out.jsonl"
    first = generate_to_file(gen, prompts[:1], params, path, progress=False)  # as if killed after one prompt
    full = generate_to_file(gen, prompts, params, path, progress=False)
    llm = StandInLLM.instances[-1]
    assert [len(sent) for sent, _ in llm.calls] == [2, 4]  # the second call skips the 2 finished samples
    assert [r.response for r in full[:2]] == [r.response for r in first]
    assert len(full) == 6


def test_sequence_logprobs_sum_the_continuation_positions(vllm_module, embedded_model_dir):
    gen = make_generator("vllm", str(embedded_model_dir))
    got = gen.sequence_logprobs([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]])
    assert got == pytest.approx([-0.1 * (3 + 4), -0.1 * (1 + 2 + 3)])
    (_, sp), = StandInLLM.instances[-1].calls
    assert sp[0].prompt_logprobs == 0 and sp[0].max_tokens == 1


def test_missing_vllm_is_a_one_line_error(monkeypatch, embedded_model_dir):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(SelfalignError, match="needs the vllm package"):
        make_generator("vllm", str(embedded_model_dir))
