"""Marigold v1.1's RGB augmentations for normals training (`BaseNormalsDataset._augment_data` in its repository), in
plain torch: Gaussian blur and motion blur (Hypersim only) and colour jitter, with the arithmetic of the torchvision
0.19 functions Marigold calls (`gaussian_blur`, `rotate`, `ColorJitter`), on the RGB as integers 0..255 as Marigold
holds it (`rgb_int`), before the resize (docs/data.md#marigold-v11-normals-training-data).

    Gaussian blur  p 0.3, sigma ~ U(0, 4), 33x33 kernel, reflect padding; the result rounded (torchvision's cast back
                   to the integer dtype).
    motion blur    p 0.3, kernel size ~ {3, 5, 7, 9, 11}, a horizontal line of ones rotated by U(0, 360) degrees
                   (nearest, about the centre, zeros outside), divided by its sum; zero padding; truncated (`.int()`).
    colour jitter  p 0.3, brightness, contrast, saturation ~ U(0.5, 1.5), hue ~ U(-0.2, 0.2), applied in a random
                   order on rgb / 255, each clamped to [0, 1]; x 255 truncated.
The draws come from a generator seeded per sample (seed, epoch, index), not Python's and torch's global ones, so a
sample's augmentation does not depend on workers or fetch order.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

MARIGOLD_NORMALS_AUGMENTATION = {  # config/train_marigold_normals.yaml, `augmentation` (lr_flip_p is the hflip)
    "gaussian_blur_p": 0.3, "gaussian_blur_sigma": 4.0, "motion_blur_p": 0.3, "motion_blur_kernel_size": 11,
    "motion_blur_angle_range": 360.0, "color_jitter_p": 0.3, "jitter_brightness_factor": 0.5,
    "jitter_contrast_factor": 0.5, "jitter_saturation_factor": 0.5, "jitter_hue_factor": 0.2}


def augment_seed(seed, epoch, index):
    """The seed of sample `index`'s augmentation draws (independent of its flip's, common.flip_seed)."""
    return int(np.random.SeedSequence([seed, epoch, index, 1]).generate_state(1)[0])


def gaussian_blur(rgb255, sigma, kernel_size=33):
    """(3, H, W) float of integers -> the same, blurred: separable Gaussian (x = -16..16, exp(-x^2 / 2 sigma^2),
    normalised), the outer product as one 2-D kernel, reflect padding, rounded."""
    if min(rgb255.shape[-2:]) <= kernel_size // 2:
        raise ValueError(f"a {rgb255.shape[-2]}x{rgb255.shape[-1]} image is too small for Marigold's "
                         f"{kernel_size}-px Gaussian blur (reflect padding needs more than {kernel_size // 2} px)")
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel_size)
    g = torch.exp(-0.5 * (x / sigma).pow(2))
    g = g / g.sum()
    kernel = torch.mm(g[:, None], g[None, :]).expand(rgb255.shape[0], 1, kernel_size, kernel_size)
    pad = kernel_size // 2
    out = F.conv2d(F.pad(rgb255[None], [pad, pad, pad, pad], mode="reflect"), kernel, groups=rgb255.shape[0])
    return torch.round(out[0])


def motion_kernel(size, angle):
    """A `size` x `size` line kernel: the middle row of ones rotated by `angle` degrees counter-clockwise about the
    centre with nearest sampling (torchvision's tensor `rotate`: inverse map of the output pixel centres, zeros outside),
    divided by its sum."""
    line = torch.zeros(size, size)
    line[size // 2, :] = 1.0
    rad = math.radians(-angle)  # torchvision passes -angle to its inverse affine matrix
    inverse = torch.tensor([[math.cos(rad), math.sin(rad), 0.0], [-math.sin(rad), math.cos(rad), 0.0]])
    centres = torch.linspace(-size * 0.5 + 0.5, size * 0.5 - 0.5, steps=size)
    base = torch.stack([centres[None, :].expand(size, size), centres[:, None].expand(size, size),
                        torch.ones(size, size)], dim=-1)  # (y, x, [x, y, 1]) about the centre
    grid = (base.view(1, size * size, 3) @ (inverse.T / torch.tensor([0.5 * size, 0.5 * size]))).view(1, size, size, 2)
    rotated = torch.round(F.grid_sample(line[None, None], grid, mode="nearest", padding_mode="zeros",
                                        align_corners=False))[0, 0]
    return rotated / rotated.sum()


def motion_blur(rgb255, size, angle):
    """(3, H, W) float of integers -> the same convolved with motion_kernel (zero padding), truncated."""
    c = rgb255.shape[0]
    kernel = motion_kernel(size, angle).expand(c, 1, size, size)
    return torch.trunc(F.conv2d(rgb255[None], kernel, padding=size // 2, groups=c)[0])


def _grey(img):
    return 0.2989 * img[0] + 0.587 * img[1] + 0.114 * img[2]


def _blend(a, b, ratio):
    return (ratio * a + (1.0 - ratio) * b).clamp(0.0, 1.0)


def _shift_hue(img, shift):
    """RGB -> HSV (hue in [0, 1)), hue + shift mod 1, -> RGB, as torchvision's tensor adjust_hue."""
    r, g, b = img
    maxc, minc = img.max(0).values, img.min(0).values
    flat = maxc == minc
    span = maxc - minc
    s = span / torch.where(flat, torch.ones_like(maxc), maxc)
    span_safe = torch.where(flat, torch.ones_like(span), span)
    rc, gc, bc = (maxc - r) / span_safe, (maxc - g) / span_safe, (maxc - b) / span_safe
    h = ((maxc == r) * (bc - gc) + ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
         + ((maxc != g) & (maxc != r)) * (4.0 + gc - rc))
    h = torch.fmod(h / 6.0 + 1.0, 1.0)
    h = (h + shift) % 1.0
    v = maxc
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    table = torch.stack([torch.stack(c) for c in ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))])
    return table.gather(1, i[None, None].expand(3, 1, *i.shape))[:, 0]


