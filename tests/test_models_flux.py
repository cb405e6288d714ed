"""FLUX adapter: packing round-trips and matches FluxPipeline's, the adapter is bit-equal to a direct transformer
call, the Euler sampler reproduces FluxPipeline (guidance embedding, and embedding + true CFG), and SiD trains
in both guidance modes (tiny random components, no download)."""

import pytest
import torch
from diffusers import FluxPipeline

from sid_fast.api import distill
from sid_fast.config import MethodConfig, SiDConfig, TeacherConfig, TrainConfig
from sid_fast.encoders import PromptEncoder
from sid_fast.guidance import guided_velocity
from sid_fast.models import tiny_components
from sid_fast.models.flux import FluxAdapter, latent_image_ids, pack_latents, unpack_latents
from sid_fast.models.protocol import Conditioning
from sid_fast.models.registry import build_teacher
from sid_fast.sampler import euler_sample

PROMPTS = ["a red circle", "two blue squares"]


def test_pack_unpack_round_trip_and_match_diffusers():
    latents = torch.randn(2, 16, 6, 10)  # non-square, not a power of two
    packed = pack_latents(latents)
    assert packed.shape == (2, 15, 64)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 6, 10))
    assert torch.equal(unpack_latents(packed, 6, 10), latents)
    # diffusers unpacks from pixel sizes (vae factor 8): 48 x 80 pixels = a 6 x 10 latent
    assert torch.equal(FluxPipeline._unpack_latents(packed, 48, 80, 8), latents)
    assert torch.equal(latent_image_ids(6, 10), FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32))
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.randn(1, 16, 5, 4))


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_adapter_equals_direct_transformer_call(guidance_embeds):
    transformer = tiny_components.transformer("flux", "tiny" if guidance_embeds else "schnell-tiny")
    x_t, t = torch.randn(3, 16, 8, 6), torch.rand(3)
    cond = Conditioning(embeds=torch.randn(3, 7, 32), pooled=torch.randn(3, 32))
    guidance = torch.full((3,), 2.5) if guidance_embeds else None
    with torch.no_grad():
        ours = FluxAdapter(transformer)(x_t, t, cond.with_guidance(2.5) if guidance_embeds else cond)
        tokens = transformer(hidden_states=FluxPipeline._pack_latents(x_t, 3, 16, 8, 6), timestep=t, guidance=guidance,
                             pooled_projections=cond.pooled, encoder_hidden_states=cond.embeds,
                             txt_ids=torch.zeros(7, 3), img_ids=FluxPipeline._prepare_latent_image_ids(3, 4, 3, "cpu", torch.float32),
                             return_dict=False)[0]
    assert torch.equal(ours, FluxPipeline._unpack_latents(tokens, 64, 48, 8))


def test_generator_call_uses_guidance_one_and_modes_differ():
    adapter = FluxAdapter(tiny_components.transformer("flux", "tiny"))
    x_t, t = torch.randn(2, 16, 4, 4), torch.rand(2)
    cond = Conditioning(embeds=torch.randn(2, 5, 32), pooled=torch.randn(2, 32))
    uncond = Conditioning(embeds=torch.randn(1, 5, 32), pooled=torch.randn(1, 32)).expand_to(2)
    with torch.no_grad():
        assert torch.equal(adapter(x_t, t, cond), adapter(x_t, t, cond.with_guidance(1.0)))
        embed = guided_velocity(adapter, x_t, t, cond, uncond, 4.5)
        assert torch.equal(embed, adapter(x_t, t, cond.with_guidance(3.5)))  # `embed`: g = 3.5, no true CFG
        adapter.guidance_mode = "embed+cfg"
        both = guided_velocity(adapter, x_t, t, cond, uncond, 4.5)
        v_c, v_u = adapter(x_t, t, cond.with_guidance(4.5)), adapter(x_t, t, uncond.with_guidance(4.5))
    torch.testing.assert_close(both, v_u + 4.5 * (v_c - v_u), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(both, embed)


@pytest.mark.parametrize("mode", ["embed", "embed+cfg"])
def test_euler_sampler_matches_flux_pipeline(mode):
    pipe = tiny_components.pipeline("flux", "tiny")
    encoder = PromptEncoder(pipe, "flux", max_sequence_length=8)
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=8)
    cond, uncond = encoder.encode(PROMPTS), encoder.unconditional().expand_to(2)
    assert torch.equal(cond.embeds, embeds) and torch.equal(cond.pooled, pooled)

    z = torch.randn(2, 16, 8, 8)
    kappa = 4.5
    extra = {} if mode == "embed" else dict(true_cfg_scale=kappa, negative_prompt_embeds=uncond.embeds,
                                             negative_pooled_prompt_embeds=uncond.pooled)
    packed = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=32, width=32, num_inference_steps=4,
                  guidance_scale=3.5 if mode == "embed" else kappa, latents=pack_latents(z), output_type="latent",
                  **extra).images
    adapter = FluxAdapter(pipe.transformer, guidance_mode=mode, guidance=3.5)
    ours = euler_sample(adapter, z, cond, uncond=uncond, guidance_scale=kappa, sigmas=pipe.scheduler.sigmas)
    assert packed.abs().max() > 0.1
    torch.testing.assert_close(pack_latents(ours), packed, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["embed", "embed+cfg"])
def test_sid_trains_on_tiny_flux(tmp_path, mode):
    config = SiDConfig(teacher=TeacherConfig(kind="flux", preset="tiny", flux_guidance_mode=mode),
                       method=MethodConfig(num_steps=2, kappa_fake_loss=4.5, kappa_fake_gen=4.5, kappa_teacher=4.5),
                       train=TrainConfig(iterations=2, batch_size=2, out_dir=str(tmp_path), progress=False, log_every=1))
    bundle = build_teacher(config.teacher)
    assert bundle.sample_shape == (16, 8, 8) and bundle.teacher.guidance_mode == mode
    result = distill(bundle.teacher, bundle.conditions, bundle.sample_shape, config)
    assert len(result.history) == 2
    for record in result.history:
        assert torch.isfinite(torch.tensor([record["loss_fake"], record["loss_generator"]])).all()
