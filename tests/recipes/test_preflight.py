"""A recipe's inputs are checked before its run folder is made: a run folder is locked to the config it started
with, so an input the run cannot use must fail before the manifest is written, or the fixed config would need a new
--run-dir. Each failure is one line that points at the config file's line or the --set that gave the value."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from selfalign.cli import main
from selfalign.config import config_error, load_config, locate_error
from selfalign.recipes import dpo, preflight, seft, sft, spa, srt

REPO = Path(__file__).resolve().parents[2]


def run_cli(recipe: str, config: Path | str, run_dir: Path, *overrides: str, capsys) -> tuple[int, str]:
    argv = ["run", recipe, str(config), "--run-dir", str(run_dir)]
    for o in overrides:
        argv += ["--set", o]
    rc = main(argv)
    return rc, capsys.readouterr().err.strip()


def smoke(recipe: str) -> Path:
    return REPO / "configs" / f"{recipe}-smoke.yaml"


def test_a_missing_model_fails_before_the_run_folder_exists_naming_the_override(tmp_path, capsys):
    run_dir = tmp_path / "dpo"
    rc, err = run_cli("dpo", smoke("dpo"), run_dir, "model=nope-model", capsys=capsys)
    assert rc == 2
    assert err.startswith("selfalign: error: --set model=nope-model: model: model 'nope-model' not found")
    assert len(err.splitlines()) == 1
    assert not run_dir.exists()  # nothing locks the folder: the fixed command can use the same --run-dir


def test_an_error_in_the_file_names_its_line(tmp_path, capsys):
    config = tmp_path / "spa.yaml"
    text = smoke("spa").read_text().replace("model: smollm2-135m", "model: smollm2-135M")
    config.write_text(text)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if t.startswith("model:"))
    rc, err = run_cli("spa", config, tmp_path / "spa", capsys=capsys)
    assert rc == 2 and err.startswith(f"selfalign: error: {config}:{line}: model: model 'smollm2-135M' not found")
    assert not (tmp_path / "spa").exists()


def test_data_problems_fail_before_the_run_folder_exists(tmp_path, capsys, data_dir):
    bad = tmp_path / "prompts.jsonl"
    rows = (data_dir / "prompts" / "unlabelled_pool.jsonl").read_text().splitlines()[:3]
    bad.write_text("\n".join(rows) + '\n{"id": "no-text"}\n')
    rc, err = run_cli("spa", smoke("spa"), tmp_path / "a", f"prompts={bad}", capsys=capsys)
    assert rc == 2 and err == f"selfalign: error: {bad}:4: field 'prompt': missing required field (give 'prompt' " \
                              "or 'instruction' text, or a 'messages' list)"
    rc, err = run_cli("srt", smoke("srt"), tmp_path / "b", "prompts=nope.jsonl", capsys=capsys)
    assert rc == 2 and err.startswith("selfalign: error: --set prompts=nope.jsonl: prompts: data file 'nope.jsonl' "
                                      "not found")
    # a size the data cannot give is found before the folder exists too (it used to fail in the data stage)
    rc, err = run_cli("spa", smoke("spa"), tmp_path / "c", "round_sizes=[6000, 6000]", capsys=capsys)
    assert rc == 2 and "round_sizes=[6000, 6000]: round_sizes: 12000 prompts asked for (the sum of round_sizes); " \
                       "only" in err and "prompts not in the seed are available" in err
    # the size check names whichever of the keys that decide it an --set changed
    for i, override in enumerate(["stage1_size=20000", "stage2_size=20000"]):
        rc, err = run_cli("srt", smoke("srt"), tmp_path / f"d{i}", override, capsys=capsys)
        assert rc == 2 and f"--set {override}: stage1_size: 20006 prompts asked for (stage1_size + stage2_size); " \
                           "only" in err, err
    # a prompt_sources value no prompt has is named (it used to surface as "only 0 prompts are available")
    rc, err = run_cli("seft", smoke("seft"), tmp_path / "f", "prompt_sources=[nosuchsource]", capsys=capsys)
    assert rc == 2 and "--set prompt_sources=[nosuchsource]: prompt_sources: 'nosuchsource': no prompt in " in err
    assert "has this source (its sources: " in err and len(err.splitlines()) == 1
    rc, err = run_cli("spa", smoke("spa"), tmp_path / "g", "prompt_sources=[self-instruct/seed_tasks]",
                      "round_sizes=[1000]", capsys=capsys)
    assert rc == 2 and "--set round_sizes=[1000]: round_sizes: 1000 prompts asked for" in err, err
    # DPO's held-out pairs are not its training pairs; an empty --set value is named as such
    train_1k = "preferences/ultrafeedback_binarized_train_1k.jsonl"
    rc, err = run_cli("dpo", smoke("dpo"), tmp_path / "h", f"data={train_1k}", f"eval_data={train_1k}", "limit=1000",
                      capsys=capsys)
    assert rc == 2 and err.endswith("eval_data: every pair's instruction in preferences/ultrafeedback_binarized_"
                                    "train_1k.jsonl is also in the training pairs (preferences/ultrafeedback_"
                                    "binarized_train_1k.jsonl): nothing is held out"), err
    rc, err = run_cli("dpo", smoke("dpo"), tmp_path / "i", "data=", capsys=capsys)
    assert rc == 2 and err == "selfalign: error: --set data=: data: empty path (give a data file)", err
    assert not any((tmp_path / d).exists() for d in ["a", "b", "c", "d0", "d1", "f", "g", "h", "i"])


def test_the_data_stage_says_what_it_dropped_and_a_limit_it_could_not_fill(capsys, data_dir):
    sft_config = load_config(sft.Config, smoke("sft"), ["limit=5000"])
    files, summary = sft.prepare_data(sft_config)
    # SFT trains on chosen answers only: identical pairs stay, the one empty chosen answer goes
    assert summary["examples"] == 999 and summary["data"]["empty_dropped"] == 1
    assert all(c.messages[-1]["content"].strip() for c in files["sft.jsonl"])
    err = capsys.readouterr().err
    assert "selfalign: note: data: " in err and "has 1000 pairs; dropped 1 with an empty chosen; limit 5000 is more " \
                                                "than the 999 usable; using 999" in err, err
    # DPO: the training file's identical and empty pairs go; held-out pairs sharing a training instruction go
    train = data_dir / "preferences" / "ultrafeedback_binarized_train_1k.jsonl"
    dpo_config = load_config(dpo.Config, smoke("dpo"), [f"data={train}", "limit=30", f"eval_data={train}",
                                                        "eval_limit=5"])
    files, summary = dpo.prepare_data(dpo_config)
    assert summary["train_data"]["used"] == 30 and summary["eval_data"]["in_training_dropped"] == 30
    train_prompts = {p.prompt for p in files["train.jsonl"]}
    assert len(files["eval.jsonl"]) == 5 and not train_prompts & {p.prompt for p in files["eval.jsonl"]}
    assert all(p.chosen.strip() and p.rejected.strip() and p.chosen != p.rejected for p in files["train.jsonl"])
    assert capsys.readouterr().err == ""  # both limits were met
    files, summary = dpo.prepare_data(load_config(dpo.Config, smoke("dpo"), [f"data={train}", "limit=30",
                                                                             f"eval_data={train}", "eval_limit=2000"]))
    assert summary["eval_pairs"] == len(files["eval.jsonl"]) == 1000 - 4 - 2 - 30
    assert "selfalign: note: eval_data: eval_limit 2000 is more than the 964 usable held-out pairs of 1000 in " \
           f"{train} (dropped 4 with identical answers, 2 with an empty answer, 30 sharing an instruction with a " \
           "training pair)" in capsys.readouterr().err
    # SEFT's reviser pairs: a limit the filtered file cannot fill is said too
    files, summary = seft.prepare_data(load_config(seft.Config, smoke("seft"), ["reviser.limit=100000"]))
    assert summary["reviser_pairs"] == summary["usable_pairs"] < 1000
    assert f"selfalign: note: reviser.limit: 100000 is more than the {summary['usable_pairs']} usable pairs of 996 " \
           in capsys.readouterr().err


def test_backends_judges_and_critics_are_checked_without_loading_weights(tmp_path, capsys):
    cases = [
        ("spa", ["sampling.backend=fast"], "--set sampling.backend=fast: sampling.backend: unknown backend 'fast'"),
        ("spa", ["labeler=oracle"], "--set labeler=oracle: labeler: unknown judge 'oracle'"),
        ("spa", ["labeler=local", "labeler_options.model=qwen9"], "labeler: model 'qwen9' not found"),
        ("seft", ["eval.judge=api"], "--set eval.judge=api: eval.judge: the api judge needs base_url"),
        ("seft", ["reviser.label_rule=judge", "reviser.label_judge=length", "reviser.label_judge_options.temp=1"],
         "--set reviser.label_judge_options.temp=1: reviser.label_judge_options: judge 'length' has no option temp"),
        ("seft", ["reviser.adaptive_template=nope.txt"], "reviser.adaptive_template: reviser template 'nope.txt'"),
        # base_url is set nowhere: the --set of its section that made it needed is named
        ("srt", ["critic.backend=openai"], "--set critic.backend=openai: critic.base_url: the openai backend needs"),
        ("srt", ["critic.model=nope-critic"], "--set critic.model=nope-critic: critic.model: model 'nope-critic'"),
        # an API labeler or judge that is down is found before the run, not at its first judging stage
        ("spa", ["labeler=api", "labeler_options={base_url: 'http://127.0.0.1:9/v1'}"],
         "--set labeler_options={base_url: 'http://127.0.0.1:9/v1'}: labeler_options.base_url: "
         "http://127.0.0.1:9/v1/models: endpoint not reachable (ConnectError"),
        ("seft", ["eval.judge=api", "eval.judge_options={base_url: 'http://127.0.0.1:9/v1'}"],
         "eval.judge_options.base_url: http://127.0.0.1:9/v1/models: endpoint not reachable (ConnectError"),
        # external answers for a round that does not exist (round_sizes was shortened): the --set is named
        ("seft", ["round_sizes=[5]"], "--set round_sizes=[5]: external.rounds: round(s) [2] do not exist"),
    ]
    for i, (recipe, overrides, expected) in enumerate(cases):
        rc, err = run_cli(recipe, smoke(recipe), tmp_path / str(i), *overrides, capsys=capsys)
        assert rc == 2 and expected in err, (overrides, err)
        assert len(err.splitlines()) == 1
    assert "critic.base_url: the openai backend needs an http(s) base URL" in run_cli(
        "srt", smoke("srt"), tmp_path / "x", "critic.backend=openai", capsys=capsys)[1]
    assert "--set critic.base_url=localhost:8000/v1: critic.base_url: the openai backend needs an http(s) base URL" \
        in run_cli("srt", smoke("srt"), tmp_path / "y", "critic.backend=openai", "critic.base_url=localhost:8000/v1",
                   capsys=capsys)[1]
    rc, err = run_cli("srt", smoke("srt"), tmp_path / "z", "critic.options={concurency: 4}", capsys=capsys)
    assert rc == 2 and "critic.options: backend 'auto' has no option concurency (options: device, dtype, " in err
    rc, err = run_cli("srt", smoke("srt"), tmp_path / "z", "critic.backend=openai", "critic.base_url=http://h/v1",
                      "critic.options={concurency: 4}", capsys=capsys)
    assert rc == 2 and "critic.options: backend 'openai' has no option concurency (options: api_key_env," in err
    # a critic endpoint that is down is found now, not after the first stages (the folder would be locked to it)
    rc, err = run_cli("srt", smoke("srt"), tmp_path / "w", "critic.backend=openai",
                      "critic.base_url=http://127.0.0.1:9/v1", capsys=capsys)
    assert rc == 2 and "--set critic.base_url=http://127.0.0.1:9/v1: critic.base_url: http://127.0.0.1:9/v1/models: " \
                       "endpoint not reachable (ConnectError" in err and len(err.splitlines()) == 1, err
    # a key variable the config names must be set; a base_url for a local critic would be ignored
    rc, err = run_cli("srt", smoke("srt"), tmp_path / "w", "critic.backend=openai", "critic.base_url=http://h/v1",
                      "critic.api_key_env=SELFALIGN_NO_SUCH_KEY", capsys=capsys)
    assert rc == 2 and "critic.api_key_env: the environment variable SELFALIGN_NO_SUCH_KEY (named by api_key_env) " \
                       "is not set" in err, err
    rc, err = run_cli("srt", smoke("srt"), tmp_path / "w", "critic.base_url=http://127.0.0.1:8000/v1", capsys=capsys)
    assert rc == 2 and "critic.base_url: set, but critic.backend is 'auto', a local backend that would ignore it" in err
    # SEFT's external answers go to rounds that exist
    rc, err = run_cli("seft", smoke("seft"), tmp_path / "w", "external.rounds=[3]", capsys=capsys)
    assert rc == 2 and "--set external.rounds=[3]: external.rounds: round(s) [3] do not exist: round_sizes lists 2" \
                       in err, err
    # the reviser's quality stage comes after hours of reviser training: its pair count is checked up front
    rc, err = run_cli("seft", smoke("seft"), tmp_path / "q", "reviser_eval.pairs=500", capsys=capsys)
    assert rc == 2 and "--set reviser_eval.pairs=500: reviser_eval.pairs: 500 held-out pairs asked for;" in err
    assert not list(tmp_path.iterdir())


class _Endpoint(BaseHTTPRequestHandler):
    """GET /models answers `status` (a server without /models answers 404 or 501 and still counts as up); a chat
    request answers `chat_status`."""
    status, chat_status, chats = 200, 200, 0

    def _answer(self, status):
        body = json.dumps({"data": [{"id": "stand-in"}]}).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        self._answer(self.status)

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        _Endpoint.chats += 1
        self._answer(self.chat_status)

    def log_message(self, *a):
        pass


def test_an_api_critic_endpoint_is_contacted_once_before_the_run(tmp_path, capsys):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        for status in (200, 404, 501):  # up
            _Endpoint.status = status
            srt.check_inputs(load_config(srt.Config, smoke("srt"), ["critic.backend=openai", f"critic.base_url={url}",
                                                                   "critic.options={concurrency: 2}"]))
        # a key refused: without a model name the listing decides; with one (the smoke config names
        # smollm2-135m), one chat request confirms it, since some keys may chat but not list models
        _Endpoint.status, _Endpoint.chat_status = 401, 403
        rc, err = run_cli("srt", smoke("srt"), tmp_path / "r", "critic.backend=openai", f"critic.base_url={url}",
                          "critic.model=", capsys=capsys)
        assert rc == 2 and "critic.base_url: " in err and "/models: HTTP 401: the endpoint refuses the request " \
                           "($OPENAI_API_KEY is" in err, err
        chats = _Endpoint.chats
        rc, err = run_cli("srt", smoke("srt"), tmp_path / "r", "critic.backend=openai", f"critic.base_url={url}",
                          capsys=capsys)
        assert rc == 2 and "/chat/completions: HTTP 403: the endpoint refuses the request" in err, err
        assert _Endpoint.chats == chats + 1 and not (tmp_path / "r").exists()
        _Endpoint.chat_status = 200
        srt.check_inputs(load_config(srt.Config, smoke("srt"), ["critic.backend=openai", f"critic.base_url={url}"]))
        assert _Endpoint.chats == chats + 2
        # a model the endpoint does not list, and that chat does not find (a wrong name or path): refused now
        _Endpoint.status, _Endpoint.chat_status = 200, 404
        rc, err = run_cli("srt", smoke("srt"), tmp_path / "r", "critic.backend=openai", f"critic.base_url={url}",
                          "critic.model=gpt-4", capsys=capsys)
        assert rc == 2 and "/chat/completions: HTTP 404 for model 'gpt-4'" in err and "check base_url" in err, err
        assert not (tmp_path / "r").exists()
        chats = _Endpoint.chats
        srt.check_inputs(load_config(srt.Config, smoke("srt"), ["critic.backend=openai", f"critic.base_url={url}",
                                                               "critic.model=stand-in"]))
        assert _Endpoint.chats == chats  # listed: no chat request
    finally:
        _Endpoint.status, _Endpoint.chat_status = 200, 200
        server.shutdown()


def test_a_resumed_run_does_not_need_its_endpoint_up(tmp_path):
    """The endpoint is checked before a new run folder only: a killed run resumes its training while the critic
    server is down (a stage that needs the critic fails then, and the same command resumes once it is back)."""
    from selfalign.config import config_to_dict
    from selfalign.errors import ConfigError
    from selfalign.recipes.common import start_run
    from selfalign.runs import Run

    config = load_config(srt.Config, smoke("srt"), ["critic.backend=openai", "critic.base_url=http://127.0.0.1:9/v1"])
    with pytest.raises(ConfigError, match="endpoint not reachable"):
        start_run(str(tmp_path / "run"), config, "srt", 0, srt.check_inputs, srt.prepare_data)
    assert not (tmp_path / "run").exists()
    Run(tmp_path / "run", config_to_dict(config), "srt", seed=0)  # as a run that was started when it was up
    run = start_run(str(tmp_path / "run"), config, "srt", 0, srt.check_inputs, srt.prepare_data)
    assert run.is_done("data")


def test_a_resume_from_elsewhere_does_not_read_the_data_files_again(tmp_path, capsys, monkeypatch, data_dir):
    """A run whose data stage is done has its splits on disk: a data path relative to where it started need not
    resolve from where it resumes (before the check-first change, resuming never read them)."""
    from selfalign.recipes import common

    started, elsewhere = tmp_path / "a", tmp_path / "b"
    started.mkdir()
    elsewhere.mkdir()
    pairs = data_dir / "preferences" / "ultrafeedback_binarized_train_1k.jsonl"
    (started / "mine.jsonl").write_text("".join(pairs.read_text().splitlines(keepends=True)[:6]))
    config = load_config(dpo.Config, smoke("dpo"), ["data=mine.jsonl", "eval_limit=0"])
    monkeypatch.chdir(started)
    run = common.start_run("run", config, "dpo", 0, dpo.check_inputs, dpo.prepare_data)
    assert run.is_done("data") and (started / "run" / "data" / "train.jsonl").exists()
    monkeypatch.chdir(elsewhere)
    run = common.start_run(str(started / "run"), config, "dpo", 0, dpo.check_inputs, dpo.prepare_data)
    assert run.is_done("data")
    with pytest.raises(Exception, match="data: data file 'mine.jsonl' not found"):  # a new run from here would read
        common.start_run("new", config, "dpo", 0, dpo.check_inputs, dpo.prepare_data)
    assert not (elsewhere / "new").exists()


def test_the_shipped_configs_pass_their_checks(data_dir):
    """Every smoke config's inputs exist on this machine: the checks refuse nothing a shipped config needs."""
    for module in (dpo, spa, srt, seft):
        name = module.__name__.rsplit(".", 1)[1]
        config = load_config(module.Config, smoke(name))
        module.check_inputs(config)
        files, summary = module.prepare_data(config)
        assert files and all(isinstance(records, list) for records in files.values())
        json.dumps(summary)  # it goes into the manifest


