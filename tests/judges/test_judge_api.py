"""The API judge against a live `selfalign serve` (verdict-token logprobs over HTTP), and its fallbacks: text
parsing when there are no logprobs, bounded retries, unparseable answers counted (never dropped)."""

from __future__ import annotations

import json
import math
import threading

import pytest

from selfalign.errors import SelfalignError
from selfalign.evaluation.agreement import LabeledPair, agreement_metrics
from selfalign.generation.server import make_server
from selfalign.judges.api import APIJudge
from selfalign.judges.base import GradeItem, PairwiseItem

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def server(embedded_model_dir):
    from selfalign.generation.transformers_backend import TransformersGenerator

    srv = make_server(TransformersGenerator(MODEL, batch_size=4), "127.0.0.1", 0, quiet=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def short_pairs(data_dir) -> list[PairwiseItem]:
    rows = json.loads((data_dir / "alpaca_eval" / "balanced_pairs_dev.json").read_text())[:2]
    return [PairwiseItem([{"role": "user", "content": r["instruction"][:200]}], r["output_1"][:200],
                         r["output_2"][:200]) for r in rows]


def test_api_judge_reads_verdict_logprobs_from_live_server(server, short_pairs):
    judge = APIJudge(base_url=server.url, top_logprobs=20)
    verdicts = judge.compare(short_pairs)
    assert judge.requests == 4  # one 1-token request per order per pair
    for v in verdicts:
        assert v.parsed and 0.0 <= v.p_a <= 1.0 and isinstance(v.consistent, bool)
        assert [o["method"] for o in v.details["orders"]] == ["logprobs", "logprobs"]
    # the server's first-position top_logprobs are the model's next-token distribution, so the API judge reproduces
    # the local judge's verdict-token probability for the same model and prompt
    from selfalign.judges.local import LocalJudge

    gen = server.generator
    local = LocalJudge(model=MODEL, model_obj=gen.model, tokenizer=gen.tokenizer, max_answer_tokens=0,
                       max_instruction_tokens=0).compare(short_pairs)
    for api_v, local_v in zip(verdicts, local):
        for p_api, p_local in zip(api_v.details["p_first"], local_v.details["p_first"][0]):
            assert p_api == pytest.approx(p_local, abs=0.02)


class FakeChat:
    """Stands in for OpenAIGenerator.chat: answers from a script and records requests. A script entry is (text,
    logprobs): logprobs None (no logprobs), a {token: p} dict (the top_logprobs of a one-token answer `text`), or a
    list of (token, {token: p}) pairs, one per generated token, answered token by token: the endpoint stops after
    `max_tokens` tokens, as a real one does, so the text is the tokens it got to."""

    def __init__(self, script, refuse_logprobs: bool = False):
        self.script = list(script)
        self.refuse_logprobs = refuse_logprobs
        self.requests = []
        self.concurrency = 1
        self.base_url = "http://fake/v1"

    def chat(self, messages, temperature=0.0, max_tokens=256, logprobs=False, top_logprobs=0, **kw):
        self.requests.append({"logprobs": logprobs, "temperature": temperature, "max_tokens": max_tokens})
        if logprobs and self.refuse_logprobs:
            raise SelfalignError("http://fake/v1/chat/completions: HTTP 400: logprobs are not supported")
        text, top = self.script.pop(0) if self.script else ("", None)
        positions = top if isinstance(top, list) else None if top is None else [(text, top)]
        finish = "stop"
        if positions is not None:
            if len(positions) > max_tokens:
                positions, finish = positions[:max_tokens], "length"
            text = "".join(token for token, _ in positions)
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                  "logprobs": None}
        if logprobs and positions is not None:
            choice["logprobs"] = {"content": [
                {"token": token, "logprob": math.log(dist.get(token, 0.5)),
                 "top_logprobs": [{"token": t, "logprob": math.log(q)} for t, q in dist.items()]}
                for token, dist in positions]}
        return {"choices": [choice]}


ITEM = PairwiseItem([{"role": "user", "content": "Say hi"}], "Hi!", "No.")


