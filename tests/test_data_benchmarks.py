"""Format tests for the depth benchmarks (Marigold's eval tars, extracted or as .tar) and DSINE's normal eval sets
(docs/data.md#depth-benchmarks). Every fixture is written here in the real on-disk layout, at a tiny size."""

import gzip
import os
import pickle
import posixpath
import re
import shutil
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch
from conftest import ROOT, read_metrics, run_cli
from PIL import Image

from densediff.data.common import DataReadError, DatasetLayoutError
from densediff.data.depth_benchmarks import DIODE, ETH3D, KITTI, NYUv2, ScanNet, marigold_prediction_name
from densediff.data.exr import read_exr, read_exr_with_library
from densediff.data.normal_benchmarks import IBims, NYUv2Normals, Sintel, contrast_stretch

RNG = np.random.default_rng(0)


def rgb_image(h, w, lo=0, hi=256):
    return RNG.integers(lo, hi, (h, w, 3), dtype=np.uint8)


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


# ----------------------------------------------------------------------------- fixtures in the real layouts


def make_nyuv2(root, n=2):
    """Marigold's nyu_labeled_extracted.tar, extracted: test/<scene>/{rgb,depth,filled}_XXXX.png at 480x640."""
    lines = []
    for i in range(1, n + 1):
        d = root / "test" / f"kitchen_{i:04d}"
        d.mkdir(parents=True)
        Image.fromarray(rgb_image(480, 640)).save(d / f"rgb_{i:04d}.png")
        depth = np.full((480, 640), 2000 + i, np.uint16)  # 2.001 m, ...
        depth[100, 100] = 0  # no Kinect return
        depth[101, 100] = 12000  # 12 m: beyond NYU's 10 m
        Image.fromarray(depth).save(d / f"depth_{i:04d}.png")
        Image.fromarray(np.full((480, 640), 3000, np.uint16)).save(d / f"filled_{i:04d}.png")  # must not be used
        rel = f"test/kitchen_{i:04d}"
        lines.append(f"{rel}/rgb_{i:04d}.png {rel}/depth_{i:04d}.png {rel}/filled_{i:04d}.png")
    write_lines(root / "filename_list_test.txt", lines)
    return root


KITTI_H, KITTI_W = 356, 1220  # KB crop: top margin 4, left margin 2
KITTI_DRIVE = "2011_09_26_drive_0002_sync"


def make_kitti(root):
    lines = []
    for i, has_gt in enumerate([True, False, True]):
        rgb_rel = f"2011_09_26/{KITTI_DRIVE}/image_02/data/{i:010d}.png"
        gt_rel = f"{KITTI_DRIVE}/proj_depth/groundtruth/image_02/{i:010d}.png"
        (root / rgb_rel).parent.mkdir(parents=True, exist_ok=True)
        img = np.zeros((KITTI_H, KITTI_W, 3), np.uint8)
        img[..., 0] = np.arange(KITTI_W) % 256
        img[..., 1] = (np.arange(KITTI_H) % 256)[:, None]
        Image.fromarray(img).save(root / rgb_rel)
        if has_gt:
            (root / gt_rel).parent.mkdir(parents=True, exist_ok=True)
            gt = np.full((KITTI_H, KITTI_W), 10 * 256 + i, np.uint16)  # 10 m (+ i/256)
            gt[200, 600] = 90 * 256  # 90 m: beyond 80 m
            Image.fromarray(gt).save(root / gt_rel)
        lines.append(f"{rgb_rel} {gt_rel if has_gt else 'None'} 721.5377")
    write_lines(root / "eigen_test_files_with_gt.txt", lines)
    return root


ETH_H, ETH_W = 6, 8


def make_eth3d(root):
    lines = []
    for scene in ["courtyard", "delivery_area"]:
        rgb_rel = f"rgb/{scene}/images/dslr_images/DSC_0001.JPG"
        gt_rel = f"depth/{scene}_dslr_depth/{scene}/ground_truth_depth/dslr_images/DSC_0001.JPG"
        (root / rgb_rel).parent.mkdir(parents=True)
        (root / gt_rel).parent.mkdir(parents=True)
        Image.fromarray(rgb_image(ETH_H, ETH_W)).save(root / rgb_rel, format="JPEG")
        gt = np.arange(ETH_H * ETH_W, dtype=np.float32).reshape(ETH_H, ETH_W) * 0.5 + 1.0
        gt[0, 1] = np.inf  # unknown
        gt.astype("<f4").tofile(root / gt_rel)
        lines.append(f"{rgb_rel} {gt_rel}")
    write_lines(root / "eth3d_filename_list.txt", lines)
    return root


def make_scannet(root):
    lines = []
    for frame in [0, 100]:
        d = root / "scene0568_00"
        (d / "color").mkdir(parents=True, exist_ok=True)
        (d / "depth").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb_image(48, 64)).save(d / "color" / f"{frame:06d}.jpg")
        depth = np.full((48, 64), 1500, np.uint16)
        depth[3, 4] = 0
        Image.fromarray(depth).save(d / "depth" / f"{frame:06d}.png")
        lines.append(f"scene0568_00/color/{frame:06d}.jpg scene0568_00/depth/{frame:06d}.png")
    write_lines(root / "scannet_val_sampled_list_800_1.txt", lines)
    return root


