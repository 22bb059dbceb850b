"""The glue between the pinned formulas (issue 31): masks, weights, input orders and selections that join the
formulas pinned elsewhere. Each test here was checked to fail under a one-line change a refactor could make
(docs/testing.md lists them): a loss that ignores its mask, the UNet's inputs swapped, a published loss weight
changed, the even-sized median's middle member, the depth range dropped from a task's loss, Bae's sampling order.

The expected values are written out here from the formulas (the papers' and the references'), not by calling the
function under test on other inputs."""

import math

import numpy as np
import pytest
import torch
import yaml

from densediff.heads.bae import nll_angular, point_grid, sample_points, ug_nll_loss
from densediff.paradigms.denoising import latent_valid_mask, masked_latent_mse
from densediff.run import ASSETS
from densediff.tasks import build_task
from densediff.tasks.ensemble import ensemble_depth, median_of_members
from densediff.tasks.normals import angular_loss

ROOT = ASSETS.parents[1]


def unit_vectors(*shape, seed=0):
    v = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return v / v.norm(dim=1, keepdim=True)


# ---- normals: the angular loss over an explicit partial mask -------------------------------------------------------

def test_angular_loss_averages_the_angle_over_the_masked_pixels_of_the_whole_batch():
    pred, target = unit_vectors(2, 3, 3, 4, seed=1), unit_vectors(2, 3, 3, 4, seed=2)
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask[0, 0, :3] = True  # 3 pixels of image 0, 1 of image 1: a pooled mean, not a mean of per-image means
    mask[1, 2, 1] = True
    angles = [math.acos(float((pred[b, :, i, j] * target[b, :, i, j]).sum())) for b, i, j in mask.nonzero().tolist()]
    assert angular_loss(pred, target, mask).item() == pytest.approx(sum(angles) / 4, rel=1e-5)
    # what lies outside the mask does not count
    moved = torch.where(mask[:, None], pred, -pred)
    assert angular_loss(moved, target, mask).item() == pytest.approx(sum(angles) / 4, rel=1e-5)
    assert angular_loss(pred, target, torch.zeros_like(mask)).item() == 0  # nothing valid: 0, not NaN


def test_each_model_frame_flips_exactly_its_published_axes():
    """canonical: x right, y up, z toward the viewer; x_left (DSINE, E2E-FT's checkpoints): x negated; opencv
    (GeoWizard): y and z negated. A unit vector stays a unit vector; nothing else is scaled."""
    from densediff.tasks.normals import MODEL_FRAMES

    assert MODEL_FRAMES == {"canonical": (1.0, 1.0, 1.0), "x_left": (-1.0, 1.0, 1.0), "opencv": (1.0, -1.0, -1.0)}


# ---- Bae's head: the UG-NLL's point terms and the uncertainty-guided sampling ---------------------------------------

def hand_nll(kappa: float, cosine: float) -> float:
    theta = math.acos(cosine)
    return -math.log(kappa ** 2 + 1) + kappa * theta + math.log(1 + math.exp(-kappa * math.pi))


def test_ug_nll_reads_the_validity_at_the_sampled_points():
    h, w = 4, 5
    target = unit_vectors(1, 3, h, w, seed=3)
    valid = torch.ones(1, h, w, dtype=torch.bool)
    valid[0, :, :2] = False  # the two left columns have no ground truth
    g = torch.Generator().manual_seed(4)
    dense = torch.cat([unit_vectors(1, 3, h, w, seed=5), 0.5 + torch.rand(1, 1, h, w, generator=g)], dim=1)
    rows, cols = torch.tensor([[0, 1, 2, 3, 3]]), torch.tensor([[0, 1, 2, 4, 3]])  # two invalid points, three valid
    points = torch.cat([unit_vectors(1, 3, 5, seed=6), 0.5 + torch.rand(1, 1, 5, generator=g)], dim=1)
    result = {"maps": [dense], "points": [(points, point_grid(rows, cols, h, w))]}

    def cos(a, b):
        return float((a * b).sum() / (a.norm() * b.norm()))
    dense_terms = [hand_nll(float(dense[0, 3, i, j]), cos(dense[0, :3, i, j], target[0, :, i, j]))
                   for i in range(h) for j in range(w) if valid[0, i, j]]
    point_terms = [hand_nll(float(points[0, 3, n]), cos(points[0, :3, n], target[0, :, r, c]))
                   for n, (r, c) in enumerate(zip(rows[0].tolist(), cols[0].tolist())) if valid[0, r, c]]
    assert len(dense_terms) == 12 and len(point_terms) == 3
    expected = sum(dense_terms) / len(dense_terms) + sum(point_terms) / len(point_terms)
    assert ug_nll_loss(result, target, valid).item() == pytest.approx(expected, rel=1e-5)
    # and the dense term alone on an all-valid mask counts every pixel
    every = [hand_nll(float(dense[0, 3, i, j]), cos(dense[0, :3, i, j], target[0, :, i, j]))
             for i in range(h) for j in range(w)]
    assert nll_angular(dense, target, torch.ones_like(valid)).item() == pytest.approx(np.mean(every), rel=1e-5)


