"""`selfalign report DIR`: the HTML page's charts and its refusals (whole runs: tests/recipes/test_spa.py and
test_sft_dpo.py)."""

from __future__ import annotations

import json
import math

from selfalign.cli import main
from selfalign.runs import Run
from selfalign.runs.report import interval_chart, line_chart


def test_charts_skip_missing_values_and_draw_nothing_without_data():
    assert line_chart("loss", {"loss": []}) == ""
    assert interval_chart("win rate", [("initial", None, None)]) == ""
    svg = line_chart("loss", {"loss": [(1, 0.7), (2, math.nan), (3, 0.5)]})
    assert svg.startswith("<svg") and svg.count("<polyline") == 1 and "nan" not in svg
    rewards = line_chart("r", {"chosen": [(1, 0.0), (2, -0.1)], "rejected": [(1, 0.0), (2, -0.3)]})
    assert "chosen" in rewards and "rejected" in rewards and 'class="z"' not in rewards  # 0 is the top, not inside
    delta = interval_chart("Δ", [("round1", -1.5, 2.0), ("round2", 3.0, 1.0)], zero=True)
    assert "-1.50" in delta and "+3.00" in delta and 'class="z"' in delta


def test_a_report_of_a_new_run_and_of_no_run(tmp_path, capsys):
    root = tmp_path / "run"
    run = Run(root, {"a": 1, "eval": {"instructions": 8}}, recipe="spa")
    run.stage("data", lambda: {"pairs": 3, "note": "<b>escaped</b>"})
    # started as `python /clone/selfalign/cli.py run ...`: shown as the command to type, as `status` shows it
    run.manifest["command"] = ["/clone/selfalign/cli.py", "run", "spa", "my config.yaml", "--run-dir", "runs/x"]
    run.save()
    del run
    assert main(["report", str(root), "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "command: <code>selfalign run spa &#x27;my config.yaml&#x27; --run-dir runs/x</code>" in page, page
    assert "No evaluation yet" in page and "No training log yet" in page and "&lt;b&gt;escaped&lt;/b&gt;" in page
    assert "<b>escaped</b>" not in page and "state: " in page
    capsys.readouterr()
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"selfalign: error: {tmp_path}: not a run folder (no manifest.json)"


def test_out_is_a_new_file_or_an_earlier_report_and_nothing_else_is_overwritten(tmp_path, capsys):
    root = tmp_path / "run"
    del_run = Run(root, {"a": 1}, recipe="sft")  # no eval section: no win-rate stage to wait for
    del del_run
    manifest = (root / "manifest.json").read_text()
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    for out, why in ((root / "manifest.json", "exists and is not a selfalign report; nothing was changed"),
                     (notes, "exists and is not a selfalign report; nothing was changed"),
                     (tmp_path, "is a folder; give an HTML file path for --out"),
                     (notes / "r.html", f"cannot make its folder: {notes} is a file")):
        assert main(["report", str(root), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"selfalign: error: {out}: {why}") and "\n" not in err, err
    assert (root / "manifest.json").read_text() == manifest and notes.read_text() == "my notes"
    deep = tmp_path / "reports" / "new" / "run.html"  # a missing folder is made
    assert main(["report", str(root), "--out", str(deep)]) == 0
    assert main(["report", str(root), "--out", str(deep)]) == 0  # an earlier report is replaced
    page = deep.read_text()
    assert "This recipe has no win-rate evaluation" in page and not list(deep.parent.glob(".*.tmp"))
    assert f"selfalign eval alpaca --model {root / 'final'} --out {tmp_path / 'run-alpaca'}" in page
    other = tmp_path / "other"
    del_other = Run(other, {"a": 1}, recipe="sft")
    del del_other
    capsys.readouterr()
    assert main(["report", str(other), "--out", str(deep)]) == 0  # another run's report: replaced, and said so
    assert "held the report of another run (selfalign sft run run); replaced" in capsys.readouterr().err
    link = tmp_path / "latest.html"
    link.symlink_to(deep)
    assert main(["report", str(root), "--out", str(link)]) == 0  # the link's target is written, the link stays
    assert link.is_symlink() and "<title>selfalign sft run run</title>" in deep.read_text()


def test_a_damaged_evaluation_summary_costs_only_its_section(tmp_path, capsys):
    root = tmp_path / "run"
    run = Run(root, {"eval": {"instructions": 8}}, recipe="spa")
    run.stage("data", lambda: {"pairs": 3})
    del run
    (root / "eval").mkdir()
    for damaged in ('{"initial": {"win_rate": 4', '{"initial": 5}'):  # cut short, or rows that are not objects
        (root / "eval" / "summary.json").write_text(damaged)
        assert main(["report", str(root)]) == 0
        page = (root / "report.html").read_text()
        assert "summary.json: not a readable evaluation summary" in page and "<h2>Stages</h2>" in page
        capsys.readouterr()
        assert main(["status", str(root), "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        assert status["evaluation"] == {} and "not a readable evaluation summary" in status["evaluation_error"]
