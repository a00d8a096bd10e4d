"""SEFT: data slices, the complete two-round run (reviser warm-up, adaptive reviser, internal + external evolution,
evaluation) and resume after a kill."""

from __future__ import annotations

import json

from selfalign.cli import main
from selfalign.config import load_config
from selfalign.data import Revision, read_records
from selfalign.recipes import seft
from selfalign.reviser import TAGS, parse_decision


def test_defaults_are_the_recommended_reconstruction():
    c = seft.Config()
    assert c.sampling.temperature == 0.7 and c.sampling.top_p == 1.0
    r = c.reviser
    assert (r.label_rule, r.minor_quantile, r.minor_max, r.adaptive_init, r.no_revision_target, r.tag_fallback) == \
        ("edit_distance", 0.5, None, "warmup", "copy", "none")
    assert r.warmup_train.epochs == 2 and r.adaptive_train.epochs == 2 and c.round_train.epochs == 1
    assert c.policy_init == "previous" and c.external.size == 0
    for path in ("configs/seft.yaml", "configs/seft-smoke.yaml"):
        load_config(seft.Config, path, [])  # both configs are valid


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_baseline(run_dir, stages):
    """The control: SFT of the initial model on round 1's own unrevised answers, evaluated as sft_unrevised."""
    base = stages["baseline/train"]["result"]
    assert base["init"] == "smollm2-135m"  # π_0, not a round's model
    gens = _lines(run_dir / "round1" / "generations.jsonl")
    assert base["examples"] == sum(bool(g["response"].strip()) for g in gens)
    assert (run_dir / "baseline" / "final" / "config.json").exists()
    assert stages["eval/sft_unrevised"]["result"]["n_total"] == 10


def _check_reviser_quality(run_dir, stages, reviser_pairs):
    """Held-out pairs: both answers revised; only changed answers judged; chosen kept verbatim on NO REVISION."""
    q = json.loads((run_dir / "reviser" / "quality.json").read_text())
    assert q == stages["reviser/quality"]["result"] and q["pairs"] == 2 and q["judge"] == "length"
    held = _lines(run_dir / "reviser" / "quality" / "pairs.jsonl")
    assert len(held) == 2 and all(p["id"].startswith("uf-200-") for p in held)
    prompt = lambda p: p["messages"][-1]["content"]  # noqa: E731
    assert not {prompt(p) for p in held} & {prompt(p) for p in reviser_pairs}, "held-out pairs were trained on"
    revs = read_records(run_dir / "reviser" / "quality" / "revisions.jsonl", Revision)
    assert sorted(r.prompt_id for r in revs) == sorted(f"{p['id']}:{side}" for p in held
                                                       for side in ("rejected", "chosen"))
    verdicts = {v["id"]: v for v in _lines(run_dir / "reviser" / "quality" / "verdicts.jsonl")}
    for r in revs:
        side = r.prompt_id.rsplit(":", 1)[1]
        assert r.original == next(p[side] for p in held if r.prompt_id.startswith(p["id"] + ":"))
        if r.decision == "none":
            assert r.revised == r.original
        assert (verdicts[r.prompt_id]["p_revised_better"] is None) == (r.revised == r.original)
    for side in ("rejected", "chosen"):
        s = q[side]
        assert s["decisions"]["revisions"] == s["unchanged"]["n"] == s["judged_better"]["n"] == 2
        assert s["unchanged"]["count"] == sum(r.revised == r.original for r in revs if r.prompt_id.endswith(side))
        assert s["judged_better"]["count"] == s["judged_better_of_changed"]["count"] <= 2 - s["unchanged"]["count"]
    assert "held-out pairs" in (run_dir / "reviser" / "quality.md").read_text()