def test_an_evaluation_of_no_instructions_checks_no_judge(capsys):
    preflight.evaluation("eval", spa.EvalConfig(instructions=0, judge="no-such-judge"))
    with pytest.raises(Exception, match="eval.judge: unknown judge 'no-such-judge'"):
        preflight.evaluation("eval", spa.EvalConfig(instructions=1, judge="no-such-judge"))
    # a seeded subset larger than AlpacaEval's 805 instructions would silently be all of them
    with pytest.raises(Exception, match="eval.instructions: 900 is more than the 805 AlpacaEval instructions"):
        preflight.evaluation("eval", spa.EvalConfig(instructions=900, judge="length"))
    preflight.evaluation("eval", spa.EvalConfig(instructions=805, judge="length"))
    with preflight.endpoints_not_contacted():  # a resumed run started before the check: said, not refused
        preflight.evaluation("eval", spa.EvalConfig(instructions=900, judge="length"))
    assert "eval.instructions: 900 is more than the 805 AlpacaEval instructions: its evaluations use all 805" in \
        capsys.readouterr().err


def test_locate_error_places_a_keyed_error_like_load_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\ncritic:\n  backend: openai\n")
    assert str(locate_error(config_error("critic.base_url", "missing"), path)) == \
        f"{path}:2: critic.base_url: missing"  # no line of its own: its section's
    assert str(locate_error(config_error("model", "x"), path, ["model=y"])) == "--set model=y: model: x"
    assert str(locate_error(config_error("shuffle_seed", "x"), path)) == f"{path}: shuffle_seed: x"  # a default
    plain = ValueError("not a config error")
    assert locate_error(plain, path) is plain


