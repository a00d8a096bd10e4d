"""The OpenAI-compatible HTTP backend against the real `selfalign serve` server (embedded smollm2-135m, CPU), plus a
flaky proxy that injects 503/429/400/hangs to exercise retries."""

from __future__ import annotations

import json
import re
import math
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from selfalign.data.loaders import load_prompts, shared_data_dir
from selfalign.data.records import Prompt, Response
from selfalign.errors import SelfalignError
from selfalign.generation import SamplingParams, generate_to_file
from selfalign.generation.openai_backend import OpenAIGenerator, request_seed
from selfalign.generation.server import make_server

MODEL = "smollm2-135m"
KEY_ENV = "SELFALIGN_TEST_API_KEY"
SECRET = "sk-test-do-not-leak-5f1e9c"
GREEDY = SamplingParams(temperature=0, max_new_tokens=16)
SHORT = SamplingParams(temperature=0, max_new_tokens=4)


@pytest.fixture(scope="module")
def server():
    from selfalign.generation.transformers_backend import TransformersGenerator

    srv = make_server(TransformersGenerator(MODEL, batch_size=4), "127.0.0.1", 0, quiet=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def prompts():
    return load_prompts(shared_data_dir() / "prompts" / "unlabelled_pool.jsonl", limit=3)


def client(base_url: str, **kw) -> OpenAIGenerator:
    kw.setdefault("backoff_base", 0.01)
    # the key variable is named only where a test set it: a named variable that is unset is refused
    key_env = kw.pop("api_key_env", KEY_ENV if KEY_ENV in os.environ else None)
    return OpenAIGenerator(model=kw.pop("model", MODEL), base_url=base_url, api_key_env=key_env, **kw)


class FlakyProxy:
    """Forwards to `upstream`, but answers the first requests from `script`: an HTTP status (429 comes with
    Retry-After: 0) or "hang" (sleeps past the client's timeout). Records every POST's Authorization header."""

    def __init__(self, upstream: str, script=()):
        self.upstream, self.script, self.auth = upstream.rstrip("/"), list(script), []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _reply(self, status, body: bytes, headers=()):
                try:
                    self.send_response(status)
                    for k, v in [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *headers]:
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass

            def _forward(self, method, body=None):
                r = httpx.request(method, proxy.upstream + self.path.removeprefix("/v1"), content=body,
                                  headers={"Content-Type": "application/json"}, timeout=60)
                self._reply(r.status_code, r.content)

            def do_GET(self):
                self._forward("GET")

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with proxy.lock:
                    proxy.auth.append(self.headers.get("Authorization"))
                    action = proxy.script.pop(0) if proxy.script else None
                if action is None:
                    return self._forward("POST", body)
                if action == "hang":
                    time.sleep(4)
                    self.close_connection = True
                    return self._reply(200, b"{}")
                headers = [("Retry-After", "0")] if action == 429 else []
                self._reply(action, json.dumps({"error": {"message": f"injected {action}\nupstream overloaded"}})
                            .encode(), headers)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @property
    def posts(self) -> int:
        return len(self.auth)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def proxy(server):
    made = []

    def make(script=()):
        made.append(FlakyProxy(server.url, script))
        return made[-1]

    yield make
    for p in made:
        p.close()


# ------------------------------------------------------------------------------------------ against the real server
def test_greedy_matches_local_transformers(server, prompts):
    from selfalign.generation.transformers_backend import TransformersGenerator

    gen = OpenAIGenerator(base_url=server.url, concurrency=3)  # model name from GET /v1/models
    remote = gen.generate(prompts, GREEDY, progress=False)
    gen.close()
    local_gen = TransformersGenerator(MODEL, model_obj=server.generator.model, tokenizer=server.generator.tokenizer)
    with server.lock:
        local = local_gen.generate(prompts, GREEDY, progress=False)
    assert [r.prompt_id for r in remote] == [p.id for p in prompts]
    assert [r.response for r in remote] == [r.response for r in local]
    assert all(r.response.strip() for r in remote)
    for r, l in zip(remote, local):
        assert r.model == MODEL and r.sampling["backend"] == "openai" and r.sampling["temperature"] == 0
        assert r.finish_reason == l.finish_reason and r.num_tokens == l.num_tokens


def test_an_assistant_prefix_is_refused_not_ignored(server, prompts):
    gen = OpenAIGenerator(base_url=server.url)
    primed = [prompts[0], Prompt(prompts[1].id, prompts[1].messages, {"assistant_prefix": "[MINOR REVISION]\n"})]
    with pytest.raises(SelfalignError, match=f"prompt '{prompts[1].id}': meta.assistant_prefix .* local backend"):
        gen.generate(primed, GREEDY, progress=False)
    gen.close()


def test_sampling_n2_distinct_indices_and_reproducible(server, prompts):
    params = SamplingParams(temperature=1.0, max_new_tokens=8, n=2, seed=7)
    gen = client(server.url, concurrency=4)
    batches = []
    first = gen.generate(prompts[:2], params, on_batch=batches.append, progress=False)
    assert [(r.prompt_id, r.sample_index) for r in first] == [(p.id, s) for p in prompts[:2] for s in (0, 1)]
    assert sum(len(b) for b in batches) == 4
    again = gen.generate(prompts[:2], params, progress=False)
    assert [r.response for r in again] == [r.response for r in first]  # seeded per (prompt, sample)
    assert len({request_seed(7, p.id, s) for p in prompts for s in (0, 1)}) == 6
    skipped = gen.generate(prompts[:2], params, skip={(prompts[0].id, 0), (prompts[1].id, 1)}, progress=False)
    assert [r.key for r in skipped] == [(prompts[0].id, 1), (prompts[1].id, 0)]
    gen.close()


def test_generate_to_file_resumes_without_duplicates(server, prompts, tmp_path):
    out = tmp_path / "gen.jsonl"
    kept = Response(prompt_id=prompts[0].id, messages=prompts[0].messages, response="PRE-WRITTEN", model=MODEL)
    out.write_text(json.dumps(kept.to_dict()) + "\n" + '{"prompt_id": "torn', encoding="utf-8")
    params = SamplingParams(temperature=0, max_new_tokens=8)
    gen = client(server.url, concurrency=2)
    got = generate_to_file(gen, prompts, params, out, progress=False)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(r["prompt_id"], r["sample_index"]) for r in rows].count((prompts[0].id, 0)) == 1
    assert sorted(r["prompt_id"] for r in rows) == sorted(p.id for p in prompts)
    assert [r.prompt_id for r in got] == [p.id for p in prompts] and got[0].response == "PRE-WRITTEN"
    assert generate_to_file(gen, prompts, params, out, progress=False) == got  # nothing left to do
    assert len(out.read_text(encoding="utf-8").splitlines()) == 3
    gen.close()


