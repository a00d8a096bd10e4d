"""Data-parallel generation: one local generator per GPU (or per share of the CPU cores), in worker processes.

`processes: N` in a sampling section (or `selfalign generate --processes N`) deals the prompts round-robin to N
workers, each running the local backend (auto, lean or transformers) on its own device with its own `batch_size`.
This process collects their batches as they finish and hands them to `on_batch`, so `generate_to_file` still writes
and resumes one file, and a killed run resumes with any number of processes.

The answers are the one-process answers: the lean backend seeds each sample by (seed, prompt id, sample index)
(base.sequence_seed), so which worker a prompt runs on does not change what it draws, up to last-bit logit
differences from other batch companions. (The transformers backend seeds per batch, so its samples differ from one
process's, drawn from the same distribution.)

Why worker processes rather than one process driving N GPUs: at these batch sizes a decode step is bound by host
time (benchmarks/RESULTS.md, "Host time per lean step"), so N GPUs need N Python loops. Why not `accelerate` or
torchrun: a recipe is one process that owns its run folder and writes each answer file itself; the workers only
compute (training/distributed.py gives the same reasons for training). vLLM parallelises itself (its engine options
tensor_parallel_size, data_parallel_size), so the vllm backend is not wrapped here.
"""

from __future__ import annotations

import functools
import itertools
import pickle
import queue
import sys
from typing import Sequence

from tqdm.auto import tqdm

from selfalign.data.records import Prompt, Response
from selfalign.errors import ConfigError, SelfalignError
from selfalign.generation.base import Generator, OnBatch, SamplingParams

LOCAL_BACKENDS = ("auto", "lean", "transformers")


