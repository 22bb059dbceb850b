"""Published checkpoint layouts, built tiny in the test with diffusers'/transformers' own classes: SD 1.5 (4-channel
UNet, 768-d CLIP-L text encoder, epsilon prediction, PNDM scheduler config), E2E-FT's StableDiffusionPipeline
folders (8-channel UNet, DDPM scheduler config, normals in the x-left frame), Marigold v1.1 (zero-SNR schedule)."""

import json

import numpy as np
import pytest
import torch
from conftest import FAST, assert_plausible_depth_metrics, read_metrics, run_cli
from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler, UNet2DConditionModel

from densediff.backbones import load_backbone
from densediff.backbones.tiny import get_dummy_components, tiny_text_encoder_and_tokenizer
from densediff.inference import LatentEstimator
from densediff.paradigms import E2EFineTune

SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def save_pipeline_folder(components: dict, output, class_name: str = "StableDiffusionPipeline"):
    """What `StableDiffusionPipeline.save_pretrained` writes, minus the safety checker (E2E-FT drops it too)."""
    index = {"_class_name": class_name, "_diffusers_version": "0.30.2"}
    for name, component in components.items():
        component.save_pretrained(output / name)
        library = "transformers" if type(component).__module__.startswith("transformers") else "diffusers"
        index[name] = [library, type(component).__name__]
    (output / "model_index.json").write_text(json.dumps(index, indent=2))
    return output


@pytest.fixture(scope="module")
def sd15_folder(tmp_path_factory):
    """SD 1.5's layout: 4 input channels, 768-d cross-attention fed by CLIP-L's width, epsilon prediction."""
    from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=16)
    _, tokenizer = tiny_text_encoder_and_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=64, num_attention_heads=4,
                                                num_hidden_layers=1, vocab_size=len(tokenizer), bos_token_id=0,
                                                eos_token_id=1, pad_token_id=1))
    scheduler = PNDMScheduler(**SD_BETAS, skip_prk_steps=True, steps_offset=1, prediction_type="epsilon",
                              set_alpha_to_one=False)
    components = {"unet": unet, "vae": get_dummy_components()["vae"], "scheduler": scheduler,
                  "text_encoder": text_encoder, "tokenizer": tokenizer, "feature_extractor": CLIPImageProcessor()}
    return save_pipeline_folder(components, tmp_path_factory.mktemp("sd15") / "stable-diffusion-v1-5")


def e2e_ft_folder(root, seed=0):
    """E2E-FT's released layout: StableDiffusionPipeline with an 8-channel UNet and a DDPM scheduler config."""
    from transformers import CLIPImageProcessor

    components = get_dummy_components(seed)
    components["scheduler"] = DDPMScheduler(**SD_BETAS, prediction_type="v_prediction", clip_sample=False,
                                            steps_offset=1, timestep_spacing="trailing")
    components["feature_extractor"] = CLIPImageProcessor()
    return save_pipeline_folder(components, root)


def test_sd15_layout_widens_conv_in_and_inverts_epsilon(sd15_folder):
    original = UNet2DConditionModel.from_pretrained(sd15_folder, subfolder="unet").conv_in
    backbone = load_backbone(sd15_folder, unet_in_channels=8)
    conv = backbone.unet.conv_in
    assert conv.in_channels == 8 and backbone.empty_text_embedding.shape == (1, 2, 768)
    assert torch.equal(conv.weight, original.weight.repeat(1, 2, 1, 1) / 2) and torch.equal(conv.bias, original.bias)
    # identical halves in -> the widened layer computes what the 4-channel one did
    x = torch.randn(1, 4, 8, 8)
    assert torch.allclose(conv(torch.cat([x, x], 1)), original(x), atol=1e-6)
    assert backbone.scheduler.config.prediction_type == "epsilon"
    estimator = LatentEstimator(backbone.unet, backbone.vae, backbone.scheduler, backbone.empty_text_embedding)
    rgb = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        latent = estimator.encode_rgb(rgb)
        eps = backbone.unet(torch.cat([latent, torch.zeros_like(latent)], 1), 999,
                            encoder_hidden_states=backbone.empty_text_embedding).sample
        abar = backbone.scheduler.alphas_cumprod[999]
        x0 = -(1 - abar).sqrt() * eps / abar.sqrt()  # x_t = 0: x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)
        expected = backbone.vae.decode(x0 / backbone.vae.config.scaling_factor).sample
        assert torch.allclose(estimator(rgb), expected, atol=1e-4)


def test_sd15_folder_trains_and_evaluates_through_the_cli(sd15_folder, tmp_path):
    run = tmp_path / "run"
    run_cli("train.py", "experiment=quickstart", "backbone=sd15", f"backbone.path={sd15_folder}", "logger=csv",
            f"hydra.run.dir={run}", *FAST)
    trained = read_metrics(run)  # the validation at the last step
    assert_plausible_depth_metrics(trained)
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert state["estimator.unet.conv_in.weight"].shape[1] == 8
    # evaluate.py rebuilds the model from the checkpoint and the SD folder and scores the same validation scenes
    # as the training's last validation did: the same numbers
    run_cli("evaluate.py", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "dataset=procedural", "split=val",
            "dataset.val.num_scenes=4", "dataset.val_batch_size=2", f"hydra.run.dir={tmp_path / 'eval'}")
    evaluated = read_metrics(tmp_path / "eval")
    assert_plausible_depth_metrics(evaluated)
    assert {k: evaluated[k] for k in trained} == pytest.approx(trained, rel=1e-4)