def test_training_processes_that_cannot_be_placed_fail_before_the_run_folder_exists(tmp_path, capsys):
    # a nested train section (SEFT's reviser) is found too, and the error names its key
    run_dir = tmp_path / "seft"
    rc, err = run_cli("seft", smoke("seft"), run_dir, "reviser.adaptive_train.processes=2",
                      "reviser.adaptive_train.device=cpu:0", capsys=capsys)
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("selfalign: error: --set reviser.adaptive_train.device=cpu:0: reviser.adaptive_train.device: "
                          "with processes > 1 each process takes one GPU itself"), err
    assert "device must be auto, cuda or cpu, not 'cpu:0'" in err
    assert not run_dir.exists()
    # a device this machine lacks is refused with one process too, naming the device's --set
    import torch

    if not torch.cuda.is_available():
        rc, err = run_cli("dpo", smoke("dpo"), tmp_path / "dpo", "train.device=cuda", capsys=capsys)
        assert rc == 2 and err.startswith("selfalign: error: --set train.device=cuda: train.device: "), err
        assert not (tmp_path / "dpo").exists()
    # too many processes for the batch: the --set that asked for them is named
    rc, err = run_cli("spa", smoke("spa"), tmp_path / "spa", "round_train.processes=8", capsys=capsys)
    assert rc == 2 and "--set round_train.processes=8" in err and "processes (8) is above batch_size" in err, err
    config = load_config(spa.Config, smoke("spa"), ["round_train.processes=2", "seed_train.processes=2"])
    preflight.training(config)  # device auto: CPU processes without a GPU, one per GPU with them


