"""Training examples: chats rendered through the chat template with everything but the trained assistant turn(s)
masked, padded batches, and the (length-grouped, seeded) order in which batches are visited.

Padding is masked by the attention mask and by labels = -100, never by token id: the pad token is the EOS token
(<|im_end|>) of the chat models we train, and EOS inside a response must be trained on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
from dataclasses import dataclass
from typing import Sequence

import torch

from selfalign.data.io import source_of
from selfalign.errors import DataError, SelfalignError
from selfalign.models import encode_prompt_response
from selfalign.training.losses import IGNORE


@dataclass
class SFTExample:
    id: str
    input_ids: list[int]
    labels: list[int]  # IGNORE except on trained tokens
    truncated: bool = False

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        """Tokens that carry loss: the rows the LM head and the loss run on (training/forward.py)."""
        return sum(label != IGNORE for label in self.labels)


@dataclass
class PairExample:
    id: str
    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    weight: float = 1.0
    truncated: bool = False

    @property
    def length(self) -> int:
        return max(len(self.chosen_ids), len(self.rejected_ids))

    @property
    def trained_tokens(self) -> int:
        """Tokens that carry loss, chosen and rejected: the rows the LM head and the loss run on."""
        return sum(label != IGNORE for label in self.chosen_labels + self.rejected_labels)

    @property
    def key(self) -> str:
        """Identifies the exact token sequences (the reference cache is keyed by it, so a change of template,
        tokenizer or truncation never reuses a stale value)."""
        blob = json.dumps([self.id, self.chosen_ids, self.chosen_labels, self.rejected_ids, self.rejected_labels])
        return f"{self.id}:{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def _truncate(ids: list[int], labels: list[int], max_length: int, max_prompt_length: int):
    """Left-truncate the part before the first trained token to `max_prompt_length` (as the SPA code), then cut the
    end at `max_length`. Returns (ids, labels, truncated)."""
    first = next((i for i, x in enumerate(labels) if x != IGNORE), len(labels))
    cut = max(0, first - max_prompt_length)
    n = len(ids)
    ids, labels = ids[cut:][:max_length], labels[cut:][:max_length]
    return ids, labels, len(ids) < n


def unlabel_turn_end(tokenizer, labels: list[int], start: int, end: int) -> None:
    """Take the loss off the end-of-turn tokens closing labels[start:end] (special tokens such as <|im_end|>, and
    the whitespace the template puts after them), in place.

    For answers that were cut off at a token budget: their text is still a target, but training the end-of-turn
    token after it would teach the model to stop mid-sentence."""
    special = set(tokenizer.all_special_ids)
    j = end
    while j > start and (labels[j - 1] in special or not tokenizer.decode([labels[j - 1]]).strip()):
        j -= 1
    labels[j:end] = [IGNORE] * (end - j)


def encode_conversation(tokenizer, messages: list[dict], train_on: str = "last", max_length: int = 1024,
                        max_prompt_length: int = 512, id: str = "", unfinished: Sequence[int] = ()) -> SFTExample:
    """Token ids of a chat ending with an assistant turn, with labels only on the trained assistant turn(s).

    train_on="last": only the final assistant turn carries loss; system, user and earlier turns are context (this
    is also how SRT/SEFT mask the instruction and the input response). train_on="all": every assistant turn.
    Each turn's span comes from `encode_prompt_response` on the conversation up to that turn, which checks that
    the rendering of the prefix is a prefix of the rendering of the whole chat (so the masks line up exactly).
    `unfinished`: indices of assistant messages that were cut off; their end-of-turn tokens carry no loss.
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError("an SFT conversation must end with an assistant turn", field="messages")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i > 0]
    if train_on == "last":
        turns = turns[-1:]
    elif train_on != "all":
        raise ValueError(f"train_on must be 'last' or 'all', got {train_on!r}")
    ids, _ = encode_prompt_response(tokenizer, messages[:-1], messages[-1]["content"])
    labels = [IGNORE] * len(ids)
    for i in turns:
        turn_ids, start = encode_prompt_response(tokenizer, messages[:i], messages[i]["content"])
        if ids[: len(turn_ids)] != turn_ids:
            raise DataError(f"chat template renders turn {i} differently inside the full conversation; "
                            "cannot mask it reliably", field="messages")
        labels[start:len(turn_ids)] = turn_ids[start:]
        if i in unfinished:
            unlabel_turn_end(tokenizer, labels, start, len(turn_ids))
    ids, labels, truncated = _truncate(ids, labels, max_length, max_prompt_length)
    return SFTExample(id=str(id), input_ids=ids, labels=labels, truncated=truncated)


