"""SiD²ₐ on ShapesWorld (DESIGN.md §5): real images rendered for the prompt shards' captions (ShapesRealData), exact
resume of that stream (also through a trainer checkpoint), `sid-fast distill` with adversarial.enabled on
teacher.kind=shapes, and the data-aided vs data-free study script, all on the tiny shapes teacher."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from sid_fast.config import load_config
from sid_fast.data import ShardConditions
from sid_fast.shapes.real import ShapesRealData

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random shapes teacher and prompt shards of 24 one-object training captions (MiniLM-encoded)."""
    from sid_fast.demo.shapes import prepare_shards
    from sid_fast.encoders.minilm import MiniLMEncoder
    from sid_fast.models.shapes import save_shapes_transformer, shapes_transformer

    root = tmp_path_factory.mktemp("shapes-aided")
    teacher = save_shapes_transformer(shapes_transformer("tiny"), root / "teacher.safetensors")
    encoder = MiniLMEncoder()
    shards = prepare_shards(root, encoder, progress=False, captions=24)
    encoder.release()
    return {"root": root, "teacher": teacher, "shards": shards}


def test_real_images_match_their_captions_and_the_shard_conditioning(world):
    from sid_fast.shapes.checker import score

    real = ShapesRealData.from_shards(world["shards"], seed=5)
    assert len(real) == 24
    images, cond, captions = real.sample(64)
    assert images.shape == (64, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert score(images, captions).value >= 0.99
    # the conditioning is the shard record of each caption, in the layout and dtypes ShardConditions batches give
    batch = ShardConditions(world["shards"], num_workers=0, shuffle_buffer=0).next_batch(24)
    by_caption = {caption: i for i, caption in enumerate(batch.prompts)}
    for name, value in batch.conditioning.tensors().items():
        got = getattr(cond, name)
        assert got.dtype == value.dtype and got.shape[1:] == value.shape[1:], name
        expected = value[torch.tensor([by_caption[c] for c in captions])]
        assert torch.equal(got, expected), name
    x0, cond2 = real.sample_with_latents(3)
    assert x0.shape == (3, 3, 32, 32) and len(cond2) == 3


def test_resume_gives_the_same_next_batch(world):
    real = ShapesRealData.from_shards(world["shards"], seed=2)
    real.sample(5)
    state = json.loads(json.dumps(real.state_dict()))  # as the checkpoint's state.json holds it
    expected = real.sample(7)
    resumed = ShapesRealData.from_shards(world["shards"], seed=2)
    resumed.load_state_dict(state)
    got = resumed.sample(7)
    assert torch.equal(got[0], expected[0]) and got[2] == expected[2]
    assert all(torch.equal(a, b) for a, b in zip(got[1].tensors().values(), expected[1].tensors().values()))
    other_rank = ShapesRealData.from_shards(world["shards"], seed=2, rank=1, world_size=2)
    assert not torch.equal(other_rank.sample(7)[0], ShapesRealData.from_shards(world["shards"], seed=2).sample(7)[0])
    with pytest.raises(ValueError, match="seed 2"):
        ShapesRealData.from_shards(world["shards"], seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="ShapesWorld captions only.*a cat"):
        ShapesRealData(["a cat"], real.bank[:1])


def _distill_config(world, out: Path, iterations: int, extra=()):
    batch = 4
    per_iteration = 2 * batch  # images_seen per iteration: fake step + generator step
    return load_config(None, [
        "teacher.kind=shapes", f"teacher.path={world['teacher']}", f"data.shards={world['shards']}",
        "data.num_workers=0", "method.num_steps=2", f"train.batch_size={batch}", f"train.iterations={iterations}",
        "train.progress=false", f"train.out_dir={out}", "train.log_every=1", "health.tensorboard=false",
        "adversarial.enabled=true", f"adversarial.generator_warmup_images={per_iteration}",
        f"adversarial.adversarial_from_images={2 * per_iteration}", *extra])


def test_distill_with_adversarial_on_shapes_runs_end_to_end_and_resumes(world, tmp_path):
    from sid_fast.composition import run_training

    out = tmp_path / "run"
    path = run_training(_distill_config(world, out, 4))
    assert path.is_file()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    for r in log:
        assert math.isfinite(r["loss_fake"]) and math.isfinite(r["loss_d"])
    assert "loss_generator" not in log[0]  # warm-up: the fake network (and discriminator) only
    assert "loss_adv" not in log[1] and math.isfinite(log[1]["loss_generator"])
    for r in log[2:]:  # the adversarial term is on after its warm-up
        assert math.isfinite(r["loss_adv"]) and r["loss_adv"] > 0 and math.isfinite(r["loss_generator"])
    # the checkpoint holds the real-data stream; a resumed trainer restores it
    from sid_fast.adversarial import build_data_aided_trainer
    from sid_fast.checkpoint import latest_checkpoint
    from sid_fast.models.registry import build_teacher

    saved = json.loads((latest_checkpoint(out / "checkpoints") / "state.json").read_text())["real_data"]
    config = _distill_config(world, out, 5)
    bundle = build_teacher(config.teacher)
    bundle.conditions = ShardConditions(world["shards"], num_workers=0)
    real = ShapesRealData.from_shards(world["shards"], seed=config.train.seed + 1)
    trainer = build_data_aided_trainer(config, bundle, real)
    assert real.state_dict() != saved
    assert trainer.resume() and trainer.step == 4 and real.state_dict() == saved


def test_data_aided_on_shapes_without_captions_names_the_field(world, tmp_path):
    from sid_fast.composition import run_training

    config = load_config(None, ["teacher.kind=shapes", f"teacher.path={world['teacher']}", "train.iterations=1",
                                f"train.out_dir={tmp_path}", "adversarial.enabled=true"])
    with pytest.raises(ValueError, match="data.shards"):
        run_training(config)
    with pytest.raises(ValueError, match="data.shards"):
        ShapesRealData.from_conditions(object())


def _study():
    spec = importlib.util.spec_from_file_location("shapes_data_aided", ROOT / "benchmarks" / "studies" / "shapes_data_aided.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_study_compares_data_aided_and_data_free_from_a_shipped_format_start(world, tmp_path):
    from sid_fast.models.sd3 import SD3Adapter
    from sid_fast.models.shapes import load_shapes_transformer, save_shapes_transformer

    start = load_shapes_transformer(world["teacher"])
    with torch.no_grad():
        for p in start.parameters():
            p.add_(0.01)
    init = save_shapes_transformer(start, tmp_path / "sid-2step.safetensors", card={"num_steps": 2})  # float16
    study = _study()
    teacher = SD3Adapter(load_shapes_transformer(world["teacher"]))
    loaded = study.generator_from(teacher, init)  # the shipped float16 format, without the adapter's prefix
    for name, value in start.state_dict().items():
        assert torch.equal(loaded.state_dict()[f"transformer.{name}"], value.half().float()), name
    out = tmp_path / "results" / "shapes_data_aided"
    results = study.main([
        "--init", str(init), "--teacher", str(world["teacher"]), "--iterations", "3", "--batch-size", "4",
        "--warmup-images", "8", "--adversarial-from-images", "16", "--prompts", "12", "--two-object-prompts", "6",
        "--captions", "24", "--work", str(world["root"]), "--out", str(out), "--label", "tiny",
        "--set", "data.num_workers=0", "train.ema_decay=0", "train.log_every=1"])
    assert results["num_steps"] == 2 and results["iterations"] == 3
    assert results["fake_warmup_iters_data_free"] == 1  # 8 images = one iteration of batch 4 (fake + generator step)
    names = [row["name"] for row in results["rows"]]
    assert names == ["start (data-free generator)", "SiD²ₐ data-aided (+3 it)", "continued data-free SiD (+3 it)"]
    for row in results["rows"]:
        assert row["n_1obj"] == 12 and row["n_2obj"] == 6
    table = out.with_suffix(".md").read_text()
    assert all(f"| {name} |" in table for name in names) and "SiD²ₐ data-aided (+3 it) vs continued" in table
    lines = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [line["name"] for line in lines] == names and lines[0]["label"] == "tiny"
    runs = world["root"] / "tiny"
    aided = [json.loads(line) for line in (runs / "data-aided" / "log.jsonl").read_text().splitlines()]
    free = [json.loads(line) for line in (runs / "data-free" / "log.jsonl").read_text().splitlines()]
    # the same generator warm-up in both runs; L_adv only in SiD²ₐ
    assert ["loss_generator" in r for r in aided] == ["loss_generator" in r for r in free] == [False, True, True]
    assert ["loss_adv" in r for r in aided] == [False, False, True] and not any("loss_adv" in r for r in free)


def test_lora_study_trains_times_and_scores_every_arm(world, tmp_path):
    """benchmarks/studies/shapes_lora_fake.py on the tiny teacher: the arms share everything but the fake score."""
    from safetensors.torch import load_file

    spec = importlib.util.spec_from_file_location("shapes_lora_fake", ROOT / "benchmarks" / "studies" / "shapes_lora_fake.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    work, out = tmp_path / "work", tmp_path / "results" / "lora"
    common = ["--teacher", str(world["teacher"]), "--num-steps", "1", "--iterations", "2", "--captions", "24",
              "--work", str(work), "--label", "tiny", "--set", "data.num_workers=0", "train.batch_size=2",
              "train.fake_warmup_iters=0", "train.ema_decay=0"]
    for arm in ("full", "lora2"):
        study.main(["train", "--arm", arm, *common])
    study.main(["time", "--arms", "full", "lora2", "--rounds", "1", "--time-iterations", "1", *common])
    timing = json.loads((work / "timing.json").read_text())
    assert set(timing["seconds_per_iteration"]) == set(timing["seconds_per_fake_update"]) == {"full", "lora2"}
    assert 0 < timing["fake_trainable"]["lora2"] < timing["fake_trainable"]["full"] / 4
    full, lora = (load_file(work / arm / "generator.safetensors") for arm in ("full", "lora2"))
    assert full.keys() == lora.keys() and any(not torch.equal(full[k], lora[k]) for k in full)  # different fake scores
    results = study.main(["score", "--arms", "full", "lora2", "--prompts", "12", "--two-object-prompts", "0",
                          "--out", str(out), *common])
    assert [row["name"] for row in results["rows"]] == ["full fake-score copy", "LoRA fake score, rank 2"]
    assert results["verdicts"][0].startswith("LoRA fake score, rank 2 vs full fake-score copy:")
    table = out.with_suffix(".md").read_text()
    assert "| LoRA fake score, rank 2 |" in table and "| lora2 |" in table
    assert [json.loads(line)["lora_rank"] for line in out.with_suffix(".jsonl").read_text().splitlines()] == [0, 2]


def _script(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_launcher_logs_a_learning_curve_that_survives_a_resume(world, tmp_path):
    """launchers/shapes_reference.py --curve-every: the long runs of docs/shapes.md, on the tiny teacher."""
    from sid_fast.models.shapes import read_card, save_shapes_transformer, shapes_transformer

    launcher = _script("shapes_reference", "launchers/shapes_reference.py")
    init = save_shapes_transformer(shapes_transformer("tiny"), tmp_path / "start.safetensors", card={"num_steps": 1})
    out = tmp_path / "long"

    def run(iterations):
        return launcher.main([
            "--steps", "1", "--out", str(out), "--label", "aided", "--prompts", "10", "--two-object-prompts", "5",
            "--captions", "24", "--curve-every", "2", "--curve-raw", "--set", f"teacher.path={world['teacher']}",
            "data.num_workers=0", "train.batch_size=4", f"train.iterations={iterations}", "train.fake_warmup_iters=0",
            "train.progress=false", "train.log_every=1", "health.tensorboard=false", "adversarial.enabled=true",
            f"adversarial.init_generator={init}", "adversarial.generator_warmup_images=8",
            "adversarial.adversarial_from_images=16"])

    assert run(4) == 0
    assert run(6) == 0  # resumes from the step-4 checkpoint: no second start point, no second teacher scoring
    curve = [json.loads(line) for line in (out / "curve.jsonl").read_text().splitlines()]
    assert [(r["label"], r["step"], r["images_seen"]) for r in curve] == [("aided-1step", s, 8 * s) for s in (0, 2, 4, 6)]
    for r in curve:
        assert r["n_1obj"] == 10 and r["n_2obj"] == 5 and 0 <= r["correct_1obj"] <= 1
        assert r["correct_1obj_ci"][0] <= r["correct_1obj"] <= r["correct_1obj_ci"][1]
        assert math.isfinite(r["fd"]) and r["fd_ci"][0] <= r["fd"] <= r["fd_ci"][1]
        assert math.isfinite(r["raw_fd"]) and r["raw_n_1obj"] == 10  # --curve-raw: the raw weights too
    rows = [json.loads(line) for line in (out / "reference.jsonl").read_text().splitlines()]
    names = [r["name"] for r in rows]
    assert names == ["teacher Euler 1-step", "teacher Euler 4-step", "teacher Euler 28-step", "SiD 1-step", "SiD 1-step"]
    final = rows[-1]
    assert final["iterations"] == 6 and (final["correct_1obj"], final["fd"]) == (curve[-1]["correct_1obj"], curve[-1]["fd"])
    assert curve[0]["fd"] != curve[-1]["fd"]  # the generator moved
    for kind, key in (("ema", "fd"), ("raw", "raw_fd")):  # the lowest-FD generator of each kind, in shipped format
        best = min(curve, key=lambda r: r[key])
        card = read_card(out / "aided-1step" / f"best-{kind}.safetensors")
        assert (card["step"], card["scores"]["fd"], card["weights"]) == (best["step"], best[key], kind)
    log = [json.loads(line) for line in (out / "aided-1step" / "log.jsonl").read_text().splitlines()]
    assert [r["curve_correct_1obj"] for r in log if "curve_correct_1obj" in r] == [r["correct_1obj"] for r in curve[1:]]

    # a checkpoint of the run scored (and carded) as a finished generator: its EMA weights, the same scores
    checkpoint = out / "aided-1step" / "checkpoints" / "step-00000006"
    assert launcher.main(["--from", f"1={checkpoint}", "--out", str(out), "--label", "aided", "--prompts", "10",
                          "--two-object-prompts", "5", "--set", f"teacher.path={world['teacher']}"]) == 0
    scored = json.loads((out / "reference.jsonl").read_text().splitlines()[-1])
    assert (scored["correct_1obj"], scored["fd"]) == (final["correct_1obj"], final["fd"])
    card = read_card(out / "aided-1step" / "generator-fp16.safetensors")
    assert card["trained_by"]["iterations"] == 6 and card["trained_by"]["weights"] == str(checkpoint)
    assert card["config"]["train"]["batch_size"] == 4 and card["config"]["adversarial"]["enabled"] is True
    # a curve's best generator scored the same way: its row says the iteration it was taken at
    best_raw = out / "aided-1step" / "best-raw.safetensors"
    assert launcher.main(["--from", f"1={best_raw}", "--out", str(out), "--label", "aided", "--prompts", "10",
                          "--two-object-prompts", "5", "--set", f"teacher.path={world['teacher']}"]) == 0
    scored = json.loads((out / "reference.jsonl").read_text().splitlines()[-1])
    assert scored["iterations"] == read_card(best_raw)["step"] == min(curve, key=lambda r: r["raw_fd"])["step"]

    plots = _script("shapes_curves", "benchmarks/studies/shapes_curves.py")
    result = plots.main(["--run", f"aided={out / 'curve.jsonl'}", "--teacher", str(out / "reference.jsonl"),
                         "--out", str(tmp_path / "results" / "curves"), "--raw", "aided", "--x", "iterations"])
    png = tmp_path / "results" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert set(result["levels"]) == {1, 4, 28} and result["best"]["aided"]["fd"] == min(r["fd"] for r in curve)
    table = (tmp_path / "results" / "curves.md").read_text()
    assert table.count("| aided |") == 4 and "| teacher Euler 28-step (CFG 4) |" in table
    assert result["best"]["aided (raw)"]["fd"] == min(r["raw_fd"] for r in curve) and table.count("| aided (raw) |") == 4
    with pytest.raises(SystemExit):  # --raw of a run not given
        plots.main(["--run", f"x={out / 'curve.jsonl'}", "--raw", "y", "--teacher", str(out / "reference.jsonl"),
                    "--out", str(tmp_path / "y")])
    with pytest.raises(SystemExit, match="no such curve file"):
        plots.main(["--run", f"x={tmp_path / 'missing.jsonl'}", "--teacher", str(out / "reference.jsonl"), "--out", str(tmp_path / "y")])
    with pytest.raises(SystemExit, match="no `teacher Euler N-step` rows"):
        plots.main(["--run", f"x={out / 'curve.jsonl'}", "--teacher", str(out / "curve.jsonl"), "--out", str(tmp_path / "y")])


def test_run_training_with_an_evaluator_needs_an_evaluation_interval(world, tmp_path):
    from sid_fast.composition import run_training

    with pytest.raises(ValueError, match="eval.every_images"):
        run_training(_distill_config(world, tmp_path, 1), evaluator=object())


def test_data_free_run_starts_from_init_generator(world, tmp_path):
    """adversarial.init_generator with adversarial.enabled=false: continued data-free SiD from that start."""
    from safetensors.torch import load_file

    from sid_fast.composition import run_training
    from sid_fast.models.shapes import load_shapes_transformer, save_shapes_transformer

    start = load_shapes_transformer(world["teacher"])
    with torch.no_grad():
        for p in start.parameters():
            p.add_(0.05)
    init = save_shapes_transformer(start, tmp_path / "start.safetensors")
    config = _distill_config(world, tmp_path / "run", 2, ["adversarial.enabled=false", f"adversarial.init_generator={init}",
                                                          "train.fake_warmup_iters=5"])  # the generator never updates
    exported = load_file(run_training(config))
    for name, value in load_file(init).items():
        assert torch.equal(exported[f"transformer.{name}"], value.float()), name