def test_chat_top_logprobs(server):
    gen = client(server.url)
    data = gen.chat([{"role": "user", "content": "Is the sky blue? Answer Yes or No."}], max_tokens=1,
                    logprobs=True, top_logprobs=5)
    content = data["choices"][0]["logprobs"]["content"]
    top = content[0]["top_logprobs"]
    assert len(top) == 5 and all(isinstance(t["token"], str) and t["logprob"] <= 0 for t in top)
    assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
    assert sum(math.exp(t["logprob"]) for t in top) <= 1 + 1e-6
    assert content[0]["token"] == top[0]["token"]  # greedy picks the most likely token
    assert data["choices"][0]["message"]["content"].startswith(top[0]["token"].strip())
    gen.close()


def test_server_stops_generating_at_a_stop_string_and_seeds_unseeded_requests_afresh(server):
    user = [{"role": "user", "content": "Write three sentences about the sea."}]
    url = server.url + "/chat/completions"
    free = httpx.post(url, timeout=300, json={"messages": user, "temperature": 0, "max_tokens": 40}).json()
    text = free["choices"][0]["message"]["content"]
    assert ". " in text, text
    cut = httpx.post(url, timeout=300, json={"messages": user, "temperature": 0, "max_tokens": 40, "stop": ". ",
                                "logprobs": True}).json()
    choice = cut["choices"][0]
    assert choice["message"]["content"] == text[:text.index(". ")] and choice["finish_reason"] == "stop"
    # generation stopped there (tokens counted up to the stop string, not to max_tokens), and the log-probs list the
    # answer's tokens without an end-of-turn token, since none ended it
    assert cut["usage"]["completion_tokens"] < free["usage"]["completion_tokens"]
    assert "<|im_end|>" not in [t["token"] for t in choice["logprobs"]["content"]]
    # no seed: each request samples afresh (OpenAI's behaviour); the same seed: the same answer
    body = {"messages": user, "temperature": 1.0, "max_tokens": 12}
    def answer(request: dict) -> str:
        return httpx.post(url, timeout=300, json=request).json()["choices"][0]["message"]["content"]

    unseeded = {answer(body) for _ in range(3)}
    assert len(unseeded) > 1
    seeded = {answer({**body, "seed": 7}) for _ in range(2)}
    assert len(seeded) == 1


