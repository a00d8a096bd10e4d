"""One process per run folder (the run lock), and `selfalign status DIR`: a run's stages, times, results and whether
a process is running it now."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from selfalign.cli import main
from selfalign.errors import SelfalignError
from selfalign.runs import LOCK_FILE, ResumableJsonl, Run, lock_owner

# child processes import the selfalign under test (this checkout), not whichever one their working directory finds
CHILD_ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}

HOLD = textwrap.dedent("""
    import sys, time
    from selfalign.runs import Run
    run = Run(sys.argv[1], {"a": 1}, recipe="test")
    run.stage("data", lambda: {"rows": 3})
    run.manifest["stages"]["round1/generate"] = {"status": "running"}  # as a stage in progress leaves it
    run.save()
    print("ready", flush=True)
    time.sleep(120)
""")


def test_a_second_process_is_refused_while_the_first_runs_and_takes_over_once_it_is_killed(tmp_path, capsys):
    root = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True, env=CHILD_ENV)
    try:
        assert holder.stdout.readline().strip() == "ready"
        owner = lock_owner(root)
        assert owner is not None and owner["pid"] == holder.pid
        with pytest.raises(SelfalignError, match=rf"another selfalign process is working on it now \(pid "
                                                 rf"{holder.pid}, since "):
            Run(root, {"a": 1}, recipe="test")
        assert main(["status", str(root)]) == 0
        out = capsys.readouterr().out
        assert f"state: running now (pid {holder.pid}, stage round1/generate)" in out
        assert "data             done" in out and "rows=3" in out
    finally:
        holder.kill()
        holder.wait()
    assert lock_owner(root) is None  # the killed run's lock is left behind, and is no one's
    assert (root / LOCK_FILE).exists()
    main(["status", str(root)])
    out = capsys.readouterr().out
    assert "state: stopped during stage round1/generate (killed or interrupted): the same command resumes it" in out
    assert "round1/generate  stopped" in out
    main(["status", str(root), "--json"])  # the same status as the table (the manifest still says "running")
    status = json.loads(capsys.readouterr().out)
    assert status["stages"]["round1/generate"]["status"] == "stopped" and status["owner"] is None
    run = Run(root, {"a": 1}, recipe="test")  # the same command resumes: this process takes the folder over
    assert lock_owner(root)["pid"] != holder.pid and run.is_done("data")


def test_a_stage_that_raises_is_recorded_failed_with_its_error_and_reruns_on_resume(tmp_path, capsys):
    root = tmp_path / "run"
    run = Run(root, {"a": 1}, recipe="test")
    run.stage("data", lambda: {"rows": 3})

    def broken():
        raise ValueError("the critic's endpoint said 401\nsecond line")

    with pytest.raises(ValueError):
        run.stage("critique", broken)
    del run
    assert main(["status", str(root)]) == 0
    out = capsys.readouterr().out
    assert "state: failed in stage critique (ValueError: the critic's endpoint said 401); fix the cause" in out
    assert "critique  failed" in out
    run = Run(root, {"a": 1}, recipe="test")
    assert run.stage("critique", lambda: {"ok": 1}) == {"ok": 1}  # a failed stage runs again
    assert "error" not in run.manifest["stages"]["critique"]
    assert main(["status", str(tmp_path / "run" / "manifest.json")]) == 2
    assert "a file, not a run folder" in capsys.readouterr().err


def test_the_lock_is_released_with_the_run_and_a_reused_pid_is_not_an_owner(tmp_path):
    root = tmp_path / "run"
    run = Run(root, {"a": 1}, recipe="test")
    assert lock_owner(root) is not None
    again = Run(root, {"a": 1}, recipe="test")  # the same process may open its run again (a resume in one session)
    del run  # the first claim's release leaves the second's lock alone
    lock = json.loads((root / LOCK_FILE).read_text())
    lock["process_started"] -= 3600  # the pid now belongs to a process that started after the lock was taken
    (root / LOCK_FILE).write_text(json.dumps(lock))
    assert lock_owner(root) is None
    del again
    other = tmp_path / "other"
    Run(other, {"a": 1}, recipe="test")  # dropped at once: its lock goes with it
    assert not (other / LOCK_FILE).exists()


def test_status_of_a_finished_run_shows_results_and_the_evaluation_table(tmp_path, capsys, embedded_model_dir):
    root = tmp_path / "run"
    run = Run(root, {"a": 1}, recipe="spa")
    run.stage("eval/initial", lambda: {"win_rate": 42.4954, "n_total": 48, "annotator": "reward", "nested": {"x": 1}})
    run.record_model("final", embedded_model_dir)
    (root / "eval").mkdir(exist_ok=True)
    (root / "eval" / "summary.md").write_text("# SPA run\n\n| model | win rate |\n|---|---:|\n| initial | 42.50 |\n")
    assert main(["status", str(root)]) == 0
    assert "state: running now (pid " in capsys.readouterr().out  # this process still holds it
    del run  # the recipe returned
    assert main(["status", str(root)]) == 0
    out = capsys.readouterr().out
    assert "state: finished" in out
    assert "started by: " in out and "not the selfalign CLI" in out  # made from Python (here: pytest's argv)
    assert "win_rate=42.5 n_total=48 annotator=reward" in out and "nested" not in out
    assert f"final model: {embedded_model_dir.resolve()}" in out and "| initial | 42.50 |" in out
    (root / "eval" / "summary.json").write_text(json.dumps({"initial": {"win_rate": 42.5, "n_total": 48}}))
    assert main(["status", str(root), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["stages"]["eval/initial"]["result"]["nested"] == {"x": 1}
    assert data["evaluation"] == {"initial": {"win_rate": 42.5, "n_total": 48}}  # the table's rows
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["command"] = ["/usr/bin/selfalign", "run", "spa", "spa-smoke", "--run-dir", "runs/x"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    main(["status", str(root)])
    assert "command: selfalign run spa spa-smoke --run-dir runs/x  (in " in capsys.readouterr().out
    assert main(["status", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"selfalign: error: {tmp_path}: not a run folder (no manifest.json)"


def test_an_output_file_takes_one_writer_at_a_time(tmp_path):
    out = tmp_path / "answers.jsonl"
    hold = ("import sys, time\nfrom selfalign.runs import ResumableJsonl\n"
            "sink = ResumableJsonl(sys.argv[1], key=lambda r: r['k'])\nsink.append([{'k': 1}])\n"
            "print('ready', flush=True)\ntime.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True, env=CHILD_ENV)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(SelfalignError, match=rf"^{out}: another selfalign process is working on it now \(pid "
                                                 rf"{holder.pid},"):
            ResumableJsonl(out, key=lambda r: r["k"])
    finally:
        holder.kill()
        holder.wait()
    with ResumableJsonl(out, key=lambda r: r["k"]) as sink:  # the killed writer's lock is no one's: resumed
        assert sink.done == {1}
        again = ResumableJsonl(out, key=lambda r: r["k"])  # this process may open it twice (one writer)
        again.close()
    assert not (tmp_path / ".answers.jsonl.lock").exists()  # closed: the lock went with it


def test_a_run_folder_must_be_new_empty_or_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("my project")
    with pytest.raises(SelfalignError, match="a folder that holds other files and no run"):
        Run(tmp_path, {"a": 1}, recipe="test")
    with pytest.raises(SelfalignError, match="not a folder"):
        Run(tmp_path / "notes.txt", {"a": 1}, recipe="test")
    assert not (tmp_path / "manifest.json").exists()
    (tmp_path / "empty").mkdir()
    Run(tmp_path / "empty", {"a": 1}, recipe="test")


def test_a_resumed_stages_time_adds_up_its_attempts(tmp_path, capsys):
    root = tmp_path / "run"
    run = Run(root, {"a": 1}, recipe="test")

    def slow(error):
        time.sleep(0.3)
        raise error

    with pytest.raises(ValueError):
        run.stage("train", lambda: slow(ValueError("out of memory")))
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C: no error recorded, but its time is
        run.stage("train", lambda: slow(KeyboardInterrupt()))
    assert run.manifest["stages"]["train"]["status"] == "running" and "error" not in run.manifest["stages"]["train"]
    run.stage("train", lambda: time.sleep(0.3) or {"loss": 1.0})
    train = run.manifest["stages"]["train"]
    assert train["status"] == "done" and train["attempts"] == 3 and train["seconds"] >= 0.9, train
    run.stage("eval", lambda: {"win_rate": 50.0})
    assert run.manifest["stages"]["eval"]["attempts"] == 1
    del run
    assert main(["status", str(root)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"train  done +\d+\.\d s \(3 tries\)  loss=1\n", out), out
    assert re.search(r"eval   done {15}0\.0 s  win_rate=50\n", out), out


def test_status_names_stopped_stages_skips_and_damaged_manifests(tmp_path, capsys):
    root = tmp_path / "run"
    run = Run(root, {"a": 1}, recipe="srt")
    run.stage("stage2/train", lambda: {"skipped": "no score-improving refinement: M_final = M_self", "pairs": 0})
    # a training stage killed after its third step, with a checkpoint at the second (SRT's stage1 trains into
    # stage1/train; SPA's round1/train into its own name)
    run.manifest["stages"]["stage1"] = {"status": "running"}
    (root / "stage1" / "train" / "checkpoints" / "step-2").mkdir(parents=True)
    (root / "stage1" / "train" / "log.jsonl").write_text("".join(json.dumps({"step": i, "loss": 1.0}) + "\n"
                                                               for i in (1, 2, 3)) + '{"step": 4, "lo')
    run.manifest["stages"]["round1/train"] = {"status": "running"}
    (root / "round1" / "train").mkdir(parents=True)
    (root / "round1" / "train" / "log.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    # SEFT's reviser/adaptive trains into reviser/train; one killed after its model was saved trains nothing more
    run.manifest["stages"]["reviser/adaptive"] = {"status": "running"}
    (root / "reviser" / "train").mkdir(parents=True)
    (root / "reviser" / "train" / "log.jsonl").write_text(json.dumps({"step": 6}) + "\n")
    (root / "reviser" / "train" / "done.json").write_text("{}")
    run.manifest["stages"]["eval/stage2"] = {"status": "running"}
    run.save()
    del run  # the process that ran it is gone (here: the Run was dropped)
    assert main(["status", str(root)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"stage1 +stopped +\S+  stopped after step 3; resumes from its checkpoint at step 2\n", out), out
    assert re.search(r"round1/train +stopped +\S+  stopped after step 1; no checkpoint: resumes from step 0\n", out)
    assert re.search(r"reviser/adaptive +stopped +\S+  stopped after its last step \(6\), with its model saved: the "
                     r"resumed stage trains nothing\n", out), out
    assert re.search(r"stage2/train +done", out) and "skipped: no score-improving refinement: M_final = M_self " \
        "pairs=0" in out
    assert re.search(r"eval/stage2 +stopped", out) and "state: stopped during stage eval/stage2" in out
    (root / "manifest.json").write_text("[]")
    assert main(["status", str(root)]) == 2
    assert "manifest.json: not a readable run manifest" in capsys.readouterr().err
    assert main(["status", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip().endswith("missing: no such folder")


def test_generate_refuses_an_output_another_process_writes_before_loading_a_model(tmp_path, prompts_file, capsys):
    out = tmp_path / "answers.jsonl"
    hold = ("import sys, time\nfrom selfalign.runs import ResumableJsonl\n"
            "sink = ResumableJsonl(sys.argv[1], key=lambda r: r['k'])\nprint('ready', flush=True)\ntime.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True, env=CHILD_ENV)
    try:
        assert holder.stdout.readline().strip() == "ready"
        # a model that does not exist: the refusal must come first, or this would fail on the model instead
        assert main(["generate", "--prompts", str(prompts_file), "--out", str(out), "--model", "no-such-model"]) == 2
        assert f"{out}: another selfalign process is working on it now (pid {holder.pid}," in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()


def test_a_damaged_manifest_is_a_one_line_error_on_resume(tmp_path):
    from selfalign.runs import stage_done

    root = tmp_path / "run"
    Run(root, {"a": 1}, recipe="test").stage("data", lambda: None)
    assert stage_done(root, "data")
    (root / "manifest.json").write_text('{"recipe": "test", "stages": ')
    assert not stage_done(root, "data")
    with pytest.raises(SelfalignError, match=r"manifest.json: not a readable run manifest \(Expecting value"):
        Run(root, {"a": 1}, recipe="test")


RACE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from selfalign.errors import SelfalignError
    from selfalign.runs import ResumableJsonl, Run
    kind, target, go, done = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
    print("waiting", flush=True)
    while not go.exists():
        time.sleep(0.001)
    try:
        held = Run(target, {"a": 1}, recipe="test") if kind == "run" else ResumableJsonl(target, key=lambda r: r["k"])
        print("claimed", flush=True)
    except SelfalignError:
        print("refused", flush=True)
    while not done.exists():  # hold the lock until every process has tried
        time.sleep(0.01)
""")


