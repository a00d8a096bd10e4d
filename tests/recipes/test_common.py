"""Parts the recipe files share (recipes/common.py): the run's final-model link."""

from __future__ import annotations

import os

import pytest

from selfalign.cli import main
from selfalign.errors import SelfalignError
from selfalign.recipes.common import link_final
from selfalign.runs import Run


def fake_model(folder):
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


def test_a_final_model_that_went_missing_is_named_by_status_and_refused_on_rerun(tmp_path, capsys):
    root = tmp_path / "run"
    run = Run(root, {"a": 1}, recipe="spa")
    model = fake_model(root / "round1" / "final")
    final = link_final(run, model)
    assert os.readlink(final) == os.path.join("round1", "final") and link_final(run, model) == final  # rerun: kept
    del run
    assert main(["status", str(root)]) == 0 and "state: finished\n" in capsys.readouterr().out
    model.rename(root / "round1" / "moved")  # DIR/final now dangles
    assert main(["status", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"state: finished, but its final model {model.resolve()} is missing" in out
    assert "(missing: moved or deleted since)" in out
    run = Run(root, {"a": 1}, recipe="spa")  # the same command again: a one-line error, not FileExistsError
    with pytest.raises(SelfalignError, match=r"final: the final model of this run is missing \(moved or deleted"):
        link_final(run, model)
    # a link left by an earlier finish that points elsewhere (the starting model re-resolved) is renewed
    other = fake_model(root / "round2" / "final")
    assert os.readlink(link_final(run, other)) == os.path.join("round2", "final")
    del run
    # a finished run folder moved elsewhere keeps its relative link: status finds the model through it
    moved = tmp_path / "moved"
    root.rename(moved)
    assert main(["status", str(moved)]) == 0 and "state: finished\n" in capsys.readouterr().out


def test_a_model_outside_the_run_given_as_a_relative_folder_is_linked_absolutely(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (fake_model(tmp_path / "mymodel") / "config.json").write_text("{}")
    run = Run(tmp_path / "run", {"a": 1}, recipe="srt")
    final = link_final(run, "mymodel")  # a skipped SRT stage passes its starting model through
    assert os.readlink(final) == str(tmp_path / "mymodel") and final.resolve() == (tmp_path / "mymodel").resolve()