def test_nll_leaves_out_pixels_whose_cosine_is_outside_plus_minus_0_999():
    """Bae's NLL keeps the pixels with -0.999 < cos < 0.999 (acos has no usable gradient beyond): an exact and an
    opposite prediction add nothing to the mean, whatever their kappa."""
    target = unit_vectors(1, 3, 1, 4, seed=10)
    pred = torch.cat([unit_vectors(1, 3, 1, 4, seed=11), torch.tensor([1.0, 2.0, 30.0, 40.0]).view(1, 1, 1, 4)], 1)
    pred[0, :3, 0, 2], pred[0, :3, 0, 3] = target[0, :, 0, 2], -target[0, :, 0, 3]
    def cos(j):
        return float((pred[0, :3, 0, j] * target[0, :, 0, j]).sum())
    expected = (hand_nll(1.0, cos(0)) + hand_nll(2.0, cos(1))) / 2
    assert nll_angular(pred, target, torch.ones(1, 1, 4, dtype=torch.bool)).item() == pytest.approx(expected, rel=1e-5)


def test_sampling_refines_the_least_certain_valid_pixels_then_random_others():
    b, h, w = 2, 5, 6
    kappa = torch.stack([torch.randperm(h * w, generator=torch.Generator().manual_seed(s)).float() + 1
                         for s in range(b)]).view(b, h, w)
    coarse = torch.cat([unit_vectors(b, 3, h, w, seed=7), kappa[:, None]], dim=1)
    valid = torch.ones(b, h, w, dtype=torch.bool)
    valid[0, 0] = False  # a row without ground truth in image 0
    valid[1, :, 0] = False
    torch.manual_seed(0)
    rows, cols = sample_points(coarse, valid, ratio=0.4, importance=0.7)
    n, n_important = int(0.4 * h * w), int(0.7 * int(0.4 * h * w))
    assert rows.shape == cols.shape == (b, n) and (n, n_important) == (12, 8)
    for i in range(b):
        picked = (rows[i] * w + cols[i]).tolist()
        assert len(set(picked)) == n  # no pixel twice
        candidates = [p for p in kappa[i].flatten().argsort().tolist() if valid[i].flatten()[p]]
        assert set(picked[:n_important]) == set(candidates[:n_important])  # the lowest kappa among the valid
        assert not set(picked[n_important:]) & set(candidates[:n_important])
    # the remaining 30% are drawn at random
    torch.manual_seed(1)
    other_rows, other_cols = sample_points(coarse, valid, ratio=0.4, importance=0.7)
    assert not torch.equal(rows[:, n_important:] * w + cols[:, n_important:],
                           other_rows[:, n_important:] * w + other_cols[:, n_important:])


