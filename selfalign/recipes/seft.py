"""SEFT — Self-Evolution Fine-Tuning (Chen et al., arXiv 2406.10813, Findings of EMNLP 2024; METHODS.md §4).

    selfalign run seft seft --run-dir runs/seft

    labels: (x, chosen) -> NONE; (x, rejected) -> MINOR | MAJOR by `reviser.label_rule`     reviser/labels.jsonl
    R̂ = SFT(M, {(x, y_l) -> y_h})                              warm-up (verified outline)      reviser/warmup/final
    R  = SFT(R̂, {(x, y) -> "[TAG]\\n" + target})               adaptive reviser [R]            reviser/final
    for t in 1..T (fresh, disjoint prompt slices X_t):
        y  ~ π_{t-1}(·|x)                                       T = 0.7                         round{t}/generations.jsonl
        ŷ  = R(x, y), greedy; ŷ = y verbatim on [NO REVISION]   (+ external answers, optional)  round{t}/revisions.jsonl
        π_t = SFT(π_{t-1}, {(x, ŷ)}), prompt masked                                             round{t}/final
    evaluate π_0, π_1, ..., π_T (AlpacaEval-style, seeded subset)                               eval/summary.md
  evidence (not SEFT; issue #7):
    R on held-out pairs: revise rejected (judged vs original), keep chosen verbatim?            reviser/quality.md
    control: SFT(π_0, round 1's unrevised answers), evaluated as sft_unrevised                 baseline/final

Verified ([SEFT-A], [SEFT-3P]): a reviser warmed up by SFT on (x, y_l) -> y_h from preference data; the reviser
keeps good responses unchanged and revises the rest; the policy is optimised only by SFT on revised responses of
unannotated prompts (no RL, no preference loss); internal then external evolution.
Everything else is a reconstruction [R] and a config key here (docs/recipes/seft.md lists each with its default):
the tag set and prompt, the minor/major labelling rule (only pairs exist in shared/data: the rejected answer's gap
to the chosen one by word edit distance, split at the median), the adaptive reviser's init (the warm-up reviser),
the [NO REVISION] target (a copy of the response), the tag fallback (keep the response), the policy's init per round
(the previous round), and what external evolution revises (answers of held-out preference pairs).
"""

from __future__ import annotations

import functools
import json
import random
import sys
from dataclasses import dataclass, field
from typing import Literal

from selfalign.config import at_least, config_error
from selfalign.data import Conversation, PreferencePair, Prompt, Response, Revision, read_records, write_jsonl
from selfalign.data.loaders import load_preference_pairs
from selfalign.errors import ConfigError
from selfalign.evaluation.stage import EvalConfig, evaluate_checkpoint, write_summary
from selfalign.generation import (SamplingParams, check_generator_section, check_sampling_section, generate_to_file,
                                  make_generator)
from selfalign.models import DEFAULT_MODEL
from selfalign.recipes import preflight
from selfalign.recipes.common import data_file, link_final, prompt_pool, start_run, too_few_prompts
from selfalign.runs import Run
from selfalign.training import SFTTrainConfig, train_sft


