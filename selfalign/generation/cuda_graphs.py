"""Decode steps replayed from CUDA graphs, one graph per bucketed (rows, attention span) shape.

Why: a decode step of a small model is hundreds of tiny kernels (SmolLM2-135M: 30 layers x ~15), and launching them
one by one from Python costs more than running them, so the GPU idles (transformers' `generate` reaches 3.5k
tokens/s at batch 256 on an H100 for that reason, issue #8). A CUDA graph records a step's kernels once and replays
them with one launch. A graph fixes its shapes and the addresses of its inputs, so:
- the rows are padded up to a bucket (powers of two up to the slots) and the attention span is rounded up to a
  multiple of SPAN_BUCKET; each (rows, span) pair is captured on first use (two eager steps and a capture, not
  yet timed on a GPU), with no torch.compile-style minute;
- inputs are copied into static buffers before each replay, and the step attends under a mask built on the device
  from the positions (LeanDecoder.decode_step with `span`), so nothing in it reads the GPU from the host;
- padding rows decode token 0 at position 0 of the free slots after the live ones; a free slot's contents do not
  matter (a new sequence's prefill overwrites them).

With capture=False the same bucketing and static buffers run eagerly: that is how the logic is tested on a CPU,
where graphs do not exist (tests/generation/test_cuda_graphs.py); the capture itself is checked on a GPU by
benchmarks/fast_generation.py --check-graphs.
"""

from __future__ import annotations

import time

import torch

from selfalign.generation.lean_decoder import LeanDecoder

# attention spans are rounded up to a multiple of this: a finer grid reads less stale cache, a coarser one captures
# fewer graphs
SPAN_BUCKET = 64


def row_bucket(rows: int, slots: int) -> int:
    """The smallest power of two >= rows, capped at the cache's slots."""
    return min(slots, 1 << max(0, rows - 1).bit_length())


def span_bucket(span: int, max_len: int) -> int:
    return min(max_len, -(-span // SPAN_BUCKET) * SPAN_BUCKET)


class DecodeGraphs:
    """`step(tokens, positions, span)` as LeanDecoder.decode_step, through captured graphs. Graphs hold the cache's
    addresses: they are dropped when the decoder's cache or RoPE table is replaced, and `reset()` drops them at once
    (LeanGenerator calls it when it releases the cache)."""

    def __init__(self, decoder: LeanDecoder, capture: bool = True):
        if capture and decoder.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device; use capture=False to run the bucketed steps eagerly")
        self.decoder = decoder
        self.capture = capture
        self.graphs: dict[tuple[int, int], tuple] = {}
        self.capture_seconds = 0.0
        self._pool = None
        self._cache = self._rope = None

    def reset(self) -> None:
        self.graphs.clear()
        self._pool = None
        self._cache = self._rope = None

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, span: int) -> torch.Tensor:
        """Next-token logits [B, vocab] for tokens [B] at positions [B] in slots 0..B-1; span > every position."""
        dec = self.decoder
        if self._cache is not dec.cache or self._rope is not dec.cos:
            # a new cache or RoPE table: graphs captured against the old tensors would read freed memory
            self.reset()
            self._cache, self._rope = dec.cache, dec.cos
        b = tokens.shape[0]
        # steps that attend over each row's own positions (LeanDecoder.needs_span) need one graph per row bucket only
        key = (row_bucket(b, dec.slots), span_bucket(span, dec.max_len) if dec.needs_span else dec.max_len)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._build(*key)
        graph, static_tokens, static_positions, static_logits = entry
        static_tokens.zero_()
        static_positions.zero_()
        static_tokens[:b].copy_(tokens)
        static_positions[:b].copy_(positions)
        if graph is None:
            return dec.decode_step(static_tokens, static_positions, key[1])[:b]
        graph.replay()
        return static_logits[:b]

    def _build(self, rows: int, span: int) -> tuple:
        dec = self.decoder
        static_tokens = torch.zeros(rows, dtype=torch.long, device=dec.device)
        static_positions = torch.zeros(rows, dtype=torch.long, device=dec.device)
        if not self.capture:
            return None, static_tokens, static_positions, None
        t0 = time.perf_counter()
        # Warm-up on a side stream before capture, as torch.cuda.graphs asks (it initialises cuBLAS workspaces and
        # the caching allocator's pools). It runs with all-zero inputs, i.e. token 0 at position 0 of slots
        # 0..rows-1, which would overwrite a live sequence's first cache position; so the live rows' position 0 is
        # saved and put back afterwards. (The capture itself runs no kernel.)
        saved = dec.cache[:, :, :rows, :, :1].clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                dec.decode_step(static_tokens, static_positions, span)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # one memory pool for all graphs: they never replay at the same time, and each step's logits are read
        # (sampled) before the next replay
        with torch.cuda.graph(graph, pool=self._pool):
            static_logits = dec.decode_step(static_tokens, static_positions, span)
        dec.cache[:, :, :rows, :, :1] = saved
        torch.cuda.synchronize()
        self.capture_seconds += time.perf_counter() - t0
        return graph, static_tokens, static_positions, static_logits
