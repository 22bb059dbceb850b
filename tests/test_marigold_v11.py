"""Marigold v1.1's normals recipe (experiment=marigold_normals) and what it needs: the backbone's betas rescaled to zero
terminal SNR (objective.zero_snr) as its trainer does, and Marigold's optimiser (Adam, no weight decay)."""

from __future__ import annotations

import json
import shutil

import torch
from conftest import ROOT
from diffusers import DDPMScheduler
from hydra import compose, initialize_config_dir

from densediff.paradigms import DiffusionEstimator
from densediff.run import ASSETS


def test_zero_snr_rescales_the_backbone_schedule_as_marigold_v11_trainer(tmp_path):
    folder = tmp_path / "sd_like"
    shutil.copytree(ASSETS / "tiny", folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.update(rescale_betas_zero_snr=False, timestep_spacing="leading")  # SD2's own schedule
    config_path.write_text(json.dumps(config))
    plain = DiffusionEstimator({"path": str(folder)}, task="normals")
    rescaled = DiffusionEstimator({"path": str(folder)}, task="normals", zero_snr=True)
    assert plain.alphas_cumprod[999] > 1e-4 and rescaled.alphas_cumprod[999] == 0
    # Marigold: DDPMScheduler.from_config(SD2's, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    reference = DDPMScheduler.from_config(config, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    assert torch.allclose(rescaled.alphas_cumprod, reference.alphas_cumprod.float(), atol=1e-7)
    assert rescaled.estimator.scheduler_config["timestep_spacing"] == "trailing"


def test_marigold_recipes_compose_with_the_published_settings():
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        normals = compose("train", overrides=["experiment=marigold_normals"])
        depth = compose("train", overrides=["experiment=marigold_depth"])
    o = normals.objective
    assert (o.name, o.zero_snr, o.lr, o.weight_decay, o.decay_steps, o.warmup_steps) == (
        "diffusion", True, 6e-5, 0.0, 25000, 100)
    assert normals.trainer.max_steps == 30000 and normals.dataset.batch_size * normals.trainer.accumulate_grad_batches == 32
    assert (normals.inference.steps, normals.inference.timestep_spacing, normals.inference.processing_res) == (
        4, "trailing", 768)
    assert normals.backbone.normals_decode == "clip_normalize" and normals.task.name == "normals"
    assert normals.dataset.name == "marigold_normals_mix" and list(normals.dataset.probabilities) == [0.5, 0.49, 0.01]
    assert depth.objective.weight_decay == 0.0  # Marigold trains with torch.optim.Adam, no weight decay
