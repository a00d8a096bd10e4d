"""AlpacaEval 2.0 win rate and length-controlled (LC) win rate, computed offline.

alpaca_eval's own LC (`src/alpaca_eval/metrics/glm_winrate.py`, GLM "length_controlled_v1") downloads two files from
its hub at run time, `instruction_difficulty.csv` and `df_gamed.csv`. This module rebuilds what they provide from the
real data in shared/data/alpaca_eval and reimplements the method.

The method (Dubois et al. 2024, "Length-Controlled AlpacaEval"), as alpaca_eval implements it:

* A preference is in [1, 2] (2: the model's `output_2` beats the baseline's `output_1`); a legacy 0 is a tie (1.5).
  p = preference - 1 is a soft label.
* For one model, a logistic GLM without intercept on three features,
  `np.tanh(std_delta_len) + instruction_difficulty + not_gamed_baseline.astype(float) - 1`:
  std_delta_len = (len(baseline output) - len(model output)) / its standard deviation over the model's annotations
  (characters, not centred); instruction_difficulty is a fixed number per instruction; not_gamed_baseline is 1 on the
  model's rows. Soft labels are fitted by entering every row twice (label 1 weighted p, label 0 weighted 1 - p). The
  penalty is L1 (liblinear), C is picked from logspace(-4, 4, 10) by 5-fold cross-validation with both copies of a row
  in the same fold, scored by the soft log loss.
* "length_controlled_v1" adds the annotations of two *gamed baselines* (the baseline prompted to be verbose and to
  be concise, `gpt4_1106_preview_verbose` / `_concise`, judged against `gpt4_1106_preview`) with not_gamed_baseline =
  0 and total sample weight lambda = 0.2 (0.1 each). Those rows share the length slope and difficulty weight with the
  model, so they hold the length slope near the one measured on pairs of equal quality. "length_controlled_noreg"
  leaves them out.
* LC = 100 x mean prediction with std_delta_len = 0; lc_standard_error = 100 x SEM of those predictions.
* instruction_difficulty comes from one joint fit over many models (alpaca_eval `notebooks/instruction_difficulty.
  ipynb`): `C(model):np.tanh(std_delta_len) + C(model) + C(index) + not_gamed_baseline - 1`, same soft-label L1 fit;
  the per-instruction coefficients, with the first instruction as the 0 reference, are the difficulty.

What is rebuilt, and how (see `build_lc_model`; the result ships in `selfalign/resources/instruction_difficulty.*`):

1. **Difficulty**: the joint fit above on `preferences_by_model.csv` (52 distinct models' real GPT-4-Turbo
   preferences; two models are listed twice in the file), not on alpaca_eval's early-2024 model set. Then one affine
   map, d -> alpha + beta d, puts it on the scale of alpaca_eval's published per-model weights
   (`lc_glm_weights_baseline_gpt4_1106_preview.csv`): alpha and beta minimise the squared error between the published
   LC and the LC those published weights give with our difficulty, over the leaderboard models (mean error 1.49 ->
   0.22 points). A per-model refit does not depend on this map (an offset and a scale are absorbed by the model's own
   intercept and difficulty weight); it only matters for step 2 and for reusing the published weights.
2. **Gamed-baseline regularisation.** `df_gamed.csv` (the verbose / concise baseline annotations) is not available
   offline. `annotations/gpt4_gamed.json` in the shared data is *not* that file: it is the community entry
   "gpt4_gamed" (GPT-4 answers cut to ~68 characters), which alpaca_eval uses as an adversarial test of the metric,
   never as regularisation data, so it is not used for fitting. In the GLM the missing rows add a loss R(s, b) that
   depends only on the length slope s and the difficulty weight b, the same for every model. Each published weight
   vector minimises (model's data loss + R), so at the published weights the gradient of the model's own data loss is
   -grad R. 50 models have both data here and published weights: we measure that gradient for each and fit a
   quadratic R(s) = h s^2 / 2 - c s by least squares in the slope direction (R^2 0.91). The difficulty direction is
   left free: there about 10 models (FuseChat-*, and models with fewer than 805 annotations, whose published fit
   seems to have used row positions that no longer line up with the instructions) are far off any common quadratic.
   The default GLM, "length_controlled_v1_surrogate", is the maximum a posteriori fit of the model's own rows plus
   this quadratic (no L1, no CV: both are small next to it). Leaving each model out of every fit, it lands 0.67
   points from the published LC on average over the 6 models with full annotations, where the no-regularisation GLM
   is 1.52 off (benchmarks/RESULTS.md); taking gpt4_gamed.json as the gamed data instead would put it 2 to 18 points
   off. `glm="noreg"` runs alpaca_eval's "length_controlled_noreg" procedure (L1 + CV); passing the two
   gamed-baseline annotation sets (`gamed=`, CLI `--gamed FILE --gamed FILE`) runs "length_controlled_v1"'s fitting
   procedure on them: the same formula, lambda, L1 fit, C grid and grouped folds, with the gamed rows first and the
   model's rows after them, as alpaca_eval concatenates them (the row order decides the folds and so can change C).
   That is close to, not the same as, alpaca_eval's number: both GLMs use this rebuilt difficulty, not the hub's
   `instruction_difficulty.csv`; each gamed file's std_delta_len is recomputed from its own lengths (the hub's
   `df_gamed.csv` ships precomputed values); and the gamed files are stacked in the order given (df_gamed.csv's own
   row order is not known here).
3. Instructions are matched to their AlpacaEval index by text (the table stores a SHA-256 prefix of the stripped
   instruction, not the text), so an annotations file in any order, or a subset, works; alpaca_eval itself uses the
   row position.

Annotations without a preference (null / NaN: an annotator that could not read its judge) are dropped as alpaca_eval
drops them: left out of the win rate and its counts (n_total), and of the GLM fit; like alpaca_eval, they still
count in std_delta_len's standard deviation, in avg_length and in the LC prediction (a mean over every annotated
instruction). `n_dropped` reports how many there were (alpaca_eval only logs it).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from selfalign.errors import DataError

BASELINE = "gpt4_1106_preview"
RESOURCES = Path(__file__).resolve().parents[1] / "resources"
DIFFICULTY_CSV = RESOURCES / "instruction_difficulty.csv"

C_GRID = tuple(float(c) for c in np.logspace(-4, 4, 10))  # LogisticRegressionCV's default grid (Cs=10)
N_SPLITS = 5
SEED = 123
REG_LAMBDA = 0.2
FEATURES = ("np.tanh(std_delta_len)", "instruction_difficulty", "not_gamed_baseline.astype(float)")  # alpaca_eval's
GLMS = ("v1_surrogate", "noreg", "v1")
MIN_LC_ROWS = 2 * N_SPLITS
# a fitted weight beyond these is a diverged fit, not a measurement: the GLM weights alpaca_eval publishes for its
# models (lc_glm_weights_baseline_gpt4_1106_preview.csv) keep instruction_difficulty within 0..1.21. The intercept
# may run off legitimately (a model that loses every instruction has LC 0), and the length weight too (noreg's fit
# of a gamed entry is large by design)
DIVERGED = {"instruction_difficulty": 5.0}


# ------------------------------------------------------------------------------------------------ the fitted model
@dataclass
class LCModel:
    """What the LC GLM needs besides the annotations: per-instruction difficulty (by eval_set index), the instruction
    keys, and the quadratic slope prior standing in for the gamed-baseline rows."""

    difficulty: pd.Series
    keys: pd.DataFrame  # columns index, key
    slope_prior: tuple[float, float] | None = None  # (h, c): R(s) = h s^2 / 2 - c s
    meta: dict = field(default_factory=dict)
    source: str = "<in memory>"


def instruction_key(text: str) -> str:
    """Key of an instruction: the first 16 hex digits of SHA-256 of the stripped text."""
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()[:16]


def load_lc_model(path: str | Path | None = None) -> LCModel:
    """Read the difficulty table (`index`, `key`, `instruction_difficulty`) and its sidecar JSON (how it was fitted,
    the slope prior). Default: the table shipped with the package."""
    path = Path(path) if path is not None else DIFFICULTY_CSV
    if not path.is_file():
        raise DataError("instruction difficulty table not found, or not a file (rebuild it: python -m "
                        "selfalign.evaluation.lc fit-difficulty ...)", path=str(path))
    try:
        table = pd.read_csv(path, dtype={"key": str})
    except (ValueError, pd.errors.ParserError) as e:
        raise DataError(f"not a readable CSV ({e})", path=str(path)) from None
    missing = {"index", "key", "instruction_difficulty"} - set(table.columns)
    if missing:
        raise DataError(f"missing columns {sorted(missing)}", path=str(path))
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    prior = meta.get("slope_prior")
    return LCModel(
        difficulty=pd.Series(table["instruction_difficulty"].to_numpy(float), index=table["index"].to_numpy(int)),
        keys=table[["index", "key"]].copy(),
        slope_prior=(float(prior["h"]), float(prior["c"])) if prior else None,
        meta=meta, source=str(path))


def eval_set_keys(eval_set_path: str | Path) -> pd.DataFrame:
    """(index, key) of every instruction in AlpacaEval's eval_set.jsonl."""
    from selfalign.data.io import iter_json_rows

    rows = []
    for line, row in iter_json_rows(eval_set_path):
        if not isinstance(row.get("instruction"), str):
            raise DataError("expected a string", path=str(eval_set_path), line=line, field="instruction")
        rows.append({"index": int(row.get("id", len(rows))), "key": instruction_key(row["instruction"])})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ annotations
