"""An OpenAI-compatible API judge (GPT-4-class), so a user with a key gets the papers' protocols.

Pairwise, default prompt `alpaca_eval_clf`: alpaca_eval's weighted GPT-4-Turbo annotator
(`weighted_alpaca_eval_gpt4_turbo`). One request per order asks for 1 token with `logprobs` and `top_logprobs`
(5, as alpaca_eval), and P(first better) = P(m) / (P(m) + P(M)) is read from the first (only) position.
Prompts whose answer is a bracketed verdict (a template with `assistant_prefix`, e.g. `pair_v2`: "[[A]]") get
`verdict_max_tokens` tokens (default 32) and the label's probabilities are read at the position right after the
prefix ("[[" -> the "A" token), not at the first token. When the endpoint returns no log-probabilities (or no label
is among them), the answer text is parsed instead ("m", "M", or "[[A]]" / "[[B]]" / "[[C]]" = tie); when that fails
the order is recorded as unparseable (p = 0.5, `parsed` = False when both orders failed). As in alpaca_eval and
FastChat, an unreadable answer is not asked again by default; `max_retries=N` (opt-in, a selfalign extra) re-asks
up to N times at temperature 1.

Deviations from alpaca_eval's annotator, all documented here:
- both orders are judged and combined by default (alpaca_eval randomises one order per item): `both_orders=False`
  judges the given order only (output_1 = answer_a shown first);
- requests use temperature 0 (alpaca_eval sends 1 with max_tokens 1; the verdict is read from the log-probabilities,
  which its config notes the temperature should not change);
- a label token counts after stripping whitespace (" m" counts as "m"; alpaca_eval matches tokens exactly);
- the text and `[[A]]` fallbacks when no log-probabilities come back (alpaca_eval records such an item as missing).

Grading: FastChat's MT-Bench single-answer protocol (`run_judge_single`): one request at temperature 0 with
max_tokens 2048 (`grade_max_tokens`), the judge writes an explanation and "Rating: [[n]]", the rating is read with
FastChat's patterns (first `[[n]]`, else first `[n]`, no range check; `parse_rating`), and a grade with no rating is
Grade(score=None) (FastChat's -1), left out of the means. Not re-asked by default, as in FastChat; `max_retries=N`
(opt-in) re-asks up to N times at temperature 0.7.

The HTTP side (retries on 429 / 5xx with backoff, the API key read from `api_key_env`) is OpenAIGenerator's.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from tqdm.auto import tqdm

from selfalign.errors import SelfalignError
from selfalign.judges.base import Grade, GradeItem, GradingJudge, PairwiseItem, PairwiseJudge, PairwiseVerdict
from selfalign.judges.local import grading_fields
from selfalign.judges.prompts import (combine_orders, conversation_text, load_prompt, p_first, parse_label_text,
                                      parse_rating, pick, truncate_tokens, verdict_probabilities)

# FastChat run_judge_single / run_judge_pair: temperature 0, max_tokens 2048 for the OpenAI judges
GRADE_MAX_TOKENS = 2048
# a bracketed verdict ("[[A]]") is 3-5 tokens; the rest of the budget tolerates a short preamble
BRACKET_VERDICT_TOKENS = 32


def _choice(data: dict) -> dict:
    try:
        choice = data["choices"][0]
        if not isinstance(choice, dict):
            raise TypeError
        return choice
    except (KeyError, IndexError, TypeError):
        return {}


def _content(choice: dict) -> str | None:
    message = choice.get("message")
    return message.get("content") if isinstance(message, dict) else None


class APIJudge(PairwiseJudge, GradingJudge):
    name = "api"

    def __init__(self, base_url: str | None = None, model: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 prompt: str = "alpaca_eval_clf", both_orders: bool = True, top_logprobs: int = 5,
                 max_answer_tokens: int | None = None, grade_max_tokens: int = GRADE_MAX_TOKENS, max_retries: int = 0,
                 verdict_max_tokens: int | None = None, concurrency: int = 8, timeout: float = 600.0,
                 generator=None):
        self.prompt = load_prompt(prompt)
        if self.prompt.labels is None:
            raise SelfalignError(f"judge prompt '{self.prompt.name}' has no 'labels' line; not a pairwise prompt")
        if generator is None:
            from selfalign.generation.openai_backend import OpenAIGenerator

            if not base_url:
                raise SelfalignError("the api judge needs base_url (e.g. https://api.openai.com/v1 or the URL of "
                                     "`selfalign serve`)")
            generator = OpenAIGenerator(model=model, base_url=base_url, api_key_env=api_key_env,
                                        concurrency=concurrency, timeout=timeout)
        self.gen = generator
        self.base_url = base_url or getattr(generator, "base_url", None)
        self.model = model
        self.both_orders = bool(both_orders)
        self.top_logprobs = int(top_logprobs)
        self.max_answer_tokens = max_answer_tokens
        self.grade_max_tokens = int(grade_max_tokens)
        self.max_retries = max(0, int(max_retries))  # re-asks of an unreadable answer: 0 = the references' protocol
        # the answer's token budget for a verdict: 1 for a bare label (alpaca_eval), more for "[[A]]"
        self.verdict_max_tokens = int(verdict_max_tokens) if verdict_max_tokens else (
            BRACKET_VERDICT_TOKENS if self.prompt.assistant_prefix else 1)
        self.concurrency = max(1, int(getattr(generator, "concurrency", concurrency) or concurrency))
        # items per cache chunk: one round of requests in flight (x2 orders), so a failure loses at most that much
        self.batch_size = self.concurrency
        self._logprobs_ok = True
        self.requests = 0

    def check_reachable(self) -> None:
        """One request to the endpoint (OpenAIGenerator.check_reachable); a stand-in generator without it passes."""
        check = getattr(self.gen, "check_reachable", None)
        if check is not None:
            check()

    def config(self) -> dict:
        model = self.model or getattr(self.gen, "_model", None) or getattr(self.gen, "model_name", None)
        return {"base_url": self.base_url, "model": model, "prompt": self.prompt.name,
                "prompt_sha": self.prompt.sha256[:16], "both_orders": self.both_orders,
                "max_answer_tokens": self.max_answer_tokens, "verdict_max_tokens": self.verdict_max_tokens,
                "max_retries": self.max_retries, "grade_max_tokens": self.grade_max_tokens,
                "rating_parser": "fastchat-first-match",
                "method": "verdict-position-logprobs+parse-fallback"}

    # ------------------------------------------------------------------------------------------ requests
    def _chat(self, messages: list[dict], temperature: float, max_tokens: int, logprobs: bool,
              seed: int | None = None) -> dict:
        self.requests += 1
        if logprobs and self._logprobs_ok:
            try:
                return self.gen.chat(messages, temperature=temperature, max_tokens=max_tokens, logprobs=True,
                                     top_logprobs=self.top_logprobs, seed=seed)
            except SelfalignError as e:  # an endpoint that refuses logprobs: go on without them
                if "logprob" not in str(e).lower():
                    raise
                self._logprobs_ok = False
        return self.gen.chat(messages, temperature=temperature, max_tokens=max_tokens, seed=seed)

    def _verdict_once(self, messages: list[dict]) -> tuple[float | None, dict]:
        """P(first shown answer better) for one order, and how it was read."""
        labels, prefix = self.prompt.labels, self.prompt.assistant_prefix.strip()
        attempts = []
        for attempt in range(self.max_retries + 1):
            # a re-ask samples (T 1) with its own seed: reproducible, and never a copy of the unreadable answer
            data = self._chat(messages, temperature=0.0 if attempt == 0 else 1.0, max_tokens=self.verdict_max_tokens,
                              logprobs=True, seed=attempt or None)
            choice = _choice(data)
            text = _content(choice)
            attempts.append(text)
            content = (choice.get("logprobs") or {}).get("content") if isinstance(choice.get("logprobs"), dict) else None
            read = verdict_probabilities(content, labels, prefix)
            if read is not None:
                probs, position = read
                return p_first(probs), {"method": "logprobs", "label_probs": list(probs), "position": position,
                                        "text": text, "attempts": attempt + 1}
            p = parse_label_text(text, labels)
            if p is not None:
                return p, {"method": "parsed", "text": text, "attempts": attempt + 1}
        return None, {"method": "unparsed", "texts": attempts, "attempts": len(attempts)}

    def _map(self, fn, jobs: list, progress: bool, desc: str) -> list:
        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="selfalign-judge") as pool:
            return list(tqdm(pool.map(fn, jobs), total=len(jobs), desc=desc, unit="request", disable=not progress))

    # ------------------------------------------------------------------------------------------ pairwise
    def compare(self, items: list[PairwiseItem], progress: bool = False) -> list[PairwiseVerdict]:
        jobs, cuts = [], []
        for i, it in enumerate(items):
            instruction = conversation_text(it.messages)
            a, ca = truncate_tokens(None, it.answer_a, self.max_answer_tokens)
            b, cb = truncate_tokens(None, it.answer_b, self.max_answer_tokens)
            cuts.append(["answer_a"] * ca + ["answer_b"] * cb)
            orders = [(a, b), (b, a)] if self.both_orders else [(a, b)]
            for o, (first, second) in enumerate(orders):
                jobs.append((i, o, self.prompt.messages(instruction=instruction, output_1=first, output_2=second)))
        results = self._map(lambda job: self._verdict_once(job[2]), jobs, progress, f"judge ({self.name})")
        per_item = [[None, None] for _ in items]
        info = [[None, None] for _ in items]
        for (i, o, _), (p, how) in zip(jobs, results):
            per_item[i][o] = p
            info[i][o] = how
        verdicts = []
        for i, (p_ab, p_ba) in enumerate(per_item):
            p_a, consistent, parsed = combine_orders(p_ab, p_ba)
            details = {"method": "verdict-token", "prompt": self.prompt.name, "p_first": [p_ab, p_ba],
                       "orders": [x for x in info[i] if x is not None], "truncated": cuts[i],
                       "pick_a_first": pick(p_ab), "pick_b_first": pick(None if p_ba is None else 1 - p_ba)}
            verdicts.append(PairwiseVerdict(p_a=p_a, consistent=consistent, parsed=parsed, details=details))
        return verdicts

    # ------------------------------------------------------------------------------------------ grading
    def _grade_one(self, item: GradeItem) -> Grade:
        name, fields = grading_fields(item)
        prompt = load_prompt(name)
        cut = []
        for key in [k for k in fields if k.startswith("answer")]:
            fields[key], c = truncate_tokens(None, fields[key], self.max_answer_tokens)
            cut += [key] * c
        messages = prompt.messages(**fields)
        text = ""
        for attempt in range(self.max_retries + 1):
            data = self._chat(messages, temperature=0.0 if attempt == 0 else 0.7, max_tokens=self.grade_max_tokens,
                              logprobs=False, seed=attempt or None)
            text = _content(_choice(data)) or ""
            score = parse_rating(text)
            if score is not None:
                return Grade(score=score, raw=text, attempts=attempt + 1,
                             details={"method": "parsed", "prompt": name, "truncated": cut})
        return Grade(score=None, raw=text, attempts=self.max_retries + 1,
                     details={"method": "unparsed", "prompt": name, "truncated": cut})

    def grade(self, items: list[GradeItem], progress: bool = False) -> list[Grade]:
        return self._map(self._grade_one, list(items), progress, f"grade ({self.name})")

    def close(self) -> None:
        if hasattr(self.gen, "close"):
            self.gen.close()
