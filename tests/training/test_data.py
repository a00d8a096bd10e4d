"""Chat encoding and masks with the real tokenizer and chat template; batch order and padding."""

from __future__ import annotations

import pytest
import torch

from selfalign.errors import DataError
from selfalign.training.data import (batch_order, collate_pairs, collate_sft, encode_conversation, encode_pair,
                                     encode_pairs)
from selfalign.training.losses import IGNORE


def trained_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, y in zip(ids, labels) if y != IGNORE])


def test_prompt_plus_response_equals_rendered_conversation_without_double_bos(tokenizer, real_pairs):
    p = real_pairs[0]
    ex = encode_pair(tokenizer, p.messages, p.chosen, p.rejected, max_length=4096, max_prompt_length=2048)
    for ids, labels, response in ((ex.chosen_ids, ex.chosen_labels, p.chosen),
                                  (ex.rejected_ids, ex.rejected_labels, p.rejected)):
        full = tokenizer.apply_chat_template(p.messages + [{"role": "assistant", "content": response}], tokenize=False)
        assert ids == tokenizer(full, add_special_tokens=False)["input_ids"]
        assert ids.count(tokenizer.bos_token_id) == full.count(tokenizer.bos_token)  # no BOS added on top
        assert ids[:2] != [tokenizer.bos_token_id] * 2
        n_prompt = labels.index(next(y for y in labels if y != IGNORE))
        prompt = tokenizer.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True)
        assert ids[:n_prompt] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert all(y == IGNORE for y in labels[:n_prompt])
        assert labels[n_prompt:] == ids[n_prompt:]  # every response token is trained, EOS included
        assert trained_text(tokenizer, ids, labels) == response + tokenizer.eos_token + "\n"


MULTI = [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "Name a colour."},
         {"role": "assistant", "content": "Blue."},
         {"role": "user", "content": "Another one?"},
         {"role": "assistant", "content": "Green."}]


def test_multi_turn_masks(tokenizer):
    last = encode_conversation(tokenizer, MULTI, train_on="last")
    assert trained_text(tokenizer, last.input_ids, last.labels) == "Green.<|im_end|>\n"
    both = encode_conversation(tokenizer, MULTI, train_on="all")
    assert both.input_ids == last.input_ids
    assert trained_text(tokenizer, both.input_ids, both.labels) == "Blue.<|im_end|>\nGreen.<|im_end|>\n"
    rendered = tokenizer(tokenizer.apply_chat_template(MULTI, tokenize=False), add_special_tokens=False)["input_ids"]
    assert both.input_ids == rendered
    with pytest.raises(DataError):
        encode_conversation(tokenizer, MULTI[:-1])  # must end with an assistant turn


def test_a_cut_off_answer_is_trained_without_its_end_of_turn_tokens(tokenizer, real_pairs):
    # an answer that hit the token budget: its text stays a target, the <|im_end|> after it (stop here) does not
    cut = encode_conversation(tokenizer, MULTI, train_on="all", unfinished=[2])
    assert trained_text(tokenizer, cut.input_ids, cut.labels) == "Blue.Green.<|im_end|>\n"
    assert cut.input_ids == encode_conversation(tokenizer, MULTI, train_on="all").input_ids
    p = real_pairs[0]
    whole = encode_pair(tokenizer, p.messages, p.chosen, p.rejected, max_length=4096, max_prompt_length=2048)
    pair = encode_pair(tokenizer, p.messages, p.chosen, p.rejected, max_length=4096, max_prompt_length=2048,
                       unfinished=(False, True))
    assert pair.chosen_labels == whole.chosen_labels
    assert trained_text(tokenizer, pair.rejected_ids, pair.rejected_labels).strip() == p.rejected.strip()
    assert pair.rejected_labels[:-2] == whole.rejected_labels[:-2] and pair.rejected_labels[-2:] == [IGNORE] * 2
    flagged = p.__class__(p.id, p.messages, p.chosen, p.rejected, {"rejected_unfinished": True})
    assert encode_pairs(tokenizer, [flagged], 4096, 2048)[0].rejected_labels == pair.rejected_labels


def test_truncation_keeps_prompt_end_and_response_start(tokenizer, real_pairs):
    p = max(real_pairs, key=lambda p: len(p.prompt))
    full = encode_pair(tokenizer, p.messages, p.chosen, p.rejected, max_length=8192, max_prompt_length=4096)
    short = encode_pair(tokenizer, p.messages, p.chosen, p.rejected, max_length=48, max_prompt_length=16)
    n_prompt = full.chosen_labels.index(next(y for y in full.chosen_labels if y != IGNORE))
    assert short.truncated and len(short.chosen_ids) == len(short.rejected_ids) == 48
    assert short.chosen_labels[:16] == [IGNORE] * 16 and short.chosen_labels[16] != IGNORE
    assert short.chosen_ids[:16] == full.chosen_ids[n_prompt - 16:n_prompt]  # the prompt's end is kept
    assert short.chosen_ids[16:] == full.chosen_ids[n_prompt:n_prompt + 32]
    assert short.key != full.key


def test_collate_masks_padding_by_attention_and_labels(tokenizer, real_pairs):
    exs = encode_pairs(tokenizer, real_pairs[:3], max_length=64, max_prompt_length=32)
    b = collate_pairs(exs, tokenizer.pad_token_id)
    assert b["input_ids"].shape[0] == 6 and b["ids"] == [e.id for e in exs]
    lengths = [len(e.chosen_ids) for e in exs] + [len(e.rejected_ids) for e in exs]
    assert b["attention_mask"].sum(1).tolist() == lengths
    assert torch.all(b["labels"][b["attention_mask"] == 0] == IGNORE)
    s = collate_sft([type("E", (), {"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7], "length": 3})(),
                     type("E", (), {"input_ids": [5], "labels": [IGNORE], "length": 1})()], pad_id=2)
    assert s["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, IGNORE, IGNORE]]


def test_batch_order_is_a_seeded_permutation_with_less_padding():
    lengths = [(i * 37) % 101 + 1 for i in range(200)]
    a = batch_order(lengths, 8, seed=3, epoch=0)
    assert a == batch_order(lengths, 8, seed=3, epoch=0)
    assert a != batch_order(lengths, 8, seed=3, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(200))
    plain = batch_order(lengths, 8, seed=3, epoch=0, group_by_length=False)
    assert sorted(i for b in plain for i in b) == list(range(200))

    def padded(batches):
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    assert padded(a) < 0.7 * padded(plain)


def test_a_bad_record_is_named_by_file_line_and_id(tokenizer, tmp_path):
    from selfalign.data import Conversation, PreferencePair, read_records, write_jsonl
    from selfalign.training.data import encode_conversations

    user = [{"role": "user", "content": "hi"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", [PreferencePair("p1", user, "a", "b", {"weight": 0.5}),
                                                  PreferencePair("p2", user, "a", "b", {"weight": None})])
    with pytest.raises(DataError, match=r"pairs.jsonl:2: field 'meta.weight': pair 'p2': must be a number >= 0, "
                                        r"not None"):
        encode_pairs(tokenizer, read_records(path, PreferencePair))
    built = Conversation("no-answer", user + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "?"}])
    with pytest.raises(DataError, match=r"<records>: field 'messages': conversation 'no-answer': an SFT "
                                        r"conversation must end with an assistant turn"):
        encode_conversations(tokenizer, [built])
