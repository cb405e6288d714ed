"""Errors in what the user gave are ONE line on stderr naming the thing, and exit status 2; bugs keep their traceback
(sid_fast/errors.py, docs/reliability.md). Every case goes through the real command (`sid_fast.cli.main`, in process)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sid_fast.cli import main


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Bad inputs of every kind, made once."""
    from safetensors.torch import save_file

    from sid_fast.checkpoint import write_manifest

    d = tmp_path_factory.mktemp("inputs")
    (d / "bad.yaml").write_text("train:\n  iterations: [1\n")
    (d / "list.yaml").write_text("- train\n- method\n")
    (d / "neg.yaml").write_text("optim:\n  lr_generator: -1\n")
    (d / "binary.txt").write_bytes(b"a red circle\n\x9e\x13\xfa\xff binary\n")
    (d / "nul.txt").write_bytes(b"\x00\x01\x02\x03")
    (d / "prompts.csv").write_text("a,b\n")
    (d / "empty.txt").write_text("\n  \n")
    (d / "good.txt").write_text("a red circle\n")
    (d / "a_file").write_text("not a directory\n")
    (d / "notparquet.parquet").write_bytes(b"PAR1 but not really")
    (d / "shards").mkdir()
    (d / "shards" / "manifest.json").write_bytes(b"\x89PNG\r\n\x1a\n")  # a binary file where the manifest should be
    flux = d / "flux-named-sd3"  # a teacher directory of another family
    (flux / "transformer").mkdir(parents=True)
    (flux / "transformer" / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    torn = d / "torn-config"  # a transformer config cut off mid-write
    (torn / "transformer").mkdir(parents=True)
    (torn / "transformer" / "config.json").write_text('{"_class_name": "SD3Transformer2DModel", "in_chan')
    # a run directory whose newest checkpoint has one flipped byte (the older one is intact)
    root = d / "run" / "checkpoints"
    for step in (1, 2):
        directory = root / f"step-{step:08d}"
        directory.mkdir(parents=True)
        save_file({"w": torch.arange(64.0)}, directory / "generator.safetensors")
        write_manifest(directory)
    (root / "latest").write_text("step-00000002")
    data = bytearray((root / "step-00000002" / "generator.safetensors").read_bytes())
    data[-3] ^= 0x01
    (root / "step-00000002" / "generator.safetensors").write_bytes(bytes(data))
    # a checkpoint of other networks (a tiny MLP) in a run directory resumed with an SD3 teacher
    from sid_fast.checkpoint import rng_state, save_checkpoint
    from sid_fast.config import OptimConfig
    from sid_fast.engine.local import LocalEngine
    from sid_fast.models.mlp import VelocityMLP

    engine = LocalEngine(VelocityMLP(2, 8, 1), VelocityMLP(2, 8, 1), VelocityMLP(2, 8, 1), OptimConfig(), ema_decay=0.0)
    save_checkpoint(d / "other" / "checkpoints", 1, engine, {"step": 1, "images_seen": 0, "conditions": {}},
                    rng_state(torch.Generator()))
    return d


SD3 = ["--teacher.kind=sd3", "--teacher.preset=tiny", "--train.progress=false"]

# (argv with {d} for the inputs directory, what the one line must contain: a string or a tuple of strings)
CASES = [
    # distill: config file, overrides, presets, teacher directories, shards, output directory, checkpoints
    (["distill", "{d}/bad.yaml"], "{d}/bad.yaml: invalid YAML at line 3, column 1"),
    (["distill", "{d}/list.yaml"], "{d}/list.yaml: a config file holds a mapping of sections"),
    (["distill", "{d}/missing.yaml"], "{d}/missing.yaml: config file does not exist"),
    (["distill", "{d}"], "{d}: is a directory, not a YAML config file"),
    (["distill", "{d}/neg.yaml"], "{d}/neg.yaml: config field optim.lr_generator: must be > 0, got -1.0"),
    (["distill", "--train.iterations=[1"], "override '--train.iterations=[1': the value is not valid YAML"),
    (["distill", "--train.iterations=many"], "config field train.iterations: expected int, got 'many'"),
    (["distill", "--train.nosuch=1"], "unknown config field(s) ['train.nosuch']"),
    (["distill", "--teacher.kind=nosuch"], "config field teacher.kind: unknown teacher family 'nosuch'"),
    (["distill", "--teacher.kind=sd3", "--teacher.preset=huge", "--train.out_dir={d}/o1"],
     "config field teacher.preset: unknown sd3 preset 'huge'"),
    (["distill", "--teacher.preset=nosuch", "--train.out_dir={d}/o2"], "unknown mixture preset 'nosuch'"),
    (["distill", "--teacher.kind=sd3", "--teacher.path={d}/nowhere", "--train.out_dir={d}/o3"],
     ("teacher.path", "{d}/nowhere", "does not exist")),
    (["distill", "--teacher.kind=flux", "--teacher.path={d}/flux-named-sd3", "--train.out_dir={d}/o4"],
     "{d}/flux-named-sd3/transformer/config.json: _class_name is 'SD3Transformer2DModel', but a flux teacher needs"),
    (["distill", "--teacher.kind=sd3", "--teacher.path={d}/torn-config", "--train.out_dir={d}/o4b"],
     "{d}/torn-config/transformer/config.json is not a JSON config (Unterminated string"),
    (["distill", "--data.shards={d}/nowhere"], "config field data.shards: '{d}/nowhere' is not a finished shard directory"),
    (["distill", *SD3, "--data.shards={d}/shards", "--train.out_dir={d}/o5"], "{d}/shards/manifest.json is unreadable"),
    (["distill", "--train.out_dir={d}/a_file"], "train.out_dir {d}/a_file: exists and is not a directory"),
    (["distill", *SD3, "--train.out_dir={d}/run"],
     "checkpoint {d}/run/checkpoints/step-00000002: file generator.safetensors fails its sha256 check; other "
     "checkpoints in {d}/run/checkpoints: ['step-00000001']"),
    (["distill", *SD3, "--train.out_dir={d}/other"],
     "checkpoint {d}/other/checkpoints/step-00000001 does not fit this run's networks"),
    # prepare: input files, output directories, encoders, shard directories
    (["prepare", "prompts", "{d}/binary.txt", "--out", "{d}/p1"], "{d}/binary.txt:2: not UTF-8 text (byte 0x9e at column 1)"),
    (["prepare", "prompts", "{d}/nul.txt", "--out", "{d}/p2"], "{d}/nul.txt:1: binary data (a NUL byte at column 1)"),
    (["prepare", "prompts", "{d}/missing.txt", "--out", "{d}/p3"], "prompt file {d}/missing.txt: does not exist"),
    (["prepare", "prompts", "{d}", "--out", "{d}/p4"], "prompt file {d}: is a directory"),
    (["prepare", "prompts", "{d}/prompts.csv", "--out", "{d}/p5"], "prompt file {d}/prompts.csv: unsupported type '.csv'"),
    (["prepare", "prompts", "{d}/notparquet.parquet", "--out", "{d}/p6"], "{d}/notparquet.parquet: not a readable parquet file"),
    (["prepare", "prompts", "{d}/empty.txt", "--out", "{d}/p7", "--no-progress"], "no usable input records in {d}/empty.txt"),
    (["prepare", "prompts", "{d}/good.txt", "--out", "{d}/a_file"], "--out {d}/a_file: exists and is not a directory"),
    (["prepare", "prompts", "{d}/good.txt", "--out", "{d}/p8", "--encoder", "nosuch"], "encoder 'nosuch': unknown family"),
    (["prepare", "prompts", "{d}/good.txt", "--out", "{d}/p9", "--encoder", "sd3"],
     "encoder 'sd3' needs the teacher's local diffusers directory"),
    (["prepare", "prompts", "{d}/good.txt", "--out", "{d}/p10", "--samples-per-shard", "0"], "--samples-per-shard must be >= 1"),
    (["prepare", "prompts", "{d}/good.txt", "--out", "{d}/p11", "--dtype", "float8"], "dtype 'float8': expected one of"),
    (["prepare", "images", "{d}/nowhere", "--out", "{d}/p12", "--resolution", "8"], "image input {d}/nowhere: does not exist"),
    (["prepare", "verify", "{d}/good.txt"], "shard directory {d}/good.txt: is a file, expected a directory"),
    (["prepare", "verify", "{d}/shards"], "{d}/shards/manifest.json is unreadable or altered"),
    (["prepare", "verify", "{d}/p13"], "shard directory {d}/p13: does not exist"),
    (["prepare", "nosuch", "x"], "argument {{prompts,images,verify}}: invalid choice: 'nosuch'"),
    # sample
    (["sample", "{d}/nowhere", "--preset", "tiny", "--prompt", "a"], "generator directory {d}/nowhere: does not exist"),
    (["sample", "{d}/shards", "--preset", "tiny", "--prompt", "a"], "{d}/shards/sid_sampler.json is missing"),
    (["sample", "{d}/shards", "--preset", "tiny", "--prompts-file", "{d}/binary.txt"], "{d}/binary.txt:2: not UTF-8 text"),
    (["sample", "{d}/shards", "--preset", "tiny", "--prompts-file", "{d}/empty.txt"], "prompt file {d}/empty.txt: has no prompts"),
    (["sample", "{d}/shards", "--preset", "tiny"], "give at least one --prompt or a --prompts-file"),
    (["sample", "{d}/shards", "--preset", "tiny", "--prompt", "a", "--out", "{d}/a_file/x.png"],
     "--out {d}/a_file: exists and is not a directory"),
    (["sample", "{d}/shards", "--prompt", "a"], "one of the arguments --teacher --preset is required"),
    # kernels
    (["kernels", "check", "no_such_module_x:f", "--op", "cfg_sid_generator_loss"],
     "no_such_module_x:f: cannot import module 'no_such_module_x'"),
    (["kernels", "check", "json:no_such_function", "--op", "cfg_sid_generator_loss"],
     "json:no_such_function: module 'json' has no attribute 'no_such_function'"),
    (["kernels", "check", "justaname", "--op", "cfg_sid_generator_loss"], "'justaname': expected MODULE:FUNCTION"),
    (["kernels", "check", "--op", "nosuch_op", "--backend", "cpp"], "--op nosuch_op: unknown op; known:"),
    (["kernels", "check", "--op", "cfg_sid_generator_loss", "--backend", "nosuch"],
     "--backend nosuch: op cfg_sid_generator_loss has no such backend"),
    (["kernels", "check", "--op", "cfg_sid_generator_loss", "--backend", "cpp", "--dtypes", "float33"],
     "--dtypes float33: unknown dtype 'float33'"),
    (["kernels", "bench", "--op", "cfg_sid_generator_loss", "--shape", "4,x"], "--shape 4,x: expected comma-separated integers"),
    # plan
    (["plan", "--resolution", "0"], "--resolution must be >= 1, got 0"),
    (["plan", "--teacher", "sd4"], "argument --teacher: invalid choice: 'sd4'"),
    (["plan", "--gpu-gib", "lots"], "argument --gpu-gib: invalid float value: 'lots'"),
    # demo (nothing is trained: the arguments are checked first)
    (["demo", "--world", "moon"], "argument --world: invalid choice: 'moon'"),
    (["demo", "--train.iterations=-1", "--out", "{d}/demo"], "config field train.iterations: must be >= 0"),
    (["demo", "--world", "mixture", "--method.nosuch=1", "--out", "{d}/demo"], "unknown config field(s) ['method.nosuch']"),
    (["demo", "--out", "{d}/a_file"], "--out {d}/a_file: exists and is not a directory"),
    (["demo", "--prompts", "0"], "--prompts must be >= 1, got 0"),
    # pretrain, and the command itself
    (["pretrain", "--steps", "-3"], "pretrain option steps"),
    (["nosuch"], "unknown command 'nosuch'"),
]


@pytest.mark.parametrize("argv,expected", CASES, ids=[" ".join(argv)[:60] for argv, _ in CASES])
def test_user_errors_are_one_line_and_status_2(inputs, argv, expected, capsys, quiet_libraries):
    argv = [a.format(d=inputs) for a in argv]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, (code, err[-2000:])
    line = error_line(err, f"sid-fast {argv[0]}" if argv[0] != "nosuch" else "sid-fast")
    for part in (expected,) if isinstance(expected, str) else expected:  # every part, in the one line
        assert part.format(d=inputs) in line, line


def error_line(err: str, prefix: str) -> str:
    """The one error line: the last line of stderr, the only one with `: error:`, no traceback anywhere.
    (A library's warning printed earlier in the run may precede it; a progress bar is cleared first.)"""
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]
    assert lines and "Traceback" not in err, err[-3000:]
    assert [line for line in lines if ": error: " in line] == lines[-1:], err[-3000:]
    assert lines[-1].startswith(f"{prefix}: error: "), lines[-1]
    return lines[-1]