def test_bae_head_wires_every_width_where_it_belongs():
    """A head with a different width at every level (the published ones differ everywhere; tests elsewhere use equal
    widths, where a level's width taken from its neighbour goes unnoticed) runs densely and sampled, and the
    published widths are the defaults in code and config."""
    from densediff.heads.bae import PUBLISHED_DECODER, PUBLISHED_FUSION, BaeHead

    config = yaml.safe_load((ROOT / "conf" / "head" / "bae.yaml").read_text())
    assert tuple(config["fusion_channels"]) == PUBLISHED_FUSION == (2048, 176, 64, 40, 24)
    assert tuple(config["decoder_channels"]) == PUBLISHED_DECODER == (1024, 512, 256, 128)
    assert (config["mlp_channels"], config["sampling_ratio"], config["importance_ratio"]) == (128, 0.4, 0.7)

    torch.manual_seed(0)
    head = BaeHead([8, 12, 16, 20], build_task("normals"), fusion_channels=(40, 32, 24, 16, 8),
                   decoder_channels=(48, 40, 32, 24), mlp_channels=12)
    g = torch.Generator().manual_seed(1)
    bins = [torch.randn(2, c, s, s + 1, generator=g) for c, s in zip([8, 12, 16, 20], [4, 8, 16, 16])]
    size = (32, 40)
    dense = head(bins, size)
    assert [tuple(m.shape) for m in dense["maps"]] == [(2, 4, 4, 5), (2, 4, 8, 10), (2, 4, 16, 20), (2, 4, 32, 40)]
    valid = torch.rand(2, *size, generator=g) > 0.3
    sampled = head(bins, size, valid, sampled=True)
    assert [tuple(p.shape) for p, _ in sampled["points"]] == [(2, 4, 32), (2, 4, 128), (2, 4, 512)]  # 40% of pixels
    loss = ug_nll_loss(sampled, unit_vectors(2, 3, *size, seed=12), valid)
    assert torch.isfinite(loss)


# ---- the UNet's input order: [rgb_latent, target_latent] on a backbone whose conv_in halves differ ------------------

@pytest.fixture(scope="module")
def random_backbone():
    from densediff.backbones import load_backbone

    backbone = load_backbone(ASSETS / "tiny_random")
    halves = backbone.unet.conv_in.weight.detach()
    assert (halves[:, :4] - halves[:, 4:]).abs().max() > 0.1  # else the input order is invisible
    return backbone


def test_single_step_estimate_feeds_the_rgb_latent_first(random_backbone):
    from densediff.inference import LatentEstimator

    b = random_backbone
    estimator = LatentEstimator(b.unet.eval(), b.vae.eval(), b.scheduler, b.empty_text_embedding)
    rgb = torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scaling = b.vae.config.scaling_factor
        rgb_latent = b.vae.encode(rgb * 2 - 1).latent_dist.mean * scaling
        t = torch.full((2,), 999)
        v = b.unet(torch.cat([rgb_latent, torch.zeros_like(rgb_latent)], 1), t,
                   encoder_hidden_states=b.empty_text_embedding.expand(2, -1, -1)).sample
        alpha_bar = b.scheduler.alphas_cumprod[999]
        x0 = -(1 - alpha_bar).sqrt() * v  # v-prediction at x_t = 0
        expected = b.vae.decode(x0 / scaling).sample
        ours = estimator(rgb)
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()


def test_multistep_prediction_matches_diffusers_on_a_backbone_whose_conv_in_halves_differ(random_backbone):
    from diffusers import DDIMScheduler, MarigoldDepthPipeline

    from densediff.inference import LatentEstimator
    from densediff.inference.predictor import InferenceOptions, predict

    b = random_backbone
    estimator = LatentEstimator(b.unet.eval(), b.vae.eval(), b.scheduler, b.empty_text_embedding)
    rgb = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(1))
    options = InferenceOptions(steps=2, noise="gaussian", final_step="prev_sample")
    ours = predict(estimator, build_task("depth"), rgb, options, torch.Generator().manual_seed(7))
    pipe = MarigoldDepthPipeline.from_pretrained(ASSETS / "tiny_random")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    theirs = pipe(rgb, num_inference_steps=2, ensemble_size=1, processing_resolution=0,
                  generator=torch.Generator().manual_seed(7), output_type="pt").prediction[:, 0]
    theirs = (theirs - theirs.min()) / (theirs.max() - theirs.min())  # one member: (d + 1) / 2, not min-max
    assert torch.allclose(ours, theirs, atol=2e-3), (ours - theirs).abs().max()


# ---- the latent loss of the denoising estimators (Marigold, DMP, GeoWizard) -----------------------------------------