def test_server_endpoints_and_bad_requests(server):
    base = server.url
    assert httpx.get(base.removesuffix("/v1") + "/health").json()["status"] == "ok"
    assert httpx.get(base + "/models").json()["data"][0]["id"] == MODEL
    # without /v1, as POST /chat/completions is: a client whose base_url lacks it lists the model too
    assert httpx.get(base.removesuffix("/v1") + "/models").json()["data"][0]["id"] == MODEL
    user = [{"role": "user", "content": "hi"}]
    bad = [b"{not json", {"messages": []}, {"messages": user, "temperature": "hot"}, {"messages": user, "n": 0},
           {"messages": user, "stream": True}, {"messages": user + [{"role": "assistant", "content": "x"}]},
           {"messages": user, "top_logprobs": 3}, {"messages": user, "model": ["a", "list"]},
           b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',  # Python's json reads NaN
           {"messages": user, "presence_penalty": 0.5},
           {"messages": user, "logit_bias": {"42": 5}}, {"messages": user, "response_format": {"type": "json_object"}}]
    for body in bad:
        r = httpx.post(base + "/chat/completions", **({"content": body} if isinstance(body, bytes) else {"json": body}))
        assert r.status_code == 400, body
        message = r.json()["error"]["message"]
        assert message and "\n" not in message
    assert httpx.post(base + "/nope", json={}).status_code == 404
    # the neutral values of parameters the server does not implement are accepted (clients send them by default)
    ok = httpx.post(base + "/chat/completions", json={"messages": user, "max_tokens": 2, "presence_penalty": 0,
                                                       "frequency_penalty": 0.0, "logit_bias": {}, "tools": []})
    assert ok.status_code == 200


