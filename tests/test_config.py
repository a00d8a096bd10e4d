"""Typed YAML configs: sections overlay the recipe's defaults, overrides reach nested keys, bad keys and values are
one-line errors naming the file and the key."""

from __future__ import annotations

import pytest

from selfalign.config import load_config
from selfalign.errors import ConfigError
from selfalign.recipes import spa, srt


def test_a_partial_section_keeps_the_recipes_defaults_for_that_section(tmp_path):
    path = tmp_path / "spa.yaml"
    path.write_text("seed_train: {learning_rate: 1.0e-6}\n")
    cfg = load_config(spa.Config, path, ["round_train.beta=0.2"])
    assert cfg.seed_train.learning_rate == 1e-6
    assert cfg.seed_train.epochs == 3  # SPA's seed DPO default, not DPOTrainConfig's generic 1
    assert cfg.round_train.beta == 0.2
    # SRT's stage defaults (paper: 5 epochs, global batch 32) survive an override of one key
    cfg = load_config(srt.Config, None, ["stage1_train.learning_rate=2e-5"])
    assert (cfg.stage1_train.epochs, cfg.stage1_train.grad_accum, cfg.stage1_train.train_on) == (5, 8, "all")
    assert cfg.stage1_train.learning_rate == 2e-5


def test_unknown_keys_and_bad_values_name_the_file_line_and_key_or_the_override(tmp_path):
    path = tmp_path / "spa.yaml"
    path.write_text("model: smollm2-135m\nseed_train:\n  beta: 0.1\n  learnig_rate: 1.0e-6\n")
    with pytest.raises(ConfigError, match=r"spa.yaml:4: unknown key 'seed_train.learnig_rate'"):
        load_config(spa.Config, path)
    path.write_text("model: smollm2-135m\nzeta_key: 1\nalpha_key: 2\n")  # the first in the file, not by name
    with pytest.raises(ConfigError, match=r"spa.yaml:2: unknown key 'zeta_key'"):
        load_config(spa.Config, path)
    path.write_text("seed_train:\n  learnig_rate: 1.0e-6\nzeta_key: 1\n")  # at any depth
    with pytest.raises(ConfigError, match=r"spa.yaml:2: unknown key 'seed_train.learnig_rate' \(known keys here: "
                                          r"learning_rate, epochs,"):
        load_config(spa.Config, path)
    path.write_text("model: smollm2-135m\nrejected: worst\n")
    with pytest.raises(ConfigError, match=r"spa.yaml:2: rejected: must be one of \['min_max', 'max_chosen'\]"):
        load_config(spa.Config, path)
    with pytest.raises(ConfigError, match=r"^--set seed_train.epochs=two: seed_train.epochs: expected an integer"):
        load_config(spa.Config, None, ["seed_train.epochs=two"])
    path.write_text("model: smollm2-135m\nseed_train: {epochs: 3}\n")  # the file is fine, the override is not
    with pytest.raises(ConfigError, match=r"^--set seed_train.learning_rate=-1: seed_train: learning_rate"):
        load_config(spa.Config, path, ["seed_train.learning_rate=-1"])


def test_a_hash_in_an_override_is_part_of_the_value_not_a_comment():
    from selfalign.config import parse_override

    assert parse_override("critic.system_prompt=Rank answers #1 to #3") == (["critic", "system_prompt"],
                                                                           "Rank answers #1 to #3")
    assert parse_override("x=#1") == (["x"], "#1")  # YAML alone reads a null here
    assert parse_override("x=[a#b, 'c #d']") == (["x"], ["a#b", "c #d"])
    assert parse_override("train.beta=0.1") == (["train", "beta"], 0.1)


def test_annotated_yaml_reads_back_to_the_same_config_with_each_fields_note(tmp_path):
    from selfalign.config import annotated_yaml, field_comments

    for module in (spa, srt):
        text = annotated_yaml(module.Config())
        path = tmp_path / "c.yaml"
        path.write_text(text)
        assert load_config(module.Config, path) == module.Config()
        assert max(len(line) for line in text.splitlines()) <= 120
    notes = field_comments(srt.Config)
    assert notes["stage1_size"] == "paper: 25K Tulu-2 instructions (22K valid after filtering)"
    # a trailing comment continued on the next line stays with its field, not the one below
    assert notes["baseline_refinements"].endswith("with stage1_train's settings and the instruction masked; "
                                                  "evaluated as sft_refinements")
    assert notes["eval"] == ""
    assert field_comments(srt.CriticConfig)["model"].startswith("paper: gpt-4-1106-preview")
    # a comment block above a field is its note when no field above continues into it (set off by a blank line)
    assert "follow-up turn" in field_comments(srt.CritiqueConfig)["score_followup"]
    critique = field_comments(srt.CritiqueConfig)
    assert critique["drop_truncated"] == "a critique cut off at max_new_tokens has an incomplete refinement"
    assert critique["batch_size"].startswith("local backend: sequences decoded together")
    assert field_comments(spa.Config)["lambdas"] == "λ per round (last one repeats)"
    assert field_comments(spa.Config)["seed_train"].startswith("the SPA code's DPO")


