"""`selfalign run`: per-recipe help with every config key, shipped configs by name, --print-config."""

from __future__ import annotations

import dataclasses

import pytest

from selfalign import recipes
from selfalign.cli import main
from selfalign.config import load_config


@pytest.mark.parametrize("recipe", ["sft", "dpo", "orpo", "spa", "srt", "seft"])
def test_each_recipe_has_help_listing_its_pipeline_configs_and_every_key(recipe, capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", recipe, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    module = recipes.get(recipe)
    assert module.__doc__.strip().splitlines()[0] in out  # the pipeline
    assert f"shipped configs (give the name as CONFIG): {recipe}, {recipe}-smoke" in out
    for f in dataclasses.fields(module.Config):
        assert f"\n{f.name}:" in out, f.name


def test_a_shipped_config_runs_by_name_and_print_config_reproduces_it(tmp_path, capsys):
    overrides = ["sampling.max_new_tokens=40", "round_train.beta=0.2"]
    argv = ["run", "spa", "spa-smoke", "--print-config"] + [a for o in overrides for a in ("--set", o)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# selfalign run spa ") and "--set round_train.beta=0.2" in printed.splitlines()[0]
    assert "  max_new_tokens: 40" in printed
    assert "model: smollm2-135m  # π_init, an SFT (instruct) model" in printed  # each key with its field's note
    saved = tmp_path / "mine.yaml"
    saved.write_text(printed)
    expected = load_config(recipes.get("spa").Config, recipes.config_path("spa-smoke"), overrides)
    assert load_config(recipes.get("spa").Config, saved) == expected
    assert not list(tmp_path.glob("*/manifest.json"))  # nothing was run


def test_config_names_and_missing_configs(tmp_path, capsys, monkeypatch):
    assert recipes.config_path("srt-smoke") == recipes.CONFIG_DIR / "srt-smoke.yaml"
    assert recipes.config_path("srt-smoke.yaml") == recipes.CONFIG_DIR / "srt-smoke.yaml"
    local = tmp_path / "srt-smoke.yaml"  # a file of the same name in the working directory wins
    local.write_text("stage1_size: 3\n")
    assert recipes.config_path(str(local)) == local
    assert main(["run", "srt", "no-such-config", "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("selfalign: error: no-such-config: config file not found, and no shipped config has that "
                          "name (shipped: dpo, dpo-smoke,") and "\n" not in err
    assert main(["run", "spa", "dpo-smoke", "--run-dir", str(tmp_path / "r")]) == 2  # another recipe's config
    err = capsys.readouterr().err.strip()
    assert "unknown key 'data'" in err and err.endswith("dpo-smoke.yaml looks like a dpo config (selfalign run dpo ...)")
    assert main(["run", "srt", "srt-smoke"]) == 2
    assert "--run-dir is required" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    # a folder named like a shipped config (a run folder, --run-dir spa-smoke) is not taken for a config file
    (tmp_path / "spa-smoke").mkdir()
    monkeypatch.chdir(tmp_path)
    assert recipes.config_path("spa-smoke") == recipes.CONFIG_DIR / "spa-smoke.yaml"
    assert main(["run", "srt", str(tmp_path / "spa-smoke"), "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("spa-smoke: config file not found, and no shipped config has that name (shipped: dpo, "
                        "dpo-smoke, orpo, orpo-smoke, seft, seft-smoke, sft, sft-smoke, spa, spa-smoke, srt, "
                        "srt-smoke)"), err
