"""Model forward passes that return what the losses need: logits at response positions only.

The LM head (vocab 49k for SmolLM2, 150k for Qwen) is the largest single matmul of a small model and its output the
largest tensor. Prompt and padding positions carry no loss, so we run the backbone, keep the hidden states of the
positions that predict a labelled token, and apply the head to those rows only ([N, V] instead of [B, T, V]).
"""

from __future__ import annotations

import contextlib

import torch

from selfalign.training.losses import IGNORE, token_logps


class ResponseLogitsModel(torch.nn.Module):
    """A model whose forward is `response_logits`: the root FSDP shards (distributed.shard).

    FSDP gathers a sharded module's parameters around that module's own forward, and `response_logits` calls the
    backbone and the LM head separately, so neither the CausalLM's forward nor its hooks run; this module's forward
    is the one call that covers both (and the tied embeddings they share)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels):
        return _response_logits(self.model, input_ids, attention_mask, labels)


def inner(model):
    """The model a ResponseLogitsModel holds (a peft model or a CausalLM), else `model` itself."""
    return model.model if isinstance(model, ResponseLogitsModel) else model


def unwrap(model):
    """The transformers CausalLM under a peft wrapper (LoRA layers stay injected in it)."""
    model = inner(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def response_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [N, V], targets [N], rows [N]): one row per labelled token, `rows` = its sequence index."""
    lm = unwrap(model)
    device = lm.get_output_embeddings().weight.device
    args = (batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["labels"].to(device))
    return model(*args) if isinstance(model, ResponseLogitsModel) else _response_logits(model, *args)


def _response_logits(model, input_ids, attention_mask, labels):
    lm = unwrap(model)
    backbone = getattr(lm, lm.base_model_prefix)
    check_head_reproduces_forward(lm, backbone, input_ids)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    mask = labels[:, 1:] != IGNORE  # position t predicts token t+1
    logits = lm_head(lm, hidden[:, :-1][mask])
    rows = mask.nonzero()[:, 0]
    return logits, labels[:, 1:][mask], rows


def lm_head(lm, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from final hidden states, as the model's own forward computes them after its backbone."""
    logits = lm.get_output_embeddings()(hidden)
    cap = getattr(lm.config.get_text_config(), "final_logit_softcapping", None)
    if cap:  # Gemma-2 style soft-capping, as the model's own forward does
        logits = torch.tanh(logits / cap) * cap
    return logits


def check_head_reproduces_forward(lm, backbone, input_ids: torch.Tensor) -> None:
    """Once per model: `lm_head` over the backbone must give the model's own logits. Some architectures post-process
    them inside `forward` (Cohere multiplies by logit_scale, Granite divides by logits_scaling, ...); skipping that
    would train and score every such model on another distribution without an error, so it is refused instead."""
    if getattr(lm, "_selfalign_head_checked", False):
        return
    x = input_ids[:1, :8]
    training = lm.training
    lm.eval()  # no dropout, so both passes see the same network
    try:
        with torch.no_grad():
            ours = lm_head(lm, backbone(input_ids=x, use_cache=False).last_hidden_state).float()
            theirs = lm(input_ids=x, use_cache=False).logits.float()
    finally:
        lm.train(training)
    scale = max(1.0, float(theirs.abs().max()))
    if not torch.allclose(ours, theirs, rtol=1e-3, atol=1e-3 * scale):
        from selfalign.errors import SelfalignError

        raise SelfalignError(f"{type(lm).__name__}: its forward post-processes the LM head's logits in a way "
                             f"selfalign's training and scoring do not reproduce (max difference "
                             f"{float((ours - theirs).abs().max()):.3g}); this architecture is not supported")
    lm._selfalign_head_checked = True


def sum_by_row(values: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """Per-token values -> per-sequence sums [n] (differentiable)."""
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, rows, values)


def sequence_logps_of(model, batch: dict) -> torch.Tensor:
    """Summed response log-probs [B] of a padded batch."""
    logits, targets, rows = response_logits(model, batch)
    return sum_by_row(token_logps(logits, targets), rows, batch["input_ids"].size(0))


def autocast(device: str, dtype: torch.dtype | None):
    """bf16 autocast keeps fp32 master weights (so small learning rates still move them) and runs matmuls in bf16."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def reference_context(model):
    """For a peft model whose reference is its base: run with the adapters disabled. Otherwise nothing."""
    from peft import PeftModel

    model = inner(model)
    return model.disable_adapter() if isinstance(model, PeftModel) else contextlib.nullcontext()
