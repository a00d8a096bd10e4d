"""Local generation with a transformers model: batched, length-sorted, left-padded, seeded."""

from __future__ import annotations

import contextlib
from typing import Sequence

from tqdm.auto import tqdm

from selfalign.data.io import source_of
from selfalign.data.records import Prompt, Response
from selfalign.errors import DataError
from selfalign.generation.base import Generator, OnBatch, SamplingParams, cut_at_stop, special_stop_ids, stop_window
from selfalign.models import encode_prompt, load_model, load_tokenizer, model_name, resolve_model


def context_length(config) -> int:
    """The most tokens a model with this transformers config takes (prompt and answer)."""
    return int(getattr(config, "max_position_embeddings", 0) or 2048)


def encode_prompts(tokenizer, limit: int, prompts: Sequence[Prompt], max_new_tokens: int,
                   source: str | None = None) -> list[list[int]]:
    """Token ids of each rendered prompt (plus `meta['assistant_prefix']`, the start of the answer to continue,
    when a prompt has one); a prompt that leaves no room for `max_new_tokens` within `limit` is a DataError."""
    out = []
    for i, p in enumerate(prompts):
        ids = encode_prompt(tokenizer, p.messages, p.meta.get("assistant_prefix", ""))
        if len(ids) + max_new_tokens > limit:
            path, line = source_of(p)
            raise DataError(f"prompt '{p.id}' is {len(ids)} tokens; with max_new_tokens={max_new_tokens} it "
                            f"exceeds the model's context of {limit} tokens", path=path or source or "<prompts>",
                            line=line or i + 1, field="prompt")
        out.append(ids)
    return out


class _StopInAnswer:
    """A transformers stopping criterion: a row is done when the text it generated holds a stop string.

    Written by hand because transformers' own `stop_strings` criterion reads the tail of the whole sequence, prompt
    included, so a prompt (or an assistant prefix) ending in part of a stop string stops a row after one token with
    no stop string in its answer; the lean and vLLM backends, and OpenAI's API, look at the answer only."""

    def __init__(self, tokenizer, stop: tuple[str, ...], prompt_width: int):
        self.tokenizer, self.stop, self.width, self.window = tokenizer, stop, prompt_width, stop_window(stop)

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        rows = input_ids[:, self.width:][:, -self.window:].tolist()
        hits = [cut_at_stop(self.tokenizer.decode(r, skip_special_tokens=True), self.stop)[1] for r in rows]
        return torch.tensor(hits, dtype=torch.bool, device=input_ids.device)