@pytest.mark.parametrize("kind", ["run", "jsonl"])
def test_processes_started_in_the_same_instant_get_one_claim(tmp_path, kind):
    target = tmp_path / ("run" if kind == "run" else "answers.jsonl")
    go, done = tmp_path / "go", tmp_path / "done"
    procs = [subprocess.Popen([sys.executable, "-c", RACE, kind, str(target), str(go), str(done)],
                              stdout=subprocess.PIPE, text=True, env=CHILD_ENV) for _ in range(4)]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["waiting"] * 4  # all imported, polling
        go.touch()  # released together: each checks the lock, finds it free, and claims, in the same milliseconds
        outcomes = sorted(p.stdout.readline().strip() for p in procs)
    finally:
        done.touch()
        for p in procs:
            p.wait(timeout=60)
    assert outcomes == ["claimed", "refused", "refused", "refused"]
    assert not (tmp_path / ".selfalign-claim").exists() and not (target / ".selfalign-claim").exists()


def test_the_claim_never_waits_on_a_flock_someone_else_holds_on_the_folder(tmp_path, monkeypatch):
    import fcntl

    import selfalign.runs as runs

    root = tmp_path / "run"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY)  # `flock DIR selfalign run ...`: the wrapper holds the folder itself
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        run = Run(root, {"a": 1}, recipe="test")  # the claim flocks its own guard file, not the folder
        del run
        assert not (root / runs.CLAIM_GUARD).exists()  # removed once the claim is made: nothing left behind
    finally:
        os.close(fd)
    monkeypatch.setattr(runs, "CLAIM_WAIT_SECONDS", 0.3)
    hold = ("import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('ready', flush=True)\ntime.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(root / runs.CLAIM_GUARD)], stdout=subprocess.PIPE,
                              text=True, env=CHILD_ENV)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(SelfalignError, match=r"another process has held .*\.selfalign-claim for 0 s"):
            Run(root, {"a": 1}, recipe="test")  # a guard held past the deadline: an error, not a hang
    finally:
        holder.kill()
        holder.wait()


