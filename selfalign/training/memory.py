"""The memory check before training: the heaviest micro-batch's forward and backward, once, before the first step.

Why: the usual way a fine-tune runs out of memory is hours in, when the heaviest batch comes up (trl#1024, #1619,
#2452; LlamaFactory#6800); a formula from the model's shapes misses the attention kernel, the allocator and the
loss's temporaries. So the trainer runs a batch no step can outweigh once (the examples with the most trained
tokens, padded to the longest example's length), with stand-ins for AdamW's state resident (two tensors per trained
parameter, which the first step creates and every later step carries), reads the peak the device reports, and
refuses, in one line and before any step, a run that would not fit. The pass leaves no trace: its gradients are
dropped, the random generators are restored, and a noise hook does not see it, so the run trains exactly as it
would without it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from selfalign.errors import SelfalignError
from selfalign.training import distributed
from selfalign.training.forward import autocast
from selfalign.training.losses import IGNORE

GiB = 2**30
REMEDIES = ("lower train.batch_size (raise train.grad_accum to keep the step's size), lower train.max_length, set "
            "train.gradient_checkpointing: true, train LoRA adapters (train.lora: {}), or shard over GPUs "
            "(train.processes with train.fsdp: true)")


# said of a figure above 90% of what the device has: on CUDA the allocator's fragmentation (memory reserved beyond
# what is allocated) is not in the figure; on a CPU, a step's memory varies with what the C allocator keeps
TIGHT = (": close to the limit (fragmentation is not counted): a smaller batch_size with a larger grad_accum is "
         "safer")


@dataclass
class MemoryCheck:
    device: str
    examples: int  # in the heaviest micro-batch (this process's share)
    tokens: int  # its longest sequence, in tokens
    trained_tokens: int  # its tokens that carry loss (the LM head's rows)
    # the pass's peak: weights, AdamW's state, gradients, activations, logits (on a CPU: the whole process's)
    needed_gb: float
    optimizer_gb: float  # of which AdamW's state
    available_gb: float  # what this process can have on the device

    def batch(self) -> str:
        return (f"{self.examples} example{'s' if self.examples != 1 else ''} of up to {self.tokens} tokens, "
                f"{self.trained_tokens} trained")

    def to_dict(self) -> dict:
        return {"device": self.device, "examples": self.examples, "tokens": self.tokens,
                "trained_tokens": self.trained_tokens,
                "needed_gb": round(self.needed_gb, 3), "optimizer_gb": round(self.optimizer_gb, 3),
                "available_gb": round(self.available_gb, 3)}


def wanted(setting: str, device: str) -> bool:
    """`train.memory_check`: auto checks on CUDA (where running out is an error mid-run; on a CPU it is swap or the
    OOM killer, and the pass would cost a step on every small run), always and never as they say."""
    return setting == "always" or (setting == "auto" and str(device).startswith("cuda"))


def heaviest_batch(lengths: list[int], trained_tokens: list[int], batch_size: int) -> tuple[list[int], int]:
    """The rows of the heaviest micro-batch a step can meet, and the width to pad it to: the `batch_size` examples
    with the most trained tokens (the LM head's logits, [trained tokens, vocab], are often a small model's largest
    tensors, and a long prompt with a short answer has few), padded to the longest example's length (activations
    grow with the padded width). No real micro-batch is wider or has more trained tokens, so its pass bounds every
    step's."""
    rows = sorted(range(len(trained_tokens)), key=trained_tokens.__getitem__)[-batch_size:]
    return rows, max(lengths)


def widen(batch: dict, width: int, pad_id: int) -> dict:
    """`batch` right-padded to `width` positions, as a batch holding a longer example would be."""
    extra = width - batch["input_ids"].shape[1]
    if extra <= 0:
        return batch
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE}
    return {**batch, **{k: torch.nn.functional.pad(batch[k], (0, extra), value=v) for k, v in fill.items()}}