class ParallelGenerator(Generator):
    """`processes` workers, each with `make_generator(backend, model, device=<its own>, **options)`. Workers start on
    the first call that has something to answer and keep their model until `close()`."""

    def __init__(self, backend: str, model: str | None, processes: int, device: str = "auto", **options):
        import torch

        from selfalign.generation import default_batch_size
        from selfalign.models import model_name, resolve_model
        from selfalign.workers import placement

        if backend not in LOCAL_BACKENDS:
            raise ConfigError(f"processes > 1 runs a local backend ({', '.join(LOCAL_BACKENDS)}) once per GPU, not "
                              f"'{backend}'" + (" (vLLM parallelises itself: its engine options tensor_parallel_size "
                                                "and data_parallel_size)" if backend == "vllm" else
                                                " (an endpoint serves requests in parallel: its concurrency)"
                                                if backend == "openai" else ""))
        if processes < 2:
            raise ConfigError(f"ParallelGenerator needs processes >= 2, not {processes}")
        self.kind = placement(processes, device)  # "cuda" (one GPU per worker) or "cpu"
        self.backend, self.model_spec, self.processes, self.options = backend, model, processes, options
        self.model_name = model_name(model)
        self.model_path = resolve_model(model)
        # sequences in flight over all the workers (callers that feed a generator in chunks size them by it)
        self.batch_size = processes * (options.get("batch_size") or default_batch_size(
            "transformers" if backend == "transformers" else "lean", torch.device(self.kind)))
        self._procs: list = []
        self._jobs: list = []
        self._results = None
        self._calls = itertools.count()

    @functools.cached_property
    def tokenizer(self):
        """The model's tokenizer, loaded here (callers budget tokens with it); the workers load their own."""
        from selfalign.models import load_tokenizer

        return load_tokenizer(self.model_spec, "left", self.options.get("trust_remote_code", False))

    def encode(self, prompts: Sequence[Prompt], max_new_tokens: int, source: str | None = None) -> list[list[int]]:
        """The backend's `encode` (token ids; a prompt too long for the context is a DataError), run by worker 0."""
        self._start()
        call = next(self._calls)
        self._jobs[0].put(("encode", call, list(prompts), max_new_tokens, source))
        encoded: list = []
        self._wait(call, {0}, lambda kind, rank, payload: encoded.extend(payload))
        return encoded

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams, on_batch: OnBatch | None = None,
                 skip: set | None = None, progress: bool = True) -> list[Response]:
        skip = skip or set()
        prompts = list(prompts)
        todo = sum((p.id, s) not in skip for p in prompts for s in range(params.n))
        if not todo:
            return []
        self._start()
        call = next(self._calls)
        busy = set()
        for rank in range(self.processes):
            # round-robin: prompts of every length in every share; a resumed run deals the same shares
            share = prompts[rank::self.processes]
            ids = {p.id for p in share}
            if any((p.id, s) not in skip for p in share for s in range(params.n)):
                self._jobs[rank].put(("generate", call, share, params, {k for k in skip if k[0] in ids},
                                      self.model_name))
                busy.add(rank)
        results: dict[tuple[str, int], Response] = {}
        bar = tqdm(total=todo, desc=f"generate ({self.model_name}, {self.processes} processes)", unit="answer",
                   disable=not progress)

        def collect(kind: str, rank: int, batch) -> None:
            if kind != "batch":
                return
            for r in batch:
                results[r.key] = r
            if on_batch is not None:
                on_batch(batch)
            bar.update(len(batch))

        try:
            self._wait(call, busy, collect)
        finally:
            bar.close()
        return [results[(p.id, s)] for p in prompts for s in range(params.n) if (p.id, s) in results]

    def close(self) -> None:
        """Stop the workers (each frees its model and cache); the next call starts new ones."""
        for jobs in self._jobs:
            jobs.put(None)
        for proc in self._procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        self._procs, self._jobs, self._results = [], [], None

    # ------------------------------------------------------------------------------------------------ workers
    def _start(self) -> None:
        if self._procs:
            return
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
        self._results = ctx.Queue()
        self._jobs = [ctx.Queue() for _ in range(self.processes)]
        self._procs = [ctx.Process(target=_worker, name=f"selfalign-generate-{rank}", daemon=True,
                                   args=(rank, self.processes, self.kind, self.backend, self.model_spec,
                                         self.options, self._jobs[rank], self._results))
                       for rank in range(self.processes)]
        for proc in self._procs:
            proc.start()

    def _wait(self, call: int, busy: set[int], handle) -> None:
        """Hand each of this call's messages to `handle(kind, rank, payload)` until every rank in `busy` is done. A
        worker's error stops every worker and is raised here (a SelfalignError as it was); so is a worker's death."""
        try:
            while busy:
                try:
                    kind, rank, msg_call, payload = self._results.get(timeout=1.0)
                except queue.Empty:
                    dead = [r for r in sorted(busy) if not self._procs[r].is_alive()]
                    if dead:
                        code = self._procs[dead[0]].exitcode
                        raise SelfalignError(f"generation process {dead[0]} died (exit code {code}); what was "
                                             "answered is kept: run the same command again to resume")
                    continue
                if kind == "error":
                    raise payload
                if msg_call != call:
                    continue  # left over from a call that was interrupted
                handle(kind, rank, payload)
                if kind in ("done", "encoded"):
                    busy.discard(rank)
        except BaseException:
            self.close()  # an interrupted call leaves no worker generating on (and holding its GPU)
            raise


def _worker(rank: int, size: int, kind: str, backend: str, model: str | None, options: dict, jobs, results) -> None:
    from selfalign.generation import make_generator
    from selfalign.workers import enter_worker

    gen = None
    try:
        device = enter_worker(rank, size, kind)
        gen = make_generator(backend, model, device=device, **options)
        while (job := jobs.get()) is not None:
            op, call, *args = job
            if op == "encode":
                results.put(("encoded", rank, call, gen.encode(*args)))
                continue
            prompts, params, skip, name = args
            gen.model_name = name
            gen.generate(prompts, params, on_batch=lambda batch: results.put(("batch", rank, call, batch)),
                         skip=skip, progress=False)
            results.put(("done", rank, call, None))
    except BaseException as e:
        results.put(("error", rank, None, _portable(e, rank)))
    finally:
        if gen is not None:
            gen.close()


def _portable(error: BaseException, rank: int) -> BaseException:
    """`error` as the parent will raise it: a SelfalignError as it was (a DataError keeps its file, line and field
    in its text), anything else as a RuntimeError naming the worker, its traceback printed here."""
    if isinstance(error, SelfalignError):
        try:
            return pickle.loads(pickle.dumps(error))
        except Exception:
            return SelfalignError(str(error))
    import traceback

    traceback.print_exc(file=sys.stderr)
    return RuntimeError(f"generation process {rank} failed: {type(error).__name__}: {error}")
