"""GeoWizard training and joint prediction (docs/paradigms.md#geowizard) on the tiny GeoWizard backbone:
batch layout and class labels, timesteps and noise per sample, the v-prediction target, the class-embedding learning
rate, the normals frame, and the real CLIs (train.py experiment=geowizard, then evaluate.py task=normals)."""

import math

import pytest
import torch
from conftest import FAST, read_metrics, run_cli
from diffusers import DDPMScheduler

from densediff.backbones.geowizard import load_geowizard
from densediff.backbones.geowizard_build import tiny_geowizard_folder
from densediff.inference.predictor import InferenceOptions, denoise, pyramid_noise
from densediff.paradigms import PARADIGMS
from densediff.paradigms.geowizard import GeoWizardEstimator
from densediff.tasks import build_task


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_geowizard_folder(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def model(folder):
    return GeoWizardEstimator({"path": str(folder)}, task="depth", task_options={"min_depth": 0.1, "max_depth": 20.0})


def _batch(size=2, height=32, width=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    normals = torch.nn.functional.normalize(torch.randn(size, 3, height, width, generator=g), dim=1)
    return {"rgb": torch.rand(size, 3, height, width, generator=g),
            "depth": 1 + 5 * torch.rand(size, height, width, generator=g), "normals": normals,
            "valid_mask": torch.ones(size, height, width, dtype=torch.bool)}


class Recorder:
    """Wraps the UNet's forward to record what training feeds it."""

    def __init__(self, unet):
        self.unet, self.calls = unet, []
        self.original = unet.forward

    def __enter__(self):
        def forward(sample, timestep, **kwargs):
            out = self.original(sample, timestep, **kwargs)
            self.calls.append({"sample": sample.detach(), "timestep": timestep.detach(),
                               **{k: v.detach() for k, v in kwargs.items() if torch.is_tensor(v)},
                               "out": out.sample.detach()})
            return out
        self.unet.forward = forward
        return self

    def __exit__(self, *exc):
        self.unet.forward = self.original


def test_the_tiny_folder_is_geowizard_shaped_and_cached(folder):
    assert tiny_geowizard_folder(folder.parent) == folder  # built once
    geowizard = load_geowizard(folder)
    assert (geowizard.unet.config.in_channels, geowizard.unet.config.class_embed_type) == (8, "projection")
    assert geowizard.unet.config.cross_attention_dim == geowizard.image_encoder.config.projection_dim
    assert geowizard.scheduler.config.prediction_type == "v_prediction"


def test_training_batch_layout_class_labels_and_shared_timesteps(model):
    batch = {**_batch(), "domain": ["outdoor", "object"]}
    with Recorder(model.estimator.unet) as rec:
        model.training_step(batch, 0)
    call = rec.calls[0]
    sample, t, labels, context = call["sample"], call["timestep"], call["class_labels"], call["encoder_hidden_states"]
    assert sample.shape[0] == 4 and sample.shape[1] == 8  # [depth_1, depth_2, normal_1, normal_2], [img, geometry]
    rgb_latent = model.encode(batch["rgb"] * 2 - 1)
    assert torch.allclose(sample[:, :4], rgb_latent.repeat(2, 1, 1, 1), atol=1e-5)  # image latent repeated x2
    assert torch.equal(t[:2], t[2:])  # one timestep per sample, shared by its branches
    assert torch.allclose(context, model.image_tokens(batch["rgb"]).repeat(2, 1, 1))  # CLIP token repeated x2
    s, c = math.sin(1.0), math.cos(1.0)
    depth, normal = torch.tensor([0, s, 1, c]), torch.tensor([s, 0, c, 1])
    outdoor, obj = torch.tensor([0, s, 0, 1, c, 1]), torch.tensor([0, 0, s, 1, 1, c])
    for row, (geometry, domain) in enumerate([(depth, outdoor), (depth, obj), (normal, outdoor), (normal, obj)]):
        assert torch.allclose(labels[row], torch.cat([geometry, domain]))
    # no "domain" in the batch: the configured one (indoor) for every row
    with Recorder(model.estimator.unet) as rec:
        model.training_step(_batch(), 0)
    assert torch.allclose(rec.calls[0]["class_labels"][:, 4:], torch.tensor([s, 0, 0, c, 1, 1]).expand(4, -1))
    with pytest.raises(ValueError, match="depth and normals together"):
        model.training_step({k: v for k, v in _batch().items() if k != "normals"}, 0)


def test_noise_is_independent_per_branch_in_training_and_shared_at_inference(model):
    latent = torch.zeros(4, 4, 8, 10)
    t = torch.tensor([100, 900, 100, 900])
    independent = model.training_noise(latent, t)
    assert not torch.allclose(independent[:2], independent[2:])  # the reference draws over all 2B rows
    model.hparams.training_noise = "shared"
    try:
        shared = model.training_noise(latent, t)
        assert torch.equal(shared[:2], shared[2:])
    finally:
        model.hparams.training_noise = "independent"
    # GeoWizard's levels: x t/T x 0.9^i -> at t = 0 only the first full-resolution draw remains (white noise)
    flat = pyramid_noise((1, 4, 32, 40), torch.Generator().manual_seed(0), strength=torch.zeros(1),
                         scale_range=(1.5, 3.0), cumulative=False)
    white = torch.randn(1, 4, 32, 40, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(flat, white / white.std(), atol=1e-6)

    # inference: one Gaussian draw per image, the same for its depth and normal branch
    with Recorder(model.estimator.unet) as rec:
        denoise(model.estimator, torch.rand(2, 3, 32, 40), InferenceOptions(steps=1, noise="gaussian"),
                torch.Generator().manual_seed(0), branches=2,
                conditioning=lambda rgb: model.unet_conditioning(rgb, "indoor"))
    geometry = rec.calls[0]["sample"][:, 4:]
    assert torch.equal(geometry[:2], geometry[2:]) and not torch.equal(geometry[0], geometry[1])


def test_regression_target_is_diffusers_velocity_and_loss_is_mse_over_both_branches(model):
    torch.manual_seed(3)
    batch = _batch()
    draws = model.step_randomness.draws
    with Recorder(model.estimator.unet) as rec:
        loss = model.training_step(batch, 0)
    call = rec.calls[0]
    # rebuild the step's draws: the step's generator replays randint and the pyramid noise (encode: the mean)
    model.step_randomness.draws = draws
    generator = model.step_generator()
    targets = [task.encode(batch) for task in model.tasks.values()]
    latents = model.encode(torch.cat([batch["rgb"] * 2 - 1, *targets]))
    geometry = latents[2:]
    t = torch.randint(0, 1000, (2,), generator=generator).repeat(2)
    assert torch.equal(t, call["timestep"])
    noise = model.training_noise(geometry, t, generator)
    scheduler = DDPMScheduler.from_config(model.estimator.scheduler_config)
    assert torch.allclose(call["sample"][:, 4:], scheduler.add_noise(geometry, noise, t), atol=1e-5)
    velocity = scheduler.get_velocity(geometry, noise, t)
    assert torch.allclose(loss, torch.nn.functional.mse_loss(call["out"], velocity), atol=1e-6)


def test_class_embedding_learns_ten_times_faster(model):
    groups = model.configure_optimizers()["optimizer"].param_groups
    lrs = {group["name"]: group["lr"] for group in groups}
    assert lrs == {"unet": pytest.approx(3e-5), "class_embedding": pytest.approx(3e-4)}
    class_params = {id(p) for p in model.estimator.unet.class_embedding.parameters()}
    named = {group["name"]: {id(p) for p in group["params"]} for group in groups}
    assert named["class_embedding"] == class_params and class_params
    assert len(named["unet"]) + len(class_params) == sum(p.requires_grad for p in model.parameters())


def test_normals_frame_is_converted_at_the_boundary():
    task = build_task("normals", model_frame="opencv")
    canonical = torch.tensor([0.6, 0.0, 0.8]).view(1, 3, 1, 1)  # right and toward the viewer
    batch = {"normals": canonical, "valid_mask": torch.ones(1, 1, 1, dtype=torch.bool)}
    encoded = task.encode(batch)  # GeoWizard's training frame: x right, y down, z away
    assert torch.allclose(encoded.flatten(), torch.tensor([0.6, 0.0, -0.8]))
    assert torch.allclose(task.decode(encoded), canonical, atol=1e-4)
    geowizard_output = -encoded  # what GeoWizard's pipeline returns (x -1): x left, y up, z toward the viewer
    assert torch.allclose(geowizard_output * torch.tensor([-1.0, 1, 1]).view(1, 3, 1, 1), canonical)


@torch.no_grad()
def test_prediction_gives_both_geometries_and_the_primary_one(model):
    model.inference = InferenceOptions(steps=2, noise="gaussian", ensemble=2, seed=0)
    rgb = torch.rand(1, 3, 30, 38)
    both = model.predict_geometries(rgb)
    assert both["depth"].shape == (1, 30, 38) and both["normals"].shape == (1, 3, 30, 38)
    assert torch.allclose(both["normals"].norm(dim=1), torch.ones(1, 30, 38), atol=1e-4)
    model.inference = InferenceOptions(steps=2, noise="gaussian", ensemble=2, seed=0)
    assert torch.allclose(model.predict(rgb), both["depth"])
    assert PARADIGMS["geowizard"] is GeoWizardEstimator


def test_train_then_evaluate_normals_with_the_clis(tmp_path, folder):
    run = tmp_path / "train"
    # backbone=tiny, as every recipe runs on the embedded default: GeoWizard's layout of it, built once in the cache
    run_cli("train.py", "experiment=geowizard", "backbone=tiny",
            "dataset=procedural", "logger=csv", f"hydra.run.dir={run}", *FAST, "trainer.accumulate_grad_batches=1",
            "inference.steps=2", "inference.ensemble=2")
    metrics = read_metrics(run)
    assert {"abs_rel", "delta1", "angular_mean", "angular_11_25"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["densediff_paradigm"] == "geowizard"
    assert not any("image_encoder" in k or "vae" in k for k in checkpoint["state_dict"])

    evaluation = tmp_path / "evaluate"
    run_cli("evaluate.py", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "task=normals", "logger=csv",
            f"hydra.run.dir={evaluation}", "dataset.test.num_scenes=4", "dataset.val_batch_size=2",
            "inference.steps=2", "trainer.enable_progress_bar=false")
    scores = read_metrics(evaluation)
    assert "angular_mean" in scores and "abs_rel" not in scores  # the test split carries normals only

    refused = run_cli("train.py", "experiment=geowizard", "backbone=tiny_geowizard", f"backbone.path={folder}",
                      "objective=e2e", "dataset=procedural", f"hydra.run.dir={tmp_path / 'e2e'}", *FAST,
                      expect_ok=False)
    assert refused.returncode == 1 and "objective=geowizard" in refused.stderr
