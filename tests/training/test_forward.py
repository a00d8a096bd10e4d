"""The fast forward path (LM head on response positions only) against the plain full-logits computation."""

from __future__ import annotations

import torch

from selfalign.models import load_model
from selfalign.training.data import collate_pairs, encode_pairs
from selfalign.training.forward import reference_context, response_logits, sequence_logps_of
from selfalign.training.losses import IGNORE, sequence_logps


def test_response_positions_only_and_equal_to_full_logits(tiny_model_dir, tokenizer, real_pairs):
    model = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    batch = collate_pairs(encode_pairs(tokenizer, real_pairs[:3], max_length=96, max_prompt_length=48),
                          tokenizer.pad_token_id)
    logits, targets, rows = response_logits(model, batch)
    assert logits.shape[0] == int((batch["labels"][:, 1:] != IGNORE).sum())  # no prompt or pad rows at all
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        fast = sequence_logps_of(model, batch)
    assert torch.allclose(fast, sequence_logps(full, batch["labels"]), atol=1e-4)


def test_padding_does_not_change_logps(tiny_model_dir, tokenizer, real_pairs):
    model = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    exs = encode_pairs(tokenizer, real_pairs[:4], max_length=96, max_prompt_length=48)
    with torch.no_grad():
        together = sequence_logps_of(model, collate_pairs(exs, tokenizer.pad_token_id))
        alone = [sequence_logps_of(model, collate_pairs([e], tokenizer.pad_token_id)) for e in exs]
    alone = torch.cat([a[:1] for a in alone] + [a[1:] for a in alone])  # chosen first, then rejected
    assert torch.allclose(together, alone, atol=1e-4)


def test_lora_reference_is_the_base_model(tiny_model_dir, tokenizer, real_pairs):
    from peft import LoraConfig, get_peft_model

    base = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    batch = collate_pairs(encode_pairs(tokenizer, real_pairs[:2], max_length=64, max_prompt_length=32),
                          tokenizer.pad_token_id)
    with torch.no_grad():
        expected = sequence_logps_of(base, batch)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.5)  # adapters now change the output
        adapted = sequence_logps_of(model, batch)
        with reference_context(model):
            ref = sequence_logps_of(model, batch)
    assert not torch.allclose(adapted, expected, atol=1e-3)
    assert torch.allclose(ref, expected, atol=1e-5)


def test_a_model_whose_forward_rescales_its_logits_is_refused(tokenizer, real_pairs):
    """Granite divides the LM head's output by logits_scaling inside forward; training on the bare head would use
    another distribution than the model's own, so it is an error, not a silent difference."""
    import pytest
    from transformers import GraniteConfig, GraniteForCausalLM

    from selfalign.errors import SelfalignError

    cfg = GraniteConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, logits_scaling=8.0)
    torch.manual_seed(0)
    model = GraniteForCausalLM(cfg).eval()
    batch = collate_pairs(encode_pairs(tokenizer, real_pairs[:1], max_length=64, max_prompt_length=32),
                          tokenizer.pad_token_id)
    with pytest.raises(SelfalignError, match="GraniteForCausalLM: its forward post-processes"):
        response_logits(model, batch)
    cfg.logits_scaling = 1.0  # the same network without the rescaling is fine
    assert response_logits(GraniteForCausalLM(cfg).eval(), batch)[0].shape[0] > 0
