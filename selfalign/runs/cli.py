"""`selfalign status DIR`: where a run folder stands: each stage's state, time and result, whether a process is
running it now, and its evaluation table."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from selfalign.errors import SelfalignError


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.2f} h"


def brief_result(result, width: int) -> str:
    """A stage's result on one line: its top-level numbers and short strings (the rest: --json)."""
    if not isinstance(result, dict):
        text = "" if result is None else json.dumps(result, default=str)
    else:
        parts = []
        for k, v in result.items():
            if k == "skipped":  # a stage that passed its model through: the reason comes first, whole
                parts.insert(0, f"skipped: {v}")
            elif isinstance(v, float):
                parts.append(f"{k}={v:.4g}")
            elif isinstance(v, (int, str)) and not isinstance(v, bool) and len(str(v)) <= 40:
                parts.append(f"{k}={v}")
            elif isinstance(v, list) and len(v) <= 8 and all(isinstance(x, (int, float)) for x in v):
                parts.append(f"{k}={v}")
        text = " ".join(parts)
    return text if len(text) <= width else text[:width - 3] + "..."


def _training_progress(root: Path, stage: str) -> str | None:
    """For a stage stopped mid-training: its last logged step and the checkpoint it resumes from. A training stage
    writes its log into the folder of its name (`round1/train`), that folder's `train/` (`stage1` trains into
    `stage1/train`) or its parent's (SEFT's `reviser/adaptive` into `reviser/train`)."""
    from selfalign.training.checkpoint import progress

    for folder in (root / stage, root / stage / "train", (root / stage).parent / "train"):
        said = progress(folder)
        if said:
            return said
    return None


def shown_command(manifest: dict) -> tuple[str, bool]:
    """The command that started a run, as a user would type it to resume (`selfalign run ...`, whether it was
    started as `selfalign`, `python -m selfalign.cli` or `python .../cli.py`), and whether it was the selfalign CLI
    (else a script's or a notebook's own command line, as it was)."""
    command = [str(c) for c in manifest.get("command") or []]
    if len(command) > 1 and Path(command[0]).name in ("selfalign", "cli.py", "__main__.py") and command[1] == "run":
        return shlex.join(["selfalign"] + command[1:]), True
    return shlex.join(command), False


def stage_time(stage: dict) -> str:
    """A stage's time over all its attempts, with their number when it took more than one."""
    took = format_duration(stage.get("seconds"))
    return took if stage.get("attempts", 1) <= 1 else f"{took} ({stage['attempts']} tries)"


def stage_statuses(manifest: dict, owner: dict | None) -> dict[str, str]:
    """Each stage's status as it stands: a stage recorded "running" with no live process running the folder was
    stopped (killed, or Ctrl-C); "failed" stages recorded their error."""
    return {name: "stopped" if s.get("status") == "running" and owner is None else s.get("status", "?")
            for name, s in manifest["stages"].items()}


def run_state(manifest: dict, owner: dict | None, root: Path | None = None) -> str:
    statuses = stage_statuses(manifest, owner)
    running = [name for name, s in statuses.items() if s == "running"]
    if owner is not None:
        return f"running now (pid {owner['pid']}" + (f", stage {running[-1]})" if running else ")")
    failed = [name for name, s in statuses.items() if s == "failed"]
    if failed:
        error = manifest["stages"][failed[-1]].get("error", "no error recorded")
        return f"failed in stage {failed[-1]} ({error}); fix the cause, then the same command resumes it"
    stopped = [name for name, s in statuses.items() if s == "stopped"]
    if stopped:
        return f"stopped during stage {stopped[-1]} (killed or interrupted): the same command resumes it"
    if "final" in manifest.get("models", {}):
        path = manifest["models"]["final"].get("path")
        if root is not None and not _model_present(root, "final", path):
            return f"finished, but its final model {path} is missing (moved or deleted since)"
        return "finished"
    return "stopped between stages (killed or interrupted): the same command resumes it"


def _model_present(root: Path, role: str, recorded: str | None) -> bool:
    """DIR/<role> (the run's own link, which survives moving the run folder), else the path recorded when it was
    made."""
    return (root / role).exists() or not recorded or Path(recorded).exists()


