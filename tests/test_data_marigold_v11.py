"""Format tests for Marigold v1.1's training data: Hypersim IID (lighting), InteriorVerse (appearance and normals),
Sintel normals for training, Hypersim normals in Marigold's layout, and the probability mix of the normals recipe
(docs/data.md). Every fixture is written here in the real on-disk layout, at a tiny size; the expected values are
Marigold's arithmetic written out with numpy."""

import numpy as np
import pytest
import torch
from PIL import Image

from densediff.data.common import DataReadError, DatasetLayoutError
from densediff.data.hypersim_iid import HypersimIID
from densediff.data.interiorverse import InteriorVerse
from densediff.data.marigold_train import HypersimNormalsMarigold, SintelNormalsTrain
from densediff.data.mixed import MixedBatchSampler, MixedDataset

OpenEXR = pytest.importorskip("OpenEXR")  # the test extra has it

H, W = 12, 16
SCENE = "ai_001_001"


def write_exr(path, a):
    """A float32 RGB EXR (ZIP, as InteriorVerse ships; the built-in reader reads it too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    OpenEXR.File(header, {"RGB": np.ascontiguousarray(a, np.float32)}).write(str(path))


def write_png(path, a):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def rgb_u8(seed, h=H, w=W):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def unit_normals(seed, h=H, w=W):
    n = np.random.default_rng(seed).normal(size=(h, w, 3))
    n[..., 2] = np.abs(n[..., 2]) + 0.5
    return n / np.linalg.norm(n, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------- Hypersim IID


def lighting_frame(seed):
    rng = np.random.default_rng(seed)
    albedo = rng.uniform(0, 1, (H, W, 3))
    albedo[0, 0] = 0.0  # all-zero albedo: invalid
    shading = rng.gamma(2.0, 1.5, (H, W, 3))  # linear HDR
    residual = rng.gamma(1.0, 3.0, (H, W, 3))  # q98 above shading's: the cut is the residual's here
    residual[3, 4, 1] = 400.0  # a highlight above the cut
    return albedo, shading, residual


@pytest.fixture
def hypersim_iid_root(tmp_path):
    root = tmp_path / "hypersim" / "processed"
    lines = {"train": [], "test": []}
    for split, frames in (("train", (0, 1)), ("test", (2,))):
        for f in frames:
            stem = f"{split}/{SCENE}"
            names = [f"{stem}/{k}_cam_00_fr{f:04d}.{'png' if k == 'rgb' else 'npy'}"
                     for k in ("rgb", "albedo", "shading", "residual")]
            write_png(root / names[0], rgb_u8(f))
            albedo, shading, residual = lighting_frame(f)
            if split == "test":
                shading[5, 6, 0] = np.nan  # the test split keeps non-finite frames
            for name, a in zip(names[1:], (albedo, shading, residual)):
                np.save(root / name, a)  # float64 HxWx3, as preprocess_hypersim_iid.py saves
            lines[split].append(" ".join(names + [f"{stem}/shading_stats_cam_00_fr{f:04d}.json"]))
    (root / "hypersim_train_filtered.txt").write_text("\n".join(lines["train"]))
    (root / "hypersim_test.txt").write_text("\n".join(lines["test"]) + "\n")
    return root


def test_hypersim_iid_targets_follow_marigolds_cut(hypersim_iid_root):
    ds = HypersimIID(hypersim_iid_root, "train")
    s = ds[1]
    albedo, shading, residual = lighting_frame(1)
    cut = np.float32(max(np.quantile(shading, 0.98), np.quantile(residual, 0.98)))  # over all pixels and channels
    assert torch.allclose(s["shading"], torch.from_numpy(np.clip(shading, 0, cut) / cut).permute(2, 0, 1).float())
    assert torch.allclose(s["residual"], torch.from_numpy(np.clip(residual, 0, cut) / cut).permute(2, 0, 1).float())
    assert s["residual"][1, 3, 4] == 1.0 and s["shading"].max() == 1.0 and s["shading"].min() >= 0
    assert torch.equal(s["albedo"], torch.from_numpy(albedo).permute(2, 0, 1).float())  # linear, as stored
    rgb = np.asarray(Image.open(hypersim_iid_root / f"train/{SCENE}/rgb_cam_00_fr0001.png"))
    assert torch.equal(s["rgb"], torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255)
    assert not s["albedo_mask"][0, 0] and s["albedo_mask"].sum() == H * W - 1
    assert s["shading_mask"].all() and s["residual_mask"].all()
    assert torch.equal(s["valid_mask"], s["albedo_mask"])  # the AND of the three
    for k in ("albedo", "shading", "residual"):
        assert s[k].dtype == torch.float32 and s[k].shape == (3, H, W)
    assert s["name"] == f"train/{SCENE}/rgb_cam_00_fr0001.png"
    # a shading-only cut (the preprocessing's PSNR check uses one) would differ: the residual's q98 is the larger
    assert np.quantile(residual, 0.98) > 1.1 * np.quantile(shading, 0.98)


def test_hypersim_iid_non_finite_and_training_resize(hypersim_iid_root):
    s = HypersimIID(hypersim_iid_root, "test")[0]
    albedo, shading, residual = lighting_frame(2)
    finite = np.delete(shading.ravel(), np.ravel_multi_index((5, 6, 0), shading.shape))
    cut = np.float32(max(np.quantile(finite, 0.98), np.quantile(residual, 0.98)))
    assert not s["shading_mask"][5, 6] and s["shading_mask"].sum() == H * W - 1
    assert not s["valid_mask"][5, 6] and s["shading"][:, 5, 6].eq(0).all()  # NaN never reaches the sample
    assert torch.isclose(s["residual"][0, 0, 0], torch.tensor(min(residual[0, 0, 0], cut) / cut, dtype=torch.float32))
    # training: flip then resize (bilinear, antialiased), masks nearest; only the asked targets
    ds = HypersimIID(hypersim_iid_root, "train", tasks=["shading"], height=6, width=8, hflip=True)
    t = ds[0]
    assert set(t) == {"rgb", "shading", "shading_mask", "valid_mask", "name", "relative_path"}
    assert t["rgb"].shape == (3, 6, 8) and t["valid_mask"].shape == (6, 8) and t["valid_mask"].dtype == torch.bool
    native = HypersimIID(hypersim_iid_root, "train", tasks=["shading"])[0]["shading"]
    expect = [torch.nn.functional.interpolate(x[None], (6, 8), mode="bilinear", antialias=True)[0]
              for x in (native, native.flip(-1))]
    assert any(torch.allclose(t["shading"], e, atol=1e-6) for e in expect)


def test_hypersim_iid_errors_name_the_file(hypersim_iid_root, tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"hypersim_val\.txt does not exist"):
        HypersimIID(hypersim_iid_root, "val")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DatasetLayoutError, match=r"empty\.txt names no sample"):
        HypersimIID(hypersim_iid_root, "train", filename_list=tmp_path / "empty.txt")
    (tmp_path / "short.txt").write_text(f"train/{SCENE}/rgb_cam_00_fr0000.png x.npy\n")
    with pytest.raises(DatasetLayoutError, match=r"short\.txt line 1 names 2 file\(s\), expected 4"):
        HypersimIID(hypersim_iid_root, "train", filename_list=tmp_path / "short.txt")
    (hypersim_iid_root / f"train/{SCENE}/residual_cam_00_fr0001.npy").unlink()
    with pytest.raises(DatasetLayoutError, match=r"1 file\(s\).*residual_cam_00_fr0001\.npy"):
        HypersimIID(hypersim_iid_root, "train")
    with pytest.raises(ValueError, match=r"unknown tasks \['material'\]"):
        HypersimIID(hypersim_iid_root, "test", tasks=["albedo", "material"])
    ds = HypersimIID(hypersim_iid_root, "test")
    np.save(hypersim_iid_root / f"test/{SCENE}/albedo_cam_00_fr0002.npy", np.zeros((H, W - 1, 3)))
    with pytest.raises(DataReadError, match=r"albedo_cam_00_fr0002\.npy is 12x15 but its RGB"):
        ds[0]
    np.save(hypersim_iid_root / f"test/{SCENE}/albedo_cam_00_fr0002.npy", np.zeros((H, W)))
    with pytest.raises(DataReadError, match=r"albedo_cam_00_fr0002\.npy: expected a float HxWx3"):
        ds[0]
    np.save(hypersim_iid_root / f"test/{SCENE}/albedo_cam_00_fr0002.npy", np.full((H, W, 3), 1.5))
    with pytest.raises(DataReadError, match=r"albedo_cam_00_fr0002\.npy has 576 albedo values outside"):
        ds[0]
    np.save(hypersim_iid_root / f"test/{SCENE}/albedo_cam_00_fr0002.npy", lighting_frame(2)[0])
    for k in ("shading", "residual"):
        np.save(hypersim_iid_root / f"test/{SCENE}/{k}_cam_00_fr0002.npy", np.zeros((H, W, 3)))
    with pytest.raises(DataReadError, match=r"shading_cam_00_fr0002\.npy and .*residual.*nothing to normalise"):
        ds[0]


# ----------------------------------------------------------------------------- InteriorVerse

SCENE_IV = "L3D124S21ENDIMIPXNIUI5L7ELUF3P3XY888"


def appearance_frame(seed):
    rng = np.random.default_rng(seed)
    im = rng.uniform(-0.1, 1.6, (H, W, 3)).astype(np.float32)  # HDR: clipped to [0, 1]
    albedo = rng.uniform(0, 1, (H, W, 3)).astype(np.float32)
    material = rng.uniform(0, 1, (H, W, 3)).astype(np.float32)
    mask = np.ones((H, W, 3), np.float32)
    mask[1, 2] = 0.0  # all channels 0: invalid
    mask[4, 5, 1] = 0.0  # one channel 0: invalid too ("all three nonzero")
    return im, albedo, material, mask


@pytest.fixture
def interiorverse_root(tmp_path):
    root = tmp_path / "interiorverse"
    iid, normals = [], []
    for f in range(2):
        stem = root / "scenes_85" / SCENE_IV / f"{f:03d}"
        for k, a in zip(("im", "albedo", "material", "mask"), appearance_frame(f)):
            write_exr(stem.parent / f"{stem.name}_{k}.exr", a)
        iid.append(" ".join(f"scenes_85/{SCENE_IV}/{f:03d}_{k}.exr" for k in ("im", "albedo", "material", "mask")))
        normals.append(f"{SCENE_IV}/{f:03d}_img.png {SCENE_IV}/{f:03d}_normal.npy")
    # frame 0 preprocessed (PNG + npy), frame 1 raw only (NNN_normal.exr beside the EXR image)
    im0 = appearance_frame(0)[0]
    write_png(root / "scenes_85" / SCENE_IV / "000_img.png", (np.clip(im0, 0, 1) ** (1 / 2.2) * 255).astype(np.uint8))
    np.save(root / "scenes_85" / SCENE_IV / "000_normal.npy", unit_normals(0))
    write_exr(root / "scenes_85" / SCENE_IV / "001_normal.exr", 2.0 * unit_normals(1))  # not unit: renormalised
    (root / "interiorverse_train_scenes_85.txt").write_text("\n".join(iid) + "\n")
    (root / "interiorverse_filtered_all.txt").write_text("\n".join(normals) + "\n")
    return root


def test_interiorverse_appearance(interiorverse_root):
    s = InteriorVerse(interiorverse_root, "train")[1]
    im, albedo, material, mask = appearance_frame(1)
    g = 1 / 2.2
    chw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1), np.float32))  # noqa: E731
    assert torch.allclose(s["rgb"], chw(np.clip(im, 0, 1) ** g), atol=1e-6)
    assert torch.allclose(s["albedo"], chw(albedo ** g), atol=1e-6)
    expect_material = material.copy()
    expect_material[..., 2] = 0
    assert torch.allclose(s["material"], chw(expect_material ** g), atol=1e-6)
    assert s["material"][2].eq(0).all() and not torch.allclose(s["material"], chw(material ** g), atol=1e-3)
    assert s["valid_mask"].dtype == torch.bool and s["valid_mask"].sum() == H * W - 2
    assert not s["valid_mask"][1, 2] and not s["valid_mask"][4, 5]
    assert torch.equal(s["albedo_mask"], s["valid_mask"]) and torch.equal(s["material_mask"], s["valid_mask"])
    only = InteriorVerse(interiorverse_root, "train", tasks=["material"])[1]
    assert "albedo" not in only and torch.equal(only["material"], s["material"])


def test_interiorverse_normals_preprocessed_and_raw(interiorverse_root):
    ds = InteriorVerse(interiorverse_root, "train", tasks=["normals"])
    assert len(ds) == 2
    s0, s1 = ds[0], ds[1]
    assert torch.allclose(s0["normals"], torch.from_numpy(unit_normals(0).transpose(2, 0, 1)).float())
    rgb0 = np.asarray(Image.open(interiorverse_root / "scenes_85" / SCENE_IV / "000_img.png"))
    assert torch.equal(s0["rgb"], torch.from_numpy(rgb0.copy()).permute(2, 0, 1).float() / 255)
    # raw frame: Marigold's preprocessing on the fly (clip, ^(1/2.2), uint8 truncation; normals renormalised)
    im1 = appearance_frame(1)[0]
    expect_rgb = (np.clip(im1, 0, 1) ** (1 / 2.2) * 255).astype(np.uint8)
    assert torch.equal(s1["rgb"], torch.from_numpy(expect_rgb).permute(2, 0, 1).float() / 255)
    n1 = unit_normals(1).astype(np.float32)  # written as float32
    assert torch.allclose(s1["normals"], torch.from_numpy(n1.transpose(2, 0, 1)), atol=1e-6)
    assert s1["valid_mask"].all() and set(s1) == {"rgb", "normals", "valid_mask", "name", "relative_path"}


def test_interiorverse_errors(interiorverse_root):
    with pytest.raises(ValueError, match="different lists"):
        InteriorVerse(interiorverse_root, "train", tasks=["normals", "albedo"])
    with pytest.raises(DatasetLayoutError, match=r"interiorverse_test_scenes_85\.txt does not exist"):
        InteriorVerse(interiorverse_root, "test")
    ds = InteriorVerse(interiorverse_root, "train")
    im, *_ = appearance_frame(0)
    im[2, 2, 0] = np.nan
    write_exr(interiorverse_root / "scenes_85" / SCENE_IV / "000_im.exr", im)
    with pytest.raises(DataReadError, match=r"000_im\.exr: the RGB has 1 NaN"):
        ds[0]
    write_exr(interiorverse_root / "scenes_85" / SCENE_IV / "001_mask.exr", np.ones((H, W + 1, 3)))
    with pytest.raises(DataReadError, match=r"001_mask\.exr is 12x17 but its RGB"):
        ds[1]
    normals = InteriorVerse(interiorverse_root, "train", tasks=["normals"])
    short = unit_normals(0)
    short[3, 3] *= 0.05  # a frame Marigold's preprocessing drops (any |n| < 0.1)
    np.save(interiorverse_root / "scenes_85" / SCENE_IV / "000_normal.npy", short)
    with pytest.raises(DataReadError, match=r"000_normal\.npy has 1 normals shorter than 0.1"):
        normals[0]
    bad = unit_normals(1)
    bad[0, 0] = np.nan
    write_exr(interiorverse_root / "scenes_85" / SCENE_IV / "001_normal.exr", bad)
    with pytest.raises(DataReadError, match=r"001_normal\.exr has non-finite normals"):
        normals[1]


# ----------------------------------------------------------------------------- Sintel and Hypersim normals


def test_sintel_training_crop_fill_resize(tmp_path):
    root = tmp_path / "sintel"
    n = unit_normals(3, 436, 1024)
    n[:5, :] = 0.0  # the sky: no normal
    n[10, 300] *= 0.09  # length <= 0.1: filled too
    n[11, 300] *= 0.11
    n[12, 300] = np.nan
    rgb = rgb_u8(3, 436, 1024)
    write_png(root / "alley_2" / "frame_0001_img.png", rgb)
    np.save(root / "alley_2" / "frame_0001_normal.npy", n)
    (root / "sintel_filtered.txt").write_text("alley_2/frame_0001_img.png alley_2/frame_0001_normal.npy\n")
    native = SintelNormalsTrain(root, height=None, width=None)[0]
    expect = n.copy()
    fill = ~(np.linalg.norm(n, axis=-1) > 0.1)
    expect[fill] = (0.0, 0.0, 1.0)
    expect = expect[:, 221:1024 - 221]
    assert native["normals"].shape == (3, 436, 582) and native["valid_mask"].all()
    assert torch.allclose(native["normals"], torch.from_numpy(expect.transpose(2, 0, 1)).float())
    assert native["normals"][:, 10, 300 - 221].tolist() == [0.0, 0.0, 1.0]
    assert native["normals"][:, 11, 300 - 221].tolist() != [0.0, 0.0, 1.0]
    assert torch.equal(native["rgb"], torch.from_numpy(rgb[:, 221:803]).permute(2, 0, 1).float() / 255)
    s = SintelNormalsTrain(root)[0]  # the training default: 480x640, bilinear, not renormalised
    assert s["normals"].shape == (3, 480, 640) and s["rgb"].shape == (3, 480, 640)
    up = torch.nn.functional.interpolate(native["normals"][None], (480, 640), mode="bilinear")[0]
    assert torch.allclose(s["normals"], up, atol=1e-4)  # upsampling: the antialiased kernel is bilinear
    assert (s["normals"].norm(dim=0) < 0.999).any()  # bilinear mixing shortens some vectors; Marigold keeps them
    with pytest.raises(DataReadError, match=r"frame_0001_normal\.npy is 436x1024 but its RGB .* is 436x400"):
        write_png(root / "alley_2" / "frame_0001_img.png", rgb_u8(3, 436, 400))
        SintelNormalsTrain(root)[0]
    np.save(root / "alley_2" / "frame_0001_normal.npy", n[:, :400])
    with pytest.raises(DataReadError, match=r"400 px wide, too narrow"):
        SintelNormalsTrain(root)[0]


def test_hypersim_normals_marigold_layout_and_flip(tmp_path):
    root = tmp_path / "hypersim"
    n = unit_normals(5)
    write_png(root / "train" / SCENE / "rgb_cam_00_fr0000.png", rgb_u8(5))
    np.save(root / "train" / SCENE / "normal_cam_cam_00_fr0000.npy", n)
    (root / "hypersim_filtered_all.txt").write_text(
        f"train/{SCENE}/rgb_cam_00_fr0000.png train/{SCENE}/normal_cam_cam_00_fr0000.npy\n")
    plain = HypersimNormalsMarigold(root, height=None, width=None)[0]
    assert torch.allclose(plain["normals"], torch.from_numpy(n.transpose(2, 0, 1)).float())
    flipped = [HypersimNormalsMarigold(root, height=None, width=None, hflip=True, seed=s)[0] for s in range(8)]
    mirrored = plain["normals"].flip(-1) * torch.tensor([-1.0, 1, 1]).view(3, 1, 1)
    kinds = {torch.equal(f["normals"], mirrored) for f in flipped}
    assert kinds == {True, False}  # both outcomes over the seeds; a flip negates x
    assert HypersimNormalsMarigold(root)[0]["normals"].shape == (3, 480, 640)
    bad = n.copy()
    bad[0, 0, 0] = np.nan
    np.save(root / "train" / SCENE / "normal_cam_cam_00_fr0000.npy", bad)
    with pytest.raises(DataReadError, match=r"normal_cam_cam_00_fr0000\.npy has non-finite normals"):
        HypersimNormalsMarigold(root)[0]


# ----------------------------------------------------------------------------- the probability mix


def test_probability_mix_proportions_streams_and_resume():
    lengths, bs, p = [1000, 800, 300], 2, [0.5, 0.49, 0.01]
    sampler = MixedBatchSampler(lengths, bs, seed=3, probabilities=p)
    assert len(sampler) == sum(n // bs for n in lengths) == 1050  # Marigold's n_total_batch
    offsets = np.cumsum([0] + lengths[:-1])
    which, seen = [], {i: [] for i in range(3)}
    for epoch in range(20):
        sampler.set_epoch(epoch)
        for batch in sampler:
            d = int(np.searchsorted(offsets, batch[0], side="right") - 1)
            assert len(batch) == bs and all(offsets[d] <= i < offsets[d] + lengths[d] for i in batch)
            which.append(d)
            seen[d].extend(int(i) - offsets[d] for i in batch)
    counts = np.bincount(which, minlength=3)
    total = len(which)
    for c, q in zip(counts, p):  # within 4 standard deviations of the binomial count
        assert abs(c - total * q) < 4 * np.sqrt(total * q * (1 - q)), (counts, total)
    # each stream: a whole permutation before any repeat, across epoch boundaries (Marigold refills when exhausted)
    for d in range(3):
        full = lengths[d] // bs * bs
        for start in range(0, len(seen[d]) - full + 1, full):
            assert sorted(seen[d][start:start + full]) == list(range(lengths[d]))
    # resuming mid-epoch yields exactly the rest; DDP ranks split the epoch disjointly
    sampler.set_epoch(7)
    whole = list(sampler)
    again = MixedBatchSampler(lengths, bs, seed=3, probabilities=p)
    again.set_epoch(7)
    again.skip = 100
    assert list(again) == whole[100:]
    ranks = [MixedBatchSampler(lengths, bs, seed=3, probabilities=p, num_replicas=2, rank=r) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(7)
    assert [b for pair in zip(*ranks) for b in pair] == whole[:2 * len(ranks[0])]
    with pytest.raises(ValueError, match="no full batch"):
        MixedBatchSampler([10, 1], 2, probabilities=[0.5, 0.5])
    with pytest.raises(ValueError, match="one probability >= 0 per dataset"):
        MixedBatchSampler([10, 10], 2, probabilities=[0.5])
    with pytest.raises(ValueError, match="2 datasets but 3 probabilities"):
        MixedDataset([list(range(4)), list(range(4))], probabilities=[0.2, 0.3, 0.5])


# ----------------------------------------------------------------------------- the normals recipe on the fixtures


def write_normals_mix(root):
    """<root>/hypersim/processed, interiorverse/scenes_85 and sintel, in Marigold's preprocessed normals layouts."""
    hyp = root / "hypersim" / "processed"
    lines = []
    for f in range(4):
        rgb, nrm = f"train/{SCENE}/rgb_cam_00_fr{f:04d}.png", f"train/{SCENE}/normal_cam_cam_00_fr{f:04d}.npy"
        write_png(hyp / rgb, rgb_u8(f, 40, 48))  # big enough for the 33-px blur; resized to HxW for training
        np.save(hyp / nrm, unit_normals(f, 40, 48))
        lines.append(f"{rgb} {nrm}")
    (hyp / "hypersim_filtered_all.txt").write_text("\n".join(lines) + "\n")
    (hyp / "hypersim_filtered_val_100.txt").write_text("\n".join(lines[:2]) + "\n")
    iv = root / "interiorverse" / "scenes_85"
    lines = []
    for f in range(4):
        write_png(iv / SCENE_IV / f"{f:03d}_img.png", rgb_u8(10 + f))
        np.save(iv / SCENE_IV / f"{f:03d}_normal.npy", unit_normals(10 + f))
        lines.append(f"{SCENE_IV}/{f:03d}_img.png {SCENE_IV}/{f:03d}_normal.npy")
    (root / "interiorverse" / "interiorverse_filtered_all.txt").write_text("\n".join(lines) + "\n")
    sintel = root / "sintel"
    for f in range(2):
        write_png(sintel / "alley_2" / f"frame_{f:04d}_img.png", rgb_u8(20 + f, H, W + 8))
        np.save(sintel / "alley_2" / f"frame_{f:04d}_normal.npy", unit_normals(20 + f, H, W + 8))
    (sintel / "sintel_filtered.txt").write_text(
        "".join(f"alley_2/frame_{f:04d}_img.png alley_2/frame_{f:04d}_normal.npy\n" for f in range(2)))


