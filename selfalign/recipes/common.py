"""Small helpers shared by the recipe files."""

from __future__ import annotations

from pathlib import Path

from selfalign.config import config_error
from selfalign.data import write_jsonl
from selfalign.data.loaders import shared_data_dir
from selfalign.errors import ConfigError
from selfalign.runs import Run


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


def write_data(run: Run, files: dict[str, list], summary: dict) -> dict:
    """The data stage: a recipe's prepared splits (file name -> records), written under DIR/data/."""
    for name, records in files.items():
        write_jsonl(run.path("data", name), records)
    return summary
