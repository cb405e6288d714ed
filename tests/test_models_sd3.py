"""SD3/SD3.5 adapter: bit-equal to a direct transformer call, the Euler sampler reproduces StableDiffusion3Pipeline,
prompt encoding equals the pipeline's encode_prompt, and SiD trains on it (tiny random components, no download)."""

import pytest
import torch

from sid_fast.api import distill
from sid_fast.config import MethodConfig, SiDConfig, TeacherConfig, TrainConfig
from sid_fast.encoders import PromptEncoder
from sid_fast.models import tiny_components
from sid_fast.models.protocol import Conditioning
from sid_fast.models.registry import build_teacher
from sid_fast.models.sd3 import SD3Adapter
from sid_fast.sampler import euler_sample

PROMPTS = ["a red circle", "two blue squares"]


@pytest.mark.parametrize("preset", ["tiny", "sd35-tiny"])
def test_adapter_equals_direct_transformer_call(preset):
    transformer = tiny_components.transformer("sd3", preset)
    x_t, t = torch.randn(3, 16, 8, 8), torch.rand(3)
    cond = Conditioning(embeds=torch.randn(3, 11, 32), pooled=torch.randn(3, 32))
    with torch.no_grad():
        ours = SD3Adapter(transformer)(x_t, t, cond)
        direct = transformer(hidden_states=x_t, timestep=1000 * t, encoder_hidden_states=cond.embeds,
                             pooled_projections=cond.pooled, return_dict=False)[0]
    assert torch.equal(ours, direct)
    if preset == "sd35-tiny":  # the SD3.5 architecture really is in use
        assert transformer.config.dual_attention_layers == (0,) and transformer.config.qk_norm == "rms_norm"


@pytest.mark.parametrize("preset", ["tiny", "sd35-tiny"])
def test_euler_sampler_matches_sd3_pipeline(preset):
    pipe = tiny_components.pipeline("sd3", preset)
    encoder = PromptEncoder(pipe, "sd3", max_sequence_length=8)
    with torch.no_grad():
        embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
            PROMPTS, None, None, do_classifier_free_guidance=True, negative_prompt="", max_sequence_length=8)
    cond, uncond = encoder.encode(PROMPTS), encoder.unconditional()
    assert torch.equal(cond.embeds, embeds) and torch.equal(cond.pooled, pooled)
    # the unconditional is encoded at batch 1 (the pipeline: batch 2): equal up to matmul batch-size rounding
    torch.testing.assert_close(uncond.embeds, neg_embeds[:1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(uncond.pooled, neg_pooled[:1], atol=1e-6, rtol=1e-6)

    z = torch.randn(2, 16, 8, 8)
    latents = pipe(prompt_embeds=embeds, negative_prompt_embeds=neg_embeds, pooled_prompt_embeds=pooled,
                   negative_pooled_prompt_embeds=neg_pooled, height=32, width=32, num_inference_steps=4,
                   guidance_scale=4.5, latents=z.clone(), output_type="latent").images
    ours = euler_sample(SD3Adapter(pipe.transformer), z, cond, uncond=uncond.expand_to(2), guidance_scale=4.5,
                        sigmas=pipe.scheduler.sigmas)
    assert latents.abs().max() > 0.1
    torch.testing.assert_close(ours, latents, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", ["tiny", "sd35-tiny"])
def test_sid_trains_on_tiny_sd3(tmp_path, preset):
    config = SiDConfig(teacher=TeacherConfig(kind="sd3", preset=preset),
                       method=MethodConfig(num_steps=2, kappa_fake_loss=4.5, kappa_fake_gen=4.5, kappa_teacher=4.5),
                       train=TrainConfig(iterations=2, batch_size=2, out_dir=str(tmp_path), progress=False, log_every=1))
    bundle = build_teacher(config.teacher)
    assert bundle.sample_shape == (16, 8, 8)
    before = [p.clone() for p in bundle.teacher.parameters()]
    result = distill(bundle.teacher, bundle.conditions, bundle.sample_shape, config)
    assert len(result.history) == 2
    for record in result.history:
        assert torch.isfinite(torch.tensor([record["loss_fake"], record["loss_generator"]])).all()
    assert all(torch.equal(a, b) for a, b in zip(before, bundle.teacher.parameters()))  # teacher stays frozen
    moved = [not torch.equal(a, b) for a, b in zip(before, result.generator.parameters())]
    assert any(moved)