def make_diode(root):
    lines = []
    for kind, name in [("indoors", "00019_00183_indoors_000_010"), ("outdoor", "00022_00192_outdoor_000_000")]:
        d = root / kind / "scene_00019" / "scan_00183"
        d.mkdir(parents=True)
        Image.fromarray(rgb_image(48, 64)).save(d / f"{name}.png")
        depth = np.full((48, 64, 1), 5.0, np.float32)  # DIODE stores (H, W, 1)
        depth[0, 0, 0] = 0.2  # below min_depth 0.6 but inside the mask: still valid (mask file only)
        mask = np.ones((48, 64), np.float32)
        mask[10, 10] = 0.0
        np.save(d / f"{name}_depth.npy", depth)
        np.save(d / f"{name}_depth_mask.npy", mask)
        rel = f"{kind}/scene_00019/scan_00183/{name}"
        lines.append(f"{rel}.png {rel}_depth.npy {rel}_depth_mask.npy")
    write_lines(root / "diode_val_all_filename_list.txt", lines)
    return root


DSINE_N = np.array([0.6, 0.0, 0.8])  # DSINE frame: x LEFT, y up, z toward the viewer


def encode_normals_u8(n):
    return np.round((np.asarray(n, np.float64) + 1) / 2 * 255).astype(np.uint8)


def make_dsine_png(root, subdir, ids, h=48, w=64):
    """nyuv2 / scannet: <id>_img.png, <id>_normal.png (uint8), <id>_intrins.npy."""
    (root / subdir).mkdir(parents=True, exist_ok=True)
    for i in ids:
        Image.fromarray(rgb_image(h, w, 50, 151)).save(root / subdir / f"{i}_img.png")
        n = np.broadcast_to(encode_normals_u8(DSINE_N), (h, w, 3)).copy()
        n[2, 3] = 0  # no GT
        Image.fromarray(n).save(root / subdir / f"{i}_normal.png")
        np.save(root / subdir / f"{i}_intrins.npy", np.eye(3, dtype=np.float32))
    return root


def write_exr(path, rgb, compression=3, half=False):
    """A scanline OpenEXR file with channels B, G, R (alphabetical, as OpenEXR sorts them), written from the spec:
    header attributes, a null byte, the line-offset table, then chunks of (y, size, data). compression 0 = NONE,
    2 = ZIPS (1 line per chunk), 3 = ZIP (16 lines)."""
    h, w, _ = rgb.shape
    dt, ptype = (np.dtype("<f2"), 1) if half else (np.dtype("<f4"), 2)

    def attr(name, kind, value):
        return name.encode() + b"\0" + kind.encode() + b"\0" + struct.pack("<i", len(value)) + value
    chlist = b"".join(c.encode() + b"\0" + struct.pack("<iB3xii", ptype, 0, 1, 1) for c in "BGR") + b"\0"
    box = struct.pack("<iiii", 0, 0, w - 1, h - 1)
    header = (struct.pack("<ii", 20000630, 2) + attr("channels", "chlist", chlist)
              + attr("compression", "compression", bytes([compression])) + attr("dataWindow", "box2i", box)
              + attr("displayWindow", "box2i", box) + attr("lineOrder", "lineOrder", b"\0")
              + attr("pixelAspectRatio", "float", struct.pack("<f", 1.0))
              + attr("screenWindowCenter", "v2f", struct.pack("<ff", 0, 0))
              + attr("screenWindowWidth", "float", struct.pack("<f", 1.0)) + b"\0")
    per_chunk = {0: 1, 2: 1, 3: 16}[compression]
    chunks = []
    for y in range(0, h, per_chunk):
        raw = b"".join(rgb[yy, :, c].astype(dt).tobytes() for yy in range(y, min(y + per_chunk, h)) for c in (2, 1, 0))
        if compression:
            b = np.frombuffer(raw, np.uint8)
            t = np.concatenate([b[0::2], b[1::2]]).astype(np.int64)  # reorder: even bytes, then odd bytes
            t[1:] = (np.diff(t) + 128) % 256  # predictor: differences + 128
            packed = zlib.compress(t.astype(np.uint8).tobytes())
            raw = packed if len(packed) < len(raw) else raw
        chunks.append(struct.pack("<ii", y, len(raw)) + raw)
    table_end = len(header) + 8 * len(chunks)
    offsets, pos = [], table_end
    for c in chunks:
        offsets.append(pos)
        pos += len(c)
    path.write_bytes(header + struct.pack(f"<{len(chunks)}Q", *offsets) + b"".join(chunks))


def exr_normals(h, w):
    n = np.broadcast_to(DSINE_N.astype(np.float32), (h, w, 3)).copy()
    n[1, 2] = 0.0  # no GT (|n| < 0.5)
    n[4, 5] = [0.0, -0.6, 0.8]
    return n