@dataclass
class SamplingConfig:
    temperature: float = 0.7  # METHODS §4.2 / §7: the policy samples at T = 0.7, top_p 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
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
class ReviserConfig:
    model: str = DEFAULT_MODEL  # the base LLM M the reviser is initialised from
    data: str = "preferences/ultrafeedback_binarized_train_1k.jsonl"  # D_r: (x, y_h = chosen, y_l = rejected)
    limit: int | None = None  # pairs used (after filtering; shuffled with shuffle_seed)
    max_pair_tokens: int | None = None  # keep pairs whose prompt + chosen + rejected fit (scaled: CPU lengths)
    warmup: bool = True  # R̂: SFT (x, y_l) -> y_h before the adaptive stage
    warmup_template: str = "warmup_prompt.txt"  # [R] selfalign/resources/seft/ or a path
    adaptive_template: str = "adaptive_prompt.txt"  # [R]
    adaptive_init: Literal["warmup", "base"] = "warmup"  # [R] R = SFT(R̂, ...) or SFT(M, ...)
    label_rule: Literal["edit_distance", "length_ratio", "judge", "rank", "rating"] = "edit_distance"  # [R]
    minor_max: float | None = None  # [R] absolute gap threshold for MINOR (rank rule: 3, i.e. ranks 2-3)
    minor_quantile: float = 0.5  # [R] without minor_max: MINOR = gap <= this quantile of the gaps
    label_judge: str = "length"  # the judge for label_rule 'judge'
    label_judge_options: dict = field(default_factory=dict)
    no_revision_target: Literal["copy", "tag_only"] = "copy"  # [R] NONE target: tag + the response copied
    tag_fallback: Literal["none", "minor", "major", "drop"] = "none"  # [R] decision for a missing/garbled tag
    max_new_tokens: int | None = None  # [R] None: the policy's sampling.max_new_tokens
    batch_size: int | None = None  # generation batch; None: the backend's default
    backend: str = "auto"  # local generation backend: auto (lean where supported), lean, transformers, vllm
    processes: int = 1  # worker processes, one per GPU, each decoding batch_size sequences (generation/parallel.py)

    # the backend's other constructor options: dtype, device, max_cache_gb, trust_remote_code (local backends);
    # vllm's engine options (tensor_parallel_size, gpu_memory_utilization, ...). docs/generation.md
    options: dict = field(default_factory=dict)
    warmup_train: SFTTrainConfig = field(default_factory=lambda: SFTTrainConfig(epochs=2))  # [R] 2 epochs
    adaptive_train: SFTTrainConfig = field(default_factory=lambda: SFTTrainConfig(epochs=2))  # [R] 2 epochs

    def __post_init__(self):
        at_least(self, 1, "limit", "max_pair_tokens", "max_new_tokens")
        check_generator_section(self)
        if not 0.0 <= self.minor_quantile <= 1.0:
            raise ValueError(f"minor_quantile must be in [0, 1], not {self.minor_quantile}")


@dataclass
class ExternalConfig:
    size: int = 0  # external answers revised per round and added to its SFT set (0: internal evolution only)
    data: str = "preferences/hh_rlhf_helpful_base_test.jsonl"  # [R] a held-out preference file
    answer: Literal["chosen", "rejected"] = "chosen"  # [R] which of its answers is the "external space"
    rounds: list[int] = field(default_factory=list)  # rounds that add external answers (empty: every round)

    def __post_init__(self):
        at_least(self, 0, "size")


@dataclass
class ReviserEvalConfig:
    """The reviser's own quality on preference pairs it never saw: does it improve the weaker answer, and does it
    leave the stronger one alone? (not part of SEFT; evidence for issue #7)"""
    pairs: int = 64  # held-out pairs (0: no reviser/quality stage)

    # held apart from the reviser's train_1k file (and from the reward judge's training pairs); with the reviser's
    # own file, only pairs beyond its slice are taken
    data: str = "preferences/ultrafeedback_binarized_eval_200.jsonl"

    def __post_init__(self):
        at_least(self, 0, "pairs")


@dataclass
class Config:
    model: str = DEFAULT_MODEL  # π_0, an SFT (instruct) model
    prompts: str = "prompts/unlabelled_pool.jsonl"  # X_u; the reviser's and the external prompts are excluded
    prompt_sources: list[str] = field(default_factory=list)  # keep only these `source` values (empty: all)
    round_sizes: list[int] = field(default_factory=lambda: [1000, 1000])  # [R] T = 2 rounds, fresh prompts
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    reviser: ReviserConfig = field(default_factory=ReviserConfig)
    external: ExternalConfig = field(default_factory=ExternalConfig)
    policy_init: Literal["previous", "initial"] = "previous"  # [R] π_t = SFT(π_{t-1}) or SFT(π_0)
    round_train: SFTTrainConfig = field(default_factory=SFTTrainConfig)  # [R] 1 epoch per round, lr 2e-5
    eval: EvalConfig = field(default_factory=EvalConfig)
    # control: SFT of π_0 on round 1's unrevised answers (same prompts, same round_train), evaluated as sft_unrevised
    baseline_unrevised: bool = True
    reviser_eval: ReviserEvalConfig = field(default_factory=ReviserEvalConfig)
    shuffle_seed: int = 42

    def __post_init__(self):
        if not self.round_sizes or min(self.round_sizes) < 1:
            raise ValueError(f"round_sizes must list at least one round, each of >= 1 prompts, not {self.round_sizes}")
        beyond = [i for i in self.external.rounds if not 1 <= i <= len(self.round_sizes)]
        if beyond and self.external.size > 0:  # a round that never runs would silently get no external answers
            raise config_error("external.rounds", f"round(s) {beyond} do not exist: round_sizes lists "
                               f"{len(self.round_sizes)} round(s), numbered from 1", also=("round_sizes",))


