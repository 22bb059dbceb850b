"""Diff-2-in-1's data creation (docs/paradigms.md#diff-2-in-1): the DDIM sub-schedule that regenerates a training
image from its noised latent, and the synthetic pairs on disk.

The pairs live in one folder of the run directory, written once:
    synthetic/img/<k>.png          the generated image (8-bit RGB)
    synthetic/target/<k>.npy       the warm-up head's label of it, in the task's format (unit normals HxWx3 float32,
                                   metres HxW, class ids HxW int64)
    synthetic/target/<k>.png       the label coloured, for people
    synthetic/gallery.png          source | generated | label for the first few pairs
    synthetic/manifest.json        written last: a folder without it is an unfinished creation and is redone
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from densediff.io import atomic_write, write_text
from densediff.latents import add_noise, ddim_step

MANIFEST = "manifest.json"


def creation_timesteps(creation_timestep: int = 600, steps: int = 50) -> list[int]:
    """The DDIM timesteps of a `steps`-step schedule over the first `creation_timestep` DDPM steps, ascending, with
    LDM's uniform spacing and its +1 offset: stride 600 // 50 = 12 -> 1, 13, ..., 589."""
    if not 1 <= steps <= creation_timestep:
        raise ValueError(f"objective.creation_steps must be in [1, creation_timestep={creation_timestep}], "
                         f"got {steps}")
    stride = creation_timestep // steps
    return [t + 1 for t in range(0, creation_timestep, stride)][:steps]


@torch.no_grad()
def ddim_regenerate(unet, alphas_cumprod: torch.Tensor, latent: torch.Tensor, context: torch.Tensor,
                    timesteps: list[int], start: int, prediction_type: str, generator=None, on_last=None):
    """latent (x_0) -> noised to t=`start` -> deterministic DDIM (eta 0) down `timesteps` (ascending, descended).
    The step at timesteps[j] goes to the alpha of timesteps[j-1], the first to alpha_bar[0] (LDM's make_schedule).
    `on_last()` returns a context manager entered around the last UNet pass (to record its features)."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"the backbone's scheduler predicts {prediction_type!r}; creation needs epsilon or "
                         "v_prediction")
    abar = alphas_cumprod.to(latent)
    noise = torch.randn(latent.shape, generator=generator).to(latent)
    x = add_noise(latent, noise, abar[start])
    for j in range(len(timesteps) - 1, -1, -1):
        t = timesteps[j]
        step = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        if j == 0 and on_last is not None:
            with on_last():
                output = unet(x, step, encoder_hidden_states=context).sample
        else:
            output = unet(x, step, encoder_hidden_states=context).sample
        x, _ = ddim_step(output, x, abar[t], abar[timesteps[j - 1]] if j > 0 else abar[0], prediction_type)
    return x


def target_to_array(target: torch.Tensor) -> np.ndarray:
    """One sample's target tensor -> the .npy array (normals HxWx3)."""
    target = target.cpu()
    if target.dim() == 3:
        return target.float().permute(1, 2, 0).numpy()
    return target.numpy() if not target.is_floating_point() else target.float().numpy()


def write_pair(folder: Path, k: int, rgb: torch.Tensor, target: torch.Tensor, preview: np.ndarray) -> dict:
    """One pair's files; returns its manifest entry (paths relative to `folder`)."""
    image, label = Path("img") / f"{k:06d}.png", Path("target") / f"{k:06d}.npy"
    for sub in ("img", "target"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    array = (rgb.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    with atomic_write(folder / image) as tmp:
        Image.fromarray(array).save(tmp)
    with atomic_write(folder / label) as tmp:
        np.save(tmp, target_to_array(target))
    with atomic_write(folder / label.with_suffix(".png")) as tmp:
        Image.fromarray(preview).save(tmp)
    return {"image": image.as_posix(), "target": label.as_posix()}


def write_manifest(folder: Path, entries: list[dict], info: dict) -> Path:
    return write_text(folder / MANIFEST, json.dumps({**info, "count": len(entries), "pairs": entries}, indent=1))


def read_manifest(folder: str | Path | None) -> dict | None:
    """The finished creation in `folder`, or None (no folder, no manifest, or files missing)."""
    if not folder:
        return None
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    pairs = manifest.get("pairs", [])
    if not pairs or any(not (Path(folder) / p[key]).is_file() for p in pairs for key in ("image", "target")):
        return None
    return manifest


class SyntheticPairs(torch.utils.data.Dataset):
    """The pairs of a finished creation as samples: rgb [3,H,W] in [0,1], the task's target, valid_mask (from the
    stored label: a normal of length > 0.5, a depth > 0, any class id), name and prompt."""

    def __init__(self, folder: str | Path, target_key: str):
        self.folder, self.target_key = Path(folder), target_key
        manifest = read_manifest(folder)
        if manifest is None:
            raise FileNotFoundError(f"{self.folder} holds no finished creation ({MANIFEST} with its files)")
        self.pairs = manifest["pairs"]

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        pair = self.pairs[index]
        with Image.open(self.folder / pair["image"]) as image:
            rgb = torch.from_numpy(np.asarray(image.convert("RGB"), np.float32) / 255).permute(2, 0, 1)
        target = torch.from_numpy(np.load(self.folder / pair["target"]))
        if target.dim() == 3:  # HxWx3 normals
            target = target.permute(2, 0, 1).contiguous()
            valid = target.norm(dim=0) > 0.5
        else:
            valid = target > 0 if target.is_floating_point() else torch.ones(target.shape, dtype=torch.bool)
        return {"rgb": rgb, self.target_key: target, "valid_mask": valid, "name": f"synthetic/{index:06d}",
                "prompt": pair.get("prompt", "")}