def make_dsine_exr(root, subdir, ids, h=20, w=24, compression=3):
    """ibims / sintel: <id>_img.png, <id>_normal.exr (float), <id>_intrins.npy."""
    (root / subdir).mkdir(parents=True, exist_ok=True)
    for i in ids:
        Image.fromarray(rgb_image(h, w)).save(root / subdir / f"{i}_img.png")
        write_exr(root / subdir / f"{i}_normal.exr", exr_normals(h, w), compression)
        np.save(root / subdir / f"{i}_intrins.npy", np.eye(3, dtype=np.float32))
    return root


MAKERS = {
    "nyuv2": make_nyuv2, "kitti": make_kitti, "eth3d": make_eth3d, "scannet": make_scannet, "diode": make_diode,
    "nyuv2_normals": lambda r: make_dsine_png(r, "test", ["000001", "000002"]),
    "scannet_normals": lambda r: make_dsine_png(r, "scene0001_01", ["000000"]),
    "ibims": lambda r: make_dsine_exr(r, "ibims", ["corridor_01", "lab_02"]),
    "sintel": lambda r: make_dsine_exr(r, "alley_1", ["frame_0001"]),
}


@pytest.fixture
def fixture_root(tmp_path):
    def make(name):
        return MAKERS[name](tmp_path / name)
    return make


# ----------------------------------------------------------------------------- depth sets


def test_nyuv2_reads_raw_depth_in_metres_with_the_eigen_crop(fixture_root):
    ds = NYUv2(fixture_root("nyuv2"))
    assert len(ds) == 2
    s = ds[0]
    assert set(s) == {"rgb", "depth", "valid_mask", "name", "relative_path"}
    assert s["relative_path"] == "test/kitchen_0001/rgb_0001.png"
    assert s["rgb"].shape == (3, 480, 640) and s["rgb"].dtype == torch.float32
    expected_rgb = np.asarray(Image.open(ds.root + "/" + s["relative_path"])).transpose(2, 0, 1) / 255.0
    assert torch.allclose(s["rgb"], torch.from_numpy(expected_rgb).float())
    assert s["depth"].dtype == torch.float32 and s["depth"][200, 200] == pytest.approx(2.001)  # raw, not filled
    v = s["valid_mask"]
    region = torch.zeros(480, 640, dtype=torch.bool)
    region[45:471, 41:601] = True
    expected = region.clone()
    expected[100, 100] = expected[101, 100] = False  # 0 m and 12 m
    assert torch.equal(v, expected)
    assert s["depth"][~v].eq(0).all() and s["depth"][v].gt(0).all()
    assert NYUv2(ds.root, eigen_crop=False)[0]["valid_mask"].sum() == 480 * 640 - 2


def test_kitti_kb_crop_eval_crops_and_none_lines(fixture_root):
    root = fixture_root("kitti")
    ds = KITTI(root)
    assert len(ds) == 2  # the "None" GT line is dropped (Marigold issue #96)
    s = ds[1]
    assert s["relative_path"] == f"2011_09_26/{KITTI_DRIVE}/image_02/data/{2:010d}.png"
    assert s["rgb"].shape == (3, 352, 1216) and s["depth"].shape == (352, 1216)
    # KB crop: bottom 352 rows (top margin 4), centre 1216 columns (left margin 2)
    assert s["rgb"][0, 0, 0] * 255 == pytest.approx(2) and s["rgb"][1, 0, 0] * 255 == pytest.approx(4)
    assert s["depth"][200, 200] == pytest.approx(10 + 2 / 256)
    eigen = torch.zeros(352, 1216, dtype=torch.bool)
    eigen[117:321, 43:1172] = True
    eigen[200 - 4, 600 - 2] = False  # 90 m > 80 m, moved by the KB crop
    assert torch.equal(s["valid_mask"], eigen)
    garg = KITTI(root, eval_crop="garg")[0]["valid_mask"]
    expected = torch.zeros(352, 1216, dtype=torch.bool)
    expected[143:349, 43:1172] = True
    expected[196, 598] = False
    assert torch.equal(garg, expected)
    assert KITTI(root, eval_crop="none")[0]["valid_mask"].sum() == 352 * 1216 - 1
    assert KITTI(root, kb_crop=False, eval_crop="none")[0]["depth"].shape == (KITTI_H, KITTI_W)
    with pytest.raises(ValueError, match="eval_crop"):
        KITTI(root, eval_crop="bts")


def test_eth3d_raw_float32_inf_to_zero_and_wrong_size(fixture_root):
    root = fixture_root("eth3d")
    ds = ETH3D(root, gt_shape=(ETH_H, ETH_W))
    s = ds[0]
    gt = np.arange(ETH_H * ETH_W, dtype=np.float32).reshape(ETH_H, ETH_W) * 0.5 + 1.0
    gt[0, 1] = 0.0
    assert torch.equal(s["depth"], torch.from_numpy(gt))
    assert s["valid_mask"].sum() == ETH_H * ETH_W - 1 and not s["valid_mask"][0, 1]
    assert s["rgb"].shape == (3, ETH_H, ETH_W)
    with pytest.raises(DataReadError, match=r"DSC_0001\.JPG: 192 bytes, expected 384 .*6x16"):
        ETH3D(root, gt_shape=(ETH_H, ETH_W * 2))[0]