def test_masked_latent_mse_pools_the_masked_latents_of_the_batch_over_all_channels():
    g = torch.Generator().manual_seed(0)
    output, target = torch.randn(3, 4, 3, 3, generator=g), torch.randn(3, 4, 3, 3, generator=g)
    mask = torch.zeros(3, 1, 3, 3, dtype=torch.bool)
    mask[0, 0, 1:, :2] = True  # 4 latent pixels of sample 0, 1 of sample 1, 7 of sample 2: pooled, not per sample
    mask[1, 0, 0, 0] = True
    mask[2, 0] = True
    mask[2, 0, 1, 1:] = False
    sq = (output - target) ** 2
    expected = (sq[0, :, 1:, :2].sum() + sq[1, :, 0, 0].sum() + sq[2].sum() - sq[2, :, 1, 1:].sum()) / ((4 + 1 + 7) * 4)
    assert masked_latent_mse(output, target, mask).item() == pytest.approx(expected.item(), rel=1e-6)


def test_a_posterior_sample_latent_is_mean_plus_std_times_the_generators_noise():
    """latent=sample (DMP's training latents): mean + std x eps with eps drawn from the step's generator, times the
    VAE's scaling factor; latent=mean: the posterior mean (Marigold)."""
    from densediff.paradigms import DiffusionEstimator

    model = DiffusionEstimator({"path": str(ASSETS / "tiny")}, task="depth", latent="sample")
    image = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        posterior = model.estimator.vae.encode(image).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(5))
        scaling = model.estimator.scaling_factor
        sample = model.encode(image, torch.Generator().manual_seed(5))
        assert torch.allclose(sample, (posterior.mean + posterior.std * eps) * scaling, atol=1e-5)
        model.hparams.latent = "mean"
        assert torch.allclose(model.encode(image), posterior.mean * scaling, atol=1e-6)


def test_latent_mask_of_a_partial_pixel_mask():
    valid = torch.ones(2, 8, 12, dtype=torch.bool)
    valid[0, 5, 9] = False  # spoils latent (1, 2) of sample 0
    valid[1, :4] = False  # the top latent row of sample 1
    mask = latent_valid_mask(valid, 4)
    expected = torch.ones(2, 1, 2, 3, dtype=torch.bool)
    expected[0, 0, 1, 2] = False
    expected[1, 0, 0] = False
    assert torch.equal(mask, expected)


# ---- every published loss weight -------------------------------------------------------------------------------

# DiffusionMTL (configs/pascal: semseg 1, human_parts 2, sal 5, normals 10, edge 50; TaskPrompter NYUD: depth 1,
# normals 10, edge 50, semseg 1), intermediate heads x 0.5, edges' balanced BCE 0.95 (DMTL utils/common_config.py,
# losses/loss_schemes.py; docs/paradigms.md#diffusionmtl).
PUBLISHED_MTL = {"segmentation": 1.0, "human_parts": 2.0, "saliency": 5.0, "normals": 10.0, "edges": 50.0,
                 "depth": 1.0}


def test_every_published_diffusionmtl_loss_weight_reaches_the_loss():
    from densediff.paradigms.multitask import MultiTaskDenoising
    from densediff.tasks.heads import DEFAULT_WEIGHTS

    assert DEFAULT_WEIGHTS == PUBLISHED_MTL
    objective = yaml.safe_load((ROOT / "conf" / "objective" / "multitask.yaml").read_text())
    assert objective["intermediate_weight"] == 0.5
    assert yaml.safe_load((ROOT / "conf" / "task" / "edges.yaml").read_text())["pos_weight"] == 0.95
    assert yaml.safe_load((ROOT / "conf" / "task" / "multitask.yaml").read_text())["weights"] == {}

    tasks = list(PUBLISHED_MTL)
    tiny = dict(encoder_options={"config": {"embedding_size": 8, "hidden_sizes": [8, 8, 16, 16],
                                            "depths": [1, 1, 1, 1]}},
                embed_dim=8, denoiser_blocks=1, denoiser_heads=2, time_freq_dim=8)
    model = MultiTaskDenoising(tasks, {"segmentation": {"palette": "procedural"},
                                       "human_parts": {"palette": "procedural"}}, **tiny)
    for head in model.heads.values():
        head.loss = lambda values, batch: values  # per-sample losses given directly
    final = {t: torch.tensor([1.0]) for t in tasks}
    prelim = {t: torch.tensor([2.0]) for t in tasks}
    out = model.losses(prelim, final, {}, torch.ones(1, len(tasks), dtype=torch.bool))
    for t, weight in PUBLISHED_MTL.items():  # weight x (final + 0.5 x preliminary), all labelled: no rescaling
        assert out[t].item() == pytest.approx(weight * (1 + 0.5 * 2)), t
    # and each head's outputs (DMTL utils/config.py NUM_OUTPUT: sal 2, normals 3, edge 1; depth 1; classes otherwise)
    assert {t: model.heads[t].channels for t in ("saliency", "normals", "edges", "depth")} == \
        {"saliency": 2, "normals": 3, "edges": 1, "depth": 1}
    assert model.heads["segmentation"].channels == model.heads["segmentation"].task.num_classes