def read_annotations(path: str | Path) -> pd.DataFrame:
    """An alpaca_eval annotations file (.json array or .jsonl) as one row per annotation: `line` (where it starts),
    `instruction`, `len_1` (baseline, output_1, in characters), `len_2` (model, output_2), `preference` (in [1, 2]; a
    legacy 0 becomes 1.5; null / NaN stays NaN: no preference, dropped from the win rate as alpaca_eval drops it),
    `generator_1`, `generator_2`. A bad record raises DataError naming file, record and field."""
    from selfalign.data.io import iter_json_rows

    path = str(path)
    rows = [_parse_annotation(rec, path, line) for line, rec in iter_json_rows(path)]
    if not rows:
        raise DataError("no annotations", path=path)
    # `line` as objects: a JSON array's RecordLine (line and record number) would become a bare int64
    return pd.DataFrame(rows).assign(line=pd.Series([r["line"] for r in rows], dtype=object))


def annotation_judge(path: str | Path, frame: pd.DataFrame) -> str | None:
    """The one judge of annotations file `path` (as `read_annotations` read it) by selfalign's `annotator_id` (a
    judge's name and a hash of its options), else alpaca_eval's `annotator` name of its first row; None when no row
    names one. Two `annotator_id`s are refused: a win rate over them would average two judges' verdicts (`eval
    alpaca`'s annotations.jsonl keeps every judge's verdicts in one file; its annotations.json holds the last
    judge's). alpaca_eval's `annotator` may differ per row legitimately (a pool of annotators, as in its alpaca_farm
    config)."""
    judges: dict[str, Any] = {}  # annotator_id -> its first line
    for line, judge in zip(frame["line"], frame["annotator_id"]):
        if judge is not None:
            judges.setdefault(str(judge), line)
    if len(judges) > 1:
        (first, _), (other, line) = list(judges.items())[:2]
        raise DataError(f"verdicts of {len(judges)} judges ({first!r}, then {other!r} from here): one judge per "
                        "file (eval alpaca's annotations.json holds one; its annotations.jsonl keeps every judge's)",
                        path=str(path), line=line, field="annotator_id")
    named = next((str(a) for a in frame["annotator"] if a is not None), None)
    return next(iter(judges), named)