class TransformersGenerator(Generator):
    """`model.generate` over length-sorted batches.

    Reproducibility: the batch plan depends only on the prompts, `batch_size` and `n`, and each batch is seeded
    with (seed, batch index), so a run gives the same samples every time, and a resumed run regenerates a
    half-written batch exactly as the uninterrupted run would have (the writer drops what it already has).
    """

    backend = "transformers"

    def __init__(self, model: str | None = None, batch_size: int = 16, dtype: str = "auto", device: str = "auto",
                 trust_remote_code: bool = False, model_obj=None, tokenizer=None):
        self.model = model_obj if model_obj is not None else load_model(model, dtype, device, trust_remote_code)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model, "left", trust_remote_code)
        self.tokenizer.padding_side = "left"
        self.model_name = model_name(model)
        self.model_path = resolve_model(model) if model_obj is None else None
        self.batch_size = batch_size
        self.device = next(self.model.parameters()).device
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos = set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        eos.add(self.tokenizer.eos_token_id)
        self.eos_ids = sorted(e for e in eos if e is not None)

    def encode(self, prompts: Sequence[Prompt], max_new_tokens: int, source: str | None = None) -> list[list[int]]:
        """`encode_prompts` with this model's tokenizer and context."""
        return encode_prompts(self.tokenizer, context_length(self.model.config), prompts, max_new_tokens, source)

    def plan(self, encoded: list[list[int]], n: int) -> list[list[int]]:
        """Batches of prompt indices, longest first (an out-of-memory shows up on the first batch, not the last)."""
        per_batch = max(1, self.batch_size // max(1, n))
        order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
        return [order[i:i + per_batch] for i in range(0, len(order), per_batch)]

    @contextlib.contextmanager
    def _sampling_params_only(self):
        """Generate with the model's own generation_config set aside: `generate` fills every setting a call leaves
        unset from it, so a checkpoint shipping e.g. repetition_penalty 1.1 or min_p would sample another
        distribution than SamplingParams says (and than the lean and vLLM backends draw from). Only its special
        token ids are kept."""
        from transformers import GenerationConfig

        own = self.model.generation_config
        self.model.generation_config = GenerationConfig(
            bos_token_id=own.bos_token_id, eos_token_id=own.eos_token_id, pad_token_id=own.pad_token_id)
        try:
            yield
        finally:
            self.model.generation_config = own

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams, on_batch: OnBatch | None = None,
                 skip: set | None = None, progress: bool = True, source: str | None = None) -> list[Response]:
        import torch

        skip = skip or set()
        encoded = self.encode(prompts, params.max_new_tokens, source)
        batches = self.plan(encoded, params.n)
        results: list[Response] = []
        bar = tqdm(total=len(prompts) * params.n, desc=f"generate ({self.model_name})", unit="answer",
                   disable=not progress)
        pad = self.tokenizer.pad_token_id
        stop_ids = special_stop_ids(self.tokenizer, params.stop, self.eos_ids)
        for b, idx in enumerate(batches):
            wanted = [(prompts[i], s) for i in idx for s in range(params.n) if (prompts[i].id, s) not in skip]
            if not wanted:
                bar.update(len(idx) * params.n)
                continue
            width = max(len(encoded[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
            attention = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):  # left padding: every prompt ends at the same column
                ids = encoded[i]
                input_ids[row, width - len(ids):] = torch.tensor(ids)
                attention[row, width - len(ids):] = 1
            torch.manual_seed(params.seed * 1_000_003 + b)
            # greedy samples are identical, so decode each prompt once and repeat it n times
            per_prompt = 1 if params.greedy else params.n
            kwargs = dict(max_new_tokens=params.max_new_tokens, num_return_sequences=per_prompt, pad_token_id=pad,
                          eos_token_id=sorted(set(self.eos_ids) | stop_ids))
            if params.stop:  # each row stops at a stop string in its answer; the text is cut below
                from transformers import StoppingCriteriaList

                stop_in_answer = _StopInAnswer(self.tokenizer, params.stop, width)
                kwargs.update(stopping_criteria=StoppingCriteriaList([stop_in_answer]))
            if params.greedy:
                kwargs.update(do_sample=False)
            else:
                kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
            with torch.inference_mode(), self._sampling_params_only():
                out = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                                          **kwargs)
            new = out[:, width:].tolist()
            batch = []
            for row, i in enumerate(idx):
                for s in range(params.n):
                    toks = new[row * per_prompt + (0 if params.greedy else s)]
                    end = next((k for k, t in enumerate(toks) if t in self.eos_ids or t in stop_ids), None)
                    finish = "stop" if end is not None else "length"
                    hit = end is not None and toks[end] in stop_ids  # a special-token stop string: not counted
                    toks = toks[:end] if end is not None else toks
                    end = None if hit else end
                    text = self.tokenizer.decode(toks, skip_special_tokens=True)
                    if params.stop:
                        text, in_text = cut_at_stop(text, params.stop)
                        if in_text and not hit:
                            finish, end, hit = "stop", None, True  # the stop string's tokens are counted, no end token
                            toks = [t for t in toks if t != pad] if pad not in self.eos_ids else toks
                    if (prompts[i].id, s) in skip:
                        continue
                    batch.append(self._response(prompts[i], text, params, s, finish,
                                                len(toks) + (1 if end is not None else 0), self.backend, hit))
            results.extend(batch)
            if on_batch is not None:
                on_batch(batch)
            bar.update(len(idx) * params.n)
        bar.close()
        by_key = {r.key: r for r in results}
        return [by_key[(p.id, s)] for p in prompts for s in range(params.n) if (p.id, s) in by_key]
