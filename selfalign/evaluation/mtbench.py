"""MT-Bench-style evaluation: two-turn answers to the 80 questions, single-answer grades 1-10 per turn.

Protocol (FastChat `llm_judge`, METHODS.md §6.2): the second turn is asked in the conversation that holds the
model's own first answer; answers are sampled with FastChat's per-category temperatures; each turn is graded by a
single-answer judge (reference-guided for math, reasoning and coding; the multi-turn template for turn 2 — the
judge picks the template from `GradeItem.turn`, `.category` and `.references`); the score is the mean over all turn
grades, also reported per category and per turn. A grade with no readable rating (FastChat's -1; the API judge asks
once, as FastChat does, unless re-asking is opted into) is left out of the means, as FastChat's show_result drops
it, and counted in `n_unparsed` (FastChat does not report the count).

Files in `out_dir`: turn1.jsonl / turn2.jsonl (resumable responses), model_answer.jsonl (FastChat format),
judgments.jsonl (resumable, one per question and turn), metrics.json.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from selfalign.data.io import write_json, write_jsonl
from selfalign.data.loaders import MTBenchQuestion, load_mt_bench
from selfalign.data.records import Prompt
from selfalign.generation import Generator, SamplingParams, generate_to_file
from selfalign.judges.base import GradeItem, GradingJudge
from selfalign.judges.cache import judge_id
from selfalign.runs import ResumableJsonl

# FastChat's llm_judge/common.py temperature_config
CATEGORY_TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                        "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
REFERENCE_CATEGORIES = ("math", "reasoning", "coding")


def _answer_turn(generator: Generator, questions: Sequence[MTBenchQuestion], conversations: dict[int, list[dict]],
                 turn: int, out: Path, max_new_tokens: int, seed: int, progress: bool) -> dict[int, str]:
    """One turn for every question, grouped by the category temperature (one resumable file for all groups)."""
    answers: dict[int, str] = {}
    by_temp: dict[float, list[Prompt]] = defaultdict(list)
    question_of: dict[str, int] = {}
    for q in questions:
        # a sample's random numbers are drawn from (seed, prompt id): the second turn's id differs from the first's,
        # or it would draw the first turn's numbers (and tend to repeat its answer word for word). FastChat's
        # second turn likewise continues the random stream rather than restarting it
        pid = str(q.question_id) if turn == 1 else f"{q.question_id}:turn{turn}"
        question_of[pid] = q.question_id
        by_temp[CATEGORY_TEMPERATURE.get(q.category, 0.7)].append(
            Prompt(id=pid, messages=conversations[q.question_id], meta={"category": q.category}))
    for temperature, prompts in sorted(by_temp.items()):
        params = SamplingParams(temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens, n=1, seed=seed)
        for r in generate_to_file(generator, prompts, params, out, progress=progress):
            answers[question_of[r.prompt_id]] = r.response
    return answers


def answer_questions(generator: Generator, questions: Sequence[MTBenchQuestion], out_dir: str | Path,
                     max_new_tokens: int = 1024, seed: int = 0, progress: bool = True) -> dict[int, list[str]]:
    out_dir = Path(out_dir)
    conv1 = {q.question_id: [{"role": "user", "content": q.turns[0]}] for q in questions}
    turn1 = _answer_turn(generator, questions, conv1, 1, out_dir / "turn1.jsonl", max_new_tokens, seed, progress)
    conv2 = {q.question_id: conv1[q.question_id] + [{"role": "assistant", "content": turn1[q.question_id]},
                                                    {"role": "user", "content": q.turns[1]}] for q in questions}
    turn2 = _answer_turn(generator, questions, conv2, 2, out_dir / "turn2.jsonl", max_new_tokens, seed, progress)
    answers = {q.question_id: [turn1[q.question_id], turn2[q.question_id]] for q in questions}
    write_jsonl(out_dir / "model_answer.jsonl", [
        {"question_id": q.question_id, "answer_id": f"{generator.model_name}-{q.question_id}",
         "model_id": generator.model_name, "choices": [{"index": 0, "turns": answers[q.question_id]}],
         "tstamp": time.time()} for q in questions])
    return answers


def grade_items(q: MTBenchQuestion, answers: list[str]) -> list[GradeItem]:
    refs = q.reference if q.category in REFERENCE_CATEGORIES else None
    turn1 = [{"role": "user", "content": q.turns[0]}]
    turn2 = turn1 + [{"role": "assistant", "content": answers[0]}, {"role": "user", "content": q.turns[1]}]
    return [
        GradeItem(messages=turn1, answer=answers[0], reference=refs[0] if refs else None, turn=1,
                  references=refs[:1] if refs else None, category=q.category),
        GradeItem(messages=turn2, answer=answers[1], reference=refs[1] if refs and len(refs) > 1 else None, turn=2,
                  references=refs[:2] if refs else None, category=q.category),
    ]


def grade_answers(questions: Sequence[MTBenchQuestion], answers: dict[int, list[str]], judge: GradingJudge,
                  out_dir: str | Path, model: str, progress: bool = True) -> list[dict]:
    """Grade both turns of every question, resumably; returns this model's and judge's grades of `questions`.
    Grades are keyed by (question, turn, model, judge id: its name and a hash of its config), so a reused out dir
    with another model, judge or judge option grades afresh, and a smaller --limit later does not count the earlier
    run's extra questions."""
    out_dir = Path(out_dir)
    jid = judge_id(judge)

    def key(r):
        return r["question_id"], r["turn"], r["model"], r.get("judge_id")

    with ResumableJsonl(out_dir / "judgments.jsonl", key=key) as sink:
        todo = {q.question_id: [it for it in grade_items(q, answers[q.question_id])
                                if (q.question_id, it.turn, model, jid) not in sink.done] for q in questions}
        total = 2 * len(questions)
        bar = tqdm(total=total, initial=total - sum(map(len, todo.values())), desc=f"grade ({judge.name})",
                   unit="turn", disable=not progress)
        for q in questions:  # (a repeated question id is graded once: the first grading marks it done)
            items = [it for it in todo[q.question_id] if (q.question_id, it.turn, model, jid) not in sink.done]
            if not items:
                continue
            grades = judge.grade(items, progress=False)
            bar.update(len(items))
            sink.append({"question_id": q.question_id, "category": q.category, "model": model, "judge": judge.name,
                         "judge_id": jid, "turn": it.turn, "score": g.score, "judgment": g.raw,
                         "attempts": g.attempts, "details": g.details, "tstamp": time.time()}
                        for it, g in zip(items, grades))
        bar.close()
        by_key = {key(r): r for r in sink.rows}
    return [by_key[(q.question_id, turn, model, jid)] for q in questions for turn in (1, 2)]


