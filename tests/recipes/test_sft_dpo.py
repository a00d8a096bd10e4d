"""The shipped sft/dpo/orpo smoke configs end to end through the CLI, on the embedded model and real data.

Sizes are shrunk further with --set (fewer pairs and tokens) to keep the test suite fast; every stage still runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfalign.cli import main
from selfalign.models import load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[2]
SHRINK = ["--set", "limit=4", "--set", "train.max_length=128", "--set", "train.max_prompt_length=64",
          "--set", "train.grad_accum=1"]


def check_final(run_dir: Path) -> None:
    final = run_dir / "final"
    model = load_model(str(final))
    tok = load_tokenizer(str(final))
    assert tok.chat_template and model.config.vocab_size == 49152
    assert any(final.glob("*.safetensors"))


@pytest.mark.parametrize("recipe", ["sft", "dpo", "orpo"])
def test_smoke_recipe_end_to_end(recipe, tmp_path, capsys):
    run_dir = tmp_path / recipe
    extra = ["--set", "eval_limit=4"] if recipe != "sft" else []
    argv = ["run", recipe, str(REPO / "configs" / f"{recipe}-smoke.yaml"), "--run-dir", str(run_dir), *SHRINK, *extra]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    check_final(run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    expected = ["data", "train", "eval"] if recipe != "sft" else ["data", "train"]
    assert [s for s in manifest["stages"] if manifest["stages"][s]["status"] == "done"] == expected
    assert "final" in manifest["models"]
    log = [json.loads(line) for line in (run_dir / "train" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    if recipe == "dpo":
        for key in ("loss", "rewards/margins", "rewards/chosen", "rewards/rejected", "rewards/accuracy"):
            assert key in log[0]
        assert summary["eval"]["pairs"] == 4 and 0.0 <= summary["eval"]["rewards/accuracy"] <= 1.0
        assert list((run_dir / "train").glob("ref_logps.*.jsonl"))
    if recipe == "orpo":  # no reference: the held-out terms of the starting model are the baseline
        for key in ("loss", "nll", "log_odds_ratio", "odds_ratio_term", "rewards/accuracy"):
            assert key in log[0]
        assert summary["eval"]["initial"]["pairs"] == summary["eval"]["final"]["pairs"] == 4
        assert summary["eval"]["final"]["nll"] != summary["eval"]["initial"]["nll"]  # the final model is scored
        assert summary["eval"]["accuracy_initial"] == summary["eval"]["initial"]["rewards/accuracy"]
        assert not list((run_dir / "train").glob("ref_logps.*.jsonl"))
    assert not (run_dir / "train" / "checkpoints").exists()  # superseded by final/
    # the HTML report charts the training log: DPO's rewards too
    assert main(["report", str(run_dir)]) == 0
    capsys.readouterr()
    page = (run_dir / "report.html").read_text()
    assert "<h3>train</h3><p class='n'>2 steps; last: loss " in page and "no win-rate evaluation" in page
    assert ("implicit rewards" in page) == (recipe == "dpo")
    assert ("log odds ratio" in page) == (recipe == "orpo")
    # the same command again resumes a finished run: nothing is redone
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["train"] == summary["train"]
