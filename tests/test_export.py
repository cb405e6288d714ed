"""Teacher directories in (checks that name the file), distilled generators out (diffusers directory + SiD
scheduler) reproducing the trainer's own samples, the LoRA fake score, and `sid-fast sample`."""

import json

import diffusers
import pytest
import torch
from safetensors.torch import save_file

from sid_fast.api import distill
from sid_fast.config import MethodConfig, SiDConfig, TeacherConfig, TrainConfig
from sid_fast.encoders import PromptEncoder
from sid_fast.engine import LocalEngine
from sid_fast.export import SiDScheduler, export_from_state_dict, export_generator, load_generator, load_sid_pipeline
from sid_fast.models import tiny_components
from sid_fast.models.diffusers_family import check_teacher_dir, load_transformer
from sid_fast.models.flux import pack_latents, unpack_latents
from sid_fast.models.lora import lora_parameter_count, make_lora_fake_score
from sid_fast.models.registry import build_teacher
from sid_fast.sampler import few_step_sample


def _config(family, tmp_path, **teacher):
    return SiDConfig(teacher=TeacherConfig(kind=family, preset="tiny", **teacher),
                     method=MethodConfig(num_steps=3, kappa_fake_loss=4.5, kappa_fake_gen=4.5, kappa_teacher=4.5),
                     optim=dict_to_optim(), train=TrainConfig(iterations=2, batch_size=2, out_dir=str(tmp_path / "run"),
                                                             progress=False))


def dict_to_optim():
    from sid_fast.config import OptimConfig

    return OptimConfig(lr_generator=1e-3, lr_fake=1e-3)  # large enough that the generator leaves the teacher


@pytest.mark.parametrize("family,noise", [("sd3", "fresh"), ("flux", "ddim"), ("sana", "fresh")])
def test_exported_generator_reproduces_trainer_samples_in_diffusers(tmp_path, family, noise):
    config = _config(family, tmp_path)
    bundle = build_teacher(config.teacher)
    result = distill(bundle.teacher, bundle.conditions, bundle.sample_shape, config)
    out = export_generator(result.generator, tmp_path / "export", num_steps=3, noise=noise)
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors").is_file()

    cond = bundle.conditions.sample(2, torch.Generator().manual_seed(1))
    z = torch.randn(2, *bundle.sample_shape)
    ours = result.sample(cond, z=z, noise=noise, seed=5)
    teacher_like = few_step_sample(bundle.teacher, z, cond, 3, noise=noise, rng=torch.Generator().manual_seed(5))
    assert not torch.allclose(ours, teacher_like, atol=1e-3)  # training changed the generator

    reloaded = load_generator(out)  # the project's own path
    again = few_step_sample(reloaded, z, cond, 3, noise=noise, rng=torch.Generator().manual_seed(5))
    assert torch.equal(again, ours)
    save_file(result.trainer.engine.generator_state_dict(), tmp_path / "generator.safetensors")  # what a run writes
    out2 = export_from_state_dict(config.teacher, tmp_path / "generator.safetensors", tmp_path / "export2", 3, noise=noise)
    assert torch.equal(few_step_sample(load_generator(out2), z, cond, 3, noise=noise, rng=torch.Generator().manual_seed(5)), ours)

    # diffusers: the family pipeline with the exported transformer and the SiD scheduler, guidance_scale = 1
    transformer = getattr(diffusers, type(result.generator.transformer).__name__).from_pretrained(str(out / "transformer"))
    scheduler = SiDScheduler.from_pretrained(str(out / "scheduler"))
    scheduler.noise_generator = torch.Generator().manual_seed(5)
    pipe = tiny_components.pipeline(family, "tiny")
    pipe.transformer, pipe.scheduler = transformer, scheduler
    kwargs = dict(height=32, width=32, num_inference_steps=3, guidance_scale=1.0, output_type="latent")
    if family == "sd3":
        images = pipe(prompt_embeds=cond.embeds, pooled_prompt_embeds=cond.pooled, latents=z.clone(), **kwargs).images
    elif family == "flux":
        images = unpack_latents(pipe(prompt_embeds=cond.embeds, pooled_prompt_embeds=cond.pooled,
                                     latents=pack_latents(z), **kwargs).images, 8, 8)
    else:
        images = pipe(prompt_embeds=cond.embeds, prompt_attention_mask=cond.mask, latents=z.clone(),
                      use_resolution_binning=False, **kwargs).images
    torch.testing.assert_close(images, ours, atol=1e-5, rtol=1e-5)


def test_load_sid_pipeline_from_teacher_and_export_dirs(tmp_path):
    tiny_components.save_teacher("sd3", tmp_path / "teacher")
    teacher = load_transformer(tmp_path / "teacher", "sd3")
    from sid_fast.models.sd3 import SD3Adapter

    out = export_generator(SD3Adapter(teacher), tmp_path / "export", num_steps=2, noise="fixed")
    pipe = load_sid_pipeline(tmp_path / "teacher", out)
    assert isinstance(pipe.scheduler, SiDScheduler) and pipe.scheduler.config.noise == "fixed"
    z = torch.randn(1, 16, 8, 8)
    latents = pipe("a red circle", num_inference_steps=2, guidance_scale=1.0, height=32, width=32, latents=z.clone(),
                   max_sequence_length=8, output_type="latent").images
    encoder = PromptEncoder.from_pretrained(tmp_path / "teacher", "sd3", max_sequence_length=8)
    ours = few_step_sample(load_generator(out), z, encoder.encode(["a red circle"]), 2, noise="fixed")
    encoder.release()
    torch.testing.assert_close(latents, ours, atol=1e-5, rtol=1e-5)


