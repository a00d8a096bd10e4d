"""A JSONL cache of judgements, so re-runs and resumed runs never pay for the same judgement twice.

Keys are sha256 digests of (judge id, kind, conversation, answers, reference), where the judge id is the judge's
name plus a hash of its `config()` (model, prompt file hash, budgets...): change the judge and it misses, as it
should. Verdicts are appended chunk by chunk through `ResumableJsonl` (one line per verdict, flushed and fsynced),
so a run killed mid-way keeps every finished verdict and the next run judges only the rest. One file may hold many
judges' verdicts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from tqdm.auto import tqdm

from selfalign.errors import ConfigError
from selfalign.judges.base import Grade, GradeItem, GradingJudge, PairwiseItem, PairwiseJudge, PairwiseVerdict
from selfalign.runs import ResumableJsonl


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()


def judge_id(judge) -> str:
    """`name-<12 hex>`: the judge's name and a hash of its config. A cached judge's was computed when it was wrapped
    (hashing a reward judge's config reads its weights), so it is returned as it is."""
    if isinstance(getattr(judge, "id", None), str):
        return judge.id
    config = judge.config() if hasattr(judge, "config") else {}
    return f"{judge.name}-{_digest(config)[:12]}"


def pair_key(jid: str, item: PairwiseItem) -> str:
    return _digest([jid, "pair", item.messages, item.answer_a, item.answer_b, item.reference])


def grade_key(jid: str, item: GradeItem) -> str:
    return _digest([jid, "grade", item.messages, item.answer, item.reference, item.turn,
                    getattr(item, "references", None)])


def default_cache_path(jid: str) -> Path:
    from selfalign.models.registry import cache_dir

    return cache_dir() / "judgements" / f"{jid}.jsonl"


class CachedJudge(PairwiseJudge, GradingJudge):
    """Wraps a judge: answers from the cache file when it can, asks the judge (in chunks of `chunk_size`, each
    appended to the file as soon as it is done) for the rest. `calls` / `cache_hits` count what happened."""

    def __init__(self, judge, path: str | Path | None = None, chunk_size: int | None = None):
        self.judge = judge
        self.name = judge.name
        self.id = judge_id(judge)
        self.path = Path(path) if path else default_cache_path(self.id)
        self.chunk_size = max(1, int(chunk_size or getattr(judge, "batch_size", 8) or 8))
        self.cache_hits = 0
        self.judged = 0

    def config(self) -> dict:
        return self.judge.config()

    def __getattr__(self, name):  # expose the wrapped judge's attributes (e.g. model_spec) read-only
        if name == "judge":
            raise AttributeError(name)
        return getattr(self.judge, name)

    def _run(self, items, key_fn, call, to_row, from_row, progress: bool):
        keys = [key_fn(self.id, it) for it in items]
        with ResumableJsonl(self.path, key=lambda r: r["key"]) as sink:
            found = {r["key"]: r for r in sink.rows}
            todo: dict[str, object] = {}
            for k, it in zip(keys, items):
                if k not in found and k not in todo:
                    todo[k] = it
            self.cache_hits += sum(1 for k in keys if k in found)
            pending = list(todo.items())
            bar = tqdm(total=len(pending), desc=f"judge ({self.name})", unit="item", disable=not progress)
            try:
                for start in range(0, len(pending), self.chunk_size):
                    chunk = pending[start:start + self.chunk_size]
                    results = call([it for _, it in chunk])
                    rows = [{"key": k, "judge": self.id, **to_row(r)} for (k, _), r in zip(chunk, results)]
                    sink.append(rows)
                    for row in rows:
                        found[row["key"]] = row
                    self.judged += len(chunk)
                    bar.update(len(chunk))
            finally:
                bar.close()
        return [from_row(found[k]) for k in keys]

    def compare(self, items: list[PairwiseItem], progress: bool = False) -> list[PairwiseVerdict]:
        return self._run(items, pair_key, lambda chunk: self.judge.compare(chunk, progress=False),
                         lambda v: {"verdict": dataclasses.asdict(v)},
                         lambda row: PairwiseVerdict(**row["verdict"]), progress)

    @property
    def grades_single_answers(self) -> bool:
        return isinstance(self.judge, GradingJudge)

    def grade(self, items: list[GradeItem], progress: bool = False) -> list[Grade]:
        if not self.grades_single_answers:
            raise ConfigError(f"judge '{self.name}' does not grade single answers (it only compares two)")
        return self._run(items, grade_key, lambda chunk: self.judge.grade(chunk, progress=False),
                         lambda g: {"grade": dataclasses.asdict(g)},
                         lambda row: Grade(**row["grade"]), progress)