def test_marigold_normals_recipe_trains_two_steps_on_the_mix(tmp_path):
    """train.py experiment=marigold_normals (its dataset is the probability mix) on the tiny backbone and fixtures of the
    three real layouts: two steps and a validation."""
    from conftest import FAST, read_metrics, run_cli

    write_normals_mix(tmp_path / "data")
    fast = [o for o in FAST if "num_scenes" not in o]
    sizes = [f"+dataset.train.datasets.0.height={H}", f"+dataset.train.datasets.0.width={W}",
             f"+dataset.train.datasets.2.height={H}", f"+dataset.train.datasets.2.width={W}",
             "+dataset.train.datasets.2.crop=4"]  # Sintel's 221 px, scaled to the fixture
    run = tmp_path / "run"
    run_cli("train.py", "experiment=marigold_normals", "backbone=tiny", f"dataset.root={tmp_path / 'data'}",
            "dataset.num_workers=0", "trainer.accumulate_grad_batches=1", "inference.processing_res=0",
            "logger=csv", f"hydra.run.dir={run}", *fast, *sizes)
    assert "angular_mean" in read_metrics(run)


def test_dataset_configs_build_the_loaders(hypersim_iid_root, interiorverse_root):
    """conf/dataset/{hypersim_iid,interiorverse}.yaml: the loaders, lists and sizes named above, through the config."""
    from densediff.run.config import compose
    from densediff.run.datasets import build_dataset

    cfg = compose("train", ["dataset=hypersim_iid", f"dataset.root={hypersim_iid_root}"])
    train = build_dataset(cfg, "train")
    assert isinstance(train, HypersimIID) and train.hflip and (train.height, train.width) == (480, 640)
    assert train[0]["shading"].shape == (3, 480, 640) and set(train.tasks) == {"albedo", "shading", "residual"}
    assert build_dataset(cfg, "test")[0]["albedo"].shape == (3, H, W)  # native
    cfg = compose("train", ["dataset=interiorverse", f"dataset.root={interiorverse_root}"])
    s = build_dataset(cfg, "train")[0]
    assert {"albedo", "material", "valid_mask", "albedo_mask", "material_mask"} <= set(s) and "normals" not in s
    cfg = compose("train", ["dataset=interiorverse", f"dataset.root={interiorverse_root}", "dataset.tasks=[normals]"])
    assert build_dataset(cfg, "train")[0]["normals"].shape == (3, H, W)
    write_normals_mix(interiorverse_root.parent / "mix")
    cfg = compose("train", ["dataset=sintel_normals_train", f"dataset.root={interiorverse_root.parent / 'mix/sintel'}",
                            "task=normals", "+dataset.val.crop=4"])
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert train.hflip and train.augment == {} and not val.hflip and val.augment is None and train.crop == 221
    assert val[0]["normals"].shape == (3, 480, 640)
    cfg = compose("train", ["experiment=marigold_normals", f"dataset.root={interiorverse_root.parent / 'mix'}"])
    mix = build_dataset(cfg, "train")
    assert isinstance(mix, MixedDataset) and mix.probabilities == [0.5, 0.49, 0.01] and mix.lengths == [4, 4, 2]
    assert [d.augment for d in mix.datasets[::2]] == [{}, {}] and mix.datasets[1].normals.augment == {}


