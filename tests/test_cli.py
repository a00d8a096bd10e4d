"""The CLI: help for every command, one-line errors, generate end to end on the embedded model."""

from __future__ import annotations

import json

import pytest

from selfalign.cli import build_parser, main


def test_every_command_has_help(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"generate", "models", "serve"} <= set(sub.choices)
    for name, p in sub.choices.items():
        assert p.description or p.format_help()
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--prompts" in out and "--backend" in out


def test_generate_writes_records(tmp_path, prompts_file, capsys):
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--prompts", str(prompts_file), "--out", str(out), "--max-new-tokens", "8",
                 "--temperature", "0", "--quiet", "--limit", "2", "--max-cache-gb", "0.004"]) == 0
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 2 and all(r["model"] == "smollm2-135m" and r["response"] for r in rows)
    # two ~80-position sequences of SmolLM2 cache (46 KB a position) exceed 0.004 GiB: one at a time, and said so
    err = capsys.readouterr().err
    assert "2 slots would need" in err
    assert "Loading weights" not in err  # --quiet silences transformers' bars too


def test_generate_stop_strings_and_the_greedy_samples_note(tmp_path, prompts_file, capsys):
    plain, cut = tmp_path / "plain.jsonl", tmp_path / "cut.jsonl"
    common = ["generate", "--prompts", str(prompts_file), "--max-new-tokens", "24", "--temperature", "0", "--quiet",
              "--limit", "1"]
    assert main(common + ["--out", str(plain)]) == 0
    text = json.loads(plain.read_text())["response"]
    stop = text.split()[3]  # a word inside the greedy answer
    assert main(common + ["--out", str(cut), "--stop", stop, "--n", "2"]) == 0
    rows = [json.loads(line) for line in cut.read_text().splitlines()]
    assert [r["response"] for r in rows] == [text[:text.index(stop)]] * 2
    assert rows[0]["sampling"]["stop"] == [stop] and rows[0]["meta"]["stop_string"] is True
    assert "the 2 samples per prompt will be identical" in capsys.readouterr().err


def test_bad_input_prints_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "fine"}\n{"id": "b", "promt": "typo"}\n')
    assert main(["generate", "--prompts", str(bad), "--out", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"selfalign: error: {bad}:2: field 'prompt': missing required field " \
                  "(give 'prompt' or 'instruction' text, or a 'messages' list)"
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("args,message", [
    (["--limit", "0"], "limit must be at least 1, not 0"),
    (["--n", "0"], "n (samples per prompt) must be >= 1, not 0"),
    (["--temperature", "-1"], "temperature must be a finite number >= 0 (0 is greedy), not -1.0"),
    (["--temperature", "nan"], "temperature must be a finite number >= 0 (0 is greedy), not nan"),
    (["--temperature", "inf"], "temperature must be a finite number >= 0 (0 is greedy), not inf"),
    (["--batch-size", "0"], "--batch-size must be at least 1, not 0"),
    (["--max-cache-gb", "-1"], "--max-cache-gb must be above 0, not -1.0"),
    (["--processes", "2", "--device", "cpu:0"], "--device: with processes > 1 each process takes one GPU itself"),
    (["--processes", "4096"], "--processes: 4096 processes, but this "),  # too few GPUs, or CPU cores
])
def test_out_of_range_generate_settings_are_refused(args, message, tmp_path, prompts_file, capsys):
    out = tmp_path / "o.jsonl"
    assert main(["generate", "--prompts", str(prompts_file), "--out", str(out), "--quiet", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not out.exists()


def test_generate_refuses_an_out_file_that_holds_no_answers_before_loading_a_model(tmp_path, prompts_file, capsys,
                                                                                   monkeypatch):
    import selfalign.cli

    monkeypatch.setattr(selfalign.cli, "generator_from_args", lambda args: pytest.fail("the model was loaded"))
    before = prompts_file.read_text()
    assert main(["generate", "--prompts", str(prompts_file), "--out", str(prompts_file), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "prompts.jsonl:1: not a file of records this command writes" in err and "\n" not in err
    assert prompts_file.read_text() == before  # the prompts are not truncated or appended to
    assert main(["generate", "--prompts", str(prompts_file), "--out", str(tmp_path), "--quiet"]) == 2
    assert "is a folder; give a file path" in capsys.readouterr().err


def test_serve_refuses_a_port_out_of_range_in_one_short_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--port", "70000"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("argument --port: 70000 is not a port number (0-65535)") and len(err) < 200


def test_mtbench_refuses_a_judge_that_cannot_grade_before_answering(tmp_path, capsys):
    assert main(["eval", "mtbench", "--judge", "length", "--limit", "8", "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err.strip()
    assert "judge 'length' does not grade single answers" in err and "\n" not in err
    assert not (tmp_path / "ev" / "model_answer.jsonl").exists()


@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=-1", "learning_rate and max_grad_norm must be finite and > 0"),
    ("train.learning_rate=inf", "learning_rate and max_grad_norm must be finite and > 0"),
    ("train.weight_decay=nan", "weight_decay finite and >= 0, not 2e-05, 1.0 and nan"),
    ("train.max_prompt_length=0", "max_prompt_length must be >= 1"),  # 0 or less cut into the response
])
def test_a_bad_training_setting_is_a_config_error(tmp_path, capsys, override, message):
    assert main(["run", "sft", "configs/sft-smoke.yaml", "--run-dir", str(tmp_path / "r"), "--set", override]) == 2
    assert message in capsys.readouterr().err


def test_models_list_and_missing_model(capsys):
    assert main(["models", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert any(r["name"] == "smollm2-135m" and r["installed"] for r in rows)
    assert main(["models", "path", "nope-model"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["models", "list", "extra"]) == 2
    assert "models list takes no names (got extra)" in capsys.readouterr().err


def test_models_convert_of_a_model_folder_says_there_is_nothing_to_convert(capsys, embedded_model_dir):
    assert main(["models", "convert", str(embedded_model_dir)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(embedded_model_dir)
    assert "is already a safetensors model folder: nothing to convert" in captured.err
