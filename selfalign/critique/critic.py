"""Running a critic over answers: critique and refine each one (the SRT Table-1 format, METHODS.md §3.3), re-sample
the malformed critiques, ask for a missing score, score each refinement in a separate critique (Rule 2), and turn
the results into kept critiques or preference pairs.

The critic is any `Generator` (a local model, or an OpenAI-compatible endpoint). Every sampling pass is a resumable
file, so a killed stage redoes no critique it already has.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from selfalign.config import at_least
from selfalign.critique.parse import (ParsedCritique, insert_score_line, parse_critique, parse_followup_score,
                                      parse_score)
from selfalign.critique.prompts import critique_prompt
from selfalign.data import Critique, PreferencePair, Prompt, Response
from selfalign.generation import Generator, SamplingParams, check_sampling_section, generate_to_file


@dataclass
class CritiqueConfig:
    """How a critique is sampled, re-sampled when malformed, and parsed."""

    temperature: float = 0.0  # paper: critic at T = 0; §5.1: greedy self-refinement
    max_new_tokens: int = 2048  # paper: critic max_new_tokens 2048
    seed: int = 0
    retries: int = 2  # [R] re-samples of a malformed critique before it is dropped
    retry_temperature: float = 0.3  # [R] a retry at T = 0 would repeat the same text on a local model
    drop_truncated: bool = True  # a critique cut off at max_new_tokens has an incomplete refinement

    # local backend: sequences decoded together; None: the backend's default (make_generator), capped by free memory.
    # A 1.5B critic on the lean backend decodes 6.5 tokens/s at 8 rows and 26.7 at 64 (benchmarks/RESULTS.md)
    batch_size: int | None = None
    # local backend: worker processes, one per GPU, each decoding batch_size sequences (generation/parallel.py)
    processes: int = 1
    # [R] not in the paper (GPT-4 writes the score): a critique complete but for its "Overall Score: [[n]]" line is
    # asked for the score in one follow-up turn (greedy), and the line is put back before the improved response.
    # Small local critics skip the rating step (Qwen2.5-Coder-1.5B: 32 of 32 at T = 0, benchmarks/RESULTS.md).
    score_followup: bool = True

    def __post_init__(self):
        check_sampling_section(self)
        at_least(self, 0, "retries")
        if not 0 <= self.retry_temperature < float("inf"):  # NaN fails too
            raise ValueError(f"retry_temperature must be a finite number >= 0, not {self.retry_temperature}")


RESCORE_STOP = "### Improved Response"  # the heading after the score line in the Table-1 format
SCORE_FOLLOWUP = ('Conclude your feedback with your rating of the original response from 1 to 10 (1 is the worst, '
                  '10 the best), written exactly as "Overall Score: [[n]]".')


def _parse_full(c: CritiqueConfig) -> Callable[[Response, str], ParsedCritique]:
    return lambda raw, answer: parse_critique(raw.response, answer,
                                              finish_reason=raw.finish_reason if c.drop_truncated else None)


def _parse_score_only(raw: Response, _answer: str) -> ParsedCritique:
    score, reason = parse_score(raw.response)
    return ParsedCritique(score=score, reason=reason)


def critique_with_retries(gen: Generator, prompts: dict[str, Prompt], answers: dict[str, str], c: CritiqueConfig,
                          out_prefix: Path, parse: Callable[[Response, str], ParsedCritique], progress: bool = True,
                          stop: tuple[str, ...] = ()):
    """Critique every prompt; re-sample the malformed ones up to `c.retries` times (attempt k > 0 at
    `retry_temperature` with seed `c.seed + k`). Each attempt is a resumable file `{out_prefix}/attempt{k}.jsonl`.

    Returns (ok: id -> (parsed, attempt, raw), failed: id -> (reason, raw), reasons per attempt)."""
    ok: dict[str, tuple[ParsedCritique, int, Response]] = {}
    failed: dict[str, tuple[str, Response | None]] = {}
    per_attempt: list[dict] = []
    pending = list(prompts)
    for k in range(c.retries + 1):
        if not pending:
            break
        params = SamplingParams(temperature=c.temperature if k == 0 else max(c.retry_temperature, 1e-3),
                                top_p=1.0, max_new_tokens=c.max_new_tokens, seed=c.seed + k, stop=stop)
        raws = generate_to_file(gen, [prompts[i] for i in pending], params, out_prefix / f"attempt{k}.jsonl",
                                progress=progress)
        by_id = {r.prompt_id: r for r in raws}
        reasons: Counter = Counter()
        still = []
        for i in pending:
            parsed = parse(by_id[i], answers[i])
            if parsed.ok:
                ok[i] = (parsed, k, by_id[i])
                reasons["ok"] += 1
            else:
                failed[i] = (parsed.reason, by_id[i])
                reasons[parsed.reason] += 1
                still.append(i)
        if c.score_followup:
            for i, (parsed, raw) in score_followups(gen, prompts, answers, failed, still, c, parse,
                                                   out_prefix / f"attempt{k}_score.jsonl", progress).items():
                ok[i] = (parsed, k, raw)
                still.remove(i)
                reasons["ok_after_score_followup"] += 1
        per_attempt.append(dict(reasons))
        pending = still
    for i in ok:
        failed.pop(i, None)
    return ok, failed, per_attempt


def score_followups(gen: Generator, prompts: dict[str, Prompt], answers: dict[str, str], failed: dict, ids: list[str],
                    c: CritiqueConfig, parse: Callable[[Response, str], ParsedCritique], out: Path,
                    progress: bool = True) -> dict[str, tuple[ParsedCritique, Response]]:
    """For critiques that lack only their score: ask the critic for it in a follow-up turn and splice the score line
    back in. Returns id -> (parsed critique, critique text with the score) for those that now parse."""
    todo: dict[str, Prompt] = {}
    for i in ids:
        reason, raw = failed[i]
        if reason != "no_score" or raw is None:
            continue
        probe = replace(raw, response=insert_score_line(raw.response, 5))  # would a score be all it lacks?
        if parse(probe, answers[i]).ok:
            todo[i] = Prompt(id=i, messages=prompts[i].messages + [{"role": "assistant", "content": raw.response},
                                                                  {"role": "user", "content": SCORE_FOLLOWUP}])
    if not todo:
        return {}
    replies = generate_to_file(gen, list(todo.values()), SamplingParams(temperature=0.0, max_new_tokens=32,
                                                                        seed=c.seed), out, progress=progress)
    fixed = {}
    for reply in replies:
        i = reply.prompt_id
        score, reason = parse_followup_score(reply.response)
        if reason is not None:
            continue
        raw = failed[i][1]
        spliced = replace(raw, response=insert_score_line(raw.response, score),
                          meta={**raw.meta, "score_followup": reply.response})
        parsed = parse(spliced, answers[i])
        if parsed.ok:
            fixed[i] = (parsed, spliced)
    return fixed


def critique_responses(gen: Generator, responses: Sequence[Response], fmt: str, c: CritiqueConfig, out_dir: Path,
                       critic_name: str, rescore: bool,
                       progress: bool = True) -> tuple[list[Critique], list[dict], dict]:
    """Critique + refine each response (with retries), then optionally score each refinement in a separate critique
    with the same template. Returns (critiques with meta.refinement_score, dropped rows with reasons, stats)."""
    dropped: list[dict] = []
    by_id: dict[str, Response] = {}
    for r in responses:
        if not r.response.strip():
            dropped.append({"prompt_id": r.prompt_id, "reason": "empty_response"})
        else:
            by_id[r.prompt_id] = r
    prompts = {i: critique_prompt(i, r.messages, r.response, fmt) for i, r in by_id.items()}
    ok, failed, attempts = critique_with_retries(gen, prompts, {i: r.response for i, r in by_id.items()}, c,
                                                 out_dir / "critique", _parse_full(c), progress)
    for i, (reason, raw) in failed.items():
        dropped.append({"prompt_id": i, "reason": reason, "raw": raw.response if raw else None})
    stats = {"responses": len(responses), "critique_attempts": attempts,
             "first_attempt_failure_rate": round(1 - attempts[0].get("ok", 0) / max(1, len(prompts)), 4)
             if attempts else None, "recovered_by_retry": sum(1 for p in ok.values() if p[1] > 0),
             "recovered_by_score_followup": sum(1 for p in ok.values() if "score_followup" in p[2].meta)}
    rescored: dict = {}
    if rescore and ok:
        rprompts = {i: critique_prompt(i, by_id[i].messages, p.refinement, fmt) for i, (p, _, _) in ok.items()}
        # only the score is read, and it comes before the improved response: stop there instead of writing a
        # refinement of the refinement (about half of a critique's tokens)
        rescored, rfailed, rattempts = critique_with_retries(gen, rprompts, {i: "" for i in rprompts}, c,
                                                             out_dir / "rescore", _parse_score_only, progress,
                                                             stop=(RESCORE_STOP,))
        stats["rescore_attempts"] = rattempts
        for i, (reason, raw) in rfailed.items():
            dropped.append({"prompt_id": i, "reason": f"refinement_unscored:{reason}",
                            "raw": raw.response if raw else None})
    critiques = []
    for i, (p, k, raw) in ok.items():
        if rescore and i not in rescored:
            continue
        r = by_id[i]
        meta = {"attempt": k, "finish_reason": raw.finish_reason, "answer_model": r.model,
                "response_finish_reason": r.finish_reason}
        if raw.meta.get("score_followup") is not None:
            meta["score_followup"] = raw.meta["score_followup"]
        if rescore:
            meta["refinement_score"] = rescored[i][0].score
        critiques.append(Critique(prompt_id=i, messages=r.messages, response=r.response, feedback=p.feedback,
                                  score=p.score, refinement=p.refinement, critic=critic_name, meta=meta))
    order = {r.prompt_id: n for n, r in enumerate(responses)}
    critiques.sort(key=lambda c_: order[c_.prompt_id])
    return critiques, dropped, stats


def filter_critiques(critiques: Sequence[Critique], strict: bool) -> tuple[list[Critique], list[dict]]:
    """Keep critiques whose refinement scored at least (strict: more than) the original answer; the paper's Rule 2
    (stage 1, ≥) and the stage-2 pair rule (>, "exceed"). A critique without a refinement score is dropped."""
    kept, dropped = [], []
    for c in critiques:
        s_r = c.meta.get("refinement_score")
        if s_r is None or c.score is None:
            dropped.append({"prompt_id": c.prompt_id, "reason": "refinement_unscored"})
        elif s_r > c.score or (not strict and s_r == c.score):
            kept.append(c)
        else:
            dropped.append({"prompt_id": c.prompt_id, "reason": "not_improved" if strict else "refinement_scored_lower",
                            "score": c.score, "refinement_score": s_r})
    return kept, dropped


def preference_pairs(critiques: Sequence[Critique]) -> tuple[list[PreferencePair], list[dict]]:
    """Stage 2: (x, chosen = refinement, rejected = original) for refinements that scored strictly higher."""
    kept, dropped = filter_critiques(critiques, strict=True)
    # a y' cut off at its token budget stays the rejected answer, without loss on its end-of-turn tokens
    pairs = [PreferencePair(id=c.prompt_id, messages=c.messages, chosen=c.refinement, rejected=c.response,
                            meta={"score": c.score, "refinement_score": c.meta["refinement_score"],
                                  "rejected_unfinished": c.meta.get("response_finish_reason") == "length"})
             for c in kept]
    return pairs, dropped
