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

Sequence format (`sequence_format`, see selfalign/critique/prompts.py): `two_turn` (default) trains on both
assistant turns (`stage1_train.train_on: all`): Eq. 1 is −log P(y, f, r | x), so the response is a target too and
only the instruction and the fixed critique request are masked. `critic_template` puts x and y in one critic prompt
and trains on f + r only (`train_on: last`).

The critic is any generation backend: `critic: {backend: transformers, model: qwen2.5-coder-1.5b}` or, as in the
paper (GPT-4 Turbo), `critic: {backend: openai, model: gpt-4-1106-preview, base_url: ..., api_key_env: ...}`.
Malformed critiques are re-sampled up to `retries` times (temperature `retry_temperature`, a new seed), then dropped
and counted by reason (stage summary `dropped`). The critique machinery is the shared `selfalign.critique` package;
inference in the self-refined mode is its `self_refine(generator, prompts, params)`, and `selfalign generate
--self-refine`.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from selfalign.config import at_least
from selfalign.critique import (CritiqueConfig, SelfRefineGenerator, critique_responses, filter_critiques,
                                preference_pairs, training_conversation)
from selfalign.data import Critique, PreferencePair, Prompt, Response, read_records, write_jsonl
from selfalign.evaluation.stage import EvalConfig, eval_judge, evaluate_checkpoint, write_summary
from selfalign.generation import (Generator, SamplingParams, check_sampling_section, generate_to_file,
                                  make_generator)
from selfalign.models import DEFAULT_MODEL
from selfalign.recipes import preflight
from selfalign.recipes.common import link_final, prompt_pool, start_run, too_few_prompts
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
    processes: int = 1  # worker processes, one per GPU, each decoding batch_size sequences (generation/parallel.py)

    # the backend's other constructor options: dtype, device, max_cache_gb, trust_remote_code (local backends);
    # vllm's engine options (tensor_parallel_size, gpu_memory_utilization, ...). docs/generation.md
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        check_sampling_section(self)


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


def _read(path: Path, cls) -> list:
    """read_records, but an empty file (every critique dropped) is an empty list, not an error."""
    return read_records(path, cls) if path.exists() and path.read_text().strip() else []


# ------------------------------------------------------------------------------------------------ stages
def check_inputs(config: Config) -> None:
    """What the run needs besides its data, checked before the run folder is made (recipes/preflight.py)."""
    preflight.model("model", config.model)
    preflight.backend("sampling.backend", config.sampling.backend, options=config.sampling.options)
    c = config.critic
    preflight.generator("critic", c.backend, c.model, c.options, c.base_url, c.api_key_env)
    preflight.evaluation("eval", config.eval)


def prepare_data(config: Config) -> tuple[dict[str, list], dict]:
    """Disjoint single-turn prompt sets for stage 1 (critic) and stage 2 (self-refinement)."""
    pool = prompt_pool(config.prompts, config.prompt_sources, single_turn=True)
    seen, unique = set(), []
    for p in pool:  # stage-2 prompts must be disjoint from stage 1's (§3.7 item 5): dedupe by text
        key = " ".join(p.text.split())
        if key not in seen:
            seen.add(key)
            unique.append(p)
    random.Random(config.shuffle_seed).shuffle(unique)
    need = config.stage1_size + config.stage2_size
    if need > len(unique):
        raise too_few_prompts("stage1_size", need, len(unique), "distinct single-turn prompts",
                              also=("stage2_size",), asked="stage1_size + stage2_size")
    files = {"stage1_prompts.jsonl": unique[:config.stage1_size],
             "stage2_prompts.jsonl": unique[config.stage1_size:need]}
    return files, {"pool_single_turn_unique": len(unique), "stage1": config.stage1_size, "stage2": config.stage2_size}


def answer(config: Config, run: Run, stage: str, model: str, label: str) -> dict:

    s = config.sampling
    gen = make_generator(s.backend, model, batch_size=s.batch_size, processes=s.processes, **s.options)
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
    return make_generator(c.backend, model=c.model, batch_size=c.batch_size, processes=c.processes, **c.options)


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
    gen = make_generator(config.sampling.backend, model, batch_size=c.batch_size,  # M_self is a local model
                         processes=c.processes, **config.sampling.options)
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

    inner = make_generator(config.backend, str(model_dir), batch_size=config.batch_size, processes=config.processes,
                           **config.options)
    inner.model_name = label
    budget = critique_tokens or 2 * config.max_new_tokens + 128
    gen = SelfRefineGenerator(inner, SamplingParams(temperature=0.0, max_new_tokens=budget),
                              fmt=fmt, chunk_size=getattr(inner, "batch_size", None) or config.batch_size or 16)
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
    # a stage skipped for want of data (on_empty: skip) passes its starting model through; a trained one's folder
    # must be there (a deleted one fails its first use, rather than silently standing in the starting model)
    stage1 = run.stage("stage1/train", lambda: train_stage1(config, run))
    m_self = config.model if (stage1 or {}).get("skipped") else str(run.path("stage1", "final"))
    evaluate("stage1", m_self, refined=True)
    run.stage("stage2/generate", lambda: answer(config, run, "stage2", m_self, "stage1"))
    run.stage("stage2/critique", lambda: critique_stage2(config, run, m_self))
    stage2 = run.stage("stage2/train", lambda: train_stage2(config, run, m_self))
    m_final = m_self if (stage2 or {}).get("skipped") else str(run.path("stage2", "final"))
    evaluate("stage2", m_final, refined=True)
    if config.baseline_refinements and (stage1 or {}).get("skipped"):  # recorded: status shows why it has no model
        run.stage("baseline/train", lambda: {"skipped": "stage 1 had no valid critiques: no refinements to train on"})
    elif config.baseline_refinements:
        run.stage("baseline/train", lambda: train_baseline(config, run))
        evaluate("sft_refinements", str(run.path("baseline", "final")))
    final = link_final(run, m_final)  # a skipped stage passes the starting model through
    return {"run_dir": str(run.root), "final": str(final), "stages": run.manifest["stages"], "eval": results}
