"""`selfalign eval agreement` on real annotated pairs, with the length judge (cheap) and scripted judges."""

from __future__ import annotations

import json

import pytest

from selfalign.cli import main
from selfalign.errors import DataError
from selfalign.evaluation.agreement import LabeledPair, agreement_metrics, load_labeled_pairs, run_agreement
from selfalign.judges.base import PairwiseItem, PairwiseJudge, PairwiseVerdict
from selfalign.judges.prompts import combine_orders


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFALIGN_CACHE", str(tmp_path / "cache"))


def run_json(capsys, *argv) -> dict:
    assert main(["eval", "agreement", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_json_on_balanced_prefix_with_length_judge(capsys, data_dir, tmp_path):
    pairs = str(data_dir / "alpaca_eval" / "balanced_pairs_dev.json")
    out = run_json(capsys, "--judge", "length", "--pairs", pairs, "--limit", "20", "--out", str(tmp_path / "v.jsonl"))
    assert out["n"] == 20 and out["n_ties_excluded"] == 0 and out["ties"] == "excluded"
    assert out["agreement"] == 0.5  # the balanced file defeats the length rule by construction
    assert out["length_rule"]["agreement"] == out["agreement"] and 0 < out["standard_error"] < 0.2
    assert out["position_consistency"] == 1.0 and out["prefers_longer"] == 1.0
    assert out["n_judged"] == 20 and out["n_cached"] == 0 and out["seconds_per_judgement"] is not None
    rows = [json.loads(line) for line in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and rows[0]["generator_1"] == "gpt4_1106_preview" and "p_a" in rows[0]
    # each pair's record number, and the line it starts on in the (one key a line) file
    assert [r["record"] for r in rows] == list(range(1, 21))
    assert open(pairs).read().splitlines()[rows[1]["line"] - 1].strip() == "{"
    again = run_json(capsys, "--judge", "length", "--pairs", pairs, "--limit", "20")
    assert again["n_cached"] == 20 and again["n_judged"] == 0 and again["agreement"] == 0.5
    # --out is rewritten whole: its own earlier output may be, any other file is refused untouched
    run_json(capsys, "--judge", "length", "--pairs", pairs, "--limit", "3", "--out", str(tmp_path / "v.jsonl"))
    assert len((tmp_path / "v.jsonl").read_text().splitlines()) == 3
    annotations = tmp_path / "annotations.json"
    annotations.write_text((data_dir / "alpaca_eval" / "balanced_pairs_dev.json").read_text()[:5000])
    before = annotations.read_text()
    assert main(["eval", "agreement", "--judge", "length", "--pairs", pairs, "--limit", "3", "--out",
                 str(annotations)]) == 2
    assert f"--out {annotations}: holds something other than this command's verdicts" in capsys.readouterr().err
    assert annotations.read_text() == before


def test_raw_annotations_flatter_the_length_rule(capsys, data_dir):
    out = run_json(capsys, "--judge", "length", "--pairs", str(data_dir / "alpaca_eval" / "annotations" / "claude-2.json"),
                   "--limit", "100", "--no-cache")
    assert out["agreement"] > 0.8 and out["n_judged"] == 100


def test_human_label_format_offset_and_text_output(capsys, data_dir):
    llmbar = str(data_dir / "judge_sets" / "llmbar_dev.jsonl")
    assert main(["eval", "agreement", "--judge", "length", "--pairs", llmbar, "--limit", "10", "--offset", "5"]) == 0
    text = capsys.readouterr().out
    assert "agreement" in text and "length rule" in text and "n = 10" in text and "[5:15]" in text
    pairs = load_labeled_pairs(llmbar, limit=3, offset=5)
    assert [p.line for p in pairs] == [6, 7, 8] and all(p.gold in (1.0, 2.0) for p in pairs)


def test_ties_excluded_and_string_preferences(tmp_path):
    f = tmp_path / "p.json"
    rows = [{"instruction": "q", "output_1": "long answer", "output_2": "short", "preference": "1.2"},
            {"instruction": "q", "output_1": "a", "output_2": "bb", "preference": 1.5},
            {"instruction": "q", "output_1": "a", "output_2": "bb", "preference": 1.9}]
    f.write_text(json.dumps(rows))
    pairs = load_labeled_pairs(f)
    assert [p.gold for p in pairs] == [1.2, 1.5, 1.9]
    from selfalign.judges import make_judge

    metrics, _ = run_agreement(make_judge("length"), pairs, progress=False)
    assert metrics["n"] == 2 and metrics["n_ties_excluded"] == 1 and metrics["agreement"] == 1.0


@pytest.mark.parametrize("row,message", [({"instruction": "q", "output_1": "a", "output_2": "b"}, "preference"),
                                         ({"instruction": "q", "output_1": "a", "output_2": "b", "preference": 3},
                                          "in \\[1, 2\\]"),
                                         ({"instruction": "q", "output_1": "a", "output_2": "b", "label": 1.5},
                                          "1 or 2"),
                                         ({"instruction": "q", "output_1": 5, "output_2": "b", "label": 1}, "output_1")])
def test_bad_rows_are_located(tmp_path, row, message):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"instruction": "ok", "output_1": "a", "output_2": "b", "label": 2}) + "\n" +
                 json.dumps(row) + "\n")
    with pytest.raises(DataError, match=message) as e:
        load_labeled_pairs(f)
    assert f"{f}:2:" in str(e.value)