def test_a_bug_keeps_its_traceback(monkeypatch, inputs):
    """What is not the user's fault propagates: a library's ValueError, a KeyError, a ValueError from a builtin."""
    import sid_fast.engine.planner as planner

    def library_value_error(*args, **kwargs):
        return json.loads("{not json")  # raised inside the json module: a bug of ours that fed it

    monkeypatch.setattr(planner, "plan", library_value_error)
    with pytest.raises(json.JSONDecodeError):
        main(["plan"])
    monkeypatch.setattr(planner, "plan", lambda *a, **k: {}["total"])
    with pytest.raises(KeyError):
        main(["plan"])
    monkeypatch.setattr(planner, "plan", lambda *a, **k: int("12 GiB"))  # a builtin's ValueError, no raise statement
    with pytest.raises(ValueError, match="invalid literal"):
        main(["plan"])


def test_the_installed_command_prints_one_line_and_exits_2(inputs):
    """The same through a real process: `python -m sid_fast.cli prepare prompts BINARY --out DIR`."""
    result = subprocess.run([sys.executable, "-m", "sid_fast.cli", "prepare", "prompts", str(inputs / "binary.txt"),
                             "--out", str(inputs / "p-cli")], capture_output=True, text=True, timeout=240,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr[-3000:]
    assert error_line(result.stderr, "sid-fast prepare") == (f"sid-fast prepare: error: {inputs}/binary.txt:2: not UTF-8 "
                                                              "text (byte 0x9e at column 1): a prompt file holds UTF-8 text")


def test_a_launcher_prints_one_line_and_exits_2(inputs):
    """The DeepSpeed launchers report what the user can fix as `sid-fast` does: one line, status 2."""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(root / "launchers" / "sd3_medium.py"), "--dry-run",
                             "--train.nosuch=1"], capture_output=True, text=True, timeout=240,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr[-3000:]
    assert "unknown config field(s) ['train.nosuch']" in error_line(result.stderr, "launchers/sd3_medium.py")
