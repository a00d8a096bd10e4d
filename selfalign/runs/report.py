"""`selfalign report DIR`: one self-contained HTML page per run folder: did the model get better (each evaluation's
win rate with its 95% interval and its paired difference from the starting model), how training went (loss; DPO's
chosen and rejected rewards, their margin and accuracy; ORPO's chosen NLL, log odds ratio and accuracy; per step),
and every stage's status, time and result.

Written by hand, as inline SVG in one HTML file: it opens offline, can be mailed or attached to a paper review, and
needs no plotting library (matplotlib would be a dependency for one page; wandb / tensorboard need a service or a
server). It reads only the run folder's own files: manifest.json, eval/summary.json and each training stage's
log.jsonl.
"""

from __future__ import annotations

import html
import json
import math
import os
import sys
from pathlib import Path

from selfalign.errors import SelfalignError

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")
DPO_NOTE = ("DPO widens the margin between the chosen and the rejected answer's implicit reward. Both rewards often "
            "fall together, the chosen one more slowly: the policy moves away from the reference on both answers. A "
            "falling chosen reward is no failure by itself while the margin and the accuracy grow.")


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _num(value, digits: int = 2) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], width: int = 460, height: int = 220,
               x_label: str = "step") -> str:
    """An SVG line chart of named (x, y) series, with its axes' ranges, a zero line when 0 is in range, a legend."""
    points = [p for s in series.values() for p in s if p[1] is not None and math.isfinite(p[1])]
    if not points:
        return ""
    left, right, bottom = 56, 12, 34
    top = 40 if len(series) > 1 else 26  # room for the legend, above the plot
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5

    def sx(x):
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y):
        return top + (y1 - y) / (y1 - y0) * (height - top - bottom)

    out = [f'<svg width="{width}" height="{height}" role="img" aria-label="{_esc(title)}">',
           f'<text x="{left}" y="16" class="t">{_esc(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" class="f"/>']
    if y0 < 0 < y1:
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(0):.1f}" y2="{sy(0):.1f}" class="z"/>')
    for y in (y0, y1):
        out.append(f'<text x="{left - 4}" y="{sy(y) + 4:.1f}" class="a" text-anchor="end">{y:.3g}</text>')
    for x in (x0, x1):
        out.append(f'<text x="{sx(x):.1f}" y="{height - bottom + 14}" class="a" text-anchor="middle">{x:g}</text>')
    out.append(f'<text x="{(left + width - right) / 2:.0f}" y="{height - 4}" class="a" text-anchor="middle">'
               f'{_esc(x_label)}</text>')
    for k, (name, pts) in enumerate(series.items()):
        color = COLORS[k % len(COLORS)]
        good = [(x, y) for x, y in pts if y is not None and math.isfinite(y)]
        if len(good) == 1:
            out.append(f'<circle cx="{sx(good[0][0]):.1f}" cy="{sy(good[0][1]):.1f}" r="3" fill="{color}"/>')
        elif good:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in good)
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        if len(series) > 1:
            lx = left + 110 * k
            out.append(f'<rect x="{lx}" y="26" width="10" height="3" fill="{color}"/>'
                       f'<text x="{lx + 14}" y="31" class="a">{_esc(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def interval_chart(title: str, rows: list[tuple[str, float, float]], zero: bool = False, width: int = 460) -> str:
    """An SVG dot-and-whisker chart: one row per (label, value, half-width of its interval)."""
    rows = [r for r in rows if r[1] is not None and r[2] is not None]
    if not rows:
        return ""
    left, right, top, step = 150, 56, 26, 22  # right: room for the value printed after each whisker
    height = top + step * len(rows) + 24
    lo = min(v - h for _, v, h in rows + ([("", 0.0, 0.0)] if zero else []))
    hi = max(v + h for _, v, h in rows + ([("", 0.0, 0.0)] if zero else []))
    if hi == lo:
        lo, hi = lo - 1, hi + 1

    def sx(x):
        return left + (x - lo) / (hi - lo) * (width - left - right)

    out = [f'<svg width="{width}" height="{height}" role="img" aria-label="{_esc(title)}">',
           f'<text x="8" y="16" class="t">{_esc(title)}</text>']
    if zero:
        out.append(f'<line x1="{sx(0):.1f}" x2="{sx(0):.1f}" y1="{top}" y2="{height - 20}" class="z"/>')
    for i, (label, value, half) in enumerate(rows):
        y = top + step * i + step / 2
        shown = f"{value:+.2f}" if zero else f"{value:.2f}"
        out.append(f'<text x="{left - 8}" y="{y + 4:.1f}" class="a" text-anchor="end">{_esc(label)}</text>'
                   f'<line x1="{sx(value - half):.1f}" x2="{sx(value + half):.1f}" y1="{y:.1f}" y2="{y:.1f}" '
                   f'stroke="{COLORS[0]}" stroke-width="2"/>'
                   f'<circle cx="{sx(value):.1f}" cy="{y:.1f}" r="3.5" fill="{COLORS[0]}"/>'
                   f'<text x="{sx(value + half) + 4:.1f}" y="{y + 4:.1f}" class="a">{shown}</text>')
    for x in (lo, hi):
        out.append(f'<text x="{sx(x):.1f}" y="{height - 6}" class="a" text-anchor="middle">{x:.3g}</text>')
    out.append("</svg>")
    return "".join(out)


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _evaluation(summary: dict, config: dict, root: Path) -> str:
    if not summary:
        if not isinstance(config.get("eval"), dict):  # sft, dpo, orpo: no win-rate stage
            out = f"{root.name}-alpaca"
            return (f"<p>This recipe has no win-rate evaluation (dpo and orpo score held-out pairs in their eval "
                    f"stage, below). For a win rate, run <code>selfalign eval alpaca --model {_esc(root / 'final')} "
                    f"--out {_esc(root.parent / out)}</code>, and the same on its starting model "
                    f"(<code>{_esc(config.get('model'))}</code>) into another --out, then <code>selfalign eval "
                    f"compare</code> the two.</p>")
        return "<p>No evaluation yet (the recipe's <code>eval.instructions</code> is 0, or none has finished).</p>"
    first = next(iter(summary))
    vs_key = f"vs_{first}"
    rows = []
    for label, m in summary.items():
        vs = m.get(vs_key)
        rows.append([label, _num(m.get("win_rate")), _num(m.get("standard_error")),
                     "" if label == first else "n/a" if not vs else
                     f"{vs['difference']:+.2f} ± {vs['standard_error']:.2f}"
                     + ("" if vs.get("p_value") is None else f" (p {vs['p_value']:.2g})"),
                     _num(m.get("length_controlled_winrate")), m.get("n_total"), m.get("n_unparsed"),
                     m.get("avg_length"), m.get("annotator")])
    table = _table(["model", "win rate", "s.e.", f"Δ vs {first} (paired)", "LC win rate", "n", "unparsed",
                    "avg length", "judge"], rows)
    win = interval_chart("win rate vs the reference, 95% interval",
                         [(label, m.get("win_rate"), None if m.get("standard_error") is None
                           else 1.96 * m["standard_error"]) for label, m in summary.items()])
    delta = interval_chart(f"paired difference from {first}, 95% interval",
                           [(label, m[vs_key]["difference"], 1.96 * m[vs_key]["standard_error"])
                            for label, m in summary.items() if m.get(vs_key)], zero=True)
    note = (f"<p class='n'>Δ: the row's win rate minus {_esc(first)}'s over the instructions both had judged, "
            "paired by instruction (<code>selfalign eval compare</code>). An interval that holds 0 shows no change; "
            "the rows' own intervals overlap even when it does not, because every row shares the draw of "
            "instructions.</p>")
    return table + f"<div class='c'>{win}{delta}</div>" + note


def _training(root: Path) -> str:
    # every training stage writes <its folder>/log.jsonl (SEFT's reviser stages nest theirs deeper); in the order
    # they trained
    found = sorted(root.rglob("log.jsonl"), key=lambda p: p.stat().st_mtime)
    logs = [(str(p.parent.relative_to(root)), p) for p in found]
    if not logs:
        return "<p>No training log yet.</p>"
    parts = []
    for name, path in logs:
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a torn last line of a killed run
                continue
        if not rows:
            continue

        def series(key: str) -> list[tuple[float, float]]:
            return [(r["step"], r.get(key)) for r in rows if isinstance(r.get(key), (int, float))]

        charts = [line_chart("loss", {"loss": series("loss")})]
        orpo = "log_odds_ratio" in rows[-1]  # ORPO's rewards are lambda x mean log-probs: no reference to drift from
        dpo = "rewards/margins" in rows[-1] and not orpo
        if orpo:
            charts.append(line_chart("chosen NLL, log odds ratio", {"NLL": series("nll"),
                                                                     "log odds ratio": series("log_odds_ratio")}))
            charts.append(line_chart("accuracy (chosen's mean log-prob higher)",
                                     {"accuracy": series("rewards/accuracy")}))
        if dpo:
            charts.append(line_chart("implicit rewards", {"chosen": series("rewards/chosen"),
                                                          "rejected": series("rewards/rejected"),
                                                          "margin": series("rewards/margins")}))
            charts.append(line_chart("reward accuracy", {"accuracy": series("rewards/accuracy")}))
        charts.append(line_chart("learning rate", {"lr": series("lr")}))
        last = rows[-1]
        steps = f"{len(rows)} step{'s' * (len(rows) != 1)}"
        parts.append(f"<h3>{_esc(name)}</h3><p class='n'>{steps}; last: loss {_num(last.get('loss'), 4)}"
                     + (f", margin {_num(last.get('rewards/margins'), 3)}, accuracy "
                        f"{_num(last.get('rewards/accuracy'), 3)}" if dpo else "")
                     + (f", log odds ratio {_num(last.get('log_odds_ratio'), 3)}, accuracy "
                        f"{_num(last.get('rewards/accuracy'), 3)}" if orpo else "") + "</p>"
                     + f"<div class='c'>{''.join(charts)}</div>" + (f"<p class='n'>{_esc(DPO_NOTE)}</p>" if dpo
                                                                       else ""))
    return "".join(parts) or "<p>No training log yet.</p>"


CSS = ("body{font-family:system-ui,sans-serif;margin:24px;max-width:1000px;color:#222}"
       "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;"
       "text-align:left;vertical-align:top}th{background:#f3f3f3}.c{display:flex;flex-wrap:wrap;gap:8px}"
       "svg{background:#fff}.t{font-size:13px;font-weight:600}.a{font-size:11px;fill:#444}"
       ".f{fill:none;stroke:#ddd}.z{stroke:#999;stroke-dasharray:3 3}.n{font-size:13px;color:#555}"
       "code{background:#f3f3f3;padding:0 3px}")


def write_report(root: str | Path, out: str | Path | None = None) -> Path:
    """Write run folder `root`'s report (default DIR/report.html) and return its path."""
    from selfalign.evaluation.stage import read_summary
    from selfalign.runs import lock_owner, read_manifest
    from selfalign.runs.cli import brief_result, run_state, shown_command, stage_time, stage_statuses

    root = Path(root)
    if not (root / "manifest.json").is_file():
        raise SelfalignError(f"{root}: not a run folder (no manifest.json)")
    path = Path(out) if out is not None else root / "report.html"
    if path.is_symlink():  # the link's target is the report; os.replace would put a file in the link's place
        path = path.resolve()
    replaced = _check_writable(path)
    manifest = read_manifest(root / "manifest.json")
    try:
        evaluation = _evaluation(read_summary(root / "eval"), manifest.get("config") or {}, root)
    except SelfalignError as e:  # a damaged summary must not cost the rest of the page
        evaluation = f"<p>{_esc(e)}</p>"
    owner = lock_owner(root)
    statuses = stage_statuses(manifest, owner)
    stages = [[name, statuses[name], stage_time(s),
               brief_result(s.get("result") or s.get("error"), 400)] for name, s in manifest["stages"].items()]
    command, _ = shown_command(manifest)
    models = "".join(f"<li>{_esc(role)}: <code>{_esc(m.get('path'))}</code></li>"
                     for role, m in manifest.get("models", {}).items())
    versions = ", ".join(f"{k} {v}" for k, v in (manifest.get("versions") or {}).items())
    title = f"selfalign {_esc(manifest.get('recipe'))} run {_esc(root.name)}"
    page = ["<!doctype html><html><head><meta charset='utf-8'>", f"<title>{title}</title><style>{CSS}</style>"
            "</head><body>",
            f"<h1>{_esc(manifest.get('recipe'))} run <code>{_esc(root.name)}</code></h1>",
            f"<p>state: {_esc(run_state(manifest, owner, root))}<br>started {_esc(manifest.get('created_at'))}"
            f" in <code>{_esc(manifest.get('cwd'))}</code><br>command: <code>{_esc(command)}</code>"
            + (f"<br>versions: {_esc(versions)}" if versions else "") + "</p>",
            f"<ul>{models}</ul>" if models else "",
            "<h2>Evaluation</h2>", evaluation,
            "<h2>Training</h2>", _training(root),
            "<h2>Stages</h2>", _table(["stage", "status", "time", "result"], stages),
            "<details><summary>config</summary><pre>"
            f"{_esc(json.dumps(manifest.get('config'), indent=2, default=str))}</pre></details>",
            "</body></html>"]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text("\n".join(page), encoding="utf-8")
        os.replace(tmp, path)  # a reader (or a kill) never sees half a page
    except OSError as e:  # a folder this user cannot write, a full disk
        tmp.unlink(missing_ok=True)
        raise SelfalignError(f"{path}: cannot write the report ({e.strerror or e})") from None
    if replaced and replaced != title.encode():
        print(f"selfalign: note: {path} held the report of another run ({replaced.decode(errors='replace')}); "
              f"replaced", file=sys.stderr)
    return path


def _check_writable(path: Path) -> bytes | None:
    """--out must be a new file or an earlier report: never a run's manifest, a model, or a user's notes. Its folder
    is made if missing. Returns the title of the report it replaces, if any."""
    if path.is_dir():
        raise SelfalignError(f"{path}: is a folder; give an HTML file path for --out")
    title = None
    if path.exists():
        with open(path, "rb") as f:
            head = f.read(512)
        if not (head.startswith(b"<!doctype html>") and b"<title>selfalign " in head):
            raise SelfalignError(f"{path}: exists and is not a selfalign report; nothing was changed: give a new "
                                 f"file for --out, or remove this one")
        title = head.split(b"<title>", 1)[1].split(b"</title>", 1)[0]
    blocking = next((p for p in path.parents if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise SelfalignError(f"{path}: cannot make its folder: {blocking} is a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a place this user cannot write
        raise SelfalignError(f"{path}: cannot create its folder ({e.strerror})") from None
    return title
