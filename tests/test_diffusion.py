"""The diffusion-estimator paradigm (densediff/paradigms/diffusion.py): its forward processes against their
formulas and diffusers, which weights each adapter trains, DMP's DDIM variants, and the real CLI."""

import pytest
import torch
from conftest import FAST, read_metrics, run_cli
from diffusers import DDIMScheduler

from densediff.data.procedural import ProceduralScenes
from densediff.inference.predictor import InferenceOptions, denoise
from densediff.paradigms import DiffusionEstimator
from densediff.paradigms.denoising import latent_valid_mask
from densediff.run import ASSETS

TINY = str(ASSETS / "tiny")


@pytest.fixture(scope="module")
def concat_model():
    return DiffusionEstimator({"path": TINY}, task="depth", noise="gaussian")


@pytest.fixture(scope="module")
def dmp_model():
    return DiffusionEstimator({"path": TINY, "unet_in_channels": 4}, {"kind": "lora_self_attn", "rank": 4},
                              task="normals", conditioning="interpolate", latent="sample")


def test_v_prediction_target_and_noising_match_diffusers(concat_model):
    scheduler = DDIMScheduler.from_config(concat_model.estimator.scheduler_config)
    g = torch.Generator().manual_seed(0)
    y, x = torch.randn(3, 4, 8, 10, generator=g), torch.randn(3, 4, 8, 10, generator=g)
    t = torch.tensor([0, 500, 999])
    torch.manual_seed(1)
    unet_input, target = concat_model.noisy_input(y, x, t)
    torch.manual_seed(1)
    noise = torch.randn_like(y)  # the same draw the model made
    assert torch.allclose(unet_input[:, :4], x) and torch.allclose(unet_input[:, 4:], scheduler.add_noise(y, noise, t),
                                                                   atol=1e-6)
    assert torch.allclose(target, scheduler.get_velocity(y, noise, t), atol=1e-6)  # v = sqrt(a) n - sqrt(1-a) y


def test_interpolation_forward_process_uses_the_image_latent_as_noise(dmp_model):
    g = torch.Generator().manual_seed(0)
    y, x = torch.randn(2, 4, 8, 10, generator=g), torch.randn(2, 4, 8, 10, generator=g)
    t = torch.tensor([10, 900])
    unet_input, target = dmp_model.noisy_input(y, x, t)
    a = dmp_model.alphas_cumprod[t][:, None, None, None]
    assert unet_input.shape[1] == 4  # DMP keeps SD's 4 input channels
    assert torch.allclose(unet_input, a.sqrt() * y + (1 - a).sqrt() * x, atol=1e-6)
    assert torch.allclose(target, a.sqrt() * x - (1 - a).sqrt() * y, atol=1e-6)


def test_lora_self_attn_trains_only_self_attention_and_the_narrowed_conv_in(dmp_model):
    trainable = [name for name, p in dmp_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".attn1." in n for n in trainable)
    assert dmp_model.estimator.unet.conv_in.in_channels == 4


def test_latent_mask_needs_the_whole_footprint_valid():
    valid = torch.ones(1, 8, 8, dtype=torch.bool)
    valid[0, 0, 0] = False
    mask = latent_valid_mask(valid, 4)
    assert mask.shape == (1, 1, 2, 2) and mask.sum() == 3 and not mask[0, 0, 0, 0]


