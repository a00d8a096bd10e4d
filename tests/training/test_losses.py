"""The loss functions against hand-computed values, and what masking must guarantee for gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from selfalign.training.losses import (IGNORE, dpo_loss, extrapolated_token_logps, orpo_loss, sequence_logps,
                                       sft_loss, token_logps)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_dpo_loss_and_rewards_hand_computed():
    # z = (-1 - -1.5) - (-2 - -1) = 0.5 + 1 = 1.5; beta z = 0.75
    pol_w, pol_l, ref_w, ref_l = (torch.tensor([v]) for v in (-1.0, -2.0, -1.5, -1.0))
    loss, m = dpo_loss(pol_w, pol_l, ref_w, ref_l, beta=0.5)
    assert loss.item() == pytest.approx(softplus(-0.75), abs=1e-6)  # -log sigmoid(0.75) = log(1 + e^-0.75)
    assert loss.item() == pytest.approx(0.3868710, abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(0.25)
    assert m["rewards/rejected"].item() == pytest.approx(-0.5)
    assert m["rewards/margins"].item() == pytest.approx(0.75)
    assert m["rewards/accuracy"].item() == 1.0

    smoothed, _ = dpo_loss(pol_w, pol_l, ref_w, ref_l, beta=0.5, eps=0.1)
    assert smoothed.item() == pytest.approx(0.9 * softplus(-0.75) + 0.1 * softplus(0.75), abs=1e-6)


def test_label_smoothing_zero_is_plain_dpo():
    g = torch.Generator().manual_seed(0)
    lp = [torch.randn(16, generator=g) * 20 for _ in range(4)]
    beta = 0.1
    plain = -F.logsigmoid(beta * ((lp[0] - lp[2]) - (lp[1] - lp[3]))).mean()
    assert torch.equal(dpo_loss(*lp, beta=beta)[0], dpo_loss(*lp, beta=beta, eps=0.0)[0])
    assert dpo_loss(*lp, beta=beta, eps=torch.zeros(16))[0].item() == pytest.approx(plain.item(), abs=1e-6)


def test_per_pair_eps_and_weights():
    g = torch.Generator().manual_seed(1)
    lp = [torch.randn(4, generator=g) * 5 for _ in range(4)]
    eps = torch.tensor([0.0, 0.1, 0.0, 0.3])
    per_pair = dpo_loss(*lp, beta=0.2, eps=eps, reduction="none")[0]
    for i in range(4):
        one = dpo_loss(*(x[i:i + 1] for x in lp), beta=0.2, eps=float(eps[i]))[0]
        assert per_pair[i].item() == pytest.approx(one.item(), abs=1e-6)
    w = torch.tensor([1.0, 0.0, 2.0, 1.0])
    weighted = dpo_loss(*lp, beta=0.2, eps=eps, weights=w)[0]
    assert weighted.item() == pytest.approx(float((per_pair * w).sum() / 4), abs=1e-6)
    # eps = 0.5 makes the loss symmetric in z, so its gradient at z = 0 is zero
    z = torch.zeros(1, requires_grad=True)
    dpo_loss(z, torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=1.0, eps=0.5)[0].backward()
    assert z.grad.item() == pytest.approx(0.0, abs=1e-7)


def test_sequence_logps_hand_computed_and_masked():
    # vocab 3, one sequence [a, b, c] where only c (predicted from position 1) is a response token
    logits = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]])
    labels = torch.tensor([[IGNORE, IGNORE, 2]])
    expected = 3.0 - math.log(math.exp(1) + math.exp(2) + math.exp(3))
    assert sequence_logps(logits, labels).item() == pytest.approx(expected, abs=1e-6)


def test_masked_positions_get_exactly_zero_gradient():
    torch.manual_seed(0)
    B, T, V = 2, 7, 11
    logits = (torch.randn(B, T, V) * 3).requires_grad_()
    labels = torch.randint(0, V, (B, T))
    labels[0, :3] = IGNORE  # prompt
    labels[1, :4] = IGNORE  # longer prompt
    labels[1, 6:] = IGNORE  # padding
    (sequence_logps(logits, labels).sum() + sft_loss(logits, labels)).backward()
    trained = labels[:, 1:] != IGNORE  # logits at t predict label t+1
    grad = logits.grad[:, :-1]
    assert torch.all(grad[~trained] == 0)  # exactly zero, not just small
    assert torch.all(logits.grad[:, -1] == 0)  # the last position predicts nothing
    assert torch.all(grad[trained].abs().sum(-1) > 0)


def test_sft_loss_is_masked_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(3, 9, 13)
    labels = torch.randint(0, 13, (3, 9))
    labels[:, :4] = IGNORE
    labels[2, 7:] = IGNORE
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 13), labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    assert sft_loss(logits, labels).item() == pytest.approx(ref.item(), abs=1e-6)


def test_extrapolated_logps_formula_and_chunking():
    torch.manual_seed(0)
    hp, hr = torch.randn(10, 17), torch.randn(10, 17)
    t = torch.randint(0, 17, (10,))
    lam = 0.25
    expected = torch.log_softmax((1 + lam) * hp - lam * hr, -1).gather(-1, t[:, None]).squeeze(-1)
    assert torch.allclose(extrapolated_token_logps(hp, hr, t, lam, chunk=3), expected, atol=1e-6)
    assert torch.allclose(extrapolated_token_logps(hp, hr, t, 0.0), token_logps(hp, t), atol=1e-6)
    with torch.enable_grad():
        assert not extrapolated_token_logps(hp.requires_grad_(), hr, t, lam).requires_grad


def log_odds(mean_logp: float) -> float:
    return mean_logp - math.log(1 - math.exp(mean_logp))


def test_orpo_loss_hand_computed():
    # log odds: -0.5 - log(1 - e^-0.5) = 0.432752; -1.5 - log(1 - e^-1.5) = -1.247518; their difference 1.680270
    w, lo = torch.tensor([-0.5]), torch.tensor([-1.5])
    loss, m = orpo_loss(w, lo, odds_ratio_weight=0.1)
    ratio = log_odds(-0.5) - log_odds(-1.5)
    assert ratio == pytest.approx(1.680270, abs=1e-6)
    assert m["log_odds_ratio"].item() == pytest.approx(ratio, abs=1e-5)
    assert m["odds_ratio_term"].item() == pytest.approx(-softplus(-ratio), abs=1e-6)
    assert loss.item() == pytest.approx(0.5 + 0.1 * softplus(-ratio), abs=1e-6)  # NLL 0.5 + lambda x -log sigma
    assert loss.item() == pytest.approx(0.5170859, abs=1e-6)
    assert m["nll"].item() == pytest.approx(0.5)
    assert m["rewards/margins"].item() == pytest.approx(0.1) and m["rewards/accuracy"].item() == 1.0
    # lambda 0 is SFT on the chosen answers: the mean token NLL, whatever the rejected answer is; accuracy still
    # compares the two answers' mean log-probs
    sft, m0 = orpo_loss(w, torch.tensor([-0.01]), odds_ratio_weight=0.0)
    assert sft.item() == pytest.approx(0.5) and m0["rewards/accuracy"].item() == 0.0
    assert orpo_loss(w, lo, odds_ratio_weight=0.0)[1]["rewards/accuracy"].item() == 1.0
    # a pair's weight scales its loss (0 drops it), as in dpo_loss
    two = orpo_loss(torch.tensor([-0.5, -3.0]), torch.tensor([-1.5, -1.0]), 0.1, weights=torch.tensor([1.0, 0.0]),
                    reduction="sum")[0]
    assert two.item() == pytest.approx(0.5170859, abs=1e-6)


def test_orpo_loss_matches_trls_odds_ratio_and_stays_finite_near_certainty():
    import warnings
    from types import SimpleNamespace

    with warnings.catch_warnings():  # TRLExperimentalWarning: ORPO lives in trl.experimental since TRL 0.2x
        warnings.simplefilter("ignore")
        from trl.experimental.orpo import ORPOTrainer

    g = torch.Generator().manual_seed(3)
    w, lo = -torch.rand(8, generator=g) * 3, -torch.rand(8, generator=g) * 3
    per_pair, m = orpo_loss(w, lo, odds_ratio_weight=0.2, reduction="none")
    fake = SimpleNamespace(beta=0.2, accelerator=SimpleNamespace(device="cpu"))
    trl_terms, trl_chosen, trl_rejected, _, trl_log_odds = ORPOTrainer.odds_ratio_loss(fake, w, lo)
    assert torch.allclose(per_pair, -w - trl_terms, atol=1e-6)  # TRL returns lambda x log sigma(log odds ratio)
    assert torch.allclose(m["rewards/chosen"], trl_chosen) and torch.allclose(m["rewards/rejected"], trl_rejected)
    assert m["log_odds_ratio"].mean().item() == pytest.approx(trl_log_odds.item(), abs=1e-5)
    # an answer given with near certainty (mean log-prob -1e-9, or 0): log(1 - p) stays finite, and so do gradients
    w = torch.tensor([0.0, -1e-9, -0.3], requires_grad=True)
    loss, _ = orpo_loss(w, torch.tensor([-2.0, -2.0, -2.0]), odds_ratio_weight=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(w.grad).all()
