"""The lean backend: greedy parity with transformers on real prompts, seeded sampling,
resume, and log-prob parity with a plain forward pass."""

from __future__ import annotations

import pytest
import torch

from selfalign.data.loaders import load_prompts
from selfalign.generation import SamplingParams, generate_to_file, make_generator
from selfalign.generation.lean_backend import LeanGenerator, _take_whole_prompts, cache_layout
from selfalign.generation.lean_decoder import WEIGHT_MAJOR_MIN_ROWS
from selfalign.generation.transformers_backend import TransformersGenerator


@pytest.fixture(scope="module")
def reference(embedded_model_dir):
    return TransformersGenerator(str(embedded_model_dir), batch_size=1)


@pytest.fixture(scope="module")
def lean(embedded_model_dir, reference):
    # a separate model object: the lean decoder fuses weights in place, the reference must stay untouched
    return LeanGenerator(str(embedded_model_dir), batch_size=3)


@pytest.fixture(scope="module")
def prompts(data_dir):
    return load_prompts(data_dir / "prompts" / "unlabelled_pool.jsonl", limit=6)


def test_greedy_is_token_identical_to_transformers(reference, lean, prompts):
    # 6 prompts through 3 slots: slots are refilled and compacted mid-run, which parity must survive
    params = SamplingParams(temperature=0, max_new_tokens=40)
    expected = reference.generate(prompts, params, progress=False)
    got = lean.generate(prompts, params, progress=False)
    assert [r.response for r in got] == [r.response for r in expected]
    assert [r.num_tokens for r in got] == [r.num_tokens for r in expected]
    assert [r.finish_reason for r in got] == [r.finish_reason for r in expected]
    assert all(r.sampling["backend"] == "lean" for r in got)


def test_an_assistant_prefix_is_continued_by_both_backends(reference, lean, prompts):
    from selfalign.data import Prompt
    from selfalign.models import encode_prompt

    prefix = "Here are three points:\n1."  # the answer must go on from here, as a reviser's tag is continued
    primed = [Prompt(p.id, p.messages, {"assistant_prefix": prefix}) for p in prompts[:3]]
    plain = encode_prompt(lean.tokenizer, prompts[0].messages)
    assert lean.encode(primed[:1], 16)[0] == plain + lean.tokenizer(prefix, add_special_tokens=False)["input_ids"]
    params = SamplingParams(temperature=0, max_new_tokens=16)
    got = lean.generate(primed, params, progress=False)
    assert [r.response for r in got] == [r.response for r in reference.generate(primed, params, progress=False)]
    unprimed = lean.generate(prompts[:3], params, progress=False)
    assert [r.response for r in got] != [r.response for r in unprimed]


def test_greedy_parity_holds_with_a_full_batch(embedded_model_dir, reference, data_dir):
    # 16 slots take the weight-major matmul path (LeanDecoder._linear) until the first answers finish, then the
    # F.linear path for the last few rows: both must give transformers' tokens
    many = load_prompts(data_dir / "prompts" / "unlabelled_pool.jsonl", limit=WEIGHT_MAJOR_MIN_ROWS)
    params = SamplingParams(temperature=0, max_new_tokens=32)
    wide = LeanGenerator(str(embedded_model_dir), batch_size=WEIGHT_MAJOR_MIN_ROWS)
    got = wide.generate(many, params, progress=False)
    expected = reference.generate(many, params, progress=False)
    assert [r.response for r in got] == [r.response for r in expected]


