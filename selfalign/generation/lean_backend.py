"""Local generation with the lean decoder: continuous batching over a static KV cache, per-sequence seeded sampling.

The loop keeps up to `batch_size` sequences decoding together. When one finishes, its slot goes to the next waiting
sequence at once (continuous batching), so no step is spent on rows that already stopped, which is where batched
`model.generate` loses most of its time on answers of uneven length. Live sequences always occupy the first slots, in
admission order (when some finish, the later ones move down; new ones join at the end), so each step runs over
exactly the live rows. The n samples of one prompt share a single prefill.

Reproducibility: each sequence draws its random numbers from its own counter-based stream keyed by (seed, prompt
id, sample index) (sampling.counter_uniforms), so a sample does not depend on which other sequences share its
batch: a resumed run, or the same prompt in a different file, gives the same sample. Sampling follows transformers:
softmax(logits / temperature), top-p keeps the smallest set of most likely tokens whose mass reaches top_p, then one
draw from what is left.

Decode steps run one of three ways (`decode=`): "grouped" (CPU default) splits attention by sequence length, which
reads the lengths on the host; "graphs" (CUDA default) replays CUDA-graph-captured steps of bucketed shapes
(cuda_graphs.DecodeGraphs); "static" is the graphs' bucketed path run eagerly, for testing it on a CPU.

Overlap (`overlap=`, default on CUDA): the host must read each step's sampled tokens to see which sequences end, and
on a GPU that read waits for the step. With overlap, step t+1 is launched with step t's tokens before the host reads
them, so the GPU decodes while the host records tokens, writes finished answers and refills slots; a sequence that
turns out to have ended spends one wasted row in that step, whose result is dropped. Per-step inputs go to the
device from pinned memory without a wait. The answers are the same either way (each sequence's tokens and random
draws do not depend on its neighbours); on a CPU, where nothing runs in parallel, overlap only adds the wasted rows.

The KV cache is freed when a call ends (recipes train right after generating, in the same process), except with
"graphs" and "static" steps: there the one-block cache and the graphs captured against it stay until `close()` (or
until the generator is dropped), and the next call reuses both when its sequences fit, so only the first call pays
for capturing.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm

from selfalign.data.records import Prompt, Response
from selfalign.generation.base import (OnBatch, SamplingParams, cut_at_stop, sequence_seed, special_stop_ids,
                                       stop_window)
from selfalign.generation.cuda_graphs import DecodeGraphs
from selfalign.generation.lean_decoder import LeanDecoder, to_device
from selfalign.generation.sampling import counter_uniforms, sample_tokens
from selfalign.generation.transformers_backend import TransformersGenerator

# tokens per prefill chunk: bounds the activation memory of prefilling many new prompts at once
PREFILL_TOKENS = 4096
DECODE_MODES = ("auto", "grouped", "static", "graphs")
# most KV cache blocks of different capacity (lean_decoder.CacheBlock): each adds two small writes per layer and step
CACHE_BLOCKS = 3


def cache_layout(needs: list[int], slots: int, blocks: int = CACHE_BLOCKS) -> list[tuple[int, int]]:
    """KV cache blocks (slots, capacity) for `slots` slots, given the positions each wanted sequence needs (prompt +
    max_new_tokens), longest first.

    Sequences are admitted longest prompt first and live ones keep admission order in slots 0, 1, ..., so the
    sequence in slot k always has k live predecessors that need at least as much as it does: it needs at most
    needs[k]. Slot k's capacity can therefore be needs[k] instead of needs[0]. The slots are cut into at most
    `blocks` runs, each as long as its first slot needs, choosing the cuts that hold the fewest positions in all
    (dynamic programming over cut points). On the 64-prompt benchmark (one 1,350-token prompt among short ones) 128
    slots need 60k positions instead of 198k: 2.8 GB of SmolLM2 cache instead of 9.1 GB."""
    cap = needs[:slots]
    n = len(cap)
    # cost[m][j]: fewest positions for slots j..n-1 in at most m blocks; end[m][j]: where the first block ends
    cost = [[0 if j == n else float("inf") for j in range(n + 1)] for _ in range(blocks + 1)]
    end = [[n] * (n + 1) for _ in range(blocks + 1)]
    for m in range(1, blocks + 1):
        for j in range(n - 1, -1, -1):
            for e in range(j + 1, n + 1):
                c = cap[j] * (e - j) + cost[m - 1][e]
                if c <= cost[m][j]:  # on a tie the longer block: no cut that saves nothing
                    cost[m][j], end[m][j] = c, e
    layout, j, m = [], 0, blocks
    while j < n:
        layout.append((end[m][j] - j, cap[j]))
        j, m = end[m][j], m - 1
    return layout


def kv_cache_budget(device: torch.device) -> int:
    """Bytes the KV cache may take by default: half the memory free now (recipes keep a model, an optimizer and
    a judge in the same process), split between the CPU worker processes sharing it (generation/parallel.py)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    import psutil

    from selfalign.workers import host_shared_by

    return psutil.virtual_memory().available // 2 // host_shared_by()


