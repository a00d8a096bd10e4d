"""Small helpers shared by the recipe files."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Callable

from selfalign.config import config_error, config_to_dict
from selfalign.data import PreferencePair, Prompt, write_jsonl
from selfalign.data.loaders import load_preference_pairs, load_prompts, shared_data_dir
from selfalign.errors import ConfigError
from selfalign.recipes import preflight
from selfalign.runs import Run, stage_done


def data_file(path: str, key: str | None = None) -> Path:
    """A data path from a config: absolute, relative to the working directory, or relative to the shared real-data
    folder (`preferences/ultrafeedback_binarized_train_1k.jsonl`), in that order. `key`: the config key that named
    it, so that the CLI can point at the line that gave it."""
    if not str(path).strip():  # Path("") is ".", which exists
        problem = "empty path (give a data file)"
        raise config_error(key, problem) if key else ConfigError(problem)
    p = Path(path)
    for cand in (p, shared_data_dir() / p):
        if cand.exists():
            return cand
    problem = f"data file '{path}' not found (looked in the working directory and {shared_data_dir()})"
    raise config_error(key, problem) if key else ConfigError(problem)


def prompt_pool(path: str, sources: list[str], exclude: set[str] = frozenset(),
                single_turn: bool = False) -> list[Prompt]:
    """The unlabelled prompts a recipe samples from (config keys `prompts` and `prompt_sources`): those whose
    `source` is listed (all when none is), minus the texts in `exclude` (the seed's or the reviser's prompts).
    A listed source that no prompt has is refused: it would only shrink the pool, and the size error that follows
    would not say why."""
    file = data_file(path, "prompts")
    prompts = load_prompts(file)
    missing = [s for s in sources if s not in {p.meta.get("source") for p in prompts}]
    if missing:
        known = sorted({str(p.meta["source"]) for p in prompts if p.meta.get("source") is not None})
        raise config_error("prompt_sources", f"{', '.join(map(repr, missing))}: no prompt in {file} has this "
                           f"source (its sources: {', '.join(known) or 'none, no prompt has a source field'})")
    return [p for p in prompts if p.text.strip() not in exclude and (not sources or p.meta.get("source") in sources)
            and (not single_turn or len(p.messages) == 1)]


def too_few_prompts(key: str, need: int, available: int, what: str = "prompts", also: tuple[str, ...] = (),
                    asked: str = "") -> ConfigError:
    """The size error for `prompt_pool`'s result, blamed on `key` or on whichever of `also`, `prompt_sources` and
    `prompts` an --set changed."""
    return config_error(key, f"{need} prompts asked for{f' ({asked})' if asked else ''}; only {available} {what} "
                             "are available", also=(*also, "prompt_sources", "prompts"))


def load_pairs(path: str, key: str, limit: int | None, limit_key: str, need: tuple[str, ...],
               drop_identical: bool = True, note: bool = True) -> tuple[list[PreferencePair], dict]:
    """A recipe's preference pairs (config key `key`) and their account for the data stage's summary: pairs in
    the file, dropped (identical answers; an empty answer among `need`), used. Unless a `limit` was met, what was
    dropped, and a limit the file could not fill, are also said on stderr when the run starts (not only in the
    manifest; `note=False` leaves that to the caller). Pair ids must be unique: the run's files and logs key pairs
    by id."""
    counts: dict = {}
    file = data_file(path, key)
    pairs = load_preference_pairs(file, limit=limit, drop_identical=drop_identical, drop_empty=need, counts=counts,
                                  unique_ids=True)
    dropped = [f"{counts[k]} with {what}" for k, what in (("identical_dropped", "identical answers"),
                                                          ("empty_dropped", f"an empty {' or '.join(need)}"))
               if counts[k]]
    filled = limit is not None and counts["used"] >= limit  # a limit met: what was dropped changed nothing used
    notes = [f"dropped {', '.join(dropped)}"] if dropped and not filled else []
    if limit is not None and not filled:
        notes.append(f"{limit_key} {limit} is more than the {counts['used']} usable")
    if notes and note:
        print(f"selfalign: note: {key}: {file} has {counts['in_file']} pairs; {'; '.join(notes)}; using "
              f"{counts['used']}", file=sys.stderr)
    return pairs, counts


def train_and_held_out_pairs(config: Any) -> tuple[dict[str, list], dict]:
    """The data stage of a recipe trained on preference pairs (DPO, ORPO): config keys `data`, `limit`,
    `eval_data`, `eval_limit`. Training pairs, and held-out pairs whose instructions the training pairs do not have
    (the same file given as both, or overlapping files, would report training accuracy as held-out)."""
    train, train_counts = load_pairs(config.data, "data", config.limit, "limit", need=("chosen", "rejected"))
    summary = {"train_pairs": len(train), "train_data": train_counts}
    held_out: list[PreferencePair] = []
    if config.eval_limit:
        seen = {p.prompt.strip() for p in train}
        candidates, counts = load_pairs(config.eval_data, "eval_data", None, "eval_limit",
                                        need=("chosen", "rejected"), note=False)
        held_out = [p for p in candidates if p.prompt.strip() not in seen]
        counts["in_training_dropped"] = len(candidates) - len(held_out)
        if candidates and not held_out:
            raise config_error("eval_data", f"every pair's instruction in {config.eval_data} is also in the "
                               f"training pairs ({config.data}): nothing is held out", also=("data",))
        if not held_out:
            raise config_error("eval_data", f"{config.eval_data}: no pair with two different, non-empty answers")
        held_out = held_out[:config.eval_limit]
        counts["used"] = len(held_out)
        if len(held_out) < config.eval_limit:
            dropped = ", ".join(f"{counts[k]} {what}" for k, what in (
                ("identical_dropped", "with identical answers"), ("empty_dropped", "with an empty answer"),
                ("in_training_dropped", "sharing an instruction with a training pair")) if counts[k])
            print(f"selfalign: note: eval_data: eval_limit {config.eval_limit} is more than the {len(held_out)} "
                  f"usable held-out pairs of {counts['in_file']} in {config.eval_data}"
                  f"{f' (dropped {dropped})' if dropped else ''}", file=sys.stderr)
        summary.update(eval_pairs=len(held_out), eval_data=counts)
    return {"train.jsonl": train, "eval.jsonl": held_out}, summary


def start_run(run_dir: str, config: Any, recipe: str, seed: int | None, check_inputs: Callable[[Any], None],
              prepare_data: Callable[[Any], tuple[dict[str, list], dict]]) -> Run:
    """A recipe's run folder, made only once its inputs are known to be good, with its data stage done.

    `check_inputs(config)` and `prepare_data(config)` (which reads and splits the data files) run before the folder
    exists: a run folder is locked to the config it started with, so a failure after it was made would lock it to
    the bad config. A resumed run whose data stage is done skips `prepare_data`: its splits are on disk, and data
    paths relative to where it started need not resolve from where it resumes. The data stage then writes each split
    (file name -> records) under DIR/data/. API endpoints get their one request (preflight) only for a new folder:
    a resumed run may run its local stages while its critic or judge server is down."""
    resuming = (Path(run_dir) / "manifest.json").exists()
    preflight.training(config)  # settings that cannot run here, before any model is resolved or endpoint contacted
    preflight.generation(config)
    with preflight.endpoints_not_contacted() if resuming else contextlib.nullcontext():
        check_inputs(config)
    preflight.lora_targets(config)  # after check_inputs has resolved (and if need be converted) the models
    prepared = None if stage_done(run_dir, "data") else prepare_data(config)
    run = Run(run_dir, config_to_dict(config), recipe, seed=seed, defaults=config_to_dict(type(config)()))
    run.stage("data", lambda: write_data(run, *prepared))
    return run


def link_final(run: Run, model: str | Path) -> Path:
    """DIR/final: a link to the run's final model (the last round's folder, or the starting model when every
    training stage was skipped), recorded in the manifest. A link left by an earlier finish is renewed, so a rerun
    after the model cache was cleared (the starting model re-converted) or with another end point does not fail on
    it; a model inside the run that has gone missing is refused by `record_model`."""
    from selfalign.models import resolve_model

    final = run.root / "final"
    target = Path(model)
    inside = target.absolute().is_relative_to(run.root.absolute())
    dest = (os.path.relpath(target.absolute(), run.root.absolute()) if inside
            else str(resolve_model(str(model)).absolute()))  # a relative model folder would dangle from DIR/
    if os.path.islink(final) and os.readlink(final) != dest:
        final.unlink()
    if not os.path.lexists(final):
        os.symlink(dest, final)
    run.record_model("final", final)
    return final


def write_data(run: Run, files: dict[str, list], summary: dict) -> dict:
    for name, records in files.items():
        write_jsonl(run.path("data", name), records)
    return summary
