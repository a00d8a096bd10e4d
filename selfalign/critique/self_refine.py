"""Self-refinement at inference (SRT §4.1): a model answers, critiques its own answer and returns the refinement, in
one greedy pass, as a `Generator` that any caller (`selfalign generate --self-refine`, the SRT evaluation) wraps
around a local or API generator.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from selfalign.critique.parse import parse_critique
from selfalign.critique.prompts import critique_prompt
from selfalign.data import Prompt, Response
from selfalign.generation import Generator, SamplingParams


class SelfRefineGenerator(Generator):
    """Answer → self-critique → refined answer, as one generator (SRT inference, §4.1: one greedy pass).

    The response record holds the refinement; `meta` holds the original answer, the critique, its score and the
    parse status. A critique that does not parse leaves the original answer (meta.refine_status = the reason)."""

    def __init__(self, inner: Generator, critique_params: SamplingParams | None = None, fmt: str = "two_turn",
                 chunk_size: int = 16):
        self.inner, self.critique_params, self.fmt, self.chunk_size = inner, critique_params, fmt, chunk_size
        self.model_name = f"{inner.model_name}+self-refine"

    def generate(self, prompts, params, on_batch=None, skip=None, progress=True):
        skip = skip or set()
        cparams = self.critique_params or SamplingParams(temperature=0.0, max_new_tokens=2 * params.max_new_tokens
                                                         + 128, seed=params.seed)
        cparams = replace(cparams, n=1)
        todo = [p for p in prompts if any((p.id, s) not in skip for s in range(params.n))]
        results = []
        for start in range(0, len(todo), self.chunk_size):
            answers = [a for a in self.inner.generate(todo[start:start + self.chunk_size], params, progress=False)
                       if a.key not in skip]
            cps = [critique_prompt(str(k), a.messages, a.response, self.fmt) for k, a in enumerate(answers)]
            crits = {c.prompt_id: c for c in self.inner.generate(cps, cparams, progress=False)} if cps else {}
            batch = []
            for k, a in enumerate(answers):
                c = crits[str(k)]
                parsed = parse_critique(c.response, a.response)  # a truncated refinement is still used here
                refined = parsed.refinement if parsed.ok else a.response
                sampling = dict(a.sampling, self_refine=dict(cparams.to_dict(), format=self.fmt))
                batch.append(Response(prompt_id=a.prompt_id, messages=a.messages, response=refined,
                                      model=self.model_name, sample_index=a.sample_index, sampling=sampling,
                                      finish_reason=c.finish_reason if parsed.ok else a.finish_reason,
                                      num_tokens=(a.num_tokens or 0) + (c.num_tokens or 0),
                                      meta={"original": a.response, "critique": c.response, "score": parsed.score,
                                            "refine_status": parsed.reason or "refined",
                                            "original_finish_reason": a.finish_reason}))
            results.extend(batch)
            if on_batch is not None:
                on_batch(batch)
        return results

    def close(self) -> None:
        self.inner.close()


def self_refine(generator: Generator, prompts: Sequence[Prompt], params: SamplingParams,
                critique_params: SamplingParams | None = None, fmt: str = "two_turn") -> list[Response]:
    """Answer each prompt, have the same model critique and refine its answer, return the refined answers (the
    original and the critique in `meta`). Resumable into a file with `generate_to_file(SelfRefineGenerator(...))`."""
    return SelfRefineGenerator(generator, critique_params, fmt).generate(list(prompts), params)
