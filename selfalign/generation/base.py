"""The generation interface every backend implements, and the resumable generate-to-file stage."""

from __future__ import annotations

import abc
import functools
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from selfalign.data.records import Prompt, Response
from selfalign.errors import ConfigError, DataError


@dataclass
class SamplingParams:
    """Decoding settings. temperature 0 means greedy."""

    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 256
    n: int = 1  # samples per prompt
    seed: int = 0
    # stop strings: generation ends at the first one, which is left out of the text; one that is a special token
    # ("<|im_start|>") ends it on that token (special_stop_ids)
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        if not all(isinstance(x, str) and x for x in self.stop):
            raise ConfigError("stop strings must be non-empty strings")
        if not 0 < self.top_p <= 1:  # top_p <= 0 would keep no token at all (a NaN fails this test too)
            raise ConfigError(f"top_p must be in (0, 1], not {self.top_p}")
        if not 0 <= self.temperature < math.inf:  # NaN and inf sample garbage, and NaN is not valid JSON
            raise ConfigError(f"temperature must be a finite number >= 0 (0 is greedy), not {self.temperature}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, not {self.max_new_tokens}")
        if self.n < 1:
            raise ConfigError(f"n (samples per prompt) must be >= 1, not {self.n}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        return asdict(self)


def check_sampling_section(section: Any) -> None:
    """SamplingParams' checks, and `check_generator_section`'s, on a config section that holds those fields (a
    recipe's `sampling:`, a critic's): a bad value then fails when the config loads, not when its stage starts hours
    into the run."""
    SamplingParams(temperature=section.temperature, top_p=getattr(section, "top_p", 1.0),
                   max_new_tokens=section.max_new_tokens)
    check_generator_section(section)


def check_generator_section(section: Any) -> None:
    """The generator settings of a config section that has them: batch_size (>= 1, or null: the backend's
    default), processes (>= 1) and options (the backend's other constructor options), none of which may repeat a key
    of the section itself: make_generator would be given it twice."""
    from dataclasses import fields

    batch_size = getattr(section, "batch_size", None)
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1 (or null: the backend's default), not {batch_size}")
    if getattr(section, "processes", 1) < 1:
        raise ConfigError(f"processes must be >= 1, not {section.processes}")
    own = sorted(set(getattr(section, "options", None) or {}) & {f.name for f in fields(section)})
    if own:
        raise ConfigError(f"options holds {own[0]}, a key of this section: set {own[0]} beside options, not under it")


OnBatch = Callable[[list[Response]], None]


class Generator(abc.ABC):
    """Answers prompts. `generate` calls `on_batch` with each finished batch of responses (so callers can write
    them incrementally) and returns all of them. `skip` holds (prompt_id, sample_index) keys already done."""

    model_name: str = "unknown"
    model_path: Path | None = None  # the local weights folder or file, when there is one (set by local backends)

    @functools.cached_property
    def model_sha256(self) -> str | None:
        """A short digest of the local weights, recorded with each answer: a file is resumed only by the weights
        that began it, even when two checkpoints share a display name (every run's `final/`, say)."""
        if self.model_path is None:
            return None
        from selfalign.runs import model_fingerprint  # hashed once per weights file, then cached by size and mtime

        return hashlib.sha256(json.dumps(model_fingerprint(self.model_path), sort_keys=True).encode()).hexdigest()[:16]

    @abc.abstractmethod
    def generate(self, prompts: Sequence[Prompt], params: SamplingParams, on_batch: OnBatch | None = None,
                 skip: set | None = None, progress: bool = True) -> list[Response]:
        ...

    def close(self) -> None:
        pass

    def _response(self, prompt: Prompt, text: str, params: SamplingParams, sample_index: int,
                  finish_reason: str | None, num_tokens: int | None, backend: str,
                  stop_string: bool = False) -> Response:
        """A Response with this generator's records. `stop_string`: the answer ended at one of `params.stop`; it is
        recorded in meta, so a reader can tell it from an end-of-turn token (both are finish_reason "stop", as in
        OpenAI's API)."""
        sampling = params.to_dict()
        sampling.pop("n")
        stop = sampling.pop("stop")
        if stop:  # recorded only when used, as a JSON list (records read back compare equal)
            sampling["stop"] = list(stop)
        sampling["backend"] = backend
        return Response(prompt_id=prompt.id, messages=prompt.messages, response=text, model=self.model_name,
                        sample_index=sample_index, sampling=sampling, finish_reason=finish_reason,
                        num_tokens=num_tokens, model_sha256=self.model_sha256,
                        meta={"stop_string": True} if stop_string else {})


class DeferredGenerator(Generator):
    """A local generator built on its first `generate`: a rerun whose answers are all on file (an evaluation's
    --out) loads no model, which takes minutes for a large one. It carries the display name and weights path the
    built generator will have (`model_name(spec)`, `resolve_model(spec)`), so a resume check reads the same digest
    before anything is loaded."""

    def __init__(self, build: Callable[[], Generator], model_name: str, model_path: Path | None):
        self._build, self._built = build, None
        self.model_name, self.model_path = model_name, model_path

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams, on_batch: OnBatch | None = None,
                 skip: set | None = None, progress: bool = True) -> list[Response]:
        if self._built is None:
            self._built = self._build()
            self._built.model_name = self.model_name  # a caller may have renamed it (an evaluation's label)
        return self._built.generate(prompts, params, on_batch=on_batch, skip=skip, progress=progress)

    def close(self) -> None:
        if self._built is not None:
            self._built.close()


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the earliest stop string (excluded), and whether one was found (OpenAI's `stop` semantics)."""
    cut = min((k for k in (text.find(x) for x in stop) if k >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def special_stop_ids(tokenizer, stop: Sequence[str], eos_ids) -> set[int]:
    """Token ids of the stop strings that are special tokens (e.g. "<|im_start|>", which ChatML clients send as a
    stop string), other than the end tokens already in `eos_ids`. Answers are decoded with special tokens skipped, so
    such a stop string never appears in the text: generation stops on its token instead, the token left out of the
    answer like any stop string. (A stop string that only contains a special token, e.g. "\\n<|im_start|>", still
    never matches; an end token given as a stop string, e.g. "<|im_end|>", ends the answer as an end token does.)"""
    if not stop:
        return set()
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special = {t.content: i for i, t in added.items() if getattr(t, "special", False)}
    return {special[x] for x in stop if x in special} - set(eos_ids)


def stop_window(stop: Sequence[str]) -> int:
    """How many of the newest tokens to decode when looking for a stop string as it completes: enough for the
    longest one even when each character takes several byte-level tokens (up to 4 per UTF-8 character), and at
    least 32 tokens."""
    return max([32] + [4 * len(x) + 2 for x in stop])


def sequence_seed(seed: int, prompt_id: str, sample_index: int) -> int:
    """The random seed of one sample: a function of (run seed, prompt id, sample index) only, so a sample does not
    depend on its batch companions and a resumed run draws with the seeds the uninterrupted one would have. (Its
    logits can still differ in the last bits, since a matmul's blocking depends on how many rows it holds; on rare
    near-ties that flips a token.)"""
    digest = hashlib.sha256(f"{seed}|{prompt_id}|{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def response_key(row: dict) -> tuple[str, int]:
    return (str(row["prompt_id"]), int(row.get("sample_index", 0)))


def check_output_file(out: str | Path) -> None:
    """Refuse now, before a model loads, an output that `generate_to_file` would refuse: a folder, a file that holds
    no answers (never truncated), a file another live process is writing."""
    from selfalign.runs import ResumableJsonl

    if Path(out).exists():
        ResumableJsonl(out, key=response_key).close()
    else:
        ResumableJsonl.check_free(out)


def generate_to_file(generator: Generator, prompts: Iterable[Prompt], params: SamplingParams, out: str | Path,
                     progress: bool = True) -> list[Response]:
    """Answer `prompts` into the JSONL file `out`, resuming after its last complete record.

    Safe against kill -9 at any point: records are appended per batch; on restart the torn last line (if any)
    is dropped and only missing (prompt_id, sample_index) pairs are generated. Returns all responses in prompt
    order.
    """
    from selfalign.runs import ResumableJsonl

    prompts = list(prompts)
    with ResumableJsonl(out, key=response_key) as sink:
        _check_resumable(sink.rows, {p.id: p.messages for p in prompts}, generator, params, out)
        missing = [p for p in prompts if any((p.id, i) not in sink.done for i in range(params.n))]
        if missing:
            # all prompts go in, with the done ones as `skip`: the backend then plans (and seeds) the same batches
            # as an uninterrupted run, so a resumed run draws the samples the uninterrupted one would (up to
            # last-bit logit differences from other batch companions: see sequence_seed)
            generator.generate(prompts, params, on_batch=sink.append, skip=set(sink.done), progress=progress)
        rows = {response_key(r): r for r in sink.rows}
    return [Response.from_dict(rows[(p.id, i)]) for p in prompts for i in range(params.n) if (p.id, i) in rows]


# the settings that decide what an answer is; a file is resumed only under the same ones. Not compared: n (more
# samples only add rows) and the backend (another backend draws other samples, but from the same distribution)
RESUME_FIELDS = ("temperature", "top_p", "max_new_tokens", "seed", "stop")


def _check_resumable(rows: list[dict], prompts: dict[str, list], generator: Generator, params: SamplingParams,
                     out) -> None:
    """Refuse to resume a file whose answers to these prompt ids answer other prompts (another prompt file written
    to the same --out, or a prompt edited since), or came from another model or other sampling settings: they would
    be kept as if they were this run's (a reused --out of an evaluation, say). Models are compared by
    their record name (a folder's last component) and, where both the row and this generator have one, by the digest
    of the local weights, which tells apart two checkpoints of the same name; rows that record no model or no
    sampling settings (written by another tool) are taken as they are."""
    want = params.to_dict()
    want["stop"] = list(params.stop) or None
    fields = [k for k in RESUME_FIELDS if not (k == "seed" and params.greedy)]  # greedy answers ignore the seed
    model = None
    for line, row in enumerate(rows, 1):
        asked = prompts.get(str(row.get("prompt_id")))
        if asked is None:
            continue  # one file may hold several groups (MT-Bench answers each temperature group into one file)
        if row.get("messages") is not None and row["messages"] != asked:
            raise DataError(f"holds an answer to another prompt with id '{row['prompt_id']}' (its messages differ); "
                            "resume with the same prompts, or write elsewhere (another --out or --run-dir)",
                            path=str(out), line=line, field="messages")
        if model is None:  # read only when needed: an endpoint's model name may cost a request
            model = generator.model_name
        # a name without the parent folder is the same model, recorded before checkpoint folders were named with
        # their parent's ("final", now "spa/final"); the weights' digest below still tells checkpoints apart
        if row.get("model") is not None and row.get("model") != model and not model.endswith(f"/{row['model']}"):
            raise DataError(f"holds answers by model '{row.get('model')}', not '{model}'; resume with the same model "
                            f"or write elsewhere (another --out)", path=str(out), line=line, field="model")
        if row.get("model_sha256") and generator.model_sha256 and row["model_sha256"] != generator.model_sha256:
            raise DataError(f"holds answers by other weights named '{model}' (sha256 {row['model_sha256']}, this "
                            f"model's is {generator.model_sha256}); write elsewhere (another --out)", path=str(out),
                            line=line, field="model_sha256")
        got = row.get("sampling")
        if not got:  # written by hand or another tool, without its settings: nothing to compare
            continue
        for k in fields:
            if got.get(k) != want[k]:
                raise DataError(f"was sampled with {k}={got.get(k)!r}, not {want[k]!r}; resume with the same settings "
                                f"or write elsewhere (another --out)", path=str(out), line=line, field=f"sampling.{k}")
