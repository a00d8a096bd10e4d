"""AlpacaEval-2.0-style evaluation: answer the instructions, judge each answer against a reference output, report the
win rate, its standard error and the length-controlled win rate (selfalign.evaluation.lc).

Protocol (METHODS.md §6.1): baseline = the GPT-4-Turbo outputs; preference in [1, 2] with 2 = the model's answer
(`output_2`) wins; win rate = mean(preference - 1) x 100 over the instructions with a verdict. A verdict the judge
could not read gets no preference (null in annotations.json) and is dropped from the win rate and n_total, as
alpaca_eval drops it; unlike alpaca_eval, the count is reported (`n_unparsed`, and `n_dropped` from the LC module),
since dropped rows change n_total (ANCHORS.md §2.8). `unparsed_as_tie=True` (CLI `--unparsed-as-tie`, a selfalign
option) counts them as ties (1.5) instead, keeping n_total at the number of instructions.

Files written to `out_dir` (alpaca_eval's own formats, so its tools read them too):
    model_outputs.json   [{instruction, output, generator, dataset}]
    annotations.json     [{instruction, output_1, generator_1, output_2, generator_2, preference, annotator, ...}]
    metrics.json         win_rate, standard_error, length_controlled_winrate, n_total, n_unparsed, ...
plus the resumable working files responses.jsonl and annotations.jsonl (a killed evaluation resumes from them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from selfalign.data.io import write_json
from selfalign.data.loaders import load_alpaca_eval_set, load_reference_outputs
from selfalign.data.records import Prompt
from selfalign.errors import DataError
from selfalign.generation import Generator, SamplingParams, generate_to_file
from selfalign.judges.base import PairwiseItem, PairwiseJudge
from selfalign.judges.cache import judge_id
from selfalign.runs import ResumableJsonl

# AlpacaEval leaves decoding to each model's config; greedy keeps a local evaluation deterministic.
DEFAULT_SAMPLING = SamplingParams(temperature=0.0, max_new_tokens=512)


def answer_instructions(generator: Generator, instructions: Sequence[Prompt], out_dir: str | Path,
                        params: SamplingParams = DEFAULT_SAMPLING, progress: bool = True) -> list[dict]:
    """Answer (resumably) and write model_outputs.json; returns its rows."""
    out_dir = Path(out_dir)
    responses = generate_to_file(generator, instructions, params, out_dir / "responses.jsonl", progress=progress)
    by_id = {r.prompt_id: r for r in responses if r.sample_index == 0}
    # one name for every row, this generator's (answers resumed from an older version may record the model otherwise)
    rows = [{"instruction": p.text, "output": by_id[p.id].response, "generator": generator.model_name,
             "dataset": p.meta.get("dataset", "user")} for p in instructions]
    write_json(out_dir / "model_outputs.json", rows)
    return rows


def annotate(outputs: Sequence[dict], references: dict[str, dict], judge: PairwiseJudge, out_dir: str | Path,
             chunk: int = 8, progress: bool = True, unparsed_as_tie: bool = False) -> list[dict]:
    """Judge every model output against its reference (output_1 = reference, output_2 = model), resumably. An
    unreadable verdict (`parsed` False) gets preference None (dropped, as alpaca_eval does), or 1.5 with
    `unparsed_as_tie`; applied when annotations.json is written, so resumed rows follow the current setting."""
    out_dir = Path(out_dir)
    check_references([o["instruction"] for o in outputs], references)
    # keyed by what was judged and by whom: the judge's id is its name and a hash of its config (its options and
    # model: a reward judge's weights digest, a local or API judge's model name), so a reused out dir with other
    # outputs, another reference or a changed judge re-judges instead of keeping verdicts about something else (rows
    # written before the id was recorded are judged again; the judge cache makes that cheap)
    jid = judge_id(judge)

    def key(r):
        return r["instruction"], r["output_1"], r["output_2"], r.get("annotator_id")

    def key_of(o):
        return o["instruction"], references[o["instruction"]]["output"], o["output"], jid

    with ResumableJsonl(out_dir / "annotations.jsonl", key=key) as sink:
        todo = [o for o in outputs if key_of(o) not in sink.done]
        bar = tqdm(total=len(outputs), initial=len(outputs) - len(todo), desc=f"judge ({judge.name})",
                   unit="pair", disable=not progress)
        for i in range(0, len(todo), chunk):
            part = todo[i:i + chunk]
            items = [PairwiseItem(messages=[{"role": "user", "content": o["instruction"]}],
                                  answer_a=references[o["instruction"]]["output"], answer_b=o["output"])
                     for o in part]
            verdicts = judge.compare(items)
            sink.append({
                "instruction": o["instruction"],
                "output_1": references[o["instruction"]]["output"],
                "generator_1": references[o["instruction"]].get("generator", "reference"),
                "output_2": o["output"],
                "generator_2": o["generator"],
                "dataset": o.get("dataset"),
                "annotator": judge.name,
                "annotator_id": jid,
                # an unreadable verdict has no preference (set below: dropped, or a tie when asked for)
                "preference": v.preference if v.parsed else None,
                "parsed": v.parsed,
                "position_consistent": v.consistent,
            } for o, v in zip(part, verdicts))
            bar.update(len(part))
        bar.close()
        by_key = {key(r): r for r in sink.rows}
    unparsed = 1.5 if unparsed_as_tie else None
    # a verdict is about the texts, so one kept from an earlier run serves under this run's generator name
    rows = [dict(r, generator_2=o["generator"], dataset=o.get("dataset"))
            for r, o in ((by_key[key_of(o)], o) for o in outputs)]
    rows = [dict(r, preference=unparsed) if r.get("parsed") is False else r for r in rows]
    write_json(out_dir / "annotations.json", rows)
    return rows


def check_references(instructions: Sequence[str], references: dict[str, dict], source: str | None = None) -> None:
    """Every instruction has a reference output to be judged against (said before any answer is generated)."""
    missing = [text for text in instructions if text not in references]
    if missing:
        raise DataError(f"no reference output for {len(missing)} instruction(s), e.g. {missing[0][:80]!r}; give "
                        f"--reference with their outputs", path=source, field="instruction")


def metrics_of(annotations_path: str | Path, rows: Sequence[dict]) -> dict:
    from selfalign.evaluation.lc import evaluate_annotations

    m = evaluate_annotations(annotations_path)
    m["n_unparsed"] = sum(1 for r in rows if not r.get("parsed", True))
    consistent = [r["position_consistent"] for r in rows if r.get("position_consistent") is not None]
    m["position_consistency"] = sum(consistent) / len(consistent) if consistent else None
    m["annotator"] = rows[0]["annotator"] if rows else None
    m["annotator_id"] = rows[0].get("annotator_id") if rows else None  # the name + a hash of the judge's config
    return m


def evaluate_alpaca(generator: Generator, judge: PairwiseJudge, out_dir: str | Path,
                    instructions: Sequence[Prompt] | None = None, references: dict[str, dict] | None = None,
                    limit: int | None = None, seed: int = 0, params: SamplingParams = DEFAULT_SAMPLING,
                    progress: bool = True, unparsed_as_tie: bool = False) -> dict:
    """The whole protocol; returns the metrics (also written to out_dir/metrics.json)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    instructions = list(instructions) if instructions is not None else load_alpaca_eval_set(limit=limit, seed=seed)
    references = references if references is not None else load_reference_outputs()
    outputs = answer_instructions(generator, instructions, out_dir, params, progress)
    return _judge_and_score(outputs, references, judge, out_dir, progress, unparsed_as_tie,
                            model=generator.model_name, n_instructions=len(instructions), sampling=params.to_dict())