def test_lora_settings_peft_would_refuse_mid_run_fail_before_the_run_folder_exists(tmp_path, capsys):
    run_dir = tmp_path / "spa"
    for setting, problem in (("seed_train.lora={r: 0}", "seed_train.lora: r must be >= 1, not 0"),
                             ("round_train.lora={alpha: -1}", "round_train.lora: alpha must be finite and > 0, not -1"),
                             ("seed_train.lora={dropout: 1.5}", "seed_train.lora: dropout must be in [0, 1), not 1.5"),
                             ("seed_train.lora={target_modules: []}", "target_modules must name at least one layer"),
                             ("seed_train.lora={target_modules: [q_proj, nope_proj]}",
                              "seed_train.lora.target_modules: 'nope_proj' matches no layer of smollm2-135m (its "
                              "layers: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj)")):
        rc, err = run_cli("spa", smoke("spa"), run_dir, setting, capsys=capsys)
        assert rc == 2 and err.startswith(f"selfalign: error: --set {setting}: ") and problem in err, err
        assert len(err.splitlines()) == 1 and not run_dir.exists()
    # a nested train section is checked against its own model (SEFT's reviser)
    rc, err = run_cli("seft", smoke("seft"), tmp_path / "seft", "reviser.adaptive_train.lora={target_modules: [w1]}",
                      capsys=capsys)
    assert rc == 2 and "reviser.adaptive_train.lora.target_modules: 'w1' matches no layer of" in err, err
    for recipe, setting in ((spa, "seed_train.lora={r: 4, target_modules: [q_proj, model.layers.0.mlp.up_proj]}"),
                            (seft, "reviser.adaptive_train.lora={target_modules: [v_proj]}")):
        name = recipe.__name__.rsplit(".", 1)[-1]
        preflight.lora_targets(load_config(recipe.Config, smoke(name), [setting]))  # names it has: no error
    # a LoRA adapter folder as the model names its adapters' weights, not its base's layers: left to peft
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "smollm2-135m"}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 8)},
              str(adapter / "adapter_model.safetensors"))
    preflight.lora_targets(load_config(sft.Config, smoke("sft"), [f"model={adapter}", "train.lora={r: 4}"]))


