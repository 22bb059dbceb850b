"""Format tests for the Hypersim and Virtual KITTI 2 loaders and the 9:1 batch mixer (docs/data.md#hypersim,
docs/data.md#virtual-kitti-2). Every fixture is written here in the real on-disk layout, at a tiny size."""

import csv
import logging
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from densediff.data.common import DataReadError, DatasetLayoutError, flip_seed
from densediff.data.hypersim import Hypersim
from densediff.data.mixed import MixedBatchSampler, MixedDataset, batches_per_dataset
from densediff.data.vkitti2 import VirtualKITTI2

H, W = 24, 32
SCENE, CAM = "ai_001_001", "cam_00"


def write_png16_rgb(path, a):
    """A 16-bit-per-channel RGB PNG (PIL cannot write one), as E2E's VKITTI normals are stored."""
    h, w, _ = a.shape
    raw = b"".join(b"\x00" + a[r].astype(">u2").tobytes() for r in range(h))  # filter byte 0 per row, big-endian
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def encode_normals_u8(n):
    return np.round((np.asarray(n, np.float64) + 1) / 2 * 255).astype(np.uint8)


# ----------------------------------------------------------------------------- Hypersim fixture


def depth_mm(frame):
    d = np.full((H, W), 2000 + 100 * frame, np.uint16)  # 2.0 m (+0.1 m per frame)
    d[0, 0] = 0  # invalid render entity
    d[1, 1] = 65200  # 65.2 m: beyond the 65 m far plane
    d[2, 3] = 1234
    return d


