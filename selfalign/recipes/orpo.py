"""ORPO baseline (Hong et al. 2024; a baseline of the SEFT paper): odds-ratio preference optimisation on
human-labelled pairs (UltraFeedback), in one stage from the starting model, with no reference model.

    selfalign run orpo orpo --run-dir runs/orpo

Pipeline: data (-> DIR/data/{train,eval}.jsonl, the same pairs and held-out split as the dpo recipe) -> train (the
chosen answer's mean token NLL + lambda x -log sigmoid(log odds ratio of chosen over rejected); curve of loss, NLL,
log odds ratio and accuracy in DIR/train/log.jsonl) -> DIR/final -> eval (held-out ORPO loss, chosen NLL, log odds
ratio and accuracy of the final model next to the starting model's, DIR/eval/metrics.json).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from selfalign.config import at_least
from selfalign.data import PreferencePair, read_records, write_json
from selfalign.models import DEFAULT_MODEL
from selfalign.recipes import preflight
from selfalign.recipes.common import start_run, train_and_held_out_pairs
from selfalign.runs import Run
from selfalign.training import ORPOTrainConfig, train_orpo
from selfalign.training.evaluate import orpo_metrics


@dataclass
class Config:
    model: str = DEFAULT_MODEL  # the policy's start point (ORPO needs no SFT stage before it, nor a reference)
    data: str = "preferences/ultrafeedback_binarized_train_1k.jsonl"  # path, or relative to the shared data folder
    limit: int | None = None  # train on the first N pairs
    eval_data: str = "preferences/ultrafeedback_binarized_eval_200.jsonl"
    eval_limit: int = 200  # 0: no eval stage
    train: ORPOTrainConfig = field(default_factory=ORPOTrainConfig)

    def __post_init__(self):
        at_least(self, 1, "limit")
        at_least(self, 0, "eval_limit")


def check_inputs(config: Config) -> None:
    """What the run needs besides its data, checked before the run folder is made (recipes/preflight.py)."""
    preflight.model("model", config.model)


def evaluate(config: Config, run: Run) -> dict:
    """The held-out terms before and after: ORPO has no reference, so the starting model is scored as the
    baseline the final one is read against."""
    pairs = read_records(run.path("data", "eval.jsonl"), PreferencePair)
    initial = orpo_metrics(config.model, pairs, config.train)
    final = orpo_metrics(str(run.path("final")), pairs, config.train)
    # the headline numbers flat, final next to initial (what `status` and the report's stage table show), then both
    # models' full terms
    metrics = {"pairs": final["pairs"]}
    for key, name in (("loss", "loss"), ("rewards/accuracy", "accuracy"), ("nll", "nll"),
                      ("log_odds_ratio", "log_odds_ratio")):
        metrics.update({name: final[key], f"{name}_initial": initial[key]})
    metrics.update(initial=initial, final=final)
    write_json(run.path("eval", "metrics.json"), metrics)
    return metrics


def run(config: Config, run_dir: str) -> dict:
    run = start_run(run_dir, config, "orpo", config.train.seed, check_inputs, train_and_held_out_pairs)
    result = run.stage("train", lambda: train_orpo(config.model, read_records(run.path("data", "train.jsonl"),
                                                                              PreferencePair),
                                                   config.train, run.path("train"), run.path("final")))
    run.record_model("final", run.path("final"))
    metrics = run.stage("eval", lambda: evaluate(config, run)) if config.eval_limit else None
    return {"run_dir": str(run.root), "final": str(run.path("final")), "train": result, "eval": metrics}