# ----------------------------------------------------------------------------- Marigold's normals augmentations


def test_gaussian_blur_matches_a_separable_reflect_convolution():
    from densediff.data.augment import gaussian_blur

    img = np.random.default_rng(0).integers(0, 256, (3, 40, 44)).astype(np.float64)
    sigma = 2.7
    x = np.arange(-16, 17, dtype=np.float64)
    g = np.exp(-x ** 2 / (2 * sigma ** 2))
    g /= g.sum()
    padded = np.pad(img, ((0, 0), (16, 16), (16, 16)), mode="reflect")  # mirror without repeating the edge
    rows = sum(g[i] * padded[:, i:i + 40, :] for i in range(33))
    expect = sum(g[j] * rows[:, :, j:j + 44] for j in range(33))
    out = gaussian_blur(torch.from_numpy(img).float(), sigma).double().numpy()
    assert np.abs(out - np.round(expect)).max() <= 1 and (out == np.round(expect)).mean() > 0.99
    assert (out == np.round(out)).all()
    with pytest.raises(ValueError, match="too small for Marigold's 33-px Gaussian blur"):
        gaussian_blur(torch.zeros(3, 16, 40), 1.0)


def test_motion_kernel_rotates_the_line_counter_clockwise():
    from densediff.data.augment import motion_blur, motion_kernel

    k0, k90, k45 = motion_kernel(5, 0.0), motion_kernel(5, 90.0), motion_kernel(5, 45.0)
    assert (k0 > 0).nonzero().tolist() == [[2, c] for c in range(5)] and torch.allclose(k0[2], torch.full((5,), 0.2))
    assert torch.equal(k90 > 0, (k0 > 0).T) and torch.allclose(k90.sum(), torch.tensor(1.0))
    # counter-clockwise on the image (y down): the line runs from bottom-left to top-right; the corners fall outside
    assert (k45 > 0).nonzero().tolist() == [[1, 3], [2, 2], [3, 1]] and torch.allclose(k45[2, 2], torch.tensor(1 / 3))
    img = torch.zeros(3, 9, 9)
    img[:, 4, 4] = 255.0  # a point spreads along the kernel's line, truncated
    out = motion_blur(img, 3, 0.0)
    assert out[0, 4, 3:6].tolist() == [85.0, 85.0, 85.0] and out.sum() == 3 * 255


def test_color_jitter_adjustments():
    import colorsys

    from densediff.data.augment import color_jitter

    img = torch.from_numpy(np.random.default_rng(1).uniform(0, 1, (3, 6, 7))).float()
    grey = 0.2989 * img[0] + 0.587 * img[1] + 0.114 * img[2]
    assert torch.allclose(color_jitter(img, [0], 1.3, 1, 1, 0), (img * 1.3).clamp(0, 1))
    assert torch.allclose(color_jitter(img, [1], 1, 0.6, 1, 0), (0.6 * img + 0.4 * grey.mean()).clamp(0, 1))
    assert torch.allclose(color_jitter(img, [2], 1, 1, 1.4, 0), (1.4 * img - 0.4 * grey).clamp(0, 1))
    hue = color_jitter(img, [3], 1, 1, 1, 0.17)
    for y, x in [(0, 0), (2, 3), (5, 6)]:
        h, s, v = colorsys.rgb_to_hsv(*img[:, y, x].tolist())
        assert torch.allclose(hue[:, y, x], torch.tensor(colorsys.hsv_to_rgb((h + 0.17) % 1, s, v)), atol=1e-5)
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    assert torch.allclose(color_jitter(red, [3], 1, 1, 1, 1 / 3)[:, 0, 0], torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)
    # the order matters: brightness then contrast is not contrast then brightness once values clamp
    assert not torch.allclose(color_jitter(img, [0, 1], 1.5, 0.5, 1, 0), color_jitter(img, [1, 0], 1.5, 0.5, 1, 0))


def test_marigold_normals_augment_draws_and_switches():
    from densediff.data.augment import marigold_normals_augment

    rgb = torch.from_numpy(rgb_u8(7, 40, 48).transpose(2, 0, 1).copy()).float() / 255
    applied = [marigold_normals_augment(rgb, s, blur=True)[1] for s in range(400)]
    for key in ("gaussian_blur", "motion_blur", "color_jitter"):  # each with p 0.3: 120 +- 4 sd (9.2)
        assert abs(sum(key in a for a in applied) - 120) < 37, key
    assert all(0 <= a["gaussian_blur"] <= 4 for a in applied if "gaussian_blur" in a)
    assert {a["motion_blur"][0] for a in applied if "motion_blur" in a} == {3, 5, 7, 9, 11}
    assert not any("blur" in k for s in range(100) for k in marigold_normals_augment(rgb, s, blur=False)[1])
    out, done = marigold_normals_augment(rgb, 3, True, {"gaussian_blur_p": 1, "motion_blur_p": 1, "color_jitter_p": 1})
    assert set(done) == {"gaussian_blur", "motion_blur", "color_jitter"}
    assert torch.equal(out * 255, torch.round(out * 255)) and 0 <= out.min() and out.max() <= 1
    again, _ = marigold_normals_augment(rgb, 3, True, {"gaussian_blur_p": 1, "motion_blur_p": 1, "color_jitter_p": 1})
    assert torch.equal(out, again) and not torch.equal(out, rgb)
    none, nothing = marigold_normals_augment(rgb, 3, True, {"gaussian_blur_p": 0, "motion_blur_p": 0,
                                                            "color_jitter_p": 0})
    assert nothing == {} and torch.equal(none, rgb)