@pytest.fixture
def hypersim_root(tmp_path):
    root = tmp_path / "hypersim" / "processed"
    (root / "train" / SCENE).mkdir(parents=True)
    header = ["", "scene_name", "camera_name", "frame_id", "included_in_public_release", "exclude_reason",
              "split_partition_name", "rgb_path", "rgb_mean", "rgb_std", "rgb_min", "rgb_max", "depth_path",
              "depth_mean", "depth_std", "depth_min", "depth_max", "invalid_ratio"]
    rows = []
    for i, (frame, included, split) in enumerate([(0, "True", "train"), (1, "True", "train"),
                                                  (2, "False", "train"), (3, "True", "val")]):
        rgb, depth = f"{SCENE}/rgb_{CAM}_fr{frame:04d}.png", f"{SCENE}/depth_plane_{CAM}_fr{frame:04d}.png"
        rows.append([i, SCENE, CAM, frame, included, "", split, rgb, 0, 0, 0, 0, depth, 0, 0, 0, 0, 0])
        img = np.zeros((H, W, 3), np.uint8)
        img[..., 0] = np.arange(W) * 7  # red ramp left -> right, to see flips
        img[..., 1] = 10 * frame
        Image.fromarray(img).save(root / "train" / rgb)
        Image.fromarray(depth_mm(frame)).save(root / "train" / depth)
        nd = root / "normals" / SCENE / "images" / f"scene_{CAM}_geometry_preview"
        nd.mkdir(parents=True, exist_ok=True)
        n = np.broadcast_to(encode_normals_u8([0.6, 0.0, 0.8]), (H, W, 3)).copy()  # right and toward the viewer
        n[5:8, 5:8] = encode_normals_u8([0.0, 0.0, -1.0])  # back-facing: E2E turns it toward the camera
        Image.fromarray(n).save(nd / f"frame.{frame:04d}.normal_cam.png")
    with open(root / "train" / "filename_meta_train.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([header] + rows)
    return root


def test_hypersim_reads_depth_in_metres_and_filters_rows(hypersim_root):
    ds = Hypersim(hypersim_root, height=H, width=W)
    assert len(ds) == 2  # not excluded_from_public_release, not val
    s = ds[1]
    assert set(s) == {"rgb", "depth", "valid_mask", "name", "far_invalid"}
    assert s["name"] == f"{SCENE}/rgb_{CAM}_fr0001.png"
    assert s["rgb"].shape == (3, H, W) and s["rgb"].dtype == torch.float32
    assert torch.allclose(s["rgb"][0, 0], torch.arange(W) * 7 / 255.0)
    assert torch.allclose(s["rgb"][1], torch.tensor(10 / 255))
    d, m = s["depth"], s["valid_mask"]
    assert d.dtype == torch.float32 and m.dtype == torch.bool
    assert d[5, 5].item() == pytest.approx(2.1) and d[2, 3].item() == pytest.approx(1.234)
    assert not m[0, 0] and not m[1, 1] and d[0, 0] == 0 and d[1, 1] == 0  # unknown and beyond 65 m
    assert not s["far_invalid"][0, 0] and s["far_invalid"][1, 1] and s["far_invalid"].sum() == 1  # (Marigold's target)
    assert m.sum() == H * W - 2


def test_hypersim_resize_is_nearest_for_depth(hypersim_root):
    s = Hypersim(hypersim_root, height=H // 2, width=W // 2)[0]
    assert s["rgb"].shape == (3, H // 2, W // 2) and s["depth"].shape == (H // 2, W // 2)
    # PIL nearest 2x down picks source pixel 2i + 1: no depth values are blended
    expected = torch.from_numpy(depth_mm(0)[1::2, 1::2].astype(np.float32) / 1000)
    expected[expected >= 65] = 0
    assert torch.allclose(s["depth"], expected)


def test_hypersim_normals_canonical_and_facing(hypersim_root):
    s = Hypersim(hypersim_root, tasks=("depth", "normals"), height=H, width=W)[0]
    n = s["normals"]
    assert n.shape == (3, H, W)
    assert torch.allclose(n[:, 12, 20], torch.tensor([0.6, 0.0, 0.8]), atol=0.01)  # Hypersim axes are canonical
    assert torch.allclose(n[:, 6, 6], torch.tensor([0.0, 0.0, 1.0]), atol=0.01)  # flipped toward the camera
    assert torch.allclose(n.norm(dim=0)[s["valid_mask"]], torch.ones(()), atol=1e-5)
    assert (n[:, 0, 0] == 0).all() and (n[:, 1, 1] == 0).all()  # zero where the depth is invalid


def test_hflip_mirrors_and_negates_normal_x(hypersim_root):
    kw = dict(tasks=("depth", "normals"), height=H, width=W)
    plain = Hypersim(hypersim_root, **kw)[0]
    flipped_seeds = [s for s in range(40)
                     if torch.rand((), generator=torch.Generator().manual_seed(flip_seed(s, 0, 0))) < 0.5]
    assert 0 < len(flipped_seeds) < 40
    flipped = Hypersim(hypersim_root, hflip=True, seed=flipped_seeds[0], **kw)[0]
    assert torch.equal(flipped["rgb"], plain["rgb"].flip(-1))
    assert torch.equal(flipped["depth"], plain["depth"].flip(-1)) and flipped["depth"][2, W - 4] == plain["depth"][2, 3]
    assert torch.equal(flipped["valid_mask"], plain["valid_mask"].flip(-1))
    assert torch.allclose(flipped["normals"][:, 12, W - 1 - 20], torch.tensor([-0.6, 0.0, 0.8]), atol=0.01)
    kept = next(s for s in range(40) if s not in flipped_seeds)
    assert torch.equal(Hypersim(hypersim_root, hflip=True, seed=kept, **kw)[0]["depth"], plain["depth"])
    # reproducible: the draw depends only on (seed, epoch, index)
    again = Hypersim(hypersim_root, hflip=True, seed=flipped_seeds[0], **kw)[0]
    assert torch.equal(again["normals"], flipped["normals"])
    draws = [torch.rand((), generator=torch.Generator().manual_seed(flip_seed(0, 0, i))) < 0.5 for i in range(400)]
    assert 0.4 < sum(draws) / 400 < 0.6


def test_hypersim_startup_errors_name_the_path(tmp_path, hypersim_root, caplog):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        Hypersim(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match="has no train/filename_meta_train.csv: expected the Marigold"):
        Hypersim(tmp_path / "empty")
    with pytest.raises(DatasetLayoutError, match="normals root .*elsewhere"):
        Hypersim(hypersim_root, tasks=("normals",), normals_root=tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="unknown tasks"):
        Hypersim(hypersim_root, tasks=("albedo",))
    missing = hypersim_root / "train" / SCENE / f"rgb_{CAM}_fr0000.png"
    missing.unlink()
    with caplog.at_level(logging.WARNING):
        assert len(Hypersim(hypersim_root, height=H, width=W)) == 1
    assert "dropped 1 of 2 rows" in caplog.text and str(missing) in caplog.text
    (hypersim_root / "train" / SCENE / f"rgb_{CAM}_fr0001.png").unlink()
    with pytest.raises(DatasetLayoutError, match="none has all its files; first missing: " + str(missing)):
        Hypersim(hypersim_root)


def test_corrupt_png_names_the_file(hypersim_root):
    bad = hypersim_root / "train" / SCENE / f"depth_plane_{CAM}_fr0000.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataReadError, match=f"cannot read {bad}"):
        Hypersim(hypersim_root, height=H, width=W)[0]


# ----------------------------------------------------------------------------- Virtual KITTI 2 fixture

VH, VW, CROP = 10, 20, (6, 16)  # crop: top = 10 - 6 = 4, left = (20 - 16) // 2 = 2


def write_vkitti_frame(root, scene, var, cam, frame, depth_cm, rgb=None, normals16=None):
    def base(top, kind):
        return root / top / scene / var / "frames" / kind / cam
    for d in (base("vkitti_2.0.3_rgb", "rgb"), base("vkitti_2.0.3_depth", "depth")):
        d.mkdir(parents=True, exist_ok=True)
    h, w = depth_cm.shape
    rgb = np.full((h, w, 3), 128, np.uint8) if rgb is None else rgb
    Image.fromarray(rgb).save(base("vkitti_2.0.3_rgb", "rgb") / f"rgb_{frame:05d}.jpg", quality=100)
    Image.fromarray(depth_cm).save(base("vkitti_2.0.3_depth", "depth") / f"depth_{frame:05d}.png")
    if normals16 is not None:
        nd = base("vkitti_DAG_normals", "normal")
        nd.mkdir(parents=True, exist_ok=True)
        write_png16_rgb(nd / f"normal_{frame:05d}.png", normals16)


@pytest.fixture
def vkitti_root(tmp_path):
    root = tmp_path / "virtual_kitti_2"
    depth = np.full((VH, VW), 1500, np.uint16)  # 15 m
    depth[4, 2] = 1234  # first pixel of the crop
    depth[9, 17] = 65535  # sky, last pixel of the crop
    depth[3, 2] = 1  # above the crop
    n_e2e = np.array([0.6, 0.0, 0.8])  # E2E frame: x LEFT, y up, z toward the camera
    normals16 = np.broadcast_to(np.round((n_e2e + 1) * 32767.5), (VH, VW, 3)).astype(np.uint16)
    rgb = np.zeros((VH, VW, 3), np.uint8)
    rgb[:, :10] = 250  # bright left half, to see flips
    for frame in (0, 1):
        write_vkitti_frame(root, "Scene01", "morning", "Camera_0", frame, depth, rgb, normals16)
    write_vkitti_frame(root, "Scene01", "clone", "Camera_0", 0, depth)  # not one of E2E's variations
    return root


def test_vkitti_depth_sky_crop_and_normals(vkitti_root):
    ds = VirtualKITTI2(vkitti_root, tasks=("depth", "normals"), crop_size=CROP)
    assert len(ds) == 2  # clone is skipped, missing scenes only warn
    s = ds[0]
    assert s["name"] == "Scene01/morning/frames/rgb/Camera_0/rgb_00000.jpg"
    assert s["rgb"].shape == (3, *CROP) and s["depth"].shape == CROP and s["normals"].shape == (3, *CROP)
    assert s["depth"][0, 0].item() == pytest.approx(12.34)  # cm -> m, crop offset (4, 2)
    assert s["depth"][1, 1].item() == pytest.approx(15.0)
    assert not s["valid_mask"][-1, -1] and s["depth"][-1, -1] == 0  # sky (655.35 m) beyond the 80 m far plane
    assert s["valid_mask"].sum() == CROP[0] * CROP[1] - 1
    assert torch.allclose(s["normals"][:, 2, 2], torch.tensor([-0.6, 0.0, 0.8]), atol=0.01)  # x LEFT -> right
    assert (s["normals"][:, -1, -1] == 0).all()
    assert s["rgb"][:, 0, 7].min() > 0.9 and s["rgb"][:, 0, 8].max() < 0.1  # crop left = 2: bright columns 0..7


def test_vkitti_hflip_and_errors(vkitti_root, tmp_path):
    plain = VirtualKITTI2(vkitti_root, tasks=("depth", "normals"), crop_size=CROP)[0]
    seed = next(s for s in range(40)
                if torch.rand((), generator=torch.Generator().manual_seed(flip_seed(s, 0, 0))) < 0.5)
    f = VirtualKITTI2(vkitti_root, tasks=("depth", "normals"), crop_size=CROP, hflip=True, seed=seed)[0]
    assert f["depth"][0, -1].item() == pytest.approx(12.34) and torch.equal(f["depth"], plain["depth"].flip(-1))
    assert torch.allclose(f["normals"][:, 2, 2], torch.tensor([0.6, 0.0, 0.8]), atol=0.01)
    with pytest.raises(DatasetLayoutError, match=str(tmp_path / "none")):
        VirtualKITTI2(tmp_path / "none")
    (tmp_path / "half" / "vkitti_2.0.3_rgb").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="has no vkitti_2.0.3_depth/"):
        VirtualKITTI2(tmp_path / "half")
    (tmp_path / "half" / "vkitti_2.0.3_depth").mkdir()
    with pytest.raises(DatasetLayoutError, match="first missing: .*Scene01/morning/frames/rgb/Camera_0"):
        VirtualKITTI2(tmp_path / "half")
    with pytest.raises(DataReadError, match="smaller than the 352x1216 KB crop"):
        VirtualKITTI2(vkitti_root)[0]  # the default crop needs real-size frames
    bad = vkitti_root / "vkitti_2.0.3_rgb/Scene01/morning/frames/rgb/Camera_0/rgb_00001.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DataReadError, match=f"cannot read {bad}"):
        VirtualKITTI2(vkitti_root, crop_size=CROP)[1]


def test_vkitti_real_size_kb_crop(tmp_path):
    depth = np.full((375, 1242), 500, np.uint16)
    depth[23, 13], depth[22, 13], depth[374, 1228] = 1234, 9999, 4321  # crop top = 375 - 352, left = (1242 - 1216) // 2
    write_vkitti_frame(tmp_path, "Scene20", "fog", "Camera_1", 7, depth)
    s = VirtualKITTI2(tmp_path, scenes=("20",))[0]
    assert s["depth"].shape == (352, 1216) and s["rgb"].shape == (3, 352, 1216)
    assert s["depth"][0, 0].item() == pytest.approx(12.34) and s["depth"][-1, -1].item() == pytest.approx(43.21)
    assert (s["depth"] != 99.99).all()


# ----------------------------------------------------------------------------- the 9:1 mixer


def e2e_counts(len1, len2, s1=9, s2=1):
    f1, f2 = min(len2 / len1 * s1 / s2, 1), min(len1 / len2 * s2 / s1, 1)
    return [int(len1 * f1), int(len2 * f2)]


def test_batch_counts_follow_e2e():
    for len1, len2 in [(250, 75), (900, 100), (100, 900), (5000, 20), (7, 7), (13, 2)]:
        assert batches_per_dataset([len1, len2], [9, 1]) == e2e_counts(len1, len2)


def test_mixed_sampler_ratio_single_source_and_ddp_shares():
    lengths, bs = [3600, 1200], 4  # 900 and 300 batches -> 900 Hypersim + 100 VKITTI per epoch
    s = MixedBatchSampler(lengths, bs, ratios=(9, 1), seed=3)
    batches = list(s)
    assert len(batches) == len(s) == 1000
    src = [0 if max(b) < lengths[0] else 1 for b in batches]
    assert all(len(b) == bs and (min(b) >= lengths[0]) == bool(k) for b, k in zip(batches, src))  # one dataset each
    assert src.count(0) == 900 and src.count(1) == 100
    flat = [i for b in batches for i in b]
    assert len(set(flat)) == len(flat)  # no sample twice in an epoch
    assert 0 < src[:500].count(1) < 100  # the sources are shuffled together, not in blocks
    s.set_epoch(1)
    assert list(s) != batches and list(MixedBatchSampler(lengths, bs, seed=3)) == batches
    ranks = [MixedBatchSampler(lengths, bs, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    shares = [list(r) for r in ranks]
    assert len(shares[0]) == len(shares[1]) == len(ranks[0]) == 500
    ids = [{i for b in share for i in b} for share in shares]
    assert not ids[0] & ids[1] and ids[0] | ids[1] == set(flat)
    # 10 + 2 full batches -> 10 + int(2 * 10/18) = 11 per epoch: 5 per rank, one left over
    odd = [list(MixedBatchSampler([40, 8], 4, seed=0, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(odd[0]) == len(odd[1]) == 5


def test_mixed_loader_keeps_resolutions_apart(hypersim_root, vkitti_root):
    ds = MixedDataset([Hypersim(hypersim_root, height=H, width=W, hflip=True),
                       VirtualKITTI2(vkitti_root, crop_size=CROP, hflip=True)])
    sampler = MixedBatchSampler(ds.lengths, batch_size=2, ratios=(1, 1), seed=0)
    ds.set_epoch(1)
    batches = list(torch.utils.data.DataLoader(ds, batch_sampler=sampler))
    assert sorted(tuple(b["depth"].shape) for b in batches) == [(2, *CROP), (2, H, W)]


@pytest.mark.parametrize("dataset", ["hypersim", "hypersim_vkitti2"])
def test_quickstart_trains_two_steps_from_the_fixtures(dataset, hypersim_root, vkitti_root, tmp_path):
    """The real CLI on the real-layout fixtures (alone, and mixed 9:1 with VKITTI): two steps and a validation."""
    from conftest import FAST, read_metrics, run_cli

    fast = [o for o in FAST if "num_scenes" not in o]  # those are procedural's
    train = "dataset.train" if dataset == "hypersim" else "dataset.train.datasets.0"
    sizes = [f"+{train}.height={H}", f"+{train}.width={W}", f"+dataset.val.height={H}", f"+dataset.val.width={W}",
             "dataset.val.split=train"]  # the fixture holds the train folder only
    root = hypersim_root  # dataset.root: the dataset's own folder; the mixed one's holds hypersim/ (and vkitti2/)
    if dataset == "hypersim_vkitti2":
        root = hypersim_root.parent.parent
        sizes += [f"dataset.vkitti2_root={vkitti_root}", f"+dataset.train.datasets.1.crop_size=[{CROP[0]},"
                  f"{CROP[1]}]"]
    run = tmp_path / "run"
    run_cli("train.py", "experiment=quickstart", f"dataset={dataset}", f"dataset.root={root}",
            "dataset.num_workers=0", "logger=csv", f"hydra.run.dir={run}", *fast, *sizes)
    assert "abs_rel" in read_metrics(run)


def test_prompts_from_a_dataset_without_captions_fail_at_start_up(hypersim_root, tmp_path):
    """Hypersim has no captions (procedural scenes do): objective.prompts=dataset is refused before training."""
    from conftest import FAST, run_cli

    fast = [o for o in FAST if "num_scenes" not in o]
    run = tmp_path / "r"
    result = run_cli("train.py", "experiment=dmp_depth", "backbone=tiny", "dataset=hypersim",
                     f"dataset.root={hypersim_root}", "dataset.num_workers=0", "objective.prompts=dataset",
                     "logger=csv", f"hydra.run.dir={run}", *fast, f"+dataset.train.height={H}",
                     f"+dataset.train.width={W}", f"+dataset.val.height={H}", f"+dataset.val.width={W}",
                     "dataset.val.split=train", expect_ok=False)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "objective.prompts=dataset" in result.stderr and "Traceback" not in result.stderr
    assert not (run / "checkpoints").exists()