def test_a_request_for_another_model_is_refused(server, tmp_path, prompts):
    """Answering it would label this model's answers with the requested name on the client's side."""
    r = httpx.post(server.url + "/chat/completions", json={"model": "gpt-9", "messages": [{"role": "user",
                                                                                           "content": "hi"}]})
    assert r.status_code == 404 and "'gpt-9' is not served here" in r.json()["error"]["message"]
    out = tmp_path / "answers.jsonl"
    with pytest.raises(SelfalignError, match="HTTP 404.*'gpt-9' is not served"):
        generate_to_file(client(server.url, model="gpt-9"), prompts[:1], SHORT, out, progress=False)
    assert not out.exists() or out.read_text() == ""
    ok = httpx.post(server.url + "/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                            "max_tokens": 2})  # no model named: the served one
    assert ok.status_code == 200 and ok.json()["model"] == MODEL


def test_serve_is_a_cli_command():
    from selfalign.cli import build_parser
    from selfalign.generation.server import cmd_serve

    args = build_parser().parse_args(["serve", "--port", "0", "--batch-size", "2"])
    assert args.fn is cmd_serve and args.host == "127.0.0.1" and args.port == 0 and args.model is None


def test_serve_says_a_busy_port_before_loading_the_model(server, monkeypatch):
    import selfalign.generation.transformers_backend as tb
    from selfalign.cli import main

    monkeypatch.setattr(tb, "TransformersGenerator", lambda **kw: pytest.fail("the model was loaded"))
    port = int(server.url.rsplit(":", 1)[1].split("/")[0])  # the module's server listens there
    assert main(["serve", "--port", str(port)]) == 2


# ------------------------------------------------------------------------------------------ through a flaky proxy
def test_retries_503_and_429_then_succeeds_with_bearer_key(server, proxy, prompts, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    p = proxy([503, 429, 503, 502])
    gen = client(p.url, concurrency=1, max_retries=5)
    out = tmp_path / "flaky.jsonl"
    got = generate_to_file(gen, prompts[:1], SHORT, out, progress=False)
    direct = client(server.url).generate(prompts[:1], SHORT, progress=False)
    assert [r.response for r in got] == [r.response for r in direct]
    assert p.posts == 5 and p.auth == [f"Bearer {SECRET}"] * 5
    assert SECRET not in out.read_text(encoding="utf-8") and SECRET not in repr(gen)
    gen.close()


def test_retry_after_is_honoured(server, proxy, monkeypatch):
    p = proxy([429])
    gen = client(p.url, backoff_base=60.0)  # without Retry-After: 0 the backoff would sleep 30-60 s
    start = time.monotonic()
    gen.chat([{"role": "user", "content": "Say hi."}], max_tokens=2)
    assert time.monotonic() - start < 20 and p.posts == 2
    gen.close()


def test_gives_up_after_max_retries_with_one_line_error(server, proxy, prompts, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    p = proxy([503] * 5)
    gen = client(p.url, concurrency=1, max_retries=2)
    with pytest.raises(SelfalignError) as err:
        gen.generate(prompts[:1], SHORT, progress=False)
    message = str(err.value)
    assert "HTTP 503" in message and "upstream overloaded" in message and "3 attempts" in message
    assert "\n" not in message and SECRET not in message
    assert p.posts == 3
    gen.close()


def test_400_is_not_retried(server, proxy):
    p = proxy([400])
    gen = client(p.url, max_retries=5)
    with pytest.raises(SelfalignError, match="HTTP 400"):
        gen.chat([{"role": "user", "content": "hi"}], max_tokens=2)
    assert p.posts == 1
    # a real 400 from the server (a prompt that ends with an assistant turn) is not retried either
    bad = Prompt(id="bad", messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    with pytest.raises(SelfalignError, match="HTTP 400.*last message"):
        gen.generate([bad], SHORT, progress=False)
    assert p.posts == 2
    gen.close()


def test_a_failed_prompt_is_named_and_answers_already_in_flight_are_kept(server, proxy, prompts, tmp_path):
    """A request refused with a 400 (a prompt too long for the endpoint, say) stops the run and names its prompt's
    file and line; the requests already in flight are awaited and their answers written (an API call is paid for),
    so a rerun resumes after them. Requests not yet sent are not sent."""
    from selfalign.generation import generate_to_file

    p = proxy([400])  # the first request to arrive is refused; the other in flight is answered by the server
    gen = client(p.url, concurrency=2, max_retries=0)
    out = tmp_path / "answers.jsonl"
    with pytest.raises(SelfalignError, match=r"unlabelled_pool\.jsonl:\d+: prompt '[^']+': .*HTTP 400") as err:
        generate_to_file(gen, prompts[:3], SamplingParams(temperature=0, max_new_tokens=24), out, progress=False)
    refused = re.search(r"prompt '([^']+)'", str(err.value)).group(1)
    kept = [json.loads(line)["prompt_id"] for line in out.read_text().splitlines()]
    assert len(kept) >= 1 and refused not in kept and p.posts <= 3
    gen.close()


def test_timeouts_and_connection_errors_are_retried(server, proxy, prompts):
    p = proxy(["hang"])
    gen = client(p.url, timeout=2.0, max_retries=2)
    assert gen.chat([{"role": "user", "content": "hi"}], max_tokens=1)["choices"][0]["message"]["content"] is not None
    assert p.posts == 2
    gen.close()
    with socket_closed_port() as port:
        dead = client(f"http://127.0.0.1:{port}/v1", max_retries=1, timeout=2)
        with pytest.raises(SelfalignError, match="connection failed.*2 attempts"):
            dead.chat([{"role": "user", "content": "hi"}])


def test_a_refused_connection_names_the_endpoint_not_a_prompt_line(server, prompts, tmp_path):
    """An endpoint that is down (killed mid-run) is no fault of the prompt in flight: the error names the endpoint,
    not the data file's line; the answers already written stay, so a rerun resumes after them."""
    out = tmp_path / "answers.jsonl"
    generate_to_file(client(server.url), prompts[:1], SHORT, out, progress=False)
    written = out.read_text()
    with socket_closed_port() as port:
        dead = client(f"http://127.0.0.1:{port}/v1", max_retries=1, timeout=2)
        with pytest.raises(SelfalignError) as err:
            generate_to_file(dead, prompts[:3], SHORT, out, progress=False)
    message = str(err.value)
    assert message.startswith(f"http://127.0.0.1:{port}/v1/chat/completions: connection failed"), message
    assert "2 attempts" in message and "unlabelled_pool" not in message and "prompt '" not in message
    assert out.read_text() == written


class socket_closed_port:
    """A port nothing listens on (bound, never listening)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc):
        self.sock.close()


def test_logprob_bytes_are_each_tokens_own_bytes_also_inside_a_character():
    # AlpacaEval instructions with emojis and CJK: byte-level BPE splits such characters over several tokens, whose
    # decoded text is U+FFFD each; OpenAI's `bytes` are the token's raw bytes, which join back into the text
    from selfalign.data.loaders import load_alpaca_eval_set
    from selfalign.generation.server import token_bytes
    from selfalign.models import load_tokenizer

    tok = load_tokenizer(MODEL)
    texts = [p.messages[0]["content"] for p in load_alpaca_eval_set() if p.id in ("598", "658")]
    assert len(texts) == 2
    for text in texts + ["<|im_start|>assistant\n"]:
        ids = tok.encode(text, add_special_tokens=False)
        pieces = [token_bytes(tok, i, tok.decode([i])) for i in ids]
        assert b"".join(bytes(p) for p in pieces).decode("utf-8") == text
    partial = [i for i in tok.encode(texts[1], add_special_tokens=False) if "\ufffd" in tok.decode([i])]
    assert len(partial) >= 10  # emoji pieces: the case a token's text cannot tell


def test_logprob_bytes_of_sentencepiece_and_added_tokens():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    from selfalign.generation.server import token_bytes
    from selfalign.models import load_tokenizer

    # a Llama-2-style SentencePiece vocabulary: "▁" spells a space, byte-fallback tokens spell raw bytes
    vocab = {"<unk>": 0, "\u2581the": 1, "\u2581cat": 2, "<0xE2>": 3, "<0x80>": 4, "<0x94>": 5}
    sp = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    sp.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    sp_tok = PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>")
    pieces = [token_bytes(sp_tok, i, sp_tok.decode([i])) for i in (1, 2, 3, 4, 5)]
    assert b"".join(bytes(p) for p in pieces).decode("utf-8") == " the cat\u2014"
    # an added token is stored as plain text, not in the byte-level alphabet ("é" would map to another byte there)
    tok = load_tokenizer(MODEL)
    tok.add_tokens(["caf\u00e9"])
    added = tok.convert_tokens_to_ids("caf\u00e9")
    assert bytes(token_bytes(tok, added, tok.decode([added]))) == "caf\u00e9".encode("utf-8")
