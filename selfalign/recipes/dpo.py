"""DPO baseline: direct preference optimisation on human-labelled pairs (UltraFeedback), frozen reference = the
initial model.

    selfalign run dpo dpo --run-dir runs/dpo

Pipeline: data (-> DIR/data/{train,eval}.jsonl; pairs with identical or empty answers are dropped, held-out pairs
whose instruction is a training pair's too are dropped, all counted in the stage's summary) -> train (reference
log-probs cached in DIR/train, curve of loss, margins, chosen/rejected rewards and accuracy in DIR/train/log.jsonl)
-> DIR/final -> eval (held-out reward accuracy and margins vs. the reference, DIR/eval/metrics.json).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from selfalign.config import at_least
from selfalign.data import PreferencePair, read_records, write_json
from selfalign.models import DEFAULT_MODEL
from selfalign.recipes import preflight
from selfalign.recipes.common import start_run, train_and_held_out_pairs
from selfalign.runs import Run
from selfalign.training import DPOTrainConfig, train_dpo
from selfalign.training.evaluate import preference_metrics


@dataclass
class Config:
    model: str = DEFAULT_MODEL  # the policy's start point and the frozen reference
    data: str = "preferences/ultrafeedback_binarized_train_1k.jsonl"  # path, or relative to the shared data folder
    limit: int | None = None  # train on the first N pairs
    eval_data: str = "preferences/ultrafeedback_binarized_eval_200.jsonl"
    eval_limit: int = 200  # 0: no eval stage
    train: DPOTrainConfig = field(default_factory=DPOTrainConfig)

    def __post_init__(self):
        at_least(self, 1, "limit")
        at_least(self, 0, "eval_limit")


def check_inputs(config: Config) -> None:
    """What the run needs besides its data, checked before the run folder is made (recipes/preflight.py)."""
    preflight.model("model", config.model)


def prepare_data(config: Config) -> tuple[dict[str, list], dict]:
    """Training pairs, and held-out pairs whose instructions the training pairs do not have."""
    return train_and_held_out_pairs(config)


def evaluate(config: Config, run: Run) -> dict:
    pairs = read_records(run.path("data", "eval.jsonl"), PreferencePair)
    metrics = preference_metrics(str(run.path("final")), config.model, pairs, config.train)
    write_json(run.path("eval", "metrics.json"), metrics)
    return metrics


def run(config: Config, run_dir: str) -> dict:
    run = start_run(run_dir, config, "dpo", config.train.seed, check_inputs, prepare_data)
    result = run.stage("train", lambda: train_dpo(config.model, read_records(run.path("data", "train.jsonl"),
                                                                             PreferencePair),
                                                  config.train, run.path("train"), run.path("final")))
    run.record_model("final", run.path("final"))
    metrics = run.stage("eval", lambda: evaluate(config, run)) if config.eval_limit else None
    return {"run_dir": str(run.root), "final": str(run.path("final")), "train": result, "eval": metrics}