def test_dmp_oracle_ddim_steps_towards_the_true_image_latent(dmp_model):
    rgb = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(0))
    estimator = dmp_model.estimator.eval()
    original = denoise(estimator, rgb, InferenceOptions(steps=5, timestep_spacing="leading",
                                                        final_step="prev_sample"))
    oracle = denoise(estimator, rgb, InferenceOptions(steps=5, timestep_spacing="leading",
                                                      final_step="prev_sample", ddim="oracle"))
    assert original.shape == oracle.shape == (1, 3, 32, 40) and not torch.allclose(original, oracle)
    # one step by hand: x_T = image latent, t = 801 (leading, 5 steps), x_prev = sqrt(a') x0 + sqrt(1 - a') x
    one = denoise(estimator, rgb, InferenceOptions(steps=1, timestep_spacing="leading", final_step="prev_sample",
                                                   ddim="oracle"))
    with torch.no_grad():
        x = estimator.encode_rgb(rgb)
        v = estimator.unet(x, 1, encoder_hidden_states=estimator.empty_text_embedding).sample
        a = dmp_model.alphas_cumprod[1]
        x0 = a.sqrt() * x - (1 - a).sqrt() * v
        a_prev = DDIMScheduler.from_config(estimator.scheduler_config).final_alpha_cumprod  # prev t < 0: alpha_0
        expected = estimator.vae.decode((a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * x) / estimator.scaling_factor).sample
    assert torch.allclose(one, expected, atol=1e-5)


RECIPES = {"marigold_depth": "abs_rel", "dmp_normal": "angular_mean", "dmp_depth": "abs_rel", "dmp_albedo": "mse",
           "dmp_shading": "mse", "dmp_segmentation": "miou"}


@pytest.mark.parametrize("experiment", list(RECIPES))
def test_diffusion_recipe_runs_on_tiny_random_and_procedural(experiment, tmp_path):
    """Every paper recipe of this paradigm trains and validates with just backbone=tiny_random dataset=procedural (the
    prior's control; the same recipes on backbone=tiny run in tests/test_prior.py)."""
    run = tmp_path / "run"
    run_cli("train.py", f"experiment={experiment}", "backbone=tiny_random", "dataset=procedural", "logger=csv",
            f"hydra.run.dir={run}", *FAST, "inference.steps=2")
    assert RECIPES[experiment] in read_metrics(run)
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["densediff_paradigm"] == "diffusion"
    config = (run / ".hydra" / "config.yaml").read_text()
    if experiment.startswith("dmp"):
        assert "conditioning: interpolate" in config and "unet_in_channels: 4" in config and "rank: 4" in config
        assert all("lora_" in key for key in checkpoint["state_dict"])  # only the adapter is saved
    else:
        assert "conditioning: concat" in config and "noise: pyramid" in config and "lr: 3.0e-05" in config
    if experiment == "dmp_depth":  # predict.py keeps the checkpoint's DMP float codec (metres), not the default one
        import numpy as np
        from PIL import Image

        Image.fromarray(np.full((32, 40, 3), 120, np.uint8)).save(tmp_path / "a.png")
        run_cli("predict.py", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", f"input={tmp_path / 'a.png'}",
                f"output={tmp_path / 'pred'}", "inference.steps=2", f"hydra.run.dir={tmp_path / 'p'}")
        depth = np.load(tmp_path / "pred" / "a.npy")
        assert not (depth.min() == 0 and depth.max() == 1)  # an affine codec would min-max normalise to [0, 1]
        png16 = np.asarray(Image.open(tmp_path / "pred" / "a_16bit.png")) / 65535
        assert np.allclose(png16, np.clip(depth / 8.0, 0, 1), atol=1 / 65535)  # full scale = target_scale 8 m
    if experiment == "dmp_normal":  # evaluate.py rebuilds the paradigm from the checkpoint, with DMP's oracle DDIM
        evaluated = tmp_path / "eval"
        run_cli("evaluate.py", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "task=normals",
                "dataset.test.num_scenes=2", "inference.steps=2", "inference.ddim=oracle",
                "inference.timestep_spacing=leading", f"hydra.run.dir={evaluated}")
        assert "angular_mean" in read_metrics(evaluated)


