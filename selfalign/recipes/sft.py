"""SFT baseline: supervised fine-tuning on the `chosen` answers of preference pairs (or on any chat records).

    selfalign run sft sft --run-dir runs/sft

Pipeline: data (-> DIR/data/sft.jsonl; a pair with an empty chosen answer is dropped and counted) -> train
(prompt-masked token cross-entropy; curve in DIR/train/log.jsonl, checkpoints in DIR/train/checkpoints) ->
DIR/final (safetensors + tokenizer + chat template).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from selfalign.config import at_least
from selfalign.data import Conversation, read_records
from selfalign.models import DEFAULT_MODEL
from selfalign.recipes import preflight
from selfalign.recipes.common import data_file, load_pairs, start_run
from selfalign.training import SFTTrainConfig, train_sft


@dataclass
class Config:
    model: str = DEFAULT_MODEL
    data: str = "preferences/ultrafeedback_binarized_train_1k.jsonl"  # path, or relative to the shared data folder
    data_format: Literal["pairs", "conversations"] = "pairs"  # pairs: train on prompt -> chosen
    limit: int | None = None  # use the first N examples
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)

    def __post_init__(self):
        at_least(self, 1, "limit")


def check_inputs(config: Config) -> None:
    """What the run needs besides its data, checked before the run folder is made (recipes/preflight.py)."""
    preflight.model("model", config.model)


def prepare_data(config: Config) -> tuple[dict[str, list], dict]:
    if config.data_format == "pairs":
        # only the chosen answer is trained on: identical pairs are kept, an empty target is not
        pairs, counts = load_pairs(config.data, "data", config.limit, "limit", need=("chosen",), drop_identical=False)
        convs = [Conversation(p.id, p.messages + [{"role": "assistant", "content": p.chosen}]) for p in pairs]
        return {"sft.jsonl": convs}, {"examples": len(convs), "data": counts}
    convs = read_records(data_file(config.data, "data"), Conversation, limit=config.limit)
    return {"sft.jsonl": convs}, {"examples": len(convs)}


def run(config: Config, run_dir: str) -> dict:
    run = start_run(run_dir, config, "sft", config.train.seed, check_inputs, prepare_data)
    data = run.path("data", "sft.jsonl")
    result = run.stage("train", lambda: train_sft(config.model, read_records(data, Conversation), config.train,
                                                  run.path("train"), run.path("final")))
    run.record_model("final", run.path("final"))
    return {"run_dir": str(run.root), "final": str(run.path("final")), "train": result}