def test_cli_error_is_one_line(capsys, tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"instruction": "q", "output_1": "a", "output_2": "b", "preference": "x"}\n')
    assert main(["eval", "agreement", "--judge", "length", "--pairs", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("selfalign: error:") and "\n" not in err and ":1:" in err
    assert main(["eval", "agreement", "--judge", "nope", "--pairs", str(f)]) == 2


def test_a_judge_option_without_a_value_is_said_with_its_flag(capsys, data_dir):
    pairs = str(data_dir / "alpaca_eval" / "balanced_pairs_dev.json")
    for flag in ("--judge-option", "--set"):  # --set is its alias: the message names the flag the help shows
        assert main(["eval", "agreement", "--judge", "length", "--pairs", pairs, flag, "novalue"]) == 2
        assert capsys.readouterr().err.strip() == ("selfalign: error: --judge-option novalue: expected key=value "
                                                   "(e.g. --judge-option prompt=pair_v2)")


class FirstJudge(PairwiseJudge):
    """Always says the first shown answer is better, in both orders."""

    name = "first"

    def compare(self, items, progress=False):
        out = []
        for _ in items:
            p_a, consistent, parsed = combine_orders(1.0, 1.0)
            out.append(PairwiseVerdict(p_a=p_a, consistent=consistent, parsed=parsed))
        return out


def test_position_biased_judge_scores_half_and_inconsistent():
    pairs = [LabeledPair(PairwiseItem([{"role": "user", "content": "q"}], "a", "bb"), g, i)
             for i, g in enumerate([1.0, 2.0, 1.1, 1.8])]
    metrics, verdicts = run_agreement(FirstJudge(), pairs, progress=False)
    assert all(v.p_a == 0.5 and v.consistent is False for v in verdicts)
    assert metrics["agreement"] == 0.5 and metrics["position_consistency"] == 0.0
    assert metrics["n_judge_ties"] == 4 and metrics["prefers_longer"] is None


def test_metrics_soft_agreement_and_standard_error():
    item = PairwiseItem([{"role": "user", "content": "q"}], "a", "b")
    pairs = [LabeledPair(item, 1.0, 1), LabeledPair(item, 2.0, 2), LabeledPair(item, 2.0, 3), LabeledPair(item, 1.0, 4)]
    verdicts = [PairwiseVerdict(0.9, True), PairwiseVerdict(0.2, True), PairwiseVerdict(0.6, False),
                PairwiseVerdict(0.5, None, parsed=False)]
    m = agreement_metrics(pairs, verdicts)
    assert m["agreement"] == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    assert m["soft_agreement"] == pytest.approx((0.9 + 0.8 + 0.4 + 0.5) / 4)
    assert m["position_consistency"] == pytest.approx(2 / 3) and m["n_consistency"] == 3
    assert m["n_unparsed"] == 1 and m["gold_first_rate"] == 0.5
    assert m["standard_error"] == pytest.approx((sum((x - 0.625) ** 2 for x in (1, 1, 0, 0.5)) / 3 / 4) ** 0.5)
