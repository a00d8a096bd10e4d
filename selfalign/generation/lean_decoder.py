"""A lean forward pass for Llama-family decoders (llama, qwen2) over a transformers model's own weights.

Why hand-written: on a 2-core CPU, `model.generate` spends most of each decode step outside the matrix products
(per-layer module dispatch, cache bookkeeping, mask building, logits processors): SmolLM2-135M has 30 thin layers,
and a batch-16 step costs ~220 ms where its arithmetic needs ~60 ms (benchmarks/RESULTS.md). This module is the few
tensor ops a decode step really needs (gpt-fast style): fused QKV and gate/up projections, RoPE from a precomputed
table, a per-slot static KV cache, one SDPA call per layer. It reuses the transformers model's weight storage (the
fused matrices are built once and the model's own parameters become views into them), so loading, LoRA merging and
checkpoints stay the transformers loader's job, and the model still works as before.

The numerics follow transformers' Llama/Qwen2 code (fp32 RMSNorm, `rotate_half` RoPE, SDPA with 1/sqrt(d) scaling);
greedy answers match `model.generate` token for token on the embedded model (tests/generation/test_lean_backend.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
# rows per attention group in a decode step (see LeanDecoder._attention_groups)
ATTENTION_GROUP = 16
# most padded KV reads a group may make, relative to its rows' own spans (see LeanDecoder._attention_groups)
ATTENTION_SLACK = 1.25
# fewest rows for which LeanDecoder._linear computes weight @ x.T on CPU
WEIGHT_MAJOR_MIN_ROWS = 16
# vocabulary rows per product in LeanDecoder.logits on CPU
LOGIT_CHUNK = 4096
# attention of the fixed-span steps (CUDA graphs): "matmul", two batched matmuls under a mask (measured on an H200,
# benchmarks/RESULTS.md), or "sdpa", torch's fused attention under the same mask (as transformers' Llama runs it);
# an ablation to measure at the 1.7B shape, where attention reads 32 KV heads (benchmarks/step_breakdown.py)
SPAN_ATTENTION = ("matmul", "sdpa")
# kernels of the fixed-span steps: "torch" ops, or "triton": fused kernels (triton_kernels: eight launches a layer
# instead of ~45, attention over each row's own positions), an ablation to measure on a GPU first
STEP_KERNELS = ("torch", "triton")


def supports(model) -> bool:
    """True when the lean decoder can run this model (a plain Llama/Qwen2 without rope scaling, sliding window or
    MLP biases: it reads the attention biases, but its MLP has none)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return False
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        return False
    if getattr(cfg, "mlp_bias", False):
        return False
    return not getattr(cfg, "use_sliding_window", False) and getattr(cfg, "hidden_act", "silu") == "silu"


