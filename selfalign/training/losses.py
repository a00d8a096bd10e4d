"""Losses as small pure functions of tensors (no models, no config), so they are tested on hand-computed cases.

Conventions: `labels` use -100 for every position that carries no loss (prompt, padding, untrained turns); a
sequence log-prob is the SUM of its response tokens' log-probs (both SPA scripts sum, METHODS.md §1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per row: logits [N, V], targets [N] -> [N], computed in fp32.

    gather - logsumexp avoids materialising a second [N, V] log-softmax tensor."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-prob of the labelled tokens of each sequence: logits [B, T, V], labels [B, T] -> [B].

    Position t predicts token t+1. Masked positions are excluded with `where`, so they get exactly zero gradient
    (also if their log-prob were -inf)."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE
    lp = token_logps(logits.reshape(-1, logits.size(-1)), labels.clamp(min=0).reshape(-1)).view(labels.shape)
    return torch.where(mask, lp, torch.zeros_like(lp)).sum(-1)


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
    """Token cross-entropy on the labelled (response) tokens only, averaged over `num_tokens` (default: the labelled
    tokens of this batch; the trainer passes the count over all accumulated micro-batches)."""
    n = num_tokens if num_tokens is not None else int((labels[:, 1:] != IGNORE).sum())
    return -sequence_logps(logits, labels).sum() / max(n, 1)


def dpo_loss(pol_w: torch.Tensor, pol_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, beta: float,
             eps: torch.Tensor | float = 0.0, weights: torch.Tensor | None = None, reduction: str = "mean"):
    """(c)DPO on summed log-probs of chosen (w) and rejected (l) responses, each [B].

        z = (pol_w - ref_w) - (pol_l - ref_l)
        L = -(1 - eps) * log sigmoid(beta z) - eps * log sigmoid(-beta z)

    `eps` is a float (cDPO label smoothing for all pairs) or a [B] tensor (SPA: smoothing only on pairs it flags
    as noisy). `weights` [B] scale each pair's loss; reduction "mean" divides by B (not by the weights' sum, so a
    weight of 0 drops a pair without rescaling the others), "sum" returns the sum, "none" the [B] losses.

    Returns (loss, metrics): metrics hold detached [B] tensors: implicit rewards beta*log(pi/pi_ref) of chosen and
    rejected, their margin, and accuracy (chosen reward > rejected reward).
    """
    logits = beta * ((pol_w - ref_w) - (pol_l - ref_l))
    eps = torch.as_tensor(eps, dtype=logits.dtype, device=logits.device)
    losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    if weights is not None:
        losses = losses * weights.to(losses.dtype)
    loss = {"mean": losses.mean, "sum": losses.sum, "none": lambda: losses}[reduction]()
    chosen = (beta * (pol_w - ref_w)).detach()
    rejected = (beta * (pol_l - ref_l)).detach()
    metrics = {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
               "rewards/accuracy": (chosen > rejected).float()}
    return loss, metrics


def orpo_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, odds_ratio_weight: float,
              weights: torch.Tensor | None = None, reduction: str = "mean"):
    """ORPO (Hong et al. 2024) on the MEAN per-token log-probs of chosen (w) and rejected (l) responses, each [B]:

        log odds(y) = log p(y) - log(1 - p(y)),  with log p(y) the mean token log-prob of y
        L = -log p(y_w) - lambda * log sigmoid(log odds(y_w) - log odds(y_l))

    The first term is the SFT loss of the chosen response, as the paper writes it: each response's mean token NLL,
    averaged over pairs (TRL instead averages the chosen tokens of the whole batch, so long answers weigh more).
    No reference model: the odds ratio contrasts the two answers under the policy alone.

    `weights` [B] scale each pair's loss, as dpo_loss's do (reduction "mean" divides by B).

    Returns (loss, metrics): metrics hold detached [B] tensors: the NLL, the log odds ratio, lambda * log sigmoid
    of it, TRL's reference-free "rewards" lambda * mean log-prob of chosen and rejected and their margin, and
    accuracy: the chosen answer's mean log-prob above the rejected one's (so also at lambda 0)."""
    # log(1 - p) as log(-expm1(log p)): exact for p near 1, where log1p(-exp(.)) loses every digit. A response the
    # model already gives with certainty (mean log-prob 0) is held just below it, so log(1 - p) stays finite.
    def log1m(mean_logp):
        return torch.log(-torch.expm1(mean_logp.clamp(max=-1e-6)))

    w, lo = chosen_mean.float(), rejected_mean.float()
    log_odds = (w - lo) - (log1m(w) - log1m(lo))
    ratio = F.logsigmoid(log_odds)
    losses = -w - odds_ratio_weight * ratio
    if weights is not None:
        losses = losses * weights.to(losses.dtype)
    loss = {"mean": losses.mean, "sum": losses.sum, "none": lambda: losses}[reduction]()
    chosen, rejected = (odds_ratio_weight * w).detach(), (odds_ratio_weight * lo).detach()
    metrics = {"nll": -w.detach(), "log_odds_ratio": log_odds.detach(), "odds_ratio_term": ratio.detach(),
               "rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
               "rewards/accuracy": (w > lo).float().detach()}
    return loss, metrics


@torch.no_grad()
def extrapolated_token_logps(policy_logits: torch.Tensor, ref_logits: torch.Tensor, targets: torch.Tensor,
                             lam: float, chunk: int = 1024) -> torch.Tensor:
    """SPA's de-coupled noise detection (METHODS.md §2.4, Eq. 12): log-prob of each target under
    softmax((1 + lam) * h_policy - lam * h_ref). Rows [N, V] -> [N], in chunks of rows so no third full-size
    logits tensor is ever allocated; no gradient (it only decides which pairs are noisy)."""
    out = torch.empty(targets.shape, dtype=torch.float32, device=targets.device)
    for i in range(0, targets.numel(), chunk):
        mixed = (1 + lam) * policy_logits[i:i + chunk].float() - lam * ref_logits[i:i + chunk].float()
        out[i:i + chunk] = token_logps(mixed, targets[i:i + chunk])
    return out