def summarize(judgments: Sequence[dict]) -> dict:
    scored = [j for j in judgments if j["score"] is not None]
    by_cat: dict[str, list[float]] = defaultdict(list)
    by_turn: dict[int, list[float]] = defaultdict(list)
    for j in scored:
        by_cat[j["category"]].append(j["score"])
        by_turn[j["turn"]].append(j["score"])
    mean = lambda xs: round(sum(xs) / len(xs), 3) if xs else None  # noqa: E731
    return {"score": mean([j["score"] for j in scored]), "per_category": {c: mean(v) for c, v in sorted(by_cat.items())},
            "per_turn": {t: mean(v) for t, v in sorted(by_turn.items())}, "n_grades": len(judgments),
            "n_unparsed": len(judgments) - len(scored)}


def require_grading_judge(judge) -> None:
    """A one-line error unless `judge` grades single answers (a pairwise-only judge cannot score MT-Bench)."""
    from selfalign.errors import ConfigError
    from selfalign.judges.base import grades_single_answers

    if not grades_single_answers(judge):
        raise ConfigError(f"judge '{judge.name}' does not grade single answers; MT-Bench needs one that does "
                          "(local, api)")


def evaluate_mtbench(generator: Generator, judge: GradingJudge, out_dir: str | Path,
                     questions: Sequence[MTBenchQuestion] | None = None, limit: int | None = None,
                     max_new_tokens: int = 1024, seed: int = 0, progress: bool = True) -> dict:
    require_grading_judge(judge)  # before any answer is generated, not after
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    questions = list(questions) if questions is not None else load_mt_bench()
    if limit is not None:  # a category-balanced slice: the first `limit // 8` questions of each category
        per = max(1, limit // 8)
        counts: dict[str, int] = defaultdict(int)
        keep = []
        for q in questions:
            if counts[q.category] < per:
                keep.append(q)
                counts[q.category] += 1
        questions = keep
    answers = answer_questions(generator, questions, out_dir, max_new_tokens, seed, progress)
    judgments = grade_answers(questions, answers, judge, out_dir, generator.model_name, progress)
    metrics = summarize(judgments)
    metrics.update(model=generator.model_name, judge=judge.name,
                   judge_id=judgments[0]["judge_id"] if judgments else None, n_questions=len(questions),
                   max_new_tokens=max_new_tokens)
    write_json(out_dir / "metrics.json", metrics)
    return metrics