def test_multitask_head_losses_on_partial_masks_equal_the_losses_of_the_valid_pixels_alone():
    """Each DiffusionMTL head's per-sample loss with a partial valid mask equals the reference loss computed on the
    valid pixels alone (PyTorch's weighted CE for saliency with w = the valid negatives' share, the 0.95/0.05 BCE
    for edges, the L1 of normalised normals summed over xyz, CE for segmentation)."""
    import torch.nn.functional as F

    from densediff.tasks.heads import Head

    g = torch.Generator().manual_seed(0)
    h, w = 4, 6
    valid = torch.rand(2, h, w, generator=g) > 0.35
    valid[1, 0, 0] = valid[1, 0, 1] = True
    normals = unit_vectors(2, 3, h, w, seed=9)
    normals[0, :, 0, :2] = 0  # no normal there: not counted even where valid_mask says so
    batch = {"valid_mask": valid, "saliency": (torch.rand(2, h, w, generator=g) > 0.6).float(),
             "edges": (torch.rand(2, h, w, generator=g) > 0.7).float(), "normals": normals,
             "segmentation": torch.randint(0, 4, (2, h, w), generator=g)}
    logits = {"saliency": torch.randn(2, 2, h, w, generator=g), "edges": torch.randn(2, 1, h, w, generator=g),
              "normals": torch.randn(2, 3, h, w, generator=g), "segmentation": torch.randn(2, 4, h, w, generator=g)}
    for name in ("saliency", "edges", "normals", "segmentation"):
        options = {"palette": "procedural"} if name == "segmentation" else {}
        ours = Head(build_task(name, **options), 1.0).loss(logits[name], batch)
        for i in range(2):
            m = valid[i] & (normals[i].norm(dim=0) > 0.5) if name == "normals" else valid[i]
            x = logits[name][i].flatten(1)[:, m.flatten()].T  # [N, C] valid pixels
            y = batch[name][i].flatten(-2)[..., m.flatten()]
            if name == "saliency":
                negatives = float((y < 0.5).float().mean())
                expected = F.cross_entropy(x, (y > 0.5).long(), weight=torch.tensor([1 - negatives, negatives]))
            elif name == "edges":
                expected = (0.95 * y * F.softplus(-x[:, 0]) + 0.05 * (1 - y) * F.softplus(x[:, 0])).mean()
            elif name == "normals":
                expected = (F.normalize(x, dim=1) - y.T).abs().sum(1).mean()
            else:
                expected = F.cross_entropy(x, y)
            assert ours[i].item() == pytest.approx(expected.item(), rel=1e-5), (name, i)


def test_diffusionmtl_defaults_are_the_published_config_in_code_and_yaml():
    """The class's and the schedule's defaults equal conf/objective/multitask.yaml, which holds the released PASCAL
    config (2 steps, betas 1e-3 -> 1e-2, intermediate heads x 0.5, Adam 2e-5, weight decay 1e-6, poly 0.9)."""
    import inspect

    from densediff.paradigms.multitask import MultiTaskDenoising, two_step_schedule

    objective = yaml.safe_load((ROOT / "conf" / "objective" / "multitask.yaml").read_text())
    published = {"num_timesteps": 2, "beta_start": 1e-3, "beta_end": 1e-2, "intermediate_weight": 0.5, "lr": 2e-5,
                 "weight_decay": 1e-6, "poly_power": 0.9}
    defaults = inspect.signature(MultiTaskDenoising).parameters
    for name, value in published.items():
        assert objective[name] == value and defaults[name].default == value, name
    assert two_step_schedule()["betas"].tolist() == pytest.approx([1e-3, 1e-2], rel=1e-12)


