"""The SEFT reviser (METHODS.md §4): decision tags, prompt formatting, labels from pairs, adaptive revision, and
its quality on held-out pairs.

    [NO REVISION] | [MINOR REVISION] | [MAJOR REVISION]      the reviser's first output, then the response

Adaptive revision runs in two generation passes, both resumable through `generate_to_file`:

1. decide: the reviser generates only `tag_budget` tokens (the longest tag's token count), greedy; the tag is parsed.
2. continue: only for MINOR / MAJOR decisions, the reviser continues after the canonical `TAG\\n` prefix up to
   `max_new_tokens` (the revision is stripped of surrounding whitespace). A NO REVISION decision returns the input
   response verbatim (byte-identical) and is never regenerated. A missing or garbled tag takes the configured `fallback` decision and is counted (`tag_status`).

Labels for reviser training from pairs (only pairs exist in shared/data): (x, chosen) -> NO REVISION,
(x, rejected) -> MINOR or MAJOR by a named rule (`label_rule`): a per-pair gap score, small gap = MINOR.
"""

from __future__ import annotations

import re
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

from selfalign.data.records import Conversation, Message, PreferencePair, Prompt, Response, Revision
from selfalign.errors import ConfigError, DataError
from selfalign.judges.prompts import fill

TAGS = {"none": "[NO REVISION]", "minor": "[MINOR REVISION]", "major": "[MAJOR REVISION]"}
DECISIONS = tuple(TAGS)
TAG_SEPARATOR = "\n"  # assistant turn = TAG + TAG_SEPARATOR + response
FALLBACKS = ("none", "minor", "major", "drop")
LABEL_RULES = ("edit_distance", "length_ratio", "judge", "rank", "rating")

_TAG_RE = re.compile(r"^\s*\[\s*(NO|MINOR|MAJOR)\s+REVISION\s*\]", re.IGNORECASE)


# ------------------------------------------------------------------------------------------------ tags
def parse_decision(text: str) -> tuple[str | None, str]:
    """(decision, rest) from a reviser output. decision is 'none' / 'minor' / 'major', or None when the output does
    not start with a well-formed tag (missing, garbled, truncated); rest is the text after the tag and separator."""
    m = _TAG_RE.match(text or "")
    if not m:
        return None, text or ""
    decision = {"no": "none", "minor": "minor", "major": "major"}[m.group(1).lower()]
    rest = text[m.end():]
    if rest.startswith(TAG_SEPARATOR):
        rest = rest[len(TAG_SEPARATOR):]
    return decision, rest


def format_target(decision: str, response: str) -> str:
    """The reviser's training target: the decision tag, a newline, the final response."""
    return TAGS[decision] + TAG_SEPARATOR + response


def tag_token_budget(tokenizer) -> int:
    """Tokens the decide pass generates: enough for the longest tag (as it is tokenized after the chat's assistant
    header: no special tokens, no leading space)."""
    return max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TAGS.values())


# ------------------------------------------------------------------------------------------------ prompts
def load_template(name: str) -> str:
    """A reviser template: a file in selfalign/resources/seft/ (e.g. 'adaptive_prompt.txt') or a path."""
    p = Path(name)
    if p.exists():
        return p.read_text(encoding="utf-8")
    packaged = Path(str(resources.files("selfalign") / "resources" / "seft" / name))
    if packaged.exists():
        return packaged.read_text(encoding="utf-8")
    raise ConfigError(f"reviser template '{name}' not found (neither a path nor a file in selfalign/resources/seft)")


def reviser_messages(messages: Sequence[Message], response: str, template: str) -> list[Message]:
    """The reviser's prompt: earlier turns kept as history, the final user turn replaced by the template holding the
    instruction and the response to revise."""
    if not messages or messages[-1]["role"] != "user":
        raise DataError("a prompt to revise must end with a user turn", field="messages")
    # one pass: an instruction that itself contains "{response}" must stay as written
    user = fill(template, {"instruction": messages[-1]["content"], "response": response})
    return [dict(m) for m in messages[:-1]] + [{"role": "user", "content": user}]


