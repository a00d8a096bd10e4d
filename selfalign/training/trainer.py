"""One small training loop shared by SFT, DPO and ORPO; SPA plugs into DPO through a noise hook.

Why our own loop rather than subclassing TRL's DPOTrainer: SPA needs the reference model's per-token logits (for the
extrapolated (1+λ)·h_θ − λ·h_ref log-probs) and a per-pair smoothing epsilon decided inside the step. TRL 1.16
computes the reference forward inside `_compute_loss` with a fused head that returns log-probs only, so getting the
logits means overriding `_compute_loss` (a private, often-changing method: METHODS.md §1 warns against it), and its
loss takes one `label_smoothing` float. Overriding `compute_loss` wholesale is possible, but then we re-implement
the forward, the losses and the reference handling anyway, and still carry TRL's dataset tokenisation (its own
prompt/response split) next to ours, plus HF Trainer's checkpoint format for resume. The loop below is ~150 lines,
uses our chat encoding and masks everywhere, resumes bit-exactly (data order and hook state included), and is as
fast: the LM head runs only on response positions, chosen and rejected share one forward, batches are
length-grouped, and a frozen reference is scored once and cached on disk (benchmarks/dpo_speed.py compares).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from selfalign.errors import DataError, SelfalignError
from selfalign.models import load_model, load_tokenizer, pick_device, resolve_model, umask_permissions
from selfalign.runs import model_fingerprint
from selfalign.training import distributed, memory
from selfalign.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from selfalign.training.config import DPOTrainConfig, ORPOTrainConfig, SFTTrainConfig, TrainConfig
from selfalign.training.data import (PairExample, SFTExample, batch_order, collate_pairs, collate_sft,
                                     encode_conversations, encode_pairs)
from selfalign.training.forward import autocast, reference_context, response_logits, sum_by_row, unwrap
from selfalign.training.losses import IGNORE, dpo_loss, extrapolated_token_logps, orpo_loss, token_logps
from selfalign.training.refcache import cache_path, pair_logps


# ------------------------------------------------------------------------------------------------ models
def amp_dtype(config: TrainConfig, device: str) -> torch.dtype | None:
    if config.precision == "bf16" or (config.precision == "auto" and device.startswith("cuda")):
        return torch.bfloat16
    return None


def prepare_policy(spec: str, config: TrainConfig, disable_dropout: bool = False, device: str | None = None):
    """The trainable model: fp32 master weights (bf16 autocast on GPU), LoRA if configured. Seeded, so LoRA's random
    init is reproducible."""
    torch.manual_seed(config.seed)  # the same on every training process: they start from identical weights
    random.seed(config.seed)
    w = distributed.world()
    device = device or (w.device if w is not None else pick_device(config.device))
    # several processes load at once: straight to each GPU, not N copies in host memory first
    model = load_model(spec, dtype="float32", device=device, load_on_device=w is not None)
    if hasattr(model, "merge_and_unload"):  # an adapter folder as the start point: train on top of it merged
        model = model.merge_and_unload()
    model.config.use_cache = False
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    if config.lora is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha,
                                                 lora_dropout=config.lora.dropout,
                                                 target_modules=list(config.lora.target_modules),
                                                 task_type="CAUSAL_LM"))
    if disable_dropout:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    model.train()
    return model, device


def shard_policy(policy, spec: str, config: TrainConfig, disable_dropout: bool = False):
    """With train.fsdp, the policy sharded over the training processes (rank 0 rebuilds an unsharded CPU copy to
    save it); else the policy itself."""
    if not config.fsdp:
        return policy
    return distributed.shard(policy, rebuild=lambda: prepare_policy(spec, config, disable_dropout, device="cpu")[0])


def frozen_model(spec: str, device: str):
    """A frozen reference. An adapter folder is merged, so the only peft model a trainer ever sees is the LoRA
    policy, whose reference is its own base (`reference_context` disables its adapters)."""
    model = load_model(spec, dtype="float32", device=device, load_on_device=distributed.world() is not None)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.config.use_cache = False
    model.requires_grad_(False)
    return model.eval()


def save_final(model, tokenizer, folder: Path, merge: bool = True) -> Path:
    """safetensors + tokenizer (with its chat template) in `folder`, written to a temp folder and renamed.
    LoRA is merged unless merge=False (then an adapter folder that `load_model` puts on its base)."""
    if hasattr(model, "merge_and_unload") and merge:
        model = model.merge_and_unload()
    unwrap(model).config.use_cache = True  # generation wants the KV cache back
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    if hasattr(model, "get_base_model"):  # adapter only: resolve_model wants a config.json in any model folder
        model.get_base_model().config.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    umask_permissions(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


# ------------------------------------------------------------------------------------------------ objectives
class SFTObjective:
    """Token cross-entropy on labelled tokens, normalised by the labelled tokens of the whole optimizer step."""

    def __init__(self, examples: list[SFTExample], pad_id: int):
        self.examples, self.pad_id = examples, pad_id
        self.lengths = [e.length for e in examples]

    def collate(self, idx: list[int]) -> dict:
        return collate_sft([self.examples[i] for i in idx], self.pad_id)

    def count(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def n_examples(self, batch: dict) -> int:
        return int(batch["input_ids"].size(0))

    def loss(self, model, batch: dict, step: int, max_steps: int):
        logits, targets, _ = response_logits(model, batch)
        loss = -token_logps(logits, targets).sum()
        return loss, {"loss": loss.detach()}

    def without_side_effects(self):
        """This objective for a pass that is not a step (the memory check): it keeps no state, so itself."""
        return self

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class DPOStepState:
    """What a noise hook sees for one micro-batch. Log-probs are summed over response tokens, [B], detached."""

    step: int  # optimizer steps done so far (0-based index of the current step)
    max_steps: int
    beta: float
    ids: list[str]
    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    reference_chosen: torch.Tensor
    reference_rejected: torch.Tensor
    extrapolated_chosen: torch.Tensor | None  # under softmax((1+λ)h_θ − λh_ref), when extrapolation_lambda is set
    extrapolated_rejected: torch.Tensor | None
    weights: torch.Tensor


NoiseHook = Callable[[DPOStepState], "torch.Tensor | float | None"]


class PairObjective:
    """What every objective on preference pairs shares: chosen and rejected in one batch (collate_pairs), and a step's
    loss averaged over its pairs."""

    def __init__(self, examples: list[PairExample], pad_id: int, config: TrainConfig):
        self.examples, self.pad_id, self.config = examples, pad_id, config
        self.lengths = [e.length for e in examples]

    def collate(self, idx: list[int]) -> dict:
        return collate_pairs([self.examples[i] for i in idx], self.pad_id)

    def count(self, batch: dict) -> int:
        return len(batch["ids"])

    def n_examples(self, batch: dict) -> int:
        return len(batch["ids"])

    def without_side_effects(self):
        """This objective for a pass that is not a step (the memory check): it keeps no state, so itself."""
        return self

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class DPOObjective(PairObjective):
    """(c)DPO with per-pair weights and a per-pair epsilon from `noise_hook` (SPA), reference log-probs either
    cached (`ref_logps` [n, 2]) or computed live by `reference` (a frozen model, or the policy with its LoRA
    adapters disabled). Live reference logits are what the extrapolated log-probs need."""

    def __init__(self, examples: list[PairExample], pad_id: int, config: DPOTrainConfig, ref_logps=None,
                 reference=None, noise_hook: NoiseHook | None = None, extrapolation_lambda: float | None = None):
        super().__init__(examples, pad_id, config)
        self.ref_logps, self.reference = ref_logps, reference
        self.noise_hook, self.lam = noise_hook, extrapolation_lambda
        if ref_logps is None and reference is None:
            raise ValueError("DPO needs cached reference log-probs or a reference model")
        if extrapolation_lambda and reference is None:
            raise ValueError("extrapolated log-probs need a live reference model (its logits are not cached)")

    def collate(self, idx: list[int]) -> dict:
        batch = super().collate(idx)
        if self.ref_logps is not None and self.reference is None:
            batch["ref"] = self.ref_logps[idx]
        return batch

    def loss(self, model, batch: dict, step: int, max_steps: int):
        n = batch["input_ids"].size(0)
        b = n // 2
        logits, targets, rows = response_logits(model, batch)
        lp = sum_by_row(token_logps(logits, targets), rows, n)
        ref_logits = None
        if "ref" in batch:
            ref = batch["ref"].to(lp.device)
        else:
            with torch.no_grad(), reference_context(self.reference):
                ref_logits, _, _ = response_logits(self.reference, batch)
                ref = sum_by_row(token_logps(ref_logits, targets), rows, n).view(2, b).T
        ext = None
        if self.lam is not None:  # λ = 0 is the plain policy (h̃ = h_θ): no reference logits needed
            ext = lp.detach() if self.lam == 0 else sum_by_row(
                extrapolated_token_logps(logits.detach(), ref_logits, targets, self.lam), rows, n)
        weights = batch["weights"].to(lp.device)
        eps = self.config.label_smoothing
        if self.noise_hook is not None:
            decided = _decide_noise(self.noise_hook, DPOStepState(
                step, max_steps, self.config.beta, batch["ids"], lp[:b].detach(), lp[b:].detach(), ref[:, 0],
                ref[:, 1], None if ext is None else ext[:b], None if ext is None else ext[b:], weights),
                batch.get("padding", False))
            if decided is not None:
                eps = decided.to(lp.device) if torch.is_tensor(decided) else decided
        loss, m = dpo_loss(lp[:b], lp[b:], ref[:, 0], ref[:, 1], self.config.beta, eps, weights, reduction="sum")
        eps = torch.as_tensor(eps, dtype=torch.float32).expand(b)
        metrics = {k: v.sum() for k, v in m.items()}
        metrics.update({"loss": loss.detach(), "logps/chosen": lp[:b].detach().sum(),
                        "logps/rejected": lp[b:].detach().sum(), "eps": eps.sum(), "noisy": (eps > 0).float().sum()})
        return loss, metrics

    def without_side_effects(self):
        """This objective without its noise hook, for a pass that is not a step (the memory check): SPA's hook
        would take the pass's pairs into its window and flag them in its log."""
        probe = copy.copy(self)
        probe.noise_hook = None
        return probe

    def state_dict(self) -> dict:
        hook = self.noise_hook
        return {"hook": hook.state_dict()} if hasattr(hook, "state_dict") else {}

    def load_state_dict(self, state: dict) -> None:
        if "hook" in state and hasattr(self.noise_hook, "load_state_dict"):
            self.noise_hook.load_state_dict(state["hook"])


