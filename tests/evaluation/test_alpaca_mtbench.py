"""AlpacaEval-style and MT-Bench-style pipelines on the embedded model and real data, with a counting judge."""

from __future__ import annotations

import json

import pytest

from selfalign.data.loaders import load_alpaca_eval_set, load_mt_bench
from selfalign.errors import SelfalignError
from selfalign.evaluation.alpaca import evaluate_alpaca
from selfalign.evaluation.mtbench import CATEGORY_TEMPERATURE, evaluate_mtbench, grade_items, summarize
from selfalign.generation import SamplingParams
from selfalign.generation.transformers_backend import TransformersGenerator
from selfalign.judges.base import Grade, GradingJudge, PairwiseJudge, PairwiseVerdict


class LongerWins(PairwiseJudge):
    """Prefers the longer answer; can be told to crash after some calls (a killed evaluation)."""

    name = "test-longer"

    def __init__(self, crash_after: int | None = None):
        self.items_seen = 0
        self.crash_after = crash_after

    def compare(self, items, progress=False):
        if self.crash_after is not None and self.items_seen >= self.crash_after:
            raise KeyboardInterrupt("killed")
        self.items_seen += len(items)
        return [PairwiseVerdict(p_a=1.0 if len(it.answer_a) > len(it.answer_b) else 0.0, consistent=True)
                for it in items]


