"""`selfalign eval compare` and the paired column of a run's evaluation table, on real GPT-4 annotations."""

from __future__ import annotations

import json
import math

import pytest

from selfalign.cli import main
from selfalign.errors import DataError
from selfalign.evaluation.compare import describe, paired_difference
from selfalign.evaluation.lc import read_annotations, winrate_metrics
from selfalign.evaluation.stage import write_summary


@pytest.fixture
def annotations(data_dir):
    return data_dir / "alpaca_eval" / "annotations"


def test_the_paired_difference_of_two_real_models_is_their_win_rate_difference_with_a_tighter_error(annotations):
    a, b = annotations / "alpaca-7b.json", annotations / "gemma-7b-it.json"
    result = paired_difference(a, b)
    wa = winrate_metrics(read_annotations(a)["preference"])
    wb = winrate_metrics(read_annotations(b)["preference"])
    assert result["n"] == wa["n_total"] == wb["n_total"] == 805  # both judged every instruction
    assert result["difference"] == pytest.approx(wb["win_rate"] - wa["win_rate"])
    assert result["win_rate_a"] == pytest.approx(wa["win_rate"])
    assert result["win_rate_b"] == pytest.approx(wb["win_rate"])
    # pairing removes the shared draw of instructions: tighter than the two rows' errors combined
    assert result["standard_error"] < math.hypot(wa["standard_error"], wb["standard_error"])
    assert result["b_better"] + result["a_better"] + result["same"] == 805 and result["b_better"] > result["a_better"]
    lo, hi = result["ci95"]
    assert lo > 0 and result["p_value"] < 1e-3  # gemma-7b-it is clearly ahead of alpaca-7b, as on the leaderboard
    assert result["a"]["judge"] == result["b"]["judge"] == "weighted_alpaca_eval_gpt4_turbo"
    # the other way round is the same difference with its sign flipped
    assert paired_difference(b, a)["difference"] == pytest.approx(-result["difference"])


