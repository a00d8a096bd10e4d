"""Loaders for the real data formats selfalign works with (the files in ../shared/data and their upstream twins).

- prompts: any JSONL/JSON/parquet with `id` and `prompt` | `instruction` | `messages` (+ optional `history`);
- MT-Bench questions (`question_id`, `category`, `turns`) and GPT-4 reference answers (FastChat format);
- AlpacaEval instructions (`eval_set.jsonl`) and reference outputs (`reference_outputs_gpt4_turbo.jsonl`, or
  alpaca_eval's own `model_outputs.json`);
- preference pairs (`id`, `prompt`, `chosen`, `rejected`, optional `history`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from selfalign.data.io import check_limit, iter_json_rows, read_records
from selfalign.data.records import PreferencePair, Prompt
from selfalign.errors import DataError


def shared_data_dir() -> Path:
    """The real data folder: $SELFALIGN_DATA, else ../shared/data next to the repository checkout."""
    env = os.environ.get("SELFALIGN_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent.parent / "shared" / "data"
        if cand.is_dir():
            return cand
        cand = parent / "shared" / "data"
        if cand.is_dir():
            return cand
    return Path.cwd() / "shared" / "data"


def load_prompts(path: str | Path, limit: int | None = None, exclude_ids: set | None = None) -> list[Prompt]:
    """Prompts from any supported file. A prompt without an `id` is named by its file and line ("prompts:12");
    duplicate ids are an error (they would collide in resumable outputs)."""
    check_limit(limit, path)
    out = []
    for p in _unique_ids(read_records(path, Prompt, missing_id="line"), path):
        if exclude_ids and p.id in exclude_ids:
            continue
        out.append(p)
        if limit is not None and len(out) >= limit:
            break
    return out


def _unique_ids(prompts: list, path) -> list:
    """`prompts` (or pairs), refused if two share an id: answers are matched to prompts by id, and caches (reference
    log-probs, labels) key pairs by it."""
    seen: dict[str, int] = {}
    for p in prompts:
        _, line = getattr(p, "_source", (None, None))
        if p.id in seen:
            raise DataError(f"duplicate id '{p.id}' (first seen on line {seen[p.id]})", path=str(path), line=line,
                            field="id")
        seen[p.id] = line
    return prompts


def load_preference_pairs(path: str | Path, limit: int | None = None, drop_identical: bool = True,
                          drop_empty: tuple[str, ...] = (), counts: dict | None = None,
                          unique_ids: bool = False) -> list[PreferencePair]:
    """Preference pairs; pairs whose chosen == rejected (an upstream quirk of UltraFeedback) carry no signal for
    DPO and are dropped unless `drop_identical=False`; so are pairs whose answer named in `drop_empty` ("chosen",
    "rejected") is empty (real files have a few: UltraFeedback's train_1k one of each, HH helpful four empty
    rejected ones), which training should not take as a target or a preference. `counts`, when given, receives
    how many pairs the file held, how many of each kind were dropped, and how many are returned (after `limit`).
    With `unique_ids`, duplicate ids are an error, as for prompts (a recipe's files and logs key pairs by id). An
    alpaca_eval annotations file (`instruction`, `output_1`, `output_2`, `preference`) is read as pairs too: see
    `load_annotated_pairs`."""
    check_limit(limit, path)
    if _is_annotation_file(path):
        pairs = load_annotated_pairs(path)
    else:
        pairs = read_records(path, PreferencePair, missing_id="line")  # the id of a pair without one: "file:line"
        pairs = _unique_ids(pairs, path) if unique_ids else pairs
    tally = {"in_file": len(pairs), "identical_dropped": 0, "empty_dropped": 0}
    if drop_identical:
        kept = [p for p in pairs if p.chosen.strip() != p.rejected.strip()]
        tally["identical_dropped"], pairs = len(pairs) - len(kept), kept
    if drop_empty:
        kept = [p for p in pairs if all(getattr(p, name).strip() for name in drop_empty)]
        tally["empty_dropped"], pairs = len(pairs) - len(kept), kept
    pairs = pairs[:limit] if limit is not None else pairs
    if counts is not None:
        counts.update(tally, used=len(pairs))
    return pairs


def _is_annotation_file(path) -> bool:
    """True for a .json/.jsonl file whose first row is in alpaca_eval's annotation format (and not a pair file)."""
    if not isinstance(path, (str, Path)) or not str(path).endswith((".json", ".jsonl")) or not Path(path).exists():
        return False
    for _, row in iter_json_rows(path):
        # output_1 / output_2 mark the format: a missing `preference` is then said as such, not as a missing 'id'
        return isinstance(row, dict) and "chosen" not in row and all(k in row for k in ("output_1", "output_2"))
    return False


def load_annotated_pairs(path: str | Path, min_margin: float = 0.0) -> list[PreferencePair]:
    """Judge annotations in alpaca_eval's format as preference pairs: `preference` (or a human `label`) in [1, 2]
    (1 = output_1 better),
    chosen = the preferred output. Ties (preference 1.5), and preferences closer to 1.5 than `min_margin`, carry no
    direction and are skipped. The id is the row's `id` if it has one, else `<file stem>:<line>` (`<file stem>:
    <record>` in a JSON array); the preference and generators are kept in `meta`."""
    out = []
    for line, row in iter_json_rows(path):
        try:
            messages = [{"role": "user", "content": _required_text(row, "instruction")}]
            first, second = _required_text(row, "output_1", True), _required_text(row, "output_2", True)
            # `label` (1 or 2): LLMBar's and MT-Bench's human pairs, which `eval agreement` reads too
            name = "preference" if row.get("preference") is not None or row.get("label") is None else "label"
            pref = row.get(name)
            if pref is None:
                raise DataError("missing: give 'preference' in [1, 2] (or a human 'label', 1 or 2)", field=name)
            if name == "label" and pref not in (1, 2):
                raise DataError(f"expected 1 or 2, got {pref!r}", field=name)
            if isinstance(pref, bool) or not isinstance(pref, (int, float)) or not 1.0 <= pref <= 2.0:
                raise DataError(f"expected a number in [1, 2], got {pref!r}", field=name)
        except DataError as e:
            raise DataError(e.reason, path=str(path), line=line, field=e.field) from None
        if pref == 1.5 or abs(pref - 1.5) < min_margin:
            continue
        chosen, rejected = (first, second) if pref < 1.5 else (second, first)
        meta = {k: row[k] for k in ("preference", "label", "generator_1", "generator_2", "dataset") if k in row}
        # a JSON array's pairs are numbered by record (several share a line in a compact file), as they always were:
        # the id is in trained reward models' configs and run files
        number = getattr(line, "record", line)
        out.append(PreferencePair(id=str(row.get("id", f"{Path(path).stem}:{number}")), messages=messages,
                                  chosen=chosen, rejected=rejected, meta=meta))
    if not out:
        raise DataError("no annotated pairs with a preference", path=str(path))
    return out


def _required_text(row: dict, name: str, allow_empty: bool = False) -> str:
    value = row.get(name)
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise DataError("missing, empty or not a string", field=name)
    return value


@dataclass
class MTBenchQuestion:
    question_id: int
    category: str
    turns: list[str]
    reference: list[str] | None = None  # GPT-4 reference answers (math, reasoning, coding)


def load_mt_bench(question_file: str | Path | None = None, reference_file: str | Path | None = None) -> list[MTBenchQuestion]:
    root = shared_data_dir() / "mt_bench"
    question_file = Path(question_file or root / "question.jsonl")
    reference_file = Path(reference_file or root / "reference_answer_gpt-4.jsonl")
    refs: dict[int, list[str]] = {}
    if reference_file.exists():
        for line, row in iter_json_rows(reference_file):
            try:
                refs[int(row["question_id"])] = list(row["choices"][0]["turns"])
            except (KeyError, IndexError, TypeError, ValueError):
                raise DataError("expected question_id and choices[0].turns", path=str(reference_file), line=line,
                                field="choices") from None
    out = []
    for line, row in iter_json_rows(question_file):
        for name in ("question_id", "category", "turns"):
            if row.get(name) in (None, "", []):
                raise DataError("missing required field", path=str(question_file), line=line, field=name)
        turns = row["turns"]
        if not isinstance(turns, list) or not all(isinstance(t, str) and t.strip() for t in turns):
            raise DataError("expected a list of non-empty strings", path=str(question_file), line=line, field="turns")
        qid = int(row["question_id"])
        out.append(MTBenchQuestion(qid, str(row["category"]), turns, refs.get(qid)))
    return out


def load_alpaca_eval_set(path: str | Path | None = None, limit: int | None = None, seed: int | None = None) -> list[Prompt]:
    """AlpacaEval instructions as prompts (id = index in the 805-row set; alpaca_eval's own files have no ids, so a
    row without one gets its index); a seeded random subset when `limit` and `seed` are given, else the first
    `limit`. Duplicate ids are refused: answers are matched to instructions by id."""
    import random

    path = Path(path or shared_data_dir() / "alpaca_eval" / "eval_set.jsonl")
    check_limit(limit, path)
    prompts = _unique_ids(read_records(path, Prompt, missing_id="index"), path)
    for p in prompts:
        if p.meta.get("dataset") is None:
            p.meta["dataset"] = "unknown"
    if limit is not None and seed is not None:  # numeric ids in number order, then the others by text
        prompts = sorted(random.Random(seed).sample(prompts, min(limit, len(prompts))),
                         key=lambda p: (0, int(p.id), "") if p.id.isdigit() else (1, 0, p.id))
    elif limit is not None:
        prompts = prompts[:limit]
    return prompts


def load_reference_outputs(path: str | Path | None = None) -> dict[str, dict]:
    """Reference (baseline) outputs keyed by instruction text: {instruction: {"output", "generator", "id"}}.

    Keyed by instruction because alpaca_eval matches model and baseline outputs by instruction."""
    path = Path(path or shared_data_dir() / "alpaca_eval" / "reference_outputs_gpt4_turbo.jsonl")
    out = {}
    for line, row in iter_json_rows(path):
        for name in ("instruction", "output"):
            if not isinstance(row.get(name), str):
                raise DataError("expected a string", path=str(path), line=line, field=name)
        out[row["instruction"]] = {"output": row["output"], "generator": row.get("generator", "reference"),
                                   "id": row.get("id")}
    return out