def annotations_frame(records: Sequence[dict], source: str = "<annotations>") -> pd.DataFrame:
    """`read_annotations` for a list of dicts already in memory."""
    rows = [_parse_annotation(rec, source, i) for i, rec in enumerate(records, start=1)]
    if not rows:
        raise DataError("no annotations", path=source)
    return pd.DataFrame(rows)


def _parse_annotation(rec: Any, path: str, line: int) -> dict:
    if not isinstance(rec, dict):
        raise DataError(f"expected an object, got {type(rec).__name__}", path=path, line=line)
    for name in ("instruction", "output_1", "output_2"):
        if name not in rec:
            raise DataError("missing", path=path, line=line, field=name)
        if not isinstance(rec[name], str):
            raise DataError(f"expected a string, got {type(rec[name]).__name__}", path=path, line=line, field=name)
    if "preference" not in rec:
        raise DataError("missing", path=path, line=line, field="preference")
    raw = rec["preference"]
    number = isinstance(raw, (int, float)) and not isinstance(raw, bool)
    if raw is None or (number and math.isnan(raw)):
        pref = math.nan  # no preference (alpaca_eval: an unparseable annotation): dropped, counted in n_dropped
    else:
        pref = (1.5 if raw == 0 else float(raw)) if number else None  # 0 is alpaca_eval's legacy tie
        if pref is None or not 1.0 <= pref <= 2.0:
            raise DataError(f"expected a number in [1, 2] (or 0 for a tie, null for none), got {raw!r}", path=path,
                            line=line, field="preference")
    return {"line": line, "instruction": rec["instruction"], "len_1": len(rec["output_1"]),
            "len_2": len(rec["output_2"]), "preference": pref, "generator_1": rec.get("generator_1"),
            "generator_2": rec.get("generator_2"), "annotator_id": rec.get("annotator_id"),
            "annotator": rec.get("annotator")}


def attach_index(frame: pd.DataFrame, keys: pd.DataFrame, source: str = "<annotations>") -> pd.DataFrame:
    """Add `index` (AlpacaEval eval_set index) by matching each instruction's text against `keys`."""
    by_key = dict(zip(keys["key"], keys["index"]))
    idx = []
    for line, instr in zip(frame["line"], frame["instruction"]):
        k = instruction_key(instr)
        if k not in by_key:
            raise DataError(f"not an AlpacaEval instruction, so it has no difficulty (starts {instr[:50]!r})",
                            path=source, line=line, field="instruction")
        idx.append(int(by_key[k]))
    return frame.assign(index=idx)


