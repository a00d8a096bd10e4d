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

import copy
import functools
import itertools
import pickle
import sys
from typing import Sequence

from tqdm.auto import tqdm

from selfalign.data.io import source_of
from selfalign.data.records import Prompt, Response
from selfalign.errors import ConfigError, SelfalignError
from selfalign.generation import IN_PROCESS_BACKENDS
from selfalign.generation.base import Generator, OnBatch, SamplingParams

class ParallelGenerator(Generator):
    """`processes` workers, each with `make_generator(backend, model, device=<its own>, **options)`. Workers start on
    the first call that has something to answer and keep their model until `close()`."""

    def __init__(self, backend: str, model: str | None, processes: int, device: str = "auto", **options):
        import torch

        from selfalign.generation import default_batch_size
        from selfalign.models import model_name, resolve_model
        from selfalign.workers import placement

        if backend not in IN_PROCESS_BACKENDS:
            hint = {"vllm": " (vLLM parallelises itself: its engine options tensor_parallel_size and "
                            "data_parallel_size)",
                    "openai": " (an endpoint serves requests in parallel: its concurrency)"}.get(backend, "")
            raise ConfigError(f"processes > 1 runs a local backend ({', '.join(IN_PROCESS_BACKENDS)}) once per GPU, "
                              f"not '{backend}'{hint}")
        if processes < 2:
            raise ConfigError(f"ParallelGenerator needs processes >= 2, not {processes}")
        self.kind = placement(processes, device)  # "cuda" (one GPU per worker) or "cpu"
        self.backend, self.model_spec, self.processes, self.options = backend, model, processes, options
        self.model_name = model_name(model)
        self.model_path = resolve_model(model)
        # sequences in flight over all the workers (callers that feed a generator in chunks size them by it)
        self.batch_size = processes * (options.get("batch_size") or default_batch_size(
            "transformers" if backend == "transformers" else "lean", torch.device(self.kind)))
        self._procs: list = []  # the workers, and one pipe each way per worker
        self._jobs: list = []
        self._results: list = []
        self._calls = itertools.count()

    @functools.cached_property
    def tokenizer(self):
        """The model's tokenizer, loaded here (callers budget tokens with it); the workers load their own."""
        from selfalign.models import load_tokenizer

        return load_tokenizer(self.model_spec, "left", self.options.get("trust_remote_code", False))

    def encode(self, prompts: Sequence[Prompt], max_new_tokens: int, source: str | None = None) -> list[list[int]]:
        """The local backends' `encode` (token ids; a prompt too long for the context is a DataError), here: no
        worker is started (`selfalign generate` checks every prompt with it before answering)."""
        from transformers import AutoConfig

        from selfalign.generation.transformers_backend import context_length, encode_prompts

        config = AutoConfig.from_pretrained(self.model_path, trust_remote_code=self.options.get("trust_remote_code",
                                                                                                False))
        return encode_prompts(self.tokenizer, context_length(config), prompts, max_new_tokens, source)

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams, on_batch: OnBatch | None = None,
                 skip: set | None = None, progress: bool = True) -> list[Response]:
        skip = skip or set()
        prompts = _numbered(prompts)
        todo = sum((p.id, s) not in skip for p in prompts for s in range(params.n))
        if not todo:
            return []
        self._start()
        call = next(self._calls)
        busy = set()
        # the workers record the name and weights digest this generator has (hashed once, here)
        who = (self.model_name, self.model_sha256)
        for rank in range(self.processes):
            # round-robin: prompts of every length in every share; a resumed run deals the same shares
            share = prompts[rank::self.processes]
            ids = {p.id for p in share}
            if any((p.id, s) not in skip for p in share for s in range(params.n)):
                self._send(rank, (call, share, params, {k for k in skip if k[0] in ids}, who))
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
        self._stop(wait=30.0)

    # ------------------------------------------------------------------------------------------------ workers
    # One pipe each way per worker, no shared queue: a worker killed mid-message (the OOM killer) then breaks only
    # its own pipe, which reads as its death, and nothing waits on a lock it held.
    def _start(self) -> None:
        if self._procs:
            return
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
        if self.kind == "cuda":  # worker 0 shares cuda:0 with this process: hand it the memory cached here
            import torch

            torch.cuda.empty_cache()
        for rank in range(self.processes):
            job_out, job_in = ctx.Pipe(duplex=False)
            result_out, result_in = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker, name=f"selfalign-generate-{rank}", daemon=True,
                               args=(rank, self.processes, self.kind, self.backend, self.model_spec, self.options,
                                     job_out, result_in))
            proc.start()
            job_out.close()  # the worker's ends: held here too, a dead worker's pipes would never read as closed
            result_in.close()
            self._procs.append(proc)
            self._jobs.append(job_in)
            self._results.append(result_out)

    def _send(self, rank: int, job) -> None:
        try:
            self._jobs[rank].send(job)
        except OSError:  # the worker is gone: its own error, when it sent one, says why
            self._wait(None, {rank}, lambda *_: None)

    def _wait(self, call: int | None, busy: set[int], handle) -> None:
        """Hand each of this call's messages to `handle(kind, rank, payload)` until every rank in `busy` is done. A
        worker's error stops every worker and is raised here (a SelfalignError as it was); so is a worker's death,
        seen as soon as it happens."""
        from multiprocessing.connection import wait

        try:
            while busy:
                ranks = {**{self._results[r]: r for r in busy}, **{self._procs[r].sentinel: r for r in busy}}
                for ready in wait(list(ranks)):
                    rank = ranks[ready]
                    if rank not in busy:
                        continue
                    conn = self._results[rank]
                    try:  # a worker that ended may have sent its last messages (its error) first
                        while conn.poll():
                            kind, msg_call, payload = conn.recv()
                            if kind == "error":
                                raise payload
                            if msg_call == call:
                                handle(kind, rank, payload)
                                if kind == "done":
                                    busy.discard(rank)
                                    break
                    except (EOFError, OSError):
                        pass
                    if rank in busy and not self._procs[rank].is_alive():
                        raise SelfalignError(f"generation process {rank} died (exit code {self._procs[rank].exitcode})"
                                             "; what was answered is kept: run the same command again to resume")
        except BaseException:
            self._stop(wait=0.0)  # an interrupted call leaves no worker generating on (and holding its GPU)
            raise

    def _stop(self, wait: float) -> None:
        """Ask the workers to finish, give them `wait` seconds in all, then terminate the rest."""
        import time

        if wait:
            for conn in self._jobs:
                try:
                    conn.send(None)
                except OSError:
                    pass
        deadline = time.monotonic() + wait
        for proc in self._procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
            proc.join()
        for conn in self._jobs + self._results:
            conn.close()
        self._procs, self._jobs, self._results = [], [], []


