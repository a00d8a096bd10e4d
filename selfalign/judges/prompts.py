"""Judge prompts (data files in selfalign/resources/judges/*.txt) and the small pure helpers every judge shares:
filling a template, truncating long answers, reading verdict-token probabilities, parsing verdicts and ratings
from text, and combining the two presentation orders.

Template file format (UTF-8 text):

    # comment lines (provenance, placeholders)
    labels = m M                  pairwise only: the verdict tokens for the FIRST and the SECOND shown answer
    assistant_prefix = [[         optional: text the judge's answer is primed with (local judges)
    === system ===
    the system prompt (optional section)
    === user ===
    the user prompt, with {placeholders}

A section's text runs up to the line break before the next marker line (the file's final line break is not part
of the last section), so a prompt keeps its exact whitespace.
Placeholders are filled in one pass, so answer text that happens to contain "{output_2}" is never substituted.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from selfalign.errors import SelfalignError

_MARKER = re.compile(r"^=== (system|user) ===$")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
TRUNCATION_MARK = "\n[... truncated ...]"
# FastChat llm_judge/common.py one_score_pattern, then one_score_pattern_backup
_RATING_PATTERNS = (re.compile(r"\[\[(\d+\.?\d*)\]\]"), re.compile(r"\[(\d+\.?\d*)\]"))


@dataclass(frozen=True)
class JudgePrompt:
    name: str
    user: str
    system: str | None = None
    labels: tuple[str, str] | None = None  # verdict identifiers of the first / second shown answer
    assistant_prefix: str = ""
    sha256: str = ""

    def messages(self, **fields: str) -> list[dict]:
        out = [{"role": "system", "content": fill(self.system, fields)}] if self.system else []
        return out + [{"role": "user", "content": fill(self.user, fields)}]

    def placeholders(self) -> set[str]:
        return set(_PLACEHOLDER.findall(self.user)) | set(_PLACEHOLDER.findall(self.system or ""))


def prompts_dir() -> Path:
    return Path(str(resources.files("selfalign") / "resources" / "judges"))


def load_prompt(name: str) -> JudgePrompt:
    """A shipped template by name (`alpaca_eval_clf`, `pair_v2`, `single_v1`, ...) or a path to a .txt file."""
    path = Path(name).expanduser()
    if not (path.suffix == ".txt" and path.is_file()):
        path = prompts_dir() / f"{name}.txt"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in prompts_dir().glob("*.txt")))
        raise SelfalignError(f"no judge prompt '{name}' (shipped: {known}; or give a path to a .txt template)")
    text = path.read_text(encoding="utf-8")
    meta: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current = None
    for line in (text[:-1] if text.endswith("\n") else text).split("\n"):
        m = _MARKER.match(line)
        if m:
            current = m.group(1)
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
        elif line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            if not sep:
                raise SelfalignError(f"{path}: header line is not 'key = value': {line!r}")
            meta[key.strip()] = value.strip()
    if "user" not in sections:
        raise SelfalignError(f"{path}: no '=== user ===' section")

    def body(lines: list[str]) -> str:
        return "\n".join(lines)

    labels = tuple(meta["labels"].split()) if meta.get("labels") else None
    if labels is not None and (len(labels) != 2 or labels[0] == labels[1]):
        raise SelfalignError(f"{path}: 'labels' needs two different identifiers, got {meta['labels']!r}")
    system = body(sections["system"]) if "system" in sections else None
    return JudgePrompt(name=path.stem, user=body(sections["user"]), system=system, labels=labels,  # type: ignore[arg-type]
                       assistant_prefix=meta.get("assistant_prefix", ""),
                       sha256=hashlib.sha256(text.encode("utf-8")).hexdigest())


def fill(template: str, fields: dict[str, str]) -> str:
    """Substitute {name} placeholders in one pass; unknown placeholders (e.g. JSON braces) stay as they are."""
    return _PLACEHOLDER.sub(lambda m: str(fields[m.group(1)]) if m.group(1) in fields else m.group(0), template)


def conversation_text(messages: list[dict]) -> str:
    """The instruction a pairwise prompt shows: the user turn itself for single-turn chats; for longer chats the
    whole conversation as 'User: ... / Assistant: ...' so the judge sees the context of the last turn."""
    turns = [m for m in messages if m["role"] != "system"]
    system = [m["content"] for m in messages if m["role"] == "system"]
    if len(turns) == 1 and not system:
        return turns[0]["content"]
    parts = [f"System: {s}" for s in system]
    parts += [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in turns]
    return "\n\n".join(parts)


def truncate_tokens(tokenizer, text: str, max_tokens: int | None) -> tuple[str, bool]:
    """`text` cut to its first `max_tokens` tokens (plus a visible truncation mark), and whether it was cut.
    Without a tokenizer (API judges) a token is counted as 4 characters."""
    if not max_tokens or max_tokens <= 0:
        return text, False
    if tokenizer is None:
        limit = 4 * max_tokens
        return (text, False) if len(text) <= limit else (text[:limit] + TRUNCATION_MARK, True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text, False
    return tokenizer.decode(ids[:max_tokens], skip_special_tokens=False) + TRUNCATION_MARK, True


# ------------------------------------------------------------------------------------------------ verdicts
def label_probabilities(top_logprobs: list[dict] | dict, labels: tuple[str, str]) -> tuple[float, float] | None:
    """(P(first label), P(second label)) from one position's top log-probabilities (OpenAI shape: a list of
    {"token", "logprob"}, or a {token: logprob} dict). Tokens count for a label when they equal it after stripping
    whitespace (" m" and "m" both count; case matters: m is not M). None when neither label is among them."""
    if isinstance(top_logprobs, dict):
        entries = list(top_logprobs.items())
    else:
        entries = [(e.get("token"), e.get("logprob")) for e in top_logprobs or [] if isinstance(e, dict)]
    mass = [0.0, 0.0]
    found = False
    for token, logprob in entries:
        if not isinstance(token, str) or not isinstance(logprob, (int, float)) or isinstance(logprob, bool):
            continue
        for k, label in enumerate(labels):
            if token.strip() == label:
                mass[k] += math.exp(logprob)
                found = True
    return (mass[0], mass[1]) if found else None


def verdict_probabilities(content: list | None, labels: tuple[str, str],
                          prefix: str = "") -> tuple[tuple[float, float], int] | None:
    """(P(first label), P(second label)) and the answer position they were read at, from an OpenAI chat answer's
    `choices[0].logprobs.content` (one {"token", "logprob", "top_logprobs"} per generated token).

    Without `prefix` (alpaca_eval's one-token answers, "m" / "M"): position 0 only, as alpaca_eval's logprob_parser
    reads `content[0]`. With `prefix` (a bracketed verdict such as FastChat's "[[A]]": prefix "[["): the position
    whose preceding answer text ends with the prefix (trailing whitespace ignored), i.e. the label token after "[[";
    when that position offers no label, the next such position is tried. A position's `top_logprobs` are read; when
    they hold no label but the sampled token itself is one, its own logprob is used. None when no position qualifies.
    """
    if not isinstance(content, list):
        return None
    before = ""
    for i, position in enumerate(content):
        if not isinstance(position, dict):
            return None
        token = position.get("token")
        at_label = i == 0 if not prefix else before.rstrip().endswith(prefix)
        if at_label:
            probs = label_probabilities(position.get("top_logprobs") or [], labels)
            if probs is None and isinstance(token, str) and isinstance(position.get("logprob"), (int, float)):
                probs = label_probabilities([position], labels)
            if p_first(probs) is not None:
                return probs, i
        if not prefix or not isinstance(token, str):
            return None
        before += token
    return None


def p_first(probs: tuple[float, float] | None) -> float | None:
    """P(first shown answer is better) = P(first) / (P(first) + P(second)), alpaca_eval's logprob parser."""
    if probs is None or probs[0] + probs[1] <= 0:
        return None
    return probs[0] / (probs[0] + probs[1])


def parse_label_text(text: str | None, labels: tuple[str, str]) -> float | None:
    """Fallback when no log-probabilities came back: 1.0 / 0.0 when the answer names the first / second label.
    Accepts the bare identifier (alpaca_eval: "m", "M") or FastChat's "[[A]]"; "[[C]]" (tie) gives 0.5. Anything
    else (empty, both, garbage) is None: unparseable, counted by the caller, never guessed."""
    if not isinstance(text, str):
        return None
    stripped = text.strip().strip("\"'`.").strip()
    if stripped == labels[0]:
        return 1.0
    if stripped == labels[1]:
        return 0.0
    found = set(re.findall(r"\[\[\s*(\w+)\s*\]\]", text))
    hits = [k for k, label in enumerate(labels) if label in found]
    if len(hits) == 1:
        return 1.0 - hits[0]
    if not hits and "C" in found and "C" not in labels:
        return 0.5
    return None


def parse_rating(text: str | None) -> float | None:
    """The rating in a judge's text, read exactly as FastChat's `run_judge_single` reads it (`_RATING_PATTERNS`):
    the FIRST `[[n]]` (n: digits, optionally a point and more digits; no spaces inside the brackets), else the first
    `[n]`; no range check (FastChat keeps a 0 or an 11). None where FastChat records -1 (no match): callers leave
    such grades out of the means, as FastChat's show_result drops -1."""
    if not isinstance(text, str):
        return None
    for pattern in _RATING_PATTERNS:
        m = pattern.search(text)
        if m:
            return float(m.group(1))
    return None


def pick(p: float | None) -> str | None:
    if p is None:
        return None
    return "a" if p > 0.5 else "b" if p < 0.5 else "tie"


def combine_orders(p_a_shown_first: float | None, p_b_shown_first: float | None) -> tuple[float, bool | None, bool]:
    """Combine the two presentation orders (RLAIF / alpaca_eval practice against position bias).

    `p_a_shown_first`: P(first is better) when A was shown first; `p_b_shown_first`: P(first is better) when B
    was shown first. Returns (p_a, consistent, parsed): p_a averages P(A better) over both orders; consistent says
    whether both orders pick the same answer (a judge that always says "first" gets p_a = 0.5, consistent =
    False); with only one order readable, p_a comes from it and consistent is None; with none, p_a = 0.5 and
    parsed = False.
    """
    views = []
    if p_a_shown_first is not None:
        views.append(p_a_shown_first)
    if p_b_shown_first is not None:
        views.append(1.0 - p_b_shown_first)
    if not views:
        return 0.5, None, False
    p_a = sum(views) / len(views)
    if len(views) == 1:
        return p_a, None, True
    return p_a, pick(views[0]) == pick(views[1]), True
