"""Records and their readers: real files load; bad input gives one error naming file, line and field."""

from __future__ import annotations

import json

import pytest

from selfalign.data import PreferencePair, Prompt, Response, read_records, write_jsonl
from selfalign.data.loaders import (load_alpaca_eval_set, load_mt_bench, load_preference_pairs, load_prompts,
                                    load_reference_outputs)
from selfalign.errors import DataError


def write_lines(path, lines):
    path.write_text("".join(l + "\n" for l in lines))
    return path


# ----------------------------------------------------------------------------- real data loads
def test_unlabelled_pool_loads(data_dir):
    prompts = load_prompts(data_dir / "prompts" / "unlabelled_pool.jsonl")
    assert len(prompts) == 10316
    assert prompts[0].messages[-1]["role"] == "user" and prompts[0].text.strip()


def test_preference_pairs_load_and_drop_identical(data_dir):
    path = data_dir / "preferences" / "ultrafeedback_binarized_train_1k.jsonl"
    pairs = load_preference_pairs(path)
    assert len(pairs) == 996  # 4 upstream rows have chosen == rejected
    assert len(load_preference_pairs(path, drop_identical=False)) == 1000
    assert all(isinstance(p, PreferencePair) and p.chosen != p.rejected for p in pairs)
    # the real file's one empty chosen and one empty rejected answer are dropped on request, and counted
    counts: dict = {}
    both = load_preference_pairs(path, limit=2000, drop_empty=("chosen", "rejected"), counts=counts)
    assert counts == {"in_file": 1000, "identical_dropped": 4, "empty_dropped": 2, "used": 994} and len(both) == 994
    assert all(p.chosen.strip() and p.rejected.strip() for p in both)
    assert len(load_preference_pairs(path, drop_identical=False, drop_empty=("chosen",))) == 999


def test_alpaca_eval_annotations_load_as_pairs(data_dir):
    """GPT-4's AlpacaEval annotations are preference pairs: chosen = the preferred output, ties skipped."""
    path = data_dir / "alpaca_eval" / "balanced_pairs_dev.json"
    rows = json.loads(path.read_text())
    pairs = load_preference_pairs(path)
    assert len(pairs) == len(rows) == 736
    for row, pair in zip(rows[:20], pairs[:20]):
        better, worse = ("output_1", "output_2") if row["preference"] < 1.5 else ("output_2", "output_1")
        assert (pair.chosen, pair.rejected) == (row[better], row[worse])
        assert pair.prompt == row["instruction"] and pair.meta["preference"] == row["preference"]
    cot = load_preference_pairs(data_dir / "alpaca_eval" / "cot_gpt4_turbo_fn_annotations_dev.json")
    assert len(cot) == 1608 - 3  # its 3 ties carry no direction


def test_bad_annotation_row_names_file_line_field(tmp_path):
    from selfalign.data.loaders import load_annotated_pairs

    rows = [{"instruction": "a", "output_1": "x", "output_2": "y", "preference": 1.0},
            {"instruction": "b", "output_1": "x", "output_2": "y", "preference": 1.5},
            {"instruction": "c", "output_1": "x", "output_2": "y", "preference": 1.9},
            {"instruction": "d", "output_1": "x", "output_2": "y", "preference": 2.5}]
    path = write_lines(tmp_path / "ann.jsonl", [json.dumps(r) for r in rows[:3]])
    pairs = load_preference_pairs(path)
    assert [p.id for p in pairs] == ["ann:1", "ann:3"] and pairs[1].chosen == "y"
    assert [p.id for p in load_annotated_pairs(path, min_margin=0.45)] == ["ann:1"]
    bad = write_lines(tmp_path / "bad.jsonl", [json.dumps(r) for r in rows])
    with pytest.raises(DataError, match=r"bad.jsonl:4: field 'preference': expected a number in \[1, 2\], got 2.5"):
        load_preference_pairs(bad)


def test_multiturn_pairs_keep_history(data_dir):
    pairs = load_preference_pairs(data_dir / "preferences" / "hh_rlhf_helpful_base_test.jsonl", limit=200)
    multi = [p for p in pairs if len(p.messages) > 1]
    assert multi, "HH-RLHF rows carry earlier turns in 'history'"
    roles = [m["role"] for m in multi[0].messages]
    assert roles[-1] == "user" and "assistant" in roles


def test_mt_bench_and_alpaca_loaders(data_dir):
    qs = load_mt_bench()
    assert len(qs) == 80 and all(len(q.turns) == 2 for q in qs)
    assert sum(q.reference is not None for q in qs) == 30
    assert {q.category for q in qs} >= {"math", "coding", "writing"}
    items = load_alpaca_eval_set()
    assert len(items) == 805 and items[0].meta["dataset"]
    subset = load_alpaca_eval_set(limit=20, seed=3)
    assert len(subset) == 20 and subset == load_alpaca_eval_set(limit=20, seed=3)
    refs = load_reference_outputs()
    assert len(refs) == 805 and refs[items[0].text]["output"]