def test_logprobs_give_soft_preference():
    fake = FakeChat([("m", {"m": 0.6, "M": 0.2, "The": 0.1}), ("M", {"M": 0.7, "m": 0.3})])
    v, = APIJudge(generator=fake).compare([ITEM])
    assert v.details["p_first"] == [pytest.approx(0.75), pytest.approx(0.3)]
    assert v.p_a == pytest.approx((0.75 + 0.7) / 2) and v.consistent is True


def test_no_logprobs_falls_back_to_parsing_text():
    fake = FakeChat([("M", None), ("m", None)])
    v, = APIJudge(generator=fake).compare([ITEM])
    assert [o["method"] for o in v.details["orders"]] == ["parsed", "parsed"]
    assert v.p_a == 0.0 and v.consistent is True  # B when B was second, B when B was first


def test_endpoint_refusing_logprobs_is_asked_without_them():
    fake = FakeChat([("m", None), ("M", None)], refuse_logprobs=True)
    v, = APIJudge(generator=fake).compare([ITEM])
    assert v.p_a == 1.0 and [r["logprobs"] for r in fake.requests] == [True, False, False]


def test_garbage_is_counted_as_unparsed_without_reasking_by_default():
    """alpaca_eval records an unreadable annotation as missing and FastChat an unreadable verdict as an error; neither
    asks again, so by default neither does this judge."""
    fake = FakeChat([("I think the first one", {"I": 0.9})] * 6)
    v, = APIJudge(generator=fake).compare([ITEM])
    assert len(fake.requests) == 2 and {r["temperature"] for r in fake.requests} == {0.0}  # one request per order
    assert v.parsed is False and v.p_a == 0.5 and v.consistent is None
    assert [o["method"] for o in v.details["orders"]] == ["unparsed", "unparsed"]
    metrics = agreement_metrics([LabeledPair(ITEM, 1.0, 1)], [v])
    assert metrics["n"] == 1 and metrics["n_unparsed"] == 1 and metrics["agreement"] == 0.5  # counted, not dropped


def test_reasking_is_an_opt_in_bounded_by_max_retries():
    fake = FakeChat([("I think the first one", {"I": 0.9})] * 6)
    judge = APIJudge(generator=fake, max_retries=2)
    v, = judge.compare([ITEM])
    assert len(fake.requests) == 6  # 3 attempts per order, bounded
    assert [r["temperature"] for r in fake.requests[:3]] == [0.0, 1.0, 1.0]
    assert v.parsed is False and v.p_a == 0.5
    assert judge.config()["max_retries"] == 2 and APIJudge(generator=fake).config()["max_retries"] == 0


def test_one_order_unparseable_uses_the_other():
    fake = FakeChat([("??", None), ("??", None), ("??", None), ("M", None)])
    v, = APIJudge(generator=fake, max_retries=2).compare([ITEM])
    # A first: unparseable 3 times; B first: "M" = the second shown answer, A, is better
    assert v.parsed is True and v.consistent is None and v.p_a == 1.0


def test_alpaca_eval_clf_asks_for_one_token_and_reads_position_zero():
    """weighted_alpaca_eval_gpt4_turbo: max_tokens 1, top_logprobs 5, the verdict read at the answer's first token."""
    fake = FakeChat([("m", {"m": 0.6, "M": 0.2}), ("M", {"M": 0.9, "m": 0.1})])
    v, = APIJudge(generator=fake).compare([ITEM])
    assert [r["max_tokens"] for r in fake.requests] == [1, 1] and all(r["logprobs"] for r in fake.requests)
    assert [o["position"] for o in v.details["orders"]] == [0, 0]
    assert v.details["p_first"] == [pytest.approx(0.75), pytest.approx(0.1)]