def to_device(values, device: torch.device) -> torch.Tensor:
    """Host integers (a list or a CPU tensor) on `device` without waiting for it: on CUDA a copy from ordinary
    memory synchronises the host with the device (the host would idle until every queued step has run), a copy
    from pinned memory is queued behind them."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.long)
    return t.to(device) if device.type != "cuda" else t.pin_memory().to(device, non_blocking=True)


def _fuse(linears) -> torch.Tensor:
    """Concatenate the weights (or biases) of several Linear layers row-wise and make each layer's parameter a view
    into the fused tensor, so the fused matrix costs no extra memory."""
    parts = [lin for lin in linears]
    fused = torch.cat([p.data for p in parts], dim=0).contiguous()
    start = 0
    for p in parts:
        n = p.shape[0]
        p.data = fused[start:start + n]
        start += n
    return fused


class CacheBlock:
    """A run of consecutive cache slots that share one capacity: a tensor [layers, 2, slots, kv_heads, length,
    head_dim]; keys[i] and values[i] are views of layer i's halves. One tensor per block makes moving a sequence
    between slots a single copy for all layers (on a GPU, one kernel launch instead of two per layer)."""

    def __init__(self, start: int, tensor: torch.Tensor):
        self.tensor = tensor
        self.start, self.stop, self.length = start, start + tensor.shape[2], tensor.shape[4]
        # one plain view per layer (not unbind()'s multi-output views, which refuse in-place writes under autograd)
        self.keys = [tensor[i, 0] for i in range(tensor.shape[0])]
        self.values = [tensor[i, 1] for i in range(tensor.shape[0])]


class LeanDecoder:
    """Prefill and decode steps over a static KV cache with one row per sequence slot.

    Slot s holds one sequence; its valid positions are 0..length[s]-1 and attention masks out the rest, so a freed
    slot is reused without clearing. The slots are split into a few blocks (CacheBlock) of decreasing capacity:
    the generator admits the longest prompts first and keeps live sequences in admission order, so the sequence in
    slot k never needs more room than the k-th longest of the run, and one 1,350-token prompt no longer makes every
    slot 1,550 positions long (lean_backend.cache_layout). Steps with a fixed attention span (CUDA graphs) use one
    block.
    """

    def __init__(self, model, span_attention: str = "matmul", kernels: str = "torch"):
        if span_attention not in SPAN_ATTENTION:
            raise ValueError(f"span_attention must be one of {SPAN_ATTENTION}, got {span_attention!r}")
        self.span_attention = span_attention
        if hasattr(model, "merge_and_unload"):  # a peft LoRA model: fold the adapter into the base weights
            model = model.merge_and_unload()
        if not supports(model):
            raise ValueError(f"lean decoder supports {', '.join(SUPPORTED_MODEL_TYPES)} models without rope scaling")
        cfg = model.config
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        # see _linear: on CPU, weight-major products are faster and give the same bits
        self.weight_major = self.device.type == "cpu"
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        self.scale = self.head_dim ** -0.5
        self.max_positions = int(cfg.max_position_embeddings)
        base = model.model
        self.embed = base.embed_tokens.weight
        self.norm = base.norm.weight
        self.lm_head = model.lm_head.weight
        self.set_kernels(kernels)
        self.layers = []
        with torch.no_grad():
            for layer in base.layers:
                att, mlp = layer.self_attn, layer.mlp
                qkv = [att.q_proj, att.k_proj, att.v_proj]
                self.layers.append(dict(
                    ln1=layer.input_layernorm.weight, ln2=layer.post_attention_layernorm.weight,
                    wqkv=_fuse([m.weight for m in qkv]),
                    bqkv=_fuse([m.bias for m in qkv]) if att.q_proj.bias is not None else None,
                    wo=att.o_proj.weight, bo=att.o_proj.bias,
                    w13=_fuse([mlp.gate_proj.weight, mlp.up_proj.weight]), w2=mlp.down_proj.weight))
        theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta") or getattr(cfg, "rope_theta", 10000.0)
        inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim))
        self._inv_freq = inv_freq.to(self.device)
        self._rope_len = 0
        self.blocks: list[CacheBlock] = []
        # bytes of keys and values per cached token, all layers
        self.bytes_per_token = len(self.layers) * 2 * self.n_kv * self.head_dim * self.embed.element_size()

    # -- setup -------------------------------------------------------------------------------------------------
    def set_kernels(self, kernels: str) -> None:
        """Which kernels the fixed-span steps run (STEP_KERNELS). Graphs captured before keep the old ones: reset
        them (DecodeGraphs.reset) after a change."""
        if kernels not in STEP_KERNELS:
            raise ValueError(f"kernels must be one of {STEP_KERNELS}, got {kernels!r}")
        self._triton = None
        if kernels == "triton":
            from selfalign.generation import triton_kernels

            if not triton_kernels.available(self.device):
                raise ValueError(f"kernels='triton' needs the triton package and a CUDA device (or "
                                 f"TRITON_INTERPRET=1), not {self.device}")
            self._triton = triton_kernels
        self.kernels = kernels

    def _rope_table(self, length: int) -> None:
        """cos/sin for positions 0..length-1, computed as transformers does (fp32 outer product, then cast)."""
        if length <= self._rope_len:
            return
        pos = torch.arange(length, device=self.device, dtype=torch.float32)
        emb = torch.cat([torch.outer(pos, self._inv_freq)] * 2, dim=-1)
        self.cos, self.sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
        self._rope_len = length

    def allocate(self, slots: int, max_len: int) -> None:
        """(Re)allocate the KV cache for `slots` sequences of up to `max_len` tokens (one block)."""
        self.allocate_blocks([(slots, max_len)])

    def allocate_blocks(self, layout: list[tuple[int, int]]) -> None:
        """(Re)allocate the KV cache as blocks of (slots, capacity) in slot order."""
        layout = self._capped(layout)
        self._rope_table(max(length for _, length in layout))
        if self.holds(layout):
            return
        self.release()
        blocks, start = [], 0
        for n, length in layout:  # into a local list: if a block fails to allocate, the others are freed with it
            shape = (len(self.layers), 2, n, self.n_kv, length, self.head_dim)
            # zeros, not empty: masked positions get weight 0, but 0 * NaN from uninitialised memory would be NaN
            blocks.append(CacheBlock(start, torch.zeros(shape, dtype=self.dtype, device=self.device)))
            start += n
        self.blocks = blocks

    def _capped(self, layout: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return [(n, min(length, self.max_positions)) for n, length in layout if n > 0]

    def holds(self, layout: list[tuple[int, int]]) -> bool:
        """Whether the cache allocated now serves `layout` as is (allocate_blocks then keeps it)."""
        layout = self._capped(layout)
        return bool(self.blocks) and (self.layout == layout or (
            len(layout) == 1 and len(self.blocks) == 1 and self.slots >= layout[0][0]
            and self.max_len >= layout[0][1]))

    def release(self) -> None:
        """Free the KV cache (gigabytes at 128 slots): recipes train right after generating, in the same process."""
        self.blocks = []

    @property
    def cache_bytes(self) -> int:
        return sum(b.tensor.numel() * b.tensor.element_size() for b in self.blocks)

    @property
    def layout(self) -> list[tuple[int, int]]:
        return [(b.stop - b.start, b.length) for b in self.blocks]

    @property
    def cache(self) -> torch.Tensor | None:
        """The single block's tensor (fixed-span steps and CUDA graphs run on a one-block cache)."""
        return self.blocks[0].tensor if len(self.blocks) == 1 else None

    @property
    def slots(self) -> int:
        return self.blocks[-1].stop if self.blocks else 0

    @property
    def max_len(self) -> int:
        return max((b.length for b in self.blocks), default=0)

    def block_of(self, slot: int) -> CacheBlock:
        return next(b for b in self.blocks if b.start <= slot < b.stop)

    # -- the math ----------------------------------------------------------------------------------------------
    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ weight.T (+ bias). On CPU, with WEIGHT_MAJOR_MIN_ROWS rows or more, this is computed as weight @ x.T
        and returned as a transposed view: MKL's sgemm runs the decode-step shapes (a few dozen rows against a wide
        weight) ~30% faster that way, and the result is bit-identical to F.linear's on this CPU (checked at SmolLM2's
        shapes from 16 to 256 rows, with and without bias, and end to end on Qwen2.5-1.5B's decode and prefill; with
        2-15 rows MKL takes another path whose last bits differ, hence the threshold), so greedy answers stay
        token-identical to transformers. Measured in benchmarks/RESULTS.md, "Fast generation"."""
        rows = x.numel() // x.shape[-1]
        if not self.weight_major or rows < WEIGHT_MAJOR_MIN_ROWS:
            return F.linear(x, weight, bias)
        flat = x.reshape(rows, x.shape[-1]).t()
        y = torch.mm(weight, flat) if bias is None else torch.addmm(bias[:, None], weight, flat)
        return y.t().reshape(*x.shape[:-1], weight.shape[0])

    def _qkv(self, layer: dict, h: torch.Tensor):
        qkv = self._linear(h, layer["wqkv"], layer["bqkv"]).contiguous()  # contiguous: q/k/v are viewed per head
        nq, nk = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        return qkv[..., :nq], qkv[..., nq:nq + nk], qkv[..., nq + nk:]

    def _mlp_out(self, layer: dict, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        x = x + self._linear(attn, layer["wo"], layer["bo"])
        gate, up = self._linear(self._rms(x, layer["ln2"]), layer["w13"]).chunk(2, dim=-1)
        return x + self._linear(F.silu(gate) * up, layer["w2"])

    def forward_full(self, ids: torch.Tensor, slots: list[int] | None = None) -> torch.Tensor:
        """Causal forward over right-padded rows `ids` [B, T] from position 0; returns hidden states [B, T, D] after
        the final norm. With `slots`, each row's keys/values are written to those cache slots (prefill)."""
        b, t = ids.shape
        self._rope_table(t)
        cos, sin = self.cos[:t], self.sin[:t]
        writes = self._prefill_writes(slots, t) if slots is not None else []
        x = F.embedding(ids, self.embed)
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, self._rms(x, layer["ln1"]))
            q = self._rotate(q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)
            k = self._rotate(k.view(b, t, self.n_kv, self.head_dim).transpose(1, 2), cos, sin)
            v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
            for block, rows, local, width in writes:
                block.keys[i][local, :, :width] = k[rows, :, :width]
                block.values[i][local, :, :width] = v[rows, :, :width]
            # right padding only ever follows the real tokens, so the causal mask alone is right for them
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_heads)
            x = self._mlp_out(layer, x, a.transpose(1, 2).reshape(b, t, -1))
        return self._rms(x, self.norm)

    def _prefill_writes(self, slots: list[int], t: int) -> list[tuple]:
        """Per block: (block, rows of the batch, their slots within the block, how many positions to write). A
        block's capacity bounds that width: a row's own prompt always fits its slot (cache_layout), and what lies
        beyond it in a padded batch is padding."""
        writes = []
        for block in self.blocks:
            rows = [r for r, s in enumerate(slots) if block.start <= s < block.stop]
            if rows:
                local = to_device([slots[r] - block.start for r in rows], self.device)
                writes.append((block, to_device(rows, self.device), local, min(t, block.length)))
        return writes

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits (fp32, row-major: sampling reads them row by row). On CPU the weight-major product
        (see _linear) leaves them vocab-major, and transposing 64 x 49,152 floats in one piece takes ~11 ms, most
        of a decode step's non-matmul time; done in slices of LOGIT_CHUNK vocabulary rows, each slice's transpose
        stays in cache. Same bits as one product: checked at 16-200 rows on SmolLM2 (vocabulary 49,152,
        tests/generation/test_lean_backend.py) and on Qwen2.5-Coder-1.5B (151,936: a last slice of 384 rows)."""
        rows = hidden.numel() // hidden.shape[-1]
        if not self.weight_major or rows < WEIGHT_MAJOR_MIN_ROWS:
            return self._linear(hidden, self.lm_head).float().contiguous()
        flat = hidden.reshape(rows, hidden.shape[-1]).t()
        vocab = self.lm_head.shape[0]
        out = torch.empty(rows, vocab, dtype=torch.float32, device=self.device)
        for lo in range(0, vocab, LOGIT_CHUNK):
            out[:, lo:lo + LOGIT_CHUNK] = torch.mm(self.lm_head[lo:lo + LOGIT_CHUNK], flat).t()
        return out.view(*hidden.shape[:-1], vocab)

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, span: int | None = None) -> torch.Tensor:
        """One token for each of the first B slots: `tokens` [B] sit at `positions` [B]. Writes their keys/values
        to the cache and returns next-token logits [B, vocab] (fp32).

        span=None splits the rows into attention groups by length (_attention_groups), which reads the positions on
        the host: fastest on CPU. With a span (> every position), all rows attend over the first `span` cache
        positions under one mask built on the device: no host read and fixed shapes, as a CUDA graph needs
        (cuda_graphs.DecodeGraphs)."""
        if span is not None and self.kernels == "triton":
            return self._fused_step(tokens, positions)
        b = tokens.shape[0]
        rows = torch.arange(b, device=self.device)
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)  # [B, 1, d]
        if span is None:
            groups, allowed = self._attention_groups(positions), None
        else:
            assert len(self.blocks) == 1, "steps with a fixed span run on a one-block cache"
            mask = (torch.arange(span, device=self.device)[None, :] > positions[:, None]).view(b, 1, 1, span)
            groups = [(0, b, span, mask, self.blocks[0])]
            allowed = ~mask if self.span_attention == "sdpa" else None  # SDPA's boolean mask: True where it may look
        # each block's rows: (block, their slots within it, first row, end row)
        writes = [(blk, rows[:min(blk.stop, b) - blk.start], blk.start, min(blk.stop, b))
                  for blk in self.blocks if blk.start < b]
        x = F.embedding(tokens, self.embed)  # [B, D]
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, self._rms(x, layer["ln1"]))
            q = self._rotate(q.view(b, self.n_heads, self.head_dim), cos, sin)
            k = self._rotate(k.view(b, self.n_kv, self.head_dim), cos, sin)
            v = v.view(b, self.n_kv, self.head_dim)
            for blk, local, lo, hi in writes:
                blk.keys[i][local, :, positions[lo:hi]] = k[lo:hi]
                blk.values[i][local, :, positions[lo:hi]] = v[lo:hi]
            if allowed is not None:
                a = self._sdpa_attention(i, q, span, allowed)
            else:
                a = self._matmul_attention(i, q, groups)
            x = self._mlp_out(layer, x, a.reshape(b, -1))
        return self.logits(self._rms(x, self.norm))

    def _fused_step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """decode_step with a span, through the fused Triton kernels: each layer's residual add goes with the next
        norm, and attention reads each row's own positions, so the span is not needed."""
        assert len(self.blocks) == 1, "steps with a fixed span run on a one-block cache"
        fused, block = self._triton, self.blocks[0]
        x, h = fused.add_rms_norm(F.embedding(tokens, self.embed), None, self.layers[0]["ln1"], self.eps)
        for i, layer in enumerate(self.layers):
            qkv = self._linear(h, layer["wqkv"], layer["bqkv"])
            a = fused.rope_attend(qkv, self.cos, self.sin, positions, block.keys[i], block.values[i], self.n_heads,
                                  self.n_kv, self.scale)
            x, h = fused.add_rms_norm(x, self._linear(a.view(a.shape[0], -1), layer["wo"], layer["bo"]),
                                      layer["ln2"], self.eps)
            mlp = self._linear(fused.silu_mul(self._linear(h, layer["w13"])), layer["w2"])
            next_norm = self.layers[i + 1]["ln1"] if i + 1 < len(self.layers) else self.norm
            x, h = fused.add_rms_norm(x, mlp, next_norm, self.eps)
        return self.logits(h)

    @property
    def needs_span(self) -> bool:
        """Whether fixed-span steps attend over the span (under a mask) rather than each row's own positions."""
        return self.kernels != "triton"

    def _matmul_attention(self, i: int, q: torch.Tensor, groups: list[tuple]) -> torch.Tensor:
        """Layer i's attention for one query per row [B, heads, d], group by group, as two batched matmuls: the query
        heads that share a KV head form the rows of one product. (CPU SDPA's flash kernel with a mask is ~10x slower
        at a single query.)"""
        qg = q.view(q.shape[0], self.n_kv, self.n_heads // self.n_kv, self.head_dim)
        parts = []
        for lo, hi, span, mask, blk in groups:
            keys = blk.keys[i][lo - blk.start:hi - blk.start, :, :span]
            values = blk.values[i][lo - blk.start:hi - blk.start, :, :span]
            scores = torch.matmul(qg[lo:hi], keys.transpose(2, 3)) * self.scale
            if mask is not None:
                scores = scores.masked_fill_(mask, float("-inf"))
            parts.append(torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), values))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _sdpa_attention(self, i: int, q: torch.Tensor, span: int, allowed: torch.Tensor) -> torch.Tensor:
        """Layer i's attention over the first `span` positions of a one-block cache, by torch's fused SDPA; `allowed`
        [B, 1, 1, span] is True where a row may look. The query heads that share a KV head go in as that head's
        queries ([B, kv heads, heads per kv head, d]), not through `enable_gqa`: CUDA's fused kernels that take a mask
        do not take GQA, and would fall back to the unfused one."""
        b = q.shape[0]
        keys, values = self.blocks[0].keys[i][:b, :, :span], self.blocks[0].values[i][:b, :, :span]
        qg = q.view(b, self.n_kv, self.n_heads // self.n_kv, self.head_dim)
        return F.scaled_dot_product_attention(qg, keys, values, attn_mask=allowed)

    def _attention_groups(self, positions: torch.Tensor) -> list[tuple]:
        """Split the rows into runs of consecutive slots, each attending over its own longest span.

        Reading the KV cache is most of a decode step's attention time, and one span for all rows makes a short
        sequence read as many (masked, stale) positions as the longest one. Live sequences sit in admission order
        (longest prompt first, the oldest has generated most), so consecutive slots have similar lengths. A group
        takes up to ATTENTION_GROUP rows and closes early when its padded reads (rows x longest span) would exceed
        the rows' own spans by more than ATTENTION_SLACK: one 1,350-token prompt among 200-token ones then gets a
        group of its own instead of making 15 neighbours read 1,350 positions each. A group never spans two cache
        blocks. Per group: (lo, hi, span, mask or None when no row needs one, cache block)."""
        b = positions.shape[0]
        pos = positions.tolist()
        groups = []
        lo = 0
        while lo < b:
            block = self.block_of(lo)
            end = min(b, block.stop)
            hi, longest, total = lo + 1, pos[lo] + 1, pos[lo] + 1
            while hi < end and hi - lo < ATTENTION_GROUP:
                wider = max(longest, pos[hi] + 1)
                if (hi - lo + 1) * wider > ATTENTION_SLACK * (total + pos[hi] + 1):
                    break
                longest, total, hi = wider, total + pos[hi] + 1, hi + 1
            mask = None
            if min(pos[lo:hi]) + 1 < longest:  # a slot sees only its own positions 0..position; the rest is stale
                mask = (torch.arange(longest, device=self.device)[None, :] > positions[lo:hi, None]).view(
                    hi - lo, 1, 1, longest)
            groups.append((lo, hi, longest, mask, block))
            lo = hi
        return groups

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy a sequence's cache, all layers at once, from slot src to slot dst (keeps live sequences in the first
        slots). Both slots must have room for `length` positions."""
        a, b = self.block_of(src), self.block_of(dst)
        b.tensor[:, :, dst - b.start, :, :length] = a.tensor[:, :, src - a.start, :, :length]

    def copy_prefix(self, src: int, dsts: list[int], length: int) -> None:
        """Share one prompt's prefill with other slots (n samples of the same prompt)."""
        for dst in dsts:
            self.move_slot(src, dst, length)
