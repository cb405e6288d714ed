"""`sid-fast distill` end to end on a real-family teacher directory: prompts prepared into shards once by the
teacher's own encoders, SiD with a LoRA fake score, export to a diffusers directory that reloads."""


import torch
from safetensors.torch import load_file

from sid_fast.cli import main
from sid_fast.models.tiny_components import save_teacher


def test_distill_from_a_teacher_directory_and_prompt_shards(tmp_path):
    save_teacher("sd3", tmp_path / "sd3")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square")) + "\n")
    assert main(["prepare", "prompts", str(prompts), "--out", str(tmp_path / "shards"), "--encoder", "sd3",
                 "--teacher-path", str(tmp_path / "sd3"), "--samples-per-shard", "4", "--no-progress"]) == 0
    out = tmp_path / "run"
    assert main(["distill", "--teacher.kind=sd3", f"--teacher.path={tmp_path / 'sd3'}", "--teacher.fake_lora_rank=2",
                 f"--data.shards={tmp_path / 'shards'}", "--data.num_workers=0", "--data.shuffle_buffer=2",
                 "--method.num_steps=2", "--train.iterations=2", "--train.batch_size=2", "--train.progress=false",
                 f"--train.out_dir={out}"]) == 0
    state = load_file(out / "generator.safetensors")
    assert all(torch.isfinite(v).all() for v in state.values())
    assert (out / "generator-diffusers" / "scheduler").is_dir()
    from sid_fast.export import load_generator

    generator = load_generator(out / "generator-diffusers")
    reloaded = {k: v for k, v in generator.state_dict().items()}
    for name, value in state.items():
        torch.testing.assert_close(reloaded[name], value)
    # the LoRA fake score trained adapters only: the checkpoint's fake score carries lora weights
    checkpoint = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert any("lora_" in k for k in load_file(checkpoint / "fake_score.safetensors"))


def test_teacher_directory_without_prompts_or_shards_is_refused(tmp_path, capsys):
    save_teacher("sd3", tmp_path / "sd3")
    code = main(["distill", "--teacher.kind=sd3", f"--teacher.path={tmp_path / 'sd3'}", "--train.iterations=1",
                 f"--train.out_dir={tmp_path / 'run'}"])
    assert code == 2
    assert "data.shards" in capsys.readouterr().err


def test_shards_of_another_teacher_are_refused(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    assert main(["prepare", "prompts", str(prompts), "--out", str(tmp_path / "shards"), "--encoder", "tiny",
                 "--no-progress"]) == 0
    save_teacher("sd3", tmp_path / "sd3")
    code = main(["distill", "--teacher.kind=sd3", f"--teacher.path={tmp_path / 'sd3'}", f"--data.shards={tmp_path / 'shards'}",
                 "--data.num_workers=0", "--train.iterations=1", f"--train.out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and "sd3:" in err and "tiny" in err, err


def test_data_aided_distill_from_a_data_free_generator(tmp_path):
    """`sid-fast distill --adversarial.enabled=true` on the exact mixture: starts from a data-free generator file,
    real samples from the mixture, the adversarial term active after its warm-up."""
    import json

    common = ["--teacher.kind=mixture", "--teacher.preset=ring8", "--method.num_steps=1", "--method.kappa_teacher=1",
              "--method.kappa_fake_gen=1", "--method.kappa_fake_loss=1", "--train.batch_size=64",
              "--train.progress=false", "--train.log_every=1", "--health.tensorboard=false"]
    assert main(["distill", *common, "--train.iterations=3", f"--train.out_dir={tmp_path / 'free'}"]) == 0
    assert main(["distill", *common, "--train.iterations=6", "--adversarial.enabled=true",
                 f"--adversarial.init_generator={tmp_path / 'free' / 'generator.safetensors'}",
                 "--adversarial.generator_warmup_images=256", "--adversarial.adversarial_from_images=512",
                 f"--train.out_dir={tmp_path / 'aided'}"]) == 0
    log = [json.loads(line) for line in (tmp_path / "aided" / "log.jsonl").read_text().splitlines()]
    assert any(row.get("loss_adv") is not None and row["loss_adv"] > 0 for row in log), log[-1]
    assert not any("loss_generator" in row and row["images_seen"] <= 256 for row in log)
