"""What makes `sid-fast demo`'s fresh run differ between machines (issue 15 item 4).

Runs the first N iterations of the demo's fresh SiD run (the preset sid_fast/presets/shapes_demo.yaml, the demo's
prompt shards, seed 0) in this process and prints the losses and a sha256 of the final generator weights, so two
invocations can be compared bit for bit:

    OMP_NUM_THREADS=1 python benchmarks/studies/demo_determinism.py --threads 1 --iterations 20
    OMP_NUM_THREADS=2 python benchmarks/studies/demo_determinism.py --threads 2 --iterations 20
    ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2 python benchmarks/studies/demo_determinism.py --threads 1   # as on a CPU without AVX-512

Each run appends one JSON line (threads, CPU model and flags, torch version, losses, weight hash) to
benchmarks/results/demo_determinism.jsonl.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def cpu_description() -> dict:
    info = {"machine": platform.machine()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["simd"] = sorted(f for f in flags if f.startswith(("avx", "fma", "amx")))
                break
    except OSError:
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, required=True, help="torch.set_num_threads for the run")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--shards", default="runs/demo/prompts", help="the demo's prompt shards (prepared if absent)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/demo_determinism.jsonl"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    from sid_fast.demo import shapes as demo
    from sid_fast.encoders.minilm import MiniLMEncoder

    shards = Path(args.shards)
    if not (shards / "manifest.json").is_file():
        shards.parent.mkdir(parents=True, exist_ok=True)
        shards = demo.prepare_shards(shards.parent, MiniLMEncoder(), progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        config = demo.fresh_config(Path(tmp), [f"train.iterations={args.iterations}", f"data.shards={shards}",
                                               "train.log_every=1", "train.ckpt_every=0", "health.tensorboard=false"],
                                   seed=0, full=False, progress=False)
        generator, _, seconds = demo.train_fresh(config, progress=False)
        log = [json.loads(line) for line in (Path(tmp) / "sid-fresh" / "log.jsonl").read_text().splitlines()]
    digest = hashlib.sha256()
    for name, value in sorted(generator.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    isa = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR") if k in os.environ}
    row = {"threads": args.threads, "iterations": args.iterations, "cpu": cpu_description(), "isa_limits": isa,
           "torch": torch.__version__, "seconds": round(seconds, 1),
           "loss_fake": [r["loss_fake"] for r in log], "loss_generator": [r.get("loss_generator") for r in log],
           "generator_sha256": digest.hexdigest()}
    with open(args.out, "a") as handle:
        handle.write(json.dumps(row) + "\n")
    print(json.dumps({k: row[k] for k in ("threads", "seconds", "generator_sha256")}), file=sys.stderr)
    print("last losses:", row["loss_fake"][-1], row["loss_generator"][-1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
