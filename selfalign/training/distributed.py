"""Data-parallel training over several processes on one machine: one per GPU (NCCL), or CPU processes (gloo).

`train.processes: N` changes where a step runs, not what it computes. The batch plan stays the single-process one;
every micro-batch of `batch_size` rows is cut into N consecutive shares, one per process, and the step's loss is
still normalised over the whole step (its tokens for SFT, its pairs for DPO/ORPO). Gradients are summed across the
processes before clipping, so N processes train the same model as one, up to float summation order; a checkpoint
written with N processes resumes with any other number.

Why our own launcher rather than `accelerate launch`/`torchrun`: a recipe is one process that owns its run folder
(locks, manifest, resume) and runs generation and judging between its training stages. Only a training stage is
spread over processes, so the stage starts its workers itself (torch.multiprocessing, spawn) and gets rank 0's
summary back; the user runs the same `selfalign run` command on one GPU or eight. Why a plain all-reduce rather
than DistributedDataParallel: the trainer runs the backbone and the LM head as two calls (the head on response
positions only, forward.py), which bypasses DDP's forward hooks; and the step's micro-batches are reduced once, as
DDP's `no_sync` would do. With `train.fsdp` the model is sharded instead (`shard`: torch's FSDP2, whose root is a
module wrapping that two-call forward), and checkpoints are gathered into the single-process format.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from selfalign.errors import ConfigError, SelfalignError
from selfalign.workers import enter_worker, placement


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int
    size: int
    device: str  # "cuda:<rank>" or "cpu"

    @property
    def main(self) -> bool:
        """Rank 0 writes the log, checkpoints and the final model; the others only compute."""
        return self.rank == 0


_WORLD: World | None = None


def world() -> World | None:
    """The training processes this one belongs to, or None when training runs in a single process."""
    return _WORLD


def is_main() -> bool:
    return _WORLD is None or _WORLD.main


# ------------------------------------------------------------------------------------------------ the step's parts
def share(rows: list[int]) -> tuple[list[int], bool]:
    """This process's consecutive share of a micro-batch's rows, and whether it is padding.

    Shares differ by at most one row. A process whose share is empty (a micro-batch with fewer rows than processes,
    e.g. an epoch's last) gets the batch's first row as padding: it still runs the forward and backward the others
    run (every collective must be met by every process), and the trainer multiplies that loss by 0."""
    w = _WORLD
    if w is None:
        return rows, False
    lo, hi = w.rank * len(rows) // w.size, (w.rank + 1) * len(rows) // w.size
    return (rows[lo:hi], False) if hi > lo else (rows[:1], True)


def total(value: float) -> float:
    """The sum of `value` over the processes."""
    if _WORLD is None:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_WORLD.device)
    dist.all_reduce(t)
    return float(t.item())


def gather(obj: Any) -> list[Any]:
    """`obj` from every process, in rank order (picklable objects; tensors are sent as they are, so pass CPU ones)."""
    if _WORLD is None:
        return [obj]
    out: list[Any] = [None] * _WORLD.size
    dist.all_gather_object(out, obj)
    return out


def sum_dicts(sums: dict[str, float]) -> dict[str, float]:
    """Per-key sums over the processes (a key absent in one process counts 0 there)."""
    merged: dict[str, float] = {}
    for part in gather(sums):
        for k, v in part.items():
            merged[k] = merged.get(k, 0.0) + v
    return merged


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Every process's gradients replaced by their sum over the processes, in a few large all-reduces. (Sharded
    parameters are summed by FSDP in backward, each process keeping its shard of the sum.)"""
    if _WORLD is None or _WORLD.size == 1 or is_sharded(params[0]):
        return
    # a parameter no process gave a gradient keeps none, as in one process (AdamW then skips it: no decay, no step)
    used = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=_WORLD.device)
    dist.all_reduce(used)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    bucket: list[torch.Tensor] = []
    size = 0
    for g in grads:  # ~25M-element buckets, as DDP's default: few calls, bounded extra memory
        bucket.append(g)
        size += g.numel()
        if size >= 25_000_000:
            _all_reduce_flat(bucket)
            bucket, size = [], 0
    if bucket:
        _all_reduce_flat(bucket)
    for p, n in zip(params, used.tolist()):
        if n == 0:
            p.grad = None


def _all_reduce_flat(tensors: list[torch.Tensor]) -> None:
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


# ------------------------------------------------------------------------------------------------ FSDP
def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def check_fsdp() -> None:
    """A ConfigError unless this torch has what train.fsdp uses: FSDP2's public `fully_shard` with plain-sum gradient
    reductions (FSDPModule.set_gradient_divide_factor and set_force_sum_reduction_for_comms)."""
    import torch.distributed.fsdp as fsdp

    unit = getattr(fsdp, "FSDPModule", None)
    needed = ("set_gradient_divide_factor", "set_force_sum_reduction_for_comms")
    if not hasattr(fsdp, "fully_shard") or not all(hasattr(unit, m) for m in needed):
        raise ConfigError(f"train.fsdp needs a newer torch than {torch.__version__} (FSDP2's fully_shard with "
                          f"sum reductions); upgrade torch, or train without fsdp")


def shard(model, rebuild: Callable | None = None):
    """`model` with its weights, and so its gradients and optimizer state, sharded over the processes (FSDP2's
    fully_shard): each decoder layer (the classes a transformers model lists in `_no_split_modules`) is one unit,
    gathered around its own forward and backward; the embeddings, final norm and LM head form the root unit, a
    ResponseLogitsModel around `model`. Gradients are reduced as sums, not means (the trainer normalises the loss
    itself). `rebuild()` makes an unsharded copy of the model on the CPU for `unsharded` to fill (rank 0 only).

    Parameters stay fp32 and bf16 autocast runs the matmuls, exactly as in one process (no FSDP mixed-precision
    policy, which would all-gather bf16 weights and so compute norms and the head in bf16 too)."""
    check_fsdp()
    from torch.distributed.fsdp import fully_shard

    from selfalign.training.forward import ResponseLogitsModel, unwrap

    units = set(getattr(unwrap(model), "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in units]
    if not layers:
        raise SelfalignError(f"{type(unwrap(model)).__name__}: train.fsdp needs the model's decoder layer class "
                             f"(transformers' _no_split_modules), and this model names none")
    root = ResponseLogitsModel(model)
    for unit in layers + [root]:
        fully_shard(unit)
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM, which gloo has too (not NCCL's PreMulSum)
    root.rebuild = rebuild
    return root


def full_state(model, optimizer=None) -> tuple[dict | None, dict | None]:
    """A sharded model's trainable weights (named as in the unsharded model) and optimizer state (in the format
    `optimizer.state_dict()` has in one process: parameters numbered in group order), gathered on rank 0's CPU;
    (None, None) in the other processes. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    # frozen weights (a LoRA base) are not gathered: a checkpoint holds the trained ones, and `unsharded` reloads the
    # rest from the model's files
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    if optimizer is None:
        weights, optim = get_model_state_dict(model, options=options), None
    else:
        weights, optim = get_state_dict(model, optimizer, options=options)
    if not is_main():
        return None, None
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    weights = {_unsharded_name(n): weights[n].contiguous() for n in trainable}
    if optimizer is not None:
        number = {fqn: i for i, fqn in enumerate(fqn for g in optim["param_groups"] for fqn in g["params"])}
        optim = {"state": {number[fqn]: v for fqn, v in optim["state"].items()},
                 "param_groups": [{**g, "params": [number[f] for f in g["params"]]} for g in optim["param_groups"]]}
    return weights, optim


def load_full_state(model, optimizer, weights: dict | None, optim: dict | None) -> None:
    """The inverse of `full_state`: rank 0 passes what it read from a checkpoint, the others None; rank 0's copy is
    sharded out to every process."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    model_sd, optim_sd = {}, {}
    if is_main():
        trainable = {_unsharded_name(n) for n, p in model.named_parameters() if p.requires_grad}
        sizes = [len(g["params"]) for g in optimizer.param_groups]
        saved = [len(g["params"]) for g in optim["param_groups"]]
        if set(weights) != trainable or saved != sizes:
            raise ConfigError(f"a checkpoint does not fit this model or training ({len(weights)} weights for "
                              f"{len(trainable)} trainable, optimizer groups of {saved} for {sizes}); it was written "
                              f"for another model or by an older selfalign: delete the stage's checkpoints/ to start "
                              f"its training over")
        model_sd = {n: weights[_unsharded_name(n)] for n, p in model.named_parameters() if p.requires_grad}
        name_of = {id(p): n for n, p in model.named_parameters()}
        # the single-process numbering: parameters counted through the optimizer's groups in order
        fqn_of = dict(enumerate(name_of[id(p)] for g in optimizer.param_groups for p in g["params"]))
        groups = optim["param_groups"]
        optim_sd = {"state": {fqn_of[i]: v for i, v in optim["state"].items()},
                    "param_groups": [{**g, "params": [fqn_of[i] for i in g["params"]]} for g in groups]}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    # two calls, not set_state_dict: that one skips the model in the processes whose (empty) model dict is only to
    # receive rank 0's broadcast, and they would then wait on the wrong collective
    set_model_state_dict(model, model_sd, options=options)
    set_optimizer_state_dict(model, optimizer, optim_sd, options=options)


def unsharded(model):
    """A model ready to save: `model` itself unless sharded; else every process gathers the weights and rank 0
    gets its rebuilt CPU copy holding them (the other processes get None)."""
    if not hasattr(model, "rebuild"):
        return model
    weights, _ = full_state(model)
    if not is_main():
        return None
    copy = model.rebuild()
    params = dict(copy.named_parameters())
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    return copy


def _unsharded_name(fqn: str) -> str:
    return fqn.removeprefix("model.")  # ResponseLogitsModel's attribute


def barrier() -> None:
    if _WORLD is not None:
        dist.barrier()


# ------------------------------------------------------------------------------------------------ the launcher
def launch(target: Callable, args: tuple, processes: int, device: str = "auto") -> Any:
    """Run `target(*args)` in `processes` spawned workers that form one process group; return rank 0's result.

    `device`: auto (CUDA when there is one, else CPU), cuda or cpu: one GPU per worker on CUDA. A worker's error
    ends all of them, and a SelfalignError comes back as one line. Workers die with this process (Linux), so a
    killed run leaves none behind to write into its folder while it resumes."""
    kind = placement(processes, device)
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    results = mp.get_context("spawn").SimpleQueue()
    workers = mp.start_processes(_worker, args=(processes, _free_port(), kind, target, args, results),
                                 nprocs=processes, join=False, start_method="spawn")
    reported: list = []
    try:
        while not workers.join(timeout=1.0):
            reported += _drain(results)  # read as they come: a worker blocked on a full pipe would never exit
    except ProcessException as e:
        reported += _drain(results)
        errors = [r for r in reported if r[0] == "error"]
        if errors:  # the first failing worker's own error; the others were stopped because of it
            _, is_user_error, message = errors[0]
            if is_user_error:
                raise SelfalignError(message) from None
            raise RuntimeError(f"a training process failed: {message}") from e
        raise SelfalignError(f"a training process died ({e}); run the same command again to resume") from None
    reported += _drain(results)
    return next(r[1] for r in reported if r[0] == "result")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _drain(queue) -> list:
    out = []
    while not queue.empty():
        out.append(queue.get())
    return out


def _worker(rank: int, size: int, port: int, kind: str, target: Callable, args: tuple, results) -> None:
    global _WORLD
    device = enter_worker(rank, size, kind)
    dist.init_process_group("nccl" if kind == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=size, timeout=datetime.timedelta(seconds=collective_timeout()))
    _WORLD = World(rank, size, device)
    try:
        result = target(*args)
        if rank == 0:
            results.put(("result", result))
        dist.barrier()
    except BaseException as e:
        results.put(("error", isinstance(e, SelfalignError), str(e) or type(e).__name__))
        raise
    finally:
        _WORLD = None
        dist.destroy_process_group()


def collective_timeout() -> float:
    """Seconds a process waits for the others at a collective before failing (rank 0 writes checkpoints and the
    final model while the others wait): $SELFALIGN_COLLECTIVE_TIMEOUT, default an hour."""
    return float(os.environ.get("SELFALIGN_COLLECTIVE_TIMEOUT", 3600))