@pytest.mark.parametrize("rows", [1, 8, WEIGHT_MAJOR_MIN_ROWS, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_decoder_linear_equals_f_linear(lean, rows, with_bias):
    dec = lean.decoder
    weight = dec.layers[0]["w13"]
    bias = torch.linspace(-1, 1, weight.shape[0]) if with_bias else None
    x = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(rows))
    got = dec._linear(x, weight, bias)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    assert got.is_contiguous() == (rows < WEIGHT_MAJOR_MIN_ROWS)  # which path ran: the test covers both
    prefill_shaped = dec._linear(x.view(1, rows, -1), weight, bias)  # [batch, tokens, features] as in prefill
    torch.testing.assert_close(prefill_shaped[0], got, rtol=0, atol=0)


@pytest.mark.parametrize("rows", [WEIGHT_MAJOR_MIN_ROWS, 64, 200])
def test_chunked_logits_equal_one_product(lean, rows):
    hidden = torch.randn(rows, lean.decoder.lm_head.shape[1], generator=torch.Generator().manual_seed(rows))
    got = lean.decoder.logits(hidden)
    assert got.is_contiguous() and got.dtype == torch.float32
    assert torch.equal(got, torch.nn.functional.linear(hidden, lean.decoder.lm_head))


def test_cache_layout_gives_every_slot_room_for_what_it_can_hold():
    rng = torch.Generator().manual_seed(0)
    for trial in range(200):
        n = int(torch.randint(1, 40, (1,), generator=rng))
        needs = sorted(torch.randint(10, 2000, (n,), generator=rng).tolist(), reverse=True)
        slots = int(torch.randint(1, n + 1, (1,), generator=rng))
        blocks = 1 + trial % 4
        layout = cache_layout(needs, slots, blocks)
        assert sum(k for k, _ in layout) == slots and 1 <= len(layout) <= blocks
        capacity = [length for k, length in layout for _ in range(k)]
        assert all(capacity[k] >= needs[k] for k in range(slots))  # slot k holds a sequence needing <= needs[k]
        assert sum(capacity) <= slots * needs[0]
    # the benchmark's shape: one long prompt (2 samples) among short ones
    needs = [1550, 1550] + [449] * 2 + [403] * 2 + [300] * 40 + [250] * 82
    layout = cache_layout(needs, 128)
    assert layout[0] == (2, 1550) and sum(k * length for k, length in layout) < 128 * 1550 / 3
    assert cache_layout([100] * 10, 8) == [(8, 100)]  # equal needs: one block, no needless cut


def test_greedy_parity_through_cache_blocks_and_a_memory_cap(embedded_model_dir, reference, data_dir, capsys):
    # prompts of 203..48 tokens through 4 slots: the cache is cut into blocks of different capacity, and finished
    # sequences' slots are refilled while survivors move from later (smaller) blocks into earlier ones
    pool = load_prompts(data_dir / "prompts" / "unlabelled_pool.jsonl", limit=40)
    prompts = [pool[i] for i in (18, 39, 4, 14, 0, 1, 2, 3)]
    params = SamplingParams(temperature=0, max_new_tokens=24)
    expected = reference.generate(prompts, params, progress=False)
    gen = LeanGenerator(str(embedded_model_dir), batch_size=4)
    layouts = []
    allocate = gen.decoder.allocate_blocks
    gen.decoder.allocate_blocks = lambda layout: (layouts.append(layout), allocate(layout))
    got = gen.generate(prompts, params, progress=False)
    assert len(layouts[-1]) > 1 and layouts[-1][0][1] > layouts[-1][-1][1]
    assert [r.response for r in got] == [r.response for r in expected]
    # a cap smaller than 4 slots' cache: fewer slots, same answers, and the user is told
    gen.max_cache_gb = 2 * 280 * gen.decoder.bytes_per_token / 2 ** 30
    capped = gen.generate(prompts, params, progress=False)
    assert sum(k for k, _ in layouts[-1]) < 4 and gen.last_slots == sum(k for k, _ in layouts[-1])
    assert "slots would need" in capsys.readouterr().err
    assert [r.response for r in capped] == [r.response for r in expected]


def test_admission_keeps_the_samples_of_a_prompt_together():
    waiting = list(reversed([(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]))  # pop() from the end = prompt 0 first
    assert _take_whole_prompts(waiting, free=3, slots=4) == [(0, 0), (0, 1)]  # prompt 1 waits for 2 free slots
    assert _take_whole_prompts(waiting, free=1, slots=4) == []
    assert _take_whole_prompts(waiting, free=4, slots=4) == [(1, 0), (1, 1), (2, 0)]
    assert waiting == []
    big = list(reversed([(5, s) for s in range(5)]))  # more samples than slots: split, never stuck
    assert _take_whole_prompts(big, free=3, slots=3) == [(5, 0), (5, 1), (5, 2)]
    assert _take_whole_prompts(big, free=1, slots=3) == []  # the rest fit in the slots: they wait to go together
    assert _take_whole_prompts(big, free=2, slots=3) == [(5, 3), (5, 4)]


def test_seeded_sampling_reproducible_and_independent_of_batch(lean, prompts):
    params = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=16, n=2, seed=11)
    a = lean.generate(prompts[:4], params, progress=False)
    b = lean.generate(prompts[:4], params, progress=False)
    assert [r.response for r in a] == [r.response for r in b]
    assert len(a) == 8 and {r.sample_index for r in a} == {0, 1}
    alone = lean.generate(prompts[2:3], params, progress=False)  # same prompt, different batch companions
    assert [r.response for r in alone] == [r.response for r in a if r.prompt_id == prompts[2].id]
    other_seed = lean.generate(prompts[:4], SamplingParams(**{**params.to_dict(), "seed": 12}), progress=False)
    assert [r.response for r in other_seed] != [r.response for r in a]


def test_resume_gives_the_uninterrupted_samples(lean, prompts, tmp_path):
    params = SamplingParams(temperature=1.0, max_new_tokens=12, n=2, seed=3)
    full = generate_to_file(lean, prompts[:3], params, tmp_path / "full.jsonl", progress=False)
    part = tmp_path / "part.jsonl"
    generate_to_file(lean, prompts[:1], params, part, progress=False)  # as if killed after the first prompt
    resumed = generate_to_file(lean, prompts[:3], params, part, progress=False)
    assert [r.response for r in resumed] == [r.response for r in full]
    assert len(part.read_text().splitlines()) == 6


def test_logprobs_match_a_plain_forward_pass(reference, lean, prompts):
    tok = reference.tokenizer
    prefixes = [lean.encode([p], 8)[0] for p in prompts[:3]]
    answers = [tok.encode(t, add_special_tokens=False) for t in ("Sure, here it is.", "No.", "I think so, yes")]
    got = lean.sequence_logprobs(prefixes, answers)
    verdict = [tok.encode(x, add_special_tokens=False)[0] for x in ("A", "B")]
    got_next = lean.next_token_logprobs(prefixes, verdict)
    for i, (pre, ans) in enumerate(zip(prefixes, answers)):
        ids = torch.tensor([pre + ans])
        with torch.inference_mode():
            logp = torch.log_softmax(reference.model(input_ids=ids).logits[0].float(), dim=-1)
        want = sum(float(logp[len(pre) - 1 + k, t]) for k, t in enumerate(ans))
        assert got[i] == pytest.approx(want, abs=1e-3)
        assert got_next[i].tolist() == pytest.approx(logp[len(pre) - 1, verdict].tolist(), abs=1e-3)


def test_auto_backend_picks_lean_on_cpu(embedded_model_dir):
    gen = make_generator("auto", str(embedded_model_dir))
    assert isinstance(gen, LeanGenerator) and gen.batch_size == 128
    assert type(make_generator("transformers", str(embedded_model_dir))) is TransformersGenerator


def test_auto_backend_is_lean_where_it_was_measured_faster(reference):
    from selfalign.generation import auto_backend

    # CPU and CUDA (measured on an H200, benchmarks/RESULTS.md); devices never measured keep the reference
    assert auto_backend(torch.device("cpu"), reference.model) == "lean"
    assert auto_backend(torch.device("cuda"), reference.model) == "lean"
    assert auto_backend(torch.device("mps"), reference.model) == "transformers"
    reference.model.config.mlp_bias = True  # a model the lean loop does not support
    try:
        assert auto_backend(torch.device("cuda"), reference.model) == "transformers"
    finally:
        reference.model.config.mlp_bias = False


def test_default_batch_sizes():
    from selfalign.generation import default_batch_size

    # the lean loop takes the measured 256 rows on a GPU, 128 on a CPU; transformers 16 on both
    assert default_batch_size("lean", torch.device("cuda")) == 256
    assert default_batch_size("lean", torch.device("cpu")) == 128
    assert default_batch_size("transformers", torch.device("cuda")) == 16


def test_models_with_mlp_biases_are_left_to_transformers(reference):
    from selfalign.generation.lean_decoder import supports

    assert supports(reference.model)
    reference.model.config.mlp_bias = True  # a Llama variant whose MLP projections carry biases the lean loop drops
    try:
        assert not supports(reference.model)
    finally:
        reference.model.config.mlp_bias = False


def test_stop_strings_end_generation_the_same_way_in_both_backends(reference, lean, prompts):
    full = lean.generate(prompts[:4], SamplingParams(temperature=0, max_new_tokens=40), progress=False)
    params = SamplingParams(temperature=0, max_new_tokens=40, stop=(". ", "\n"))
    got = lean.generate(prompts[:4], params, progress=False)
    expected = reference.generate(prompts[:4], params, progress=False)
    assert [r.response for r in got] == [r.response for r in expected]
    assert [r.finish_reason for r in got] == [r.finish_reason for r in expected]
    assert [r.meta for r in got] == [r.meta for r in expected]  # both say which answers a stop string ended
    assert all(r.meta == {} for r in full)
    stopped = 0
    for short, long in zip(got, full):
        assert ". " not in short.response and "\n" not in short.response
        assert long.response.startswith(short.response)
        if short.response != long.response:  # a stop string occurred: cut there, and fewer tokens decoded
            stopped += 1
            assert short.finish_reason == "stop" and short.num_tokens < long.num_tokens
            assert short.meta == {"stop_string": True}
    assert stopped >= 2  # real answers of 40 tokens hold a sentence end or a newline


def test_a_stop_string_that_is_a_special_token_ends_answers_on_that_token(reference, lean, data_dir,
                                                                         embedded_model_dir):
    # ChatML clients send stop=["<|im_start|>"]; answers are decoded with special tokens skipped, so such a stop
    # string is never in the text and must stop generation on its token. Real prompts whose greedy answers end within
    # 24 tokens at <|im_end|>; with <|im_end|> made an ordinary special token (no longer an end token), only the stop
    # string can end them there.
    pool = load_prompts(data_dir / "prompts" / "unlabelled_pool.jsonl", limit=40)
    short = [pool[i] for i in (15, 36, 38)]
    greedy = SamplingParams(temperature=0, max_new_tokens=24)
    normal = lean.generate(short, greedy, progress=False)
    assert all(r.finish_reason == "stop" and r.num_tokens < 24 for r in normal)
    # the CUDA default loop too: overlapped (one step ahead of the host) over the graphs' bucketed steps
    ahead = LeanGenerator(str(embedded_model_dir), batch_size=3, decode="static", overlap=True)
    saved = reference.eos_ids, lean.eos_ids
    reference.eos_ids = lean.eos_ids = ahead.eos_ids = [len(lean.tokenizer) - 1]  # a token greedy answers never reach
    try:
        for gen in (reference, lean, ahead):
            cut = gen.generate(short, SamplingParams(temperature=0, max_new_tokens=24, stop=("<|im_end|>",)),
                               progress=False)
            assert [(r.response, r.finish_reason, r.num_tokens, r.meta) for r in cut] == \
                   [(r.response, "stop", r.num_tokens - 1, {"stop_string": True}) for r in normal], gen.backend
            # without the stop string the same answers run on past the token
            on = gen.generate(short, greedy, progress=False)
            assert all(r.num_tokens == 24 and r.response.startswith(n.response) for r, n in zip(on, normal))
    finally:
        reference.eos_ids, lean.eos_ids = saved


def test_overlapped_steps_give_the_same_answers(embedded_model_dir, prompts):
    """With overlap (the CUDA default) each step is launched before the host has read the previous step's tokens:
    greedy answers, finish reasons, token counts and seeded samples must be those of the plain loop, also when
    slots refill mid-run, stop strings cut answers and sequences run into the end of the context. Run with the
    graphs' bucketed steps, eagerly ("static"), as they run on CUDA; the grouped steps passed it too (stop 18)."""
    decode = "static"
    four = prompts[:4]
    plain = LeanGenerator(str(embedded_model_dir), batch_size=3, decode=decode, overlap=False)
    ahead = LeanGenerator(str(embedded_model_dir), batch_size=3, decode=decode, overlap=True)
    greedy = SamplingParams(temperature=0, max_new_tokens=24)
    for params in (greedy, SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=12, n=2, seed=5),
                   SamplingParams(temperature=0, max_new_tokens=24, stop=(". ", "\n"))):
        a = plain.generate(four, params, progress=False)
        b = ahead.generate(four, params, progress=False)
        assert [(r.response, r.num_tokens, r.finish_reason) for r in b] == \
               [(r.response, r.num_tokens, r.finish_reason) for r in a]
        if params.stop:  # the stop strings did cut answers
            assert any(r.finish_reason == "stop" and r.num_tokens < 24 for r in a)
    # a context that ends 8 positions after the longest prompt: answers stop there, in both loops alike (and the
    # overlapped loop's one step ahead must still fit in the cache)
    longest = max(len(ids) for ids in plain.encode(four, 1))
    for gen in (plain, ahead):
        gen.decoder.max_positions = longest + 8
    a, b = (gen.generate(four, greedy, progress=False) for gen in (plain, ahead))
    assert [(r.response, r.num_tokens, r.finish_reason) for r in b] == \
           [(r.response, r.num_tokens, r.finish_reason) for r in a]
    assert min(r.num_tokens for r in a) < 24  # the context's end did cut answers
    # the longest prompt fills the context: its first token is its last; the overlapped step still runs for it
    for gen in (plain, ahead):
        gen.decoder.max_positions = longest
    a, b = (gen.generate(four, greedy, progress=False) for gen in (plain, ahead))
    assert [(r.response, r.num_tokens, r.finish_reason) for r in b] == \
           [(r.response, r.num_tokens, r.finish_reason) for r in a]
    assert min(r.num_tokens for r in a) == 1