# ------------------------------------------------------------------------------------------------ raw win rate
def winrate_metrics(preferences: Iterable[float]) -> dict:
    """alpaca_eval's head-to-head summary of preferences in [1, 2] (0 = tie = 1.5): win_rate = 100 x mean(p - 1)
    (a tie counts half), standard_error = 100 x SEM over instructions, n_wins / n_wins_base (p above / below 1.5),
    n_draws (exactly 1.5), n_total, discrete_win_rate (each preference rounded to win / tie / loss). NaN (no
    preference) is dropped first, from every count, as alpaca_eval drops it."""
    p = np.array([1.5 if float(x) == 0.0 else float(x) for x in preferences], dtype=float)
    p = p[~np.isnan(p)]
    n = len(p)
    if n == 0:
        raise DataError("no preferences")
    v = p - 1.0
    discrete = np.where(v > 0.5, 1.0, np.where(v < 0.5, 0.0, 0.5))
    return {
        "win_rate": float(v.mean() * 100),
        "standard_error": float(v.std(ddof=1) / math.sqrt(n) * 100) if n > 1 else None,
        "n_wins": int((v > 0.5).sum()),
        "n_wins_base": int((v < 0.5).sum()),
        "n_draws": int((v == 0.5).sum()),
        "n_total": int(n),
        "discrete_win_rate": float(discrete.mean() * 100),
    }


# ------------------------------------------------------------------------------------------------ soft-label fits
def _sigmoid(z):
    return np.exp(-np.logaddexp(0.0, -z))


def _sklearn_l1(C: float, seed: int):
    import sklearn
    from sklearn.linear_model import LogisticRegression

    kw = dict(C=C, solver="liblinear", fit_intercept=False, random_state=seed, tol=1e-4, max_iter=100)
    major, minor = (int(x) for x in sklearn.__version__.split(".")[:2])
    kw.update({"l1_ratio": 1.0} if (major, minor) >= (1, 8) else {"penalty": "l1"})  # `penalty` deprecated in 1.8
    return LogisticRegression(**kw)


def _soft_logloss(z: np.ndarray, p: np.ndarray, w: np.ndarray) -> float:
    q = np.clip(_sigmoid(z), 1e-15, 1 - 1e-15)
    return float(-np.mean(w * (p * np.log(q) + (1 - p) * np.log(1 - q))))


def fit_soft_logistic(X, p: np.ndarray, weight: np.ndarray | None = None, *, n_splits: int = N_SPLITS,
                      Cs: Sequence[float] = C_GRID, seed: int = SEED) -> tuple[np.ndarray, float]:
    """L1 logistic regression without intercept on soft labels p in [0, 1], rows optionally weighted.

    Every row goes in twice, as label 1 with weight w p and as label 0 with weight w (1 - p), so liblinear minimises
    the soft cross-entropy. C is picked from `Cs` by `n_splits`-fold cross-validation that keeps both copies of a row
    in one fold, on the mean held-out w x soft log loss (the first C wins a tie); then the model is refitted on all
    rows. Returns (coefficients, C)."""
    from scipy import sparse

    p = np.asarray(p, dtype=float)
    n = len(p)
    w = np.ones(n) if weight is None else np.asarray(weight, dtype=float)
    Xd = sparse.vstack([X, X]).tocsr() if sparse.issparse(X) else np.vstack([X, X])
    yd = np.r_[np.ones(n, dtype=int), np.zeros(n, dtype=int)]
    sw = np.r_[p * w, (1 - p) * w]

    def fit(rows, C):
        return _sklearn_l1(C, seed).fit(Xd[rows], yd[rows], sample_weight=sw[rows]).coef_[0]

    Cs = list(Cs)
    best = Cs[0]
    if n_splits and n_splits > 1 and len(Cs) > 1:
        from sklearn.model_selection import GroupKFold

        losses = np.zeros(len(Cs))
        groups = np.r_[np.arange(n), np.arange(n)]
        for train, test in GroupKFold(n_splits=n_splits).split(Xd, yd, groups):
            held = test[test < n]  # the label-1 copies name the held-out rows
            for j, C in enumerate(Cs):
                losses[j] += _soft_logloss(np.asarray(X[held] @ fit(train, C)).ravel(), p[held], w[held])
        best = Cs[int(np.argmin(losses))]
    return fit(np.arange(2 * n), best), float(best)


