"""Checkpoints a killed run resumes from: trainable weights, optimizer, scheduler, RNG states, step, data order and
any loss-hook state (e.g. SPA's sliding confidence window).

A checkpoint is written into `step-N.tmp/` and renamed to `step-N/` only when complete, so a kill during the write
leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from selfalign.errors import ConfigError
from selfalign.models import umask_permissions


def trainable_state(model) -> dict[str, torch.Tensor]:
    # named_parameters() lists tied weights (embeddings = LM head) once, which safetensors requires.
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(folder: Path, step: int, model, optimizer, scheduler, plan: list[list[int]], extra: dict,
                    keep: int = 1, made_for: dict | None = None, full_state: tuple | None = None) -> Path:
    """`made_for`: the settings the plan and schedule belong to (steps, batch sizes, seed, a digest of the data);
    `load_checkpoint` refuses to resume under others. `full_state`: (weights, optimizer state) of a sharded model,
    gathered by `distributed.full_state`; the checkpoint is then the one an unsharded run writes."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step}"
    tmp = folder / f"step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights, optimizer_state = full_state or (trainable_state(model), optimizer.state_dict())
    save_file(weights, str(tmp / "trainable.safetensors"))
    umask_permissions(tmp / "trainable.safetensors")
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rng,
                "plan": plan, "extra": extra, "made_for": made_for or {}}, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(checkpoints(folder), key=_step)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _step(p: Path) -> int:
    return int(p.name.split("-")[1])


def checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]


def latest_checkpoint(folder: Path) -> Path | None:
    found = checkpoints(folder)
    return max(found, key=_step) if found else None


def progress(out_dir: Path) -> str | None:
    """Where an unfinished training folder (a trainer's `out_dir`) stands, for `selfalign status`: the last step it
    logged and the checkpoint a resume starts from; None for a folder with no log."""
    try:
        lines = (Path(out_dir) / "log.jsonl").read_text().splitlines()
    except OSError:  # no log: not a training folder, or no step yet
        return None
    last = 0
    for line in reversed(lines):
        try:
            last = int(json.loads(line)["step"])
            break
        except (ValueError, KeyError, TypeError):  # a line torn by the kill
            continue
    if (Path(out_dir) / "done.json").exists():  # trained and saved (its checkpoints are gone): nothing to retrain
        return f"stopped after its last step ({last}), with its model saved: the resumed stage trains nothing"
    latest = latest_checkpoint(Path(out_dir) / "checkpoints")
    resumes = f"resumes from its checkpoint at step {_step(latest)}" if latest else "no checkpoint: resumes from step 0"
    return f"stopped after step {last}; {resumes}"


def load_checkpoint(path: Path, model, optimizer, scheduler, made_for: dict | None = None) -> dict:
    """Restore everything into the live objects; returns {"step", "plan", "extra"}. A checkpoint whose `made_for`
    differs from this run's is a ConfigError (checkpoints written before it was recorded are not checked).
    A sharded model (train.fsdp) is restored by every training process at once, from rank 0's reading."""
    from selfalign.training import distributed

    sharded = distributed.is_sharded(next(model.parameters()))
    # weights_only: a run folder is data, never code. mmap when sharded: the processes that do not read the
    # optimizer state (all but rank 0) do not load it into memory either
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True, mmap=sharded)
    saved = state.get("made_for") or {}
    changed = sorted(k for k in saved if made_for is not None and k in made_for and saved[k] != made_for[k])
    if changed:
        diffs = ", ".join(f"{k} {saved[k]} -> {made_for[k]}" for k in changed)
        raise ConfigError(f"{path}: this checkpoint was written for other training settings or data ({diffs}); "
                          f"resuming would replay or skip batches. Restore the settings, or delete "
                          f"{path.parent} to start this training over")
    if sharded:
        main = distributed.is_main()
        distributed.load_full_state(model, optimizer, load_file(str(path / "trainable.safetensors")) if main else None,
                                    state["optimizer"] if main else None)
    else:
        _load_unsharded(path, model, optimizer, state)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return {"step": state["step"], "plan": state["plan"], "extra": state["extra"]}


def _load_unsharded(path: Path, model, optimizer, state: dict) -> None:
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    unknown = [n for n in weights if n not in params]
    absent = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if unknown or absent:
        raise RuntimeError(f"{path}: checkpoint does not match the model (unknown {unknown[:3]}, absent {absent[:3]})")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as e:  # e.g. written before weight decay spared biases and norms (one param group, not two)
        raise ConfigError(f"{path}: its optimizer state does not fit this training ({e}); it was probably written by "
                          f"an older selfalign. Delete {path.parent} to start this training over") from None