class WordCountGrader(GradingJudge):
    name = "test-grader"

    def __init__(self):
        self.items = []

    def grade(self, items, progress=False):
        self.items.extend(items)
        # unparseable for empty answers, to check they are counted and not averaged
        return [Grade(score=float(min(10, 1 + len(it.answer.split()) // 3)) if it.answer.strip() else None, raw="x")
                for it in items]


class SometimesUnreadable(PairwiseJudge):
    """The model's answer (B) wins, except on the instructions in `unreadable`, where the verdict is unparsed."""

    name = "test-unreadable"

    def __init__(self, unreadable: set[str]):
        self.unreadable = unreadable

    def compare(self, items, progress=False):
        return [PairwiseVerdict(p_a=0.5, consistent=None, parsed=False) if it.messages[0]["content"] in self.unreadable
                else PairwiseVerdict(p_a=0.0, consistent=True) for it in items]


def test_unparsed_verdicts_are_dropped_as_alpaca_eval_drops_them_or_ties_on_request(tmp_path):
    from selfalign.evaluation.alpaca import evaluate_outputs

    instructions = load_alpaca_eval_set(limit=14, seed=3)
    outputs = [{"instruction": p.text, "output": f"answer {i}", "generator": "mine", "dataset": "x"}
               for i, p in enumerate(instructions)]
    unreadable = {instructions[2].text, instructions[9].text}
    m = evaluate_outputs(outputs, SometimesUnreadable(unreadable), tmp_path / "drop", progress=False)
    assert m["n_unparsed"] == 2 and m["n_dropped"] == 2 and m["unparsed_as"] == "dropped"
    assert m["n_total"] == 12 and m["win_rate"] == 100.0  # alpaca_eval: NaN preferences leave the win rate
    annotations = json.loads((tmp_path / "drop" / "annotations.json").read_text())
    assert [a["preference"] for a in annotations if not a["parsed"]] == [None, None]
    assert m["length_controlled_winrate"] is not None
    # the same verdicts, resumed with the opt-in: ties, n_total = every instruction
    t = evaluate_outputs(outputs, SometimesUnreadable(unreadable), tmp_path / "drop", progress=False,
                         unparsed_as_tie=True)
    assert t["n_unparsed"] == 2 and t["n_dropped"] == 0 and t["unparsed_as"] == "tie"
    assert t["n_total"] == 14 and t["win_rate"] == pytest.approx(100 * 13 / 14)


@pytest.fixture(scope="module")
def gen(embedded_model_dir):
    return TransformersGenerator(str(embedded_model_dir), batch_size=8)


def test_alpaca_eval_pipeline_and_resume(gen, tmp_path):
    instructions = load_alpaca_eval_set(limit=12, seed=1)
    params = SamplingParams(temperature=0, max_new_tokens=12)
    with pytest.raises(KeyboardInterrupt):
        evaluate_alpaca(gen, LongerWins(crash_after=8), tmp_path, instructions=instructions, params=params,
                        progress=False)
    done = (tmp_path / "annotations.jsonl").read_text().splitlines()
    assert len(done) == 8  # judged before the "kill", kept

    judge = LongerWins()
    m = evaluate_alpaca(gen, judge, tmp_path, instructions=instructions, params=params, progress=False)
    assert judge.items_seen == 4, "a resumed evaluation must not judge finished pairs again"
    # 12-token answers are shorter than every GPT-4-Turbo reference: the longer-wins judge prefers the reference
    assert m["win_rate"] == 0.0 and m["n_total"] == 12 and m["n_unparsed"] == 0
    assert m["length_controlled_winrate"] is not None
    outputs = json.loads((tmp_path / "model_outputs.json").read_text())
    annotations = json.loads((tmp_path / "annotations.json").read_text())
    assert [o["instruction"] for o in outputs] == [p.text for p in instructions]
    assert {"instruction", "output_1", "output_2", "preference", "generator_2"} <= set(annotations[0])
    assert json.loads((tmp_path / "metrics.json").read_text())["win_rate"] == 0.0


def test_mtbench_two_turns_references_and_unparsed(gen, tmp_path, capsys):
    questions = [next(q for q in load_mt_bench() if q.category == c) for c in ("math", "writing")]
    judge = WordCountGrader()
    m = evaluate_mtbench(gen, judge, tmp_path, questions=questions, max_new_tokens=10, progress=False)
    assert m["n_grades"] == 4 and set(m["per_turn"]) == {1, 2}
    answers = [json.loads(l) for l in (tmp_path / "model_answer.jsonl").read_text().splitlines()]
    assert all(len(a["choices"][0]["turns"]) == 2 for a in answers)
    turn2 = [it for it in judge.items if it.turn == 2]
    # the second turn is asked in the conversation that holds the model's own first answer
    assert turn2[0].messages[1]["role"] == "assistant" and turn2[0].messages[1]["content"] == answers[0]["choices"][0]["turns"][0]
    # each turn samples with its own random numbers (they are drawn from the seed and the prompt id): the second
    # turn's ids are not the first's
    ids = {turn: [json.loads(l)["prompt_id"] for l in (tmp_path / f"turn{turn}.jsonl").read_text().splitlines()]
           for turn in (1, 2)}
    assert sorted(ids[1]) == sorted(str(q.question_id) for q in questions)
    assert sorted(ids[2]) == sorted(f"{q.question_id}:turn2" for q in questions)
    math_items = [it for it in judge.items if it.category == "math"]
    assert math_items and all(it.reference for it in math_items)
    assert all(it.reference is None for it in judge.items if it.category == "writing")
    judge2 = WordCountGrader()
    capsys.readouterr()
    evaluate_mtbench(gen, judge2, tmp_path, questions=questions, max_new_tokens=10, progress=True)
    assert judge2.items == [], "resumed grading must not grade again"
    # grading shows its progress by turn, the resumed ones counted as done
    assert f"grade ({judge2.name}): 100%" in capsys.readouterr().err


class UnreadableGrader(GradingJudge):
    """A judge whose grades cannot be read (a judge cut off before "Rating: [[N]]"), on every turn or only on
    `turns`."""

    name = "test-unreadable-grader"

    def __init__(self, turns=(1, 2)):
        self.turns = turns

    def grade(self, items, progress=False):
        return [Grade(score=None if it.turn in self.turns else 5.0, raw="The answer is") for it in items]


def test_mtbench_with_no_readable_grade_fails_and_keeps_its_files(tmp_path, monkeypatch, capsys):
    import selfalign.cli
    import selfalign.evaluation.cli as eval_cli
    from selfalign.cli import main
    from selfalign.generation.base import Generator

    class Echo(Generator):
        """Answers with the prompt's first words: what is under test is the grades, not the answers."""

        model_name = "echo"

        def generate(self, prompts, params, on_batch=None, skip=None, progress=True):
            out = [self._response(p, " ".join(p.text.split()[:3]), params, s, "stop", 3, "echo")
                   for p in prompts for s in range(params.n) if (p.id, s) not in (skip or set())]
            on_batch(out)
            return out

    monkeypatch.setattr(selfalign.cli, "generator_from_args", lambda args, **k: Echo())
    argv = ["eval", "mtbench", "--limit", "8", "--max-new-tokens", "4", "--quiet"]
    monkeypatch.setattr(eval_cli, "_judge_from_args", lambda args: UnreadableGrader())
    for extra in ([], ["--json"]):
        assert main(argv + ["--out", str(tmp_path / "none")] + extra) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.strip() == (
            f"selfalign: error: no grade could be read from the judge's 16 judgments: see what judge "
            f"test-unreadable-grader wrote in {tmp_path / 'none' / 'judgments.jsonl'} (a grade is read from "
            "\"[[N]]\": is --judge-option grade_max_tokens too small, or does the model not follow that format?); the "
            "answers and judgments are kept")
        judgments = (tmp_path / "none" / "judgments.jsonl").read_text().splitlines()
        assert len(judgments) == 16 and json.loads(judgments[0])["judgment"] == "The answer is"
        assert len((tmp_path / "none" / "model_answer.jsonl").read_text().splitlines()) == 8
    # some grades read: a success, as before
    monkeypatch.setattr(eval_cli, "_judge_from_args", lambda args: UnreadableGrader(turns=(2,)))
    assert main(argv + ["--out", str(tmp_path / "some")]) == 0
    out = capsys.readouterr().out
    assert "score 5.00 over 8 grades (8 unparsed)" in out
    assert all(line.startswith("  ") and line.endswith(" 5.00") for line in out.splitlines()[1:]), out  # 2 decimals


def test_a_reused_out_dir_never_keeps_verdicts_about_other_answers(gen, tmp_path):
    from selfalign.errors import DataError

    instructions = load_alpaca_eval_set(limit=4, seed=1)
    params = SamplingParams(temperature=0, max_new_tokens=8)
    evaluate_alpaca(gen, LongerWins(), tmp_path, instructions=instructions, params=params, progress=False)

    class OtherJudge(LongerWins):
        name = "test-longer-2"

    judge = OtherJudge()
    m = evaluate_alpaca(gen, judge, tmp_path, instructions=instructions, params=params, progress=False)
    assert judge.items_seen == 4, "another judge must judge afresh, not reuse the first judge's verdicts"
    assert m["annotator"] == "test-longer-2" and m["n_total"] == 4
    # other answers (another model or other settings) into the same out dir: refused with the file and line
    with pytest.raises(DataError, match=r"responses\.jsonl:1: field 'sampling\.max_new_tokens'"):
        evaluate_alpaca(gen, LongerWins(), tmp_path, instructions=instructions,
                        params=SamplingParams(temperature=0, max_new_tokens=9), progress=False)

    questions = [next(q for q in load_mt_bench() if q.category == c) for c in ("math", "writing", "stem")]
    mt = tmp_path / "mt"
    first = evaluate_mtbench(gen, WordCountGrader(), mt, questions=questions, max_new_tokens=6, progress=False)
    assert first["n_grades"] == 6
    fewer = evaluate_mtbench(gen, WordCountGrader(), mt, questions=questions[:1], max_new_tokens=6, progress=False)
    assert fewer["n_grades"] == 2, "a smaller question set must not count the earlier run's other grades"

    class OtherGrader(WordCountGrader):
        name = "test-grader-2"

    grader = OtherGrader()
    evaluate_mtbench(gen, grader, mt, questions=questions[:1], max_new_tokens=6, progress=False)
    assert len(grader.items) == 2, "another judge grades afresh"

    class Reconfigured(WordCountGrader):  # same name, another option (e.g. --judge-option max_answer_tokens=2)
        def config(self):
            return {"max_answer_tokens": 2}

    grader = Reconfigured()
    m = evaluate_mtbench(gen, grader, mt, questions=questions[:1], max_new_tokens=6, progress=False)
    assert len(grader.items) == 2, "a judge with other options grades afresh"
    assert m["judge"] == "test-grader" and m["judge_id"].startswith("test-grader-")
    rows = [json.loads(line) for line in (mt / "judgments.jsonl").read_text().splitlines()]
    assert all("details" in r and r["judge_id"] for r in rows)


def test_summary_counts_unparsed_and_fastchat_temperatures():
    s = summarize([{"category": "math", "turn": 1, "score": 8.0}, {"category": "math", "turn": 2, "score": None},
                   {"category": "writing", "turn": 1, "score": 4.0}])
    assert s["score"] == 6.0 and s["n_unparsed"] == 1 and s["per_category"] == {"math": 8.0, "writing": 4.0}
    assert CATEGORY_TEMPERATURE["writing"] == 0.7 and CATEGORY_TEMPERATURE["stem"] == 0.1
    q = next(q for q in load_mt_bench() if q.category == "coding")
    t1, t2 = grade_items(q, ["a", "b"])
    assert t2.references == q.reference[:2] and t1.references == q.reference[:1]


def test_existing_outputs_are_judged_without_a_model(tmp_path, data_dir, capsys):
    """`selfalign eval alpaca --outputs`: real alpaca-7b answers (from its GPT-4 annotations) judged against the
    GPT-4-Turbo references by the length rule; the win rate is the share of longer answers, computed directly."""
    from selfalign.cli import main
    from selfalign.data.loaders import load_reference_outputs
    from selfalign.errors import DataError
    from selfalign.evaluation.alpaca import load_model_outputs

    rows = json.loads((data_dir / "alpaca_eval" / "annotations" / "alpaca-7b.json").read_text())[:6]
    outputs = [{"instruction": r["instruction"], "output": r["output_2"], "generator": "alpaca-7b"} for r in rows]
    path = tmp_path / "model_outputs.json"
    path.write_text(json.dumps(outputs))
    refs = load_reference_outputs()
    longer = [len(o["output"]) > len(refs[o["instruction"]]["output"]) for o in outputs]
    assert main(["eval", "alpaca", "--outputs", str(path), "--judge", "length", "--out", str(tmp_path / "ev"),
                 "--quiet"]) == 0
    assert "LC win rate  n/a (the LC win rate needs at least 10" in capsys.readouterr().out  # 6 rows: says why
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["n_total"] == 6 and metrics["model"] == "alpaca-7b"
    assert metrics["win_rate"] == pytest.approx(100 * sum(longer) / 6)
    annotations = json.loads((tmp_path / "ev" / "annotations.json").read_text())
    assert [a["output_2"] for a in annotations] == [o["output"] for o in outputs]

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([outputs[0], {"instruction": "x"}], indent=1))  # alpaca_eval's layout: a key a line
    # the line the bad record starts on (as for JSONL), not its record number
    line = bad.read_text().splitlines().index(' {', 2) + 1
    with pytest.raises(DataError, match=rf"bad.json:{line} \(record 2\): field 'output': missing or not a string"):
        load_model_outputs(bad)
    # the answers `selfalign generate` writes are read too: one per instruction (a prompt's first sample)
    generated = tmp_path / "answers.jsonl"
    generated.write_text("".join(json.dumps({"prompt_id": str(i), "sample_index": k, "messages": [
        {"role": "user", "content": o["instruction"]}], "response": o["output"] if k == 0 else "other sample",
        "model": "alpaca-7b"}) + "\n" for i, o in enumerate(outputs) for k in (0, 1)))
    assert load_model_outputs(generated) == [{**o, "dataset": "user"} for o in outputs]
    system = tmp_path / "system.jsonl"
    system.write_text(json.dumps({"prompt_id": "0", "messages": [{"role": "system", "content": "be brief"},
                                                                {"role": "user", "content": "hi"}],
                                  "response": "hello", "model": "m"}) + "\n")
    with pytest.raises(DataError, match=r"system.jsonl:1: field 'messages': an AlpacaEval answer answers one user "):
        load_model_outputs(system)


class Configured(LongerWins):
    """A judge whose option changes its verdicts (as a reward model's weights or a local judge's budget do)."""

    name = "test-configured"

    def __init__(self, flip: bool):
        super().__init__()
        self.flip = flip

    def config(self):
        return {"flip": self.flip}

    def compare(self, items, progress=False):
        verdicts = super().compare(items, progress)
        return [PairwiseVerdict(p_a=1 - v.p_a, consistent=True) for v in verdicts] if self.flip else verdicts


def test_a_reused_out_dir_rejudges_under_a_changed_judge_config_or_reference(tmp_path):
    """Verdicts are kept only for the same answer, reference and judge configuration (name + config hash); a
    verdict kept from an earlier run is reported under this run's generator name."""
    from selfalign.evaluation.alpaca import evaluate_outputs

    instructions = load_alpaca_eval_set(limit=12, seed=4)
    outputs = [{"instruction": p.text, "output": "x" * 40 * (i % 3), "generator": "a"}
               for i, p in enumerate(instructions)]
    first = evaluate_outputs(outputs, Configured(flip=False), tmp_path, progress=False)
    flipped_judge = Configured(flip=True)
    flipped = evaluate_outputs(outputs, flipped_judge, tmp_path, progress=False)
    assert flipped_judge.items_seen == 12 and flipped["win_rate"] == pytest.approx(100 - first["win_rate"])
    assert flipped["annotator_id"] != first["annotator_id"]
    same = Configured(flip=False)
    renamed = [dict(o, generator="b") for o in outputs]
    again = evaluate_outputs(renamed, same, tmp_path, progress=False)
    assert same.items_seen == 0 and again["win_rate"] == first["win_rate"]  # resumed, under the new name
    assert {a["generator_2"] for a in json.loads((tmp_path / "annotations.json").read_text())} == {"b"}
    short = {p.text: {"output": "ok", "generator": "tiny"} for p in instructions}  # another reference
    judge = Configured(flip=False)
    assert evaluate_outputs(outputs, judge, tmp_path, short, progress=False)["win_rate"] > first["win_rate"]
    assert judge.items_seen == 12


def test_eval_input_mistakes_are_said_before_any_model_loads(tmp_path, data_dir, monkeypatch, capsys):
    import selfalign.cli
    from selfalign.cli import main

    monkeypatch.setattr(selfalign.cli, "generator_from_args", lambda args, **k: pytest.fail("a model was loaded"))

    def error(*argv):
        assert main(["eval", *argv] + (["--quiet"] if argv[0] != "lc" else [])) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err
        return err

    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "--out " + str(a_file) + ": is a file; give a folder" in error("alpaca", "--judge", "length", "--limit",
                                                                          "2", "--out", str(a_file))
    assert "is a file; give a folder" in error("mtbench", "--judge", "local", "--out", str(a_file))
    assert "--limit must be at least 1, not 0" in error("mtbench", "--limit", "0", "--out", str(tmp_path / "m"))
    assert "--max-new-tokens must be at least 1, not 0" in error("mtbench", "--max-new-tokens", "0", "--out",
                                                                  str(tmp_path / "m"))
    assert "--max-new-tokens must be at least 1, not -5" in error("alpaca", "--judge", "length", "--max-new-tokens",
                                                                   "-5", "--out", str(tmp_path / "a"))
    assert "limit must be at least 1, not -3" in error("alpaca", "--judge", "length", "--limit", "-3", "--out",
                                                       str(tmp_path / "a"))
    err = error("alpaca", "--judge", "local", "--judge-option", "model=nosuch", "--limit", "2", "--out",
                str(tmp_path / "a"))
    assert err.startswith("selfalign: error: --judge-option model=nosuch: ") and "model 'nosuch' not found" in err
    assert not (tmp_path / "a").exists()  # a refused command leaves no empty --out folder
    # instructions: alpaca_eval's own format (no ids) is read; a repeated id is refused; a missing reference is said
    rows = [json.loads(line) for line in (data_dir / "alpaca_eval" / "eval_set.jsonl").read_text().splitlines()[:3]]
    dup = tmp_path / "dup.jsonl"
    dup.write_text("".join(json.dumps(dict(r, id="1")) + "\n" for r in rows))
    assert f"{dup}:2: field 'id': duplicate id '1' (first seen on line 1)" in error(
        "alpaca", "--judge", "length", "--instructions", str(dup), "--out", str(tmp_path / "a"))
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"instruction": r["instruction"]}) + "\n" for r in rows) +
                     json.dumps({"instruction": "Not in AlpacaEval."}) + "\n")
    assert [p.id for p in load_alpaca_eval_set(plain)] == ["0", "1", "2", "3"]
    assert f"{plain}: field 'instruction': no reference output for 1 instruction(s), e.g. 'Not in AlpacaEval.'" in \
        error("alpaca", "--judge", "length", "--instructions", str(plain), "--out", str(tmp_path / "a"))
    # existing outputs of two models in one file: refused at the line where the second starts
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps([{"instruction": r["instruction"], "output": "o", "generator": g}
                                 for r, g in zip(rows, ("m1", "m1", "m2"))]))
    assert f"{mixed}:1 (record 3): field 'generator': 'm2' after 'm1': one model's outputs per file" in error(
        "alpaca", "--judge", "length", "--outputs", str(mixed), "--out", str(tmp_path / "o"))
    gamed = data_dir / "alpaca_eval" / "annotations" / "gpt4_gamed.json"
    assert "gpt4_gamed is AlpacaEval's adversarial entry" in error(
        "lc", "--annotations", str(data_dir / "alpaca_eval" / "annotations" / "alpaca-7b.json"), "--gamed", str(gamed))
    assert "not a file" in error("lc", "--annotations", str(gamed), "--difficulty", str(tmp_path))


