"""The judgement cache: a second call never reaches the judge; a killed run keeps its finished verdicts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from selfalign.errors import SelfalignError
from selfalign.judges import make_judge
from selfalign.judges.base import Grade, GradeItem, GradingJudge, PairwiseItem, PairwiseJudge, PairwiseVerdict
from selfalign.judges.cache import CachedJudge, judge_id


class CountingJudge(PairwiseJudge, GradingJudge):
    """Prefers the answer with more 'x'; counts the items it is asked about."""

    name = "counting"

    def __init__(self, flavour: str = "x", fail_after: int | None = None):
        self.flavour, self.fail_after = flavour, fail_after
        self.pair_calls = 0
        self.grade_calls = 0
        self.batch_size = 2

    def config(self) -> dict:
        return {"flavour": self.flavour}

    def compare(self, items, progress=False):
        out = []
        for it in items:
            if self.fail_after is not None and self.pair_calls >= self.fail_after:
                raise KeyboardInterrupt  # as if the run were stopped here
            self.pair_calls += 1
            a, b = it.answer_a.count(self.flavour), it.answer_b.count(self.flavour)
            out.append(PairwiseVerdict(p_a=0.5 if a == b else float(a > b), consistent=True, details={"n": a - b}))
        return out

    def grade(self, items, progress=False):
        self.grade_calls += len(items)
        return [Grade(score=float(len(it.answer) % 10 + 1), raw="[[x]]") for it in items]


def pairs(n: int) -> list[PairwiseItem]:
    return [PairwiseItem([{"role": "user", "content": f"question {i}"}], "x" * i, "x" * (n - i)) for i in range(n)]


def test_second_call_does_not_invoke_the_judge(tmp_path):
    inner = CountingJudge()
    cache = tmp_path / "cache.jsonl"
    judge = CachedJudge(inner, cache)
    first = judge.compare(pairs(5))
    assert inner.pair_calls == 5 and judge.judged == 5
    again = CachedJudge(inner, cache).compare(pairs(5))  # a new process would open the same file
    assert inner.pair_calls == 5, "cached verdicts must not reach the judge"
    assert [v.p_a for v in again] == [v.p_a for v in first] and again[1].details == {"n": 1 - 4}
    more = judge.compare(pairs(5) + pairs(7))  # only the new items are judged, duplicates once
    assert inner.pair_calls == 5 + 7 and len(more) == 12
    assert len(cache.read_text().splitlines()) == 12


def test_duplicates_in_one_call_are_judged_once(tmp_path):
    inner = CountingJudge()
    items = pairs(3)
    out = CachedJudge(inner, tmp_path / "c.jsonl").compare(items + items + items)
    assert inner.pair_calls == 3 and len(out) == 9 and out[0].p_a == out[3].p_a == out[6].p_a


def test_key_includes_judge_config_and_reference(tmp_path):
    cache = tmp_path / "c.jsonl"
    a, b = CountingJudge("x"), CountingJudge("y")
    assert judge_id(a) != judge_id(b)
    CachedJudge(a, cache).compare(pairs(3))
    CachedJudge(b, cache).compare(pairs(3))  # same file, other config: judged again
    assert a.pair_calls == 3 and b.pair_calls == 3
    ref = [PairwiseItem(p.messages, p.answer_a, p.answer_b, reference="r") for p in pairs(3)]
    CachedJudge(a, cache).compare(ref)
    assert a.pair_calls == 6


def test_a_local_judge_given_a_folder_is_identified_by_its_weights(tmp_path):
    """A checkpoint folder can be retrained in place: its verdicts must not be reused for the new weights."""
    from selfalign.judges.local import LocalJudge

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"first weights")
    before = judge_id(LocalJudge(model=str(folder)))
    time.sleep(1.1)  # the digest cache is keyed by size and mtime (seconds)
    (folder / "model.safetensors").write_bytes(b"other weights")
    assert judge_id(LocalJudge(model=str(folder))) != before
    assert "weights" not in LocalJudge(model="smollm2-135m").config()  # a short name is fixed weights


def test_grades_are_cached_too(tmp_path):
    inner = CountingJudge()
    judge = CachedJudge(inner, tmp_path / "c.jsonl")
    items = [GradeItem([{"role": "user", "content": "q"}], "ans"), GradeItem([{"role": "user", "content": "q"}], "a",
                                                                            reference="ref", turn=1)]
    g1 = judge.grade(items)
    g2 = judge.grade(items)
    assert inner.grade_calls == 2 and [g.score for g in g1] == [g.score for g in g2] == [4.0, 2.0]


def test_interrupted_run_keeps_finished_chunks(tmp_path):
    cache = tmp_path / "c.jsonl"
    with pytest.raises(KeyboardInterrupt):
        CachedJudge(CountingJudge(fail_after=5), cache, chunk_size=2).compare(pairs(9))
    assert len(cache.read_text().splitlines()) == 4  # two finished chunks of 2; the third was cut
    resumed = CountingJudge()
    out = CachedJudge(resumed, cache, chunk_size=2).compare(pairs(9))
    assert resumed.pair_calls == 5 and len(out) == 9


SLOW_RUN = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_judge_cache import CountingJudge, pairs
    from selfalign.judges.cache import CachedJudge

    class Slow(CountingJudge):
        def compare(self, items, progress=False):
            time.sleep(0.3)
            return super().compare(items, progress)

    CachedJudge(Slow(), sys.argv[1], chunk_size=1).compare(pairs(40))
""")


def test_resume_after_kill_9(tmp_path):
    """A judging process killed with SIGKILL mid-run: its finished verdicts stay (a torn last line is dropped),
    and the rerun judges only the rest."""
    cache = tmp_path / "c.jsonl"
    script = tmp_path / "run.py"
    script.write_text(SLOW_RUN.format(tests=os.path.dirname(__file__)))
    proc = subprocess.Popen([sys.executable, str(script), str(cache)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and (not cache.exists() or len(cache.read_text().splitlines()) < 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with open(cache, "a") as f:  # what a kill in the middle of a write leaves behind
        f.write('{"key": "torn')
    done = len([line for line in cache.read_text().splitlines() if line.endswith("}")])
    assert 3 <= done < 40
    resumed = CountingJudge()
    out = CachedJudge(resumed, cache, chunk_size=1).compare(pairs(40))
    assert resumed.pair_calls == 40 - done
    assert [v.p_a for v in out] == [v.p_a for v in CountingJudge().compare(pairs(40))]
    assert len(cache.read_text().splitlines()) == 40


def test_make_judge_factory(tmp_path):
    judge = make_judge("length", cache=str(tmp_path / "c.jsonl"))
    assert isinstance(judge, CachedJudge) and judge.name == "length"
    judge.compare(pairs(3))
    assert (tmp_path / "c.jsonl").exists()
    with pytest.raises(SelfalignError, match="unknown judge"):
        make_judge("gpt5")
    with pytest.raises(SelfalignError, match="no option temperature"):
        make_judge("length", temperature=1)
    with pytest.raises(SelfalignError, match="train-reward"):
        make_judge("reward", model=str(tmp_path / "missing"))
    with pytest.raises(SelfalignError, match="base_url"):
        make_judge("api")
    with pytest.raises(SelfalignError, match="no 'labels'"):
        make_judge("api", base_url="http://127.0.0.1:9/v1", prompt="single_v1")