def test_generation_processes_that_cannot_run_fail_before_the_run_folder_exists(tmp_path, capsys):
    # an API critic answers requests in parallel itself: several processes are refused, naming the --set
    run_dir = tmp_path / "srt"
    rc, err = run_cli("srt", smoke("srt"), run_dir, "critic.backend=openai", "critic.base_url=http://127.0.0.1:9/v1",
                      "critic.processes=2", capsys=capsys)
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("selfalign: error: --set critic.processes=2: critic.processes: processes > 1 runs a local "
                          "backend"), err
    assert not run_dir.exists()
    rc, err = run_cli("spa", smoke("spa"), tmp_path / "spa", "sampling.processes=0", capsys=capsys)
    assert rc == 2 and "--set sampling.processes=0" in err and "processes must be >= 1" in err, err
    rc, err = run_cli("seft", smoke("seft"), tmp_path / "seft", "eval.processes=0", capsys=capsys)
    assert rc == 2 and "--set eval.processes=0" in err and "processes must be >= 1" in err, err
    # SRT's self_critique has no backend of its own: it generates with sampling.backend
    rc, err = run_cli("srt", smoke("srt"), run_dir, "sampling.backend=vllm", "self_critique.processes=2",
                      capsys=capsys)
    assert rc == 2 and "--set self_critique.processes=2: self_critique.processes: processes > 1 runs a local " \
        "backend (auto, lean, transformers) once per GPU, not 'vllm'" in err, err
    # a section's own key given again among a critic's backend options would reach make_generator twice
    rc, err = run_cli("srt", smoke("srt"), run_dir, "critic.options={processes: 2}", capsys=capsys)
    assert rc == 2 and "critic: options holds processes, a key of this section: set processes beside options" in err, \
        err
    # a recipe's sampling options reach its backend, checked before the run folder is made
    rc, err = run_cli("spa", smoke("spa"), tmp_path / "spa", "sampling.options={decode: graphs, colour: red}",
                      capsys=capsys)
    assert rc == 2 and "sampling.options: backend 'auto' has no option colour, decode" in err, err
    rc, err = run_cli("seft", smoke("seft"), tmp_path / "seft", "eval.options={batch_size: 4}", capsys=capsys)
    assert rc == 2 and "--set eval.options={batch_size: 4}: eval: options holds batch_size, a key of this section: " \
        "set batch_size beside options, not under it" in err, err
    # option values a model would refuse only when its stage starts
    for setting, problem in (("sampling.options={dtype: float33}", "unknown dtype 'float33'"),
                             ("eval.options={max_cache_gb: -1}", "max_cache_gb must be a number above 0, not -1")):
        rc, err = run_cli("spa", smoke("spa"), tmp_path / "spa", setting, capsys=capsys)
        key = setting.split("=")[0]
        assert rc == 2 and err.startswith(f"selfalign: error: --set {setting}: {key}: ") and problem in err, err
    import torch

    if not torch.cuda.is_available():  # a device among the options is checked, with one process or several
        for extra in ((), ("sampling.processes=2",)):
            rc, err = run_cli("spa", smoke("spa"), tmp_path / "spa", "sampling.options={device: cuda}", *extra,
                              capsys=capsys)
            assert rc == 2 and "--set sampling.options={device: cuda}: sampling.options: device 'cuda' asked " \
                "for, but this torch sees no CUDA GPU" in err, err
        # on a CPU each process holds its own model: no more of them than cores
        from selfalign.workers import cpu_cores

        many = f"sampling.processes={cpu_cores() + 1}"
        rc, err = run_cli("spa", smoke("spa"), tmp_path / "spa", many, capsys=capsys)
        assert rc == 2 and err.startswith(f"selfalign: error: --set {many}: sampling.processes: {cpu_cores() + 1} "
                                          f"processes, but this process may use {cpu_cores()} CPU core(s)"), err
    assert not (tmp_path / "spa").exists() and not (tmp_path / "seft").exists()
    assert not run_dir.exists()
    config = load_config(seft.Config, smoke("seft"), ["sampling.processes=2", "reviser.processes=2",
                                                      "eval.processes=2"])
    preflight.generation(config)  # local backends: CPU processes without a GPU, one per GPU with them
