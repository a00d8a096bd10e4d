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


@dataclass
class StandInSamplingParams:
    """vLLM's field names and defaults (sampling_params.py); unknown names raise TypeError as the real one does."""
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = 16
    seed: int | None = None
    stop: list | None = None
    stop_token_ids: list | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self):  # the real validation the adapter must satisfy
        assert not (self.temperature < 1e-5 and self.n != 1), "greedy sampling needs n == 1"
        assert 0 <= self.temperature <= 2 and 0 < self.top_p <= 1 and (self.max_tokens or 1) >= 1
        assert self.stop is None or all(self.stop), "empty stop string"


class StandInLLM:
    """Answers with tokens derived from the request's seed (greedy: a fixed text), ending with the EOS id as vLLM's
    token_ids do, finish_reason 'stop' (or `finish_reason`, when a test sets it); prompt log-probs: -0.1 * (position)
    for the actual token at every position."""

    instances: list = []
    finish_reason = "stop"
    end_token = None  # the token that ends token_ids (default: the EOS id)

    def __init__(self, *, model, tokenizer=None, dtype="auto", seed=0, trust_remote_code=False,
                 gpu_memory_utilization=0.9, **engine_args):
        self.kwargs = dict(model=model, tokenizer=tokenizer, dtype=dtype, seed=seed,
                           trust_remote_code=trust_remote_code, **engine_args)
        self.calls: list = []
        self.tok = load_tokenizer(model)
        self.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(
            max_model_len=engine_args.get("max_model_len", 8192)))
        StandInLLM.instances.append(self)

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True):
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        self.calls.append((prompts, params))
        outs = []
        for prompt, p in zip(prompts, params):
            ids = prompt["prompt_token_ids"]
            text = "The greedy answer." if p.temperature == 0 else f"Sampled answer {p.seed % 997}."
            completion = types.SimpleNamespace(
                token_ids=self.tok.encode(text, add_special_tokens=False) + [self.end_token or self.tok.eos_token_id],
                finish_reason=self.finish_reason, stop_reason=None, text=text)
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
    # the EOS id that ends token_ids is counted but not decoded into the text
    assert out[0].num_tokens == len(tok.encode(out[0].response, add_special_tokens=False)) + 1
    # the context is the engine's own (max_model_len is forced only when the user gives it)
    assert "max_model_len" not in llm.kwargs and gen.context == 8192


def test_aborted_request_is_an_error_not_an_answer(vllm_module, embedded_model_dir, prompts, tmp_path, monkeypatch):
    gen = make_generator("vllm", str(embedded_model_dir))
    monkeypatch.setattr(StandInLLM, "finish_reason", "abort")
    path = tmp_path / "out.jsonl"
    with pytest.raises(SelfalignError, match="ended with 'abort'"):
        generate_to_file(gen, prompts, SamplingParams(temperature=0.7, max_new_tokens=8, seed=1), path,
                         progress=False)
    assert not path.exists() or path.read_text().strip() == ""


def test_out_of_range_sampling_is_a_selfalign_error(vllm_module, embedded_model_dir, prompts):
    gen = make_generator("vllm", str(embedded_model_dir))
    with pytest.raises(SelfalignError, match="temperature in"):
        gen.generate(prompts, SamplingParams(temperature=2.5, max_new_tokens=8), progress=False)


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
    assert sp[0].prompt_logprobs == 1 and sp[0].max_tokens == 1


def test_missing_vllm_is_a_one_line_error(monkeypatch, embedded_model_dir):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(SelfalignError, match="needs the vllm package"):
        make_generator("vllm", str(embedded_model_dir))


def test_a_special_token_stop_string_is_a_stop_token(vllm_module, embedded_model_dir, prompts, monkeypatch):
    # vLLM looks for stop strings in text decoded without special tokens, where "<|im_start|>" never shows: the
    # adapter passes it as a stop token id, and an answer ended by it is a stop-string answer (token not counted)
    gen = make_generator("vllm", str(embedded_model_dir))
    tok = load_tokenizer(str(embedded_model_dir))
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    monkeypatch.setattr(StandInLLM, "end_token", im_start)
    out = gen.generate(prompts[:1], SamplingParams(temperature=0, max_new_tokens=8, stop=("<|im_start|>",)),
                       progress=False)
    (_, sps), = StandInLLM.instances[-1].calls
    assert im_start in sps[0].stop_token_ids and tok.eos_token_id in sps[0].stop_token_ids
    assert (out[0].response, out[0].finish_reason, out[0].meta) == ("The greedy answer.", "stop", {"stop_string": True})
    assert out[0].num_tokens == len(tok.encode("The greedy answer.", add_special_tokens=False))
