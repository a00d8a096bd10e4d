"""Fused Triton kernels for the lean decoder's fixed-span decode step (the one CUDA graphs replay).

Why hand-written: a decode step in plain torch ops is ~45 device ops per layer (torch.profiler on a bf16 step of the
embedded model: 1,367 for 30 layers; RMSNorm alone is eight: cast, square, mean, add, rsqrt, two multiplies, cast
back; RoPE ten; masked attention seven). Replayed from a CUDA graph each still costs a few microseconds, so at 256
rows SmolLM2-135M's step took 7.2 ms on an H200 where its weights and KV cache need well under 1 ms of memory
traffic (benchmarks/RESULTS.md, "GPU path measured on an H200"). These kernels cut a layer to eight launches (four
of them the cuBLAS products):
- `add_rms_norm`: residual add and the next RMSNorm in one pass;
- `rope_attend`: RoPE on the step's queries and key, the key and value written to the cache, and attention over
  each row's own positions (0..position, read from the device, so no mask and no span padding) with an online
  softmax, its products on tensor cores;
- `silu_mul`: the MLP's SiLU(gate) * up.
torch.compile would fuse the elementwise parts too, but compiles every (rows, span) shape for tens of seconds at
each process start (issue #8 asks for no minute-long compile per call); a Triton kernel compiles once per dtype
and head shape in about a second. vLLM and FlashInfer ship such kernels but are optional installs, and their cache
layouts are not the lean decoder's.

Numerics follow lean_decoder's torch ops: fp32 norm statistics, RoPE products rounded to the model dtype as torch
rounds them, softmax in fp32, softmax weights in the model dtype times the values. The scores stay fp32 (the torch
path rounds them to the model dtype), so bf16 logits differ from it in the last bits; in fp32 the embedded model's
logits agree within 3e-5 (tests/generation/test_triton_kernels.py, which runs the kernels on the CPU through
Triton's interpreter, TRITON_INTERPRET=1). The interpreter rounds to bfloat16 by truncation where a GPU rounds to
nearest, so bf16 is checked on a GPU (benchmarks/fast_generation.py --attention-ablation) and compilation for one
without it (benchmarks/triton_compile_check.py).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch ops path needs none of this
    triton = None

# Triton reads TRITON_INTERPRET when a kernel is defined: set to 1 before this module is imported, the kernels below
# run through its interpreter, on any device (that is how the tests run them)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    """Whether the kernels can run on `device`: a CUDA GPU with Triton installed, or any device when they were
    defined under Triton's interpreter (INTERPRETED)."""
    if triton is None:
        return False
    return device.type == "cuda" or INTERPRETED


# elements per program of silu_mul
SILU_BLOCK = 1024
# launch options of rope_attend (benchmarks/triton_compile_check.py compiles with the same)
ATTENTION_LAUNCH = {"num_warps": 4, "num_stages": 2}


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def norm_warps(hidden: int) -> int:
    return 4 if hidden <= 1024 else 8


def attention_constants(n_heads: int, n_kv: int, head_dim: int, fp32: bool) -> dict:
    """rope_attend's compile-time constants: the query heads of a KV head padded to >= 16 rows (tl.dot's smallest
    operand), 64 positions per block at head_dim 64, 32 at 128; fp32 models multiply in full fp32 ("ieee"), where
    tl.dot would otherwise round fp32 operands to tf32 (the setting is ignored for bf16/fp16 operands)."""
    group = n_heads // n_kv
    return dict(H=n_heads, KV=n_kv, G=group, G_PAD=max(16, _pow2(group)), D=head_dim,
                BLOCK_N=64 if head_dim <= 64 else 32, PRECISION="ieee" if fp32 else "tf32")