def test_scannet_and_diode(fixture_root):
    s = ScanNet(fixture_root("scannet"))[1]
    assert s["relative_path"] == "scene0568_00/color/000100.jpg"
    assert s["depth"][0, 0] == pytest.approx(1.5) and not s["valid_mask"][3, 4]
    assert s["valid_mask"].sum() == 48 * 64 - 1

    d = DIODE(fixture_root("diode"))[0]
    assert d["depth"].shape == (48, 64) and d["depth"][5, 5] == pytest.approx(5.0)
    assert d["valid_mask"][0, 0] and d["depth"][0, 0] == pytest.approx(0.2)  # mask file only: 0.2 m stays valid
    assert not d["valid_mask"][10, 10] and d["depth"][10, 10] == 0
    assert d["valid_mask"].sum() == 48 * 64 - 1


def test_marigold_prediction_names():
    assert marigold_prediction_name("nyuv2", "test/kitchen_0001/rgb_0001.png") == "test/kitchen_0001/pred_0001.npy"
    assert marigold_prediction_name("kitti", "2011_09_26/d/image_02/data/0000000005.png") == \
        "2011_09_26/d/image_02/data/pred_0000000005.npy"
    assert marigold_prediction_name("eth3d", "rgb/a/images/dslr_images/DSC_0001.JPG") == \
        "rgb/a/images/dslr_images/pred_DSC_0001.npy"
    assert marigold_prediction_name("scannet", "scene0568_00/color/000100.jpg") == "scene0568_00/color/pred_000100.npy"
    assert marigold_prediction_name("diode", "indoors/s/t/00019_x.png") == "indoors/s/t/pred_00019_x.npy"


def test_missing_root_list_or_file_fail_at_construction(fixture_root, tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"NYUv2 root .*nowhere does not exist.*nyu_labeled_extracted\.tar"):
        NYUv2(tmp_path / "nowhere")
    root = fixture_root("nyuv2")
    (root / "filename_list_test.txt").rename(root / "list.txt")
    with pytest.raises(DatasetLayoutError, match=r"filename_list_test\.txt does not exist.*data_split/nyu/labeled"):
        NYUv2(root)
    assert len(NYUv2(root, filename_list=root / "list.txt")) == 2
    (root / "test" / "kitchen_0002" / "depth_0002.png").unlink()
    with pytest.raises(DatasetLayoutError, match=r"kitchen_0002/depth_0002\.png .*does not exist"):
        NYUv2(root, filename_list=root / "list.txt")
    with pytest.raises(DatasetLayoutError, match=r"(?i)ibims.* holds no \*_img\.png"):
        IBims(tmp_path)
    with pytest.raises(ValueError, match="depth benchmark"):
        ScanNet(fixture_root("scannet"), tasks=["normals"])


def test_corrupt_files_raise_data_read_error_naming_them(fixture_root):
    root = fixture_root("scannet")
    (root / "scene0568_00" / "depth" / "000100.png").write_bytes(b"not a png")
    ds = ScanNet(root)
    ds[0]
    with pytest.raises(DataReadError, match=r"depth/000100\.png"):
        ds[1]
    root = fixture_root("diode")
    mask = next(root.rglob("*outdoor*_depth_mask.npy"))
    mask.write_bytes(b"garbage")
    with pytest.raises(DataReadError, match=mask.name):
        DIODE(root)[1]
    root = fixture_root("ibims")
    (root / "ibims" / "lab_02_normal.exr").write_bytes(b"v/1\x01 truncated")
    with pytest.raises(DataReadError, match=r"lab_02_normal\.exr"):
        IBims(root)[1]


# ----------------------------------------------------------------------------- the same sets read from the .tar

DEPTH_SETS = {"nyuv2": (NYUv2, {}), "kitti": (KITTI, {}), "eth3d": (ETH3D, {"gt_shape": (ETH_H, ETH_W)}),
              "scannet": (ScanNet, {}), "diode": (DIODE, {})}


def pack_tar(folder, style="dot", drop=()):
    """Pack an extracted fixture folder as a Marigold evaluation tar, the filename list left out of it and copied next
    to it (`<folder>_tar/<name>.tar`). style "dot": members `./<rel>`, as `tar -cf x.tar -C folder .` writes them and
    Marigold reads them (`extractfile("./" + rel)`); "plain": `<rel>`; "top": `<name>/<rel>` (one top-level folder).
    Members whose name ends with one of `drop` are left out."""
    out = folder.parent / f"{folder.name}_tar_{style}"
    out.mkdir()
    for listed in folder.glob("*.txt"):
        shutil.copy(listed, out / listed.name)

    def keep(info):
        return None if info.name.endswith(".txt") or info.name.endswith(tuple(drop)) else info
    tar_path = out / f"{folder.name}.tar"
    with tarfile.open(tar_path, "w") as tar:
        if style == "plain":
            for path in sorted(folder.rglob("*")):
                tar.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False, filter=keep)
        else:
            tar.add(folder, arcname="." if style == "dot" else folder.name, filter=keep)
    return tar_path


