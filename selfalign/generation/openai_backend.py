"""Generation through any OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp, TGI, `selfalign serve`, ...).

One request per (prompt, sample_index) from a pool of `concurrency` threads, each retried with exponential
backoff and jitter on 408, 409, 429, 5xx, timeouts and connection errors (a `Retry-After` header is honoured). Finished
answers go to `on_batch` as they arrive, so `generate_to_file` writes as it goes and a killed run resumes. The
API key is read from the environment variable named by `api_key_env` and only ever sent as a Bearer header.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
import zlib
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from email.utils import parsedate_to_datetime
from typing import Sequence

import httpx
from tqdm.auto import tqdm

from selfalign.data.io import source_of
from selfalign.data.records import Prompt, Response
from selfalign.errors import SelfalignError
from selfalign.generation.base import Generator, OnBatch, SamplingParams, cut_at_stop

# timeout, conflict, rate limit and server errors, as openai-python retries; other 4xx are the request's fault
RETRY_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))
# refusals of every request alike (the key, the path or model name), not of one prompt
ENDPOINT_STATUS = frozenset({401, 403, 404})
SEED_MODULUS = 2**31 - 1  # some servers (llama.cpp) keep seeds in 32 bits


def request_seed(seed: int, prompt_id: str, sample_index: int) -> int:
    """The seed sent for one (prompt, sample): stable across runs and resumes (crc32, not Python's salted hash)."""
    index = zlib.crc32(f"{prompt_id}\x00{sample_index}".encode("utf-8"))
    return (seed * 1_000_003 + index) % SEED_MODULUS


def _excerpt(text: str, limit: int = 200) -> str:
    text = re.sub(r"\s+", " ", text or "").strip()
    return text if len(text) <= limit else text[:limit] + "..."


def _retry_after(response: httpx.Response | None) -> float | None:
    value = response.headers.get("retry-after") if response is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


DEFAULT_KEY_ENV = "OPENAI_API_KEY"


class EndpointError(SelfalignError):
    """The endpoint failed, not one request: not reachable, timed out, refused the key, path or model, or still
    overloaded after every retry. A generation run says it with the endpoint's URL only: naming the prompt that
    happened to be in flight (its file and line) would read as if that line of the data were bad."""


class OpenAIGenerator(Generator):
    backend = "openai"

    def __init__(self, model: str | None = None, base_url: str | None = None, api_key_env: str = DEFAULT_KEY_ENV,
                 concurrency: int = 8, timeout: float = 600.0, max_retries: int = 6, backoff_base: float = 0.5,
                 backoff_max: float = 30.0, max_retry_after: float = 120.0):
        if not base_url or not re.match(r"^https?://", base_url):
            raise SelfalignError(f"the openai backend needs an http(s) base URL such as http://127.0.0.1:8000/v1, "
                                 f"got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.concurrency = max(1, int(concurrency))
        self.max_retries = max(0, int(max_retries))
        self.backoff_base, self.backoff_max, self.max_retry_after = backoff_base, backoff_max, max_retry_after
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(api_key_env) if api_key_env else None
        if api_key_env and api_key_env != DEFAULT_KEY_ENV and not key:
            # the default variable may be unset (a local server needs no key); one the user named must not be
            raise SelfalignError(f"the environment variable {api_key_env} (named by api_key_env) is not set")
        self.api_key_env = api_key_env
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._secret = key or None  # only to scrub it from error text; never logged or written
        # `timeout` bounds the wait for a reply. It is long by default because a server that answers one request at a
        # time (`selfalign serve`, a local llama.cpp) queues the others: a short read timeout makes every queued
        # request time out and be re-sent, which only lengthens the queue. Connecting stays quick to fail.
        self._client = httpx.Client(timeout=httpx.Timeout(timeout, connect=min(30.0, timeout)), headers=headers,
                                    limits=httpx.Limits(max_connections=self.concurrency,
                                                        max_keepalive_connections=self.concurrency))
        self._model = model
        self._model_lock = threading.Lock()

    def __repr__(self) -> str:  # no headers, no key
        return f"OpenAIGenerator(model={self._model!r}, base_url={self.base_url!r})"

    # ------------------------------------------------------------------------------------------ HTTP
    @property
    def model_name(self) -> str:  # type: ignore[override]
        """The model to ask for; without one, the first model the endpoint lists."""
        if self._model is None:
            with self._model_lock:
                if self._model is None:
                    data = self._call("GET", "/models").get("data") or []
                    if not data or not isinstance(data[0], dict) or not data[0].get("id"):
                        raise SelfalignError(f"{self.base_url}/models lists no model; pass --model")
                    self._model = str(data[0]["id"])
        return self._model

    @model_name.setter
    def model_name(self, value: str) -> None:
        self._model = value

    def check_reachable(self, timeout: float = 15.0) -> None:
        """One GET /models, not retried: a run checks its endpoint before it starts, so a server that is down or
        refuses the key fails the command, not a stage hours in. Any other reply counts as reachable (a server
        without /models answers 404 or 501 and may still serve chat completions). When the model is known and the
        listing does not show it, a one-token chat request decides: refused (401/403) or not found (404) fails."""
        path = "/models"
        response = self._probe("GET", path, timeout)
        if self._model and (response.status_code != 200 or not self._lists_model(response)):
            # the listing does not settle it: a key that may chat but not list models (OpenAI's restricted project
            # keys), a server without /models, a model not listed (a wrong path or name, or an alias). The smallest
            # chat request there is does: it is what the run will send
            path = "/chat/completions"
            response = self._probe("POST", path, timeout, json={
                "model": self._model, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]})
        if response.status_code in (401, 403):
            key = f"${self.api_key_env} is {'set' if self._secret else 'not set'}" if self.api_key_env else "no key"
            raise self._fail(path, f"HTTP {response.status_code}: the endpoint refuses the request ({key}): "
                                   f"{_excerpt(response.text, 120) or response.reason_phrase}", 1)
        if path == "/chat/completions" and response.status_code == 404:  # no such path, or no such model
            raise self._fail(path, f"HTTP 404 for model '{self._model}': {_excerpt(response.text, 160) or 'not found'}"
                                   " (check base_url, usually ending in /v1, and the model name)", 1)

    def _probe(self, method: str, path: str, timeout: float, **kw) -> httpx.Response:
        """One request, not retried; a connection that fails (timeouts included) is a one-line error."""
        try:
            return self._client.request(method, self.base_url + path, timeout=timeout, **kw)
        except httpx.TransportError as e:
            raise self._fail(path, f"endpoint not reachable ({type(e).__name__}: {_excerpt(str(e), 120)})", 1)

    def _lists_model(self, response: httpx.Response) -> bool:
        try:
            data = response.json().get("data")
            return any(isinstance(m, dict) and m.get("id") == self._model for m in data)
        except (ValueError, AttributeError, TypeError):
            return False

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def _fail(self, path: str, what: str, attempts: int, endpoint: bool = False) -> SelfalignError:
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        return (EndpointError if endpoint else SelfalignError)(
            self._scrub(f"{self.base_url}{path}: {what}{tries}").replace("\n", " "))

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        """One API call with retries; returns the parsed JSON body."""
        url = self.base_url + path
        for attempt in range(self.max_retries + 1):
            response = None
            try:
                response = self._client.request(method, url, json=body)
            except httpx.TimeoutException as e:
                what = f"timed out ({type(e).__name__})"
            except httpx.TransportError as e:
                what = f"connection failed ({type(e).__name__}: {_excerpt(str(e), 120)})"
            else:
                if response.status_code == 200:
                    try:
                        data = response.json()
                    except ValueError:
                        raise self._fail(path, f"HTTP 200 with a body that is not JSON: {_excerpt(response.text)}", 1)
                    if not isinstance(data, dict):
                        raise self._fail(path, f"HTTP 200 with unexpected JSON: {_excerpt(response.text)}", 1)
                    return data
                what = f"HTTP {response.status_code}: {_excerpt(response.text) or response.reason_phrase}"
                if response.status_code not in RETRY_STATUS:  # a 400 or 413 is this request's (a prompt too long)
                    raise self._fail(path, what, attempt + 1, endpoint=response.status_code in ENDPOINT_STATUS)
            if attempt == self.max_retries:  # connection, timeout or 429/5xx: the endpoint's, whatever was asked
                raise self._fail(path, what, attempt + 1, endpoint=True)
            delay = _retry_after(response)
            if delay is None:  # exponential backoff with jitter in [cap/2, cap]
                cap = min(self.backoff_max, self.backoff_base * 2 ** attempt)
                delay = cap * (0.5 + random.random() / 2)
            time.sleep(min(delay, self.max_retry_after))
        raise AssertionError("unreachable")

    def chat(self, messages: list[dict], temperature: float = 0.0, max_tokens: int = 256, logprobs: bool = False,
             top_logprobs: int = 0, top_p: float | None = None, seed: int | None = None, **extra) -> dict:
        """One chat completion, raw parsed JSON (retried like `generate`). With `logprobs`, the answer's
        `choices[0].logprobs.content[i].top_logprobs` hold the `top_logprobs` most likely tokens per position."""
        body: dict = {"model": self.model_name, "messages": messages, "temperature": temperature,
                      "max_tokens": max_tokens}
        if top_p is not None:
            body["top_p"] = top_p
        if seed is not None:
            body["seed"] = seed
        if logprobs:
            body["logprobs"] = True
            if top_logprobs:
                body["top_logprobs"] = int(top_logprobs)
        body.update(extra)
        return self._call("POST", "/chat/completions", body)

    # ------------------------------------------------------------------------------------------ generate
    def _answer(self, prompt: Prompt, params: SamplingParams, sample_index: int) -> dict:
        body = {"model": self.model_name, "messages": prompt.messages, "max_tokens": params.max_new_tokens,
                "seed": request_seed(params.seed, prompt.id, sample_index)}
        if params.greedy:
            body["temperature"] = 0
        else:
            body.update(temperature=params.temperature, top_p=params.top_p)
        if params.stop:
            body["stop"] = list(params.stop)
        data = self._call("POST", "/chat/completions", body)
        try:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise self._fail("/chat/completions", f"answer has no choices[0].message: {_excerpt(str(data))}", 1)
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        tokens = usage.get("completion_tokens")
        finish = choice.get("finish_reason")
        if params.stop:  # an endpoint that ignores `stop` still gives the same text
            text, hit = cut_at_stop(text, params.stop)
            finish = "stop" if hit else finish
        return {"text": text, "finish_reason": finish,
                "num_tokens": tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else None}

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams, on_batch: OnBatch | None = None,
                 skip: set | None = None, progress: bool = True, flush_every: int | None = None) -> list[Response]:
        skip = skip or set()
        prefixed = next((p.id for p in prompts if p.meta.get("assistant_prefix")), None)
        if prefixed is not None:  # chat-completions endpoints have no portable way to continue an assistant turn
            raise SelfalignError(f"prompt '{prefixed}': meta.assistant_prefix (continue an answer) needs a local "
                                 "backend (lean, transformers, vllm); the openai backend cannot honour it")
        # greedy samples are identical: ask once per prompt and copy to every missing sample index
        jobs: list[tuple[Prompt, list[int]]] = []
        for p in prompts:
            wanted = [s for s in range(params.n) if (p.id, s) not in skip]
            if wanted:
                jobs.extend([(p, wanted)] if params.greedy else [(p, [s]) for s in wanted])
        if not jobs:
            return []
        model = self.model_name  # resolve once, before the threads start
        # every answer is written as it arrives: each one is paid for, and a kill -9 must not lose it
        flush_every = flush_every or 1
        results: list[Response] = []
        pending_batch: list[Response] = []
        bar = tqdm(total=sum(len(w) for _, w in jobs), desc=f"generate ({model})", unit="answer",
                   disable=not progress)
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="selfalign-openai")
        futures = {pool.submit(self._answer, p, params, w[0]): (p, w) for p, w in jobs}
        error: BaseException | None = None
        clean = False
        try:
            not_done = set(futures)
            while not_done:
                done, not_done = wait(not_done, timeout=2.0, return_when=FIRST_COMPLETED)
                for fut in done:
                    p, wanted = futures[fut]
                    if fut.cancelled():
                        continue
                    if fut.exception() is not None:
                        if error is None:  # the first failure: name its prompt; queued requests are not sent
                            error = _for_prompt(fut.exception(), p)
                            for other in not_done:
                                other.cancel()
                        continue
                    out = fut.result()
                    for s in wanted:
                        pending_batch.append(self._response(p, out["text"], params, s, out["finish_reason"],
                                                            out["num_tokens"], self.backend))
                    bar.update(len(wanted))
                # after a failure the requests already in flight are still awaited: they are paid for, and their
                # answers are kept so that a rerun resumes after them
                if pending_batch and (len(pending_batch) >= flush_every or not done or not not_done):
                    results.extend(pending_batch)
                    if on_batch is not None:
                        on_batch(pending_batch)
                    pending_batch = []
            clean = True
        finally:  # on Ctrl-C (or a bug here), drop queued requests and do not wait for those in flight
            pool.shutdown(wait=clean, cancel_futures=True)
            bar.close()
            if pending_batch:  # keep what finished before a failure, so a rerun resumes after it
                results.extend(pending_batch)
                if on_batch is not None:
                    on_batch(pending_batch)
        if error is not None:
            raise error
        by_key = {r.key: r for r in results}
        return [by_key[(p.id, s)] for p in prompts for s in range(params.n) if (p.id, s) in by_key]

    def close(self) -> None:
        self._client.close()


def _for_prompt(error: BaseException, prompt: Prompt) -> BaseException:
    """`error` with the prompt it came from (its id, and its file and line when it was read from one), unless the
    endpoint failed (`EndpointError`, which names the endpoint): no prompt was at fault there."""
    if not isinstance(error, SelfalignError) or isinstance(error, EndpointError):
        return error
    path, line = source_of(prompt)
    where = f"{path}:{line}: " if path else ""
    return SelfalignError(f"{where}prompt '{prompt.id}': {error}")