def fit_map_logistic(X: np.ndarray, p: np.ndarray, ridge: np.ndarray, linear: np.ndarray,
                     weight: np.ndarray | None = None, max_iter: int = 100) -> np.ndarray:
    """Minimise sum_i w_i CE(p_i, sigmoid(x_i . t)) + sum_k ridge_k t_k^2 / 2 - linear . t by damped Newton."""
    w = np.ones(len(p)) if weight is None else np.asarray(weight, dtype=float)

    def objective(t):
        z = X @ t
        return float(np.sum(w * (np.logaddexp(0.0, z) - p * z)) + 0.5 * np.sum(ridge * t * t) - linear @ t)

    t = np.zeros(X.shape[1])
    f = objective(t)
    for _ in range(max_iter):
        q = _sigmoid(X @ t)
        grad = X.T @ (w * (q - p)) + ridge * t - linear
        hess = (X * (w * q * (1 - q))[:, None]).T @ X + np.diag(ridge) + 1e-10 * np.eye(len(t))
        step = np.linalg.solve(hess, grad)
        scale = 1.0
        while scale > 1e-8:
            f_new = objective(t - scale * step)
            if f_new <= f - 1e-4 * scale * (grad @ step):
                break
            scale /= 2
        t, f_old, f = t - scale * step, f, f_new
        if abs(f_old - f) < 1e-12 * max(1.0, abs(f)) or np.max(np.abs(scale * step)) < 1e-10:
            break
    return t


# ------------------------------------------------------------------------------------------------ LC win rate
def _glm_rows(frame: pd.DataFrame, difficulty: pd.Series, not_gamed: float) -> tuple[np.ndarray, np.ndarray]:
    """Features [tanh(std_delta_len), instruction_difficulty, not_gamed] and soft labels of one annotation set."""
    delta = (frame["len_1"] - frame["len_2"]).to_numpy(dtype=float)
    sd = float(np.std(delta, ddof=1)) if len(delta) > 1 else 0.0
    x_len = np.tanh(delta / sd) if sd > 0 else np.zeros_like(delta)
    d = difficulty.reindex(frame["index"].to_numpy()).to_numpy(dtype=float)
    return np.column_stack([x_len, d, np.full(len(frame), not_gamed)]), frame["preference"].to_numpy(float) - 1.0