def encode_pair(tokenizer, messages: list[dict], chosen: str, rejected: str, max_length: int = 1024,
                max_prompt_length: int = 512, id: str = "", weight: float = 1.0,
                unfinished: tuple[bool, bool] = (False, False)) -> PairExample:
    """A preference pair as two prompt+response sequences with the prompt masked (same prompt tokens in both).
    `unfinished` (chosen, rejected): an answer that was cut off gets no loss on its end-of-turn tokens."""
    out = []
    truncated = False
    for response, cut_off in zip((chosen, rejected), unfinished):
        ids, n_prompt = encode_prompt_response(tokenizer, messages, response)
        labels = [IGNORE] * n_prompt + ids[n_prompt:]
        if cut_off:
            unlabel_turn_end(tokenizer, labels, n_prompt, len(labels))
        ids, labels, cut = _truncate(ids, labels, max_length, max_prompt_length)
        truncated = truncated or cut
        out += [ids, labels]
    return PairExample(str(id), *out, weight=float(weight), truncated=truncated)


def encode_conversations(tokenizer, conversations, train_on="last", max_length=1024, max_prompt_length=512):
    """`Conversation` records -> SFTExamples; `meta.unfinished_turns` lists assistant messages that were cut off."""
    out = []
    for c in conversations:
        with _located(c, "conversation"):
            out.append(encode_conversation(tokenizer, c.messages, train_on, max_length, max_prompt_length, id=c.id,
                                           unfinished=c.meta.get("unfinished_turns", ())))
    return out


def encode_pairs(tokenizer, pairs, max_length=1024, max_prompt_length=512):
    """`PreferencePair` records -> PairExamples; a pair's `meta.weight` (if any) becomes its loss weight, and
    `meta.chosen_unfinished` / `meta.rejected_unfinished` mark answers that were cut off."""
    out = []
    for p in pairs:
        with _located(p, "pair"):
            weight = p.meta.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
                raise DataError(f"must be a number >= 0, not {weight!r}", field="meta.weight")
            out.append(encode_pair(tokenizer, p.messages, p.chosen, p.rejected, max_length, max_prompt_length,
                                   id=p.id, weight=weight,
                                   unfinished=(bool(p.meta.get("chosen_unfinished")),
                                               bool(p.meta.get("rejected_unfinished")))))
    return out


@contextlib.contextmanager
def _located(record, kind: str):
    """A DataError raised while encoding `record` names it: its file and line when it was read from one, and its id."""
    try:
        yield
    except SelfalignError as e:  # a DataError, or the chat template's check on this record's rendering
        if getattr(e, "path", None) is not None:
            raise
        path, line = source_of(record)
        raise DataError(f"{kind} '{record.id}': {getattr(e, 'reason', e)}", path=path or "<records>", line=line,
                        field=getattr(e, "field", None)) from None


# ------------------------------------------------------------------------------------------------ batches
def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def collate_sft(examples: list[SFTExample], pad_id: int) -> dict:
    """Right padding: real tokens never attend to pads in a causal model, so positions need no adjusting."""
    return {"input_ids": pad([e.input_ids for e in examples], pad_id),
            "attention_mask": pad([[1] * e.length for e in examples], 0),
            "labels": pad([e.labels for e in examples], IGNORE)}


def collate_pairs(examples: list[PairExample], pad_id: int) -> dict:
    """One batch of 2B sequences, chosen first then rejected, so policy and reference each run one forward."""
    ids = [e.chosen_ids for e in examples] + [e.rejected_ids for e in examples]
    labels = [e.chosen_labels for e in examples] + [e.rejected_labels for e in examples]
    return {"input_ids": pad(ids, pad_id), "attention_mask": pad([[1] * len(r) for r in ids], 0),
            "labels": pad(labels, IGNORE), "weights": torch.tensor([e.weight for e in examples]),
            "ids": [e.id for e in examples]}


def batch_order(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool = True,
                group_factor: int = 32) -> list[list[int]]:
    """One epoch's micro-batches (lists of example indices), a pure function of (seed, epoch) so a resumed run
    replays exactly the order it was killed in.

    With grouping: shuffle, cut into mega-batches of `group_factor` batches, sort each by length and slice, then
    shuffle the batches (the HF "group_by_length" scheme): little padding, still random across the epoch."""
    rng = random.Random(f"{seed}:{epoch}")
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    if not group_by_length:
        return [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    mega = batch_size * group_factor
    batches = []
    for i in range(0, len(idx), mega):
        group = sorted(idx[i:i + mega], key=lambda j: -lengths[j])
        batches += [group[k:k + batch_size] for k in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches
