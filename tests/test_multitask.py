"""DiffusionMTL (objective=multitask, docs/paradigms.md#diffusionmtl): the losses against hand computations, the
partial-label scaling, the 2-step schedule's constants, gradients of unlabelled tasks, the encoders."""

import math

import pytest
import torch
import torch.nn.functional as F

from densediff.paradigms.multitask import MultiTaskDenoising, delta_m, two_step_schedule
from densediff.tasks.heads import balanced_bce, balanced_cross_entropy, cross_entropy, normals_l1

TINY_RESNET = {"config": {"embedding_size": 8, "hidden_sizes": [8, 8, 16, 16], "depths": [1, 1, 1, 1]}}
TINY = dict(encoder_options=TINY_RESNET, embed_dim=8, denoiser_blocks=1, denoiser_heads=2, time_freq_dim=8)


def test_cross_entropy_ignores_255_and_invalid_pixels():
    logits = torch.tensor([[[[0.0, 5.0, 1.0]], [[math.log(3), -2.0, 1.0]]]])  # [1, 2, 1, 3]
    target = torch.tensor([[[1, 255, 0]]])
    valid = torch.tensor([[[True, True, False]]])
    assert cross_entropy(logits, target, valid).item() == pytest.approx(math.log(4 / 3), rel=1e-6)
    assert cross_entropy(logits, target, torch.zeros_like(valid)).item() == 0  # nothing valid: 0, not NaN


def test_saliency_loss_weights_classes_by_the_share_of_negatives():
    # one positive (p = 3/4 -> CE log 4/3) and three negatives at logits 0 (CE log 2); w = 3/4 negatives
    logits = torch.zeros(1, 2, 1, 4)
    logits[0, 1, 0, 0] = math.log(3)
    target = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])
    valid = torch.ones(1, 1, 4, dtype=torch.bool)
    expected = (0.75 * math.log(4 / 3) + 3 * 0.25 * math.log(2)) / (0.75 + 3 * 0.25)
    assert balanced_cross_entropy(logits, target, valid).item() == pytest.approx(expected, rel=1e-6)
    # PyTorch's weighted cross-entropy (what MTT's CrossEntropyLoss(balanced=True) calls) agrees
    reference = F.cross_entropy(logits, target.long(), weight=torch.tensor([0.25, 0.75]))
    assert balanced_cross_entropy(logits, target, valid).item() == pytest.approx(reference.item(), rel=1e-6)


def test_edge_loss_is_095_positive_005_negative():
    logits = torch.tensor([[[[0.0, math.log(3), 7.0]]]])
    target = torch.tensor([[[1.0, 0.0, 1.0]]])
    valid = torch.tensor([[[True, True, False]]])
    expected = (0.95 * math.log(2) + 0.05 * math.log(4)) / 2
    assert balanced_bce(logits, target, valid).item() == pytest.approx(expected, rel=1e-6)
    reference = F.binary_cross_entropy_with_logits(logits[..., :2], target[None, ..., :2],
                                                   pos_weight=torch.tensor(19.0)) / 20
    assert balanced_bce(logits, target, valid).item() == pytest.approx(reference.item(), rel=1e-6)


def test_normals_loss_is_l1_between_unit_vectors():
    pred = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 1.0]])[None, :, None]  # [1, 3, 1, 2]
    target = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])[None, :, None]
    valid = torch.tensor([[[True, False]]])
    assert normals_l1(pred, target, valid).item() == pytest.approx(2.0)


def test_two_step_schedule_constants():
    s = two_step_schedule(2, 1e-3, 1e-2)
    assert s["betas"].tolist() == pytest.approx([1e-3, 1e-2])
    assert s["alphas_cumprod"].tolist() == pytest.approx([0.999, 0.98901])
    assert s["sqrt_abar"].tolist() == pytest.approx([0.99950, 0.99449], abs=1e-5)
    assert s["sqrt_one_minus_abar"].tolist() == pytest.approx([0.03162, 0.10483], abs=1e-5)
    assert s["posterior_x0"][1].item() == pytest.approx(0.90946, abs=1e-5)
    assert s["posterior_xt"][1].item() == pytest.approx(0.09054, abs=1e-5)
    assert s["posterior_variance"][1].item() == pytest.approx(9.099e-4, rel=1e-3)


def test_predict_draws_the_chains_noise_from_the_inference_seed_whatever_ran_before():
    from densediff.inference.predictor import InferenceOptions

    model = MultiTaskDenoising(["segmentation", "saliency"], {"segmentation": {"palette": "procedural"}}, **TINY)
    model.eval().configure_inference(InferenceOptions(seed=7))
    rgb = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    first = model.predict(rgb)
    torch.rand(5)  # the global RNG moves on (another image, another request)
    again = model.predict(rgb)
    for task in first:
        assert torch.equal(first[task], again[task])
    model.configure_inference(InferenceOptions(seed=8))
    assert not torch.equal(model.predict(rgb)["saliency"], first["saliency"])  # the noise matters: the seed shows


def test_loss_scales_each_sample_by_tasks_over_labelled():
    model = MultiTaskDenoising(["segmentation", "saliency"], {"segmentation": {"palette": "procedural"}}, **TINY)
    for head in model.heads.values():
        head.loss = lambda values, batch: values  # per-sample "losses" given directly
    final = {"segmentation": torch.tensor([1.0, 2.0]), "saliency": torch.tensor([3.0, 4.0])}
    prelim = {"segmentation": torch.tensor([10.0, 20.0]), "saliency": torch.tensor([30.0, 40.0])}
    labelled = torch.tensor([[True, True], [True, False]])
    out = model.losses(prelim, final, {}, labelled)
    seg = ((1 + 0.5 * 10) * 2 / 2 + (2 + 0.5 * 20) * 2 / 1) / 2  # weight 1
    sal = 5 * ((3 + 0.5 * 30) * 2 / 2) / 2  # weight 5; sample 1 unlabelled
    assert out["segmentation"].item() == pytest.approx(seg)
    assert out["saliency"].item() == pytest.approx(sal)
    assert out["loss"].item() == pytest.approx(seg + sal)


def batch_of(tasks, n=2):
    from torch.utils.data import default_collate

    from densediff.data.procedural import ProceduralScenes

    data = ProceduralScenes(tasks=tasks, num_scenes=n, height=32, width=40)
    return default_collate([data[i] for i in range(n)])


def gradients(model, batch, draws=0):
    """One training step's gradients; `draws` picks its noise (the same value replays the same noise)."""
    model.zero_grad()
    model.step_randomness.draws = draws
    model.training_step(batch, 0).backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def test_unlabelled_task_gives_its_final_head_zero_gradient():
    torch.manual_seed(0)
    tasks = ["segmentation", "normals"]
    model = MultiTaskDenoising(tasks, {"segmentation": {"palette": "procedural"}}, **TINY)
    batch = batch_of(tasks)
    # nobody labels normals: its final head gets no gradient, its preliminary prediction still conditions
    batch["labelled"] = {"segmentation": torch.tensor([True, True]), "normals": torch.tensor([False, False])}
    grads = gradients(model, batch)
    assert all(g is None or not g.any() for n, g in grads.items() if n.startswith("final.normals"))
    assert grads["final.segmentation.weight"].abs().sum() > 0
    assert all(g is None or not g.any() for n, g in grads.items() if n.startswith("preliminary.normals"))
    # sample 0 does not label normals: its normals GT can be anything without changing any gradient
    batch["labelled"]["normals"] = torch.tensor([False, True])
    before = gradients(model, batch)
    batch["normals"][0] = torch.randn_like(batch["normals"][0])
    after = gradients(model, batch)
    assert before["final.normals.weight"].abs().sum() > 0
    assert all(torch.equal(before[n], after[n]) for n in before if before[n] is not None)


@pytest.mark.parametrize("conditioning,diffusion", [(False, True), (True, False)])
def test_ablations_train(conditioning, diffusion):
    tasks = ["segmentation", "saliency", "edges"]
    model = MultiTaskDenoising(tasks, {"segmentation": {"palette": "procedural"}}, conditioning=conditioning,
                               diffusion=diffusion, **TINY)
    grads = gradients(model, batch_of(tasks))
    assert grads["preliminary.edges.weight"].abs().sum() > 0
    assert hasattr(model, "final") == diffusion


def test_delta_m_signs_lower_is_better_metrics():
    values = {"segmentation/miou": 0.55, "normals/angular_mean": 18.0}
    assert delta_m(values, {"segmentation/miou": 0.5, "normals/angular_mean": 20.0}) == pytest.approx(0.1)


def test_resnet_encoder_loads_a_saved_folder_and_random_init(tmp_path):
    from transformers import ResNetConfig, ResNetModel

    from densediff.backbones.encoders import ResNetEncoder

    torch.manual_seed(0)
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1],
                             layer_type="basic")).save_pretrained(tmp_path / "resnet")
    loaded, random = ResNetEncoder(str(tmp_path / "resnet")), ResNetEncoder(None, TINY_RESNET["config"])
    reference = ResNetModel.from_pretrained(tmp_path / "resnet")
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), reference.state_dict().values()))
    maps = loaded(torch.rand(1, 3, 64, 64))
    assert [m.shape[1] for m in maps] == loaded.channels == [8, 8, 16, 16]
    assert [m.shape[-1] for m in maps] == [16, 8, 4, 2]  # strides 4, 8, 16, 32
    assert random.channels == [8, 8, 16, 16]
    with pytest.raises(FileNotFoundError, match="encoder.path"):
        ResNetEncoder(str(tmp_path / "missing"))


def test_diffusion_encoder_reads_the_unets_multiscale_features():
    from densediff.backbones.encoders import DiffusionEncoder
    from densediff.run import ASSETS

    encoder = DiffusionEncoder(str(ASSETS / "tiny"), timestep=1)
    maps = encoder(torch.rand(1, 3, 30, 40))  # padded to a multiple of 8 inside
    assert [m.shape[1] for m in maps] == encoder.channels
    assert maps[0].shape[-1] > maps[-1].shape[-1]  # finest first
    assert not any(p.requires_grad for p in encoder.vae.parameters())


def test_diffusion_encoder_feeds_the_unet_the_clean_latent_and_its_noiseless_forward_process():
    """The UNet input is [z, sqrt(abar_t) z] (z = VAE mean x scaling factor): the forward process at t, noise zero."""
    from diffusers import DDIMScheduler

    from densediff.backbones.encoders import DiffusionEncoder
    from densediff.run import ASSETS

    torch.manual_seed(0)
    encoder = DiffusionEncoder(str(ASSETS / "tiny"), timestep=300)
    seen = {}
    encoder.unet.conv_in.register_forward_pre_hook(lambda module, args: seen.update(x=args[0].detach()))
    rgb = torch.rand(1, 3, 32, 40)
    encoder(rgb)
    with torch.no_grad():
        z = encoder.vae.encode(rgb * 2 - 1).latent_dist.mean * encoder.vae.config.scaling_factor
    abar = DDIMScheduler.from_pretrained(str(ASSETS / "tiny"), subfolder="scheduler").alphas_cumprod[300]
    torch.testing.assert_close(seen["x"], torch.cat([z, abar.sqrt() * z], dim=1), rtol=0, atol=1e-6)


def test_procedural_scenes_carry_partial_labels():
    from densediff.data.procedural import ProceduralScenes

    tasks = ["segmentation", "depth", "normals", "saliency", "edges"]
    one = ProceduralScenes(tasks=tasks, num_scenes=10, height=16, width=16, partial_labels="one_label")
    flags = [one[i]["labelled"] for i in range(10)]
    assert all(sum(bool(f[t]) for t in tasks) == 1 for f in flags)
    assert {t for f in flags for t in tasks if f[t]} == set(tasks)  # dealt to every task in turn
    assert "labelled" not in ProceduralScenes(tasks=tasks, num_scenes=2, height=16, width=16)[0]


# ---- the denoiser against DiffusionMTL's arithmetic (issue 25 item 1) -----------------------------------------------
def _layer_norm(x, p, name):
    return F.layer_norm(x, x.shape[-1:], p[f"{name}.weight"], p[f"{name}.bias"], 1e-5)


def _mlp(x, p, name):  # timm's Mlp: fc1, GELU (erf), fc2
    return F.linear(F.gelu(F.linear(x, p[f"{name}.fc1.weight"], p[f"{name}.fc1.bias"])),
                    p[f"{name}.fc2.weight"], p[f"{name}.fc2.bias"])


def _reference_cross_block(p, i, x, kv, heads):
    """DMTL's CrossBlock(x = condition tokens, kv = noisy task tokens), written out: kv gets its MLP residual first,
    then x attends (q from x, k and v from the updated kv, no q/kv bias), then x gets its MLP residual."""
    b = f"crossblocks.{i}"
    kv = kv + _mlp(_layer_norm(kv, p, f"{b}.norm2_kv"), p, f"{b}.mlp_kv")
    xn, kvn = _layer_norm(x, p, f"{b}.norm1"), _layer_norm(kv, p, f"{b}.norm_kv")
    B, N, C = x.shape
    q = (xn @ p[f"{b}.attn.q.weight"].T).reshape(B, N, heads, C // heads).permute(0, 2, 1, 3)
    k, v = (kvn @ p[f"{b}.attn.kv.weight"].T).reshape(B, -1, 2, heads, C // heads).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(-1)
    out = (attn @ v).transpose(1, 2).reshape(B, N, C)
    x = x + F.linear(out, p[f"{b}.attn.proj.weight"], p[f"{b}.attn.proj.bias"])
    return x + _mlp(_layer_norm(x, p, f"{b}.norm2"), p, f"{b}.mlp"), kv


def _reference_denoiser(p, x_t, t, feat, task, depth, heads, freq_dim):
    """DMTL's Denosier.forward for one task (upsam=False): pre_layer conv + t embedding -> x0; condition `feat` and
    x each bilinearly to 1/4 as tokens; condition = queries through the blocks; back x4, + x0; the task head."""
    half = freq_dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)  # float32, as DiT's
    args = torch.full((x_t.shape[0], 1), float(t)) * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], -1).to(x_t.dtype)
    emb = F.linear(F.silu(F.linear(emb, p["t_embedder.mlp.0.weight"], p["t_embedder.mlp.0.bias"])),
                   p["t_embedder.mlp.2.weight"], p["t_embedder.mlp.2.bias"])
    x = F.conv2d(x_t, p[f"pre_layer.{task}.weight"], p[f"pre_layer.{task}.bias"], padding=1) + emb[:, :, None, None]
    x0 = x
    small = F.interpolate(feat, scale_factor=0.25, mode="bilinear", align_corners=False)
    B, C, H, W = small.shape
    cond = small.reshape(B, C, -1).transpose(1, 2)
    x = F.interpolate(x, scale_factor=0.25, mode="bilinear", align_corners=False).reshape(B, C, -1).transpose(1, 2)
    for i in range(depth):
        cond, x = _reference_cross_block(p, i, cond, x, heads)
    x = cond.reshape(B, H, W, C).permute(0, 3, 1, 2)
    x = F.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False) + x0
    h = f"task_heads.{task}"
    x = F.conv2d(x, p[f"{h}.0.weight"], p[f"{h}.0.bias"])
    for j in (1, 3, 5):
        x = F.relu(F.conv2d(x, p[f"{h}.{j}.weight"], p[f"{h}.{j}.bias"], padding=1))
    return x


def _to_reference_names(name: str) -> str:
    """densediff Denoiser parameter -> DMTL Denosier parameter (the mapping CrossBlock's docstring states)."""
    top = {"blocks": "crossblocks", "t_mlp": "t_embedder.mlp", "inputs": "pre_layer", "heads": "task_heads"}
    inner = {"norm_q": "norm1", "norm_mlp": "norm2", "norm_kv_mlp": "norm2_kv", "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2",
             "kv_mlp.0": "mlp_kv.fc1", "kv_mlp.2": "mlp_kv.fc2"}
    head, rest = name.split(".", 1)
    if head == "blocks":
        index, module, leaf = rest.split(".", 1)[0], rest.split(".", 1)[1].rsplit(".", 1)[0], name.rsplit(".", 1)[1]
        return f"crossblocks.{index}.{inner.get(module, module)}.{leaf}"
    return f"{top[head]}.{rest}"


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_denoiser_computes_diffusionmtls_cross_blocks(dtype, tol):
    from densediff.paradigms.multitask import Denoiser

    torch.manual_seed(0)
    torch.set_num_threads(1)
    dim, heads, depth, freq = 16, 4, 2, 8
    model = Denoiser(["normals"], dim, depth, heads, 4.0, 0.25, freq).to(dtype)
    with torch.no_grad():  # non-trivial norms and biases, so that every parameter matters
        for name, param in model.named_parameters():
            param.add_(0.3 * torch.randn_like(param))
    reference = {_to_reference_names(n): v.detach() for n, v in model.named_parameters()}
    assert "crossblocks.1.norm2_kv.weight" in reference and "crossblocks.0.attn.kv.weight" in reference
    x_t, feat = torch.randn(2, dim, 16, 12, dtype=dtype), torch.randn(2, dim, 16, 12, dtype=dtype)
    for t in (1, 0):
        expected = _reference_denoiser(reference, x_t, t, feat, "normals", depth, heads, freq)
        ours = model(x_t, t, feat, "normals")
        assert (ours - expected).abs().max() < tol * expected.abs().max()


def test_a_checkpoint_of_the_old_denoiser_is_refused_clearly():
    model = MultiTaskDenoising(["edges"], **TINY)
    state = {k: v for k, v in model.state_dict().items() if ".attn." not in k}
    state["denoiser.blocks.0.attn.in_proj_weight"] = torch.zeros(24, 8)
    with pytest.raises(RuntimeError, match="predates DiffusionMTL's cross-attention block"):
        model.on_load_checkpoint({"state_dict": state})
