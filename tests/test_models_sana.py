"""SANA adapter: bit-equal to a direct transformer call in both timestep conventions (RF 1000·t, SANA-Sprint t),
the Euler sampler reproduces SanaPipeline, prompt encoding (instruction prefix, mask) equals the pipeline's,
and SiD trains on it (tiny random components, no download)."""

import pytest
import torch

from sid_fast.api import distill
from sid_fast.config import MethodConfig, SiDConfig, TeacherConfig, TrainConfig
from sid_fast.encoders import PromptEncoder
from sid_fast.models import tiny_components
from sid_fast.models.protocol import Conditioning
from sid_fast.models.registry import build_teacher
from sid_fast.models.sana import SanaAdapter
from sid_fast.sampler import euler_sample

PROMPTS = ["a red circle", "two blue squares"]


@pytest.mark.parametrize("preset,mode,timestep_of", [
    ("tiny", "auto", lambda t: 1000 * t), ("tiny", "t", lambda t: t), ("sprint-tiny", "auto", lambda t: t),
])
def test_adapter_equals_direct_transformer_call(preset, mode, timestep_of):
    transformer = tiny_components.transformer("sana", preset)
    x_t, t = torch.randn(3, 8, 8, 8), torch.rand(3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    cond = Conditioning(embeds=torch.randn(3, 5, 32), mask=mask)
    guidance = None
    if transformer.config.guidance_embeds:
        cond = cond.with_guidance(4.5)
        guidance = torch.full((3,), 4.5) * transformer.config.guidance_embeds_scale
    with torch.no_grad():
        ours = SanaAdapter(transformer, timestep_mode=mode)(x_t, t, cond)
        direct = transformer(x_t, encoder_hidden_states=cond.embeds, encoder_attention_mask=mask,
                             timestep=timestep_of(t), guidance=guidance, return_dict=False)[0]
        unmasked = SanaAdapter(transformer, timestep_mode=mode)(x_t, t, Conditioning(embeds=cond.embeds, guidance=cond.guidance))
    assert torch.equal(ours, direct)
    assert not torch.allclose(ours, unmasked)  # the mask is honoured


def test_euler_sampler_and_encoder_match_sana_pipeline():
    pipe = tiny_components.pipeline("sana", "tiny")
    instruction = tiny_components.TINY_INSTRUCTION
    encoder = PromptEncoder(pipe, "sana", max_sequence_length=8, instruction=instruction)
    with torch.no_grad():
        embeds, mask, neg_embeds, neg_mask = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True, negative_prompt="",
                                                                max_sequence_length=8, complex_human_instruction=instruction)
    cond, uncond = encoder.encode(PROMPTS), encoder.unconditional()
    assert torch.equal(cond.embeds, embeds) and torch.equal(cond.mask, mask)
    torch.testing.assert_close(uncond.embeds, neg_embeds[:1], atol=1e-6, rtol=1e-6)
    assert torch.equal(uncond.mask, neg_mask[:1])
    mixed = encoder.encode(["", PROMPTS[1]])  # empty prompts get no instruction prefix, order kept
    torch.testing.assert_close(mixed[0:1].embeds, uncond.embeds, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mixed[1:2].embeds, cond[1:2].embeds, atol=1e-6, rtol=1e-6)

    z = torch.randn(2, 8, 8, 8)
    latents = pipe(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt=None, negative_prompt_embeds=neg_embeds,
                   negative_prompt_attention_mask=neg_mask, height=32, width=32, use_resolution_binning=False,
                   num_inference_steps=4, guidance_scale=4.5, latents=z.clone(), output_type="latent").images
    ours = euler_sample(SanaAdapter(pipe.transformer), z, cond, uncond=uncond.expand_to(2), guidance_scale=4.5,
                        sigmas=pipe.scheduler.sigmas)
    assert latents.abs().max() > 0.1
    torch.testing.assert_close(ours, latents, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", ["tiny", "sprint-tiny"])
def test_sid_trains_on_tiny_sana(tmp_path, preset):
    config = SiDConfig(teacher=TeacherConfig(kind="sana", preset=preset),
                       method=MethodConfig(num_steps=2, kappa_fake_loss=4.5, kappa_fake_gen=4.5, kappa_teacher=4.5),
                       train=TrainConfig(iterations=2, batch_size=2, out_dir=str(tmp_path), progress=False, log_every=1))
    bundle = build_teacher(config.teacher)
    assert bundle.sample_shape == (8, 8, 8)
    assert bundle.teacher.timestep_mode == ("t" if preset == "sprint-tiny" else "1000t")
    result = distill(bundle.teacher, bundle.conditions, bundle.sample_shape, config)
    assert len(result.history) == 2
    for record in result.history:
        assert torch.isfinite(torch.tensor([record["loss_fake"], record["loss_generator"]])).all()
