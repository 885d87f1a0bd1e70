"""`python -m bench.budget_curve` on the ci preset switched to a 12-person world: both models at
two budgets, the figures of each point, and a second call that resumes instead of retraining."""

import json

import pytest

from bench.budget_curve import METRICS, main
from dgpt_core.config import RunConfig

WORLD = ["data.pretrain.sources=[{name: world, weight: 2}]", "data.sft.sources=[{name: world}]",
         "data.world.people=12", "data.sft.answer_canvas=64",
         "eval.tasks=[dgpt_world, storage]", "eval.strategies=[confidence, defaults]", "eval.steps_grid=[]"]


@pytest.mark.slow  # ~3 min: two ci-sized main jobs and two GPT-2 trainings
def test_both_models_at_two_budgets_and_a_resumed_curve(tmp_path):
    args = ["--out", str(tmp_path), "--preset", "ci", "--multiples", "1", "2", "--seeds", "3",
            *(x for o in WORLD for x in ("--set", o))]
    assert main(args) == 0
    curve = json.loads((tmp_path / "curve.json").read_text())
    points = {(p["model"], p["multiple"]): p for p in curve["points"]}
    assert set(points) == {(m, x) for m in ("ours", "ar") for x in (1.0, 2.0)}
    for (_, multiple), point in points.items():
        assert point["seed"] == 3 and all(0.0 <= point[k] <= 1.0 for k in METRICS)
        assert point["steps"] == points["ours", 1.0]["steps"] * multiple
        # both models read the same pretraining rows at the same budget (ours counts the spurious
        # tokens its edit corruption inserts too)
        assert point["pretrain_tokens"] == pytest.approx(points["ours", multiple]["pretrain_tokens"], rel=1e-3)
        assert point["items"]["heldout"] == points["ours", 1.0]["items"]["heldout"] > 0
    assert points["ours", 2.0]["reads_per_person"] == pytest.approx(2 * points["ours", 1.0]["reads_per_person"], rel=0.01)
    run = RunConfig.from_yaml(tmp_path / "runs" / "ours-x2-seed3" / "run_config.yaml")
    assert (run.seed, run.data.world.seed, run.pretrain.max_steps) == (3, 3, points["ours", 2.0]["steps"])
    stamps = {p.name: p.stat().st_mtime for p in (tmp_path / "points").iterdir()}
    assert main(args) == 0  # every point exists: nothing retrains
    assert {p.name: p.stat().st_mtime for p in (tmp_path / "points").iterdir()} == stamps
    text = (tmp_path / "curve.md").read_text()
    assert "GPT-2" in text and "diffusion (ours)" in text and (tmp_path / "curve.png").stat().st_size > 0


def _point(model: str, multiple: float, seed: int, value: float) -> dict:
    return {"model": model, "multiple": multiple, "seed": seed, "steps": round(750 * multiple),
            "reads_per_person": 2000.0 * multiple, "seconds": 1.0, **{k: value for k in METRICS}}


def test_imported_points_join_the_curve_and_never_replace_a_measured_one(tmp_path):
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({"points": [_point("ours", 1, 0, 0.2), _point("ours", 1, 1, 0.4),
                                                _point("ar", 2, 0, 0.9)]}))
    out = tmp_path / "curve"
    (out / "points").mkdir(parents=True)
    (out / "points" / "ours-x1-seed1.json").write_text(json.dumps(_point("ours", 1, 1, 0.6)))
    assert main(["--out", str(out), "--import-points", str(elsewhere), "--report-only"]) == 0
    assert sorted(p.name for p in (out / "points").iterdir()) == ["ar-x2-seed0.json", "ours-x1-seed0.json",
                                                                   "ours-x1-seed1.json"]
    rows = {(r["model"], r["multiple"]): r for r in json.loads((out / "curve.json").read_text())["rows"]}
    assert rows["ours", 1]["heldout"] == {"mean": pytest.approx(0.4), "min": 0.2, "max": 0.6, "values": [0.2, 0.6]}
    assert rows["ar", 2]["seeds"] == [0] and rows["ar", 2]["heldout"]["mean"] == 0.9
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(SystemExit, match="broken.json is not a curve.json"):
        main(["--out", str(out), "--import-points", str(tmp_path / "broken.json"), "--report-only"])