def test_a_judge_option_without_a_value_is_said_with_its_flag(tmp_path, capsys):
    from selfalign.cli import main

    for argv in (["alpaca", "--judge", "length", "--limit", "2"], ["mtbench", "--judge", "local", "--limit", "8"]):
        for bad in ("novalue", "=smollm2-135m"):
            out = tmp_path / argv[0]
            assert main(["eval", *argv, "--judge-option", bad, "--out", str(out), "--quiet"]) == 2
            assert capsys.readouterr().err.strip() == (f"selfalign: error: --judge-option {bad}: expected key=value "
                                                       "(e.g. --judge-option model=smollm2-135m)")
            assert not out.exists()


def test_a_model_that_is_not_there_leaves_no_out_folder(tmp_path, capsys):
    """The model is an input like the others: refused (one line, status 2) before --out is made."""
    from selfalign.cli import main

    for argv in (["alpaca", "--model", str(tmp_path / "nope" / "model"), "--judge", "length", "--limit", "4"],
                 ["mtbench", "--model", "smollm2-1b", "--judge", "local", "--judge-option", "model=smollm2-135m",
                  "--limit", "4"]):
        out = tmp_path / argv[0]
        assert main(["eval", *argv, "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("selfalign: error: model ") and "not found" in err and "\n" not in err
        assert not out.exists()


def test_a_rerun_with_every_answer_on_file_loads_no_model(tmp_path, monkeypatch, capsys):
    import selfalign.generation
    from selfalign.cli import main

    argv = ["eval", "alpaca", "--model", "smollm2-135m", "--judge", "length", "--limit", "2", "--max-new-tokens", "8",
            "--out", str(tmp_path / "ev"), "--quiet", "--json"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    monkeypatch.setattr(selfalign.generation, "make_generator",
                        lambda *a, **k: pytest.fail("a model was loaded with every answer on file"))
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["win_rate"] == first["win_rate"] and again["n_total"] == 2 and again["model"] == "smollm2-135m"
    # the resume check still reads the weights' digest and the sampling settings, before any model loads
    assert main(argv[:-5] + ["9"] + argv[-4:]) == 2
    assert "field 'sampling.max_new_tokens': was sampled with max_new_tokens=8, not 9" in capsys.readouterr().err


def test_a_limit_above_the_instructions_is_said(tmp_path, data_dir, monkeypatch, capsys):
    import selfalign.cli
    from selfalign.cli import main

    def stop(args, **options):
        raise SelfalignError("stopped before the model loads")

    monkeypatch.setattr(selfalign.cli, "generator_from_args", stop)
    rows = (data_dir / "alpaca_eval" / "eval_set.jsonl").read_text().splitlines()[:3]
    three = tmp_path / "three.jsonl"
    three.write_text("\n".join(rows) + "\n")
    argv = ["eval", "alpaca", "--judge", "length", "--instructions", str(three), "--out", str(tmp_path / "a")]
    assert main(argv + ["--limit", "5"]) == 2
    assert f"selfalign: note: --limit 5 is more than the 3 instructions of {three}: answering all of them" in \
        capsys.readouterr().err
    assert main(argv + ["--limit", "3"]) == 2
    assert "note" not in capsys.readouterr().err


def test_default_alpaca_judge_is_the_crossfit_reward_judge(tmp_path, monkeypatch, capsys):
    """`selfalign eval alpaca` judges with `reward-crossfit` unless told otherwise; when its models were never
    trained, the command stops before loading or generating anything, with one line saying how to train them."""
    from selfalign.cli import main

    monkeypatch.setenv("SELFALIGN_CACHE", str(tmp_path / "cache"))
    code = main(["eval", "alpaca", "--model", "smollm2-135m", "--limit", "2", "--out", str(tmp_path / "ev"),
                 "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "alpaca-gpt4-crossfit" in err[0] and "selfalign judges train-crossfit" in err[0]
    assert not (tmp_path / "ev" / "model_outputs.json").exists()


def test_an_api_judge_that_is_down_is_refused_on_a_first_run_and_noted_on_a_rerun(tmp_path, data_dir, capsys):
    """A first `eval alpaca` would generate every answer before its first verdict failed; a rerun's verdicts may
    all be in the --out folder's judge cache, so there a judge endpoint that is down is only noted."""
    from selfalign.cli import main

    rows = json.loads((data_dir / "alpaca_eval" / "annotations" / "alpaca-7b.json").read_text())[:2]
    path = tmp_path / "model_outputs.json"
    path.write_text(json.dumps([{"instruction": r["instruction"], "output": r["output_2"], "generator": "alpaca-7b"}
                                for r in rows]))
    args = ["eval", "alpaca", "--outputs", str(path), "--judge", "api", "--judge-option",
            "base_url=http://127.0.0.1:9/v1", "--judge-option", "model=gpt-4", "--out", str(tmp_path / "ev"),
            "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--judge-option model=gpt-4: http://127.0.0.1:9/v1/models: endpoint not reachable" in err, err
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "judge_cache.api.jsonl").write_text("")  # as an earlier run leaves it
    from selfalign.evaluation import cli as eval_cli

    class Args:
        judge, judge_option, out = "api", ["base_url=http://127.0.0.1:9/v1", "model=gpt-4"], str(tmp_path / "ev")
    eval_cli._judge_from_args(Args)
    assert "selfalign: note: http://127.0.0.1:9/v1/models: endpoint not reachable" in capsys.readouterr().err