if triton is not None:

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, delta_ptr, w_ptr, sum_ptr, out_ptr, n_cols, eps,
                             HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        keep = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=keep, other=0.0)
        if HAS_DELTA:  # the residual add, rounded to the model dtype as torch's `x + delta` is
            x = (x.to(tl.float32) + tl.load(delta_ptr + row * n_cols + cols, mask=keep, other=0.0).to(tl.float32))
            x = x.to(sum_ptr.dtype.element_ty)
            tl.store(sum_ptr + row * n_cols + cols, x, mask=keep)
        h = x.to(tl.float32)
        h = h * tl.rsqrt(tl.sum(h * h, axis=0) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=keep, other=0.0)
        # weight * h.to(dtype), as transformers' RMSNorm: the product of two dtype values, rounded once
        y = w.to(tl.float32) * h.to(x.dtype).to(tl.float32)
        tl.store(out_ptr + row * n_cols + cols, y.to(out_ptr.dtype.element_ty), mask=keep)

    @triton.jit
    def _silu_mul_kernel(gate_up_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        keep = cols < n_cols
        gate = tl.load(gate_up_ptr + row * 2 * n_cols + cols, mask=keep, other=0.0)
        up = tl.load(gate_up_ptr + row * 2 * n_cols + n_cols + cols, mask=keep, other=0.0)
        g = gate.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # F.silu in the model dtype, then the product, each rounded
        tl.store(out_ptr + row * n_cols + cols, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=keep)

    @triton.jit
    def _rope(x, partner, sign, cos, sin):
        """x * cos + rotate_half(x) * sin with each product and the sum rounded to x's dtype, as torch computes
        lean_decoder._rotate; `partner` is x at the rotated columns (d + D/2) % D, `sign` -1 on the first half."""
        a = (x.to(tl.float32) * cos).to(x.dtype)
        b = (sign * partner.to(tl.float32) * sin).to(x.dtype)
        return (a.to(tl.float32) + b.to(tl.float32)).to(x.dtype)

    @triton.jit
    def _rope_attend_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, k_cache, v_cache, out_ptr,
                            qkv_row_stride, slot_stride, head_stride, scale,
                            H: tl.constexpr, KV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
                            D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        # One program per (row, KV head): its G query heads, padded to G_PAD >= 16 rows so the scores and the
        # weighted values are tensor-core products (tl.dot, whose operand loads Triton also pipelines), attend over
        # the row's cached positions. The usual layout of Triton decode-attention kernels (e.g. sglang's grouped
        # decode kernel); the padding rows cost tensor-core work, not memory traffic.
        row = tl.program_id(0)
        kvh = tl.program_id(1)
        pos = tl.load(pos_ptr + row).to(tl.int32)
        d = tl.arange(0, D)
        partner = (d + D // 2) % D
        sign = tl.where(d < D // 2, -1.0, 1.0)
        cos = tl.load(cos_ptr + pos * D + d).to(tl.float32)
        sin = tl.load(sin_ptr + pos * D + d).to(tl.float32)
        g = tl.arange(0, G_PAD)
        real = g < G
        heads = kvh * G + g
        base = qkv_ptr + row * qkv_row_stride
        q_at = base + heads[:, None] * D
        q = tl.load(q_at + d[None, :], mask=real[:, None], other=0.0)
        q = _rope(q, tl.load(q_at + partner[None, :], mask=real[:, None], other=0.0), sign[None, :], cos[None, :],
                  sin[None, :])  # [G_PAD, D], model dtype, as the torch path's rotated queries
        k_at = base + H * D + kvh * D
        k = _rope(tl.load(k_at + d), tl.load(k_at + partner), sign, cos, sin)
        v = tl.load(base + (H + KV) * D + kvh * D + d)
        cache_at = row.to(tl.int64) * slot_stride + kvh * head_stride  # int64: a layer's cache may pass 2**31
        tl.store(k_cache + cache_at + pos * D + d, k)
        tl.store(v_cache + cache_at + pos * D + d, v)
        # the step's own position comes from registers; positions 0..pos-1 from the cache, BLOCK_N at a time, with
        # an online softmax (running max m, running sum l)
        m = tl.sum(q.to(tl.float32) * k.to(tl.float32)[None, :], axis=1) * scale  # [G_PAD]
        l = tl.full([G_PAD], 1.0, tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32) + v.to(tl.float32)[None, :]
        for start in range(0, pos, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            valid = n < pos
            keys = tl.load(k_cache + cache_at + n[None, :] * D + d[:, None], mask=valid[None, :], other=0.0)
            s = tl.dot(q, keys, input_precision=PRECISION)
            s = tl.where(valid[None, :], s * scale, float("-inf"))  # [G_PAD, BLOCK_N]
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            values = tl.load(v_cache + cache_at + n[:, None] * D + d[None, :], mask=valid[:, None], other=0.0)
            # weights in the model dtype, as the torch path multiplies its softmax by the values
            acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values, input_precision=PRECISION)
            l = l * alpha + tl.sum(p, axis=1)
            m = m_new
        out = acc / l[:, None]
        tl.store(out_ptr + row * H * D + heads[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=real[:, None])


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, RMSNorm(x + delta) * weight) for rows x [B, D]; with delta None, (x, RMSNorm(x) * weight)."""
    x = x.contiguous()  # (no copy on a GPU; on a CPU the lean decoder's products may be transposed views)
    delta = delta.contiguous() if delta is not None else None
    rows, cols = x.shape
    summed = torch.empty_like(x) if delta is not None else x
    out = torch.empty_like(x)
    _add_rms_norm_kernel[(rows,)](x, delta if delta is not None else x, weight, summed, out, cols, eps,
                                  HAS_DELTA=delta is not None, BLOCK=_pow2(cols), num_warps=norm_warps(cols))
    return summed, out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for the fused gate/up projection's output [B, 2I] (gate first)."""
    gate_up = gate_up.contiguous()
    rows, cols = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, cols, dtype=gate_up.dtype, device=gate_up.device)
    _silu_mul_kernel[(rows, triton.cdiv(cols, SILU_BLOCK))](gate_up, out, cols, BLOCK=SILU_BLOCK, num_warps=4)
    return out


def rope_attend(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                keys: torch.Tensor, values: torch.Tensor, n_heads: int, n_kv: int, scale: float) -> torch.Tensor:
    """One decode step's attention for rows 0..B-1 of a one-block cache.

    qkv [B, (H + 2 KV) * D]: the fused projection's output (queries, key, value of each row's new token);
    cos, sin [positions, D]: the RoPE tables; positions [B]: where each row's token sits (it attends over 0..that);
    keys, values [slots, KV, length, D]: one layer's cache, rows in slots 0..B-1. Writes each row's rotated key and
    its value at its position, and returns the attention output [B, H, D]."""
    qkv = qkv.contiguous()
    rows = qkv.shape[0]
    head_dim = keys.shape[-1]
    if head_dim & (head_dim - 1) or keys.stride(-1) != 1 or keys.stride(-2) != head_dim:
        raise ValueError(f"rope_attend needs a power-of-two head_dim and a [.., length, head_dim] cache, got "
                         f"{tuple(keys.shape)} with strides {keys.stride()}")
    assert keys.stride() == values.stride()
    out = torch.empty(rows, n_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    _rope_attend_kernel[(rows, n_kv)](qkv, cos, sin, positions, keys, values, out,
                                      qkv.stride(0), keys.stride(0), keys.stride(1), scale,
                                      **attention_constants(n_heads, n_kv, head_dim, qkv.dtype == torch.float32),
                                      **ATTENTION_LAUNCH)
    return out
