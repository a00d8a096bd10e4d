"""SRT — Self-Refinement Tuning (Hu et al., "Teaching Language Models to Self-Improve by Learning from Language
Feedback", arXiv 2406.07168, Findings of ACL 2024; METHODS.md §3).

    selfalign run srt srt --run-dir runs/srt

    data: disjoint single-turn prompt slices X (stage 1) and X' (stage 2)           data/stage{1,2}_prompts.jsonl
    stage 1  y ~ M_base(x), T = 0.7                                                  stage1/responses.jsonl
             f, s_y, r = critic(Table-1 template(x, y)), T = 0 (bounded retries)     stage1/critique/attempt*.jsonl
             s_r = critic(template(x, r)) scored independently                       stage1/rescore/attempt*.jsonl
             keep: feedback + score + refinement parsed (Rule 1) and s_r ≥ s_y (Rule 2)
                                                                    stage1/critiques.jsonl, stage1/dropped.jsonl
             M_self = SFT(M_base, x → y → f → r), instruction masked             stage1/sft.jsonl, stage1/final
    stage 2  y' ~ M_self(x'), T = 0.7; f', s_y', r' = M_self self-critique (T = 0)  stage2/responses.jsonl, ...
             s_r' = a separate M_self critique of r' (§3.7 item 2)
             pairs (x', r' ≻ y') where s_r' > s_y' (strict)                          stage2/pairs.jsonl
             M_final = DPO(M_self, ref = M_self, β = 0.01)                           stage2/final, final
    control  SFT(M_base, x → r) on stage 1's kept critic refinements alone         baseline/final
             (the paper's "learn from the refinements only" comparison; `baseline_refinements: false` skips it)
    evaluate M_base, M_self, M_final answering directly (+ the self-refined mode)    eval/summary.md

Sequence format (`sequence_format`, see srt_prompts.py): `two_turn` (default) trains on both assistant turns
(`stage1_train.train_on: all`): Eq. 1 is −log P(y, f, r | x), so the response is a target too and only the
instruction and the fixed critique request are masked. `critic_template` puts x and y in one critic prompt and trains
on f + r only (`train_on: last`).

The critic is any generation backend: `critic: {backend: transformers, model: qwen2.5-coder-1.5b}` or, as in the
paper (GPT-4 Turbo), `critic: {backend: openai, model: gpt-4-1106-preview, base_url: ..., api_key_env: ...}`.
Malformed critiques are re-sampled up to `retries` times (temperature `retry_temperature`, a new seed), then dropped
and counted by reason (stage summary `dropped`). Inference in the self-refined mode: `self_refine(generator, prompts,
params)` and `selfalign generate --self-refine`.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal, Sequence

from selfalign.config import at_least, config_error
from selfalign.critique import (ParsedCritique, insert_score_line, parse_critique, parse_followup_score,
                                parse_score)
from selfalign.data import Critique, PreferencePair, Prompt, Response, read_records, write_jsonl
from selfalign.data.loaders import load_prompts
from selfalign.evaluation.stage import EvalConfig, eval_judge, evaluate_checkpoint, write_summary
from selfalign.generation import (Generator, SamplingParams, check_sampling_section, generate_to_file,
                                  make_generator)
from selfalign.models import DEFAULT_MODEL
from selfalign.recipes import preflight
from selfalign.recipes.common import data_file, start_run
from selfalign.recipes.srt_prompts import critique_prompt, training_conversation
from selfalign.runs import Run
from selfalign.training import DPOTrainConfig, SFTTrainConfig, train_dpo, train_sft


@dataclass
class SamplingConfig:
    temperature: float = 0.7  # SRT §4.1: Tulu2-7B answers sampled at T = 0.7 (stage 1); M_self likewise (stage 2)
    top_p: float = 1.0
    max_new_tokens: int = 1024  # [R] not stated in the paper
    seed: int = 42
    batch_size: int | None = None  # sequences decoded together; None: the backend's default (make_generator)
    backend: str = "auto"  # local generation backend: auto (lean where supported), lean, transformers, vllm

    def __post_init__(self):
        check_sampling_section(self)


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
    # [R] not in the paper (GPT-4 writes the score): a critique complete but for its "Overall Score: [[n]]" line is
    # asked for the score in one follow-up turn (greedy), and the line is put back before the improved response.
    # Small local critics skip the rating step (Qwen2.5-Coder-1.5B: 32 of 32 at T = 0, benchmarks/RESULTS.md).
    score_followup: bool = True

    def __post_init__(self):
        check_sampling_section(self)
        at_least(self, 0, "retries")
        if self.retry_temperature < 0:
            raise ValueError(f"retry_temperature must be >= 0, not {self.retry_temperature}")


@dataclass
class CriticConfig(CritiqueConfig):
    backend: Literal["auto", "lean", "transformers", "openai", "vllm"] = "auto"
    model: str = "qwen2.5-coder-1.5b"  # paper: gpt-4-1106-preview; default: the strongest local model
    base_url: str | None = None  # openai backend: an OpenAI-compatible endpoint, e.g. https://api.openai.com/v1
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the key (never written anywhere)
    options: dict = field(default_factory=dict)  # other backend constructor options (concurrency, dtype, timeout...)
    score_refinements: bool = True  # Rule 2: the critic scores r independently; keep only s_r ≥ s_y


@dataclass
class Config:
    model: str = DEFAULT_MODEL  # M_base, an SFT (instruct) model (paper: Tulu2)
    prompts: str = "prompts/unlabelled_pool.jsonl"
    prompt_sources: list[str] = field(default_factory=list)  # keep only these `source` values (empty: all)
    stage1_size: int = 25000  # paper: 25K Tulu-2 instructions (22K valid after filtering)
    stage2_size: int = 75000  # paper: 75K other instructions (63K pairs)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    self_critique: CritiqueConfig = field(default_factory=lambda: CritiqueConfig(max_new_tokens=2048))  # M_self
    sequence_format: Literal["two_turn", "critic_template"] = "two_turn"  # METHODS §3.3 / §3.7 item 1
    stage1_train: SFTTrainConfig = field(default_factory=lambda: SFTTrainConfig(
        train_on="all", epochs=5, learning_rate=1e-5, batch_size=4, grad_accum=8, max_length=8192,
        max_prompt_length=4096, warmup_ratio=0.1))  # paper: 5 epochs, batch 32, lr 1e-5 cosine, 10% warm-up, 8192
    stage2_train: DPOTrainConfig = field(default_factory=lambda: DPOTrainConfig(
        beta=0.01, epochs=1, learning_rate=5e-7, batch_size=4, grad_accum=8, warmup_ratio=0.1))  # paper: β 0.01
    baseline_refinements: bool = True  # the control: SFT(M_base, x → r) on the critic's refinements alone, with
    # stage1_train's settings and the instruction masked; evaluated as sft_refinements
    eval: EvalConfig = field(default_factory=EvalConfig)
    eval_self_refined: bool = True  # also evaluate M_self / M_final in the self-refined mode (the paper's outputs)
    eval_critique_max_new_tokens: int = 0  # self-refined eval: critique budget (0: 2 × eval.max_new_tokens + 128)
    scaled: dict = field(default_factory=dict)  # field -> the paper's value, for every constant a config scales
    # (recorded in the run manifest so that nobody mistakes a scaled run for a replication, METHODS §7)
    on_empty: Literal["error", "skip"] = "error"  # a stage with no valid training data: fail, or pass the model
    # through unchanged and record `skipped` (smoke runs whose tiny critic writes no parseable critique)
    shuffle_seed: int = 42

    def __post_init__(self):
        at_least(self, 1, "stage1_size", "stage2_size")
        at_least(self, 0, "eval_critique_max_new_tokens")


# ------------------------------------------------------------------------------------------------ critique parsing
RESCORE_STOP = "### Improved Response"  # the heading after the score line in the Table-1 format
SCORE_FOLLOWUP = ('Conclude your feedback with your rating of the original response from 1 to 10 (1 is the worst, '
                  '10 the best), written exactly as "Overall Score: [[n]]".')
def _read(path: Path, cls) -> list:
    """read_records, but an empty file (every critique dropped) is an empty list, not an error."""
    return read_records(path, cls) if path.exists() and path.read_text().strip() else []


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


# ------------------------------------------------------------------------------------------------ inference
class SelfRefineGenerator(Generator):
    """Answer → self-critique → refined answer, as one generator (SRT inference, §4.1: one greedy pass).

    The response record holds the refinement; `meta` holds the original answer, the critique, its score and the
    parse status. A critique that does not parse leaves the original answer (meta.refine_status = the reason)."""

    def __init__(self, inner: Generator, critique_params: SamplingParams | None = None, fmt: str = "two_turn",
                 chunk_size: int = 16):
        self.inner, self.critique_params, self.fmt, self.chunk_size = inner, critique_params, fmt, chunk_size
        self.model_name = f"{inner.model_name}+self-refine"

    def generate(self, prompts, params, on_batch=None, skip=None, progress=True):
        skip = skip or set()
        cparams = self.critique_params or SamplingParams(temperature=0.0, max_new_tokens=2 * params.max_new_tokens
                                                         + 128, seed=params.seed)
        cparams = replace(cparams, n=1)
        todo = [p for p in prompts if any((p.id, s) not in skip for s in range(params.n))]
        results = []
        for start in range(0, len(todo), self.chunk_size):
            answers = [a for a in self.inner.generate(todo[start:start + self.chunk_size], params, progress=False)
                       if a.key not in skip]
            cps = [critique_prompt(str(k), a.messages, a.response, self.fmt) for k, a in enumerate(answers)]
            crits = {c.prompt_id: c for c in self.inner.generate(cps, cparams, progress=False)} if cps else {}
            batch = []
            for k, a in enumerate(answers):
                c = crits[str(k)]
                parsed = parse_critique(c.response, a.response)  # a truncated refinement is still used here
                refined = parsed.refinement if parsed.ok else a.response
                sampling = dict(a.sampling, self_refine=dict(cparams.to_dict(), format=self.fmt))
                batch.append(Response(prompt_id=a.prompt_id, messages=a.messages, response=refined,
                                      model=self.model_name, sample_index=a.sample_index, sampling=sampling,
                                      finish_reason=c.finish_reason if parsed.ok else a.finish_reason,
                                      num_tokens=(a.num_tokens or 0) + (c.num_tokens or 0),
                                      meta={"original": a.response, "critique": c.response, "score": parsed.score,
                                            "refine_status": parsed.reason or "refined",
                                            "original_finish_reason": a.finish_reason}))
            results.extend(batch)
            if on_batch is not None:
                on_batch(batch)
        return results

    def close(self) -> None:
        self.inner.close()


def self_refine(generator: Generator, prompts: Sequence[Prompt], params: SamplingParams,
                critique_params: SamplingParams | None = None, fmt: str = "two_turn") -> list[Response]:
    """Answer each prompt, have the same model critique and refine its answer, return the refined answers (the
    original and the critique in `meta`). Resumable into a file with `generate_to_file(SelfRefineGenerator(...))`."""
    return SelfRefineGenerator(generator, critique_params, fmt).generate(list(prompts), params)


# ------------------------------------------------------------------------------------------------ stages
def check_inputs(config: Config) -> None:
    """What the run needs besides its data, checked before the run folder is made (recipes/preflight.py)."""
    preflight.model("model", config.model)
    preflight.backend("sampling.backend", config.sampling.backend)
    c = config.critic
    preflight.generator("critic", c.backend, c.model, c.options, c.base_url, c.api_key_env)
    preflight.evaluation("eval", config.eval)


def prepare_data(config: Config) -> tuple[dict[str, list], dict]:
    """Disjoint single-turn prompt sets for stage 1 (critic) and stage 2 (self-refinement)."""
    pool = [p for p in load_prompts(data_file(config.prompts, "prompts"))
            if len(p.messages) == 1 and (not config.prompt_sources or p.meta.get("source") in config.prompt_sources)]
    seen, unique = set(), []
    for p in pool:  # stage-2 prompts must be disjoint from stage 1's (§3.7 item 5): dedupe by text
        key = " ".join(p.text.split())
        if key not in seen:
            seen.add(key)
            unique.append(p)
    random.Random(config.shuffle_seed).shuffle(unique)
    need = config.stage1_size + config.stage2_size
    if need > len(unique):
        raise config_error("stage2_size", f"stage1_size + stage2_size = {need} prompts; only {len(unique)} "
                           "single-turn are available")
    files = {"stage1_prompts.jsonl": unique[:config.stage1_size],
             "stage2_prompts.jsonl": unique[config.stage1_size:need]}
    return files, {"pool_single_turn_unique": len(unique), "stage1": config.stage1_size, "stage2": config.stage2_size}


def answer(config: Config, run: Run, stage: str, model: str, label: str) -> dict:

    s = config.sampling
    gen = make_generator(s.backend, model, batch_size=s.batch_size)
    gen.model_name = label
    params = SamplingParams(temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                            seed=s.seed + int(stage[-1]))
    out = generate_to_file(gen, read_records(run.path("data", f"{stage}_prompts.jsonl"), Prompt), params,
                           run.path(stage, "responses.jsonl"))
    gen.close()
    return {"responses": len(out), "truncated": sum(r.finish_reason == "length" for r in out)}


def make_critic(c: CriticConfig) -> Generator:
    if c.backend == "openai":
        return make_generator("openai", model=c.model, base_url=c.base_url, api_key_env=c.api_key_env, **c.options)
    return make_generator(c.backend, model=c.model, batch_size=c.batch_size, **c.options)


def _histogram(scores) -> dict[str, int]:
    """score -> count, in score order (integer scores print without '.0'); None scores are left out."""
    counts = Counter(int(x) if float(x).is_integer() else x for x in scores if x is not None)
    return {str(k): counts[k] for k in sorted(counts)}


def _summary(critiques: list[Critique], kept: list, dropped: list[dict], stats: dict) -> dict:
    reasons = Counter(d["reason"] for d in dropped)
    n = stats["responses"]
    mean = lambda xs: round(sum(xs) / len(xs), 3) if xs else None  # noqa: E731
    return {**stats, "parsed": len(critiques), "kept": len(kept), "dropped": dict(reasons),
            "dropped_total": len(dropped), "drop_rate": round(len(dropped) / max(1, n), 4),
            "mean_score": mean([c.score for c in critiques]),
            "score_distribution": _histogram([c.score for c in critiques]),
            "refinement_score_distribution": _histogram([c.meta.get("refinement_score") for c in critiques]),
            "mean_refinement_score": mean([c.meta["refinement_score"] for c in critiques
                                           if c.meta.get("refinement_score") is not None])}


def critique_stage1(config: Config, run: Run) -> dict:
    c = config.critic
    gen = make_critic(c)
    responses = read_records(run.path("stage1", "responses.jsonl"), Response)
    name = f"{c.backend}:{c.model}"
    # the external critic always gets the Table-1 prompt, whatever format the policy is trained on
    critiques, dropped, stats = critique_responses(gen, responses, "critic_template", c, run.path("stage1"), name,
                                                   rescore=c.score_refinements)
    gen.close()
    if c.score_refinements:
        kept, more = filter_critiques(critiques, strict=False)  # Rule 2: s_r ≥ s_y
    else:
        kept, more = critiques, []
    write_jsonl(run.path("stage1", "critiques.jsonl"), kept)
    write_jsonl(run.path("stage1", "dropped.jsonl"), dropped + more)
    return _summary(critiques, kept, dropped + more, stats)


def train_stage1(config: Config, run: Run) -> dict:
    critiques = _read(run.path("stage1", "critiques.jsonl"), Critique)
    if not critiques:
        if config.on_empty == "skip":
            return {"skipped": "no valid critiques: M_self = M_base", "examples": 0}
        from selfalign.errors import SelfalignError

        raise SelfalignError(f"stage 1: no valid critiques to train on (see {run.path('stage1', 'dropped.jsonl')} "
                             "and the stage1/critique summary in manifest.json)")
    convs = [training_conversation(c.prompt_id, c.messages, c.response, c.feedback, c.refinement,
                                   config.sequence_format, score=c.score,
                                   response_unfinished=c.meta.get("response_finish_reason") == "length")
             for c in critiques]
    write_jsonl(run.path("stage1", "sft.jsonl"), convs)
    summary = train_sft(config.model, convs, config.stage1_train, run.path("stage1", "train"),
                        run.path("stage1", "final"))
    return {**summary, "examples": len(convs), "sequence_format": config.sequence_format,
            "train_on": config.stage1_train.train_on,
            "unfinished_responses": sum(bool(c.meta.get("unfinished_turns")) for c in convs)}


def train_baseline(config: Config, run: Run) -> dict:
    """The control: SFT of M_base on (x → r) for the same kept stage-1 critiques, without the answer and the feedback.
    What M_self gains over it (answering directly) is what learning the critique-and-refine format adds."""
    from selfalign.data import Conversation
    from selfalign.errors import SelfalignError

    critiques = [c for c in _read(run.path("stage1", "critiques.jsonl"), Critique) if (c.refinement or "").strip()]
    if not critiques:
        raise SelfalignError(f"baseline: stage 1 kept no critic refinement to train on (see "
                             f"{run.path('stage1', 'dropped.jsonl')})")
    convs = [Conversation(f"{c.prompt_id}", c.messages + [{"role": "assistant", "content": c.refinement}],
                          {"origin": "critic_refinement"}) for c in critiques]
    write_jsonl(run.path("baseline", "sft.jsonl"), convs)
    train_config = replace(config.stage1_train, train_on="last")  # same schedule as stage 1; instruction masked
    summary = train_sft(config.model, convs, train_config, run.path("baseline", "train"), run.path("baseline", "final"))
    return {**summary, "init": config.model, "examples": len(convs)}


def critique_stage2(config: Config, run: Run, model: str) -> dict:

    c = config.self_critique
    gen = make_generator(config.sampling.backend, model, batch_size=c.batch_size)  # M_self is a local model
    gen.model_name = "stage1"
    responses = read_records(run.path("stage2", "responses.jsonl"), Response)
    critiques, dropped, stats = critique_responses(gen, responses, config.sequence_format, c, run.path("stage2"),
                                                   "self:stage1", rescore=True)
    gen.close()
    pairs, more = preference_pairs(critiques)
    write_jsonl(run.path("stage2", "critiques.jsonl"), critiques)
    write_jsonl(run.path("stage2", "pairs.jsonl"), pairs)
    write_jsonl(run.path("stage2", "dropped.jsonl"), dropped + more)
    return {**_summary(critiques, pairs, dropped + more, stats), "pairs": len(pairs)}


def train_stage2(config: Config, run: Run, model: str) -> dict:
    pairs = _read(run.path("stage2", "pairs.jsonl"), PreferencePair)
    if not pairs:
        if config.on_empty == "skip":
            return {"skipped": "no score-improving refinement: M_final = M_self", "pairs": 0}
        from selfalign.errors import SelfalignError

        raise SelfalignError("stage 2: no refinement scored higher than its answer; no DPO pairs (see "
                             f"{run.path('stage2', 'dropped.jsonl')})")
    # init = reference = M_self: train_dpo's default reference is the starting model
    return {**train_dpo(model, pairs, config.stage2_train, run.path("stage2", "train"), run.path("stage2", "final")),
            "pairs": len(pairs), "beta": config.stage2_train.beta,
            "unfinished_rejected": sum(bool(p.meta.get("rejected_unfinished")) for p in pairs)}


def evaluate_self_refined(model_dir: str, label: str, config: EvalConfig, eval_root: Path, fmt: str,
                          critique_tokens: int = 0) -> dict:
    """The evaluation stage's AlpacaEval-style metrics for the self-refined outputs (answer → critique → refine)."""
    from selfalign.evaluation.alpaca import evaluate_alpaca

    inner = make_generator(config.backend, str(model_dir), batch_size=config.batch_size)
    inner.model_name = label
    budget = critique_tokens or 2 * config.max_new_tokens + 128
    gen = SelfRefineGenerator(inner, SamplingParams(temperature=0.0, max_new_tokens=budget),
                              fmt=fmt, chunk_size=config.batch_size or getattr(inner, "batch_size", 16))
    gen.model_name = label
    params = SamplingParams(temperature=0.0, max_new_tokens=config.max_new_tokens)
    metrics = evaluate_alpaca(gen, eval_judge(config, eval_root), eval_root / label, limit=config.instructions,
                              seed=config.seed, params=params)
    gen.close()
    rows = read_records(eval_root / label / "responses.jsonl", Response)
    out = {k: metrics.get(k) for k in ("win_rate", "standard_error", "length_controlled_winrate", "n_total",
                                       "n_unparsed", "position_consistency", "avg_length", "annotator")}
    out["refined"] = sum(r.meta.get("refine_status") == "refined" for r in rows)
    return out