def assert_same_samples(a, b):
    assert len(a) == len(b) and a.samples == b.samples
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], torch.Tensor):
                assert x[key].dtype == y[key].dtype and x[key].shape == y[key].shape, key
                assert torch.equal(x[key].view(-1).view(torch.uint8) if x[key].dtype != torch.bool else x[key],
                                   y[key].view(-1).view(torch.uint8) if y[key].dtype != torch.bool else y[key]), key
            else:
                assert x[key] == y[key], key


@pytest.mark.parametrize("name", list(DEPTH_SETS))
def test_tar_root_yields_the_same_samples_as_the_folder(name, fixture_root):
    cls, kwargs = DEPTH_SETS[name]
    folder = fixture_root(name)
    tar_path = pack_tar(folder)
    with tarfile.open(tar_path) as tar:
        assert all(n == "." or n.startswith("./") for n in tar.getnames())  # Marigold's member names
        assert not any(n.endswith(".txt") for n in tar.getnames())  # the list stays outside the tar
    from_tar = cls(tar_path, **kwargs)  # the filename list is found next to the tar
    assert from_tar.files.is_tar and from_tar.filename_list == str(tar_path.parent / posixpath.basename(
        cls.list_in_marigold))
    assert_same_samples(from_tar, cls(folder, **kwargs))
    assert from_tar.prediction_name(0) == cls(folder, **kwargs).prediction_name(0)


@pytest.mark.parametrize("style", ["plain", "top"])
def test_tar_members_without_dot_or_under_one_top_folder_and_links(style, fixture_root):
    folder = fixture_root("scannet")
    depth = folder / "scene0568_00" / "depth"
    (depth / "000100.png").rename(depth / "real_000100.png")
    os.symlink("real_000100.png", depth / "000100.png")  # stored as a symlink member, followed
    tar_path = pack_tar(folder, style)
    with tarfile.open(tar_path) as tar:
        names = tar.getnames()
        assert tar.getmember(next(n for n in names if n.endswith("depth/000100.png"))).issym()
    assert all(n.startswith("scannet/") or n == "scannet" for n in names) if style == "top" else \
        not any(n.startswith(("./", "scannet")) for n in names)
    assert_same_samples(ScanNet(tar_path), ScanNet(folder))


def test_tar_missing_corrupt_truncated_or_not_a_tar(fixture_root, tmp_path):
    tar_path = pack_tar(fixture_root("nyuv2"), drop=("kitchen_0002/depth_0002.png",))
    with pytest.raises(DatasetLayoutError, match=re.escape(f"{tar_path}:test/kitchen_0002/depth_0002.png (listed in ")
                       + r".* is not a member of the tar.*nyu_labeled_extracted\.tar"):
        NYUv2(tar_path)

    folder = fixture_root("scannet")
    (folder / "scene0568_00" / "depth" / "000100.png").write_bytes(b"not a png")
    tar_path = pack_tar(folder)
    ds = ScanNet(tar_path)
    ds[0]
    with pytest.raises(DataReadError, match=re.escape(f"cannot read {tar_path}:./scene0568_00/depth/000100.png: ")):
        ds[1]

    folder = fixture_root("diode")
    tar_path = pack_tar(folder)
    ds = DIODE(tar_path)
    last = max(ds.files.index.values(), key=lambda info: info.offset_data)
    with open(tar_path, "r+b") as fh:
        fh.truncate(last.offset_data + 10)  # cut inside the last member, after the index was built
    i = next(i for i, s in enumerate(ds.samples) if last.name.endswith(tuple(s)))
    with pytest.raises(DataReadError, match=re.escape(f"cannot read {tar_path}:{last.name}: ")):
        ds[i]

    with pytest.raises(DatasetLayoutError, match=r"nyuv2_tar_dot[/\\]filename_list_test\.txt is a file but not a \.tar"):
        NYUv2(tmp_path / "nyuv2_tar_dot" / "filename_list_test.txt")
    zipped = tmp_path / "zipped" / "scannet.tar"  # a gzipped tar named .tar: refused, no random access
    zipped.parent.mkdir()
    zipped.write_bytes(gzip.compress((tmp_path / "scannet_tar_dot" / "scannet.tar").read_bytes()))
    with pytest.raises(DatasetLayoutError, match=r"zipped[/\\]scannet\.tar as an uncompressed tar"):
        ScanNet(zipped, filename_list=tmp_path / "scannet_tar_dot" / "scannet_val_sampled_list_800_1.txt")


