"""The Bradley-Terry reward-model judge: trained on real preference pairs (tiny settings), saved as safetensors,
reloaded; the judge's scores equal the training-time computation; each answer scored once, order-invariant."""

from __future__ import annotations

import json

import pytest

from selfalign.judges import make_judge
from selfalign.judges.base import PairwiseItem
from selfalign.judges.reward import (CONFIG_FILE, WEIGHTS_FILE, RewardJudge, _bottom_states, _norm_text, _Top,
                                     encode_for_reward, evaluation_instructions, train_reward_model)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, embedded_model_dir):
    out = tmp_path_factory.mktemp("rm")
    cfg = train_reward_model(out, n_pairs=6, n_eval=4, max_length=96, max_prompt_tokens=24, train_layers=1,
                             epochs=2, batch_size=4, progress=False)
    return out, cfg


def test_training_saves_safetensors_and_documents_its_data(trained, data_dir):
    out, cfg = trained
    assert (out / WEIGHTS_FILE).exists() and (out / CONFIG_FILE).exists()
    saved = json.loads((out / CONFIG_FILE).read_text())
    assert saved["train_data"]["n_pairs"] == 6 and len(saved["train_data"]["ids"]) == 6
    assert saved["train_data"]["file"].endswith("ultrafeedback_binarized_train_1k.jsonl")
    assert saved["eval_data"]["n_pairs"] == 4 and saved["base_model"] == "smollm2-135m"
    assert len(saved["history"]) == 2 and 0.0 <= saved["history"][-1]["heldout_accuracy"] <= 1.0
    assert all(k in saved["base_model_sha256"] for k in ["model.safetensors"])
    # never trained on evaluation prompts
    evaluation = evaluation_instructions()
    assert len(evaluation) > 800
    train = {json.loads(line)["id"]: json.loads(line)["prompt"]
             for line in (data_dir / "preferences" / "ultrafeedback_binarized_train_1k.jsonl").read_text().splitlines()}
    assert not any(_norm_text(train[i]) in evaluation for i in saved["train_data"]["ids"])


def test_training_on_gpt4_annotations_needs_the_guard_lifted(tmp_path, data_dir, embedded_model_dir):
    """AlpacaEval annotations are all evaluation prompts: by default none is trained on (an error, not a silent
    empty model); with allow_eval_instructions the judge trains on them and the config says so."""
    from selfalign.errors import SelfalignError

    rows = json.loads((data_dir / "alpaca_eval" / "balanced_pairs_dev.json").read_text())
    train, held = tmp_path / "train.json", tmp_path / "held.json"
    train.write_text(json.dumps(rows[:6]))
    held.write_text(json.dumps(rows[-4:]))
    assert not {r["instruction"] for r in rows[:6]} & {r["instruction"] for r in rows[-4:]}
    with pytest.raises(SelfalignError, match="fewer than 2 usable preference pairs"):
        train_reward_model(tmp_path / "rm", train_data=train, eval_data=held, n_pairs=0, progress=False)
    cfg = train_reward_model(tmp_path / "rm", train_data=train, eval_data=held, n_pairs=0, n_eval=None,
                             max_length=96, max_prompt_tokens=24, train_layers=1, epochs=1, batch_size=4,
                             allow_eval_instructions=True, progress=False)
    assert cfg["allow_eval_instructions"] is True
    assert cfg["train_data"]["n_pairs"] == 6 and cfg["eval_data"]["n_pairs"] == 4
    assert sorted(cfg["train_data"]["ids"]) == [f"train:{i}" for i in range(1, 7)]


def test_judge_scores_equal_training_computation(trained):
    out, cfg = trained
    judge = make_judge("reward", model=str(out))
    assert isinstance(judge, RewardJudge)
    messages = [{"role": "user", "content": "How do I boil an egg?"}]
    answers = ["Put it in boiling water for 8 minutes, then cool it in cold water.", "Eggs are birds."]
    scores = judge.score([messages, messages], answers)
    backbone, head, tok = judge._load()
    seqs = [encode_for_reward(tok, messages, a, cfg["max_length"], cfg["max_prompt_tokens"]) for a in answers]
    assert all(len(s) <= cfg["max_length"] for s in seqs)
    k = cfg["train_layers"]
    states = _bottom_states(backbone, seqs, len(backbone.layers) - k, tok.pad_token_id)
    import torch

    with torch.no_grad():
        train_path = _Top(backbone, k, head)(states)
    assert scores == pytest.approx([float(x) for x in train_path], abs=1e-4)


