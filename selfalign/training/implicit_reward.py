"""SPA's direct preference judgment: label a pair of sampled answers with the model's own implicit reward.

    r(x, y) = log π(y|x) − log π_ref(y|x)        (summed response log-probs; METHODS.md §2.3, paper Eqs. 7-8)

The answer with the higher r is chosen; the confidence is p = σ(β·(r_w − r_l)) ∈ [0.5, 1]. Two no-grad forward
passes per pair (policy and reference), batched, with the log-probs cached in `cache_dir` so a resumed labelling
never recomputes them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from selfalign.data.records import PreferencePair
from selfalign.models import load_model, load_tokenizer, pick_device, resolve_model
from selfalign.runs import model_fingerprint
from selfalign.training.data import encode_pairs
from selfalign.training.refcache import cache_path, pair_logps


def sequence_logps(model_spec: str, pairs: list[PreferencePair], max_length: int, max_prompt_length: int,
                   batch_size: int = 8, cache_dir: str | Path | None = None, device: str = "auto") -> torch.Tensor:
    """[n, 2] summed log-probs of (chosen, rejected) of every pair under `model_spec`."""
    tokenizer = load_tokenizer(model_spec)
    examples = encode_pairs(tokenizer, pairs, max_length, max_prompt_length)
    device = pick_device(device)
    model = load_model(model_spec, dtype="float32", device=device)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    key = json.dumps([model_fingerprint(resolve_model(model_spec)), "fp32", device])
    cache = cache_path(cache_dir, key) if cache_dir is not None else None
    out = pair_logps(model, examples, tokenizer.pad_token_id, batch_size, device, None, cache)
    del model
    return out


def implicit_rewards(candidates: list[PreferencePair], policy: str, reference: str, max_length: int = 1024,
                     max_prompt_length: int = 512, batch_size: int = 8,
                     cache_dir: str | Path | None = None) -> list[tuple[float, float]]:
    """(r(chosen), r(rejected)) of each pair, r = log π_policy − log π_reference; the pair's order is not read."""
    lp_policy = sequence_logps(policy, candidates, max_length, max_prompt_length, batch_size, cache_dir)
    lp_ref = sequence_logps(reference, candidates, max_length, max_prompt_length, batch_size, cache_dir)
    return [(float(a), float(b)) for a, b in (lp_policy - lp_ref).tolist()]


def label_samples_by_implicit_reward(groups: list[tuple[str, list[dict], list[str]]], policy: str, reference: str,
                                     beta: float = 0.1, rejected: str = "min_max", seed: int = 0,
                                     max_length: int = 1024, max_prompt_length: int = 512, batch_size: int = 8,
                                     cache_dir: str | Path | None = None,
                                     unfinished: list[set[int]] | None = None) -> list[PreferencePair]:
    """One preference pair per (id, messages, K ≥ 2 sampled answers): the answer with the highest implicit reward
    is chosen; the rejected one is the lowest (`min_max`, SPA's default) or a seeded random other answer
    (`max_chosen`). On ties the later sample wins, so for K = 2 y1 is chosen only when p(y1 ≻ y2) > 0.5 (METHODS.md
    §2.3). meta: both rewards, the confidence σ(β·(r_w − r_l)), the samples' indices, `swapped` (chosen came later),
    and `chosen_unfinished`/`rejected_unfinished`.

    `unfinished` (one set per group): the indices of answers cut off at the token budget. Their end-of-turn token,
    which the model never produced, is left out of their log-probs here, and out of their DPO loss later."""
    import random

    if rejected not in ("min_max", "max_chosen"):
        raise ValueError(f"rejected must be 'min_max' or 'max_chosen', got {rejected!r}")
    # answers are scored two at a time, the unit the encoder and the log-prob cache work in; an odd K pairs its
    # last answer with the first again (one extra sequence per prompt)
    cut_off = unfinished if unfinished is not None else [set() for _ in groups]
    if len(cut_off) != len(groups):
        raise ValueError(f"unfinished has {len(cut_off)} entries for {len(groups)} groups")
    scoring, where = [], []
    for (gid, messages, answers), cut in zip(groups, cut_off):
        if len(answers) < 2:
            raise ValueError(f"{gid}: {len(answers)} answer(s); a preference needs at least 2")
        idx = list(range(len(answers))) + ([0] if len(answers) % 2 else [])
        for a, b in zip(idx[::2], idx[1::2]):
            scoring.append(PreferencePair(id=gid, messages=messages, chosen=answers[a], rejected=answers[b],
                                          meta={"chosen_unfinished": a in cut, "rejected_unfinished": b in cut}))
            where.append((a, b))
    rewards = iter(zip(where, implicit_rewards(scoring, policy, reference, max_length, max_prompt_length,
                                               batch_size, cache_dir)))
    labelled = []
    for (gid, messages, answers), cut in zip(groups, cut_off):
        r: dict[int, float] = {}
        for _ in range((len(answers) + 1) // 2):
            (a, b), (ra, rb) = next(rewards)
            r[a], r[b] = ra, rb
        order = sorted(r, key=lambda j: (r[j], j))  # ascending reward, later sample first among equals at the top
        best = order[-1]
        if rejected == "min_max":
            worst = order[0]
        else:
            worst = random.Random(f"{seed}:{gid}").choice(order[:-1])
        meta = {"reward_chosen": r[best], "reward_rejected": r[worst], "chosen_sample": best, "rejected_sample": worst,
                "confidence": 1 / (1 + math.exp(-max(-60.0, min(60.0, beta * (r[best] - r[worst]))))),
                "swapped": best > worst, "chosen_unfinished": best in cut, "rejected_unfinished": worst in cut}
        labelled.append(PreferencePair(id=gid, messages=messages, chosen=answers[best], rejected=answers[worst],
                                       meta=meta))
    return labelled


def label_by_implicit_reward(candidates: list[PreferencePair], policy: str, reference: str, beta: float = 0.1,
                             max_length: int = 1024, max_prompt_length: int = 512, batch_size: int = 8,
                             cache_dir: str | Path | None = None) -> list[PreferencePair]:
    """Order each candidate pair (two answers in `chosen`/`rejected`, unordered) by implicit reward: K = 2 of
    `label_samples_by_implicit_reward`, keeping each pair's meta (its `chosen_unfinished`/`rejected_unfinished`
    flags describe the two answers as given, and follow them when the labelling swaps them)."""
    groups = [(p.id, p.messages, [p.chosen, p.rejected]) for p in candidates]
    unfinished = [{i for i, k in enumerate(("chosen_unfinished", "rejected_unfinished")) if p.meta.get(k)}
                  for p in candidates]
    labelled = label_samples_by_implicit_reward(groups, policy, reference, beta, "min_max", 0, max_length,
                                                max_prompt_length, batch_size, cache_dir, unfinished)
    return [PreferencePair(l.id, l.messages, l.chosen, l.rejected, dict(p.meta, **l.meta))
            for p, l in zip(candidates, labelled)]