def test_parquet_and_datasets_sources(tmp_path, data_dir):
    from datasets import Dataset

    rows = [json.loads(l) for l in open(data_dir / "preferences" / "ultrafeedback_binarized_eval_200.jsonl")][:5]
    ds = Dataset.from_list(rows)
    assert [p.id for p in read_records(ds, PreferencePair)] == [r["id"] for r in rows]
    ds.to_parquet(str(tmp_path / "pairs.parquet"))
    pairs = read_records(tmp_path / "pairs.parquet", PreferencePair)
    assert pairs[0].chosen == rows[0]["chosen"]
    import pandas as pd  # a null text cell (NaN in pandas) is a missing field, not "expected a string, got float"

    pd.DataFrame({"id": ["a", "b"], "prompt": ["Hello there", None]}).to_parquet(tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p.parquet:2: field 'prompt': missing required field"):
        read_records(tmp_path / "p.parquet", Prompt)


def test_roundtrip(tmp_path, real_prompts):
    prompts = [Prompt.from_dict(r) for r in real_prompts]
    write_jsonl(tmp_path / "p.jsonl", prompts)
    again = read_records(tmp_path / "p.jsonl", Prompt)
    assert [p.messages for p in again] == [p.messages for p in prompts]
    r = Response(prompt_id="a", messages=prompts[0].messages, response="hi", model="m", sampling={"temperature": 0})
    assert Response.from_dict(r.to_dict()) == r


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("line, field, reason", [
    ('{"id": "a", "prompt": "ok"', None, "malformed JSON: Expecting ',' delimiter (column 27)"),  # at the end
    ('{"id": "a"}', "prompt", "missing required field"),
    ('{"id": "a", "prompt": "   "}', "prompt", "must not be empty"),
    ('{"id": "a", "prompt": 42}', "prompt", "expected a string"),
    ('{"id": "a", "messages": [{"role": "robot", "content": "x"}]}', "messages[0].role", "role must be one of"),
    ('{"id": "a", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
     "messages", "last message must have role 'user'"),
    ('["not", "an", "object"]', None, "expected a JSON object"),
])
def test_bad_prompt_rows_name_file_line_field(tmp_path, line, field, reason):
    path = write_lines(tmp_path / "bad.jsonl", ['{"id": "ok", "prompt": "fine"}', line])
    with pytest.raises(DataError) as e:
        load_prompts(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:2: ")
    assert reason in msg
    if field:
        assert f"field '{field}'" in msg
    assert "\n" not in msg


def test_rows_without_an_id_are_named_by_their_file_and_line(tmp_path):
    # the common prompt/chosen/rejected shape (TRL's, most hub datasets') has no ids; explicit ones are kept
    pairs = write_lines(tmp_path / "mine.jsonl", ['{"prompt": "p", "chosen": "a", "rejected": "b"}', '',
                                                  '{"id": "x", "prompt": "q", "chosen": "c", "rejected": "d"}',
                                                  '{"instruction": "r", "chosen": "e", "rejected": "f"}'])
    assert [p.id for p in load_preference_pairs(pairs, unique_ids=True)] == ["mine:1", "x", "mine:4"]
    prompts = tmp_path / "asks.json"
    prompts.write_text(json.dumps([{"instruction": "one"}, {"prompt": "two"}]))
    assert [(p.id, p.messages[-1]["content"]) for p in load_prompts(prompts)] == [("asks:1", "one"),
                                                                                   ("asks:2", "two")]
    # still one id per prompt: an explicit id equal to another row's line id is refused
    clash = write_lines(tmp_path / "c.jsonl", ['{"prompt": "a"}', '{"id": "c:1", "prompt": "b"}'])
    with pytest.raises(DataError, match=r"c.jsonl:2: field 'id': duplicate id 'c:1' \(first seen on line 1\)"):
        load_prompts(clash)


def test_a_file_in_another_format_is_told_which_formats_are_read(tmp_path):
    csv = write_lines(tmp_path / "prompts.csv", ["id,prompt", "1,hello"])
    with pytest.raises(DataError, match=r"prompts.csv:1: malformed JSON: Expecting value \(column 1\); selfalign "
                                        r"reads JSONL \(.jsonl\), a JSON array \(.json\) or parquet \(.parquet\)$"):
        load_prompts(csv)
    with pytest.raises(DataError, match=r"bad.jsonl:1: malformed JSON: Expecting value \(column 1\)$"):
        load_prompts(write_lines(tmp_path / "bad.jsonl", ["id,prompt"]))


def test_bad_pair_field(tmp_path):
    path = write_lines(tmp_path / "pairs.jsonl", ['{"id": 1, "prompt": "p", "chosen": "a", "rejected": ["b"]}'])
    with pytest.raises(DataError, match=r"pairs.jsonl:1: field 'rejected': expected a string, got list"):
        load_preference_pairs(path)


def test_duplicate_ids_and_missing_file(tmp_path):
    path = write_lines(tmp_path / "dup.jsonl", ['{"id": "x", "prompt": "a"}', '{"id": "x", "prompt": "b"}'])
    with pytest.raises(DataError, match=r"dup.jsonl:2: field 'id': duplicate id 'x' \(first seen on line 1\)"):
        load_prompts(path)
    with pytest.raises(DataError, match="file not found"):
        load_prompts(tmp_path / "nope.jsonl")
    pairs = write_lines(tmp_path / "dup_pairs.jsonl", ['{"id": "y", "prompt": "a", "chosen": "b", "rejected": "c"}',
                                                       '{"id": "y", "prompt": "d", "chosen": "e", "rejected": "f"}'])
    with pytest.raises(DataError, match=r"dup_pairs.jsonl:2: field 'id': duplicate id 'y' \(first seen on line 1\)"):
        load_preference_pairs(pairs, unique_ids=True)
    assert len(load_preference_pairs(pairs)) == 2  # a reward model's training pairs need no unique ids


def test_empty_file_is_an_error(tmp_path):
    path = write_lines(tmp_path / "empty.jsonl", [""])
    with pytest.raises(DataError, match="no records"):
        load_prompts(path)


def test_unreadable_sources_are_one_line_errors(tmp_path, real_prompts):
    """A folder, a bad byte, a file that is not parquet: DataErrors naming the file (and line), not tracebacks."""
    with pytest.raises(DataError, match=rf"^{tmp_path}: not a file \(a folder\?\)$"):
        read_records(tmp_path, Prompt)
    bad = tmp_path / "latin1.jsonl"
    latin1 = '{"id": "x", "prompt": "caf\xe9"}\n'.encode("latin-1")  # the é is byte 26 of its line
    bad.write_bytes((json.dumps(real_prompts[0]) + "\n").encode() + latin1)
    with pytest.raises(DataError, match=rf"^{bad}:2: not UTF-8 text \(byte 26 of the line\)$"):
        read_records(bad, Prompt)
    fake = tmp_path / "broken.parquet"
    fake.write_text("not parquet")
    with pytest.raises(DataError, match=rf"^{fake}: not a readable parquet file \("):
        read_records(fake, Prompt)


def test_annotations_without_a_preference_are_said_as_such(tmp_path, data_dir):
    from selfalign.data.loaders import load_preference_pairs

    rows = json.loads((data_dir / "alpaca_eval" / "balanced_pairs_dev.json").read_text())[:3]
    rows[1].pop("preference")
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(rows, indent=2))  # alpaca_eval's layout: one key per line
    line = path.read_text().splitlines().index("  {", 2) + 1  # where the second record starts, as an editor counts
    assert line > 5
    with pytest.raises(DataError, match=rf"ann.json:{line} \(record 2\): field 'preference': missing: give "
                                        r"'preference' in \[1, 2\]"):
        load_preference_pairs(path)
    # pair ids in a JSON array stay <file stem>:<record> (trained reward models record them), whatever the layout
    rows[1]["preference"] = 2
    for layout in (2, None):
        path.write_text(json.dumps(rows, indent=layout))
        assert [p.id for p in load_preference_pairs(path)] == ["ann:1", "ann:2", "ann:3"]
    path.write_text(json.dumps(rows[:1] + [7]))  # compact: every record is on line 1, so the record is named
    with pytest.raises(DataError, match=r"ann.json:1 \(record 2\): expected an object, got int"):
        load_preference_pairs(path)
    # human pairs with a `label` (LLMBar, MT-Bench) read as pairs too, as `eval agreement` reads them
    llmbar = load_preference_pairs(data_dir / "judge_sets" / "llmbar_dev.jsonl")
    first = json.loads((data_dir / "judge_sets" / "llmbar_dev.jsonl").read_text().splitlines()[0])
    assert llmbar[0].chosen == first[f"output_{first['label']}"] and llmbar[0].meta["label"] == first["label"]


def test_an_mt_bench_question_file_given_as_prompts_points_to_eval_mtbench(data_dir):
    from selfalign.data.loaders import load_prompts

    with pytest.raises(DataError, match=r"question.jsonl:1: field 'id': an MT-Bench question .* `selfalign eval "
                                        r"mtbench`"):
        load_prompts(data_dir / "mt_bench" / "question.jsonl")

