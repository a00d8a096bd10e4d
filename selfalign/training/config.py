"""The `train:` section shared by every recipe that fine-tunes a model (SFT, DPO, SPA, SRT, SEFT).

Defaults follow the papers' recipes (zephyr / alignment-handbook style); recipes override what their method changes.
Sizes (steps, lengths, batch) are the knobs the scaled-down CPU configs turn; the algorithmic constants (beta,
label smoothing) keep their paper values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal


@dataclass
class LoraConfig:
    """LoRA adapters (peft). Present in a config as `lora: {r, alpha, dropout, target_modules}`; absent = full FT."""

    r: int = 16  # adapter rank
    alpha: int = 32  # scaling: the update is multiplied by alpha / r
    dropout: float = 0.05  # dropout on the adapter's input

    # the linear layers that get adapters (their names inside each decoder layer)
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])

    def __post_init__(self):
        # peft would refuse some of these only when the stage builds the adapters (a run folder already locked to
        # them), and accept a negative alpha (a negated update) without a word
        if self.r < 1:
            raise ValueError(f"r must be >= 1, not {self.r}")
        if not 0 < self.alpha < math.inf:
            raise ValueError(f"alpha must be finite and > 0, not {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout}")
        if not self.target_modules or not all(str(t).strip() for t in self.target_modules):
            raise ValueError(f"target_modules must name at least one layer (e.g. [q_proj, v_proj]), not "
                             f"{self.target_modules}")


@dataclass
class TrainConfig:
    learning_rate: float = 2e-5
    epochs: int = 1
    max_steps: int = 0  # > 0: exactly this many optimizer steps (cycling the data as needed); 0: `epochs` passes
    batch_size: int = 4  # examples per micro-batch (pairs for DPO)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_length: int = 1024  # tokens per sequence (prompt + response)
    max_prompt_length: int = 512  # longer prompts lose their start (left truncation), as in the SPA code
    warmup_ratio: float = 0.1  # linear warm-up over this fraction of the steps, then cosine decay to 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU

    # auto: CUDA when there is one, else the CPU. With processes > 1: auto, cuda or cpu (each process takes
    # cuda:<rank>; choose the GPUs with CUDA_VISIBLE_DEVICES)
    device: str = "auto"
    # data-parallel training processes on this machine, one per GPU (gloo CPU processes without one): the same
    # steps, batches and result as 1, summed across processes (distributed.py); batch_size is the whole micro-batch,
    # cut into one share per process
    processes: int = 1
    # with processes > 1: shard the weights, gradients and optimizer state over the processes (FSDP), so each GPU
    # holds 1/processes of them; for full fine-tunes that do not fit one GPU. The same result as unsharded
    fsdp: bool = False
    gradient_checkpointing: bool = False
    # before the first step, run the forward and backward of a micro-batch no step can outweigh once, beside
    # AdamW's state; measure the peak memory, and stop with one line if the device has less (training/memory.py);
    # auto: on CUDA only
    memory_check: Literal["auto", "always", "never"] = "auto"
    group_by_length: bool = True  # batches of similar length: less padding, same examples per epoch
    save_steps: int = 50  # checkpoint every N optimizer steps (0: never); a killed run resumes from the last one
    keep_checkpoints: int = 1
    log_steps: int = 1  # print a progress line every N steps (every step is written to log.jsonl)
    lora: LoraConfig | None = None  # null: full fine-tuning; a mapping (even {}): LoRA adapters with these keys
    merge_lora: bool = True  # save the final model merged (loadable and servable like any model folder)

    def __post_init__(self):
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be below max_length "
                             f"({self.max_length}) so every example keeps some response tokens")
        for name in ("batch_size", "grad_accum", "epochs", "max_length", "max_prompt_length", "log_steps",
                     "keep_checkpoints", "processes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.batch_size < self.processes:
            raise ValueError(f"processes ({self.processes}) is above batch_size ({self.batch_size}): each process "
                             f"takes a share of every micro-batch, so some would only ever compute padding; lower "
                             f"processes or raise batch_size")
        if self.fsdp and self.processes < 2:
            raise ValueError("fsdp shards the model over several processes: set processes >= 2 with it")
        if self.max_steps < 0 or self.save_steps < 0:
            raise ValueError("max_steps and save_steps must be >= 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError("warmup_ratio must be in [0, 1)")
        # (written so NaN fails too; inf is refused: an infinite rate or clip trains NaN weights)
        if not (0 < self.learning_rate < math.inf and 0 < self.max_grad_norm < math.inf
                and 0 <= self.weight_decay < math.inf):
            raise ValueError(f"learning_rate and max_grad_norm must be finite and > 0 and weight_decay finite and "
                             f">= 0, not {self.learning_rate}, {self.max_grad_norm} and {self.weight_decay}")
        if self.device != "auto":
            import torch

            try:  # the spelling only: whether that device exists is known once training starts
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ValueError(f"device must be auto or a torch device (cpu, cuda, cuda:1, mps), not "
                                 f"{self.device!r}") from None


@dataclass
class SFTTrainConfig(TrainConfig):
    train_on: Literal["last", "all"] = "last"  # which assistant turns carry loss; everything else is masked


@dataclass
class DPOTrainConfig(TrainConfig):
    learning_rate: float = 5e-7  # zephyr / SPA full fine-tuning value
    beta: float = 0.1  # DPO temperature (SPA, zephyr); SRT uses 0.01
    label_smoothing: float = 0.0  # cDPO epsilon for every pair (a noise hook can set it per pair instead)
    cache_reference: bool = True  # reference log-probs computed once, cached in the run folder (frozen reference)
    reference_batch_size: int = 8  # pairs per no-grad reference batch
    disable_dropout: bool = True  # as TRL: dropout would make policy != reference at step 0

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.beta < math.inf:
            raise ValueError(f"beta must be finite and > 0, not {self.beta}")
        if not 0.0 <= self.label_smoothing <= 0.5:
            raise ValueError("label_smoothing must be in [0, 0.5]")


@dataclass
class ORPOTrainConfig(TrainConfig):
    # [R]: ORPO's paper values were not retrieved (METHODS.md §5.6 gives lambda ~ 0.1); TRL's ORPOConfig defaults to
    # 1e-6 and SFT to 2e-5. ORPO starts from a model without an SFT stage, so it needs more than DPO's 5e-7
    learning_rate: float = 5e-6
    odds_ratio_weight: float = 0.1  # lambda, the odds-ratio term's weight against the chosen answer's NLL
    disable_dropout: bool = True  # as TRL's ORPOConfig: chosen and rejected are contrasted under one network

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.odds_ratio_weight < math.inf:
            raise ValueError(f"odds_ratio_weight must be finite and >= 0 (0 is SFT on the chosen answers), not "
                             f"{self.odds_ratio_weight}")