# ------------------------------------------------------------------------------------------------ text distances
def _words(text: str) -> list[str]:
    return text.split()


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance between two sequences (row DP, vectorised with numpy: each row's insertion chain is a
    running minimum, new[j] = j + cummin(tmp[k] - k))."""
    import numpy as np

    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    vocab: dict = {}
    ai = np.array([vocab.setdefault(x, len(vocab)) for x in a])
    bi = np.array([vocab.setdefault(x, len(vocab)) for x in b])
    m = len(bi)
    ar = np.arange(m + 1)
    prev = ar.copy()
    for i, x in enumerate(ai, start=1):
        tmp = np.empty(m + 1, dtype=np.int64)
        tmp[0] = i
        tmp[1:] = np.minimum(prev[1:] + 1, prev[:-1] + (bi != x))
        prev = ar + np.minimum.accumulate(tmp - ar)
    return int(prev[-1])


def normalized_edit_distance(a: str, b: str) -> float:
    """Word-level edit distance / the longer length: 0 = identical, 1 = nothing in common."""
    wa, wb = _words(a), _words(b)
    if not wa and not wb:
        return 0.0
    return edit_distance(wa, wb) / max(len(wa), len(wb))


def token_overlap(a: str, b: str) -> float:
    """Bag-of-words F1 between two texts (1 = same words)."""
    ca, cb = Counter(_words(a)), Counter(_words(b))
    if not ca and not cb:
        return 1.0
    common = sum((ca & cb).values())
    if not common:
        return 0.0
    p, r = common / sum(cb.values()), common / sum(ca.values())
    return 2 * p * r / (p + r)


# ------------------------------------------------------------------------------------------------ labels
def gap_scores(pairs: Sequence[PreferencePair], rule: str, judge=None) -> list[float]:
    """How far each pair's rejected answer is from its chosen one under `rule` (larger = a bigger revision):

    edit_distance  normalised word edit distance(rejected, chosen)
    length_ratio   |len(chosen) - len(rejected)| / max(len) in words
    judge          p(chosen > rejected) from a pairwise judge (`judge.compare`): a strong preference = a big gap
    rank           meta['rejected_rank'] (1 = best answer of a ranked list, e.g. Nectar's 7 ranks)
    rating         meta['score_chosen'] - meta['score_rejected'] (e.g. UltraFeedback ratings)
    """
    if rule == "edit_distance":
        return [normalized_edit_distance(p.rejected, p.chosen) for p in pairs]
    if rule == "length_ratio":
        out = []
        for p in pairs:
            lc, lr = len(_words(p.chosen)), len(_words(p.rejected))
            out.append(abs(lc - lr) / max(1, lc, lr))
        return out
    if rule == "judge":
        if judge is None:
            raise ConfigError("label_rule 'judge' needs a judge (reviser.label_judge)")
        from selfalign.judges.base import PairwiseItem

        verdicts = judge.compare([PairwiseItem(p.messages, p.chosen, p.rejected) for p in pairs])
        return [float(v.p_a) for v in verdicts]
    if rule in ("rank", "rating"):
        keys = ("rejected_rank",) if rule == "rank" else ("score_chosen", "score_rejected")
        out = []
        for p in pairs:
            missing = [k for k in keys if not isinstance(p.meta.get(k), (int, float))]
            if missing:
                raise DataError(f"label_rule '{rule}' needs numeric meta {', '.join(missing)} on every pair "
                                f"(pair '{p.id}'); the shared data has only unrated pairs: use edit_distance, "
                                f"length_ratio or judge", field=missing[0])
            out.append(float(p.meta["rejected_rank"]) if rule == "rank"
                       else float(p.meta["score_chosen"]) - float(p.meta["score_rejected"]))
        return out
    raise ConfigError(f"unknown label_rule '{rule}' (choose from {', '.join(LABEL_RULES)})")


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile by linear interpolation (numpy's default)."""
    import numpy as np

    return float(np.quantile(np.asarray(values, dtype=float), q)) if len(values) else 0.0


def revision_labels(pairs: Sequence[PreferencePair], rule: str = "edit_distance", minor_max: float | None = None,
                    minor_quantile: float = 0.5, judge=None) -> list[dict]:
    """One label per pair for its rejected answer: {'id', 'decision' ('minor'|'major'), 'gap', 'threshold'}.

    MINOR when gap <= threshold. The threshold is `minor_max` if given (rank rule default 3: ranks 2-3 are minor,
    METHODS.md §4.2), else the `minor_quantile` of the gaps over these pairs (0.5: half minor, half major)."""
    gaps = gap_scores(pairs, rule, judge)
    if minor_max is None and rule == "rank":
        minor_max = 3.0
    threshold = float(minor_max) if minor_max is not None else quantile(gaps, minor_quantile)
    return [{"id": p.id, "decision": "minor" if g <= threshold else "major", "gap": g, "threshold": threshold}
            for p, g in zip(pairs, gaps)]


def warmup_examples(pairs: Iterable[PreferencePair], template: str) -> list[Conversation]:
    """Warm-up SFT: reviser prompt (x, rejected) -> chosen (no tag)."""
    return [Conversation(f"{p.id}:warmup", reviser_messages(p.messages, p.rejected, template)
                         + [{"role": "assistant", "content": p.chosen}], {"pair": p.id}) for p in pairs]


def adaptive_examples(pairs: Sequence[PreferencePair], labels: Sequence[dict], template: str,
                      no_revision_target: str = "copy") -> list[Conversation]:
    """Adaptive SFT: (x, chosen) -> [NO REVISION] + chosen (or the tag alone with no_revision_target 'tag_only');
    (x, rejected) -> [MINOR|MAJOR REVISION] + chosen."""
    if no_revision_target not in ("copy", "tag_only"):
        raise ConfigError(f"no_revision_target must be copy or tag_only, got {no_revision_target!r}")
    out = []
    for p, lab in zip(pairs, labels):
        keep = format_target("none", p.chosen) if no_revision_target == "copy" else TAGS["none"]
        out.append(Conversation(f"{p.id}:keep", reviser_messages(p.messages, p.chosen, template)
                                + [{"role": "assistant", "content": keep}], {"pair": p.id, "decision": "none"}))
        out.append(Conversation(f"{p.id}:revise", reviser_messages(p.messages, p.rejected, template)
                                + [{"role": "assistant", "content": format_target(lab["decision"], p.chosen)}],
                                {"pair": p.id, "decision": lab["decision"], "gap": lab["gap"]}))
    return out


# ------------------------------------------------------------------------------------------------ generation
def _item_id(r: Response) -> str:
    return f"{r.prompt_id}#{r.sample_index}"


def revise_adaptive(generator, responses: Sequence[Response], template: str, tag_budget: int, max_new_tokens: int,
                    decisions_path: str | Path, continuations_path: str | Path, fallback: str = "none",
                    seed: int = 0, progress: bool = True) -> list[Revision]:
    """Revise `responses` adaptively (greedy). Returns one `Revision` per response (fewer with fallback 'drop':
    an unparsable tag then drops the response). Both passes append to their JSONL files and resume after a kill.

    Revision.meta: tag_status ('ok' | 'fallback'), tag_raw (the decide pass's text), finish_reason of the
    continuation, original_finish_reason of the response, and origin / sample_index from the response's meta."""
    from selfalign.generation import SamplingParams, generate_to_file

    if fallback not in FALLBACKS:
        raise ConfigError(f"tag fallback must be one of {FALLBACKS}, got {fallback!r}")
    items = {_item_id(r): r for r in responses}
    asks = [Prompt(iid, reviser_messages(r.messages, r.response, template), {}) for iid, r in items.items()]
    decide = SamplingParams(temperature=0.0, max_new_tokens=tag_budget, n=1, seed=seed)
    tags = {t.prompt_id: t.response for t in generate_to_file(generator, asks, decide, decisions_path, progress)}

    decided: dict[str, tuple[str | None, str]] = {}
    for iid in items:
        decision, _ = parse_decision(tags[iid])
        decided[iid] = (decision, "ok") if decision else (None if fallback == "drop" else fallback, "fallback")
    todo = [Prompt(a.id, a.messages, {"assistant_prefix": TAGS[decided[a.id][0]] + TAG_SEPARATOR}) for a in asks
            if decided[a.id][0] in ("minor", "major")]
    cont = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, n=1, seed=seed)
    continued = {c.prompt_id: c for c in generate_to_file(generator, todo, cont, continuations_path, progress)} \
        if todo else {}

    out = []
    for iid, r in items.items():
        decision, status = decided[iid]
        if decision is None:  # fallback 'drop'
            continue
        meta = {"sample_index": r.sample_index, "tag_status": status, "tag_raw": tags[iid], "model": r.model,
                "original_finish_reason": r.finish_reason,
                **{k: v for k, v in r.meta.items() if k in ("origin", "source")}}
        revised = r.response
        if decision != "none":
            c = continued[iid]
            meta["finish_reason"] = c.finish_reason
            if c.response.strip():
                revised = c.response.strip()  # a revision is new text: no stray whitespace around it
            else:  # an empty revision is no answer: keep the original, counted
                meta["empty_revision"] = True
        out.append(Revision(prompt_id=r.prompt_id, messages=r.messages, original=r.response, revised=revised,
                            decision=decision, meta=meta))
    return out