def test_compare_cli_prints_the_difference_and_json(annotations, capsys):
    a, b = str(annotations / "alpaca-7b.json"), str(annotations / "gemma-7b-it.json")
    assert main(["eval", "compare", a, b]) == 0
    out = capsys.readouterr().out
    assert out.startswith("gemma-7b-it (B) vs alpaca-7b (A): 805 instructions judged for both")
    assert "difference B - A            +" in out and "paired by instruction" in out
    assert main(["eval", "compare", a, b, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 805


def test_unpairable_evaluations_are_refused_with_the_reason(annotations, tmp_path):
    rows_a = json.loads((annotations / "alpaca-7b.json").read_text())[:30]
    rows_b = json.loads((annotations / "claude-2.json").read_text())[:30]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(rows_a, indent=1))
    b.write_text(json.dumps([dict(r, annotator="another_judge") for r in rows_b], indent=1))
    with pytest.raises(DataError, match=r"b.json: judged with judge 'another_judge', but .*a.json with "
                                        r"'weighted_alpaca_eval_gpt4_turbo': a paired difference needs the same judge"):
        paired_difference(a, b)
    b.write_text(json.dumps(json.loads((annotations / "claude-2.json").read_text())[30:60], indent=1))
    with pytest.raises(DataError, match=r"only 0 judged instruction\(s\) in common"):
        paired_difference(a, b)
    b.write_text(json.dumps(rows_b + [dict(rows_b[0], preference=2.0 if rows_b[0]["preference"] < 1.5 else 1.0)],
                            indent=1))
    with pytest.raises(DataError, match=r"b.json:\d+ \(record 31\): field 'instruction': instruction judged twice, "
                                        r"with different verdicts"):
        paired_difference(a, b)
    # a repeated identical verdict (alpaca_eval's vicuna-*-v1.5 annotations hold every row twice) counts once
    b.write_text(json.dumps(rows_b + rows_b[:1], indent=1))
    assert paired_difference(a, b)["n"] == 30
    with pytest.raises(DataError, match="no annotations.json here"):
        paired_difference(tmp_path, a)
    # every difference the same: no spread, so no z or p-value (JSON has no Infinity)
    b.write_text(json.dumps([dict(r, output_2="x", preference=2.0) for r in rows_a], indent=1))
    a.write_text(json.dumps([dict(r, preference=1.0) for r in rows_a], indent=1))
    same = paired_difference(a, b)
    assert same["difference"] == 100.0 and same["standard_error"] == 0.0 and same["z"] is None
    assert "no test" in describe(same)
    json.loads(json.dumps(same, allow_nan=False))
    a.write_text(json.dumps(rows_a, indent=1))
    b.write_text(json.dumps(rows_b, indent=1))
    # an unjudged instruction (no preference) is left out of both sides and counted
    b.write_text(json.dumps([dict(r, preference=None) if i == 3 else r for i, r in enumerate(rows_b)], indent=1))
    result = paired_difference(a, b)
    assert result["n"] == 29 and result["only_a"] == 1 and result["only_b"] == 0
    # no verdict at all on one side: that side is named, not the instructions (which are the same)
    b.write_text(json.dumps([dict(r, preference=None) for r in rows_b], indent=1))
    with pytest.raises(DataError, match=r"b.json: only 0 instruction\(s\) with a verdict \(a row whose preference "
                                        r"is null has none\)"):
        paired_difference(a, b)
    # the interval stays inside the difference's range, +-100, on a handful of instructions
    few = [dict(r, preference=p) for r, p in zip(rows_a[:4], (1.0, 1.0, 1.0, 2.0))]
    a.write_text(json.dumps(few, indent=1))
    b.write_text(json.dumps([dict(r, output_2="x", preference=2.0) for r in few], indent=1))
    clipped = paired_difference(a, b)
    assert clipped["difference"] == 75.0 and clipped["ci95"][1] == 100.0 and clipped["ci95"][0] < 75.0
    assert "the same evaluation" not in describe(clipped)
    assert "A and B are the same evaluation: the difference is 0 by construction" in describe(paired_difference(a, a))


def test_a_runs_table_shows_each_rows_paired_difference_from_the_first(annotations, tmp_path):
    eval_root = tmp_path / "eval"
    rows = {}
    for label, model in (("initial", "alpaca-7b"), ("round1", "gemma-7b-it"), ("round2", "claude-2")):
        (eval_root / label).mkdir(parents=True)
        records = json.loads((annotations / f"{model}.json").read_text())[:40]
        (eval_root / label / "annotations.json").write_text(json.dumps(records))
        rows[label] = {**winrate_metrics(read_annotations(eval_root / label / "annotations.json")["preference"]),
                       "annotator": "gpt4"}
    (eval_root / "round3").mkdir()  # evaluated with no annotations file: no pairing, said as n/a
    rows["round3"] = dict(rows["round2"])
    write_summary(eval_root, rows, "test run")
    table = (eval_root / "summary.md").read_text()
    expected = paired_difference(eval_root / "initial", eval_root / "round2")
    assert "| Δ vs initial (paired) |" in table
    assert f"| round2 | {rows['round2']['win_rate']:.2f} | {rows['round2']['standard_error']:.2f} | " \
           f"{expected['difference']:+.2f} ± {expected['standard_error']:.2f} |" in table
    assert f"| initial | {rows['initial']['win_rate']:.2f} | {rows['initial']['standard_error']:.2f} |  |" in table
    assert f"| round3 | {rows['round3']['win_rate']:.2f} | {rows['round3']['standard_error']:.2f} | n/a |" in table
    summary = json.loads((eval_root / "summary.json").read_text())
    assert summary["round2"]["vs_initial"]["difference"] == pytest.approx(expected["difference"])
    assert "vs_initial" not in summary["initial"] and "vs_initial" not in summary["round3"]