def test_teacher_directory_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_teacher_dir(tmp_path / "nowhere", "sd3")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/transformer/config\.json is missing"):
        check_teacher_dir(tmp_path / "empty", "sd3")
    tiny_components.save_teacher("sd3", tmp_path / "sd3")
    with pytest.raises(ValueError, match=r"sd3/transformer/config\.json: _class_name is 'SD3Transformer2DModel', "
                                         r"but a flux teacher needs 'FluxTransformer2DModel'"):
        check_teacher_dir(tmp_path / "sd3", "flux")
    vae_file = tmp_path / "sd3" / "vae" / "config.json"
    vae = json.loads(vae_file.read_text())
    vae["latent_channels"] = 4
    vae_file.write_text(json.dumps(vae))
    with pytest.raises(ValueError, match=r"config\.json: in_channels=16 does not match 4 latent channels of .*vae/config\.json; "
                                         r"expected in_channels=4 for latents of shape \(B, 4, h, w\)"):
        load_transformer(tmp_path / "sd3", "sd3")
    with pytest.raises(ValueError, match="teacher.path"):
        TeacherConfig(kind="sd3", path=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="teacher.flux_guidance_mode"):
        TeacherConfig(kind="flux", flux_guidance_mode="cfg")


def test_lora_fake_score_shares_teacher_weights_and_trains(tmp_path):
    bundle = build_teacher(TeacherConfig(kind="sd3", preset="tiny"))
    teacher = bundle.teacher.requires_grad_(False)
    fake = make_lora_fake_score(teacher, rank=2)
    base = dict(teacher.named_parameters())
    shared = [p for name, p in fake.named_parameters() if "lora_" not in name]
    assert {p.data_ptr() for p in shared} <= {p.data_ptr() for p in base.values()}  # no copy of the teacher
    trainable = [p for p in fake.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == lora_parameter_count(fake) > 0
    cond = bundle.conditions.sample(2, torch.Generator().manual_seed(0))
    x_t, t = torch.randn(2, *bundle.sample_shape), torch.rand(2)
    with torch.no_grad():
        v_teacher = teacher(x_t, t, cond)
        assert torch.equal(fake(x_t, t, cond), v_teacher)  # B = 0 at init: the fake starts as the teacher

    config = _config("sd3", tmp_path)
    generator = make_generator(teacher)
    engine = LocalEngine(teacher, fake, generator, config.optim)
    distill(teacher, bundle.conditions, bundle.sample_shape, config, engine=engine)
    with torch.no_grad():
        assert torch.equal(teacher(x_t, t, cond), v_teacher)  # teacher untouched
        assert not torch.allclose(fake(x_t, t, cond), v_teacher)  # adapters learned


def make_generator(teacher):
    import copy

    return copy.deepcopy(teacher).requires_grad_(True)


def test_sample_command_writes_png_grid(tmp_path):
    from PIL import Image

    from sid_fast.cli import main
    from sid_fast.models.sd3 import SD3Adapter

    transformer = tiny_components.seeded(lambda: tiny_components.transformer("sd3", "tiny"), 0)
    out = export_generator(SD3Adapter(transformer), tmp_path / "export", num_steps=2)
    grid = tmp_path / "grid.png"
    code = main(["sample", str(out), "--preset", "tiny", "--prompt", "a red circle", "--prompt", "a blue square",
                 "--prompt", "two cats", "--out", str(grid), "--seed", "1"])
    assert code == 0
    image = Image.open(grid)
    assert image.size == (2 * 32, 2 * 32)  # 3 images of 32 px in a 2 x 2 grid
    assert len(set(image.getdata())) > 10


def test_registry_builds_teacher_from_directory_with_prompt_file(tmp_path):
    tiny_components.save_teacher("sana", tmp_path / "teacher")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\ntwo blue squares\n")
    config = TeacherConfig(kind="sana", path=str(tmp_path / "teacher"), prompts=str(prompts), max_sequence_length=8)
    bundle = build_teacher(config)
    assert bundle.sample_shape == (8, 8, 8) and len(bundle.conditions) == 2
    encoder = PromptEncoder.from_pretrained(tmp_path / "teacher", "sana", max_sequence_length=8)
    assert torch.equal(bundle.conditions.bank.embeds, encoder.encode(["a red circle", "two blue squares"]).embeds)
    encoder.release()
    # without prompts the conditions come from prepared shards (data.shards), which run_training requires
    assert build_teacher(TeacherConfig(kind="sana", path=str(tmp_path / "teacher"))).conditions is None
    with pytest.raises(ValueError, match="teacher.resolution"):
        build_teacher(TeacherConfig(kind="sana", path=str(tmp_path / "teacher"), prompts=str(prompts), resolution=30))