def test_marigold_v1_1_zero_snr_schedule_gives_x0_equal_minus_v(tmp_path):
    components = get_dummy_components()
    components["scheduler"] = DDIMScheduler(**SD_BETAS, prediction_type="v_prediction", clip_sample=False,
                                            set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing",
                                            rescale_betas_zero_snr=True)
    folder = save_pipeline_folder(components, tmp_path / "v1-1", class_name="MarigoldDepthPipeline")
    backbone = load_backbone(folder)
    assert float(backbone.scheduler.alphas_cumprod[999]) == pytest.approx(0.0, abs=1e-12)
    estimator = LatentEstimator(backbone.unet, backbone.vae, backbone.scheduler, backbone.empty_text_embedding)
    rgb = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        latent = estimator.encode_rgb(rgb)
        v = backbone.unet(torch.cat([latent, torch.zeros_like(latent)], 1), 999,
                          encoder_hidden_states=backbone.empty_text_embedding).sample
        expected = backbone.vae.decode(-v / backbone.vae.config.scaling_factor).sample
        assert torch.allclose(estimator(rgb), expected, atol=1e-5)


def test_e2e_ft_normals_checkpoint_is_read_in_its_x_left_frame(tmp_path):
    from PIL import Image

    folder = e2e_ft_folder(tmp_path / "marigold-e2e-ft-normals")
    # a fixed image, and below predict.py's thread count: a near-zero normal amplifies any rounding difference
    rgb = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(0))
    canonical = E2EFineTune({"path": str(folder)}, task="normals").eval()
    x_left = E2EFineTune({"path": str(folder), "normals_frame": "x_left"}, task="normals").eval()
    a, b = canonical.predict(rgb), x_left.predict(rgb)
    assert torch.allclose(b, a * torch.tensor([-1.0, 1, 1]).view(1, 3, 1, 1), atol=1e-6)
    # the backbone config carries the frame through predict.py
    Image.fromarray((rgb[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(tmp_path / "image.png")
    run_cli("predict.py", "backbone=marigold_e2e_ft_normals", f"backbone.path={folder}", "task=normals",
            f"input={tmp_path / 'image.png'}", f"output={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'r'}")
    written = torch.from_numpy(np.load(tmp_path / "out" / "image.npy")).permute(2, 0, 1)
    from densediff import threads
    from densediff.adapters import count_parameters
    before = torch.get_num_threads()
    threads.use_threads_for(1, count_parameters(x_left))  # predict.py's thread count for this model: same rounding
    try:
        quantised = x_left.predict(torch.from_numpy(np.array(Image.open(tmp_path / "image.png"))).permute(2, 0, 1)[None]
                                   .float() / 255)
    finally:
        torch.set_num_threads(before)
    assert torch.allclose(written, quantised[0], atol=1e-5)


def test_normals_export_runs_in_diffusers_marigold_normals_pipeline(tmp_path):
    """Train normals (2 steps), export, and run the folder in diffusers' MarigoldNormalsPipeline: with DDIM's
    prev_sample as the last step (diffusers' choice) our prediction and theirs are the same directions."""
    from diffusers import MarigoldNormalsPipeline

    from densediff.data.procedural import ProceduralScenes
    from densediff.inference.predictor import InferenceOptions, denoise

    run, folder = tmp_path / "run", tmp_path / "exported"
    run_cli("train.py", "experiment=quickstart", "task=normals", "logger=csv", f"hydra.run.dir={run}", *FAST)
    run_cli("-m", "densediff.export", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", f"output={folder}")
    pipe = MarigoldNormalsPipeline.from_pretrained(folder)
    assert pipe.default_denoising_steps == 1 and pipe.scheduler.config.timestep_spacing == "trailing"
    model = E2EFineTune.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu",
                                             weights_only=True).eval()
    model.inference = InferenceOptions(final_step="prev_sample")
    rgb = ProceduralScenes("test", 1, 64, 80)[0]["rgb"][None]
    ours = model.predict(rgb)
    theirs = pipe(rgb, num_inference_steps=1, latents=torch.zeros(1, 4, 16, 20), processing_resolution=0,
                  output_type="pt").prediction
    assert ours.shape == theirs.shape == (1, 3, 64, 80)
    # The one documented difference: diffusers clips each channel to [-1, 1] and then normalises, E2E-FT normalises
    # first, so directions differ where a decoded vector leaves the cube (a few pixels of this barely trained model).
    assert (ours * theirs).sum(1).mean() > 0.999
    decoded = denoise(model.estimator, rgb, model.inference)  # the same image, decoded diffusers' way: exact
    assert torch.allclose(torch.nn.functional.normalize(decoded.clamp(-1, 1), dim=1), theirs, atol=1e-4)
