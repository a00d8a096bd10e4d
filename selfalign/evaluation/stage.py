"""The evaluation stage recipes run after each round or stage: AlpacaEval-style on a seeded subset, collected into
one table per run (DIR/eval/summary.md and summary.json).

A recipe config holds an `eval: EvalConfig` section; `evaluate_checkpoint(model_dir, label, config, run)` answers
and judges, and `write_summary(run)` rewrites the run's table from every evaluation done so far.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from selfalign.data.io import write_json


@dataclass
class EvalConfig:
    instructions: int = 100  # seeded AlpacaEval subset size per evaluation; 0 = no evaluation stages
    seed: int = 0  # which subset
    judge: str = "length"  # a name make_judge knows (length, local, reward, api, ...)
    judge_options: dict = field(default_factory=dict)  # e.g. {model: qwen2.5-coder-1.5b}
    max_new_tokens: int = 256
    batch_size: int | None = None  # sequences decoded together; None: the backend's default
    backend: str = "auto"  # local generation backend: auto (lean where supported), lean, transformers, vllm
    processes: int = 1  # worker processes, one per GPU, each decoding batch_size sequences (generation/parallel.py)

    # the backend's other constructor options: dtype, device, max_cache_gb, trust_remote_code (local backends);
    # vllm's engine options (tensor_parallel_size, gpu_memory_utilization, ...). docs/generation.md
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.instructions < 0:
            raise ValueError(f"instructions must be >= 0 (0: no evaluation stages), not {self.instructions}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, not {self.max_new_tokens}")
        from selfalign.generation import check_generator_section

        check_generator_section(self)


def eval_judge(config: EvalConfig, cache_dir: Path):
    """The judge an evaluation stage uses, with its judgement cache under `cache_dir`."""
    from selfalign.judges import make_judge

    # one judgement cache per run: the same (judge, prompt, answers) is never judged twice, across rounds or resumes
    return make_judge(config.judge, cache=str(cache_dir / f"judge_cache.{config.judge}.jsonl"), **config.judge_options)


def evaluate_checkpoint(model_dir: str | Path, label: str, config: EvalConfig, eval_root: str | Path) -> dict:
    """AlpacaEval-style metrics of the model in `model_dir` against the GPT-4-Turbo references, written under
    eval_root/label/. Resumable (answers and annotations are appended as they finish)."""
    from selfalign.evaluation.alpaca import evaluate_alpaca
    from selfalign.generation import SamplingParams, make_generator

    eval_root = Path(eval_root)
    gen = make_generator(config.backend, str(model_dir), batch_size=config.batch_size, processes=config.processes,
                         **config.options)
    gen.model_name = label
    metrics = evaluate_alpaca(gen, eval_judge(config, eval_root), eval_root / label, limit=config.instructions,
                              seed=config.seed, params=SamplingParams(temperature=0.0,
                                                                      max_new_tokens=config.max_new_tokens))
    gen.close()
    return {k: metrics.get(k) for k in ("win_rate", "standard_error", "length_controlled_winrate", "n_total",
                                        "n_unparsed", "position_consistency", "avg_length", "annotator")}


def write_summary(eval_root: str | Path, rows: dict[str, dict], title: str) -> Path:
    """One table per run: every evaluated checkpoint, in the order given, each after the first with its paired
    win-rate difference from the first (the starting model): the two rows' own error bars overlap even when the
    change is clear, since both share the draw of instructions (selfalign.evaluation.compare)."""
    eval_root = Path(eval_root)
    first = next(iter(rows), None)
    paired = {label: _paired_vs(eval_root, first, label) for label in rows if label != first}
    write_json(eval_root / "summary.json", {label: dict(m, **({f"vs_{first}": paired[label]} if paired.get(label)
                                                              else {})) for label, m in rows.items()})
    lines = [f"# {title}", "", f"| model | win rate | s.e. | Δ vs {first} (paired) | LC win rate | n | unparsed | "
             "avg length | judge |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    for label, m in rows.items():
        vs = paired.get(label)
        delta = "" if label == first else "n/a" if vs is None else \
            f"{vs['difference']:+.2f} ± {vs['standard_error']:.2f}"
        lines.append(f"| {label} | {fmt(m.get('win_rate'))} | {fmt(m.get('standard_error'))} | {delta} | "
                     f"{fmt(m.get('length_controlled_winrate'))} | {m.get('n_total')} | {m.get('n_unparsed')} | "
                     f"{m.get('avg_length')} | {m.get('annotator')} |")
    if paired:
        lines += ["", f"Δ: the row's win rate minus {first}'s over the instructions both had judged, paired by "
                  "instruction, ± its standard error; within about two standard errors of 0 it shows no change."]
    path = eval_root / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _paired_vs(eval_root: Path, first: str, label: str) -> dict | None:
    """`label`'s paired difference from `first` (difference, standard_error, n, p_value), or None when the two
    cannot be paired (annotations missing, another judge, no shared instructions)."""
    from selfalign.errors import DataError
    from selfalign.evaluation.compare import paired_difference

    try:
        result = paired_difference(eval_root / first, eval_root / label)
    except (DataError, OSError, ValueError):  # a table column must never fail the hours-long run that writes it
        return None
    return {k: result[k] for k in ("difference", "standard_error", "n", "p_value")}


def read_summary(eval_root: str | Path) -> dict:
    """A run's evaluation rows (label -> metrics) from eval_root/summary.json; {} when there are none yet. A damaged
    file (a hand edit) is a one-line SelfalignError: the next evaluation stage writes it again."""
    from selfalign.errors import SelfalignError

    p = Path(eval_root) / "summary.json"
    if not p.exists():
        return {}
    try:
        rows = json.loads(p.read_text())
        if not isinstance(rows, dict) or not all(isinstance(m, dict) for m in rows.values()):
            raise ValueError("not a JSON object of rows, each an object")
    except (ValueError, UnicodeDecodeError) as e:
        raise SelfalignError(f"{p}: not a readable evaluation summary ({e}); it was changed by hand: remove it, and "
                             f"the run's next evaluation stage writes it again") from None
    return rows