# ------------------------------------------------------------------------------------------------ data
def _fitting(pairs: list[PreferencePair], rc: ReviserConfig) -> list[PreferencePair]:
    """The pairs whose two reviser examples fit `rc.max_pair_tokens` (all of them when it is unset): (x, chosen) ->
    tag + chosen and (x, rejected) -> tag + chosen, i.e. history + instruction + chosen + max(chosen, rejected)
    tokens (the template and chat headers come on top)."""
    if not rc.max_pair_tokens:
        return pairs
    tok = _tokenizer(rc.model)
    count = lambda t: len(tok(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    return [p for p in pairs if count(p.prompt) + count(p.chosen) + max(count(p.chosen), count(p.rejected))
            + sum(count(m["content"]) for m in p.messages[:-1]) <= rc.max_pair_tokens]


@functools.lru_cache(maxsize=2)
def _tokenizer(spec: str):
    """The reviser's tokenizer, loaded once: prepare_data filters both the training and the held-out pairs."""
    from selfalign.models import load_tokenizer

    return load_tokenizer(spec)


def check_inputs(config: Config) -> None:
    """What the run needs besides its data, checked before the run folder is made (recipes/preflight.py)."""
    from selfalign.reviser import load_template

    rc = config.reviser
    preflight.model("model", config.model)
    preflight.model("reviser.model", rc.model)
    preflight.backend("sampling.backend", config.sampling.backend, options=config.sampling.options)
    preflight.backend("reviser.backend", rc.backend, options=rc.options)
    if rc.warmup:
        preflight.template("reviser.warmup_template", rc.warmup_template, load_template)
    preflight.template("reviser.adaptive_template", rc.adaptive_template, load_template)
    if rc.label_rule == "judge":
        preflight.judge("reviser.label_judge", rc.label_judge, rc.label_judge_options)
    preflight.evaluation("eval", config.eval)
    if config.reviser_eval.pairs and not config.eval.instructions:  # the reviser's quality stage judges with eval's
        preflight.judge("eval.judge", config.eval.judge, config.eval.judge_options)


def prepare_data(config: Config) -> tuple[dict[str, list], dict]:
    """The reviser's pairs, the external answers per round, and disjoint slices of the unlabelled prompts (none of
    the reviser's or external prompts) for the rounds."""
    rc, ext = config.reviser, config.external
    files: dict[str, list] = {}
    all_pairs = load_preference_pairs(data_file(rc.data, "reviser.data"))
    usable = [p for p in all_pairs if p.chosen.strip()]  # an empty chosen answer is no revision target
    usable = _fitting(usable, rc)
    random.Random(config.shuffle_seed).shuffle(usable)
    pairs = usable[:rc.limit] if rc.limit is not None else usable
    if not pairs:
        raise config_error("reviser.max_pair_tokens", "no reviser pairs left after filtering (too small?)")
    if rc.limit is not None and len(pairs) < rc.limit:  # said now, not only in the data stage's summary
        print(f"selfalign: note: reviser.limit: {rc.limit} is more than the {len(usable)} usable pairs of "
              f"{len(all_pairs)} in {rc.data} (non-empty chosen answer, within reviser.max_pair_tokens); using "
              f"{len(pairs)}", file=sys.stderr)
    files["reviser_pairs.jsonl"] = pairs
    if config.reviser_eval.pairs:  # the reviser's quality stage comes after its training: count its pairs now
        held_out_pairs(config, pairs)
    exclude = {p.prompt.strip() for p in all_pairs}  # every prompt of the reviser's file, used or not

    ext_rounds = [i for i in range(1, len(config.round_sizes) + 1) if not ext.rounds or i in ext.rounds]
    n_ext = 0
    if ext.size > 0:
        ext_pairs = [p for p in load_preference_pairs(data_file(ext.data, "external.data"))
                     if getattr(p, ext.answer).strip()]
        random.Random(config.shuffle_seed + 1).shuffle(ext_pairs)
        need = ext.size * len(ext_rounds)
        if need > len(ext_pairs):
            raise config_error("external.size", f"external asks for {need} answers; {ext.data} has {len(ext_pairs)} "
                               "usable pairs")
        for k, i in enumerate(ext_rounds):
            chunk = ext_pairs[k * ext.size:(k + 1) * ext.size]
            files[f"round{i}_external.jsonl"] = chunk
            for p in chunk:  # neither the external prompt nor its first turn may appear as an internal prompt
                exclude.update(m["content"].strip() for m in p.messages if m["role"] == "user")
            n_ext += len(chunk)

    pool = prompt_pool(config.prompts, config.prompt_sources, exclude=exclude)
    random.Random(config.shuffle_seed).shuffle(pool)
    if sum(config.round_sizes) > len(pool):
        raise too_few_prompts("round_sizes", sum(config.round_sizes), len(pool),
                              "prompts not in the reviser's or external data", also=("reviser.data", "external.size"),
                              asked="the sum of round_sizes")
    start = 0
    for i, size in enumerate(config.round_sizes, start=1):
        files[f"round{i}_prompts.jsonl"] = pool[start:start + size]
        start += size
    return files, {"reviser_pairs": len(pairs), "usable_pairs": len(usable), "pairs_in_file": len(all_pairs),
            "pool": len(pool), "round_sizes": config.round_sizes, "external_answers": n_ext}


# ------------------------------------------------------------------------------------------------ reviser
def build_labels(config: Config, run: Run) -> dict:
    from selfalign.reviser import revision_labels

    rc = config.reviser
    pairs = read_records(run.path("data", "reviser_pairs.jsonl"), PreferencePair)
    judge = None
    if rc.label_rule == "judge":
        from selfalign.judges import make_judge

        judge = make_judge(rc.label_judge, cache=str(run.path("reviser", "label_judge_cache.jsonl")),
                           **rc.label_judge_options)
    labels = revision_labels(pairs, rc.label_rule, rc.minor_max, rc.minor_quantile, judge)
    write_jsonl(run.path("reviser", "labels.jsonl"), labels)
    minor = sum(lab["decision"] == "minor" for lab in labels)
    return {"rule": rc.label_rule, "threshold": labels[0]["threshold"] if labels else None, "pairs": len(labels),
            "minor": minor, "major": len(labels) - minor, "none": len(labels)}


def train_warmup(config: Config, run: Run) -> dict:
    from selfalign.reviser import load_template, warmup_examples

    rc = config.reviser
    pairs = read_records(run.path("data", "reviser_pairs.jsonl"), PreferencePair)
    examples = warmup_examples(pairs, load_template(rc.warmup_template))
    return train_sft(rc.model, examples, rc.warmup_train, run.path("reviser", "warmup", "train"),
                     run.path("reviser", "warmup", "final"))


def train_adaptive(config: Config, run: Run, init: str) -> dict:
    from selfalign.reviser import adaptive_examples, load_template

    rc = config.reviser
    pairs = read_records(run.path("data", "reviser_pairs.jsonl"), PreferencePair)
    labels = [json.loads(line) for line in run.path("reviser", "labels.jsonl").read_text().splitlines()]
    examples = adaptive_examples(pairs, labels, load_template(rc.adaptive_template), rc.no_revision_target)
    summary = train_sft(init, examples, rc.adaptive_train, run.path("reviser", "train"), run.path("reviser", "final"))
    return {**summary, "init": init, "examples": len(examples)}


# ------------------------------------------------------------------------------------------------ reviser quality
def held_out_pairs(config: Config, trained: list[PreferencePair]) -> list[PreferencePair]:
    """`reviser_eval.pairs` pairs the reviser never trained on: no prompt of `trained` (data/reviser_pairs.jsonl), a
    real preference (chosen != rejected, both non-empty), and within the reviser's length filter like its training
    pairs."""
    rc, qc = config.reviser, config.reviser_eval
    trained_prompts = {p.prompt.strip() for p in trained}
    pairs = [p for p in load_preference_pairs(data_file(qc.data, "reviser_eval.data"))
             if p.prompt.strip() not in trained_prompts
             and p.chosen.strip() and p.rejected.strip() and p.chosen.strip() != p.rejected.strip()]
    pairs = _fitting(pairs, rc)
    random.Random(config.shuffle_seed + 2).shuffle(pairs)  # + 2: not the reviser's or the external shuffle
    if len(pairs) < qc.pairs:
        raise config_error("reviser_eval.pairs", f"{qc.pairs} held-out pairs asked for; {qc.data} has {len(pairs)} "
                           "usable")
    return pairs[:qc.pairs]


def reviser_quality(config: Config, run: Run, reviser: str) -> dict:
    """Revise both answers of held-out pairs (reviser.quality_inputs); the run's eval judge says whether a revised
    rejected answer is better than the original, and a chosen one should come back verbatim (reviser.judge_revisions).
    Written to reviser/quality/ (pairs, revisions, verdicts) and reviser/quality.json / quality.md."""
    from selfalign.judges import make_judge
    from selfalign.reviser import judge_revisions, quality_inputs, quality_markdown

    folder = run.path("reviser", "quality")
    pairs = held_out_pairs(config, read_records(run.path("data", "reviser_pairs.jsonl"), PreferencePair))
    write_jsonl(folder / "pairs.jsonl", pairs)
    revisions, _ = run_reviser(config, reviser, quality_inputs(pairs, config.reviser_eval.data), folder,
                               config.sampling.seed)
    write_jsonl(folder / "revisions.jsonl", revisions)
    judge = make_judge(config.eval.judge, cache=str(folder / "judge_cache.jsonl"), **config.eval.judge_options)
    rows, sides = judge_revisions(revisions, judge)
    write_jsonl(folder / "verdicts.jsonl", rows)
    result = {"data": config.reviser_eval.data, "pairs": len(pairs), "judge": config.eval.judge, **sides}
    run.path("reviser", "quality.json").write_text(json.dumps(result, indent=1))
    run.path("reviser", "quality.md").write_text(quality_markdown(
        f"SEFT run {run.root.name}: reviser quality on {len(pairs)} held-out pairs ({result['data']})", result))
    return result


# ------------------------------------------------------------------------------------------------ rounds
def generate(config: Config, run: Run, i: int, policy: str) -> dict:

    prompts = read_records(run.path("data", f"round{i}_prompts.jsonl"), Prompt)
    s = config.sampling
    gen = make_generator(s.backend, policy, batch_size=s.batch_size, processes=s.processes, **s.options)
    gen.model_name = f"round{i - 1}"
    params = SamplingParams(temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens, n=1,
                            seed=s.seed + i)
    out = generate_to_file(gen, prompts, params, run.path(f"round{i}", "generations.jsonl"))
    gen.close()  # frees a KV cache kept between calls before the reviser and training stages
    return {"responses": len(out), "truncated": sum(r.finish_reason == "length" for r in out),
            "empty": sum(not r.response.strip() for r in out)}


def revision_inputs(config: Config, run: Run, i: int) -> tuple[list[Response], int]:
    """The answers to revise: the policy's own (internal) plus, where configured, external answers."""
    responses = []
    for r in read_records(run.path(f"round{i}", "generations.jsonl"), Response):
        r.meta = dict(r.meta, origin="internal")
        responses.append(r)
    ext_file = run.path("data", f"round{i}_external.jsonl")
    if config.external.size > 0 and ext_file.exists():
        for p in read_records(ext_file, PreferencePair):
            responses.append(Response(prompt_id=f"ext:{p.id}", messages=p.messages,
                                      response=getattr(p, config.external.answer),
                                      model=f"external:{config.external.data}:{config.external.answer}",
                                      meta={"origin": "external"}))
    kept = [r for r in responses if r.response.strip()]  # an empty answer has nothing to keep or revise
    return kept, len(responses) - len(kept)


def run_reviser(config: Config, reviser: str, responses: list[Response], folder, seed: int) -> tuple[list, int]:
    """Adaptive revision of `responses` with the trained reviser, both passes resumable under `folder`.
    Returns (revisions, the decide pass's token budget)."""
    from selfalign.reviser import load_template, revise_adaptive, tag_token_budget

    rc = config.reviser
    folder.mkdir(parents=True, exist_ok=True)
    # local backends continue a prompt's meta["assistant_prefix"] (the decision tag) natively
    gen = make_generator(rc.backend, reviser, batch_size=rc.batch_size, processes=rc.processes, **rc.options)
    gen.model_name = "reviser"
    budget = tag_token_budget(gen.tokenizer)
    revisions = revise_adaptive(gen, responses, load_template(rc.adaptive_template), budget,
                                rc.max_new_tokens or config.sampling.max_new_tokens,
                                folder / "reviser_tags.jsonl", folder / "reviser_continuations.jsonl",
                                rc.tag_fallback, seed=seed)
    gen.close()
    return revisions, budget


def revise(config: Config, run: Run, i: int, reviser: str) -> dict:
    from selfalign.reviser import revision_stats

    responses, empty = revision_inputs(config, run, i)
    revisions, budget = run_reviser(config, reviser, responses, run.path(f"round{i}"), config.sampling.seed + i)
    write_jsonl(run.path(f"round{i}", "revisions.jsonl"), revisions)
    stats = {**revision_stats(revisions, total=len(responses)), "empty_inputs_skipped": empty, "tag_budget": budget}
    for origin in ("internal", "external"):
        sub = [r for r in revisions if r.meta.get("origin") == origin]
        if sub and config.external.size > 0:
            stats[origin] = revision_stats(sub)
    return stats


def train_round(config: Config, run: Run, i: int, init: str) -> dict:
    from selfalign.reviser import revision_unfinished

    revisions = read_records(run.path(f"round{i}", "revisions.jsonl"), Revision)
    # a target cut off at the token budget is still trained on, but not its end-of-turn tokens
    conversations = [Conversation(f"{r.prompt_id}#{r.meta.get('sample_index', 0)}",
                                  r.messages + [{"role": "assistant", "content": r.revised}],
                                  {"decision": r.decision, **_unfinished(r.messages, revision_unfinished(r))})
                     for r in revisions]
    if not conversations:
        raise ConfigError(f"round {i}: no revised answers to train on")
    summary = train_sft(init, conversations, config.round_train, run.path(f"round{i}", "train"),
                        run.path(f"round{i}", "final"))
    return {**summary, "init": init, "examples": len(conversations),
            "unfinished_targets": sum(bool(c.meta.get("unfinished_turns")) for c in conversations)}


def _unfinished(messages: list, cut_off: bool) -> dict:
    """Conversation meta marking the answer after `messages` as cut off (see training.data.encode_conversation)."""
    return {"unfinished_turns": [len(messages)]} if cut_off else {}


def train_baseline(config: Config, run: Run) -> dict:
    """The control for round 1: SFT of π_0 on the same prompts' unrevised policy answers, same round_train. What
    round1 gains over it is what the reviser adds."""
    responses = [r for r in read_records(run.path("round1", "generations.jsonl"), Response) if r.response.strip()]
    conversations = [Conversation(f"{r.prompt_id}#{r.sample_index}",
                                  r.messages + [{"role": "assistant", "content": r.response}],
                                  {"origin": "unrevised", **_unfinished(r.messages, r.finish_reason == "length")})
                     for r in responses]  # empty answers are skipped, as in round 1's revision inputs
    if not conversations:
        raise ConfigError("baseline: round 1 has no non-empty answers to train on")
    summary = train_sft(config.model, conversations, config.round_train, run.path("baseline", "train"),
                        run.path("baseline", "final"))
    return {**summary, "init": config.model, "examples": len(conversations),
            "unfinished_targets": sum(bool(c.meta.get("unfinished_turns")) for c in conversations)}


def write_revision_summary(run: Run, rows: dict[str, dict]) -> None:
    """One table of the per-round reviser statistics: round{i}/revisions.jsonl summarised."""
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"# SEFT run {run.root.name}: reviser decisions per round", "",
             "| round | revised | no | minor | major | tag fallbacks | identical | mean edit dist. | "
             "edit dist. (revised only) | token overlap | words orig. | words revised |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in rows.items():
        lines.append(f"| {name} | {s['revisions']} | {fmt(s['share_none'])} | {fmt(s['share_minor'])} | "
                     f"{fmt(s['share_major'])} | {s['tag_fallbacks']} | {s['identical_to_original']} | "
                     f"{fmt(s['mean_edit_distance'])} | {fmt(s['mean_edit_distance_revised'])} | "
                     f"{fmt(s['mean_token_overlap'])} | {fmt(s['mean_words_original'])} | "
                     f"{fmt(s['mean_words_revised'])} |")
    run.path("revision_summary.md").write_text("\n".join(lines) + "\n")
    run.path("revision_summary.json").write_text(json.dumps(rows, indent=1))


# ------------------------------------------------------------------------------------------------ pipeline
def run(config: Config, run_dir: str) -> dict:
    run = start_run(run_dir, config, "seft", config.round_train.seed, check_inputs, prepare_data)
    results: dict[str, dict] = {}

    def evaluate(label: str, model: str) -> None:  # after every round, collected into one table per run
        if config.eval.instructions:
            results[label] = run.stage(f"eval/{label}", lambda: evaluate_checkpoint(model, label, config.eval,
                                                                                  run.path("eval")))
            write_summary(run.path("eval"), results, f"SEFT run {run.root.name}: AlpacaEval-style, "
                          f"{config.eval.instructions} instructions (seed {config.eval.seed}), judge {config.eval.judge}")

    rc = config.reviser
    run.stage("reviser/labels", lambda: build_labels(config, run))
    if rc.warmup:
        run.stage("reviser/warmup", lambda: train_warmup(config, run))
    adaptive_init = str(run.path("reviser", "warmup", "final")) if rc.warmup and rc.adaptive_init == "warmup" \
        else rc.model
    run.stage("reviser/adaptive", lambda: train_adaptive(config, run, adaptive_init))
    reviser = str(run.path("reviser", "final"))
    run.record_model("reviser", reviser)
    if config.reviser_eval.pairs > 0:
        run.stage("reviser/quality", lambda: reviser_quality(config, run, reviser))
    init = config.model
    evaluate("initial", init)
    stats: dict[str, dict] = {}
    for i in range(1, len(config.round_sizes) + 1):
        policy = init if i == 1 else str(run.path(f"round{i - 1}", "final"))
        start = policy if config.policy_init == "previous" else init
        run.stage(f"round{i}/generate", lambda: generate(config, run, i, policy))
        stats[f"round{i}"] = run.stage(f"round{i}/revise", lambda: revise(config, run, i, reviser))
        write_revision_summary(run, stats)
        run.stage(f"round{i}/train", lambda: train_round(config, run, i, start))
        evaluate(f"round{i}", str(run.path(f"round{i}", "final")))
    if config.baseline_unrevised:
        run.stage("baseline/train", lambda: train_baseline(config, run))
        evaluate("sft_unrevised", str(run.path("baseline", "final")))
    final = link_final(run, run.root / f"round{len(config.round_sizes)}" / "final")  # the name every recipe uses
    return {"run_dir": str(run.root), "final": str(final), "stages": run.manifest["stages"], "eval": results,
            "revisions": stats}