def revision_unfinished(r: Revision) -> bool:
    """Whether the text a revision hands on (`revised`) was cut off at a token budget: the continuation's when the
    reviser rewrote the answer, else the original answer's."""
    rewritten = r.decision != "none" and not r.meta.get("empty_revision")
    return r.meta.get("finish_reason" if rewritten else "original_finish_reason") == "length"


def revision_stats(revisions: Sequence[Revision], total: int | None = None) -> dict:
    """Per-round statistics: decision shares, fallbacks, and how much revised answers differ from the originals."""
    n = len(revisions)
    counts = Counter(r.decision for r in revisions)
    dist = [normalized_edit_distance(r.original, r.revised) for r in revisions]
    over = [token_overlap(r.original, r.revised) for r in revisions]
    changed = [d for r, d in zip(revisions, dist) if r.decision != "none"]
    mean = lambda xs: (sum(xs) / len(xs)) if xs else None  # noqa: E731
    return {
        "responses": total if total is not None else n,
        "revisions": n,
        **{f"share_{d}": (counts[d] / n if n else None) for d in DECISIONS},
        **{f"count_{d}": counts[d] for d in DECISIONS},
        "tag_fallbacks": sum(r.meta.get("tag_status") == "fallback" for r in revisions),
        "dropped": (total - n) if total is not None else 0,
        "empty_revisions": sum(bool(r.meta.get("empty_revision")) for r in revisions),
        "identical_to_original": sum(r.revised == r.original for r in revisions),
        "mean_edit_distance": mean(dist),
        "mean_edit_distance_revised": mean(changed),
        "mean_token_overlap": mean(over),
        "mean_words_original": mean([len(_words(r.original)) for r in revisions]),
        "mean_words_revised": mean([len(_words(r.revised)) for r in revisions]),
    }


