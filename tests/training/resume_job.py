"""A training job for the resume and multi-process tests, run in-process or as
`python resume_job.py KIND MODEL_DIR PAIRS OUT KILL_AT [PROCESSES [FSDP]]`.

With KILL_AT > 0 the job SIGKILLs itself right after writing the checkpoint of step KILL_AT: a real kill, nothing
flushed or cleaned up after it. With several training processes the checkpoint is written by a worker, which kills
the job's own process (its parent); the workers must then die with it."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections import deque

import torch

from selfalign.data import Conversation, PreferencePair, read_records
from selfalign.training import DPOTrainConfig, LoraConfig, SFTTrainConfig, train_dpo, train_sft

STEPS = 3


class WindowHook:
    """An SPA-like noise hook with state: smooth the pairs whose extrapolated margin is at or below the median of a
    window of past margins. If its window were not restored on resume, step 3's epsilons (and loss) would differ."""

    def __init__(self):
        self.window: deque = deque(maxlen=8)

    def __call__(self, s):
        m = (s.extrapolated_chosen - s.reference_chosen) - (s.extrapolated_rejected - s.reference_rejected)
        tau = float(torch.tensor(list(self.window)).median()) if len(self.window) >= 2 else float("-inf")
        self.window.extend(m.tolist())
        return 0.2 * (m <= tau).float()

    def state_dict(self):
        return {"window": list(self.window)}

    def load_state_dict(self, state):
        self.window = deque(state["window"], maxlen=8)


class KillAt:
    """on_checkpoint: SIGKILL the job at step `step` (a class, not a closure: it travels to training workers)."""

    def __init__(self, step: int, job_pid: int):
        self.step, self.job_pid = step, job_pid

    def __call__(self, step, path):
        if step == self.step:
            os.kill(self.job_pid, signal.SIGKILL)


def run(kind: str, model_dir: str, pairs_file: str, out: str, kill_at: int = 0, processes: int = 1,
        lora_dropout: float = 0.3, fsdp: bool = False) -> list[dict]:
    pairs = read_records(pairs_file, PreferencePair)
    kill = KillAt(kill_at, os.getpid())
    common = dict(max_steps=STEPS, batch_size=2, max_length=64, max_prompt_length=32, learning_rate=1e-3,
                  warmup_ratio=0.3, save_steps=2 if kill_at else 0, processes=processes, fsdp=fsdp)
    if kind == "dpo":  # full fine-tuning, live reference, extrapolated log-probs, stateful hook
        train_dpo(model_dir, pairs, DPOTrainConfig(**common), f"{out}/train", f"{out}/final",
                  noise_hook=WindowHook(), extrapolation_lambda=0.5, on_checkpoint=kill, verbose=False)
    elif kind == "dpo-cached":  # reference log-probs scored once before training (by each process, its share)
        train_dpo(model_dir, pairs, DPOTrainConfig(**common), f"{out}/train", f"{out}/final", on_checkpoint=kill,
                  verbose=False)
    else:  # LoRA with dropout: resuming must restore the RNG too
        convs = [Conversation(p.id, p.messages + [{"role": "assistant", "content": p.chosen}]) for p in pairs]
        cfg = SFTTrainConfig(**common, grad_accum=2, lora=LoraConfig(r=4, alpha=8, dropout=lora_dropout))
        train_sft(model_dir, convs, cfg, f"{out}/train", f"{out}/final", on_checkpoint=kill, verbose=False)
    with open(f"{out}/train/log.jsonl") as f:
        return [json.loads(line) for line in f]


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int((sys.argv[6:] or [1])[0]),
        fsdp=sys.argv[7:] == ["fsdp"])