class WithReaderPid(torch.utils.data.Dataset):
    """A sample together with the pid of the process that read it and the pid its tar handle was opened in."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, index):
        return self.ds[index], os.getpid(), self.ds.files._pid


def test_tar_read_by_dataloader_workers(fixture_root):
    folder = fixture_root("kitti")
    ds = KITTI(pack_tar(folder), eval_crop="garg")
    ds[0]  # the parent opens its handle first: forked workers must not use it
    assert ds.files._pid == os.getpid()
    loader = torch.utils.data.DataLoader(WithReaderPid(ds), batch_size=None, num_workers=2,
                                         multiprocessing_context="fork")
    read = list(loader)
    assert all(pid == handle_pid != os.getpid() for _, pid, handle_pid in read)  # each worker opened its own
    assert len({pid for _, pid, _ in read}) == 2
    from_workers = [sample for sample, _, _ in read]
    expected = KITTI(folder, eval_crop="garg")
    assert len(from_workers) == len(expected) == 2
    for got, want in zip(from_workers, (expected[0], expected[1])):
        assert got.keys() == want.keys() and all(
            torch.equal(got[k], want[k]) if isinstance(want[k], torch.Tensor) else got[k] == want[k] for k in want)
    assert torch.equal(ds[1]["depth"], expected[1]["depth"])  # the parent's handle still reads after the workers
    copy = pickle.loads(pickle.dumps(ds))  # spawn pickles the dataset: the handle stays behind, reopened lazily
    assert copy.files._tar is None and torch.equal(copy[1]["rgb"], expected[1]["rgb"])


# ----------------------------------------------------------------------------- DSINE normal sets


def test_dsine_png_normals_negate_x_and_mask(fixture_root):
    root = fixture_root("nyuv2_normals")
    ds = NYUv2Normals(root, contrast_stretch=False)
    assert len(ds) == 2
    s = ds[0]
    assert set(s) == {"rgb", "normals", "valid_mask", "name", "relative_path"}
    assert s["relative_path"] == "test/000001_img.png"
    v = encode_normals_u8(DSINE_N).astype(np.float32) / 255 * 2 - 1  # DSINE: not renormalised
    assert torch.allclose(s["normals"][:, 0, 0], torch.tensor([-v[0], v[1], v[2]]))  # x negated: x RIGHT
    assert not s["valid_mask"][2, 3] and s["normals"][:, 2, 3].eq(0).all()
    assert s["valid_mask"].sum() == 48 * 64 - 1
    raw = np.asarray(Image.open(root / "test" / "000001_img.png"))
    assert torch.allclose(s["rgb"], torch.from_numpy(raw.transpose(2, 0, 1) / 255.0).float())


def test_contrast_stretch_is_on_by_default(fixture_root):
    root = fixture_root("nyuv2_normals")
    s = NYUv2Normals(root)[0]
    assert s["rgb"].min() == 0 and s["rgb"].max() == 1  # stretched from [50, 150]
    raw = np.asarray(Image.open(root / "test" / "000001_img.png"))
    expected = ((raw.astype(np.float32) - raw.min()) / (raw.max() - raw.min()) * 255).astype(np.uint8)
    assert torch.allclose(s["rgb"], torch.from_numpy(expected.transpose(2, 0, 1) / 255.0).float())
    assert np.array_equal(contrast_stretch(np.full((2, 2, 3), 7, np.uint8)), np.full((2, 2, 3), 7, np.uint8))


@pytest.mark.parametrize("compression", [0, 2, 3])
@pytest.mark.parametrize("half", [False, True])
def test_exr_reader(tmp_path, compression, half):
    a = RNG.normal(size=(37, 21, 3)).astype(np.float32)  # 37 lines: ZIP's 16-line chunks end short
    a[:20] = 0.25  # compressible region
    write_exr(tmp_path / "x.exr", a, compression, half)
    expected = a.astype(np.float16).astype(np.float32) if half else a
    # the built-in reader and the OpenEXR package (in the test extra) on the same file
    for planes in (read_exr(tmp_path / "x.exr"), read_exr_with_library(tmp_path / "x.exr")):
        assert np.array_equal(np.stack([planes[c] for c in "RGB"], -1), expected)


def test_exr_compressions_beyond_the_built_in_reader_go_through_the_package(tmp_path, monkeypatch):
    import OpenEXR

    from densediff.data import exr

    a = RNG.normal(size=(19, 23, 3)).astype(np.float32)
    OpenEXR.File({"compression": OpenEXR.PIZ_COMPRESSION, "type": OpenEXR.scanlineimage}, {"RGB": a}).write(
        str(tmp_path / "piz.exr"))
    with pytest.raises(NotImplementedError, match="PIZ"):
        read_exr(tmp_path / "piz.exr")
    assert np.array_equal(exr.read_exr_rgb(tmp_path / "piz.exr"), a)

    def not_installed(path):
        raise ImportError("OpenEXR")

    monkeypatch.setattr(exr, "read_exr_with_library", not_installed)
    with pytest.raises(DataReadError, match=r"piz\.exr: it uses PIZ compression.*pip install OpenEXR"):
        exr.read_exr_rgb(tmp_path / "piz.exr")
    write_exr(tmp_path / "zip.exr", a, 3)  # without the package the built-in reader still reads ZIP
    assert np.array_equal(exr.read_exr_rgb(tmp_path / "zip.exr"), a)


def test_dsine_exr_normals(fixture_root):
    ds = IBims(fixture_root("ibims"), contrast_stretch=False)
    assert [s[0] for s in ds.samples] == ["ibims/corridor_01_img.png", "ibims/lab_02_img.png"]
    s = ds[1]
    n = exr_normals(20, 24)
    assert torch.allclose(s["normals"][:, 0, 0], torch.tensor([-0.6, 0.0, 0.8]))
    assert torch.allclose(s["normals"][:, 4, 5], torch.tensor([0.0, -0.6, 0.8]))
    assert not s["valid_mask"][1, 2] and s["valid_mask"].sum() == n.shape[0] * n.shape[1] - 1
    assert Sintel(fixture_root("sintel"))[0]["relative_path"] == "alley_1/frame_0001_img.png"


# ----------------------------------------------------------------------------- configs and the CLI

CONFIGS = {"nyuv2": "depth", "kitti": "depth", "eth3d": "depth", "scannet": "depth", "diode": "depth",
           "nyuv2_normals": "normals", "scannet_normals": "normals", "ibims": "normals", "sintel": "normals"}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_benchmark_config_instantiates_on_its_fixture(name, fixture_root):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import densediff.run  # noqa: F401  (the config resolvers: conftest.py's prepare_process registers them)

    root = fixture_root(name)
    overrides = [f"dataset={name}", f"task={CONFIGS[name]}", f"dataset.root={root}", "paths.root_dir=/repo"]
    if name == "eth3d":
        overrides.append(f"dataset.test.gt_shape=[{ETH_H},{ETH_W}]")
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose(config_name="evaluate", overrides=overrides)
    assert cfg.dataset.name == name and cfg.dataset.val_batch_size == 1
    assert cfg.dataset.processing_res == {"eth3d": 756, "diode": 640}.get(name, 0)
    assert cfg.dataset.alignment_max_res == (1024 if name == "eth3d" else None)
    if CONFIGS[name] == "depth":
        assert float(cfg.dataset.min_depth) > 0 and float(cfg.dataset.max_depth) > 1
        from densediff.run.model import task_options
        from densediff.tasks import build_task

        metrics = build_task("depth", **task_options(cfg)).metrics()  # the protocol reaches the metrics
        assert metrics.alignment_max_res == (1024 if name == "eth3d" else None)
        assert metrics.range_mask == (name != "diode")  # DIODE: valid = the mask file only
    ds = instantiate(cfg.dataset.test, _convert_="all")
    assert len(ds) >= 1 and CONFIGS[name] in ds[0]
    if CONFIGS[name] == "depth":  # root = the .tar itself, the filename list (default null) next to it
        tar_path = pack_tar(root)
        overrides[2] = f"dataset.root={tar_path}"
        with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
            cfg = compose(config_name="evaluate", overrides=overrides)
        from_tar = instantiate(cfg.dataset.test, _convert_="all")
        assert from_tar.files.is_tar and os.path.dirname(from_tar.filename_list) == str(tar_path.parent)
        assert_same_samples(from_tar, ds)


def test_evaluate_nyuv2_predictions_match_the_protocol_by_hand(tmp_path):
    """evaluate.py predictions= on the NYUv2 fixture (Marigold's pred_XXXX.npy names): raw depth in mm, the Eigen
    crop, 1e-3 < d < 10, least squares in depth space, clip, per-image mean: computed here by hand."""
    import csv

    root = make_nyuv2(tmp_path / "nyuv2", n=2)
    rows, cols = np.mgrid[0:480, 0:640]
    preds, expected = tmp_path / "preds", []
    for i in (1, 2):
        folder = root / "test" / f"kitchen_{i:04d}"
        gt_mm = (1000 + 10 * rows + 3 * cols + 500 * i).astype(np.uint16)
        gt_mm[50:60, 50:60] = 0  # no return
        gt_mm[200, 300] = 12000  # beyond 10 m
        Image.fromarray(gt_mm).save(folder / f"depth_{i:04d}.png")
        prediction = RNG.uniform(0, 1, (480, 640)).astype(np.float32) + (rows + cols) / 1000
        (preds / "test" / f"kitchen_{i:04d}").mkdir(parents=True)
        np.save(preds / "test" / f"kitchen_{i:04d}" / f"pred_{i:04d}.npy", prediction.astype(np.float32))
        gt = gt_mm / 1000.0
        valid = (gt > 1e-3) & (gt < 10)
        crop = np.zeros_like(valid)
        crop[45:471, 41:601] = True  # Eigen crop
        valid &= crop
        A = np.stack([prediction[valid], np.ones(valid.sum())], 1).astype(np.float64)
        (scale, shift), *_ = np.linalg.lstsq(A, gt[valid], rcond=None)
        aligned = np.clip(np.clip(scale * prediction + shift, 1e-3, 10), 1e-6, None)[valid]
        ratio = np.maximum(aligned / gt[valid], gt[valid] / aligned)
        expected.append((np.mean(np.abs(aligned - gt[valid]) / gt[valid]), np.mean(ratio < 1.25)))
    run = tmp_path / "run"
    run_cli("evaluate.py", "dataset=nyuv2", f"dataset.root={root}", f"predictions={preds}", "dataset.num_workers=0",
            "logger=csv", f"hydra.run.dir={run}", "trainer.enable_progress_bar=false")
    metrics = read_metrics(run)
    assert metrics["abs_rel"] == pytest.approx(np.mean([e[0] for e in expected]), rel=1e-4)
    assert metrics["delta1"] == pytest.approx(np.mean([e[1] for e in expected]), rel=1e-4)
    per_image = list(csv.DictReader(open(run / "per_image.csv")))
    assert [float(r["abs_rel"]) for r in per_image] == pytest.approx([e[0] for e in expected], rel=1e-4)


def test_evaluate_scores_disparity_predictions_aligned_in_disparity_space_by_hand(tmp_path):
    """task.alignment=least_squares_disparity (another method's affine-invariant disparity, as Depth Anything writes
    it): each prediction is fitted to 1 / GT over the valid pixels, clipped at 1e-3, inverted, clipped to the range;
    per-image abs_rel computed here by hand. Depth-space alignment of the same files scores worse."""
    root = make_nyuv2(tmp_path / "nyuv2", n=2)
    rows, cols = np.mgrid[0:480, 0:640]
    preds, expected = tmp_path / "preds", []
    for i in (1, 2):
        folder = root / "test" / f"kitchen_{i:04d}"
        gt_mm = (1000 + 10 * rows + 3 * cols + 500 * i).astype(np.uint16)
        gt_mm[50:60, 50:60] = 0
        Image.fromarray(gt_mm).save(folder / f"depth_{i:04d}.png")
        gt = gt_mm / 1000.0
        disparity = np.where(gt > 0, 2.0 / np.maximum(gt, 1e-3) + 0.1, 0) + RNG.normal(0, 0.01, gt.shape)
        (preds / "test" / f"kitchen_{i:04d}").mkdir(parents=True)
        np.save(preds / "test" / f"kitchen_{i:04d}" / f"pred_{i:04d}.npy", disparity.astype(np.float32))
        valid = (gt > 1e-3) & (gt < 10)
        crop = np.zeros_like(valid)
        crop[45:471, 41:601] = True
        valid &= crop
        fit = valid & (disparity > 0)
        A = np.stack([disparity[fit], np.ones(fit.sum())], 1).astype(np.float64)
        (scale, shift), *_ = np.linalg.lstsq(A, 1.0 / gt[fit], rcond=None)
        aligned = np.clip(1.0 / np.maximum(scale * disparity.astype(np.float32) + shift, 1e-3), 1e-3, 10)[valid]
        expected.append(np.mean(np.abs(aligned - gt[valid]) / gt[valid]))
    scores = {}
    for alignment in ("least_squares_disparity", "least_squares"):
        run = tmp_path / alignment
        run_cli("evaluate.py", "dataset=nyuv2", f"dataset.root={root}", f"predictions={preds}",
                f"task.alignment={alignment}", "dataset.num_workers=0", "logger=none", f"hydra.run.dir={run}",
                "trainer.enable_progress_bar=false")
        scores[alignment] = read_metrics(run)["abs_rel"]
    assert scores["least_squares_disparity"] == pytest.approx(np.mean(expected), rel=1e-4)
    assert scores["least_squares_disparity"] < 0.5 * scores["least_squares"], scores


def test_evaluate_nyuv2_normals_predictions_pool_pixels_by_hand(tmp_path):
    """evaluate.py predictions= on the DSINE NYUv2 fixture: GT converted from x-left, mask = channel sum > 0, errors
    pooled over every valid pixel (DSINE) and per image (Marigold), computed here by hand."""
    import csv

    root = make_dsine_png(tmp_path / "nyuv2", "test", ["000001", "000002"])
    gt = np.array([-1, 1, 1]) * (encode_normals_u8(DSINE_N) / 255 * 2 - 1)  # DSINE x-left -> canonical
    gt = gt / np.linalg.norm(gt)
    preds, errors = tmp_path / "preds", []
    for name in ("000001", "000002"):
        n = RNG.normal(size=(48, 64, 3)) + np.array([0, 0, 2.0])
        n /= np.linalg.norm(n, axis=-1, keepdims=True)
        (preds / "test").mkdir(parents=True, exist_ok=True)
        np.save(preds / "test" / f"{name}_img.npy", n.astype(np.float32))
        angle = np.degrees(np.arccos(np.clip(n @ gt, -1, 1)))
        valid = np.ones((48, 64), bool)
        valid[2, 3] = False  # the fixture's pixel without GT
        errors.append(angle[valid])
    run = tmp_path / "run"
    run_cli("evaluate.py", "task=normals", "dataset=nyuv2_normals", f"dataset.root={root}", f"predictions={preds}",
            "dataset.num_workers=0", "logger=csv", f"hydra.run.dir={run}", "trainer.enable_progress_bar=false")
    metrics, pooled = read_metrics(run), np.concatenate(errors)
    assert metrics["angular_mean"] == pytest.approx(pooled.mean(), rel=1e-4)
    assert metrics["angular_median"] == pytest.approx(np.median(pooled), rel=1e-4)
    assert metrics["angular_11_25"] == pytest.approx(np.mean(pooled < 11.25), abs=1e-6)
    assert metrics["angular_mean_per_image"] == pytest.approx(np.mean([e.mean() for e in errors]), rel=1e-4)
    rows = list(csv.DictReader(open(run / "per_image.csv")))
    assert [float(r["angular_mean"]) for r in rows] == pytest.approx([e.mean() for e in errors], rel=1e-4)