def _decide_noise(hook: NoiseHook, state: DPOStepState, padding: bool):
    """The hook's decision for this process's pairs. With several training processes every process gives the hook
    the whole micro-batch (its pairs in the single-process order), so a stateful hook such as SPA's sliding window
    sees, and decides, exactly what it would in one process, and keeps the same state in each."""
    if distributed.world() is None:
        return hook(state)
    tensors = ("policy_chosen", "policy_rejected", "reference_chosen", "reference_rejected", "extrapolated_chosen",
               "extrapolated_rejected", "weights")
    mine = None if padding else {k: getattr(state, k) for k in ("ids",) + tensors}
    if mine is not None:
        mine = {k: v.detach().float().cpu() if torch.is_tensor(v) else v for k, v in mine.items()}
    parts = distributed.gather(mine)
    offset = sum(len(p["ids"]) for p in parts[:distributed.world().rank] if p is not None)
    parts = [p for p in parts if p is not None]
    whole = {k: (None if parts[0][k] is None else torch.cat([p[k] for p in parts])) for k in tensors}
    decided = hook(DPOStepState(state.step, state.max_steps, state.beta, [i for p in parts for i in p["ids"]],
                                **whole))
    if padding:  # its loss is multiplied by 0
        return 0.0
    if torch.is_tensor(decided) and decided.dim() > 0:
        return decided[offset:offset + len(state.ids)]
    return decided


