"""Launchers: `--dry-run` prints config and plan without loading weights; the default launcher trains under
`deepspeed --num_gpus 2`; the generated DeepSpeed config says exactly what the sid_fast config asks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ports import free_port

from sid_fast.config import load_config
from sid_fast.engine.ds_config import network_config
from sid_fast.engine.planner import GIB, MODELS, PlanOptions, plan

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = {"flux_large": "flux-dev", "sd35_large": "sd35-large", "sd35_medium": "sd35-medium",
             "sd3_medium": "sd3-medium", "sana": "sana-1.6b"}
ENV = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def common():
    sys.path.insert(0, str(ROOT / "launchers"))
    import common as module

    yield module
    sys.path.remove(str(ROOT / "launchers"))


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_dry_run_prints_config_and_plan(common, name, capsys):
    # teacher.path is unset: a dry run must not touch weights
    assert common.main(name, lambda: MODELS[LAUNCHERS[name]], ["--dry-run", "--gpus-per-node", "8", "--nodes", "1",
                                                                "--local_rank=0", "--train.grad_accum=16"]) == 0
    out = capsys.readouterr().out
    config = load_config(ROOT / "launchers" / "configs" / f"{name}.yaml", ["train.grad_accum=16"])
    assert "kind: deepspeed" in out and "grad_accum: 16" in out
    assert '"gradient_clipping": 0.0' in out and '"gradient_accumulation_steps": 16' in out
    expected = plan(MODELS[LAUNCHERS[name]], PlanOptions(resolution=config.teacher.resolution, micro_batch=config.train.batch_size,
                                                         activation_checkpointing=config.engine.activation_checkpointing))
    assert f"total {expected['total'] / GIB:.1f} GiB per GPU" in out
    assert "fits" in out  # every shipped preset fits one 8×80 GB node by the planner


def test_launcher_script_entry_point():
    result = subprocess.run([sys.executable, "launchers/sd3_medium.py", "--dry-run", "--nodes", "2"], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "8 × 2 GPUs" not in result.stdout and "× 16 GPUs" in result.stdout


def test_ds_config_follows_sid_config(tmp_path):
    config = load_config(None, ["optim.grad_clip=0.5", "train.batch_size=3", "train.grad_accum=2", "engine.bf16=true"])
    ds = network_config(config.engine, config.optim, config.train, 1e-4, use_ds_optimizer=True)
    assert ds["gradient_clipping"] == 0.5 and ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2 and ds["bf16"]["enabled"]
    assert ds["optimizer"]["params"]["betas"] == [0.0, 0.999] and ds["zero_optimization"]["stage"] == 3
    assert "optimizer" not in network_config(config.engine, config.optim, config.train, None, use_ds_optimizer=True)
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"gradient_clipping": 1.0}))
    config = load_config(None, [f"engine.ds_config={user}"])
    with pytest.raises(ValueError, match="gradient_clipping=1.0 but optim.grad_clip"):
        network_config(config.engine, config.optim, config.train, 1e-4, use_ds_optimizer=False)
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 123}}))
    merged = network_config(config.engine, config.optim, config.train, 1e-4, use_ds_optimizer=False)
    assert merged["zero_optimization"]["reduce_bucket_size"] == 123 and merged["zero_optimization"]["stage"] == 3


def test_default_launcher_dry_run(common, capsys):
    sys.path.insert(0, str(ROOT / "launchers"))
    import default

    ring8 = ROOT / "sid_fast" / "presets" / "mixture_ring8.yaml"
    assert common.main("default", default.plan_spec, ["--dry-run", "--gpus-per-node", "2"], base_yaml=ring8) == 0
    out = capsys.readouterr().out
    assert "preset: ring8" in out and "kind: deepspeed" in out and "2×80 GB: fits" in out


def test_launcher_trains_under_deepspeed(tmp_path):
    """`deepspeed --num_gpus 2 launchers/sd3_medium.py` with its JSON, activation checkpointing and gradient
    accumulation, on the tiny SD3 DiT built in code (fp32 on CPU)."""
    out = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus=2", f"--master_port={free_port()}",
           "launchers/sd3_medium.py", "--teacher.preset=tiny", "--teacher.dtype=float32", "--teacher.resolution=0",
           "--engine.bf16=false", "--engine.optimizer=torch", "--train.batch_size=2", "--train.grad_accum=2",
           "--train.iterations=2", "--train.progress=false", "--train.log_every=1", f"--train.out_dir={out}"]
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    # two iterations × (fake + generator) × micro-batch 2 × accumulation 2 × 2 ranks
    assert records[-1]["images_seen"] == 2 * 2 * 2 * 2 * 2
    assert all(r["grad_norm_fake"] > 0 and r["grad_norm_generator"] > 0 for r in records)
    assert (out / "generator.safetensors").is_file() and (out / "checkpoints" / "latest").is_file()