def test_a_forked_child_and_a_second_holder_leave_the_lock_to_its_holders(tmp_path):
    root = tmp_path / "run"
    run = Run(root, {"a": 1}, recipe="test")
    pid = os.fork()
    if pid == 0:  # the child inherits the table of held locks and their finalizers, and exits normally
        os._exit(0 if _exit_normally() else 1)
    os.waitpid(pid, 0)
    assert lock_owner(root)["pid"] == os.getpid()  # the child's exit did not release the parent's lock
    (root / LOCK_FILE).unlink()  # removed by hand while the run works
    again = Run(root, {"a": 1}, recipe="test")  # re-claims: the file comes back
    del again
    assert lock_owner(root)["pid"] == os.getpid()  # the first holder still works on it
    del run
    assert lock_owner(root) is None and not (root / LOCK_FILE).exists()


def _exit_normally() -> bool:
    """What a normal exit does to the finalizers a forked child inherited (run here, before os._exit skips pytest's
    own teardown in the child)."""
    import weakref

    weakref.finalize._exitfunc()  # the atexit hook: runs every live finalizer, as a child's normal exit would
    return True


def test_a_refused_run_releases_its_claim_and_a_folder_killed_as_it_began_is_a_runs_to_start(tmp_path):
    root = tmp_path / "run"
    first = Run(root, {"a": 1}, recipe="test")
    del first
    with pytest.raises(SelfalignError, match="config differs"):
        Run(root, {"a": 2}, recipe="test")
    assert lock_owner(root) is None  # released at once, not when the traceback is freed
    started = tmp_path / "started"
    started.mkdir()
    for name in (LOCK_FILE, ".selfalign-claim", "manifest.json.tmp"):  # killed before its first manifest was saved
        (started / name).write_text("{")
    Run(started, {"a": 1}, recipe="test")