class ORPOObjective(PairObjective):
    """ORPO: the chosen answer's NLL plus lambda x the log odds ratio of chosen over rejected, both from mean token
    log-probs under the policy alone (no reference model, no SFT stage before it)."""

    def loss(self, model, batch: dict, step: int, max_steps: int):
        n = batch["input_ids"].size(0)
        b = n // 2
        logits, targets, rows = response_logits(model, batch)
        tokens = torch.bincount(rows, minlength=n).clamp(min=1)  # every response keeps >= 1 token (encode_pairs)
        mean = sum_by_row(token_logps(logits, targets), rows, n) / tokens
        loss, m = orpo_loss(mean[:b], mean[b:], self.config.odds_ratio_weight, batch["weights"].to(mean.device),
                            reduction="sum")
        metrics = {k: v.sum() for k, v in m.items()}
        metrics["loss"] = loss.detach()
        return loss, metrics


# ------------------------------------------------------------------------------------------------ the loop
def fit(model, tokenizer, objective, config: TrainConfig, out_dir: str | Path, final_dir: str | Path,
        device: str = "cpu", on_checkpoint: Callable[[int, Path], None] | None = None, verbose: bool = True) -> dict:
    """Train `model` on `objective` and save it to `final_dir`. Every step is appended to `out_dir/log.jsonl`;
    checkpoints go to `out_dir/checkpoints/` and the run resumes from the latest one when called again."""
    out_dir, final_dir = Path(out_dir), Path(final_dir)
    main = distributed.is_main()  # with several processes, rank 0 alone writes the log, checkpoints and model
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    done = out_dir / "done.json"
    if done.exists() and final_dir.exists():
        return json.loads(done.read_text())
    if not objective.lengths:
        raise DataError("no training examples (every one was filtered out, or the data is empty)", path=str(out_dir))
    amp = amp_dtype(config, device)
    ga = config.grad_accum
    epoch0 = batch_order(objective.lengths, config.batch_size, config.seed, 0, config.group_by_length)
    max_steps = config.max_steps or math.ceil(config.epochs * len(epoch0) / ga)
    plan = [b for e in range(math.ceil(max_steps * ga / len(epoch0)))
            for b in batch_order(objective.lengths, config.batch_size, config.seed, e, config.group_by_length)]
    if not config.max_steps:
        # `epochs` passes exactly: when the batch count is not a multiple of grad_accum, the last step takes fewer
        # micro-batches (its loss is still normalised over what it saw) rather than borrowing the next epoch's
        plan = plan[:config.epochs * len(epoch0)]
    params = [p for p in model.parameters() if p.requires_grad]
    sharded = distributed.is_sharded(params[0])
    # The fused kernel (CPU and CUDA) is one pass over the parameters; the default foreach path was 6-15x slower
    # on the 2-core CPU for SmolLM2-135M (seconds per step).
    # weight decay on matrices only: biases and norm weights are exempt, as in HF Trainer (and most recipes)
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.learning_rate, fused=True)
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * max_steps), max_steps)
    checked = None
    if memory.wanted(config.memory_check, device):  # before a step, and before a checkpoint's optimizer state loads
        checked = memory.check_memory(model, objective, params, config.batch_size, ga, device, amp, max_steps)
        if verbose and main:
            memory.report(checked)
    start = 0
    # what a checkpoint's batch plan and schedule were made for: resuming under other settings or data would replay
    # or skip batches and mix two learning-rate schedules
    made_for = {"max_steps": max_steps, "grad_accum": ga, "batch_size": config.batch_size, "seed": config.seed,
                "group_by_length": config.group_by_length, "epochs": None if config.max_steps else config.epochs,
                "examples": len(objective.lengths),
                "lengths_sha256": hashlib.sha256(json.dumps(list(objective.lengths)).encode()).hexdigest()[:16]}
    ckpt = latest_checkpoint(out_dir / "checkpoints")
    if ckpt is not None:
        restored = load_checkpoint(ckpt, model, optimizer, scheduler, made_for)
        start, plan = restored["step"], restored["plan"]
        objective.load_state_dict(restored["extra"])
        if verbose and main:
            print(f"[train] resumed from {ckpt} (step {start}/{max_steps})", file=sys.stderr)
    log = _open_log(out_dir / "log.jsonl", keep_until=start) if main else None
    t_start, total_tokens = time.perf_counter(), 0
    row: dict = {}
    for step in range(start, max_steps):
        t0 = time.perf_counter()
        batches = []
        for idx in plan[step * ga:(step + 1) * ga]:
            rows, padding = distributed.share(idx)  # (idx, False) in a single process
            batches.append(objective.collate(rows) | ({"padding": True} if padding else {}))
        real = [b for b in batches if "padding" not in b]
        # normaliser over the whole step (all processes), not per micro-batch
        n = int(distributed.total(sum(objective.count(b) for b in real)))
        sums: dict[str, float] = {"_examples": sum(objective.n_examples(b) for b in real),
                                  "_tokens": sum(int(b["attention_mask"].sum()) for b in real)}
        for batch in batches:
            with autocast(device, amp):
                loss, metrics = objective.loss(model, batch, step, max_steps)
            if "padding" in batch:  # computed only to meet the other processes' collectives
                (loss * 0.0).backward()
                continue
            (loss / n).backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        distributed.sum_gradients(params)
        sums = distributed.sum_dicts(sums)
        examples, tokens = int(sums.pop("_examples")), int(sums.pop("_tokens"))
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        if sharded:  # the norm over all shards, the same in every process
            grad_norm = grad_norm.full_tensor()
        if not (math.isfinite(sums.get("loss", 0.0)) and math.isfinite(float(grad_norm))):
            # one such step makes every weight NaN, and the model saved at the end would be garbage
            raise SelfalignError(f"{out_dir}: step {step + 1}: the loss ({sums.get('loss', 0.0) / n:.4g}) or the "
                                 f"gradient norm ({float(grad_norm):.4g}) is not finite; the step was not applied: "
                                 f"lower train.learning_rate or check the data (the last checkpoint is kept)")
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        total_tokens += tokens
        row = {"step": step + 1, "epoch": round((step + 1) * ga / len(epoch0), 4), "lr": lr,
               "grad_norm": float(grad_norm), **{k: v / n for k, v in sums.items()},
               # examples (pairs for DPO) in the step, and what its loss was averaged over (pairs, or SFT's tokens)
               "examples": examples,
               "loss_normaliser": n,
               "tokens": tokens, "seconds": round(seconds, 4)}
        if str(device).startswith("cuda"):  # rank 0's peak so far: what sharding (train.fsdp) and batch sizes cost
            row["gpu_peak_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if main:
            log.write(json.dumps(row) + "\n")
            log.flush()
        if main and verbose and ((step + 1) % config.log_steps == 0 or step + 1 == max_steps):
            shown = (("nll", "log_odds_ratio", "rewards/accuracy") if "log_odds_ratio" in row  # ORPO
                     else ("rewards/margins", "rewards/accuracy"))
            extra = "".join(f" {k.split('/')[-1]} {row[k]:.3f}" for k in shown if k in row)
            print(f"[train] step {step + 1}/{max_steps} loss {row['loss']:.4f}{extra} lr {lr:.2e} "
                  f"{tokens / seconds:.0f} tok/s", file=sys.stderr)
        if config.save_steps and (step + 1) % config.save_steps == 0 and step + 1 < max_steps:
            full = distributed.full_state(model, optimizer) if sharded else None  # every process gathers
            if main:
                path = save_checkpoint(out_dir / "checkpoints", step + 1, model, optimizer, scheduler, plan,
                                       objective.state_dict(), keep=config.keep_checkpoints, made_for=made_for,
                                       full_state=full)
                if on_checkpoint is not None:
                    on_checkpoint(step + 1, path)
    seconds = time.perf_counter() - t_start
    summary = {"steps": max_steps, "resumed_from": start, "examples": len(objective.lengths),
               "final": {k: v for k, v in row.items() if k not in ("step", "epoch")},
               "seconds": round(seconds, 2), "tokens_per_second": round(total_tokens / max(seconds, 1e-9), 1),
               "final_dir": str(final_dir), **({"memory_check": checked.to_dict()} if checked else {})}
    whole = distributed.unsharded(model)  # a sharded model is gathered by every process, into rank 0's copy
    if main:
        log.close()
        save_final(whole, tokenizer, final_dir, merge=config.merge_lora)
        done.write_text(json.dumps(summary, indent=2))
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # the final model supersedes them
    return summary


def _open_log(path: Path, keep_until: int):
    """The per-step log, minus rows past the checkpoint we resume from (those steps are redone)."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                break  # a torn last line from a kill
            if r["step"] <= keep_until:
                rows.append(line + "\n")
    f = open(path, "w", encoding="utf-8")
    f.writelines(rows)
    return f


# ------------------------------------------------------------------------------------------------ entry points
def train_sft(model: str, conversations, config: SFTTrainConfig, out_dir: str | Path, final_dir: str | Path,
              on_checkpoint=None, verbose: bool = True) -> dict:
    """SFT of `model` (any spec `resolve_model` takes) on `Conversation` records (or pre-encoded SFTExamples)."""
    if config.processes > 1 and distributed.world() is None:
        return distributed.launch(train_sft, (model, conversations, config, out_dir, final_dir, on_checkpoint, verbose),
                                  config.processes, config.device)
    tokenizer = load_tokenizer(model)
    examples = conversations if conversations and isinstance(conversations[0], SFTExample) else encode_conversations(
        tokenizer, conversations, config.train_on, config.max_length, config.max_prompt_length)
    policy, device = prepare_policy(model, config)
    policy = shard_policy(policy, model, config)
    objective = SFTObjective(examples, tokenizer.pad_token_id)
    summary = fit(policy, tokenizer, objective, config, out_dir, final_dir, device, on_checkpoint, verbose)
    return {**summary, "truncated": sum(e.truncated for e in examples)}


def train_dpo(model: str, pairs, config: DPOTrainConfig, out_dir: str | Path, final_dir: str | Path,
              ref_model: str | None = None, noise_hook: NoiseHook | None = None,
              extrapolation_lambda: float | None = None, on_checkpoint=None, verbose: bool = True) -> dict:
    """DPO of `model` on `PreferencePair` records (or PairExamples) against `ref_model` (default: the initial
    model itself, i.e. the LoRA base with adapters off, or the untouched starting weights).

    With `cache_reference` and no extrapolation, reference log-probs are computed once into `out_dir` and the
    reference model is dropped before training. `noise_hook(DPOStepState) -> eps` decides a per-pair smoothing;
    `extrapolation_lambda` (SPA's λ) makes the state carry the extrapolated log-probs (needs a live reference)."""
    w = distributed.world()
    if config.processes > 1 and w is None:
        return distributed.launch(train_dpo, (model, pairs, config, out_dir, final_dir, ref_model, noise_hook,
                                              extrapolation_lambda, on_checkpoint, verbose),
                                  config.processes, config.device)
    if w is not None and not w.main and hasattr(noise_hook, "log_path"):
        noise_hook.log_path = None  # every process's hook decides the same; rank 0's writes the record
    tokenizer = load_tokenizer(model)
    examples = pairs if pairs and isinstance(pairs[0], PairExample) else encode_pairs(
        tokenizer, pairs, config.max_length, config.max_prompt_length)
    policy, device = prepare_policy(model, config, disable_dropout=config.disable_dropout)
    live = not config.cache_reference or bool(extrapolation_lambda)
    ref_logps = None
    if not live:  # scored by the whole (unsharded) model in each process, before any sharding: no collectives
        # the reference is the policy before its first step (or its base, adapters off), unless named
        reference = frozen_model(ref_model, device) if ref_model is not None else policy
        fingerprint = model_fingerprint(resolve_model(ref_model or model)) if distributed.is_main() else None
        key = json.dumps([distributed.gather(fingerprint)[0], config.precision, device.split(":")[0]])
        show = verbose and distributed.is_main()
        progress = (lambda i, n: print(f"[ref] {i}/{n} pairs", file=sys.stderr)) if show else None
        # several processes: each scores every size-th pair into its own cache file, and they swap the results
        rank, size = (w.rank, w.size) if w is not None else (0, 1)
        mine = examples[rank::size]
        with reference_context(reference):
            part = pair_logps(reference, mine, tokenizer.pad_token_id, config.reference_batch_size, device,
                              amp_dtype(config, device),
                              cache_path(out_dir, key if size == 1 else f"{key}#{rank}/{size}"), progress)
        ref_logps = torch.empty(len(examples), 2)
        for r, scored in enumerate(distributed.gather(part)):
            ref_logps[r::size] = scored.reshape(-1, 2)
        del reference  # frees a separate reference model
    # sharded before a separate reference loads, so a GPU never holds two whole fp32 models at once
    policy = shard_policy(policy, model, config, config.disable_dropout)
    reference = None
    if live:
        if ref_model is None and config.lora is not None:
            reference = policy  # its own base: the adapters are disabled around the reference pass
        else:
            reference = frozen_model(ref_model or model, device)
            if config.fsdp:
                reference = distributed.shard(reference)
    objective = DPOObjective(examples, tokenizer.pad_token_id, config, ref_logps, reference, noise_hook,
                             extrapolation_lambda)
    summary = fit(policy, tokenizer, objective, config, out_dir, final_dir, device, on_checkpoint, verbose)
    return {**summary, "truncated": sum(e.truncated for e in examples), "reference_cached": not live}


def train_orpo(model: str, pairs, config: ORPOTrainConfig, out_dir: str | Path, final_dir: str | Path,
               on_checkpoint=None, verbose: bool = True) -> dict:
    """ORPO of `model` on `PreferencePair` records (or PairExamples): one stage, no reference model."""
    if config.processes > 1 and distributed.world() is None:
        return distributed.launch(train_orpo, (model, pairs, config, out_dir, final_dir, on_checkpoint, verbose),
                                  config.processes, config.device)
    tokenizer = load_tokenizer(model)
    examples = pairs if pairs and isinstance(pairs[0], PairExample) else encode_pairs(
        tokenizer, pairs, config.max_length, config.max_prompt_length)
    policy, device = prepare_policy(model, config, disable_dropout=config.disable_dropout)
    policy = shard_policy(policy, model, config, config.disable_dropout)
    objective = ORPOObjective(examples, tokenizer.pad_token_id, config)
    summary = fit(policy, tokenizer, objective, config, out_dir, final_dir, device, on_checkpoint, verbose)
    return {**summary, "truncated": sum(e.truncated for e in examples)}