def test_bad_diffusion_options_are_named(tmp_path):
    result = run_cli("train.py", "objective=diffusion", "objective.conditioning=sideways", f"hydra.run.dir={tmp_path}",
                     expect_ok=False)
    assert result.returncode == 1 and "objective.conditioning must be one of concat, interpolate" in result.stderr
    result = run_cli("train.py", "objective=diffusion", "objective.conditioning=interpolate",
                     f"hydra.run.dir={tmp_path}", expect_ok=False)
    assert result.returncode == 1 and "needs a 4-channel UNet" in result.stderr


@pytest.mark.slow
def test_dmp_normal_learns_on_tiny(tmp_path):
    """A few hundred steps of dmp_normal (whole tiny UNet: a LoRA on random weights has no prior to adapt) lower the
    validation angular error well below the untrained model's (figures in experiments/dmp/README.md)."""
    common = ["experiment=dmp_normal", "backbone=tiny", "dataset=procedural", "trainer.enable_progress_bar=false"]
    run_cli("evaluate.py", *common, "split=val", f"hydra.run.dir={tmp_path / 'untrained'}")
    run_cli("train.py", *common, "adapter=full", "objective.lr=1e-3", "trainer.max_steps=300",
            "trainer.val_check_interval=300", "objective.decay_steps=300", "logger=csv",
            f"hydra.run.dir={tmp_path / 'trained'}", timeout=1200)
    untrained = read_metrics(tmp_path / "untrained")["angular_mean"]
    assert read_metrics(tmp_path / "trained")["angular_mean"] < 0.7 * untrained


def test_prompts_and_classifier_free_guidance_follow_dmp():
    """objective.prompts=dataset keeps the text encoder; inference with prompts and guidance s gives
    uncond + s (cond - uncond) against the padded empty prompt (DMP's target_guidance_scale)."""
    model = DiffusionEstimator({"path": TINY, "unet_in_channels": 4}, {"kind": "lora", "rank": 4}, task="normals",
                               conditioning="interpolate", prompts="dataset").eval()
    estimator = model.estimator
    rgb = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(0))
    options = InferenceOptions(steps=1, timestep_spacing="leading", guidance=2.0)
    guided = denoise(estimator, rgb, options, prompts=["a bed"])
    with torch.no_grad():
        x = estimator.encode_rgb(rgb)
        cond = estimator.encode_prompts(["a bed"])
        uncond = estimator.encode_prompts([""])
        assert cond.shape == (1, 77, 32)  # padded to the tokenizer's length, as DMP tokenises
        def v(context):
            return estimator.unet(x, 1, encoder_hidden_states=context).sample
        out = v(uncond) + 2.0 * (v(cond) - v(uncond))
        a = model.alphas_cumprod[1]
        expected = estimator.vae.decode((a.sqrt() * x - (1 - a).sqrt() * out) / estimator.scaling_factor).sample
    assert torch.allclose(guided, expected, atol=1e-4)
    unguided = denoise(estimator, rgb, InferenceOptions(steps=1, timestep_spacing="leading"), prompts=["a bed"])
    assert not torch.allclose(guided, unguided, atol=1e-4)
    # training reads the samples' captions
    batch = {"rgb": rgb, "normals": torch.nn.functional.normalize(torch.rand(1, 3, 32, 40), dim=1),
             "valid_mask": torch.ones(1, 32, 40, dtype=torch.bool), "prompt": ["a bed"]}
    assert torch.isfinite(model.training_step(batch, 0))
    # the procedural scenes carry their captions: collated, they condition training like any dataset's prompts
    scenes = ProceduralScenes("train", num_scenes=2, height=32, width=40, tasks=("normals",))
    batch = torch.utils.data.default_collate([scenes[0], scenes[1]])
    assert batch["prompt"] == [scenes[0]["prompt"], scenes[1]["prompt"]] and all(batch["prompt"])
    with torch.no_grad():
        assert not torch.allclose(estimator.encode_prompts(batch["prompt"]), estimator.encode_prompts(["", ""]))
    assert torch.isfinite(model.training_step(batch, 0))