def _rated(X: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows that have a preference (alpaca_eval fits on `preference.notna()` rows only)."""
    keep = ~np.isnan(p)
    return X[keep], p[keep]


def length_controlled_winrate(frame: pd.DataFrame, model: LCModel, glm: str = "v1_surrogate",
                              gamed: Sequence[pd.DataFrame] = (), reg_lambda: float = REG_LAMBDA) -> dict:
    """LC win rate of one model's annotations (`read_annotations` + `attach_index`).

    glm: "v1_surrogate" (default; needs `model.slope_prior`), "noreg" (alpaca_eval's length_controlled_noreg) or
    "v1" (length_controlled_v1's fit; needs `gamed`, the two gamed-baseline annotation frames, stacked before the
    model's rows in the order given). Rows without a preference are left out of the fit and kept in the prediction.
    """
    if glm not in GLMS:
        raise ValueError(f"glm must be one of {GLMS}")
    if glm == "v1" and not gamed:
        raise DataError("glm v1 needs the gamed-baseline annotations (--gamed FILE, twice)")
    if glm == "v1_surrogate" and model.slope_prior is None:
        raise DataError("this difficulty table has no slope prior; use --glm noreg", path=model.source)
    name = {"v1_surrogate": "length_controlled_v1_surrogate", "noreg": "length_controlled_noreg",
            "v1": "length_controlled_v1"}[glm]
    out: dict[str, Any] = {"glm": name}
    g1, g2 = set(frame["generator_1"].dropna()), set(frame["generator_2"].dropna())
    if len(g2) == 1 and g2 == g1:  # the baseline against itself: 50 by construction
        out.update(length_controlled_winrate=50.0, lc_standard_error=0.0, glm_weights=dict.fromkeys(FEATURES, 0.0))
        return out
    n_rated = int(frame["preference"].notna().sum())
    if n_rated < MIN_LC_ROWS:
        raise DataError(f"the LC win rate needs at least {MIN_LC_ROWS} annotations with a preference, got {n_rated}")
    # std_delta_len over every row, then the rows without a preference left out of the fit (alpaca_eval's order)
    X, p = _rated(*_glm_rows(frame, model.difficulty, 1.0))
    if glm == "v1_surrogate":
        h, c = model.slope_prior
        coef = fit_map_logistic(X, p, ridge=np.array([h, 0.0, 0.0]), linear=np.array([c, 0.0, 0.0]))
    else:
        w = np.ones(len(p))
        if glm == "v1":
            # alpaca_eval: pd.concat([df_gamed, df]): the gamed rows first (the order decides the CV folds)
            parts = [_rated(*_glm_rows(g, model.difficulty, 0.0)) for g in gamed]
            X = np.vstack([x for x, _ in parts] + [X])
            p = np.concatenate([q for _, q in parts] + [p])
            w = np.concatenate([np.full(len(q), reg_lambda / len(gamed)) for _, q in parts] + [w])
        coef, C = fit_soft_logistic(X, p, w)
        out["glm_C"] = C
    weights = {k: float(v) for k, v in zip(FEATURES, coef)}
    wild = {k: v for k, v in weights.items() if abs(v) > DIVERGED.get(k, math.inf)}
    if wild:  # separable preferences (few wins, all on the hardest instructions): any number it gives is noise
        out.update(length_controlled_winrate=None, lc_standard_error=None, glm_weights=weights,
                   lc_note="the GLM fit diverged (" + ", ".join(f"{k} weight {v:.3g}" for k, v in wild.items()) +
                           "; the weights alpaca_eval publishes stay under 1.3): the "
                           f"{n_rated} preferences are nearly separable by instruction difficulty, so no LC win rate "
                           "is given (the raw win rate stands)")
        return out
    d = model.difficulty.reindex(frame["index"].to_numpy()).to_numpy(dtype=float)
    pred = _sigmoid(coef[1] * d + coef[2])  # std_delta_len = 0, not gamed
    out.update(length_controlled_winrate=float(pred.mean() * 100),
               lc_standard_error=float(pred.std(ddof=1) / math.sqrt(len(pred)) * 100),
               glm_weights=weights)
    return out


def evaluate_annotations(path: str | Path, model: LCModel | str | Path | None = None, glm: str = "v1_surrogate",
                         gamed_paths: Sequence[str | Path] = ()) -> dict:
    """Raw and length-controlled win rate of one annotations file, with alpaca_eval's leaderboard column names."""
    path = str(path)
    model = model if isinstance(model, LCModel) else load_lc_model(model)
    frame = read_annotations(path)
    gens = sorted(frame["generator_2"].dropna().unique())
    if len(gens) > 1:
        raise DataError(f"one model per file expected, found generator_2 values {gens[:4]}", path=path,
                        field="generator_2")
    annotation_judge(path, frame)
    if frame["preference"].isna().all():
        raise DataError("no annotation has a preference (all null)", path=path, field="preference")
    metrics = winrate_metrics(frame["preference"])
    metrics["n_dropped"] = int(frame["preference"].isna().sum())  # no preference: dropped, as alpaca_eval does
    # a repeated instruction counts each time, as alpaca_eval counts it (its vicuna-*-v1.5 files repeat every row);
    # said, since two runs appended into one file look the same
    metrics["n_repeated"] = int(frame["instruction"][frame["preference"].notna()].duplicated().sum())
    metrics["avg_length"] = int(frame["len_2"].mean())  # truncated, as on alpaca_eval's leaderboard
    if glm == "v1_surrogate" and gamed_paths:
        glm = "v1"
    n_rated = len(frame) - metrics["n_dropped"]
    if n_rated < MIN_LC_ROWS:
        metrics.update(length_controlled_winrate=None, lc_standard_error=None, glm=None,
                       lc_note=f"the LC win rate needs at least {MIN_LC_ROWS} annotations with a preference, got "
                               f"{n_rated}")
    else:
        frame = attach_index(frame, model.keys, source=path)
        gamed = [attach_index(read_annotations(g), model.keys, source=str(g)) for g in gamed_paths]
        try:
            metrics.update(length_controlled_winrate(frame, model, glm=glm, gamed=gamed))
        except DataError as e:
            raise DataError(e.reason, path=e.path or path, line=e.line, field=e.field) from None
    metrics.update(generator=gens[0] if gens else None,
                   baseline=next(iter(frame["generator_1"].dropna()), None),
                   annotations=path, instruction_difficulty=model.source)
    return metrics


# ------------------------------------------------------------------------------------------------ rebuilding
def load_preferences_by_model(path: str | Path) -> pd.DataFrame:
    """`preferences_by_model.csv`, cleaned as alpaca_eval's notebook cleans annotations: duplicate (model, index)
    rows dropped (two models appear twice in the shared file), empty model outputs and preferences outside [1, 2]
    dropped."""
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", path=str(path))
    df = pd.read_csv(path)
    need = {"model", "index", "preference", "len_output_1", "len_output_2"}
    if need - set(df.columns):
        raise DataError(f"missing columns {sorted(need - set(df.columns))}", path=str(path))
    df = df.drop_duplicates(["model", "index"]).copy()
    df["preference"] = df["preference"].astype(float).replace({0.0: 1.5})
    return df[(df["len_output_2"] != 0) & df["preference"].between(1.0, 2.0)].reset_index(drop=True)


def _model_rows(df: pd.DataFrame, difficulty: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    frame = pd.DataFrame({"len_1": df["len_output_1"].to_numpy(), "len_2": df["len_output_2"].to_numpy(),
                          "index": df["index"].to_numpy(), "preference": df["preference"].to_numpy()})
    return _glm_rows(frame, difficulty, 1.0)


def fit_instruction_difficulty(prefs: pd.DataFrame, exclude: Iterable[str] = (), *, n_splits: int = N_SPLITS,
                               Cs: Sequence[float] = C_GRID, seed: int = SEED) -> tuple[pd.Series, dict]:
    """Joint soft-label L1 fit over all models but `exclude` of
    `C(model):np.tanh(std_delta_len) + C(model) + C(index) + not_gamed_baseline - 1` (alpaca_eval's difficulty
    notebook); the per-instruction coefficients (first instruction = 0) are the difficulty."""
    from scipy import sparse

    exclude = set(exclude)
    df = prefs[~prefs["model"].isin(exclude)].reset_index(drop=True)
    models = sorted(df["model"].unique())
    m = pd.Categorical(df["model"], categories=models).codes.astype(np.int64)
    indices = np.sort(df["index"].unique())
    ii = np.searchsorted(indices, df["index"].to_numpy())  # 0 = the reference instruction, no column
    delta = (df["len_output_1"] - df["len_output_2"]).to_numpy(float)
    sd = pd.Series(delta).groupby(df["model"]).std(ddof=1).reindex(models).fillna(0.0).to_numpy(float)[m]
    x_len = np.tanh(delta / np.where(sd > 0, sd, 1.0)) * (sd > 0)

    n, M, K = len(df), len(models), len(indices)
    rows, has = np.arange(n), ii > 0
    # columns: [model bias: M][model length slope: M][instruction 1..K-1: K-1][not_gamed_baseline: 1]
    r = np.concatenate([rows, rows, rows[has], rows])
    c = np.concatenate([m, M + m, 2 * M + ii[has] - 1, np.full(n, 2 * M + K - 1)])
    v = np.concatenate([np.ones(n), x_len, np.ones(int(has.sum())), np.ones(n)])  # no gamed baseline in the data
    X = sparse.csr_matrix((v, (r, c)), shape=(n, 2 * M + K))
    coef, C = fit_soft_logistic(X, df["preference"].to_numpy(float) - 1.0, n_splits=n_splits, Cs=Cs, seed=seed)
    diff = np.r_[0.0, coef[2 * M: 2 * M + K - 1]]
    info = {"models": models, "excluded": sorted(exclude), "n_rows": int(n), "n_instructions": int(K), "C": C}
    return pd.Series(diff, index=indices.astype(int), name="instruction_difficulty"), info


def _published(weights: pd.DataFrame, leaderboard: pd.DataFrame, exclude: set) -> pd.DataFrame:
    w = weights.rename(columns=dict(zip(FEATURES, ("s", "b", "a"))))[["s", "b", "a"]]
    keep = [m for m in w.index if m in leaderboard.index and m != BASELINE and m not in exclude
            and pd.notna(leaderboard.loc[m, "length_controlled_winrate"])]
    return w.loc[keep].assign(lc=leaderboard.loc[keep, "length_controlled_winrate"].astype(float))


def calibrate_difficulty(raw: pd.Series, published: pd.DataFrame) -> tuple[float, float, dict]:
    """alpha, beta such that the published weights with alpha + beta * raw give the published LC (least squares)."""
    from scipy.optimize import least_squares

    a, b, lc, d = published["a"].to_numpy(), published["b"].to_numpy(), published["lc"].to_numpy(), raw.to_numpy()

    def resid(t):
        return 100 * _sigmoid(a[:, None] + b[:, None] * (t[0] + t[1] * d[None, :])).mean(axis=1) - lc

    sol = least_squares(resid, x0=[0.0, 1.0])
    before, after = np.abs(resid([0.0, 1.0])), np.abs(resid(sol.x))
    return float(sol.x[0]), float(sol.x[1]), {"n_models": int(len(lc)), "lc_mae_before": float(before.mean()),
                                              "lc_mae_after": float(after.mean()), "lc_max_after": float(after.max())}


def fit_slope_prior(prefs: pd.DataFrame, difficulty: pd.Series, published: pd.DataFrame) -> tuple[float, float, dict]:
    """The quadratic R(s) = h s^2 / 2 - c s standing in for the gamed-baseline rows: at each model's published
    weights, d(own data loss)/ds = -R'(s) = -h s + c; fit h, c by least squares over the models with data."""
    grads, slopes, used = [], [], []
    for name, df in prefs.groupby("model"):
        if name not in published.index:
            continue
        X, p = _model_rows(df, difficulty)
        s, b, a = published.loc[name, ["s", "b", "a"]]
        q = _sigmoid(a + s * X[:, 0] + b * X[:, 1])
        grads.append(float(np.sum((q - p) * X[:, 0])))
        slopes.append(float(s))
        used.append(name)
    g, s = np.array(grads), np.array(slopes)
    A = np.column_stack([-s, np.ones_like(s)])
    (h, c), *_ = np.linalg.lstsq(A, g, rcond=None)
    r2 = 1 - np.sum((g - A @ np.array([h, c])) ** 2) / np.sum((g - g.mean()) ** 2)
    if not h > 0:
        raise DataError(f"slope prior is not convex (h={h:.3g}); refit without it and use glm noreg")
    return float(h), float(c), {"models": used, "n_models": len(used), "r2": float(r2), "s0": float(c / h)}


def build_lc_model(preferences: str | Path, weights: str | Path, leaderboard: str | Path, eval_set: str | Path,
                   exclude: Iterable[str] = ()) -> LCModel:
    """Everything the LC GLM needs, rebuilt from real data, leaving the models in `exclude` out of every step."""
    exclude = set(exclude)
    prefs = load_preferences_by_model(preferences)
    raw, info = fit_instruction_difficulty(prefs, exclude=exclude)
    published = _published(pd.read_csv(weights, index_col=0), pd.read_csv(leaderboard, index_col=0), exclude)
    alpha, beta, cal = calibrate_difficulty(raw, published)
    difficulty = (alpha + beta * raw).rename("instruction_difficulty")
    h, c, prior = fit_slope_prior(prefs[~prefs["model"].isin(exclude)], difficulty, published)
    keys = eval_set_keys(eval_set)
    keys = keys[keys["index"].isin(difficulty.index)].reset_index(drop=True)
    meta = {
        "difficulty_fit": dict(info),
        "calibration": {"alpha": alpha, "beta": beta, **cal},
        "slope_prior": {"h": h, "c": c, **prior},
    }
    return LCModel(difficulty=difficulty, keys=keys, slope_prior=(h, c), meta=meta)


def write_lc_model(model: LCModel, out: str | Path, extra_meta: dict) -> None:
    """Write the table (index, key, instruction_difficulty) and the sidecar JSON next to it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = model.keys.assign(instruction_difficulty=model.difficulty.reindex(model.keys["index"]).to_numpy())
    table.to_csv(out, index=False, float_format="%.10f")
    out.with_suffix(".json").write_text(json.dumps({**extra_meta, **model.meta}, indent=2) + "\n")


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m selfalign.evaluation.lc",
                                 description="Rebuild the instruction difficulty and slope prior of the LC win rate.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit-difficulty", help="fit on shared/data/alpaca_eval and write the package resource")
    f.add_argument("--data", required=True, help="the alpaca_eval data folder (shared/data/alpaca_eval)")
    f.add_argument("--out", default=str(DIFFICULTY_CSV), help="output CSV (default: the package resource)")
    f.add_argument("--exclude", nargs="*", default=[], help="models to leave out of every step")
    args = ap.parse_args(argv)
    data = Path(args.data)
    files = {"preferences": data / "preferences_by_model.csv",
             "weights": data / "lc_glm_weights_baseline_gpt4_1106_preview.csv",
             "leaderboard": data / "leaderboard_weighted_alpaca_eval_gpt4_turbo.csv",
             "eval_set": data / "eval_set.jsonl"}
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    model = build_lc_model(**files, exclude=args.exclude)
    extra = {
        "what": "AlpacaEval 2.0 (weighted_alpaca_eval_gpt4_turbo, baseline gpt4_1106_preview) per-instruction "
                "difficulty for the length-controlled win rate, rebuilt offline; see selfalign/evaluation/lc.py",
        "command": "python -m selfalign.evaluation.lc " + " ".join(argv),
        "date": started,
        "data": {k: {"file": v.name, "sha256": _sha256(v)} for k, v in files.items()},
        "data_source": "shared/data/alpaca_eval: tatsu-lab/alpaca_eval @ cd543a149d (results/*/"
                       "weighted_alpaca_eval_gpt4_turbo/annotations.json -> preferences_by_model.csv; published "
                       "weights and leaderboard). CC BY-NC 4.0 data; this table is a fitted quantity derived from it.",
        "key": "first 16 hex digits of sha256(instruction.strip()) for the eval_set.jsonl instruction",
    }
    write_lc_model(model, args.out, extra)
    d, cal, pr = model.meta["difficulty_fit"], model.meta["calibration"], model.meta["slope_prior"]
    print(f"{len(model.difficulty)} instruction difficulties from {len(d['models'])} models (C={d['C']:.4g}); "
          f"calibration alpha={cal['alpha']:.4f} beta={cal['beta']:.4f} (published-weights LC MAE "
          f"{cal['lc_mae_after']:.3f}); slope prior h={pr['h']:.3f} s0={pr['s0']:.3f} (R2 {pr['r2']:.2f}) "
          f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
