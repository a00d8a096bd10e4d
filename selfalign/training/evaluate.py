"""Held-out preference metrics of a trained policy: DPO loss, implicit-reward accuracy and margins against its
reference (the same scoring also gives SPA's direct preference judgment: implicit reward vs. pi_init), and ORPO's
reference-free loss terms."""

from __future__ import annotations

from pathlib import Path

import torch

from selfalign.models import load_tokenizer, pick_device
from selfalign.training.config import DPOTrainConfig, ORPOTrainConfig
from selfalign.training.data import encode_pairs
from selfalign.training.losses import IGNORE, dpo_loss, orpo_loss
from selfalign.training.refcache import pair_logps
from selfalign.training.trainer import amp_dtype, frozen_model


def preference_metrics(policy: str, reference: str, pairs, config: DPOTrainConfig,
                       reference_cache: str | Path | None = None) -> dict:
    """Mean DPO loss, reward accuracy, margins and chosen/rejected rewards of `policy` vs `reference` on `pairs`
    (encoded exactly as in training: same template, masks and truncation)."""
    tokenizer = load_tokenizer(policy)
    examples = encode_pairs(tokenizer, pairs, config.max_length, config.max_prompt_length)
    device = pick_device(config.device)
    scores = []
    for spec, cache in ((policy, None), (reference, reference_cache)):
        model = frozen_model(spec, device)
        scores.append(pair_logps(model, examples, tokenizer.pad_token_id, config.reference_batch_size, device,
                                 amp_dtype(config, device), cache))
        del model
    pol, ref = scores
    loss, m = dpo_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], config.beta)
    return {"pairs": len(examples), "loss": float(loss), **{k: float(v.mean()) for k, v in m.items()}}


def orpo_metrics(model: str, pairs, config: ORPOTrainConfig) -> dict:
    """Mean ORPO loss and its terms for `model` on `pairs` (encoded as in training): the chosen answers' NLL, the
    log odds ratio, and accuracy (the chosen answer's mean token log-prob above the rejected one's)."""
    tokenizer = load_tokenizer(model)
    examples = encode_pairs(tokenizer, pairs, config.max_length, config.max_prompt_length)
    device = pick_device(config.device)
    net = frozen_model(model, device)
    sums = pair_logps(net, examples, tokenizer.pad_token_id, config.batch_size, device, amp_dtype(config, device))
    del net
    # labels[t] is predicted at position t - 1: the response tokens that carry a log-prob
    tokens = torch.tensor([[sum(x != IGNORE for x in labels[1:]) for labels in (e.chosen_labels, e.rejected_labels)]
                           for e in examples], dtype=torch.float32).clamp(min=1)
    mean = sums / tokens
    loss, m = orpo_loss(mean[:, 0], mean[:, 1], config.odds_ratio_weight)
    return {"pairs": len(examples), "loss": float(loss), **{k: float(v.mean()) for k, v in m.items()}}
