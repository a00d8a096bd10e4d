"""Training: SFT, DPO (with the hooks SPA needs) and ORPO on one small loop. See trainer.py for why not TRL.

    from selfalign.training import DPOTrainConfig, train_dpo
    summary = train_dpo("smollm2-135m", pairs, DPOTrainConfig(max_steps=4), "run/train", "run/final")

`DPOTrainConfig(processes=8)` trains the same model over 8 GPUs, `fsdp=True` sharded (distributed.py;
docs/training.md).
"""

from selfalign.training.config import DPOTrainConfig, LoraConfig, ORPOTrainConfig, SFTTrainConfig, TrainConfig
from selfalign.training.data import (PairExample, SFTExample, encode_conversation, encode_conversations, encode_pair,
                                     encode_pairs)
from selfalign.training.losses import (dpo_loss, extrapolated_token_logps, orpo_loss, sequence_logps, sft_loss,
                                       token_logps)
from selfalign.training.trainer import DPOStepState, NoiseHook, fit, save_final, train_dpo, train_orpo, train_sft

__all__ = ["DPOStepState", "DPOTrainConfig", "LoraConfig", "NoiseHook", "ORPOTrainConfig", "PairExample", "SFTExample",
           "SFTTrainConfig", "TrainConfig", "dpo_loss", "encode_conversation", "encode_conversations", "encode_pair",
           "encode_pairs", "extrapolated_token_logps", "fit", "orpo_loss", "save_final", "sequence_logps", "sft_loss",
           "token_logps", "train_dpo", "train_orpo", "train_sft"]