# ------------------------------------------------------------------------------------------------ quality
def quality_inputs(pairs: Sequence[PreferencePair], source: str) -> list[Response]:
    """Both answers of each held-out pair as revision inputs, ids `{pair id}:rejected` / `:chosen`, `meta.origin` the
    side: the rejected (weaker) answer should come back improved, the chosen (stronger) one verbatim."""
    return [Response(prompt_id=f"{p.id}:{side}", messages=p.messages, response=getattr(p, side),
                     model=f"{source}:{side}", meta={"origin": side})
            for p in pairs for side in ("rejected", "chosen")]


def _share(hits: int, n: int) -> dict:
    p = hits / n if n else None
    return {"n": n, "count": hits, "share": p, "se": (p * (1 - p) / n) ** 0.5 if n else None}


def judge_revisions(revisions: Sequence[Revision], judge) -> tuple[list[dict], dict]:
    """How well a reviser did on `quality_inputs`: `judge` (a pairwise judge) compares each changed revision with
    its original; an unchanged answer is by definition not better than itself and is not judged. Returns (one row per
    revision: side, decision, changed, p_revised_better) and, per side, the decision statistics, the unchanged share,
    the share judged better (of all and of the changed ones, with standard errors) and the truncated revisions."""
    from selfalign.judges.base import PairwiseItem

    changed = [r for r in revisions if r.revised != r.original]
    verdicts = judge.compare([PairwiseItem(r.messages, r.revised, r.original) for r in changed]) if changed else []
    p_better = {r.prompt_id: v.p_a for r, v in zip(changed, verdicts)}
    rows = [{"id": r.prompt_id, "side": r.meta["origin"], "decision": r.decision, "changed": r.revised != r.original,
             "p_revised_better": p_better.get(r.prompt_id)} for r in revisions]

    def side_summary(side: str) -> dict:
        revs = [r for r in revisions if r.meta["origin"] == side]
        judged = [p_better[r.prompt_id] for r in revs if r.prompt_id in p_better]
        return {"decisions": revision_stats(revs),
                "unchanged": _share(sum(r.revised == r.original for r in revs), len(revs)),
                "judged_better": _share(sum(p > 0.5 for p in judged), len(revs)),  # over all pairs of the side
                "judged_better_of_changed": _share(sum(p > 0.5 for p in judged), len(judged)),
                "mean_p_revised_better_of_changed": sum(judged) / len(judged) if judged else None,
                "truncated_revisions": sum(r.meta.get("finish_reason") == "length" for r in revs)}

    return rows, {"rejected": side_summary("rejected"), "chosen": side_summary("chosen")}


def quality_markdown(title: str, q: dict) -> str:
    """`judge_revisions`' summary (with `judge`) as markdown: the two headline shares with standard errors, and the
    decisions per input side."""
    def fmt(s: dict) -> str:
        return "n/a" if s["share"] is None else f"{s['share']:.3f} ± {s['se']:.3f} ({s['count']}/{s['n']})"

    rej, cho = q["rejected"], q["chosen"]
    lines = [f"# {title}", "",
             f"- weaker (rejected) answer revised, judged better than the original by `{q['judge']}`: "
             f"{fmt(rej['judged_better'])}; of the changed ones {fmt(rej['judged_better_of_changed'])}",
             f"- stronger (chosen) answer returned verbatim: {fmt(cho['unchanged'])}; changed ones judged better "
             f"than the chosen: {fmt(cho['judged_better_of_changed'])}", "",
             "| input | no | minor | major | tag fallbacks | unchanged | truncated revisions |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for side, s in (("rejected", rej), ("chosen", cho)):
        d = s["decisions"]
        lines.append(f"| {side} | {d['count_none']} | {d['count_minor']} | {d['count_major']} | "
                     f"{d['tag_fallbacks']} | {s['unchanged']['count']} | {s['truncated_revisions']} |")
    return "\n".join(lines) + "\n"