def test_two_round_seft_run_end_to_end_and_resume(tmp_path, capsys):
    run_dir = tmp_path / "seft"
    assert main(["run", "seft", "configs/seft-smoke.yaml", "--run-dir", str(run_dir)]) == 0
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stages = manifest["stages"]
    for name in ("data", "reviser/labels", "reviser/warmup", "reviser/adaptive", "round1/generate", "round1/revise",
                 "round1/train", "round2/generate", "round2/revise", "round2/train", "eval/initial", "eval/round1",
                 "eval/round2", "reviser/quality", "baseline/train", "eval/sft_unrevised"):
        assert stages[name]["status"] == "done", name

    # data: reviser prompts, round slices and external prompts are disjoint
    pairs = _lines(run_dir / "data" / "reviser_pairs.jsonl")
    assert len(pairs) == 4
    p1, p2 = (_lines(run_dir / "data" / f"round{i}_prompts.jsonl") for i in (1, 2))
    assert len(p1) == len(p2) == 5
    assert not {p["id"] for p in p1} & {p["id"] for p in p2}, "round prompt slices must be disjoint"
    uf_prompts = {json.loads(line)["prompt"].strip() for line in
                  open(seft.data_file("preferences/ultrafeedback_binarized_train_1k.jsonl"))}
    assert not uf_prompts & {p["messages"][-1]["content"].strip() for p in p1 + p2}
    assert not (run_dir / "data" / "round1_external.jsonl").exists()
    assert len(_lines(run_dir / "data" / "round2_external.jsonl")) == 2

    # labels: every pair's rejected answer gets minor or major (median split)
    labels = _lines(run_dir / "reviser" / "labels.jsonl")
    assert sorted(l["decision"] for l in labels) == ["major", "major", "minor", "minor"]
    assert (run_dir / "reviser" / "warmup" / "final" / "config.json").exists()
    assert stages["reviser/adaptive"]["result"]["init"].endswith("reviser/warmup/final")
    assert stages["reviser/adaptive"]["result"]["examples"] == 8

    # revisions: Revision records; NO REVISION (also the fallback) keeps the original byte-identical
    for i, expected in ((1, 5), (2, 7)):
        revs = read_records(run_dir / f"round{i}" / "revisions.jsonl", Revision)
        gens = _lines(run_dir / f"round{i}" / "generations.jsonl")
        assert len(gens) == 5 and all(g["sampling"]["temperature"] == 0.7 for g in gens)
        nonempty = sum(bool(g["response"].strip()) for g in gens)
        assert len(revs) == nonempty + (2 if i == 2 else 0) <= expected
        tags = {t["prompt_id"]: t for t in _lines(run_dir / f"round{i}" / "reviser_tags.jsonl")}
        cont_file = run_dir / f"round{i}" / "reviser_continuations.jsonl"
        continued = {c["prompt_id"] for c in _lines(cont_file)} if cont_file.exists() else set()
        for r in revs:
            key = f"{r.prompt_id}#{r.meta['sample_index']}"
            assert tags[key]["sampling"]["max_new_tokens"] == stages[f"round{i}/revise"]["result"]["tag_budget"]
            assert tags[key]["sampling"]["temperature"] == 0.0
            decision, _ = parse_decision(tags[key]["response"])
            assert r.meta["tag_status"] == ("ok" if decision else "fallback")
            assert r.decision == (decision or "major")  # the smoke config's fallback for a garbled tag
            if r.decision == "none":
                assert r.revised == r.original and key not in continued
            else:
                assert key in continued
        if i == 2:
            assert sum(r.meta.get("origin") == "external" for r in revs) == 2
        s = stages[f"round{i}/revise"]["result"]
        assert s["count_none"] + s["count_minor"] + s["count_major"] == len(revs)
        assert abs(s["share_none"] + s["share_minor"] + s["share_major"] - 1) < 1e-9
        assert 0 <= s["mean_edit_distance"] <= 1 and 0 <= s["mean_token_overlap"] <= 1
        assert stages[f"round{i}/train"]["result"]["examples"] == len(revs)
    assert set(TAGS) == {"none", "minor", "major"}
    assert "| round2 |" in (run_dir / "revision_summary.md").read_text()
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert list(summary) == ["initial", "round1", "round2", "sft_unrevised"]
    assert (run_dir / "final" / "config.json").exists()
    assert manifest["models"]["reviser"]["sha256"]
    _check_baseline(run_dir, stages)
    _check_reviser_quality(run_dir, stages, pairs)

    # a run killed after round 1: forget round 2 and resume with the same command
    for name in [s for s in stages if s.startswith(("round2", "eval/round2"))]:
        del manifest["stages"][name]
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    before = {p: (run_dir / p).read_bytes() for p in ("round1/revisions.jsonl", "round1/generations.jsonl",
                                                      "reviser/labels.jsonl", "reviser/final/model.safetensors")}
    capsys.readouterr()
    assert main(["run", "seft", "configs/seft-smoke.yaml", "--run-dir", str(run_dir)]) == 0
    again = json.loads((run_dir / "manifest.json").read_text())
    assert again["stages"]["round2/train"]["status"] == "done"
    assert again["stages"]["round1/train"]["seconds"] == stages["round1/train"]["seconds"]  # not redone
    for p, data in before.items():
        assert (run_dir / p).read_bytes() == data, f"{p} changed on resume"
    assert len(again["resumed_at"]) == 1
