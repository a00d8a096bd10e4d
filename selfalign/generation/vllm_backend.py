"""Generation with vLLM, for users who have it installed (a CUDA machine): `--backend vllm`.

vLLM is optional and never imported unless this backend is chosen. The model is the same local folder every other
backend loads (`resolve_model`: a short name, a folder, a converted GGUF), prompts are rendered and tokenised by
selfalign's own chat formatting and handed to vLLM as token ids, so the prompt tokens are exactly those of the
transformers and lean backends.

Sampling semantics follow the other local backends: one vLLM request per (prompt, sample index) with the seed
`sequence_seed(seed, prompt id, sample index)` (vLLM's prefix caching shares the prompt's prefill across the n
requests); greedy decoding (`temperature 0`) decodes each prompt once and repeats the answer n times. The seed fixes
each sample's random stream, but vLLM's logits depend on batch composition unless `VLLM_BATCH_INVARIANT=1` is set
(vLLM docs, "Reproducibility"), so a resumed run's samples are bit-identical only with it. Responses are handed to
`on_batch` every `chunk_size` requests, which is what makes a killed `generate_to_file` resumable.

`sequence_logprobs` (SPA's implicit reward, DPO reference log-probs) uses vLLM's prompt log-probabilities
(vLLM >= 0.10: earlier V1 releases ignored `prompt_logprobs` under prefix caching). For scoring runs that must not
depend on request order, pass `enable_prefix_caching=False` (an engine option; see vllm issue #42019).

Checked against vLLM's source (entrypoints/llm.py, sampling_params.py, outputs.py, 2026 main): argument names,
`{"prompt_token_ids": ...}` prompts, finish reasons, the prompt_logprobs layout.

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
from selfalign.generation.base import Generator, OnBatch, SamplingParams, cut_at_stop, sequence_seed, special_stop_ids


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
        self.model_path = folder
        self.chunk_size = max(1, int(chunk_size))
        self.eos_ids = sorted(set(filter(lambda x: x is not None, self._eos_ids(folder) + [self.tokenizer.eos_token_id])))
        if max_model_len:  # only a user's value is forced: vLLM refuses one above the length it derives itself
            engine_options["max_model_len"] = int(max_model_len)
        self.llm = llm if llm is not None else self.vllm.LLM(
            model=str(folder), tokenizer=str(folder), dtype=dtype, seed=seed, trust_remote_code=trust_remote_code,
            gpu_memory_utilization=gpu_memory_utilization, **engine_options)
        self.context = self._context(folder, max_model_len)

    def _context(self, folder, max_model_len: int | None) -> int:
        """The engine's own context length (it reads more config keys than max_position_embeddings); a config guess
        only for an injected engine without one."""
        engine = getattr(self.llm, "llm_engine", None)
        derived = getattr(getattr(engine, "model_config", None), "max_model_len", None)
        if derived:
            return int(derived)
        config = json.loads((folder / "config.json").read_text())
        return int(max_model_len or config.get("max_position_embeddings") or 2048)

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
            ids = encode_prompt(self.tokenizer, p.messages, p.meta.get("assistant_prefix", ""))
            if len(ids) + max_new_tokens > self.context:
                path, line = source_of(p)
                raise DataError(f"prompt '{p.id}' is {len(ids)} tokens; with max_new_tokens={max_new_tokens} it "
                                f"exceeds the model's context of {self.context} tokens",
                                path=path or source or "<prompts>", line=line or i + 1, field="prompt")
            out.append(ids)
        return out

    def _params(self, params: SamplingParams, seed: int | None, stop_ids=(), **extra):
        greedy = params.greedy
        # vLLM rejects these with its own validation error deep in the engine; say it in selfalign's terms
        if not greedy and not 0 < params.temperature <= 2:
            raise SelfalignError(f"--backend vllm takes temperature in [0, 2], got {params.temperature}")
        if not greedy and not 0 < params.top_p <= 1:
            raise SelfalignError(f"--backend vllm takes top_p in (0, 1], got {params.top_p}")
        return self.vllm.SamplingParams(n=1, temperature=0.0 if greedy else params.temperature,
                                        top_p=1.0 if greedy else params.top_p, max_tokens=params.max_new_tokens,
                                        seed=None if greedy else seed,
                                        stop_token_ids=sorted(set(self.eos_ids) | set(stop_ids)),
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
        stop_ids = special_stop_ids(self.tokenizer, params.stop, self.eos_ids)
        results: list[Response] = []
        bar = tqdm(total=sum(len(a) for _, _, a in requests), desc=f"generate ({self.model_name}, vllm)",
                   unit="answer", disable=not progress)
        for start in range(0, len(requests), self.chunk_size):
            chunk = requests[start:start + self.chunk_size]
            outputs = self.llm.generate([{"prompt_token_ids": encoded[i]} for i, _, _ in chunk],
                                        [self._params(params, sequence_seed(params.seed, prompts[i].id, s), stop_ids)
                                         for i, s, _ in chunk], use_tqdm=False)
            done = []
            for (i, _, answers), out in zip(chunk, outputs):
                completion = out.outputs[0]
                if completion.finish_reason not in ("stop", "length"):  # abort / error: never saved as an answer
                    raise SelfalignError(f"vLLM request for prompt '{prompts[i].id}' ended with "
                                         f"'{completion.finish_reason}'; answers so far are saved, rerun to resume")
                stopped = completion.finish_reason == "stop"
                ids = list(completion.token_ids)
                n_tokens = len(ids)
                hit = bool(ids) and ids[-1] in stop_ids  # a stop string that is a special token: not counted
                if ids and (ids[-1] in self.eos_ids or hit):  # the end token is not part of the text
                    ids = ids[:-1]
                    n_tokens -= hit
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                if params.stop:  # vLLM leaves the stop string out of `text`, not out of token_ids
                    text, in_text = cut_at_stop(text, params.stop)
                    hit = hit or in_text
                    stopped = stopped or hit
                done += [self._response(prompts[i], text, params, k, "stop" if stopped else "length",
                                        n_tokens, self.backend, hit) for k in answers]
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
                                    self.vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1),
                                    use_tqdm=False)
        sums = []
        for prefix, seq, out in zip(prefixes, seqs, outputs):
            # prompt_logprobs[t] maps token ids to Logprob objects for position t (None at t = 0); the actual
            # token is always among them
            sums.append(sum(float(out.prompt_logprobs[t][seq[t]].logprob) for t in range(len(prefix), len(seq))))
        return sums

    def close(self) -> None:
        self.llm = None
