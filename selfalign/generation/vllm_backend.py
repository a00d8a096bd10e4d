"""Generation with vLLM, for users who have it installed (a CUDA machine): `--backend vllm`.

vLLM is optional and never imported unless this backend is chosen. The model is the same local folder every other
backend loads (`resolve_model`: a short name, a folder, a converted GGUF), prompts are rendered and tokenised by
selfalign's own chat formatting and handed to vLLM as token ids, so the prompt tokens are exactly those of the
transformers and lean backends.

Sampling semantics follow the other local backends: one vLLM request per (prompt, sample index) with the seed
`sequence_seed(seed, prompt id, sample index)`, so a sample does not depend on what else is in the batch and a
resumed run draws the same samples (vLLM's prefix caching shares the prompt's prefill across the n requests);
greedy decoding (`temperature 0`) decodes each prompt once and repeats the answer n times. Responses are handed to
`on_batch` every `chunk_size` requests, which is what makes a killed `generate_to_file` resumable.

`sequence_logprobs` (SPA's implicit reward, DPO reference log-probs) uses vLLM's prompt log-probabilities.

Not measured here: this project's machines had no GPU and no vLLM (benchmarks/RESULTS.md says which numbers exist).
The adapter is tested against a stand-in `vllm` module that checks every call it receives
(tests/generation/test_vllm_backend.py).
"""

from __future__ import annotations

import json
from typing import Sequence

from tqdm.auto import tqdm

from selfalign.data.records import Prompt, Response
from selfalign.errors import DataError, SelfalignError
from selfalign.generation.base import Generator, OnBatch, SamplingParams, cut_at_stop, sequence_seed


def _import_vllm():
    try:
        import vllm
    except ImportError as e:  # a missing optional dependency is a one-line user error, not a traceback
        raise SelfalignError("--backend vllm needs the vllm package (pip install vllm, on a CUDA machine); "
                             "use --backend auto otherwise") from e
    return vllm


class VLLMGenerator(Generator):
    backend = "vllm"

    def __init__(self, model: str | None = None, dtype: str = "auto", trust_remote_code: bool = False,
                 gpu_memory_utilization: float = 0.9, max_model_len: int | None = None, chunk_size: int = 1024,
                 seed: int = 0, llm=None, **engine_options):
        from selfalign.models import load_tokenizer, model_name, resolve_model

        self.vllm = _import_vllm()
        folder = resolve_model(model)
        self.tokenizer = load_tokenizer(model)
        self.model_name = model_name(model)
        self.chunk_size = max(1, int(chunk_size))
        config = json.loads((folder / "config.json").read_text())
        self.context = int(max_model_len or config.get("max_position_embeddings") or 2048)
        self.eos_ids = sorted(set(filter(lambda x: x is not None, self._eos_ids(folder) + [self.tokenizer.eos_token_id])))
        self.llm = llm if llm is not None else self.vllm.LLM(
            model=str(folder), tokenizer=str(folder), dtype=dtype, seed=seed, trust_remote_code=trust_remote_code,
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=self.context, **engine_options)

    @staticmethod
    def _eos_ids(folder) -> list[int]:
        path = folder / "generation_config.json"
        if not path.exists():
            return []
        eos = json.loads(path.read_text()).get("eos_token_id")
        return list(eos) if isinstance(eos, list) else [eos] if eos is not None else []

    def encode(self, prompts: Sequence[Prompt], max_new_tokens: int, source: str | None = None) -> list[list[int]]:
        from selfalign.data.io import source_of
        from selfalign.models import encode_prompt

        out = []
        for i, p in enumerate(prompts):
            ids = encode_prompt(self.tokenizer, p.messages)
            if len(ids) + max_new_tokens > self.context:
                path, line = source_of(p)
                raise DataError(f"prompt '{p.id}' is {len(ids)} tokens; with max_new_tokens={max_new_tokens} it "
                                f"exceeds the model's context of {self.context} tokens",
                                path=path or source or "<prompts>", line=line or i + 1, field="prompt")
            out.append(ids)
        return out

    def _params(self, params: SamplingParams, seed: int | None, **extra):
        greedy = params.greedy
        return self.vllm.SamplingParams(n=1, temperature=0.0 if greedy else params.temperature,
                                        top_p=1.0 if greedy else params.top_p, max_tokens=params.max_new_tokens,
                                        seed=None if greedy else seed, stop_token_ids=self.eos_ids,
                                        stop=list(params.stop) or None, **extra)

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams, on_batch: OnBatch | None = None,
                 skip: set | None = None, progress: bool = True, source: str | None = None) -> list[Response]:
        skip = skip or set()
        encoded = self.encode(prompts, params.max_new_tokens, source)
        per_prompt = 1 if params.greedy else params.n
        # (prompt index, sample index, the sample indices this request answers)
        requests = []
        for i, p in enumerate(prompts):
            for s in range(per_prompt):
                answers = [s] if per_prompt > 1 else list(range(params.n))
                answers = [k for k in answers if (p.id, k) not in skip]
                if answers:
                    requests.append((i, s, answers))
        results: list[Response] = []
        bar = tqdm(total=sum(len(a) for _, _, a in requests), desc=f"generate ({self.model_name}, vllm)",
                   unit="answer", disable=not progress)
        for start in range(0, len(requests), self.chunk_size):
            chunk = requests[start:start + self.chunk_size]
            outputs = self.llm.generate([{"prompt_token_ids": encoded[i]} for i, _, _ in chunk],
                                        [self._params(params, sequence_seed(params.seed, prompts[i].id, s))
                                         for i, s, _ in chunk], use_tqdm=False)
            done = []
            for (i, _, answers), out in zip(chunk, outputs):
                completion = out.outputs[0]
                stopped = completion.finish_reason == "stop"
                text = self.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
                if params.stop:  # vLLM leaves the stop string out of `text`, not out of token_ids
                    text, hit = cut_at_stop(text, params.stop)
                    stopped = stopped or hit
                done += [self._response(prompts[i], text, params, k, "stop" if stopped else "length",
                                        len(completion.token_ids), self.backend) for k in answers]
            results.extend(done)
            bar.update(len(done))
            if on_batch is not None:
                on_batch(done)
        bar.close()
        by_key = {r.key: r for r in results}
        return [by_key[(p.id, s)] for p in prompts for s in range(params.n) if (p.id, s) in by_key]

    def sequence_logprobs(self, prefixes: list[list[int]], continuations: list[list[int]]) -> list[float]:
        """Sum of log p(continuation | prefix) for each pair, from vLLM's prompt log-probabilities."""
        seqs = [list(p) + list(c) for p, c in zip(prefixes, continuations)]
        outputs = self.llm.generate([{"prompt_token_ids": s} for s in seqs],
                                    self.vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0),
                                    use_tqdm=False)
        sums = []
        for prefix, seq, out in zip(prefixes, seqs, outputs):
            # prompt_logprobs[t] maps token ids to Logprob objects for position t (None at t = 0); the actual
            # token is always among them
            sums.append(sum(float(out.prompt_logprobs[t][seq[t]].logprob) for t in range(len(prefix), len(seq))))
        return sums

    def close(self) -> None:
        self.llm = None
