"""SPA's noise-aware DPO: self-refinement label smoothing on the least-confident pairs (METHODS.md §2.4).

Plugged into `train_dpo(..., noise_hook=SelfRefinementHook(...), extrapolation_lambda=λ)`. Per micro-batch:

    m   = β·([log π̃(y_w) − log π_ref(y_w)] − [log π̃(y_l) − log π_ref(y_l)])      (no grad)
          π̃ = softmax((1+λ)·h_θ − λ·h_ref)  — de-coupled noise detection; λ = 0 gives π̃ = π_θ
    τ   = mean of the sorted window's entries at ⌊W·K⌋ and ⌊W·K⌋+1 once the window of the last W values is full,
          else 0  (the official code's percentile)
    ε   = α·𝟙[m ≤ τ] after the first `warmup_fraction` of the steps, 0 before (π_θ = π_ref at the start, so every
          margin is 0 and carries no information)

and the trainer applies the cDPO loss with that per-pair ε. Every flagged pair is recorded (`flagged`) for the run
folder. The state (window, flags) is saved in training checkpoints, so a resumed run flags exactly the same pairs.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import torch


class SelfRefinementHook:
    def __init__(self, alpha: float = 0.1, noisy_fraction: float = 0.1, window: int = 50,
                 warmup_fraction: float = 0.2, enabled: bool = True, log_path: str | Path | None = None):
        if not 0 <= noisy_fraction < 1 or window < 2:
            raise ValueError("noisy_fraction must be in [0, 1) and window >= 2")
        self.alpha, self.K, self.size, self.warmup, self.enabled = alpha, noisy_fraction, window, warmup_fraction, enabled
        self.window: deque = deque(maxlen=window)
        self.flagged: list[dict] = []  # {step, id, confidence, threshold, eps}
        self.seen = 0
        # flags are also appended to a file as they happen, so they survive a kill after training finished
        self.log_path = Path(log_path) if log_path else None

    def threshold(self) -> float:
        if len(self.window) < self.size:
            return 0.0
        ordered = sorted(self.window)
        k = int(self.size * self.K)
        return (ordered[k] + ordered[min(k + 1, self.size - 1)]) / 2

    def __call__(self, state) -> torch.Tensor | None:
        ext_w = state.extrapolated_chosen if state.extrapolated_chosen is not None else state.policy_chosen
        ext_l = state.extrapolated_rejected if state.extrapolated_rejected is not None else state.policy_rejected
        m = state.beta * ((ext_w - state.reference_chosen) - (ext_l - state.reference_rejected))
        tau = self.threshold()
        noisy = m <= tau
        alpha = self.alpha if (self.enabled and state.step >= self.warmup * state.max_steps) else 0.0
        eps = alpha * noisy.float()
        self.seen += len(state.ids)
        new = [{"step": state.step + 1, "id": pid, "confidence": float(m[i]), "threshold": tau, "eps": float(eps[i])}
               for i, pid in enumerate(state.ids) if alpha > 0 and bool(noisy[i])]
        self.flagged.extend(new)
        if self.log_path is not None and new:
            from selfalign.runs import ResumableJsonl

            # keyed by (step, pair): steps redone after a resume flag the same pairs and are not written twice
            with ResumableJsonl(self.log_path, key=lambda r: (r["step"], r["id"])) as f:
                f.append(new)
        self.window.extend(float(x) for x in m)
        return eps

    def state_dict(self) -> dict:
        return {"window": list(self.window), "flagged": list(self.flagged), "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.window = deque(state["window"], maxlen=self.size)
        self.flagged = list(state["flagged"])
        self.seen = state["seen"]
        if self.log_path is not None and self.log_path.exists():
            from selfalign.data.io import write_jsonl

            # back to the flags as of the checkpoint: the steps redone after it write theirs again, and on a
            # nondeterministic device they may flag other pairs than the killed run did
            write_jsonl(self.log_path, self.flagged)