def cmd_status(args) -> int:
    from selfalign.runs import lock_owner, read_manifest

    root = Path(args.run_dir)
    path = root / "manifest.json"
    if root.exists() and not root.is_dir():
        raise SelfalignError(f"{root}: a file, not a run folder")
    if not root.is_dir():
        raise SelfalignError(f"{root}: no such folder")
    if not path.exists():
        raise SelfalignError(f"{root}: not a run folder (no manifest.json)")
    manifest = read_manifest(path)
    owner = lock_owner(root)
    state = run_state(manifest, owner, root)
    statuses = stage_statuses(manifest, owner)
    if args.json:  # the same statuses as the table below, with the full results
        stages = {name: dict(s, status=statuses[name]) for name, s in manifest["stages"].items()}
        from selfalign.evaluation.stage import read_summary

        evaluation, evaluation_error = {}, None
        try:  # the evaluation table's rows, as eval/summary.md shows them
            evaluation = read_summary(root / "eval")
        except SelfalignError as e:
            evaluation_error = str(e)
        print(json.dumps({"run_dir": str(root), "recipe": manifest.get("recipe"), "state": state, "owner": owner,
                          "stages": stages, "models": manifest.get("models", {}), "evaluation": evaluation,
                          **({"evaluation_error": evaluation_error} if evaluation_error else {})}, indent=2))
        return 0
    resumed = len(manifest.get("resumed_at", []))
    print(f"{root}: {manifest.get('recipe')} run, started {manifest.get('created_at')}"
          + (f", resumed {resumed}x" if resumed else ""))
    print(f"state: {state}")
    command, by_cli = shown_command(manifest)
    if by_cli:
        print(f"command: {command}  (in {manifest.get('cwd')})")
    elif command:  # started from Python (a script or a notebook): its own command line, as it was
        print(f"started by: {command}  (in {manifest.get('cwd')}; not the selfalign CLI: resume it the way it was "
              "started)")
    rows = [(name, statuses[name], stage_time(s), s.get("result") or s.get("error")) for name, s in
            manifest["stages"].items()]
    width = max([len("stage")] + [len(r[0]) for r in rows])
    time_width = max([9] + [len(r[2]) for r in rows])
    print(f"\n{'stage':<{width}}  {'status':<8} {'time':>{time_width}}  result")
    for name, status, took, result in rows:
        said = brief_result(result, 106 - width - time_width)
        if not said and status == "stopped":
            said = _training_progress(root, name) or ""
        print(f"{name:<{width}}  {status:<8} {took:>{time_width}}  {said}")
    for role, m in manifest.get("models", {}).items():
        missing = "" if _model_present(root, role, m.get("path")) else "  (missing: moved or deleted since)"
        print(f"\n{role} model: {m.get('path')}{missing}")
    summary = root / "eval" / "summary.md"
    if summary.exists():
        print("\n" + summary.read_text().rstrip())
    return 0


def cmd_report(args) -> int:
    from selfalign.runs.report import write_report

    print(write_report(args.run_dir, args.out))
    return 0


def register(sub) -> None:
    p = sub.add_parser("status", help="show where a run folder stands: stages, times, results, evaluation table",
                       description="Show a run folder's state: each stage's status, time and result summary, whether "
                       "a selfalign process is running it now (else: finished, or stopped and resumable by the same "
                       "command), its models and its evaluation table (DIR/eval/summary.md).")
    p.add_argument("run_dir", metavar="DIR", help="a run folder (made by `selfalign run`)")
    p.add_argument("--json", action="store_true", help="print the stages (with full results) as JSON")
    p.set_defaults(fn=cmd_status)
    p = sub.add_parser("report", help="write a run folder's HTML report: evaluations, training curves, stages",
                       description="Write one self-contained HTML page (inline charts, opens offline) for a run "
                       "folder: each evaluation's win rate with its 95% interval and its paired difference from the "
                       "starting model, each training stage's loss (and DPO's chosen / rejected rewards, margin and "
                       "accuracy, or ORPO's chosen NLL, log odds ratio and accuracy) per step, every stage's status, "
                       "time and result, and the config. Prints its path.")
    p.add_argument("run_dir", metavar="DIR", help="a run folder (made by `selfalign run`)")
    p.add_argument("--out", default=None, help="the HTML file to write (default DIR/report.html)")
    p.set_defaults(fn=cmd_report)
