"""`sid-fast demo` on ShapesWorld (sid_fast/demo/shapes.py), end to end on a tiny random teacher: prompt shards are
prepared once and reused, every sampler is scored on the same held-out prompts, the report and grids are written,
and a second run with the same seed gives the same numbers."""

import json

import pytest

from sid_fast.demo import shapes as demo
from sid_fast.models.shapes import save_shapes_transformer, shapes_transformer

TIMING = ("sample_seconds", "train_seconds")


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    return save_shapes_transformer(shapes_transformer("tiny"), path, card={"guidance": 3.0})


def run(out, teacher, capsys):
    results = demo.run(out, [f"teacher.path={teacher}", "train.iterations=3", "train.batch_size=4",
                             "train.fake_warmup_iters=1", "train.ckpt_every=0", "train.log_every=1"],
                       seed=3, prompts=12, two_object_prompts=6, captions=24, progress=False)
    return results, capsys.readouterr().out


def test_demo_runs_end_to_end_reuses_shards_and_is_deterministic(tmp_path, tiny_teacher, capsys):
    results, log = run(tmp_path / "demo", tiny_teacher, capsys)
    names = [row["name"] for row in results["rows"]]
    assert names == ["teacher Euler 1-step (CFG 3)", "teacher Euler 4-step (CFG 3)", "teacher Euler 28-step (CFG 3)",
                     "fresh SiD 1-step (this run)"]
    for row in results["rows"]:
        assert row["n_1obj"] == 12 and row["n_2obj"] == 6
        low, high = row["correct_1obj_ci"]
        assert 0 <= low <= row["correct_1obj"] <= high <= 1
    assert "encoding 24 training captions" in log
    out = tmp_path / "demo"
    assert (out / "prompts" / "manifest.json").is_file()
    assert (out / "sid-fresh" / "generator-fp16.safetensors").is_file()
    assert (out / "sid-fresh" / "log.jsonl").is_file()
    report = (out / "report.md").read_text()
    assert "| fresh SiD 1-step (this run) |" in report and results["verdict"] in report
    grids = sorted(p.name for p in out.glob("grid-*.png"))
    assert len(grids) == 4
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]

    again, log = run(tmp_path / "demo", tiny_teacher, capsys)
    assert "reusing prompt shards" in log and "encoding" not in log
    strip = [{k: v for k, v in row.items() if k not in TIMING} for row in results["rows"]]
    assert [{k: v for k, v in row.items() if k not in TIMING} for row in again["rows"]] == strip


def test_gain_verdict_needs_separated_intervals():
    from sid_fast.shapes.checker import Score

    start = demo.Row("start", {"1obj": Score(20, 200)}, (900.0, (850.0, 950.0)), 0.0)
    overlapping = demo.Row("fresh", {"1obj": Score(30, 200)}, (880.0, (820.0, 940.0)), 0.0)
    assert demo.gain_verdict(start, overlapping).startswith("no gain")
    better_fd = demo.Row("fresh", {"1obj": Score(22, 200)}, (500.0, (450.0, 550.0)), 0.0)
    assert "Fréchet distance" in demo.gain_verdict(start, better_fd)
    better_correct = demo.Row("fresh", {"1obj": Score(80, 200)}, None, 0.0)
    assert "correctness" in demo.gain_verdict(start, better_correct)


def test_demo_names_a_missing_teacher(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="teacher.path.*nope.safetensors"):
        demo.run(tmp_path, [f"teacher.path={tmp_path / 'nope.safetensors'}"], progress=False)
    import sid_fast.models.shapes as family

    monkeypatch.setattr(family, "SHIPPED_TEACHER", tmp_path / "missing" / "teacher.safetensors")
    with pytest.raises(FileNotFoundError, match="missing/teacher.safetensors"):
        demo.run(tmp_path, [], progress=False)
