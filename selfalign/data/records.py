"""The typed records every recipe reads and writes.

One small set, shared by all parts: a `Prompt` (a conversation that ends with a user turn), a `Conversation`
(a full chat, used for SFT), a `Response` (with the model and sampling settings that made it), a
`PreferencePair`, a `Revision` (SEFT) and a `Critique` (SRT). Each converts to and from a plain JSON dict;
`from_dict` validates and raises `DataError` naming the field (the JSONL reader adds file and line).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from selfalign.errors import DataError

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}
ROLES = ("system", "user", "assistant")


# ---------------------------------------------------------------- field checks (raise DataError with the field name)
def _require(d: dict, name: str) -> Any:
    if name not in d or d[name] is None:
        raise DataError("missing required field", field=name)
    return d[name]


def _text(d: dict, name: str, required: bool = True, allow_empty: bool = False) -> str | None:
    if not required and d.get(name) is None:
        return None
    value = _require(d, name)
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", field=name)
    if not allow_empty and not value.strip():
        raise DataError("must not be empty", field=name)
    return value


def _id(d: dict, name: str = "id") -> str:
    value = _require(d, name)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"expected a string or integer id, got {type(value).__name__}", field=name)
    value = str(value)
    if not value.strip():
        raise DataError("must not be empty", field=name)
    return value


def _number(d: dict, name: str, required: bool = False, kind=(int, float)) -> Any:
    if not required and d.get(name) is None:
        return None
    value = _require(d, name)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise DataError(f"expected a number, got {type(value).__name__}", field=name)
    return value


def _mapping(d: dict, name: str) -> dict:
    value = d.get(name) or {}
    if not isinstance(value, dict):
        raise DataError(f"expected an object, got {type(value).__name__}", field=name)
    return value


def validate_messages(messages: Any, name: str = "messages", last_role: str | None = None) -> list[Message]:
    """Check a chat: a non-empty list of {role, content} with known roles and non-empty content."""
    if not isinstance(messages, list) or not messages:
        raise DataError("expected a non-empty list of {role, content} messages", field=name)
    out = []
    for i, m in enumerate(messages):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"expected an object, got {type(m).__name__}", field=where)
        role = m.get("role")
        if role not in ROLES:
            raise DataError(f"role must be one of {ROLES}, got {role!r}", field=f"{where}.role")
        content = m.get("content")
        if not isinstance(content, str):
            raise DataError(f"content must be a string, got {type(content).__name__}", field=f"{where}.content")
        # an empty assistant turn is real data (HH-RLHF has some); an empty user or system turn is an error
        if role != "assistant" and not content.strip():
            raise DataError("content must not be empty", field=f"{where}.content")
        out.append({"role": role, "content": content})
    if last_role and out[-1]["role"] != last_role:
        raise DataError(f"the last message must have role '{last_role}'", field=name)
    return out


def _prompt_messages(d: dict) -> list[Message]:
    """A prompt is given as `messages` (a chat ending with a user turn) or as `prompt` text plus optional `history`
    (the schema of ../shared/data/preferences) or `instruction` (AlpacaEval)."""
    if d.get("messages") is not None:
        return validate_messages(d["messages"], "messages", last_role="user")
    for key in ("prompt", "instruction"):
        if d.get(key) is not None:
            text = _text(d, key)
            history = d.get("history") or []
            history = validate_messages(history, "history") if history else []
            return history + [{"role": "user", "content": text}]
    raise DataError("missing required field (give 'prompt' or 'instruction' text, or a 'messages' list)",
                    field="prompt")


class Record:
    """Common JSON conversion for the dataclass records."""

    kind: ClassVar[str] = "record"

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and v != {}}

    @classmethod
    def from_dict(cls, d: dict):  # pragma: no cover - overridden
        raise NotImplementedError


@dataclass
class Prompt(Record):
    """A conversation that ends with the user turn to answer."""

    id: str
    messages: list[Message]
    meta: dict = field(default_factory=dict)
    kind: ClassVar[str] = "prompt"

    @property
    def text(self) -> str:
        return self.messages[-1]["content"]

    @classmethod
    def from_text(cls, id: str, text: str, system: str | None = None, **meta) -> "Prompt":
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return cls(id=str(id), messages=msgs, meta=meta)

    @classmethod
    def from_dict(cls, d: dict) -> "Prompt":
        if isinstance(d, dict) and "question_id" in d and "turns" in d and not {"prompt", "instruction",
                                                                                  "messages"} & d.keys():
            raise DataError("an MT-Bench question (question_id, turns), not a prompt: answer and grade MT-Bench with "
                            "`selfalign eval mtbench`", field="id")
        known = {"id", "messages", "prompt", "instruction", "history", "meta"}
        meta = dict(_mapping(d, "meta"))
        meta.update({k: v for k, v in d.items() if k not in known})
        return cls(id=_id(d), messages=_prompt_messages(d), meta=meta)


@dataclass
class Conversation(Record):
    """A full chat (ending with an assistant turn), e.g. an SFT example."""

    id: str
    messages: list[Message]
    meta: dict = field(default_factory=dict)
    kind: ClassVar[str] = "conversation"

    @classmethod
    def from_dict(cls, d: dict) -> "Conversation":
        if d.get("messages") is None and d.get("response") is not None:  # prompt + response form
            msgs = _prompt_messages(d) + [{"role": "assistant", "content": _text(d, "response")}]
        else:
            msgs = validate_messages(_require(d, "messages"), last_role="assistant")
        return cls(id=_id(d), messages=msgs, meta=_mapping(d, "meta"))


@dataclass
class Response(Record):
    """One sampled answer to a prompt, with what made it (model, backend, sampling settings)."""

    prompt_id: str
    messages: list[Message]  # the prompt conversation that was answered
    response: str
    model: str
    sample_index: int = 0
    sampling: dict = field(default_factory=dict)
    finish_reason: str | None = None  # "stop" | "length"
    num_tokens: int | None = None
    meta: dict = field(default_factory=dict)
    model_sha256: str | None = None  # digest of the local weights that answered (None: an endpoint, or unknown)
    kind: ClassVar[str] = "response"

    @property
    def key(self) -> tuple[str, int]:
        return (self.prompt_id, self.sample_index)

    @classmethod
    def from_dict(cls, d: dict) -> "Response":
        idx = _number(d, "sample_index", kind=int)
        return cls(
            prompt_id=_id(d, "prompt_id"),
            messages=validate_messages(_require(d, "messages"), last_role="user"),
            response=_text(d, "response", allow_empty=True),
            model=_text(d, "model"),
            sample_index=0 if idx is None else idx,
            sampling=_mapping(d, "sampling"),
            finish_reason=_text(d, "finish_reason", required=False),
            num_tokens=_number(d, "num_tokens", kind=int),
            meta=_mapping(d, "meta"),
            model_sha256=_text(d, "model_sha256", required=False),
        )


@dataclass
class PreferencePair(Record):
    """A prompt with a preferred (`chosen`) and a dispreferred (`rejected`) answer."""

    id: str
    messages: list[Message]
    chosen: str
    rejected: str
    meta: dict = field(default_factory=dict)
    kind: ClassVar[str] = "preference pair"

    @property
    def prompt(self) -> str:
        return self.messages[-1]["content"]

    @classmethod
    def from_dict(cls, d: dict) -> "PreferencePair":
        known = {"id", "messages", "prompt", "instruction", "history", "chosen", "rejected", "meta"}
        meta = dict(_mapping(d, "meta"))
        meta.update({k: v for k, v in d.items() if k not in known})
        # empty answers occur in real data (UltraFeedback has both an empty chosen and empty rejected replies):
        # they are valid (bad) answers, so only the type is checked
        return cls(id=_id(d), messages=_prompt_messages(d), chosen=_text(d, "chosen", allow_empty=True),
                   rejected=_text(d, "rejected", allow_empty=True), meta=meta)


REVISION_DECISIONS = ("none", "minor", "major")


@dataclass
class Revision(Record):
    """SEFT: a reviser's decision on a response and the revised text (== original when decision is 'none')."""

    prompt_id: str
    messages: list[Message]
    original: str
    revised: str
    decision: str
    meta: dict = field(default_factory=dict)
    kind: ClassVar[str] = "revision"

    @classmethod
    def from_dict(cls, d: dict) -> "Revision":
        decision = _text(d, "decision")
        if decision not in REVISION_DECISIONS:
            raise DataError(f"must be one of {REVISION_DECISIONS}, got {decision!r}", field="decision")
        return cls(prompt_id=_id(d, "prompt_id"), messages=validate_messages(_require(d, "messages"), last_role="user"),
                   original=_text(d, "original"), revised=_text(d, "revised"), decision=decision,
                   meta=_mapping(d, "meta"))


@dataclass
class Critique(Record):
    """SRT: a critic's feedback on a response, its score and the refined response."""

    prompt_id: str
    messages: list[Message]
    response: str
    feedback: str
    score: float | None
    refinement: str | None
    critic: str | None = None
    meta: dict = field(default_factory=dict)
    kind: ClassVar[str] = "critique"

    @classmethod
    def from_dict(cls, d: dict) -> "Critique":
        return cls(prompt_id=_id(d, "prompt_id"), messages=validate_messages(_require(d, "messages"), last_role="user"),
                   response=_text(d, "response"), feedback=_text(d, "feedback"), score=_number(d, "score"),
                   refinement=_text(d, "refinement", required=False), critic=_text(d, "critic", required=False),
                   meta=_mapping(d, "meta"))


RECORD_TYPES = {cls.__name__.lower(): cls for cls in (Prompt, Conversation, Response, PreferencePair, Revision, Critique)}
