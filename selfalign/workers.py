"""Worker processes on one machine: where N of them run, and how long they live.

Shared by data-parallel training (`train.processes`, training/distributed.py) and data-parallel generation
(`processes` in a sampling section, generation/parallel.py): N workers take one GPU each (cuda:<rank>; pick which
with CUDA_VISIBLE_DEVICES), or, without a GPU, N CPU processes split the machine's cores. A worker dies with the
process that started it, so a killed run leaves none behind to write into its folder while it resumes.
"""

from __future__ import annotations

import os
import sys

from selfalign.errors import ConfigError


class PlacementError(ConfigError):
    """Worker processes that cannot be placed; `setting` is the config key at fault ("device" or "processes")."""

    def __init__(self, message: str, setting: str):
        super().__init__(message)
        self.setting = setting


def placement(processes: int, device: str) -> str:
    """"cuda" or "cpu": where `processes` workers run for the device setting `device`; a PlacementError when they
    cannot (also checked before a recipe's run folder is made, recipes/preflight.py)."""
    import torch

    if device not in ("auto", "cuda", "cpu"):
        raise PlacementError(f"with processes > 1 each process takes one GPU itself (cuda:<rank>; choose which with "
                             f"CUDA_VISIBLE_DEVICES): device must be auto, cuda or cpu, not {device!r}", "device")
    from selfalign.models import pick_device

    kind = pick_device(device)  # "cuda" or "cpu"; a ConfigError (the device's) for a cuda this torch does not see
    if kind == "cuda" and torch.cuda.device_count() < processes:
        raise PlacementError(f"{processes} processes, but this machine has {torch.cuda.device_count()} CUDA GPU(s): "
                             f"one process per GPU", "processes")
    if kind == "cpu" and cpu_cores() < processes:
        # each CPU worker holds its own copy of the model and needs a core of its own: more than the cores only
        # multiplies the memory and makes the workers take turns
        raise PlacementError(f"{processes} processes, but this process may use {cpu_cores()} CPU core(s): at most "
                             f"one process per core (on a CPU, one process with every core is as fast or faster: "
                             f"docs/generation.md)", "processes")
    return kind


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, as taskset or a container's cpuset limit it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_HOST_SHARED_BY = 1  # CPU workers that share this machine's cores and memory (set in each by enter_worker)


def host_shared_by() -> int:
    """How many CPU worker processes share this machine's memory with this one (1 outside CPU workers): a default
    sized from free memory (the lean loop's KV cache) takes this share of it, not all of it in every worker."""
    return _HOST_SHARED_BY


def enter_worker(rank: int, size: int, kind: str) -> str:
    """Set up worker `rank` of `size` placed on `kind` ("cuda" or "cpu"); returns its device. A CUDA worker takes
    GPU `rank`; CPU workers split the machine's cores and memory rather than each taking all of them."""
    global _HOST_SHARED_BY
    import torch

    die_with_parent()
    if kind == "cuda":
        torch.cuda.set_device(rank)
        return f"cuda:{rank}"
    torch.set_num_threads(max(1, cpu_cores() // size))
    _HOST_SHARED_BY = size
    return "cpu"


def die_with_parent() -> None:
    """Linux: this worker gets SIGKILL when the process that started it dies (prctl PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        return
    if os.getppid() == 1:  # the parent died before the call above took effect
        os._exit(1)