def test_each_answer_scored_once_and_order_invariant(trained):
    out, _ = trained
    judge = RewardJudge(out)
    m = [{"role": "user", "content": "Name a primary colour."}]
    items = [PairwiseItem(m, "Red.", "Blue is one."), PairwiseItem(m, "Blue is one.", "Red.")]
    v = judge.compare(items)
    assert judge.scored == 2  # two distinct answers, not four
    assert v[0].p_a == pytest.approx(1 - v[1].p_a) and v[0].consistent is True
    assert v[0].details["reward_a"] == v[1].details["reward_b"]
    assert set(judge.config()) >= {"weights_sha256", "base", "max_length"}


def test_long_inputs_are_cut_to_max_length(trained, tmp_path):
    _, cfg = trained
    from selfalign.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    ids = encode_for_reward(tok, [{"role": "user", "content": "word " * 500}], "answer " * 500, 96, 24)
    assert len(ids) <= 96
    assert tok.decode(ids).count("<|im_start|>assistant") == 1  # the turn markers survive the cut
    # and so do some of the answer and the end of the turn, whose hidden state the reward is read from
    answer = tok.decode(ids).split("<|im_start|>assistant")[1]
    assert answer.count("answer") >= 8 and answer.rstrip().endswith("<|im_end|>")
    # a max_length that leaves no room for the answer after a full prompt is refused before training
    from selfalign.errors import SelfalignError
    from selfalign.judges.reward import min_reward_length

    need = min_reward_length(tok, 24)
    assert 60 < need <= 96
    with pytest.raises(SelfalignError, match=rf"--max-length {need - 1} leaves no room for the answer: a prompt takes "
                                             rf"up to 24 tokens plus smollm2-135m's chat template, so give at least "
                                             rf"{need}"):
        train_reward_model(tmp_path / "rm", n_pairs=4, n_eval=0, max_length=need - 1, max_prompt_tokens=24,
                           progress=False)
    assert not (tmp_path / "rm").exists()


def test_crossfit_judge_routes_each_instruction_to_its_fold_model(trained, tmp_path, data_dir):
    """fold1's model is fold0's with the head negated, so its verdicts are mirrored: each real AlpacaEval item must get
    exactly the verdict of the model its instruction's fold names."""
    import shutil

    from safetensors.torch import load_file, save_file

    from selfalign.errors import SelfalignError
    from selfalign.judges.reward import CrossFitRewardJudge, instruction_fold

    out, _ = trained
    shutil.copytree(out, tmp_path / "fold0")
    shutil.copytree(out, tmp_path / "fold1")
    weights = load_file(str(tmp_path / "fold1" / WEIGHTS_FILE))
    weights = {k: (-v if k.startswith("head.") else v) for k, v in weights.items()}
    save_file(weights, str(tmp_path / "fold1" / WEIGHTS_FILE))

    rows = json.loads((data_dir / "alpaca_eval" / "balanced_pairs_dev.json").read_text())[:8]
    items = [PairwiseItem([{"role": "user", "content": r["instruction"]}], r["output_1"][:300], r["output_2"][:300])
             for r in rows]
    folds = [instruction_fold(r["instruction"], 2) for r in rows]
    assert set(folds) == {0, 1}
    judge = make_judge("reward-crossfit", models=str(tmp_path))
    assert isinstance(judge, CrossFitRewardJudge)
    plain = RewardJudge(out).compare(items)
    for v, p, fold in zip(judge.compare(items), plain, folds):
        assert v.details["fold"] == fold
        assert v.p_a == pytest.approx(p.p_a if fold == 0 else 1 - p.p_a, abs=1e-6)
    assert len(judge.config()["folds"]) == 2

    shutil.rmtree(tmp_path / "fold1")
    with pytest.raises(SelfalignError, match="expected trained reward models fold0/"):
        make_judge("reward-crossfit", models=str(tmp_path))


