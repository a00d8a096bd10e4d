"""SPA — Spread Preference Annotation (Kim et al., arXiv 2406.04412, ICLR 2025; METHODS.md §2).

    selfalign run spa spa --run-dir runs/spa

    π_0 = DPO(π_init, seed pairs)                                          round 0
    for i in 1..R (R rounds: fresh, disjoint prompt slices X_i):
        y1, y2 ~ π_{i-1}(·|x)                          T = 0.7                  round{i}/generations.jsonl
        label by r(y) = log π_{i-1}(y|x) − log π_init(y|x)                     round{i}/labels.jsonl
        π_i = DPO(init = ref = π_{i-1}, noise-aware loss with λ_i)              round{i}/final, noisy.jsonl
    evaluate π_init, π_0, ..., π_R (AlpacaEval-style, seeded subset)             eval/summary.md

Paper vs official code (the paper is the default; the code's behaviour is one config line):
- iterations: paper 3 (`round_sizes` has three entries); code loops 2 (`round_sizes: [8000, 20000]`);
- de-coupled noise detection: paper λ = 1/2, 1/4, 1/8 (`lambdas`); the released code leaves it off
  (`decoupled_noise_detection: false`, confidence from the policy itself).
Ablations, one line each: `self_refinement.enabled: false` (no smoothing), `decoupled_noise_detection: false`,
`judge_reference: previous` (judge against the previous round's reference instead of π_init), `labeler: local`
(or any judge name: an external judge instead of the implicit reward).
Not in either: identical sample pairs (both answers the same text) carry no preference and are dropped and counted;
`drop_truncated: true` also leaves answers cut at max_new_tokens out of the pairs (both sources keep them).
More than 2 samples per prompt: the best is chosen, the worst (`rejected: min_max`) or a random other (`max_chosen`)
rejected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from selfalign.config import at_least, config_error
from selfalign.data import PreferencePair, Prompt, read_records, write_jsonl
from selfalign.evaluation.stage import EvalConfig, evaluate_checkpoint, write_summary
from selfalign.generation import SamplingParams, check_sampling_section, generate_to_file, make_generator
from selfalign.models import DEFAULT_MODEL
from selfalign.recipes import preflight
from selfalign.recipes.common import link_final, load_pairs, prompt_pool, start_run, too_few_prompts
from selfalign.runs import Run
from selfalign.training import DPOTrainConfig, train_dpo
from selfalign.training.implicit_reward import label_samples_by_implicit_reward
from selfalign.training.noise import SelfRefinementHook


@dataclass
class SamplingConfig:
    temperature: float = 0.7  # SPA code: vLLM, T = 0.7, top_p = 1.0, 300 new tokens
    top_p: float = 1.0
    max_new_tokens: int = 300
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
class SelfRefinementConfig:
    enabled: bool = True
    alpha: float = 0.1  # smoothing strength on flagged pairs (soft label 0.9)
    noisy_fraction: float = 0.1  # the paper's K%: the lowest-confidence 10% of the window are flagged
    window: int = 50  # how many of the latest confidences set the flagging threshold (paper: 50)
    warmup_fraction: float = 0.2  # no smoothing during this fraction of each round's first steps (paper: 0.2)

    def __post_init__(self):
        for name in ("alpha", "noisy_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], not {getattr(self, name)}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), not {self.warmup_fraction}")
        at_least(self, 1, "window")


@dataclass
class Config:
    model: str = DEFAULT_MODEL  # π_init, an SFT (instruct) model
    seed_data: str = "preferences/ultrafeedback_binarized_train_1k.jsonl"  # the small labelled seed
    seed_limit: int | None = 2000  # paper: 2K pairs (3.3% of UltraFeedback); the shipped seed file holds 1,000
    prompts: str = "prompts/unlabelled_pool.jsonl"  # unlabelled prompts; the seed's prompts are excluded
    prompt_sources: list[str] = field(default_factory=list)  # keep only these `source` values (empty: all)
    round_sizes: list[int] = field(default_factory=lambda: [8000, 20000, 30000])  # disjoint prompt slices
    samples_per_prompt: int = 2  # with more than 2 the best answer is chosen and `rejected` picks the other one
    rejected: Literal["min_max", "max_chosen"] = "min_max"  # the worst answer (code default) or a random non-best
    drop_truncated: bool = False  # true: answers cut at max_new_tokens take no part in pairs (paper/code keep them)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    labeler: str = "implicit"  # or a judge name (length, local, reward, api): external-judge ablation
    labeler_options: dict = field(default_factory=dict)
    judge_reference: Literal["init", "previous"] = "init"  # π_init (paper Eq. 7) or the previous round's reference
    self_refinement: SelfRefinementConfig = field(default_factory=SelfRefinementConfig)
    decoupled_noise_detection: bool = True
    lambdas: list[float] = field(default_factory=lambda: [0.5, 0.25, 0.125])  # λ per round (last one repeats)

    # the SPA code's DPO: lr 5e-7 cosine, 10% warm-up, global batch 32, lengths 2048 / 1024; seed 3 epochs, rounds 1
    seed_train: DPOTrainConfig = field(default_factory=lambda: DPOTrainConfig(
        epochs=3, batch_size=4, grad_accum=8, max_length=2048, max_prompt_length=1024))
    round_train: DPOTrainConfig = field(default_factory=lambda: DPOTrainConfig(
        epochs=1, batch_size=4, grad_accum=8, max_length=2048, max_prompt_length=1024))
    eval: EvalConfig = field(default_factory=EvalConfig)
    shuffle_seed: int = 42  # SPA's make_data_split shuffles with seed 42

    def __post_init__(self):
        at_least(self, 1, "seed_limit")
        at_least(self, 2, "samples_per_prompt")  # a preference pair needs two answers
        if not self.round_sizes or min(self.round_sizes) < 1:
            raise ValueError(f"round_sizes must list at least one round, each of >= 1 prompts, not {self.round_sizes}")
        if not self.lambdas or min(self.lambdas) <= 0:
            raise ValueError(f"lambdas must list at least one weight, each > 0, not {self.lambdas}")


# ------------------------------------------------------------------------------------------------ stages
def check_inputs(config: Config) -> None:
    """What the run needs besides its data, checked before the run folder is made (recipes/preflight.py)."""
    if config.samples_per_prompt > 2 and config.labeler != "implicit":
        raise config_error("samples_per_prompt", f"{config.samples_per_prompt} needs labeler: implicit (a pairwise "
                           f"judge '{config.labeler}' labels 2 answers per prompt)")
    preflight.model("model", config.model)
    preflight.backend("sampling.backend", config.sampling.backend, options=config.sampling.options)
    if config.labeler != "implicit":
        preflight.judge("labeler", config.labeler, config.labeler_options)
    preflight.evaluation("eval", config.eval)


def prepare_data(config: Config) -> tuple[dict[str, list], dict]:
    """The labelled seed, and disjoint slices of the unlabelled prompts (none of the seed's) for the rounds."""
    seed, seed_counts = load_pairs(config.seed_data, "seed_data", config.seed_limit, "seed_limit",
                                   need=("chosen", "rejected"))
    seed_texts = {p.prompt.strip() for p in seed}
    pool = prompt_pool(config.prompts, config.prompt_sources, exclude=seed_texts)
    import random

    random.Random(config.shuffle_seed).shuffle(pool)
    if sum(config.round_sizes) > len(pool):
        raise too_few_prompts("round_sizes", sum(config.round_sizes), len(pool), "prompts not in the seed",
                              also=("seed_limit", "seed_data"), asked="the sum of round_sizes")
    files, start = {"seed.jsonl": seed}, 0
    for i, size in enumerate(config.round_sizes, start=1):
        files[f"round{i}_prompts.jsonl"] = pool[start:start + size]
        start += size
    return files, {"seed_pairs": len(seed), "seed_data": seed_counts, "pool": len(pool),
                   "round_sizes": config.round_sizes}


def generate(config: Config, run: Run, i: int, policy: str) -> dict:

    prompts = read_records(run.path("data", f"round{i}_prompts.jsonl"), Prompt)
    s = config.sampling
    gen = make_generator(s.backend, policy, batch_size=s.batch_size, processes=s.processes, **s.options)
    gen.model_name = f"round{i - 1}"
    params = SamplingParams(temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                            n=config.samples_per_prompt, seed=s.seed + i)
    out = generate_to_file(gen, prompts, params, run.path(f"round{i}", "generations.jsonl"))
    gen.close()  # frees a KV cache kept between calls before the labelling and training stages
    return {"responses": len(out), "truncated": sum(r.finish_reason == "length" for r in out)}


def candidate_groups(config: Config, run: Run, i: int) -> tuple[list[tuple[str, list[dict], list[str]]],
                                                                list[set[int]], dict]:
    """Per prompt, its distinct sampled answers in sample order (id, messages, answers); per prompt, the indices of
    those answers that were cut off at max_new_tokens; and what was left out: prompts whose answers were all the
    same text carry no preference; with `drop_truncated`, answers that hit max_new_tokens are removed first."""
    from selfalign.data import Response

    by_prompt: dict[str, list[Response]] = {}
    for r in read_records(run.path(f"round{i}", "generations.jsonl"), Response):
        by_prompt.setdefault(r.prompt_id, []).append(r)
    groups, unfinished, dropped = [], [], {"identical_dropped": 0, "truncated_dropped": 0, "too_few_left": 0}
    for pid, rs in by_prompt.items():
        rs = sorted(rs, key=lambda r: r.sample_index)
        if config.drop_truncated:
            kept = [r for r in rs if r.finish_reason != "length"]
            dropped["truncated_dropped"] += len(rs) - len(kept)
            if len(kept) < 2 <= len(rs):
                dropped["too_few_left"] += 1
            rs = kept
        answers: list[str] = []
        cut: set[int] = set()
        for r in rs:
            if r.response.strip() not in {a.strip() for a in answers}:
                if r.finish_reason == "length":
                    cut.add(len(answers))
                answers.append(r.response)
        if len(answers) >= 2:
            groups.append((pid, rs[0].messages, answers))
            unfinished.append(cut)
        elif len(rs) >= 2:
            dropped["identical_dropped"] += 1
    return groups, unfinished, dropped


def label(config: Config, run: Run, i: int, policy: str, judge_ref: str) -> dict:
    groups, unfinished, dropped = candidate_groups(config, run, i)
    t = config.round_train
    if config.labeler == "implicit":
        labelled = label_samples_by_implicit_reward(groups, policy, judge_ref, t.beta, config.rejected,
                                                    config.shuffle_seed, t.max_length, t.max_prompt_length,
                                                    t.reference_batch_size,
                                                    cache_dir=run.path(f"round{i}", "label_cache"),
                                                    unfinished=unfinished)
    else:
        labelled = label_by_judge(config, run, [
            PreferencePair(pid, m, a[0], a[1], {"chosen_unfinished": 0 in cut, "rejected_unfinished": 1 in cut})
            for (pid, m, a), cut in zip(groups, unfinished)])
    write_jsonl(run.path(f"round{i}", "labels.jsonl"), labelled)
    conf = [p.meta["confidence"] for p in labelled]
    return {"pairs": len(labelled), **dropped, "labeler": config.labeler,
            "judge_reference": judge_ref if config.labeler == "implicit" else None,
            "mean_confidence": sum(conf) / max(1, len(conf)),
            "swapped": sum(bool(p.meta.get("swapped")) for p in labelled),
            # cut-off answers stay in (as in the SPA code) but are trained without the end-of-turn token they lack
            "unfinished_chosen": sum(bool(p.meta.get("chosen_unfinished")) for p in labelled),
            "unfinished_rejected": sum(bool(p.meta.get("rejected_unfinished")) for p in labelled)}


def label_by_judge(config: Config, run: Run, pairs: list[PreferencePair]) -> list[PreferencePair]:
    from selfalign.judges import make_judge
    from selfalign.judges.base import PairwiseItem

    judge = make_judge(config.labeler, cache=str(run.path("label_judge_cache.jsonl")), **config.labeler_options)
    verdicts = judge.compare([PairwiseItem(p.messages, p.chosen, p.rejected) for p in pairs])
    out = []
    for p, v in zip(pairs, verdicts):
        first = v.p_a >= 0.5
        cut = (p.meta.get("chosen_unfinished", False), p.meta.get("rejected_unfinished", False))
        if not first:
            cut = cut[::-1]
        out.append(PreferencePair(p.id, p.messages, p.chosen if first else p.rejected, p.rejected if first else p.chosen,
                                  dict(p.meta, confidence=max(v.p_a, 1 - v.p_a), swapped=not first,
                                       chosen_unfinished=cut[0], rejected_unfinished=cut[1])))
    return out


def train_round(config: Config, run: Run, i: int, policy: str) -> dict:
    sr = config.self_refinement
    hook = SelfRefinementHook(sr.alpha, sr.noisy_fraction, sr.window, sr.warmup_fraction, sr.enabled,
                              log_path=run.path(f"round{i}", "noisy.jsonl"))
    lam = None
    if config.decoupled_noise_detection:
        lam = config.lambdas[min(i - 1, len(config.lambdas) - 1)]
    pairs = read_records(run.path(f"round{i}", "labels.jsonl"), PreferencePair)
    # init = reference = π_{i-1}: train_dpo's default reference is the starting model itself
    summary = train_dpo(policy, pairs, config.round_train, run.path(f"round{i}", "train"),
                        run.path(f"round{i}", "final"), noise_hook=hook, extrapolation_lambda=lam)
    noisy = run.path(f"round{i}", "noisy.jsonl")
    flagged = len(noisy.read_text().splitlines()) if noisy.exists() else 0
    return {**summary, "lambda": lam, "flagged_noisy": flagged}


# ------------------------------------------------------------------------------------------------ pipeline
def run(config: Config, run_dir: str) -> dict:
    run = start_run(run_dir, config, "spa", config.round_train.seed, check_inputs, prepare_data)
    results: dict[str, dict] = {}

    def evaluate(label: str, model: str) -> None:  # after every round, collected into one table per run
        if config.eval.instructions:
            results[label] = run.stage(f"eval/{label}", lambda: evaluate_checkpoint(model, label, config.eval,
                                                                                  run.path("eval")))
            write_summary(run.path("eval"), results, f"SPA run {run.root.name}: AlpacaEval-style, "
                          f"{config.eval.instructions} instructions (seed {config.eval.seed}), judge {config.eval.judge}")

    init = config.model
    evaluate("initial", init)
    run.stage("round0/train", lambda: train_dpo(init, read_records(run.path("data", "seed.jsonl"), PreferencePair),
                                                config.seed_train, run.path("round0", "train"),
                                                run.path("round0", "final")))
    evaluate("round0", str(run.path("round0", "final")))
    references = [init]  # references[k] = the DPO reference that π_k was trained against
    for i in range(1, len(config.round_sizes) + 1):
        policy = str(run.path(f"round{i - 1}", "final"))
        judge_ref = init if config.judge_reference == "init" else references[-1]
        run.stage(f"round{i}/generate", lambda: generate(config, run, i, policy))
        run.stage(f"round{i}/label", lambda: label(config, run, i, policy, judge_ref))
        run.stage(f"round{i}/train", lambda: train_round(config, run, i, policy))
        references.append(policy)
        evaluate(f"round{i}", str(run.path(f"round{i}", "final")))
    final = link_final(run, run.root / f"round{len(config.round_sizes)}" / "final")  # the name every recipe uses
    return {"run_dir": str(run.root), "final": str(final), "stages": run.manifest["stages"], "eval": results}