def check_memory(model, objective, params: list[torch.nn.Parameter], batch_size: int, grad_accum: int,
                 device: str, amp: torch.dtype | None, max_steps: int) -> MemoryCheck:
    """Run the heaviest micro-batch's forward and backward on `model` under `objective` (as the training step does)
    beside stand-ins for AdamW's state, measure the peak, and raise a one-line SelfalignError when it exceeds what
    the device has. Every process of a multi-process run calls it (the pass meets the same collectives as a step)."""
    cuda = str(device).startswith("cuda")
    rows, width = heaviest_batch(objective.lengths, [e.trained_tokens for e in objective.examples], batch_size)
    mine, padding = distributed.share(rows)
    batch = widen(objective.collate(mine), width, objective.pad_id)
    probe = objective.without_side_effects()
    cpu_rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if cuda else None
    available = _available(device)
    out_of_memory = False
    moments = []
    try:
        # fused AdamW's exp_avg and exp_avg_sq, in the parameters' dtype (fp32 master weights); a sharded
        # parameter's are its shard's. Allocated and written, so a CPU counts their pages too
        moments = [torch.zeros_like(_local(p)) for p in params for _ in range(2)]
        if grad_accum > 1:  # a later micro-batch of the step runs beside the gradients the first ones left
            for p in params:
                p.grad = torch.zeros_like(p)
        _reset_peak(device)
        with autocast(device, amp):
            loss, _ = probe.loss(model, batch, 0, max_steps)
        (loss * 0.0 if padding else loss).backward()
        distributed.sum_gradients(params)
        del loss
    except torch.OutOfMemoryError:
        out_of_memory = True
    finally:
        for p in params:
            p.grad = None
        torch.random.set_rng_state(cpu_rng)
        if cuda:
            torch.cuda.set_rng_state_all(cuda_rng)
    peak = _peak(device)
    optimizer = sum(m.numel() * m.element_size() for m in moments)
    del moments
    if cuda:
        torch.cuda.empty_cache()  # the failed or finished pass's blocks, so the first step starts as it would have
    trained = sum(objective.examples[i].trained_tokens for i in mine)
    result = MemoryCheck(str(device), len(mine), width, trained, peak / GiB, optimizer / GiB, available / GiB)
    too_big = out_of_memory or result.needed_gb > result.available_gb
    # a process that ran out of memory stopped inside the pass, where the others may still wait in its collectives:
    # it says so at once (and the launcher stops the others) rather than meet them in another collective
    if out_of_memory or distributed.total(float(too_big)):
        what = (f"ran out of memory on {device} in its forward and backward beside AdamW's state" if out_of_memory
                else f"needs {result.needed_gb:.1f} GiB on {device} (AdamW's state {result.optimizer_gb:.1f} of it) "
                f"where {result.available_gb:.1f} GiB is available" if too_big
                else "does not fit on another process's device")
        raise SelfalignError(f"train: the heaviest micro-batch ({result.batch()}) {what}: {REMEDIES}; or "
                             f"train.memory_check: never to train anyway")
    return result


def report(result: MemoryCheck) -> None:
    print(f"[train] memory check: the heaviest micro-batch ({result.batch()}) needs {result.needed_gb:.2f} GiB on "
          f"{result.device} (AdamW's state {result.optimizer_gb:.2f} of it) of {result.available_gb:.1f} GiB available"
          + (TIGHT if result.needed_gb > 0.9 * result.available_gb else ""), file=sys.stderr)


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if distributed.is_sharded(p) else p


def _reset_peak(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the process's peak resident size (VmHWM) to its current size
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # elsewhere the peak is the process's peak so far: higher, never lower


def _peak(device: str) -> int:
    """Bytes: on CUDA the allocator's peak since the reset; on a CPU the process's peak resident size."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    import resource

    status = _proc_status()
    if "VmHWM" in status:
        return status["VmHWM"]
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # B / kB


def _available(device: str) -> int:
    """Bytes this process can have on `device`: on CUDA the free memory plus what its allocator holds already; on a
    CPU what the process holds plus what the machine has available, shared by its processes."""
    if str(device).startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device)
    import psutil

    from selfalign.workers import host_shared_by

    return _proc_status().get("VmRSS", 0) + psutil.virtual_memory().available // host_shared_by()


def _proc_status() -> dict[str, int]:
    """The byte counts of /proc/self/status (VmRSS, VmHWM, ...); empty where there is none."""
    try:
        with open("/proc/self/status") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0]) * 1024
    return out