def test_augment_in_the_normals_loaders(tmp_path, interiorverse_root):
    root = tmp_path / "hypersim"
    write_png(root / "train" / SCENE / "rgb_cam_00_fr0000.png", rgb_u8(5, 40, 48))
    np.save(root / "train" / SCENE / "normal_cam_cam_00_fr0000.npy", unit_normals(5, 40, 48))
    (root / "hypersim_filtered_all.txt").write_text(
        f"train/{SCENE}/rgb_cam_00_fr0000.png train/{SCENE}/normal_cam_cam_00_fr0000.npy\n")
    plain = HypersimNormalsMarigold(root, height=None, width=None)[0]
    always = {"gaussian_blur_p": 1.0, "color_jitter_p": 0.0, "motion_blur_p": 0.0}
    blurred = HypersimNormalsMarigold(root, height=None, width=None, augment=always)[0]
    assert not torch.equal(blurred["rgb"], plain["rgb"]) and torch.equal(blurred["normals"], plain["normals"])
    assert HypersimNormalsMarigold.blur and not SintelNormalsTrain.blur
    iv = InteriorVerse(interiorverse_root, "train", tasks=["normals"], augment=always)  # no blur off Hypersim
    same = InteriorVerse(interiorverse_root, tasks=["normals"])[0]["rgb"]
    assert not iv.normals.blur and torch.equal(iv[0]["rgb"], same)
    with pytest.raises(ValueError, match=r"unknown augmentation keys \['blur_p'\]"):
        HypersimNormalsMarigold(root, augment={"blur_p": 1})
    with pytest.raises(ValueError, match="IID training flips only"):
        InteriorVerse(interiorverse_root, "train", augment=True)


@pytest.mark.parametrize("dataset, needle", [("marigold_normals_mix", "Hypersim normals (Marigold) root"),
                                             ("hypersim_iid", "Hypersim IID root"),
                                             ("interiorverse", "InteriorVerse root")])
def test_a_missing_root_is_one_line_at_start_up(dataset, needle, tmp_path):
    from conftest import run_cli

    root = tmp_path / "elsewhere"
    task = ["task=normals"] if dataset == "marigold_normals_mix" else []  # the mix carries normals only
    result = run_cli("train.py", "experiment=quickstart", f"dataset={dataset}", f"dataset.root={root}", *task,
                     f"hydra.run.dir={tmp_path / 'r'}", expect_ok=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    error = result.stderr[result.stderr.index("error: "):]
    assert needle in error and str(root) in error and "does not exist" in error, error