# ------------------------------------------------------------------------------------------------ pipeline
def run(config: Config, run_dir: str) -> dict:
    run = start_run(run_dir, config, "srt", config.stage1_train.seed, check_inputs, prepare_data)
    results: dict[str, dict] = {}

    def summary_title() -> str:
        return (f"SRT run {run.root.name}: AlpacaEval-style, {config.eval.instructions} instructions "
                f"(seed {config.eval.seed}), judge {config.eval.judge}; '+self-refine' rows: answer → self-critique "
                "→ refinement")

    def evaluate(label: str, model: str, refined: bool = False) -> None:
        if not config.eval.instructions:
            return
        results[label] = run.stage(f"eval/{label}", lambda: evaluate_checkpoint(model, label, config.eval,
                                                                              run.path("eval")))
        write_summary(run.path("eval"), results, summary_title())
        if refined and config.eval_self_refined:
            name = f"{label}+self-refine"
            results[name] = run.stage(f"eval/{name}", lambda: evaluate_self_refined(
                model, name, config.eval, run.path("eval"), config.sequence_format,
                config.eval_critique_max_new_tokens))
            write_summary(run.path("eval"), results, summary_title())

    evaluate("base", config.model)
    run.stage("stage1/generate", lambda: answer(config, run, "stage1", config.model, "base"))
    run.stage("stage1/critique", lambda: critique_stage1(config, run))
    run.stage("stage1/train", lambda: train_stage1(config, run))
    m_self = str(run.path("stage1", "final")) if (run.root / "stage1" / "final").exists() else config.model
    evaluate("stage1", m_self, refined=True)
    run.stage("stage2/generate", lambda: answer(config, run, "stage2", m_self, "stage1"))
    run.stage("stage2/critique", lambda: critique_stage2(config, run, m_self))
    run.stage("stage2/train", lambda: train_stage2(config, run, m_self))
    m_final = str(run.path("stage2", "final")) if (run.root / "stage2" / "final").exists() else m_self
    evaluate("stage2", m_final, refined=True)
    if config.baseline_refinements and (run.root / "stage1" / "final").exists():
        run.stage("baseline/train", lambda: train_baseline(config, run))
        evaluate("sft_refinements", str(run.path("baseline", "final")))
    final = run.root / "final"
    if not final.exists() and not os.path.islink(final):
        from selfalign.models import resolve_model

        inside = Path(m_final).is_relative_to(run.root)  # a skipped stage passes the starting model through
        os.symlink(os.path.relpath(m_final, run.root) if inside else str(resolve_model(m_final)), final)
    run.record_model("final", final)
    return {"run_dir": str(run.root), "final": str(final), "stages": run.manifest["stages"], "eval": results}
