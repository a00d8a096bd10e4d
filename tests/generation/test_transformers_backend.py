"""The local backend: greedy parity with plain model.generate, seeded sampling, n samples, context check."""

from __future__ import annotations

import pytest

from selfalign.data import Prompt
from selfalign.data.loaders import load_prompts
from selfalign.errors import DataError
from selfalign.generation import SamplingParams
from selfalign.generation.transformers_backend import TransformersGenerator


@pytest.fixture(scope="module")
def gen(embedded_model_dir):
    return TransformersGenerator(str(embedded_model_dir), batch_size=4)


def test_greedy_matches_unbatched_generate(gen, data_dir):
    import torch

    prompts = load_prompts(data_dir / "prompts" / "unlabelled_pool.jsonl", limit=3)
    params = SamplingParams(temperature=0, max_new_tokens=16)
    batched = gen.generate(prompts, params, progress=False)
    for p, r in zip(prompts, batched):
        ids = gen.tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)
        with torch.inference_mode():
            out = gen.model.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=gen.tokenizer.pad_token_id)
        plain = gen.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        assert r.response == plain
        assert r.sampling["temperature"] == 0 and r.model and r.finish_reason in ("stop", "length")


def test_seeded_sampling_is_reproducible_and_n_samples(gen, data_dir):
    prompts = load_prompts(data_dir / "prompts" / "unlabelled_pool.jsonl", limit=2)
    params = SamplingParams(temperature=1.0, max_new_tokens=12, n=3, seed=5)
    a = gen.generate(prompts, params, progress=False)
    b = gen.generate(prompts, params, progress=False)
    assert [r.response for r in a] == [r.response for r in b]
    assert [(r.prompt_id, r.sample_index) for r in a] == [(p.id, i) for p in prompts for i in range(3)]
    assert len({r.response for r in a}) > 2, "samples at temperature 1 should differ"
    c = gen.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=12, n=3, seed=6), progress=False)
    assert [r.response for r in c] != [r.response for r in a]


def test_prompt_longer_than_context_is_a_located_error(gen, tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text('{"id": "short", "prompt": "hi"}\n{"id": "long", "prompt": "' + "word " * 9000 + '"}\n')
    prompts = load_prompts(path)
    with pytest.raises(DataError, match=r"long.jsonl:2: field 'prompt': prompt 'long' is \d+ tokens"):
        gen.generate(prompts, SamplingParams(max_new_tokens=8), progress=False)


def test_on_batch_streams_results(gen):
    prompts = [Prompt.from_text(str(i), t) for i, t in enumerate(["Say yes.", "Say no.", "Count to three.",
                                                                   "Name a fruit.", "Name a city."])]
    seen = []
    gen.generate(prompts, SamplingParams(temperature=0, max_new_tokens=4), on_batch=seen.append, progress=False)
    assert len(seen) == 2 and sum(len(b) for b in seen) == 5  # batch size 4: two batches, written as they finish


def test_a_kv_cache_cap_for_the_transformers_backend_is_reported_not_ignored(embedded_model_dir, capsys):
    from selfalign.generation import make_generator

    make_generator("transformers", str(embedded_model_dir), max_cache_gb=1.0)
    assert "max_cache_gb applies to the lean backend only" in capsys.readouterr().err


def test_a_file_is_not_resumed_by_other_weights_of_the_same_name(tmp_path, embedded_model_dir, data_dir):
    """Two runs' checkpoints can share a name (`run/final` for runs in two folders both called `run`): answers
    record a digest of the weights, so the second checkpoint writing to the first one's file is refused instead of
    silently keeping the first one's answers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from selfalign.generation import generate_to_file, make_generator
    from selfalign.models import load_tokenizer

    tok = load_tokenizer(str(embedded_model_dir))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    for run, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        LlamaForCausalLM(cfg).save_pretrained(tmp_path / run / "run" / "final")
        tok.save_pretrained(tmp_path / run / "run" / "final")
    prompts = load_prompts(data_dir / "prompts" / "unlabelled_pool.jsonl", limit=3)
    params = SamplingParams(temperature=0, max_new_tokens=4)
    out = tmp_path / "answers.jsonl"
    first = generate_to_file(TransformersGenerator(str(tmp_path / "a" / "run" / "final")), prompts[:2], params, out,
                             progress=False)
    assert len({r.model_sha256 for r in first}) == 1 and len(first[0].model_sha256) == 16
    assert make_generator("lean", str(tmp_path / "a" / "run" / "final")).model_sha256 == first[0].model_sha256
    for backend in ("transformers", "lean"):
        with pytest.raises(DataError, match=r"answers\.jsonl:1: field 'model_sha256': holds answers by other "
                                            r"weights named 'run/final'"):
            generate_to_file(make_generator(backend, str(tmp_path / "b" / "run" / "final")), prompts, params, out,
                             progress=False)
    resumed = generate_to_file(TransformersGenerator(str(tmp_path / "a" / "run" / "final")), prompts, params, out,
                               progress=False)
    assert [r.response for r in resumed[:2]] == [r.response for r in first] and len(resumed) == 3


def test_the_models_own_generation_config_does_not_change_what_is_sampled(gen, data_dir):
    """SamplingParams alone decide the distribution: a checkpoint's generation_config.json (repetition_penalty,
    min_p, ...) would otherwise be filled in by transformers for every setting a call leaves unset."""
    prompts = load_prompts(data_dir / "prompts" / "unlabelled_pool.jsonl", limit=2)
    greedy, sampled = SamplingParams(temperature=0, max_new_tokens=24), SamplingParams(temperature=1.0,
                                                                                      max_new_tokens=16, seed=3)
    plain = [r.response for p in (greedy, sampled) for r in gen.generate(prompts, p, progress=False)]
    own = gen.model.generation_config
    try:
        own.repetition_penalty, own.no_repeat_ngram_size, own.min_p = 5.0, 2, 0.2
        shipped = [r.response for p in (greedy, sampled) for r in gen.generate(prompts, p, progress=False)]
    finally:
        own.repetition_penalty, own.no_repeat_ngram_size, own.min_p = 1.0, 0, None
    assert shipped == plain
    assert gen.model.generation_config is own  # set back after each call


def test_a_stop_string_is_looked_for_in_the_answer_only(gen):
    from selfalign.generation.transformers_backend import _StopInAnswer

    import torch

    tok = gen.tokenizer
    prompt = tok("Answer in one line.\n", add_special_tokens=False)["input_ids"]
    crit = _StopInAnswer(tok, ("\n\n",), len(prompt))
    rows = [prompt + tok("\nSure", add_special_tokens=False)["input_ids"],  # "\n\n" only across the boundary
            prompt + tok("Yes.\n\n", add_special_tokens=False)["input_ids"]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    hits = crit(ids, None).tolist()
    assert hits[0] is False
    assert hits[1] is True