def test_an_incomplete_or_damaged_reward_folder_is_a_one_line_error(trained, tmp_path):
    import shutil

    from selfalign.errors import SelfalignError

    out, _ = trained
    broken = tmp_path / "rm"
    shutil.copytree(out, broken)
    (broken / WEIGHTS_FILE).unlink()
    with pytest.raises(SelfalignError, match=f"an incomplete reward model \\({WEIGHTS_FILE} is missing\\)"):
        RewardJudge(broken)
    (broken / WEIGHTS_FILE).write_bytes((out / WEIGHTS_FILE).read_bytes()[:100])  # truncated
    judge = RewardJudge(broken)
    with pytest.raises(SelfalignError, match="not readable safetensors weights"):
        judge.compare([PairwiseItem([{"role": "user", "content": "hi"}], "a", "b")])
    (broken / CONFIG_FILE).write_text("{not json")
    with pytest.raises(SelfalignError, match="not a readable reward-model config"):
        RewardJudge(broken)
    (broken / CONFIG_FILE).write_text(json.dumps({"base_model": "smollm2-135m"}))
    with pytest.raises(SelfalignError, match="its config lacks max_length, max_prompt_tokens, train_layers"):
        RewardJudge(broken)


def test_crossfit_training_holds_out_each_instruction_and_resumes(tmp_path, data_dir, embedded_model_dir):
    """`train_crossfit_reward_models` on a real slice of the balanced pairs: fold k's model never trains on a fold-k
    instruction and is scored on exactly those; the pooled agreement is the held-out accuracies weighted by size;
    the folder is a working `reward-crossfit` judge; a second call retrains nothing."""
    from selfalign.judges.reward import SUMMARY_FILE, instruction_fold, train_crossfit_reward_models

    rows = json.loads((data_dir / "alpaca_eval" / "balanced_pairs_dev.json").read_text())[:12]
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps(rows))
    out = tmp_path / "crossfit"
    summary = train_crossfit_reward_models(out, pairs=pairs, max_length=96, max_prompt_tokens=24, train_layers=1,
                                           epochs=1, batch_size=4, progress=False)
    by_id = {f"pairs:{i + 1}": r["instruction"] for i, r in enumerate(rows)}
    for k in (0, 1):
        cfg = json.loads((out / f"fold{k}" / CONFIG_FILE).read_text())
        assert cfg["crossfit"]["fold"] == k
        assert all(instruction_fold(by_id[i], 2) != k for i in cfg["train_data"]["ids"])
        held = sum(1 for r in rows if instruction_fold(r["instruction"], 2) == k)
        assert cfg["eval_data"]["n_pairs"] == held == summary["folds"][k]["heldout_pairs"]
        assert cfg["train_data"]["n_pairs"] == len(rows) - held
    pooled = sum(r["agreement"] * r["heldout_pairs"] for r in summary["folds"]) / len(rows)
    assert summary["n"] == len(rows) and summary["pooled_agreement"] == pytest.approx(pooled)
    assert json.loads((out / SUMMARY_FILE).read_text())["n"] == len(rows)

    judge = make_judge("reward-crossfit", models=str(out))
    items = [PairwiseItem([{"role": "user", "content": r["instruction"]}], r["output_1"][:200], r["output_2"][:200])
             for r in rows[:4]]
    assert all(0.0 < v.p_a < 1.0 for v in judge.compare(items))

    mtime = (out / "fold0" / WEIGHTS_FILE).stat().st_mtime_ns
    again = train_crossfit_reward_models(out, pairs=pairs, max_length=96, max_prompt_tokens=24, train_layers=1,
                                         epochs=1, batch_size=4, progress=False)
    assert (out / "fold0" / WEIGHTS_FILE).stat().st_mtime_ns == mtime
    assert again["pooled_agreement"] == summary["pooled_agreement"]
    # other settings into the same folder are refused, not answered with the old folds (before any model loads)
    from selfalign.errors import SelfalignError

    with pytest.raises(SelfalignError, match=r"fold0: trained with other settings \(epochs 1, not 2\)"):
        train_crossfit_reward_models(out, pairs=pairs, max_length=96, max_prompt_tokens=24, train_layers=1,
                                     epochs=2, batch_size=4, progress=False)
    with pytest.raises(SelfalignError, match=r"fold0: trained with other settings \(folds 2, not 3\)"):
        train_crossfit_reward_models(out, pairs=pairs, folds=3, max_length=96, max_prompt_tokens=24, train_layers=1,
                                     epochs=1, batch_size=4, progress=False)
    other = tmp_path / "other.json"
    other.write_text(json.dumps(rows[:10]))
    with pytest.raises(SelfalignError, match=r"trained with other settings \(pairs_sha256"):
        train_crossfit_reward_models(out, pairs=other, max_length=96, max_prompt_tokens=24, train_layers=1,
                                     epochs=1, batch_size=4, progress=False)
    assert (out / "fold0" / WEIGHTS_FILE).stat().st_mtime_ns == mtime
    # a leftover fold beyond this command's count is checked by its name too (not missed by counting folders)
    import shutil

    shutil.copytree(out / "fold1", out / "fold2")
    cfg = json.loads((out / "fold2" / CONFIG_FILE).read_text())
    cfg["crossfit"]["folds"] = 3
    (out / "fold2" / CONFIG_FILE).write_text(json.dumps(cfg))
    shutil.rmtree(out / "fold1")
    with pytest.raises(SelfalignError, match=r"fold2: trained with other settings \(folds 3, not 2\)"):
        train_crossfit_reward_models(out, pairs=pairs, max_length=96, max_prompt_tokens=24, train_layers=1,
                                     epochs=1, batch_size=4, progress=False)


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "--epochs must be at least 1, not 0"),
    (["--max-length", "-5"], "--max-length must be at least 16 tokens, not -5"),
    (["--train-layers", "-1"], "--train-layers must be >= 0 (0: the head alone), not -1"),
    (["--n-eval", "-5"], "--n-eval must be -1 (all), 0 (none) or a count, not -5"),
    (["--eval-pairs", "nonexist.jsonl"], "nonexist.jsonl: no such file (--eval-pairs)"),
])
def test_train_reward_refuses_bad_settings_before_loading_the_backbone(args, message, tmp_path, capsys, monkeypatch):
    import selfalign.judges.reward as reward
    from selfalign.cli import main

    monkeypatch.setattr(reward, "_RewardTrainer", lambda *a, **k: pytest.fail("the backbone was loaded"))
    assert main(["judges", "train-reward", "--out", str(tmp_path / "rm"), "--quiet", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "rm").exists()  # nothing saved, so no untrained model replaces a trained one
    a_file = tmp_path / "f"
    a_file.write_text("x")
    assert main(["judges", "train-crossfit", "--out", str(a_file), "--quiet"]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err


def test_training_into_a_trained_folder_says_which_model_it_replaces(trained, monkeypatch, capsys):
    import selfalign.judges.reward as reward
    from selfalign.cli import main
    from selfalign.errors import SelfalignError

    out, cfg = trained

    def stop(*args, **kwargs):
        raise SelfalignError("stopped before training")

    monkeypatch.setattr(reward, "_RewardTrainer", stop)
    assert main(["judges", "train-reward", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"selfalign: note: {out} holds a reward model trained {cfg['created_at']} on 6 pairs of " in err
    assert "; it is replaced when this training finishes" in err
    assert (out / WEIGHTS_FILE).exists()  # the stopped run replaced nothing


def test_pairs_left_out_as_evaluation_instructions_are_explained(tmp_path, data_dir):
    from selfalign.errors import SelfalignError

    rows = json.loads((data_dir / "alpaca_eval" / "balanced_pairs_dev.json").read_text())[:6]
    pairs = tmp_path / "ann.json"
    pairs.write_text(json.dumps(rows))
    with pytest.raises(SelfalignError, match="6 were left out because their prompt is an AlpacaEval / MT-Bench "
                                             "instruction: pass --allow-eval-instructions"):
        train_reward_model(tmp_path / "rm", train_data=pairs, n_eval=0, progress=False)
