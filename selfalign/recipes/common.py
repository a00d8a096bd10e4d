"""Small helpers shared by the recipe files."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from selfalign.config import config_error, config_to_dict
from selfalign.data import write_jsonl
from selfalign.data.loaders import shared_data_dir
from selfalign.errors import ConfigError
from selfalign.runs import Run, stage_done


def data_file(path: str, key: str | None = None) -> Path:
    """A data path from a config: absolute, relative to the working directory, or relative to the shared real-data
    folder (`preferences/ultrafeedback_binarized_train_1k.jsonl`), in that order. `key`: the config key that named
    it, so that the CLI can point at the line that gave it."""
    p = Path(path)
    for cand in (p, shared_data_dir() / p):
        if cand.exists():
            return cand
    problem = f"data file '{path}' not found (looked in the working directory and {shared_data_dir()})"
    raise config_error(key, problem) if key else ConfigError(problem)


def start_run(run_dir: str, config: Any, recipe: str, seed: int | None, check_inputs: Callable[[Any], None],
              prepare_data: Callable[[Any], tuple[dict[str, list], dict]]) -> Run:
    """A recipe's run folder, made only once its inputs are known to be good, with its data stage done.

    `check_inputs(config)` and `prepare_data(config)` (which reads and splits the data files) run before the folder
    exists: a run folder is locked to the config it started with, so a failure after it was made would lock it to
    the bad config. A resumed run whose data stage is done skips `prepare_data`: its splits are on disk, and data
    paths relative to where it started need not resolve from where it resumes. The data stage then writes each split
    (file name -> records) under DIR/data/."""
    check_inputs(config)
    prepared = None if stage_done(run_dir, "data") else prepare_data(config)
    run = Run(run_dir, config_to_dict(config), recipe, seed=seed)
    run.stage("data", lambda: write_data(run, *prepared))
    return run


def write_data(run: Run, files: dict[str, list], summary: dict) -> dict:
    for name, records in files.items():
        write_jsonl(run.path("data", name), records)
    return summary
