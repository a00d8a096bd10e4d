"""The memory check before training: the longest micro-batch's forward and backward, run once before the first step.

Why: the usual way a fine-tune runs out of memory is hours in, when the batch of the longest examples comes up
(trl#1024, #1619, #2452; LlamaFactory#6800); a formula from the model's shapes misses the attention kernel, the
allocator and the loss's temporaries. So the trainer runs that batch once, with stand-ins for AdamW's state
resident (two tensors per trained parameter, which the first step creates and every later step carries), reads the
peak the device reports, and refuses, in one line and before any step, a run that would not fit. The pass leaves no
trace: its gradients are dropped, the random generators are restored, and a noise hook does not see it, so the run
trains exactly as it would without it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from selfalign.errors import SelfalignError
from selfalign.training import distributed
from selfalign.training.forward import autocast

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
    examples: int  # in the longest micro-batch (this process's share)
    tokens: int  # its longest sequence, in tokens
    # the pass's peak: weights, AdamW's state, gradients, activations, logits (on a CPU: the whole process's)
    needed_gb: float
    optimizer_gb: float  # of which AdamW's state
    available_gb: float  # what this process can have on the device

    def to_dict(self) -> dict:
        return {"device": self.device, "examples": self.examples, "tokens": self.tokens,
                "needed_gb": round(self.needed_gb, 3), "optimizer_gb": round(self.optimizer_gb, 3),
                "available_gb": round(self.available_gb, 3)}


def wanted(setting: str, device: str) -> bool:
    """`train.memory_check`: auto checks on CUDA (where running out is an error mid-run; on a CPU it is swap or the
    OOM killer, and the pass would cost a step on every small run), always and never as they say."""
    return setting == "always" or (setting == "auto" and str(device).startswith("cuda"))


def longest_batch(lengths: list[int], batch_size: int) -> list[int]:
    """The examples of the micro-batch with the most tokens: the `batch_size` longest."""
    return sorted(range(len(lengths)), key=lengths.__getitem__)[-batch_size:]


def check_memory(model, objective, params: list[torch.nn.Parameter], batch_size: int, device: str,
                 amp: torch.dtype | None, max_steps: int) -> MemoryCheck:
    """Run the longest micro-batch's forward and backward on `model` under `objective` (as the training step does)
    beside stand-ins for AdamW's state, measure the peak, and raise a one-line SelfalignError when it exceeds what
    the device has. Every process of a multi-process run calls it (the pass meets the same collectives as a step)."""
    cuda = str(device).startswith("cuda")
    rows, padding = distributed.share(longest_batch(objective.lengths, batch_size))
    batch = objective.collate(rows)
    probe = objective.without_side_effects()
    cpu_rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if cuda else None
    available = _available(device)
    _reset_peak(device)
    out_of_memory = False
    moments = []
    try:
        # fused AdamW's exp_avg and exp_avg_sq, in the parameters' dtype (fp32 master weights); a sharded
        # parameter's are its shard's. Allocated and written, so a CPU counts their pages too
        moments = [torch.zeros_like(_local(p)) for p in params for _ in range(2)]
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
    result = MemoryCheck(str(device), len(rows), int(batch["input_ids"].shape[1]), peak / GiB, optimizer / GiB,
                         available / GiB)
    too_big = out_of_memory or result.needed_gb > result.available_gb
    if distributed.total(float(too_big)):  # every process stops together, not one while the others wait for it
        what = (f"ran out of memory on {device} in its forward and backward beside AdamW's state" if out_of_memory
                else f"needs {result.needed_gb:.1f} GiB on {device} (AdamW's state {result.optimizer_gb:.1f} of it) "
                f"where {result.available_gb:.1f} GiB is available" if too_big
                else "does not fit on another process's device")
        raise SelfalignError(f"train: the longest micro-batch ({result.examples} examples of up to {result.tokens} "
                             f"tokens) {what}: {REMEDIES}; or train.memory_check: never to train anyway")
    return result


def report(result: MemoryCheck) -> None:
    print(f"[train] memory check: the longest micro-batch ({result.examples} examples, {result.tokens} tokens) needs "
          f"{result.needed_gb:.2f} GiB on {result.device} (AdamW's state {result.optimizer_gb:.2f} of it) of "
          f"{result.available_gb:.1f} GiB available" + (TIGHT if result.needed_gb > 0.9 * result.available_gb else ""),
          file=sys.stderr)


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
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux (not reached there)


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