def test_an_optional_section_left_null_lists_its_keys_commented_out_and_uncommenting_them_enables_it(tmp_path):
    from selfalign.config import annotated_yaml
    from selfalign.recipes import sft

    text = annotated_yaml(sft.Config())
    assert "  lora: null  # null: full fine-tuning" in text
    assert "  #   r: 16  # adapter rank" in text
    # a user who removes "null" and the "#   " prefixes gets a LoRA config with the listed defaults
    edited = text.replace("  lora: null", "  lora:").replace("  #   ", "    ")
    (tmp_path / "c.yaml").write_text(edited)
    config = load_config(sft.Config, tmp_path / "c.yaml")
    assert config.train.lora is not None and config.train.lora.r == 16 and "q_proj" in config.train.lora.target_modules


@pytest.mark.parametrize("recipe, override, message", [
    ("spa", "eval.instructions=-5", "--set eval.instructions=-5: eval: instructions must be >= 0"),
    ("spa", "eval.max_new_tokens=0", "--set eval.max_new_tokens=0: eval: max_new_tokens must be >= 1, not 0"),
    ("spa", "sampling.top_p=0", "--set sampling.top_p=0: sampling: top_p must be in (0, 1], not 0.0"),
    ("spa", "sampling.batch_size=0", "--set sampling.batch_size=0: sampling: batch_size must be >= 1"),
    ("spa", "lambdas=[]", "--set lambdas=[]: lambdas must list at least one weight"),
    ("spa", "round_sizes=[-1, 0]", "--set round_sizes=[-1, 0]: round_sizes must list at least one round, each of >= 1"),
    ("spa", "seed_limit=-5", "--set seed_limit=-5: seed_limit must be >= 1, not -5"),
    ("spa", "samples_per_prompt=1", "--set samples_per_prompt=1: samples_per_prompt must be >= 2, not 1"),
    ("spa", "self_refinement.window=0", "--set self_refinement.window=0: self_refinement: window must be >= 1"),
    ("spa", "labeler_options=[1]", "--set labeler_options=[1]: labeler_options: expected a mapping, got list"),
    ("spa", "seed_train.device=nope", "--set seed_train.device=nope: seed_train: device must be auto or a torch"),
    ("srt", "critic.retries=-1", "--set critic.retries=-1: critic: retries must be >= 0, not -1"),
    ("srt", "self_critique.temperature=-1", "--set self_critique.temperature=-1: self_critique: temperature must be"),
    ("srt", "stage2_size=0", "--set stage2_size=0: stage2_size must be >= 1, not 0"),
    ("seft", "reviser.limit=-5", "--set reviser.limit=-5: reviser: limit must be >= 1, not -5"),
    ("seft", "round_sizes=[]", "--set round_sizes=[]: round_sizes must list at least one round"),
    ("seft", "external.size=-1", "--set external.size=-1: external: size must be >= 0, not -1"),
    ("dpo", "eval_limit=-1", "--set eval_limit=-1: eval_limit must be >= 0, not -1"),
])
def test_out_of_range_values_fail_when_the_config_loads_not_hours_later(recipe, override, message):
    """Each section checks its own values, so a bad one is refused before any stage runs, naming the --set."""
    from selfalign.recipes import config_path, get

    with pytest.raises(ConfigError) as e:
        load_config(get(recipe).Config, config_path(f"{recipe}-smoke"), [override])
    assert str(e.value).startswith(message), str(e.value)


def test_a_post_init_error_in_the_file_names_the_keys_line(tmp_path):
    path = tmp_path / "spa.yaml"
    path.write_text("model: smollm2-135m\nsampling:\n  temperature: 0.7\n  max_new_tokens: 0\n")
    with pytest.raises(ConfigError, match=r"spa.yaml:4: sampling: max_new_tokens must be >= 1, not 0$"):
        load_config(spa.Config, path)


def test_a_key_given_twice_is_refused_not_silently_replaced(tmp_path):
    path = tmp_path / "spa.yaml"
    path.write_text("sampling: {temperature: 0.7}\nmodel: smollm2-135m\nsampling:\n  top_p: 0.9\n")
    with pytest.raises(ConfigError, match=rf"^{path}:3: key 'sampling' given twice \(first on line 1\)$"):
        load_config(spa.Config, path)
    path.write_text("sampling:\n  top_p: 0.9\n  top_p: 0.8\n")
    with pytest.raises(ConfigError, match=r"spa.yaml:3: key 'sampling.top_p' given twice \(first on line 2\)"):
        load_config(spa.Config, path)
