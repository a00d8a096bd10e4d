"""A local LLM judge that reads verdict-token probabilities, pairwise and single-answer.

Pairwise (as alpaca_eval's weighted GPT-4-Turbo annotator): the prompt (a data file, default `alpaca_eval_clf`)
asks for a single-token identifier of the better answer; one forward pass over the rendered chat (plus the
template's `assistant_prefix`) gives the next-token distribution, restricted to the two verdict tokens:
P(first better) = P(first label) / (P(first label) + P(second label)). Nothing is generated, so nothing can fail
to parse; the probability mass the model puts on the two labels is reported as `label_mass` (a small mass means
the model wanted to say something else). Small judges are strongly position-biased, so both orders are judged and
combined (`combine_orders`); a judge that always picks the first answer gets p_a = 0.5 and consistent = False.

Single-answer grading (MT-Bench, FastChat's `single-*` prompts): the answer is primed with "Rating: [[" and the
grade is the expectation of the rating under the model, E[r] = sum_r r P(r) / sum_r P(r) for r = 1..10, where
P(r) is the probability of the whole continuation "r]]" (teacher-forced, so a tokenizer that splits "10" into
"1" "0" is handled exactly). `details` hold the distribution and its argmax.

Modes (`mode=`): "pairwise" (the above, default); "pointwise" grades each distinct answer once with the
single-answer prompt and compares the expected ratings, p_a = sigmoid(grade(A) - grade(B)) (no position effect
at all, and each answer costs one pass instead of two per pair); "both" averages the two p_a's.

Speed: sequences are batched longest first with left padding (position ids follow the attention mask, so a
padded row gives the same distribution as the row alone); the template's fixed preamble (system prompt and
instructions before the first placeholder) is run once and its keys/values are reused by every sequence
(`share_prefix`, the same numbers either way); only the last position's logits are computed. On CPU the default
dtype is float32: on CPUs without AVX-512 bf16 (e.g. the AVX2 EPYC this was measured on) bfloat16 is slower.
Answers longer than `max_answer_tokens` judge tokens (and instructions longer than `max_instruction_tokens`) are
cut, with a visible "[... truncated ...]" mark; the verdict's details say which were cut.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

from tqdm.auto import tqdm

from selfalign.judges.base import Grade, GradeItem, GradingJudge, PairwiseItem, PairwiseJudge, PairwiseVerdict
from selfalign.judges.prompts import (JudgePrompt, combine_orders, conversation_text, load_prompt, pick,
                                      truncate_tokens)

DEFAULT_JUDGE_MODEL = "qwen2.5-coder-1.5b"
MODES = ("pairwise", "pointwise", "both")
GRADE_PROMPTS = {(False, 1): "single_v1", (True, 1): "single_math_v1", (False, 2): "single_v1_multi_turn",
                 (True, 2): "single_math_v1_multi_turn"}


def _cache_kwarg(model) -> str:
    """The forward() keyword for a KV cache: transformers 5.24 renamed `past_key_values` to `cache` (the old name
    is deprecated, to be removed in 5.40); older 5.x releases know only `past_key_values`."""
    return _cache_kwarg_of(type(model))


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(model_class) -> str:  # inspected once per class, not on every forward
    import inspect

    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _output_cache(out):
    """The KV cache of a model output, under whichever name its class declares: since 5.24 the field is `cache`,
    and reading `past_key_values` logs a deprecation warning on every judge run (the alias goes in 5.40)."""
    return out.cache if "cache" in getattr(out, "__dataclass_fields__", {}) else out.past_key_values


def _as_list(value) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


def grading_fields(item: GradeItem) -> tuple[str, dict]:
    """The FastChat single-answer prompt for a grade item and its placeholder values. Turn 2 uses the multi-turn
    prompts (question_1/answer_1 from the conversation); a reference answer selects the reference-guided (math)
    prompt, with per-turn references from `references` when given."""
    users = [m["content"] for m in item.messages if m["role"] == "user"]
    assistants = [m["content"] for m in item.messages if m["role"] == "assistant"]
    multi = item.turn >= 2 or len(users) >= 2
    refs = list(getattr(item, "references", None) or [])
    has_ref = bool(item.reference) or bool(refs)
    name = GRADE_PROMPTS[(has_ref, 2 if multi else 1)]
    if multi:
        fields = {"question_1": users[0], "answer_1": assistants[0] if assistants else "", "question_2": users[-1],
                  "answer_2": item.answer}
        if has_ref:
            fields["ref_answer_1"] = refs[0] if refs else item.reference
            fields["ref_answer_2"] = refs[1] if len(refs) > 1 else (item.reference or refs[-1])
    else:
        fields = {"question": conversation_text(item.messages), "answer": item.answer}
        if has_ref:
            fields["ref_answer_1"] = item.reference or refs[0]
    return name, fields


class LocalJudge(PairwiseJudge, GradingJudge):
    name = "local"

    def __init__(self, model: str = DEFAULT_JUDGE_MODEL, prompt: str | list[str] = "alpaca_eval_clf",
                 dtype: str = "auto", device: str = "cpu", batch_size: int = 4, max_answer_tokens: int = 512,
                 max_instruction_tokens: int = 512, both_orders: bool = True, share_prefix: bool = True,
                 mode: str = "pairwise", model_obj=None, tokenizer=None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self.model_spec = str(model)
        self.prompts: list[JudgePrompt] = [load_prompt(p) for p in _as_list(prompt)]
        for p in self.prompts:
            if p.labels is None:
                raise ValueError(f"judge prompt '{p.name}' has no 'labels' line; it is not a pairwise prompt")
        self.dtype, self.device = dtype, device
        self.batch_size = max(1, int(batch_size))
        self.max_answer_tokens = int(max_answer_tokens)
        self.max_instruction_tokens = int(max_instruction_tokens)
        self.both_orders = bool(both_orders)
        self.share_prefix = bool(share_prefix)  # a speed-up only: not part of config(), verdicts are the same
        self._preambles: dict = {}
        self._model, self._tok = model_obj, tokenizer
        self._label_ids: dict[str, list[int]] = {}
        self.forward_calls = 0  # sequences scored (tests count these)
        self.seconds = 0.0

    def config(self) -> dict:
        common = {"model": self.model_spec, "dtype": self.dtype, "max_answer_tokens": self.max_answer_tokens,
                  "max_instruction_tokens": self.max_instruction_tokens}
        if self.model_spec and Path(str(self.model_spec)).expanduser().exists():
            # a folder or file is a checkpoint that can be retrained in place: its weights' digest is part of the
            # judge's identity, so verdicts cached by the old weights are not reused (short names are fixed weights)
            from selfalign.runs import model_fingerprint

            common["weights"] = model_fingerprint(Path(str(self.model_spec)).expanduser())
        pairwise = {"prompts": {p.name: p.sha256[:16] for p in self.prompts}, "both_orders": self.both_orders,
                    "method": "verdict-token-probability"}
        grading = {"grade_prompts": {n: load_prompt(n).sha256[:16] for n in sorted(set(GRADE_PROMPTS.values()))},
                   "grade_method": "expected-rating"}
        if self.mode == "pairwise":
            return {**common, **pairwise}
        if self.mode == "pointwise":
            return {**common, **grading, "mode": "pointwise"}
        return {**common, **pairwise, **grading, "mode": "both"}

    # ------------------------------------------------------------------------------------------ model
    def _load(self):
        if self._model is None:
            from selfalign.models import load_model

            self._model = load_model(self.model_spec, dtype=self.dtype, device=self.device)
        if self._tok is None:
            from selfalign.models import load_tokenizer

            self._tok = load_tokenizer(self.model_spec, padding_side="left")
        self._tok.padding_side = "left"
        return self._model, self._tok

    @property
    def tokenizer(self):
        return self._load()[1]

    def label_ids(self, label: str) -> list[int]:
        """Token ids that spell the label alone ("m" and " m"), each one token in this tokenizer."""
        if label not in self._label_ids:
            tok = self.tokenizer
            ids = set()
            for text in (label, " " + label):
                enc = tok(text, add_special_tokens=False)["input_ids"]
                if len(enc) == 1:
                    ids.add(enc[0])
            if not ids:
                raise ValueError(f"verdict label {label!r} is not a single token for {self.model_spec}; "
                                 "use a prompt with single-token labels")
            self._label_ids[label] = sorted(ids)
        return self._label_ids[label]

    def _render(self, prompt: JudgePrompt, fields: dict) -> list[int]:
        from selfalign.models import render_prompt

        tok = self.tokenizer
        text = render_prompt(tok, prompt.messages(**fields)) + prompt.assistant_prefix
        return tok(text, add_special_tokens=False)["input_ids"]

    def _forward(self, batch: list[list[int]], keep_cache: bool = False, prefix: tuple | None = None):
        """Last-position log-probabilities for left-padded sequences ([batch, vocab]), and the model output.

        With `prefix` = (ids, cache), every sequence starts with `ids`, whose keys/values are already in `cache`:
        only the suffixes run, left-padded between the shared prefix and themselves (the mask hides the gap and
        position ids continue from the prefix), so the result equals the full forward pass."""
        import copy

        import torch

        model, tok = self._load()
        skip = len(prefix[0]) if prefix is not None else 0
        rows = [ids[skip:] for ids in batch]
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, ids in enumerate(rows):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            mask[row, width - len(ids):] = 1
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0) + skip
        kwargs = {}
        if prefix is not None:
            cache = copy.deepcopy(prefix[1])
            if len(rows) > 1:
                cache.batch_repeat_interleave(len(rows))
            kwargs[_cache_kwarg(model)] = cache
            mask = torch.cat([torch.ones((len(rows), skip), dtype=torch.long), mask], dim=1)
            keep_cache = True
        device = next(model.parameters()).device
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                        position_ids=position_ids.to(device), use_cache=keep_cache, logits_to_keep=1, **kwargs)
        self.seconds += time.perf_counter() - t0
        self.forward_calls += len(batch)
        return torch.log_softmax(out.logits[:, -1, :].float(), dim=-1), out

    def _preamble(self, prompt: JudgePrompt, sample: list[int]) -> tuple | None:
        """The token prefix that every rendering of `prompt` shares (system prompt, instructions up to the first
        placeholder), with its keys/values computed once; None when it is too short to be worth it or `sample`
        does not start with it."""
        import torch

        if not self.share_prefix:
            return None
        if prompt.name not in self._preambles:
            a = self._render(prompt, {f: "\x01" for f in prompt.placeholders()})
            b = self._render(prompt, {f: "\x02 x" for f in prompt.placeholders()})
            n = 0
            while n < min(len(a), len(b)) and a[n] == b[n]:
                n += 1
            n -= 1  # the last shared token may merge with what follows in a real rendering
            entry = None
            if n >= 16:
                ids = a[:n]
                model = self._load()[0]
                with torch.inference_mode():
                    out = model(input_ids=torch.tensor([ids], device=next(model.parameters()).device),
                                use_cache=True, logits_to_keep=1)
                entry = (ids, _output_cache(out))
            self._preambles[prompt.name] = entry
        entry = self._preambles[prompt.name]
        if entry is None or sample[:len(entry[0])] != entry[0] or len(sample) <= len(entry[0]):
            return None
        return entry

    def _score_sequences(self, seqs: list[list[int]], prompts: list[JudgePrompt] | None = None,
                         progress: bool = False, desc: str = "judge") -> list:
        """Next-token log-probabilities (a CPU tensor row per sequence), longest first in batches; sequences of
        the same prompt template share its preamble's cached keys/values."""
        prompts = prompts or [None] * len(seqs)
        groups: dict = {}
        for i, (ids, prompt) in enumerate(zip(seqs, prompts)):
            pre = self._preamble(prompt, ids) if prompt is not None else None
            groups.setdefault(None if pre is None else prompt.name, ([], pre))[0].append(i)
        rows: list = [None] * len(seqs)
        bar = tqdm(total=len(seqs), desc=f"{desc} ({self.model_spec})", unit="seq", disable=not progress)
        for members, pre in groups.values():
            order = sorted(members, key=lambda i: -len(seqs[i]))
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                logp, _ = self._forward([seqs[i] for i in idx], prefix=pre)
                for row, i in enumerate(idx):
                    rows[i] = logp[row].cpu()
                bar.update(len(idx))
        bar.close()
        return rows

    # ------------------------------------------------------------------------------------------ pairwise
    def _pair_fields(self, item: PairwiseItem) -> tuple[dict, list[str]]:
        tok = self.tokenizer
        cut = []
        instruction, c = truncate_tokens(tok, conversation_text(item.messages), self.max_instruction_tokens)
        if c:
            cut.append("instruction")
        a, ca = truncate_tokens(tok, item.answer_a, self.max_answer_tokens)
        b, cb = truncate_tokens(tok, item.answer_b, self.max_answer_tokens)
        cut += ["answer_a"] * ca + ["answer_b"] * cb
        fields = {"instruction": instruction, "a": a, "b": b}
        if item.reference:
            fields["reference"] = item.reference
        return fields, cut

    def compare(self, items: list[PairwiseItem], progress: bool = False) -> list[PairwiseVerdict]:
        if not items:
            return []
        if self.mode == "pointwise":
            return self._compare_pointwise(items, progress)
        verdicts = self._compare_pairwise(items, progress)
        if self.mode == "both":
            for v, w in zip(verdicts, self._compare_pointwise(items, progress)):
                v.details["p_a_pairwise"], v.details["p_a_pointwise"] = v.p_a, w.p_a
                v.details["grades"] = w.details["grades"]
                v.p_a = (v.p_a + w.p_a) / 2
        return verdicts

    def _compare_pointwise(self, items: list[PairwiseItem], progress: bool = False) -> list[PairwiseVerdict]:
        """Grade each distinct answer once (FastChat single-answer prompt, expected rating) and compare the grades:
        p_a = sigmoid(grade(A) - grade(B)); order cannot matter, so every verdict is position-consistent."""
        import math

        index: dict[str, int] = {}
        grade_items = []
        refs = []
        for it in items:
            pair = []
            for ans in (it.answer_a, it.answer_b):
                key = repr((it.messages, ans, it.reference))
                if key not in index:
                    index[key] = len(grade_items)
                    grade_items.append(GradeItem(it.messages, ans, reference=it.reference))
                pair.append(index[key])
            refs.append(pair)
        grades = self.grade(grade_items, progress)
        out = []
        for a, b in refs:
            ga, gb = grades[a], grades[b]
            if ga.score is None or gb.score is None:
                out.append(PairwiseVerdict(p_a=0.5, consistent=None, parsed=False,
                                           details={"method": "pointwise-rating", "grades": [ga.score, gb.score]}))
                continue
            diff = max(-60.0, min(60.0, ga.score - gb.score))
            cut = [f"answer_{x}" for x, g in (("a", ga), ("b", gb)) if g.details.get("truncated")]
            out.append(PairwiseVerdict(p_a=1.0 / (1.0 + math.exp(-diff)), consistent=True,
                                       details={"method": "pointwise-rating", "grades": [ga.score, gb.score],
                                                "truncated": cut}))
        return out

    def _compare_pairwise(self, items: list[PairwiseItem], progress: bool = False) -> list[PairwiseVerdict]:
        import math

        seqs, plan = [], []  # plan[k] = (item index, prompt index, order: 0 = A first, 1 = B first)
        cuts = []
        for i, it in enumerate(items):
            f, cut = self._pair_fields(it)
            cuts.append(cut)
            for j, prompt in enumerate(self.prompts):
                extra = {"reference": f["reference"]} if "reference" in f else {}
                orders = [(f["a"], f["b"]), (f["b"], f["a"])] if self.both_orders else [(f["a"], f["b"])]
                for o, (first, second) in enumerate(orders):
                    seqs.append(self._render(prompt, {"instruction": f["instruction"], "output_1": first,
                                                      "output_2": second, **extra}))
                    plan.append((i, j, o))
        rows = self._score_sequences(seqs, [self.prompts[j] for _, j, _ in plan], progress)
        per_item: list[dict] = [{"p_first": [[None, None] for _ in self.prompts],
                                 "label_mass": [[None, None] for _ in self.prompts]} for _ in items]
        for (i, j, o), row in zip(plan, rows):
            first, second = self.prompts[j].labels
            pf = float(sum(math.exp(row[t]) for t in self.label_ids(first)))
            ps = float(sum(math.exp(row[t]) for t in self.label_ids(second)))
            per_item[i]["p_first"][j][o] = pf / (pf + ps) if pf + ps > 0 else None
            per_item[i]["label_mass"][j][o] = pf + ps
        verdicts = []
        for i, info in enumerate(per_item):
            # average each order over the prompts (an ensemble), then combine the two orders
            def mean(vals):
                vals = [v for v in vals if v is not None]
                return sum(vals) / len(vals) if vals else None

            p_ab = mean([info["p_first"][j][0] for j in range(len(self.prompts))])
            p_ba = mean([info["p_first"][j][1] for j in range(len(self.prompts))]) if self.both_orders else None
            p_a, consistent, parsed = combine_orders(p_ab, p_ba)
            details = {"method": "verdict-token-probability", "prompts": [p.name for p in self.prompts],
                       "p_first": info["p_first"], "label_mass": info["label_mass"], "truncated": cuts[i],
                       "pick_a_first": pick(p_ab), "pick_b_first": pick(None if p_ba is None else 1 - p_ba)}
            verdicts.append(PairwiseVerdict(p_a=p_a, consistent=consistent, parsed=parsed, details=details))
        return verdicts

    # ------------------------------------------------------------------------------------------ grading
    def _rating_distribution(self, ids: list[int], prompt: JudgePrompt | None = None,
                             ratings=range(1, 11)) -> dict[int, float]:
        """P(r) of each continuation "r]]" after the primed prompt, teacher-forced, sharing the prompt's cache."""
        import torch

        model, tok = self._load()
        pre = self._preamble(prompt, ids) if prompt is not None else None
        first_logp, out = self._forward([ids], keep_cache=True, prefix=pre)
        cache = _output_cache(out)
        device = next(model.parameters()).device
        logps = {}
        for r in ratings:
            cont = tok(f"{r}]]", add_special_tokens=False)["input_ids"]
            total = float(first_logp[0, cont[0]])
            if len(cont) > 1:
                pos = torch.arange(len(ids), len(ids) + len(cont) - 1, device=device)[None]
                with torch.inference_mode():
                    o = model(input_ids=torch.tensor([cont[:-1]], device=device), **{_cache_kwarg(model): cache},
                              position_ids=pos, use_cache=True)
                lp = torch.log_softmax(o.logits[0].float(), dim=-1)
                total += float(sum(lp[k, t] for k, t in enumerate(cont[1:])))
                cache.crop(-(len(cont) - 1))  # drop the continuation again (negative = tokens to remove)
            logps[r] = total
        return logps

    def grade(self, items: list[GradeItem], progress: bool = False) -> list[Grade]:
        import math

        grades = []
        prompts: dict[str, JudgePrompt] = {}
        for item in tqdm(items, desc=f"grade ({self.model_spec})", unit="answer", disable=not progress):
            name, fields = grading_fields(item)
            prompt = prompts.setdefault(name, load_prompt(name))
            cut = []
            for key in [k for k in fields if k.startswith("answer")]:
                fields[key], c = truncate_tokens(self.tokenizer, fields[key], self.max_answer_tokens)
                cut += [key] * c
            for key in [k for k in fields if k.startswith("question")]:
                fields[key], c = truncate_tokens(self.tokenizer, fields[key], self.max_instruction_tokens)
                cut += [key] * c
            logps = self._rating_distribution(self._render(prompt, fields), prompt)
            top = max(logps.values())
            weights = {r: math.exp(v - top) for r, v in logps.items()}
            z = sum(weights.values())
            mass = sum(math.exp(v) for v in logps.values())
            if z <= 0 or not math.isfinite(z):
                grades.append(Grade(score=None, raw="", details={"prompt": name, "truncated": cut}))
                continue
            dist = {r: w / z for r, w in weights.items()}
            score = sum(r * p for r, p in dist.items())
            grades.append(Grade(score=score, raw=f"[[{max(dist, key=dist.get)}]]",
                                details={"method": "rating-expectation", "prompt": name,
                                         "distribution": {str(r): round(p, 6) for r, p in dist.items()},
                                         "rating_mass": mass, "truncated": cut}))
        return grades