def color_jitter(rgb01, order, brightness, contrast, saturation, hue):
    """(3, H, W) in [0, 1] -> jittered: the four adjustments in `order` (0 brightness, 1 contrast, 2 saturation,
    3 hue), each torchvision's on a float image."""
    img = rgb01
    for k in order:
        if k == 0:
            img = _blend(img, torch.zeros_like(img), brightness)
        elif k == 1:
            img = _blend(img, _grey(img).mean(), contrast)
        elif k == 2:
            img = _blend(img, _grey(img)[None], saturation)
        else:
            img = _shift_hue(img, hue)
    return img


def marigold_normals_augment(rgb01, seed, blur, params=None):
    """One sample's RGB (3, H, W) in [0, 1], values k / 255, after the flip -> augmented as Marigold does, with draws
    from a generator seeded by `seed`; `blur` says whether the blurs apply (Marigold: Hypersim only, told by its 768
    rows). Returns (rgb in [0, 1] as k / 255, {what was applied: its parameters})."""
    a = {**MARIGOLD_NORMALS_AUGMENTATION, **(params or {})}
    g = torch.Generator().manual_seed(seed)

    def uniform(lo=0.0, hi=1.0):
        return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))

    rgb255 = torch.round(rgb01 * 255.0)
    applied = {}
    if uniform() < a["gaussian_blur_p"] and blur:
        applied["gaussian_blur"] = sigma = uniform(0.0, a["gaussian_blur_sigma"])
        rgb255 = gaussian_blur(rgb255, sigma)
    if uniform() < a["motion_blur_p"] and blur:
        sizes = list(range(3, int(a["motion_blur_kernel_size"]) + 1, 2))
        size = sizes[int(torch.randint(len(sizes), (), generator=g))]
        applied["motion_blur"] = (size, angle := uniform(0.0, a["motion_blur_angle_range"]))
        rgb255 = motion_blur(rgb255, size, angle)
    if uniform() < a["color_jitter_p"]:
        order = torch.randperm(4, generator=g).tolist()
        factors = [uniform(max(0.0, 1.0 - a[k]), 1.0 + a[k]) for k in
                   ("jitter_brightness_factor", "jitter_contrast_factor", "jitter_saturation_factor")]
        hue = uniform(-a["jitter_hue_factor"], a["jitter_hue_factor"])
        applied["color_jitter"] = (order, *factors, hue)
        rgb255 = torch.trunc(color_jitter(rgb255 / 255.0, order, *factors, hue) * 255.0)
    return rgb255 / 255.0, applied
