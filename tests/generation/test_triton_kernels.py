"""The fused Triton kernels of the fixed-span decode step (generation/triton_kernels.py), on the CPU through Triton's
interpreter: each against the torch ops it replaces, the whole step against the torch step on the embedded model and
on a multi-head (one query head per KV head, as SmolLM2-1.7B) random model, and greedy answers against transformers
through refilled slots. Speed and bf16 are GPU matters: benchmarks/fast_generation.py --attention-ablation."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

# The kernels (and triton.language's own helpers) run through Triton's interpreter, on the CPU, when this is 1 as
# triton is imported and while they run; it stays set for the session (putting it back trips triton's own import
# checks), which matters to no other test: none runs Triton code.
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton has wheels for Linux only (pyproject's test extra)")
from selfalign.generation import triton_kernels  # noqa: E402

assert triton_kernels.INTERPRETED, "triton_kernels was imported before this module could set TRITON_INTERPRET"

from selfalign.data.loaders import load_prompts  # noqa: E402
from selfalign.generation import SamplingParams  # noqa: E402
from selfalign.generation.lean_backend import LeanGenerator  # noqa: E402
from selfalign.generation.lean_decoder import LeanDecoder  # noqa: E402
from selfalign.generation.transformers_backend import TransformersGenerator  # noqa: E402


def test_add_rms_norm_and_silu_mul_match_the_torch_ops():
    g = torch.Generator().manual_seed(0)
    x, delta, weight = (torch.randn(*shape, generator=g) for shape in ((5, 576), (5, 576), (576,)))
    summed, normed = triton_kernels.add_rms_norm(x, delta, weight, 1e-5)
    ref = x + delta
    torch.testing.assert_close(summed, ref, rtol=0, atol=0)
    torch.testing.assert_close(normed, weight * (ref * torch.rsqrt(ref.pow(2).mean(-1, keepdim=True) + 1e-5)))
    same, normed = triton_kernels.add_rms_norm(x, None, weight, 1e-5)
    assert same is x
    torch.testing.assert_close(normed, weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)))
    gate_up = torch.randn(3, 2 * 1536, generator=g)
    torch.testing.assert_close(triton_kernels.silu_mul(gate_up), F.silu(gate_up[:, :1536]) * gate_up[:, 1536:])


def _decode(dec: LeanDecoder, ids: torch.Tensor, lengths: torch.Tensor, steps: int, kernels: str):
    """Prefill rows `ids` into slots 0..B-1 (slot B stays free, as a padding row's would), then `steps` greedy
    fixed-span steps; returns the logits of every step and the cache."""
    dec.set_kernels(kernels)
    dec.allocate(ids.shape[0] + 1, ids.shape[1] + steps + 8)
    with torch.inference_mode():
        hidden = dec.forward_full(ids, list(range(ids.shape[0])))
        tokens = dec.logits(hidden[torch.arange(ids.shape[0]), lengths - 1]).argmax(-1)
        out = []
        for t in range(steps):
            out.append(dec.decode_step(tokens, lengths + t, span=int(lengths.max()) + t + 1))
            tokens = out[-1].argmax(-1)
    cache = dec.cache.clone()
    dec.release()
    return torch.stack(out, 1), cache


def _right_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = torch.tensor(row)
    return ids, torch.tensor([len(r) for r in rows])


def test_fused_step_matches_the_torch_step_on_the_embedded_model(embedded_model_dir, data_dir):
    """SmolLM2-135M: 9 query heads per 3 KV heads (a group of 3, padded to 16 rows per program); prompts of different
    lengths, so each row attends over its own positions and the torch step masks the rest of the span."""
    gen = LeanGenerator(str(embedded_model_dir), batch_size=4, kernels="triton")
    prompts = load_prompts(data_dir / "prompts" / "unlabelled_pool.jsonl", limit=3)
    ids, lengths = _right_padded(gen.encode(prompts, 8))  # 63, 48 and 58 tokens
    assert len(set(lengths.tolist())) > 1
    expected, expected_cache = _decode(gen.decoder, ids, lengths, 4, "torch")
    got, cache = _decode(gen.decoder, ids, lengths, 4, "triton")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)  # measured: 3e-5
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    torch.testing.assert_close(cache, expected_cache, rtol=0, atol=1e-4)


@pytest.mark.parametrize("hidden, heads, kv_heads", [(128, 4, 4), (768, 6, 1)])
def test_fused_step_at_other_head_shapes_with_qkv_biases(hidden, heads, kv_heads):
    """Random Qwen2s (attention biases): as many KV heads as query heads with head_dim 32 (SmolLM2-1.7B has a group of
    one), and a group of 6 with head_dim 128 (Qwen2.5-1.5B's). Random weights: the shapes matter here, not answers."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=512, hidden_size=hidden, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    dec = LeanDecoder(model, kernels="triton")
    ids, lengths = _right_padded([[5, 17, 300, 41, 2, 9, 77], [8, 1, 400], [3] * 20])
    expected, expected_cache = _decode(dec, ids, lengths, 3, "torch")
    got, cache = _decode(dec, ids, lengths, 3, "triton")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(cache, expected_cache, rtol=0, atol=1e-5)


def test_static_steps_with_fused_kernels_give_transformers_greedy_tokens(embedded_model_dir, data_dir):
    """3 prompts through 2 slots: the third prompt's sequence reuses a freed slot whose stale keys lie beyond its own
    positions, which the fused attention must not read. One graph bucket per row count: the span plays no part."""
    prompts = load_prompts(data_dir / "prompts" / "unlabelled_pool.jsonl", limit=3)
    params = SamplingParams(temperature=0, max_new_tokens=10)
    gen = LeanGenerator(str(embedded_model_dir), batch_size=2, decode="static", kernels="triton")
    got = gen.generate(prompts, params, progress=False)
    expected = TransformersGenerator(str(embedded_model_dir), batch_size=1).generate(prompts, params, progress=False)
    assert [r.response for r in got] == [r.response for r in expected]
    assert {span for _, span in gen.graphs.graphs} == {gen.decoder.max_len}


def test_fused_kernels_refuse_a_device_they_cannot_run_on(embedded_model_dir, monkeypatch):
    monkeypatch.setattr(triton_kernels, "available", lambda device: False)
    with pytest.raises(ValueError, match="kernels='triton' needs the triton package"):
        LeanGenerator(str(embedded_model_dir), kernels="triton")
