"""The CUDA-graph decode path, on a CPU: the bucketed static-shape steps (DecodeGraphs with capture=False) give
transformers' greedy tokens, and the step a graph would capture reads nothing from the device on the host (run on
the meta device, where any such read fails). The capture itself needs a GPU: benchmarks/fast_generation.py
--check-graphs."""

from __future__ import annotations

import weakref

import pytest
import torch

from selfalign.data.loaders import load_prompts
from selfalign.generation import SamplingParams
from selfalign.generation.cuda_graphs import SPAN_BUCKET, DecodeGraphs, row_bucket, span_bucket
from selfalign.generation.lean_backend import LeanGenerator
from selfalign.generation.lean_decoder import LeanDecoder
from selfalign.generation.transformers_backend import TransformersGenerator


def test_buckets():
    assert [row_bucket(r, 64) for r in (1, 2, 3, 16, 17, 64)] == [1, 2, 4, 16, 32, 64]
    assert row_bucket(40, 48) == 48  # capped at the cache's slots
    assert span_bucket(1, 4096) == SPAN_BUCKET and span_bucket(SPAN_BUCKET + 1, 4096) == 2 * SPAN_BUCKET
    assert span_bucket(1000, 900) == 900


@pytest.mark.parametrize("span_attention", ["matmul", "sdpa"])
def test_static_bucketed_decode_gives_transformers_greedy_tokens(embedded_model_dir, data_dir, span_attention):
    prompts = load_prompts(data_dir / "prompts" / "unlabelled_pool.jsonl", limit=6)
    params = SamplingParams(temperature=0, max_new_tokens=40)
    # 6 prompts through 5 slots: rows pad to buckets 8 (capped at 5), 4, 2, 1 as answers finish and slots refill
    static = LeanGenerator(str(embedded_model_dir), batch_size=5, decode="static", span_attention=span_attention)
    assert static.graphs is not None and not static.graphs.capture
    got = static.generate(prompts, params, progress=False)
    expected = TransformersGenerator(str(embedded_model_dir), batch_size=1).generate(prompts, params, progress=False)
    assert [r.response for r in got] == [r.response for r in expected]
    assert [r.num_tokens for r in got] == [r.num_tokens for r in expected]


def test_padded_step_matches_the_unpadded_step(embedded_model_dir):
    gen = LeanGenerator(str(embedded_model_dir), batch_size=8)
    dec = gen.decoder
    ids = torch.tensor([gen.tokenizer.encode("The capital of France is Paris, and the capital of Spain is")])
    runner = DecodeGraphs(dec, capture=False)
    results = []
    with torch.inference_mode():
        for step in ("grouped", "padded"):
            dec.allocate(8, 64)
            dec.forward_full(ids.expand(3, -1).contiguous(), [0, 1, 2])
            tokens = torch.tensor([11, 12, 13])
            positions = torch.full((3,), ids.shape[1])
            if step == "grouped":
                results.append(dec.decode_step(tokens, positions))
            else:  # 3 rows pad to 4, the span to a bucket: padding row 3 writes only free slot 3
                results.append(runner.step(tokens, positions, span=ids.shape[1] + 1))
                assert list(runner.graphs) == [(4, 64)]
            dec.release()
    torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("span_attention", ["matmul", "sdpa"])
def test_the_captured_step_makes_no_host_reads(embedded_model_dir, span_attention):
    model = TransformersGenerator(str(embedded_model_dir), batch_size=1).model.to("meta")
    dec = LeanDecoder(model, span_attention=span_attention)
    dec.allocate(4, 256)
    tokens = torch.zeros(4, dtype=torch.long, device="meta")
    positions = torch.zeros(4, dtype=torch.long, device="meta")
    with torch.inference_mode():  # as the generator runs it
        logits = dec.decode_step(tokens, positions, span=128)  # the graphs' path: must not touch values
        assert logits.shape == (4, model.config.vocab_size) and logits.device.type == "meta"
        with pytest.raises(RuntimeError, match="meta"):  # the grouped CPU path reads positions on the host
            dec.decode_step(tokens, positions)


def test_fixed_span_steps_keep_the_cache_between_calls(embedded_model_dir, data_dir):
    """Graphs point into the cache, so with fixed-span steps the cache (and the graphs) outlive a call: a second
    call that fits reuses both and answers as a fresh generator does; one that does not fit frees them before
    allocating (never two caches at once); a failed call and close() free them."""
    prompts = load_prompts(data_dir / "prompts" / "unlabelled_pool.jsonl", limit=4)
    params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=24, n=2, seed=3)
    gen = LeanGenerator(str(embedded_model_dir), batch_size=8, decode="static")
    first = gen.generate(prompts, params, progress=False)
    cache, steps = weakref.ref(gen.decoder.cache), dict(gen.graphs.graphs)
    assert cache() is not None and steps
    again = gen.generate(prompts[:3], params, progress=False)  # shorter: fits the kept cache
    assert gen.decoder.cache is cache()
    assert all(gen.graphs.graphs.get(k) is v for k, v in steps.items())  # the buckets built before are reused
    fresh = LeanGenerator(str(embedded_model_dir), batch_size=8, decode="static").generate(prompts[:3], params,
                                                                                          progress=False)
    assert [r.response for r in again] == [r.response for r in fresh] == [r.response for r in first[:6]]

    allocate, alive = gen.decoder.allocate_blocks, []
    gen.decoder.allocate_blocks = lambda layout: (alive.append(cache() is not None), allocate(layout))
    gen.generate(prompts[:1], SamplingParams(temperature=0, max_new_tokens=40), progress=False)  # longer: no fit
    assert alive == [False] and gen.decoder.cache is not None

    def fail(batch):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        gen.generate(prompts[:2], params, on_batch=fail, progress=False)
    assert gen.decoder.cache_bytes == 0 and not gen.graphs.graphs
    gen.generate(prompts[:1], params, progress=False)
    gen.close()
    assert gen.decoder.cache is None and not gen.graphs.graphs


def test_the_grouped_path_frees_the_cache_after_each_call(embedded_model_dir, data_dir):
    prompts = load_prompts(data_dir / "prompts" / "unlabelled_pool.jsonl", limit=2)
    gen = LeanGenerator(str(embedded_model_dir), batch_size=4, decode="grouped")
    gen.generate(prompts, SamplingParams(temperature=0, max_new_tokens=8), progress=False)
    assert gen.decoder.cache_bytes == 0