def _numbered(prompts: Sequence[Prompt]) -> list[Prompt]:
    """`prompts`, each that was not read from a file given its position as its line: a worker numbers only its own
    share, and an error about prompt 7 must not say line 4. (Copies: the caller's prompts are left as they were.)"""
    out = []
    for i, p in enumerate(prompts, 1):
        if source_of(p) == (None, None):
            p = copy.copy(p)
            p._source = (None, i)
        out.append(p)
    return out


def _worker(rank: int, size: int, kind: str, backend: str, model: str | None, options: dict, jobs, results) -> None:
    import signal

    from selfalign.generation import make_generator
    from selfalign.workers import enter_worker

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the workers
    import threading

    from tqdm.std import tqdm

    # tqdm's default lock is a multiprocessing semaphore, which a stopped worker would leave for the parent's
    # resource tracker to warn about; a worker shows no progress bar, so a thread lock does
    tqdm.set_lock(threading.RLock())
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # N "Loading weights" bars; the parent's bar shows the progress
    gen = None
    try:
        device = enter_worker(rank, size, kind)
        gen = make_generator(backend, model, device=device, **options)
        while (job := jobs.recv()) is not None:
            call, prompts, params, skip, (gen.model_name, gen.model_sha256) = job
            gen.generate(prompts, params, on_batch=lambda batch: results.send(("batch", call, batch)), skip=skip,
                         progress=False)
            results.send(("done", call, None))
    except EOFError:  # the parent is gone
        pass
    except BaseException as e:
        try:
            results.send(("error", None, _portable(e, rank)))
        except OSError:
            pass
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