def _take_whole_prompts(waiting: list[tuple[int, int]], free: int, slots: int) -> list[tuple[int, int]]:
    """Pop (prompt index, sample index) pairs off the end of `waiting` for up to `free` slots, keeping the samples
    of one prompt together: they then share one prefill (`_admit`), where a sample admitted alone would prefill the
    prompt again. A prompt whose samples do not all fit waits for more slots (an idle slot costs a decode step almost
    nothing; a prefill costs about as much as a decode step); one with more samples than `slots` is split."""
    taken: list[tuple[int, int]] = []
    while waiting:
        i = waiting[-1][0]
        group = 1
        while group < len(waiting) and waiting[-1 - group][0] == i:
            group += 1
        room = free - len(taken)
        if group > room and (group <= slots or room == 0):
            break
        taken.extend(waiting.pop() for _ in range(min(group, room)))
    return taken


@dataclass
class _Sequence:
    prompt_index: int
    sample_index: int
    key: int  # the sequence's random stream (sampling.counter_uniforms); its draw counter is len(tokens)
    tokens: list[int] = field(default_factory=list)
    length: int = 0  # tokens in the cache (prompt + generated so far, excluding the pending token)


class LeanGenerator(TransformersGenerator):
    """Same interface, prompt encoding and records as TransformersGenerator; a faster decode loop. Models the lean
    decoder does not support are answered by the transformers loop."""

    backend = "lean"

    def __init__(self, *args, decode: str = "auto", max_cache_gb: float | None = None, overlap: bool | None = None,
                 span_attention: str = "matmul", kernels: str = "torch", **kwargs):
        """decode, overlap: see the module docstring. max_cache_gb: the most memory the KV cache may take (default:
        half of what is free when generation starts); fewer slots are used when the batch would need more.
        span_attention, kernels: how "graphs" and "static" steps attend and which kernels they run
        (lean_decoder.SPAN_ATTENTION, STEP_KERNELS)."""
        super().__init__(*args, **kwargs)
        self.max_cache_gb = max_cache_gb
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, not '{decode}'")
        self.decoder = LeanDecoder(self.model, span_attention=span_attention, kernels=kernels)
        if decode == "auto":
            decode = "graphs" if self.device.type == "cuda" else "grouped"
        self.decode = decode
        self.graphs = DecodeGraphs(self.decoder, capture=decode == "graphs") if decode != "grouped" else None
        # captured graphs point into the cache: keeping both lets the next call replay them instead of capturing again
        self.keep_cache = self.graphs is not None
        self.overlap = self.device.type == "cuda" if overlap is None else overlap
        self.last_slots = 0  # sequences the last call decoded at once

    def close(self) -> None:
        """Free the KV cache and the graphs captured against it."""
        self.decoder.release()
        if self.graphs is not None:
            self.graphs.reset()

    # -- generation --------------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Prompt], params: SamplingParams, on_batch: OnBatch | None = None,
                 skip: set | None = None, progress: bool = True, source: str | None = None) -> list[Response]:
        skip = skip or set()
        encoded = self.encode(prompts, params.max_new_tokens, source)
        per_prompt = 1 if params.greedy else params.n  # greedy samples are identical: decode once, repeat
        wanted = [(i, s) for i in sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), i))
                  for s in range(per_prompt)
                  if any((prompts[i].id, k) not in skip for k in ([s] if per_prompt > 1 else range(params.n)))]
        results: list[Response] = []
        bar = tqdm(total=len(prompts) * params.n, desc=f"generate ({self.model_name}, lean)", unit="answer",
                   disable=not progress)
        bar.update(len(prompts) * params.n - sum(params.n if per_prompt == 1 else 1 for _ in wanted))
        if not wanted:
            bar.close()
            return []
        dec = self.decoder
        plan = self._cache_plan([len(encoded[i]) + params.max_new_tokens for i, _ in wanted])
        if not dec.holds(plan) or (self.max_cache_gb is not None and dec.cache_bytes > self.max_cache_gb * 2 ** 30):
            # free a kept cache, and the graphs that still reference it, before allocating: never two at once
            self.close()
        dec.allocate_blocks(plan)
        slots = self.last_slots = dec.slots  # (fewer than batch_size when max_cache_gb caps the cache)
        # encode() refuses prompts that leave max_new_tokens no room in the model's context; should a sequence still
        # reach the context's last position, it ends there
        limit = dec.max_positions

        waiting = list(reversed(wanted))  # pop() takes the longest prompt first
        live: list[_Sequence] = []
        pending = torch.zeros(0, dtype=torch.long, device=self.device)  # next input token of each live sequence

        stop_ids = special_stop_ids(self.tokenizer, params.stop, self.eos_ids)

        def finish(seq: _Sequence, stopped: bool, hit: bool = False) -> list[Response]:
            """stopped: it ended at an end-of-turn token (counted); hit: at a stop token (not counted)."""
            p = prompts[seq.prompt_index]
            text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
            n_tok = len(seq.tokens) + (1 if stopped else 0)
            stopped = stopped or hit
            if params.stop:
                text, in_text = cut_at_stop(text, params.stop)
                if in_text:
                    stopped, hit, n_tok = True, True, len(seq.tokens)
            idx = [seq.sample_index] if per_prompt > 1 else range(params.n)
            return [self._response(p, text, params, s, "stop" if stopped else "length", n_tok, self.backend, hit)
                    for s in idx if (p.id, s) not in skip]

        def retire(tokens: list[int], fed: int) -> list[int]:
            """Record each live sequence's newest token (fed: whether it is already in the cache), finish those that
            end, and return the indices of those that go on."""
            done, keep = [], []
            for k, (seq, tok) in enumerate(zip(live, tokens)):
                stopped, at_stop_token = tok in self.eos_ids, tok in stop_ids
                if not (stopped or at_stop_token):
                    seq.tokens.append(tok)
                # (within the context, a slot always has room for max_new_tokens: cache_layout)
                if stopped or at_stop_token or len(seq.tokens) >= params.max_new_tokens or (
                        seq.length - fed + 1 >= limit) or (params.stop and self._at_stop(seq.tokens, params.stop)):
                    done.extend(finish(seq, stopped, at_stop_token))
                    bar.update(1 if per_prompt > 1 else params.n)
                else:
                    keep.append(k)
            if len(keep) < len(live):
                self._compact(live, [live[k] for k in keep])
            if done:
                results.extend(done)
                if on_batch is not None:
                    on_batch(done)
            return keep

        with torch.inference_mode(), self._holding_cache():
            while waiting or live:
                admitted = _take_whole_prompts(waiting, slots - len(live), slots)
                if admitted:
                    new = [self._sequence(i, s, prompts, encoded, params) for i, s in admitted]
                    first = self._admit(new, encoded, params, len(live))
                    live.extend(new)
                    pending = torch.cat([pending, first])
                if self.overlap:  # the next step decodes while the host reads this one's tokens
                    seen, ready = self._to_host(pending)
                    ahead = self._step(live, pending, params, unseen=1, limit=limit)
                    if ready is not None:
                        ready.synchronize()
                    keep = retire(seen.tolist(), fed=1)
                    live = [live[k] for k in keep]
                    pending = ahead if len(keep) == len(ahead) else ahead[self._to_device(keep)]
                else:  # read the tokens, then decode one more step for the sequences that go on
                    tokens = pending.tolist()
                    keep = retire(tokens, fed=0)
                    live = [live[k] for k in keep]
                    pending = pending[:0]
                    if live:
                        pending = self._step(live, self._to_device([tokens[k] for k in keep]), params, unseen=0,
                                             limit=limit)
        bar.close()
        by_key = {r.key: r for r in results}
        return [by_key[(p.id, s)] for p in prompts for s in range(params.n) if (p.id, s) in by_key]

    def _step(self, live: list[_Sequence], tokens: torch.Tensor, params: SamplingParams, unseen: int,
              limit: int) -> torch.Tensor:
        """Decode `tokens` (one per live sequence, in slot order) and sample each sequence's next token. unseen: 1
        when the host has not yet recorded `tokens` (overlap), so each sequence's draw index is one past its tokens.
        Positions stop at the context's last one: the plain loop never goes past it, but the overlapped step runs
        ahead for sequences that have already ended there (e.g. a prompt that fills the context); their results
        are dropped."""
        at = [min(s.length, limit - 1) for s in live]
        positions = self._to_device(at)
        if self.graphs is None:
            logits = self.decoder.decode_step(tokens, positions)
        else:
            logits = self.graphs.step(tokens, positions, span=max(at) + 1)
        for s in live:
            s.length += 1
        return sample_tokens(logits, params, self._uniforms(live, params, unseen))

    def _to_device(self, values) -> torch.Tensor:
        return to_device(values, self.device)

    def _to_host(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """A copy of `tokens` on the host, queued on the device, and the event after which it may be read."""
        if tokens.device.type != "cuda":
            return tokens, None
        seen = tokens.to("cpu", non_blocking=True)  # into pinned memory
        ready = torch.cuda.Event()
        ready.record()
        return seen, ready

    def _cache_plan(self, needs: list[int]) -> list[tuple[int, int]]:
        """The KV cache blocks for sequences needing `needs` positions (longest first): up to batch_size slots,
        fewer when the cache would exceed max_cache_gb (default: half the free memory). Graph steps attend over one
        span for all rows, so they get a single block."""
        wanted = max(1, min(self.batch_size, len(needs)))
        slots = wanted
        if self.max_cache_gb is not None:
            budget = self.max_cache_gb * 2 ** 30
        else:  # a cache kept from the last call is ours to reuse or replace: count it as free
            budget = kv_cache_budget(self.device) + self.decoder.cache_bytes // 2
        blocks = 1 if self.graphs is not None else CACHE_BLOCKS
        layout = cache_layout(needs, slots, blocks)
        size = lambda lay: sum(n * length for n, length in lay) * self.decoder.bytes_per_token  # noqa: E731
        wanted_bytes = size(layout)
        while slots > 1 and size(layout) > budget:
            slots = max(1, slots * 3 // 4)
            layout = cache_layout(needs, slots, blocks)
        if slots < wanted:
            print(f"selfalign: lean backend: {wanted} slots would need "
                  f"{wanted_bytes / 2 ** 30:.1f} GiB of KV cache, more than the {budget / 2 ** 30:.1f} GiB allowed "
                  f"(max_cache_gb); decoding at most {slots} at a time", file=sys.stderr)
        return layout

    @contextmanager
    def _holding_cache(self):
        """Release the KV cache (gigabytes) and the graphs that point into it when generation ends (unless
        keep_cache), and always when it fails or is interrupted: recipes train right after generating, in the same
        process. On CUDA the loop runs with the model's GPU current: its events, streams and graph captures take
        the current device, which for a model on cuda:1 is otherwise cuda:0."""
        scope = torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext()
        try:
            with scope:
                yield
        except BaseException:
            self.close()
            raise
        if not self.keep_cache:
            self.close()

    def _at_stop(self, tokens: list[int], stop: tuple[str, ...]) -> bool:
        """Whether the text so far holds a stop string; only the last few tokens are decoded (a stop string is
        complete the moment its last token arrives, and `stop_window` tokens hold the longest one)."""
        return cut_at_stop(self.tokenizer.decode(tokens[-stop_window(stop):], skip_special_tokens=True), stop)[1]

    @staticmethod
    def _sequence(i: int, s: int, prompts, encoded, params: SamplingParams) -> _Sequence:
        """Sample s of prompt i, with its own random stream."""
        return _Sequence(i, s, sequence_seed(params.seed, prompts[i].id, s), length=len(encoded[i]))

    def _uniforms(self, seqs: list[_Sequence], params: SamplingParams, unseen: int = 0) -> torch.Tensor | None:
        """Each sequence's next random number: draw number len(tokens) + unseen of its own stream."""
        if params.greedy:
            return None
        keys = self._to_device([s.key for s in seqs])
        return counter_uniforms(keys, self._to_device([len(s.tokens) + unseen for s in seqs]))

    def _admit(self, new: list[_Sequence], encoded, params, first_slot: int) -> torch.Tensor:
        """Prefill the prompts of `new` (each prompt once, however many of its samples arrive) into slots
        first_slot.., return the first token of each sequence."""
        owner: dict[int, int] = {}  # prompt index -> the slot that holds its prefill
        for k, seq in enumerate(new):
            owner.setdefault(seq.prompt_index, first_slot + k)
        unique = sorted(owner, key=lambda i: -len(encoded[i]))
        last_hidden: dict[int, torch.Tensor] = {}
        start = 0
        while start < len(unique):  # chunks of at most PREFILL_TOKENS padded tokens, at most 1/4 of them padding
            width = len(encoded[unique[start]])
            end = start + 1
            while (end < len(unique) and (end - start + 1) * width <= PREFILL_TOKENS
                   and 4 * len(encoded[unique[end]]) >= 3 * width):
                end += 1
            chunk = unique[start:end]
            ids = torch.full((len(chunk), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
            for row, i in enumerate(chunk):
                ids[row, :len(encoded[i])] = torch.tensor(encoded[i])
            hidden = self.decoder.forward_full(self._to_device(ids), [owner[i] for i in chunk])
            for row, i in enumerate(chunk):
                last_hidden[i] = hidden[row, len(encoded[i]) - 1]
            start = end
        for k, seq in enumerate(new):
            slot = first_slot + k
            if owner[seq.prompt_index] != slot:
                self.decoder.copy_prefix(owner[seq.prompt_index], [slot], seq.length)
        logits = self.decoder.logits(torch.stack([last_hidden[s.prompt_index] for s in new]))
        return sample_tokens(logits, params, self._uniforms(new, params))

    def _compact(self, live: list[_Sequence], keep: list[_Sequence]) -> None:
        """Move the surviving sequences' caches into slots 0..len(keep)-1, preserving their order. One copy per
        moved sequence, of its own length: a single gather of all moves at their longest length copies more bytes
        and measured slower (6.5 s against 4.4 s over the benchmark run)."""
        slot_of = {id(s): k for k, s in enumerate(live)}
        for dst, seq in enumerate(keep):
            src = slot_of[id(seq)]
            if src != dst:
                self.decoder.move_slot(src, dst, seq.length)

    # -- scoring -----------------------------------------------------------------------------------------------
    def sequence_logprobs(self, prefixes: list[list[int]], continuations: list[list[int]],
                          max_tokens: int = PREFILL_TOKENS) -> list[float]:
        """Sum of log p(continuation | prefix) for each pair, batched by length (SPA's implicit reward, DPO's
        reference log-probs)."""
        seqs = [list(p) + list(c) for p, c in zip(prefixes, continuations)]
        out = [0.0] * len(seqs)
        for idx, logp in self._score_batches(seqs, max_tokens):
            for row, i in enumerate(idx):
                start, end = len(prefixes[i]), len(seqs[i])
                if end > start:
                    targets = torch.tensor(seqs[i][start:end], device=self.device)
                    out[i] = float(logp(row, start - 1, end - 1).gather(1, targets[:, None]).sum())
        return out

    def next_token_logprobs(self, prefixes: list[list[int]], candidates: list[int],
                            max_tokens: int = PREFILL_TOKENS) -> torch.Tensor:
        """log p(token | prefix) for each candidate token after each prefix: [N, len(candidates)] (judges' verdict
        tokens)."""
        out = torch.zeros(len(prefixes), len(candidates))
        cand = torch.tensor(candidates, device=self.device)
        for idx, logp in self._score_batches([list(p) for p in prefixes], max_tokens):
            for row, i in enumerate(idx):
                n = len(prefixes[i])
                out[i] = logp(row, n - 1, n)[0, cand].cpu()
        return out

    def _score_batches(self, seqs: list[list[int]], max_tokens: int):
        """Yield (indices, logp) over length-sorted batches; logp(row, a, b) gives log-softmax rows a..b-1."""
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        start = 0
        with torch.inference_mode():
            while start < len(order):
                width = len(seqs[order[start]])
                idx = order[start:start + max(1, max_tokens // width)]
                ids = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    ids[row, :len(seqs[i])] = torch.tensor(seqs[i])
                hidden = self.decoder.forward_full(ids.to(self.device))

                def logp(row, a, b, hidden=hidden):
                    return torch.log_softmax(self.decoder.logits(hidden[row, a:b]), dim=-1)

                yield idx, logp
                start += len(idx)