def _judge_and_score(outputs: Sequence[dict], references: dict[str, dict], judge: PairwiseJudge, out_dir: Path,
                     progress: bool, unparsed_as_tie: bool = False, **extra) -> dict:
    """Annotate the outputs against the references, score them, and write metrics.json (with `extra` keys)."""
    rows = annotate(outputs, references, judge, out_dir, progress=progress, unparsed_as_tie=unparsed_as_tie)
    metrics = metrics_of(out_dir / "annotations.json", rows)
    metrics["unparsed_as"] = "tie" if unparsed_as_tie else "dropped"
    metrics.update(extra)
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def load_model_outputs(path: str | Path) -> list[dict]:
    """alpaca_eval's model_outputs.json (or .jsonl): rows with `instruction` and `output` (+ `generator`, `dataset`);
    or the answers `selfalign generate` wrote (`messages` holding one user turn, `response`, `model`), of which each
    prompt's first sample is taken, as alpaca_eval judges one answer per instruction."""
    from selfalign.data.io import iter_json_rows

    rows = []
    for line, row in iter_json_rows(path):
        if "instruction" not in row and "response" in row and "messages" in row:
            row = _from_generated(row, path, line)
            if row is None:
                continue
        for key in ("instruction", "output"):
            if not isinstance(row.get(key), str):
                raise DataError("missing or not a string", path=str(path), line=line, field=key)
        rows.append({"instruction": row["instruction"], "output": row["output"],
                     "generator": str(row.get("generator") or Path(path).stem),
                     "dataset": row.get("dataset", "user")})
        if rows[-1]["generator"] != rows[0]["generator"]:  # one model per file, as annotations and LC assume
            raise DataError(f"'{rows[-1]['generator']}' after '{rows[0]['generator']}': one model's outputs per "
                            "file", path=str(path), line=line, field="generator")
    if not rows:
        raise DataError("no model outputs", path=str(path))
    return rows


def _from_generated(row: dict, path, line) -> dict | None:
    """A `selfalign generate` answer as a model_outputs row; None for a prompt's second and later samples."""
    if row.get("sample_index", 0) != 0:
        return None
    messages = row["messages"]
    if not (isinstance(messages, list) and len(messages) == 1 and isinstance(messages[0], dict)
            and messages[0].get("role") == "user" and isinstance(messages[0].get("content"), str)):
        raise DataError("an AlpacaEval answer answers one user message (an instruction), not this conversation",
                        path=str(path), line=line, field="messages")
    return {"instruction": messages[0]["content"], "output": row["response"], "generator": row.get("model")}


def evaluate_outputs(outputs: Sequence[dict], judge: PairwiseJudge, out_dir: str | Path,
                     references: dict[str, dict] | None = None, progress: bool = True,
                     unparsed_as_tie: bool = False) -> dict:
    """Judge answers that already exist (alpaca_eval's `--model_outputs` workflow): no model is loaded. Same files
    and metrics as `evaluate_alpaca`; use it to re-judge a run's saved outputs with another judge."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    references = references if references is not None else load_reference_outputs()
    write_json(out_dir / "model_outputs.json", list(outputs))
    return _judge_and_score(outputs, references, judge, out_dir, progress, unparsed_as_tie,
                            model=outputs[0]["generator"] if outputs else None, n_instructions=len(outputs))


def load_metrics(out_dir: str | Path) -> dict:
    return json.loads((Path(out_dir) / "metrics.json").read_text())