def test_bracketed_verdict_is_read_at_the_label_after_the_brackets():
    """pair_v2: a GPT-style judge answers "[[A]]" token by token ("[[", "A", "]]"). The first request must get far
    enough to see the label, at temperature 0, and read P(A) / (P(A) + P(B)) at the label's position, not at the
    first token (whose top_logprobs may hold a little "A" too)."""
    def answer(first: str, dist: dict):
        return (f"[[{first}]]", [("[[", {"[[": 0.97, "[": 0.02, "A": 0.01}), (first, dist), ("]]", {"]]": 0.99})])

    fake = FakeChat([answer("A", {"A": 0.7, "B": 0.3}), answer("B", {"B": 0.8, "A": 0.2})])
    judge = APIJudge(generator=fake, prompt="pair_v2")
    v, = judge.compare([ITEM])
    assert len(fake.requests) == 2  # one request per order: nothing re-asked
    assert all(r["temperature"] == 0.0 and r["max_tokens"] >= 3 and r["logprobs"] for r in fake.requests)
    assert [o["method"] for o in v.details["orders"]] == ["logprobs", "logprobs"]
    assert [o["position"] for o in v.details["orders"]] == [1, 1]
    assert v.details["p_first"] == [pytest.approx(0.7), pytest.approx(0.2)]
    assert v.p_a == pytest.approx((0.7 + 0.8) / 2) and v.consistent is True


def test_bracketed_verdict_without_logprobs_is_parsed_from_the_first_answer():
    fake = FakeChat([("[[B]]", None), ("[[A]]", None)], refuse_logprobs=True)
    v, = APIJudge(generator=fake, prompt="pair_v2").compare([ITEM])
    assert [r["temperature"] for r in fake.requests] == [0.0, 0.0, 0.0]  # the refused request, then one per order
    assert v.p_a == 0.0 and v.consistent is True


def test_bracketed_verdict_after_a_preamble_and_a_spaced_label():
    fake = FakeChat([("", [("Verdict", {"Verdict": 0.9}), (":", {":": 0.9}), (" [[", {" [[": 0.9}),
                           (" B", {" B": 0.6, " A": 0.4}), (" ]]", {" ]]": 0.9})])])
    judge = APIJudge(generator=fake, prompt="pair_v2", both_orders=False)
    v, = judge.compare([ITEM])
    assert v.details["orders"][0]["position"] == 3 and v.p_a == pytest.approx(0.4)


def test_api_grading_is_fastchats_single_request():
    """FastChat run_judge_single: one request at temperature 0, max_tokens 2048, first [[n]] wins, no re-ask."""
    fake = FakeChat([("The answer is fine, better than a [[3]]-level answer. Rating: [[7]]", None)])
    g, = APIJudge(generator=fake).grade([GradeItem([{"role": "user", "content": "q"}], "a")])
    assert g.score == 3.0 and g.attempts == 1 and g.details["prompt"] == "single_v1"
    assert fake.requests == [{"logprobs": False, "temperature": 0.0, "max_tokens": 2048}]
    fake = FakeChat([("no rating", None), ("Rating: [[8]]", None)])
    g, = APIJudge(generator=fake).grade([GradeItem([{"role": "user", "content": "q"}], "a")])
    assert g.score is None and g.attempts == 1 and len(fake.requests) == 1 and g.raw == "no rating"


def test_api_grading_reasks_only_when_opted_in():
    fake = FakeChat([("no rating", None)] * 5)
    g, = APIJudge(generator=fake, max_retries=2).grade([GradeItem([{"role": "user", "content": "q"}], "a")])
    assert g.score is None and g.attempts == 3 and len(fake.requests) == 3 and g.raw == "no rating"
    assert [r["temperature"] for r in fake.requests] == [0.0, 0.7, 0.7]


def test_check_judge_asks_the_endpoint_once_and_the_eval_commands_only_warn(server, capsys):
    """Recipes refuse a judge endpoint that is down before their run folder exists; `eval` commands only warn, since
    a rerun whose verdicts are all cached needs no endpoint; `skip` (a resumed run) sends nothing."""
    from selfalign.judges import check_judge

    check_judge("api", {"base_url": server.url, "model": MODEL})  # `selfalign serve` lists its model: up
    down = {"base_url": "http://127.0.0.1:9/v1", "model": "gpt-4"}
    with pytest.raises(SelfalignError, match=r"127.0.0.1:9/v1/models: endpoint not reachable \(ConnectError"):
        check_judge("api", down)
    check_judge("api", down, endpoint="skip")
    assert capsys.readouterr().err == ""
    check_judge("api", down, endpoint="warn")
    err = capsys.readouterr().err
    assert err.startswith("selfalign: note: http://127.0.0.1:9/v1/models: endpoint not reachable") and \
        err.rstrip().endswith("(verdicts not already cached will fail until it answers)")
