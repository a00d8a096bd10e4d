"""Next-token sampling for the lean backend: temperature and top-p as transformers does them, one draw per row from
a counter-based random stream.

Why counter-based: each sequence must draw the same numbers whichever sequences share its batch (a resumed run, or
the same prompt in another file, gives the same sample), so every row needs its own stream. One `torch.Generator`
per row costs a host call per row per step and lives on the CPU, so it cannot feed a CUDA graph or a GPU batch
without a copy. Here the uniform of a draw is a hash of (sequence key, draw index), computed for the whole batch in
a few integer tensor ops on the logits' device: the same numbers on CPU and GPU, no state to carry, nothing to
synchronise. The hash is Chris Wellons' `lowbias32` (a well-tested 32-bit integer mixer), applied in three rounds
to fold in the 63-bit key; no library offers a keyed per-row uniform for torch tensors.
"""

from __future__ import annotations

import torch

from selfalign.generation.base import SamplingParams

# candidates for top-p sampling on CPU before falling back to a full sort of the vocabulary
TOP_P_CANDIDATES = 256
_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2**32 for x in [0, 2**32), in int64 without overflow: c is split into 16-bit halves, so no partial
    product reaches 2**63 (signed overflow would be undefined behaviour in the C++ kernels)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniforms(keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """One uniform number in [0, 1) per row: a hash of (keys[i], counters[i]). `keys` are 63-bit sequence seeds
    (base.sequence_seed), `counters` the index of the draw within its sequence; both int64 on the target device.
    24 random bits per number, as torch.rand gives for float32."""
    k = keys.to(torch.int64)
    h = _lowbias32((counters.to(torch.int64) + 0x9E3779B9) & _MASK32)
    h = _lowbias32(h ^ (k & _MASK32))
    h = _lowbias32(h ^ ((k >> 32) & _MASK32))
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def sample_tokens(logits: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor | None) -> torch.Tensor:
    """Next token per row of `logits` [B, V]: argmax when greedy, else an inverse-CDF draw per row, with that row's
    uniform number, from softmax(logits / temperature) restricted to the top-p nucleus (the smallest set of most
    likely tokens whose mass reaches top_p, as transformers' TopPLogitsWarper keeps)."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p >= 1.0:
        return _draw(probs, None, uniforms)
    if probs.is_cuda:  # one full sort: a sort of the vocabulary is cheap on a GPU, and needs no host round trip
        p, order = probs.sort(dim=-1, descending=True)
        return _draw(_nucleus(p, params.top_p), order, uniforms)
    # On CPU the nucleus almost always lies within the few hundred most likely tokens, and a top-k is far cheaper
    # than sorting the whole vocabulary (the full sort was half of a decode step). Rows whose top-k mass falls short
    # of top_p take the full sort, so the kept set, and the drawn token, are exactly those of a full sort.
    top, order = probs.topk(min(TOP_P_CANDIDATES, probs.shape[-1]), dim=-1)
    short = top.sum(dim=-1) < params.top_p
    picked = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    for rows, full_sort in ((torch.nonzero(~short).flatten(), False), (torch.nonzero(short).flatten(), True)):
        if len(rows):
            p, o = probs[rows].sort(dim=-1, descending=True) if full_sort else (top[rows], order[rows])
            picked[rows] = _draw(_nucleus(p, params.top_p), o, uniforms[rows])
    return picked


def _nucleus(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail beyond the top-p nucleus of descending-sorted probabilities (the top token always stays)."""
    return sorted_probs.masked_fill(sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p, 0.0)


def _draw(probs: torch.Tensor, order: torch.Tensor | None, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw per row from unnormalised `probs`; `order` maps columns back to token ids."""
    cdf = probs.cumsum(dim=-1)
    u = uniforms.to(cdf.dtype) * cdf[:, -1]
    # right=True: the first column whose cumulative mass exceeds u, so a zero-probability token is never drawn (u is
    # below 1 - 2**-24, so u * total stays below the total); the minimum with the first column that holds the whole
    # mass is a guard, e.g. against a parallel cumsum that is not exactly monotonic
    picked = torch.minimum(torch.searchsorted(cdf, u.unsqueeze(1), right=True), cdf.argmax(dim=-1, keepdim=True))
    picked = picked.squeeze(1)
    return picked if order is None else order.gather(1, picked.unsqueeze(1)).squeeze(1)
