"""The SRT sequences: the critic prompt and the stage-1 training conversations, masked as Eq. 1 says."""

from __future__ import annotations

import pytest

from selfalign.critique import critic_prompt, default_train_on, training_conversation

X = [{"role": "user", "content": "Name the capital of France."}]
Y = "It is Paris."
F = "1. Weaknesses: too terse.\n2. Advice: add one fact about the city.\nOverall Score: [[5]]"
R = "The capital of France is Paris, its largest city."


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir):
    from selfalign.models import load_tokenizer

    return load_tokenizer(str(embedded_model_dir))


def spans(tokenizer, ids, labels):
    """Text of the trained (label != -100) and the masked tokens."""
    trained = tokenizer.decode([t for t, l in zip(ids, labels) if l != -100])
    masked = tokenizer.decode([t for t, l in zip(ids, labels) if l == -100])
    return trained, masked


def test_two_turn_masks_instruction_and_critique_request(tokenizer):
    from selfalign.training import encode_conversation

    conv = training_conversation("a", X, Y, F, R, "two_turn")
    assert [m["role"] for m in conv.messages] == ["user", "assistant", "user", "assistant"]
    assert default_train_on("two_turn") == "all"
    ex = encode_conversation(tokenizer, conv.messages, train_on="all", max_length=2048, max_prompt_length=1024)
    trained, masked = spans(tokenizer, ex.input_ids, ex.labels)
    # Eq. 1: loss on y, f and r; the instruction and the fixed critique request carry none
    assert X[0]["content"] in masked and X[0]["content"] not in trained
    assert "Identify Weaknesses" in masked and "Identify Weaknesses" not in trained
    assert Y in trained and R in trained and "Overall Score: [[5]]" in trained
    # every instruction token position is -100
    instr = tokenizer(X[0]["content"], add_special_tokens=False)["input_ids"]
    ids = ex.input_ids
    start = next(i for i in range(len(ids)) if ids[i:i + len(instr)] == instr)
    assert all(l == -100 for l in ex.labels[start:start + len(instr)])
    # train_on=last: the response becomes input too
    last = encode_conversation(tokenizer, conv.messages, train_on="last", max_length=2048, max_prompt_length=1024)
    trained, masked = spans(tokenizer, last.input_ids, last.labels)
    assert Y in masked and Y not in trained and R in trained


def test_critic_prompt_fills_each_placeholder_once():
    text = critic_prompt("What does str.format do with '{response}'?", "It fills it in.")
    assert "What does str.format do with '{response}'?" in text and "It fills it in." in text
    assert "{instruction}" not in text


def test_a_cut_off_response_is_trained_without_its_end_of_turn(tokenizer):
    from selfalign.training import encode_conversations

    conv = training_conversation("a", X, Y, F, R, "two_turn", response_unfinished=True)
    assert conv.meta["unfinished_turns"] == [1] and conv.messages[1]["content"] == Y
    ex = encode_conversations(tokenizer, [conv], train_on="all", max_length=2048, max_prompt_length=1024)[0]
    trained, _ = spans(tokenizer, ex.input_ids, ex.labels)
    assert Y + "<|im_end|>" not in trained and Y in trained
    assert trained.endswith(R + "<|im_end|>\n")  # the critique turn still ends as usual
    assert "unfinished_turns" not in training_conversation("a", X, Y, F, R, "critic_template",
                                                           response_unfinished=True).meta  # y is input there


def test_critic_template_format_masks_instruction_and_response(tokenizer):
    from selfalign.training import encode_conversation

    conv = training_conversation("a", X, Y, F, R, "critic_template")
    assert [m["role"] for m in conv.messages] == ["user", "assistant"]
    assert conv.messages[0]["content"] == critic_prompt(X[0]["content"], Y)
    ex = encode_conversation(tokenizer, conv.messages, train_on=default_train_on("critic_template"),
                             max_length=2048, max_prompt_length=1024)
    trained, masked = spans(tokenizer, ex.input_ids, ex.labels)
    assert X[0]["content"] in masked and Y in masked and Y not in trained
    assert trained.strip().startswith("1. Weaknesses") and R in trained