def test_diffusionmtl_timestep_embedding_is_dits_sinusoid():
    """DiT's TimestepEmbedder.timestep_embedding: [cos, sin] of t x max_period^(-k / half), k = 0 .. half - 1."""
    from densediff.paradigms.multitask import timestep_embedding

    t = torch.tensor([0.0, 1.0, 7.0])
    ours = timestep_embedding(t, dim=8)
    for i, step in enumerate(t.tolist()):
        args = [step * 10000.0 ** (-k / 4) for k in range(4)]
        assert ours[i].tolist() == pytest.approx([math.cos(a) for a in args] + [math.sin(a) for a in args], abs=1e-6)


def test_pyramid_noise_is_marigolds_multi_res_noise_draw_for_draw():
    """Marigold's training noise (multi_res_noise_like, strategy "original") written out: Gaussian noise plus 10
    levels, each r ~ 2 + 2 U[0, 1) times smaller than the last (cumulative), bilinearly upsampled, weighted 0.9^i,
    stopping at 1 px, divided by the global std; drawn from the same generator, so equal draw for draw."""
    import torch.nn.functional as F

    from densediff.inference.predictor import pyramid_noise

    shape = (2, 4, 24, 32)
    ours = pyramid_noise(shape, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    b, c, h, w = shape
    noise = torch.randn(shape, generator=g)
    for i in range(10):
        r = torch.rand(1, generator=g) * 2 + 2
        h, w = max(1, int(h / r ** i)), max(1, int(w / r ** i))
        noise += F.interpolate(torch.randn(b, c, h, w, generator=g), size=shape[2:], mode="bilinear") * 0.9 ** i
        if h == 1 or w == 1:
            break
    assert torch.allclose(ours, noise / noise.std(), atol=1e-6)


# ---- depth ensembles of even size against diffusers --------------------------------------------------------------

@pytest.mark.parametrize("count", [2, 4])
def test_even_sized_depth_ensemble_equals_diffusers_ensemble_depth(count):
    from diffusers import MarigoldDepthPipeline

    g = torch.Generator().manual_seed(count)
    base = torch.rand(1, 24, 30, generator=g)
    scale, shift = torch.linspace(0.5, 2.0, count), torch.linspace(-0.3, 0.2, count)
    members = base * scale[:, None, None] + shift[:, None, None] + 0.05 * torch.randn(count, 24, 30, generator=g)
    ours = ensemble_depth(members, reduction="median")
    ours = (ours - ours.min()) / (ours.max() - ours.min())
    theirs, _ = MarigoldDepthPipeline.ensemble_depth(members[:, None], reduction="median")
    assert torch.allclose(ours, theirs[0, 0], atol=1e-5), (ours - theirs[0, 0]).abs().max()


def test_metric_depth_ensemble_is_the_plain_median_of_the_members():
    """DMP's float codec in metres: the members share one scale, so they merge by the per-pixel median (lower middle
    for an even count, as torch) or mean, without alignment."""
    members = torch.rand(4, 6, 7, generator=torch.Generator().manual_seed(0)) * 8
    task = build_task("depth", encoding="float", target_scale=8.0)
    assert torch.equal(task.ensemble(members, "median"), members.sort(dim=0).values[1])
    assert torch.allclose(task.ensemble(members, "mean"), members.mean(dim=0))


def test_median_of_an_even_number_of_members_is_the_lower_middle_one():
    members = torch.tensor([[4.0, 1.0], [2.0, 3.0], [1.0, 2.0], [3.0, 4.0]])  # per pixel: 1 2 3 4 in some order
    assert median_of_members(members).tolist() == [2.0, 2.0]
    assert median_of_members(members[:2]).tolist() == [2.0, 1.0]


# ---- a task's whole loss: partial masks and out-of-range pixels -------------------------------------------------

def hand_depth_loss(pred: np.ndarray, depth: np.ndarray, valid: np.ndarray, quantile: float) -> float:
    """E2E-FT's depth loss written out: clip each image's GT to its [q, 1-q] valid-pixel quantiles (linear), fit
    scale and shift of the prediction by least squares on the valid pixels, L1 pooled over the batch's valid ones."""
    total, count = 0.0, 0
    for p, d, m in zip(pred, depth, valid):
        lo, hi = np.quantile(d[m], [quantile, 1 - quantile])
        g = np.clip(d[m], lo, hi)
        (s, t), *_ = np.linalg.lstsq(np.stack([p[m], np.ones(m.sum())], 1), g, rcond=None)
        assert s > 0  # the least-squares branch of the loss
        total += np.abs(s * p[m] + t - g).sum()
        count += m.sum()
    return total / count


def test_depth_task_loss_keeps_only_valid_in_range_pixels():
    g = torch.Generator().manual_seed(0)
    depth = 1 + 9 * torch.rand(2, 6, 8, generator=g)
    depth[0, 0, :3] = 0.0  # below min_depth, flagged valid by the loader
    depth[0, 5, 5:] = 200.0  # beyond max_depth
    depth[1, 2, 2] = 95.0
    valid_mask = torch.ones(2, 6, 8, dtype=torch.bool)
    valid_mask[1, :, :2] = False  # plus a partial loader mask
    valid_mask[1, 4, 4] = False
    depth[1, :, :2] = 0.5 + torch.rand(6, 2, generator=g)  # in range, but the loader says invalid
    pred = (depth - 5) / 5 + 0.3 * torch.randn(2, 6, 8, generator=g)
    task = build_task("depth")  # min_depth 1e-3, max_depth 80, quantile 0.02
    in_range = valid_mask & (depth > 1e-3) & (depth < 80)
    expected = hand_depth_loss(pred.double().numpy(), depth.double().numpy(), in_range.numpy(), 0.02)
    assert task.loss(pred, {"depth": depth, "valid_mask": valid_mask}).item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("name", ["depth", "albedo", "shading", "segmentation"])
def test_a_tasks_whole_loss_sees_nothing_outside_the_valid_mask(name):
    """Any change of the prediction where the loader's valid_mask is False leaves the task's loss unchanged; a change
    at a valid pixel does not (procedural scenes, the left half of every image masked out)."""
    from torch.utils.data import default_collate

    from densediff.data.procedural import ProceduralScenes

    task = build_task(name, **({"palette": "procedural"} if name == "segmentation" else {}))
    data = ProceduralScenes(tasks=[name], num_scenes=2, height=16, width=20)
    batch = default_collate([data[i] for i in range(2)])
    batch["valid_mask"][:, :, :10] = False
    g = torch.Generator().manual_seed(0)
    clean = task.decode(task.encode(batch))
    pred = clean + 0.2 * torch.randn(clean.shape, generator=g)
    outside = (~batch["valid_mask"]).view(2, *([1] if pred.dim() == 4 else []), 16, 20)
    noise = torch.randn(pred.shape, generator=g)
    loss = task.loss(pred, batch)
    assert torch.isfinite(loss) and loss > 0
    assert task.loss(pred + 3 * noise * outside, batch).item() == pytest.approx(loss.item(), rel=1e-6)
    assert task.loss(pred + 0.5 * noise * ~outside, batch).item() != pytest.approx(loss.item(), rel=1e-3)


@pytest.mark.parametrize("encoding", ["affine", "disparity"])
def test_a_flat_depth_map_encodes_as_zeros_not_nan(encoding):
    """p2 == p98 (one depth everywhere): the module docstring's rule is a zero image; dividing by the empty range would
    give NaN or inf (mutate.py's last survivor: `>` -> `>=` in the range test)."""
    from densediff.tasks import build_task

    depth = torch.full((2, 6, 8), 3.0)
    depth[1, :, :4] = 5.0  # the second image has a range: encoded normally
    batch = {"depth": depth, "valid_mask": torch.ones(2, 6, 8, dtype=torch.bool)}
    image = build_task("depth", encoding=encoding).encode(batch)
    assert torch.isfinite(image).all() and torch.equal(image[0], torch.zeros(3, 6, 8))
    assert image[1].abs().max() == 1
