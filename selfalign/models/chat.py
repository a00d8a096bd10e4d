"""Chat formatting through the tokenizer's own chat template, the same at generation, training and evaluation."""

from __future__ import annotations

from selfalign.errors import SelfalignError


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The text the model sees before it answers the last (user) turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise SelfalignError("this tokenizer has no chat template; selfalign needs a chat (instruct) model")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, messages: list[dict], assistant_prefix: str = "") -> list[int]:
    """Token ids of the generation prompt for `messages`, followed by `assistant_prefix`'s tokens when given: the
    answer then continues an assistant turn that already starts with that text (e.g. a reviser's decision tag)."""
    # The template already holds any BOS the model wants; letting the tokenizer add another gives a double BOS.
    ids = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
    if assistant_prefix:
        ids = ids + tokenizer(assistant_prefix, add_special_tokens=False)["input_ids"]
    return ids


def encode_prompt_response(tokenizer, messages: list[dict], response: str) -> tuple[list[int], int]:
    """Token ids of prompt + response (rendered as one conversation) and the number of prompt tokens.

    The response part is what the template writes for the assistant turn, end-of-turn token included, so a
    model trained on it learns to stop. We check that the prompt's tokens are a prefix of the full sequence,
    which catches templates that render an assistant turn differently from the generation prompt.
    """
    prompt_ids = encode_prompt(tokenizer, messages)
    full_text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
    full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise SelfalignError("chat template renders the prompt differently inside a full conversation; "
                             "cannot mask the prompt reliably")
    return full_ids, len(prompt_ids)
