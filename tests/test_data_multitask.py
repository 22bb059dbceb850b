"""Format tests for the multi-task loaders (PASCAL-Context and NYUD in ATRC's layouts, docs/data.md#pascal-context,
docs/data.md#nyud-v2-multi-task) and DMP's synthetic bedrooms (image folder + metadata.jsonl + LMDB targets,
docs/data.md#synthetic-bedrooms).
Every fixture is written here in the real on-disk layout, at a tiny size."""

import json

import numpy as np
import pytest
import scipy.io as sio
import torch
from PIL import Image

from densediff.data.common import DataReadError, DatasetLayoutError
from densediff.data.multitask import label_boundaries
from densediff.data.nyud import NYUD
from densediff.data.partial_labels import generate
from densediff.data.pascal_context import PascalContext
from densediff.data.synthetic_bedrooms import SyntheticBedrooms, npz_bytes
from densediff.metrics.morphology import thin

H, W = 32, 48
IDS = ["2008_000002", "2008_000003", "2008_000007"]


def enc(n):
    """(n + 1) / 2 * 255 as uint8, the normals PNG encoding of every dataset here."""
    return np.round((np.asarray(n, np.float64) + 1) / 2 * 255).astype(np.uint8)


def canon(n_file):
    """NYU/Omnidata file frame (x right, y down, z toward the camera) -> canonical (y up), unit length."""
    n = np.asarray(n_file, np.float64) * [1, -1, 1]
    return n / np.linalg.norm(n)


N_FILE = [0.0, -0.6, 0.8]  # an upward-facing, camera-facing normal in the file frame (green DOWN)
N_FILE_2 = [0.6, 0.0, 0.8]  # facing right


def ramp_rgb(k):
    img = np.zeros((H, W, 3), np.uint8)
    img[..., 0] = np.arange(W) * 5  # red ramp left -> right, to see flips
    img[..., 1] = 40 * k
    return img


# ----------------------------------------------------------------------------- PASCAL-Context fixture


def struct(rows, fields):
    a = np.empty((1, len(rows)), dtype=[(f, "O") for f in fields])
    for j, r in enumerate(rows):
        for f, v in zip(fields, r):
            a[0, j][f] = v
    return a


def person_mat(path, with_person):
    mask = np.zeros((H, W), np.uint8)
    mask[4:20, 10:20] = 1
    head, torso, lfoot = (np.zeros((H, W), np.uint8) for _ in range(3))
    head[4:8, 10:20] = 1
    torso[8:16, 10:20] = 1
    lfoot[16:20, 10:14] = 1
    parts = struct([("head", head), ("torso", torso), ("lfoot", lfoot)], ("part_name", "mask"))
    car = np.zeros((H, W), np.uint8)
    car[20:30, 30:40] = 1
    objects = [("car", np.array([[7]]), car, np.zeros((0, 0)))]
    if with_person:
        objects.insert(0, ("person", np.array([[15]]), mask, parts))
    anno = struct([("2008_000002", struct(objects, ("class", "class_ind", "mask", "parts")))], ("imname", "objects"))
    sio.savemat(path, {"anno": anno})


def label_map():
    lm = np.full((H, W), 100, np.uint16)  # 100 = 'wall' (in the NYU whitelist)
    lm[:, 24:] = 200  # 200 = 'sky' (not an NYU class): normals invalid there; boundary at column 23/24
    return lm


@pytest.fixture
def pascal_root(tmp_path):
    root = tmp_path / "PASCALContext"
    for d in ("JPEGImages", "ImageSets/Context", "semseg/VOC12", "semseg/pascal-context", "human_parts",
              "pascal-context/trainval", "normals_distill", "sal_distill", "json"):
        (root / d).mkdir(parents=True)
    (root / "ImageSets/Context/train.txt").write_text("\n".join(IDS) + "\n")
    (root / "ImageSets/Context/val.txt").write_text(IDS[0] + "\n")
    (root / "json/nyu_classes.json").write_text(json.dumps(["unknown", "wall", "floor"]))
    (root / "json/context_classes.json").write_text(json.dumps({"wall": 100, "sky": 200, "tvmonitor": 300,
                                                                "unknown": 0}))
    for k, i in enumerate(IDS):
        Image.fromarray(ramp_rgb(k)).save(root / "JPEGImages" / f"{i}.jpg", quality=95)
        seg = np.zeros((H, W), np.uint8)
        seg[:, 20:] = 15  # person
        seg[0, :] = 255  # ignore
        seg[5, 5] = 7 + k
        if k == 0:  # VOC12 palette PNG
            img = Image.fromarray(seg, "P")
            img.putpalette([v for c in range(256) for v in (c, 255 - c, c // 2)])
            img.save(root / "semseg/VOC12" / f"{i}.png")
        else:  # only the pascal-context fallback exists
            Image.fromarray(seg).save(root / "semseg/pascal-context" / f"{i}.png")
        person_mat(root / "human_parts" / f"{i}.mat", with_person=k != 1)
        sio.savemat(root / "pascal-context/trainval" / f"{i}.mat", {"LabelMap": label_map()})
        n = np.broadcast_to(enc(N_FILE), (H, W, 3)).copy()
        n[:, :8] = enc(N_FILE_2)
        Image.fromarray(n).save(root / "normals_distill" / f"{i}.png")
        sal = np.zeros((H, W), np.uint8)
        sal[:, :16] = 200  # > 0.5
        sal[:, 16:20] = 120  # < 0.5
        Image.fromarray(sal).save(root / "sal_distill" / f"{i}.png")
    return root


ALL_PASCAL = ("segmentation", "human_parts", "saliency", "normals", "edges")


def pascal(root, **kw):
    kw = {"tasks": ALL_PASCAL, "train": False, "pad_size": None, **kw}
    return PascalContext(root, **kw)


def test_pascal_decodes_every_task(pascal_root):
    ds = pascal(pascal_root)
    assert len(ds) == 3
    s = ds[0]
    assert set(s) == {"rgb", "valid_mask", "name", "labelled", *ALL_PASCAL}
    assert s["name"] == IDS[0] and s["rgb"].shape == (3, H, W) and s["rgb"].dtype == torch.float32
    assert torch.allclose(s["rgb"][0, 5], torch.arange(W) * 5 / 255.0, atol=0.05)  # JPEG: close, not exact
    assert s["valid_mask"].all() and s["labelled"] == {t: torch.tensor(True) for t in ALL_PASCAL}
    seg = s["segmentation"]
    assert seg.dtype == torch.int64 and seg[0].eq(255).all() and seg[5, 5] == 7 and seg[3, 30] == 15
    assert ds[1]["segmentation"][5, 5] == 8  # read from semseg/pascal-context/
    parts = s["human_parts"]
    assert parts.dtype == torch.int64
    assert parts[5, 15] == 1 and parts[10, 15] == 2 and parts[18, 11] == 6 and parts[18, 16] == 0 and parts[25, 35] == 0
    assert ds[1]["human_parts"].eq(255).all()  # no person: ignored everywhere (ATRC AddIgnoreRegions)
    sal = s["saliency"]
    assert sal.dtype == torch.float32 and sal[:, :16].eq(1).all() and sal[:, 16:].eq(0).all()
    n = s["normals"]
    assert n.shape == (3, H, W)
    assert np.allclose(n[:, 10, 12].numpy(), canon(N_FILE), atol=1e-2)
    assert np.allclose(n[:, 10, 2].numpy(), canon(N_FILE_2), atol=1e-2)
    assert n[:, :, 24:].eq(0).all()  # 'sky' is not an NYU class: no normal
    e = s["edges"]
    assert e.dtype == torch.float32 and set(e.unique().tolist()) <= {0.0, 1.0}
    assert e[:, :22].eq(0).all() and e[:, 26:].eq(0).all() and e[1:, 22:26].sum(1).eq(1).all()


def test_thin_and_label_boundaries():
    lm = label_map()
    raw = np.zeros((H, W), bool)
    raw[:, 23:25] = True  # the Laplacian marks both sides of the boundary
    # one pixel per row; the top end is eroded (skimage.morphology.thin 0.26 gives exactly this, checked once by hand)
    assert thin(torch.from_numpy(raw)).sum(1).tolist() == [0] + [1] * (H - 1)
    assert label_boundaries(lm).sum(1).tolist() == [0] + [1] * (H - 1)
    block = torch.zeros((9, 9), dtype=torch.bool)
    block[2:7, 2:7] = True
    t = thin(block)
    assert t.sum() == 1 and t[4, 4]  # a filled square thins to its centre
    assert not thin(torch.zeros((4, 4), dtype=torch.bool)).any()


def test_pascal_padding_marks_valid_pixels(pascal_root):
    s = pascal(pascal_root, split="val", pad_size=(40, 56), tasks=("segmentation", "normals", "saliency"))[0]
    assert s["rgb"].shape == (3, 40, 56)
    v = s["valid_mask"]
    assert v.sum() == H * W and v[4:36, 4:52].all()  # centred
    assert s["segmentation"][~v].eq(255).all() and s["normals"][:, ~v].eq(0).all() and s["saliency"][~v].eq(0).all()
    assert s["rgb"][:, ~v].eq(0).all()


def test_pascal_flip_negates_normal_x_and_is_reproducible(pascal_root):
    plain = pascal(pascal_root)
    aug = pascal(pascal_root, train=True, scale_range=None, crop_size=None, hflip=True)
    flipped = []
    for i in range(len(aug)):
        a, p = aug[i], plain[i]
        if torch.equal(a["rgb"], p["rgb"]):
            assert torch.equal(a["normals"], p["normals"])
            continue
        flipped.append(i)
        assert torch.equal(a["rgb"], p["rgb"].flip(-1))
        assert torch.equal(a["segmentation"], p["segmentation"].flip(-1))
        assert torch.equal(a["edges"], p["edges"].flip(-1))
        assert torch.allclose(a["normals"], p["normals"].flip(-1) * torch.tensor([-1.0, 1, 1]).view(3, 1, 1))
    draws = {}
    for epoch in range(4):  # some epoch flips something, and the same (seed, epoch, index) flips the same way
        aug.set_epoch(epoch)
        draws[epoch] = [torch.equal(aug[i]["rgb"], plain[i]["rgb"]) for i in range(len(aug))]
    assert not all(all(d) for d in draws.values()) and any(any(d) for d in draws.values())
    aug.set_epoch(2)
    assert [torch.equal(aug[i]["rgb"], plain[i]["rgb"]) for i in range(len(aug))] == draws[2]


def test_pascal_train_scale_crop_pad(pascal_root):
    ds = PascalContext(pascal_root, tasks=ALL_PASCAL, crop_size=(24, 32), pad_size=(24, 32), seed=3)
    for i in range(len(ds)):
        s = ds[i]
        assert s["rgb"].shape == (3, 24, 32) and s["segmentation"].shape == (24, 32)
        assert s["normals"].shape == (3, 24, 32) and s["valid_mask"].shape == (24, 32)
        assert torch.equal(ds[i]["rgb"], s["rgb"])  # reproducible
        ok = s["normals"].norm(dim=0)
        assert torch.allclose(ok[ok > 0], torch.ones(()), atol=1e-5)


def test_pascal_partial_labels_generated_and_read_from_files(pascal_root, tmp_path):
    one = PascalContext(pascal_root, tasks=ALL_PASCAL, partial_labels="one_label", seed=1)
    flags = [{t: bool(v) for t, v in one[i]["labelled"].items()} for i in range(len(one))]
    assert all(sum(f.values()) == 1 for f in flags)
    again = PascalContext(pascal_root, tasks=ALL_PASCAL, partial_labels="one_label", seed=1)
    assert [{t: bool(v) for t, v in again[i]["labelled"].items()} for i in range(3)] == flags
    rnd = PascalContext(pascal_root, tasks=ALL_PASCAL, partial_labels="random_labels", seed=1)
    assert all(1 <= sum(map(bool, rnd[i]["labelled"].values())) <= 4 for i in range(3))
    val = PascalContext(pascal_root, split="val", tasks=ALL_PASCAL, partial_labels="one_label")
    assert all(val[0]["labelled"].values())  # evaluation is always fully labelled
    # MTPSL/DiffusionMTL onelabel.npy: a pickled {task: [ids with that label]}
    npy = tmp_path / "onelabel.npy"
    np.save(npy, {"semseg": [IDS[0]], "human_parts": [IDS[1]], "sal": [IDS[2]], "normals": [], "edge": []},
            allow_pickle=True)
    ds = PascalContext(pascal_root, tasks=("segmentation", "saliency"), partial_labels="one_label",
                       partial_labels_file=npy)
    assert [(bool(ds[i]["labelled"]["segmentation"]), bool(ds[i]["labelled"]["saliency"])) for i in range(3)] == \
        [(True, False), (False, False), (False, True)]
    # get_task_mapping.ipynb's new_randomlabels.pth: {id: [semseg, parts, sal, normals, edge]}
    pth = tmp_path / "new_randomlabels.pth"
    torch.save({IDS[0]: [1, 0, 0, 1, 1], IDS[1]: [0, 1, 1, 0, 0], IDS[2]: [1, 1, 1, 1, 0]}, pth)
    ds = PascalContext(pascal_root, tasks=ALL_PASCAL, partial_labels="random_labels", partial_labels_file=pth)
    assert [int(v) for v in ds[2]["labelled"].values()] == [1, 1, 1, 1, 0]
    assert [int(v) for v in ds[0]["labelled"].values()] == [1, 0, 0, 1, 1]
    with pytest.raises(DatasetLayoutError, match="nope.npy"):
        PascalContext(pascal_root, tasks=ALL_PASCAL, partial_labels="one_label",
                      partial_labels_file=tmp_path / "nope.npy")
    with pytest.raises(ValueError, match="partial_labels must be one of"):
        PascalContext(pascal_root, tasks=ALL_PASCAL, partial_labels="onelabel")


def test_generated_settings_follow_the_published_rules():
    ids = [f"{i:04d}" for i in range(1000)]
    tasks = ["segmentation", "human_parts", "saliency", "normals", "edges"]
    one = generate(ids, tasks, "one_label", seed=0)
    assert all(sum(f.values()) == 1 for f in one.values())
    counts = [sum(f[t] for f in one.values()) for t in tasks]
    assert max(counts) - min(counts) <= 1  # 200 each (the published file: 1000/999/1000/1000/999)
    assert generate(ids, tasks, "one_label", seed=0) == one and generate(ids, tasks, "one_label", seed=1) != one
    rnd = generate(ids, tasks, "random_labels", seed=0)
    k = [sum(f.values()) for f in rnd.values()]
    assert set(k) == {1, 2, 3, 4}  # at least one label, never all
    assert generate(ids, tasks, "random_labels", seed=0) == rnd
    assert set(sum(f.values()) for f in generate(ids, tasks[:3], "random_labels", 0).values()) == {1, 2}


def test_pascal_layout_errors_name_the_first_missing_path(pascal_root, tmp_path):
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        PascalContext(tmp_path / "nowhere")
    (pascal_root / "sal_distill" / f"{IDS[2]}.png").unlink()
    (pascal_root / "sal_distill" / f"{IDS[1]}.png").unlink()
    with pytest.raises(DatasetLayoutError, match=f"sal_distill/{IDS[1]}.png"):
        PascalContext(pascal_root, tasks=("saliency",))
    PascalContext(pascal_root, tasks=("segmentation",))  # only what the tasks need is required
    with pytest.raises(DatasetLayoutError, match="json/nyu_classes.json"):
        (pascal_root / "json/nyu_classes.json").unlink()
        PascalContext(pascal_root, tasks=("normals",))
    with pytest.raises(ValueError, match=r"unknown tasks \['depth'\].*provides"):
        PascalContext(pascal_root, tasks=("depth",))


def test_pascal_corrupt_files_are_named(pascal_root):
    bad = pascal_root / "normals_distill" / f"{IDS[1]}.png"
    bad.write_bytes(b"not a png")
    ds = pascal(pascal_root, tasks=("normals",))
    ds[0]
    with pytest.raises(DataReadError, match=str(bad)):
        ds[1]
    mat = pascal_root / "human_parts" / f"{IDS[0]}.mat"
    mat.write_bytes(b"MATLAB 5.0 garbage" * 10)
    with pytest.raises(DataReadError, match=str(mat)):
        pascal(pascal_root, tasks=("human_parts",))[0]


# ----------------------------------------------------------------------------- NYUD fixture

NYU_IDS = ["0001", "0002"]


@pytest.fixture
def nyud_root(tmp_path):
    root = tmp_path / "NYUDv2"
    for d in ("images", "segmentation", "depth", "normals", "edge", "gt_sets"):
        (root / d).mkdir(parents=True)
    (root / "gt_sets/train.txt").write_text("\n".join(NYU_IDS) + "\n")
    (root / "gt_sets/val.txt").write_text(NYU_IDS[1] + "\n")
    for k, i in enumerate(NYU_IDS):
        Image.fromarray(ramp_rgb(k)).save(root / "images" / f"{i}.png")
        seg = np.full((H, W), 5, np.uint8)
        seg[0] = 0  # void
        seg[1] = 40
        Image.fromarray(seg).save(root / "segmentation" / f"{i}.png")
        d = np.full((H, W), 2.5 + k, np.float32)
        d[2, 3] = 0.0
        d[4, 4] = 7.125
        np.save(root / "depth" / f"{i}.npy", d)
        n = np.broadcast_to(enc(N_FILE), (H, W, 3)).copy()
        n[:, :8] = enc(N_FILE_2)
        n[3, 3] = 0  # no normal
        Image.fromarray(n).save(root / "normals" / f"{i}.png")
        e = np.zeros((H, W), np.uint8)
        e[:, 30] = 255
        Image.fromarray(e).save(root / "edge" / f"{i}.png")
    return root


ALL_NYUD = ("segmentation", "depth", "normals", "edges")


def test_nyud_decodes_every_task(nyud_root):
    ds = NYUD(nyud_root, tasks=ALL_NYUD, train=False, pad_size=None)
    s = ds[0]
    assert set(s) == {"rgb", "valid_mask", "name", "labelled", *ALL_NYUD} and s["name"] == "0001"
    assert torch.equal(s["rgb"], torch.from_numpy(ramp_rgb(0)).permute(2, 0, 1).float() / 255)  # PNG: exact
    seg = s["segmentation"]
    assert seg.dtype == torch.int64 and seg[0].eq(255).all() and seg[1].eq(39).all() and seg[5, 5] == 4
    d = s["depth"]
    assert d.dtype == torch.float32 and d[2, 3] == 0 and d[4, 4] == 7.125 and d[10, 10] == 2.5
    assert ds[1]["depth"][10, 10] == 3.5
    n = s["normals"]
    assert np.allclose(n[:, 10, 20].numpy(), canon(N_FILE), atol=1e-2)
    assert np.allclose(n[:, 10, 2].numpy(), canon(N_FILE_2), atol=1e-2)
    assert n[:, 3, 3].eq(0).all()
    assert s["edges"][:, 30].eq(1).all() and s["edges"].sum() == H


def test_nyud_pad_flip_and_partial_labels(nyud_root, tmp_path):
    plain = NYUD(nyud_root, split="val", pad_size=(36, 52))
    s = plain[0]
    assert s["rgb"].shape == (3, 36, 52) and s["valid_mask"].sum() == H * W and s["depth"][~s["valid_mask"]].eq(0).all()
    base = NYUD(nyud_root, tasks=ALL_NYUD, train=False, pad_size=None)
    aug = NYUD(nyud_root, tasks=ALL_NYUD, scale_range=None, crop_size=None, pad_size=None)
    seen = set()
    for epoch in range(6):
        aug.set_epoch(epoch)
        for i in range(2):
            a, p = aug[i], base[i]
            if torch.equal(a["rgb"], p["rgb"]):
                seen.add(False)
            else:
                seen.add(True)
                assert torch.equal(a["depth"], p["depth"].flip(-1))
                assert torch.allclose(a["normals"], p["normals"].flip(-1) * torch.tensor([-1.0, 1, 1]).view(3, 1, 1))
    assert seen == {True, False}
    # MTPSL NYUv2 file: labels_weights [N, 3] (segmentation, depth, normals) by position in the train list
    pth = tmp_path / "onelabel.pth"
    torch.save({"labels_weights": torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])}, pth)
    ds = NYUD(nyud_root, tasks=("segmentation", "depth", "normals"), partial_labels="one_label",
              partial_labels_file=pth)
    assert [int(v) for v in ds[0]["labelled"].values()] == [0, 1, 0]
    assert [int(v) for v in ds[1]["labelled"].values()] == [0, 0, 1]
    with pytest.raises(ValueError, match="no labels for tasks \\['edges'\\]"):
        NYUD(nyud_root, tasks=ALL_NYUD, partial_labels="one_label", partial_labels_file=pth)
    gen = NYUD(nyud_root, tasks=ALL_NYUD, partial_labels="random_labels", seed=5)
    assert all(1 <= sum(map(bool, gen[i]["labelled"].values())) <= 3 for i in range(2))
    batch = next(iter(torch.utils.data.DataLoader(gen, batch_size=2)))  # default collate: padded to 448x576
    assert batch["rgb"].shape == (2, 3, 448, 576) and batch["labelled"]["edges"].shape == (2,)


def test_nyud_layout_and_corrupt_files(nyud_root, tmp_path):
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        NYUD(tmp_path / "missing")
    # the older NYUD_MT.tgz layout (images/*.jpg) is refused, naming the first missing file
    (nyud_root / "images/0001.png").rename(nyud_root / "images/0001.jpg")
    with pytest.raises(DatasetLayoutError, match="images/0001.png"):
        NYUD(nyud_root, tasks=("depth",))
    (nyud_root / "images/0001.jpg").rename(nyud_root / "images/0001.png")
    (nyud_root / "depth/0002.npy").write_bytes(b"\x93NUMPY garbage")
    ds = NYUD(nyud_root, tasks=("depth",), train=False)
    with pytest.raises(DataReadError, match="depth/0002.npy"):
        ds[1]


# ----------------------------------------------------------------------------- synthetic bedrooms fixture

KEYS = ["00000", "00001", "00002"]


def png_bytes(a):
    import io
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def write_lmdb(path, items):
    import lmdb
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for k, v in items.items():
            txn.put(k.encode(), v)
    env.close()


def depth_f16(k):
    d = np.full((H, W), 1.5 + k, np.float16)
    d[2, 2] = np.float16(3.14)
    d[:, : W // 2] += np.float16(0.25)  # left half deeper: flips are visible
    return d


def albedo(k):
    a = np.zeros((H, W, 3), np.uint8)
    a[..., 0] = np.arange(W) * 5
    a[..., 2] = 50 + k
    return a


@pytest.fixture
def bedrooms_root(tmp_path):
    root = tmp_path / "synthetic_bedrooms"
    (root / "images").mkdir(parents=True)
    meta = []
    for k, key in enumerate(KEYS):
        Image.fromarray(ramp_rgb(k)).save(root / "images" / f"{key}.png")
        row = {"file_name": f"{key}.png"}
        if k == 0:
            row["text"] = "a cosy bedroom"
        elif k == 1:
            row["text"] = ["a bed", "a lamp"]
        meta.append(json.dumps(row))
    (root / "images/metadata.jsonl").write_text("\n".join(meta) + "\n")
    n = np.broadcast_to(enc(N_FILE), (H, W, 3)).copy()
    n[:, :8] = enc(N_FILE_2)
    write_lmdb(root / "normals", {key: png_bytes(n) for key in KEYS})
    write_lmdb(root / "depth", {key: npz_bytes(depth_f16(k)) for k, key in enumerate(KEYS)})
    intr = {}
    for k, key in enumerate(KEYS):
        intr[f"{key}-r"] = png_bytes(albedo(k)) if k != 2 else npz_bytes(albedo(k).astype(np.float16) / 255)
        intr[f"{key}-s"] = png_bytes(np.full((H, W), 100 + k, np.uint8))  # single-channel shading (getintr.py)
    write_lmdb(root / "intrinsic", intr)
    seg = np.zeros((H, W), np.uint8)
    seg[:, 10:] = 7  # bed
    write_lmdb(root / "segmentation", {key: png_bytes(seg) for key in KEYS})
    return root


BEDROOM_TASKS = ("normals", "depth", "albedo", "shading", "segmentation")


def test_bedrooms_decode_png_and_npz_values(bedrooms_root):
    ds = SyntheticBedrooms(bedrooms_root, tasks=BEDROOM_TASKS, split="val")
    assert len(ds) == 3
    s = ds[0]
    assert set(s) == {"rgb", "valid_mask", "name", "prompt", "labelled", *BEDROOM_TASKS}
    assert s["name"] == "00000.png" and s["prompt"] == "a cosy bedroom" and ds[2]["prompt"] == ""
    assert ds[1]["prompt"] == "a bed"  # eval: the first caption
    assert torch.equal(s["rgb"], torch.from_numpy(ramp_rgb(0)).permute(2, 0, 1).float() / 255)
    assert s["depth"].dtype == torch.float32
    assert torch.equal(s["depth"], torch.from_numpy(depth_f16(0).astype(np.float32)))  # float16 npz, exact
    assert np.allclose(s["normals"][:, 5, 20].numpy(), canon(N_FILE), atol=1e-2)
    assert np.allclose(s["normals"][:, 5, 2].numpy(), canon(N_FILE_2), atol=1e-2)
    assert torch.equal(s["albedo"], torch.from_numpy(albedo(0)).permute(2, 0, 1).float() / 255)
    assert torch.allclose(ds[2]["albedo"], torch.from_numpy(albedo(2)).permute(2, 0, 1).float() / 255, atol=1e-3)
    assert s["shading"].shape == (3, H, W) and s["shading"].eq(100 / 255).all() and ds[1]["shading"].eq(101 / 255).all()
    assert s["segmentation"].dtype == torch.int64 and s["segmentation"][0, 12] == 7 and s["segmentation"][0, 2] == 0
    assert s["valid_mask"].all() and all(s["labelled"].values())
    train = SyntheticBedrooms(bedrooms_root, tasks=("depth",))
    prompts = set()
    for epoch in range(8):  # train: a seeded random caption of the list
        train.set_epoch(epoch)
        prompts.add(train[1]["prompt"])
    assert prompts == {"a bed", "a lamp"}


def test_bedrooms_flip_everything_but_normals(bedrooms_root):
    plain = SyntheticBedrooms(bedrooms_root, tasks=("depth", "albedo"))
    aug = SyntheticBedrooms(bedrooms_root, tasks=("depth", "albedo"), hflip=True)
    seen = set()
    for epoch in range(4):
        aug.set_epoch(epoch)
        for i in range(3):
            a, p = aug[i], plain[i]
            f = not torch.equal(a["rgb"], p["rgb"])
            seen.add(f)
            if f:
                assert torch.equal(a["rgb"], p["rgb"].flip(-1)) and torch.equal(a["depth"], p["depth"].flip(-1))
                assert torch.equal(a["albedo"], p["albedo"].flip(-1))
    assert seen == {True, False}
    no_flip = SyntheticBedrooms(bedrooms_root, tasks=("normals", "depth"), hflip=True)
    ref = SyntheticBedrooms(bedrooms_root, tasks=("normals", "depth"))
    for epoch in range(4):
        no_flip.set_epoch(epoch)
        for i in range(3):
            a, r = no_flip[i], ref[i]
            assert torch.equal(a["rgb"], r["rgb"]) and torch.equal(a["normals"], r["normals"])


def test_bedrooms_lmdb_in_worker_processes(bedrooms_root):
    ds = SyntheticBedrooms(bedrooms_root, tasks=("depth", "shading"), split="val")
    ds[0]  # opened in the parent first: the workers must open their own environments
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    batches = list(loader)
    assert [b["depth"].shape[0] for b in batches] == [2, 1]
    assert torch.equal(batches[1]["depth"][0], torch.from_numpy(depth_f16(2).astype(np.float32)))
    assert batches[0]["name"] == ["00000.png", "00001.png"]


def test_bedrooms_layout_errors_and_corrupt_values(bedrooms_root, tmp_path):
    with pytest.raises(DatasetLayoutError, match="nowhere"):
        SyntheticBedrooms(tmp_path / "nowhere")
    with pytest.raises(DatasetLayoutError, match="intrinsic/data.mdb"):
        SyntheticBedrooms(bedrooms_root, tasks=("albedo",), target_dbs={"albedo": tmp_path / "intrinsic"})
    write_lmdb(tmp_path / "partial", {"00000": npz_bytes(depth_f16(0))})
    with pytest.raises(DatasetLayoutError, match="no key '00001'"):
        SyntheticBedrooms(bedrooms_root, tasks=("depth",), target_dbs={"depth": tmp_path / "partial"})
    write_lmdb(tmp_path / "corrupt", {k: b"\x89PNG\r\n\x1a\ngarbage" for k in KEYS})
    ds = SyntheticBedrooms(bedrooms_root, tasks=("normals",), target_dbs={"normals": tmp_path / "corrupt"})
    with pytest.raises(DataReadError, match=r"corrupt \[00001\]"):
        ds[1]
    with pytest.raises(ValueError, match="provides"):
        SyntheticBedrooms(bedrooms_root, tasks=("edges",))
    (bedrooms_root / "images/00001.png").unlink()
    with pytest.raises(DatasetLayoutError, match="images/00001.png"):
        SyntheticBedrooms(bedrooms_root)


# ----------------------------------------------------------------------------- Hydra configs


@pytest.mark.parametrize("name", ["pascal_context", "nyud", "synthetic_bedrooms"])
def test_dataset_config_composes_and_builds_the_train_split(name, pascal_root, nyud_root, bedrooms_root):
    from conftest import ROOT
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    data_dir = pascal_root.parent
    assert nyud_root.parent == data_dir and bedrooms_root.parent == data_dir
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose(config_name="train", overrides=[f"dataset={name}", "task=normals", f"paths.data_dir={data_dir}",
                                                      "paths.root_dir=/repo"])
    assert cfg.dataset.name == name
    ds = instantiate(cfg.dataset.train, _convert_="all")
    s = ds[0]
    assert s["normals"].shape[0] == 3 and s["labelled"] == {"normals": torch.tensor(True)}
    assert s["rgb"].shape[1:] == s["valid_mask"].shape


@pytest.mark.parametrize("name, task, sizes", [
    ("nyud", "depth", ["+dataset.train.crop_size=[32,48]", "+dataset.train.pad_size=[32,48]",
                       "+dataset.val.pad_size=[32,48]"]),
    ("pascal_context", "normals", ["+dataset.train.crop_size=[32,48]", "+dataset.train.pad_size=[32,48]",
                                   "+dataset.val.pad_size=[32,48]"]),
    ("synthetic_bedrooms", "normals", []),
])
def test_quickstart_trains_two_steps_from_each_fixture(name, task, sizes, pascal_root, nyud_root, bedrooms_root,
                                                       tmp_path):
    """The real CLI on each real-layout fixture: two optimizer steps and a validation, metrics written."""
    from conftest import FAST, read_metrics, run_cli

    fast = [o for o in FAST if "num_scenes" not in o]  # those are procedural's
    run = tmp_path / "run"
    val = [f"dataset.val.root={bedrooms_root}"] if name == "synthetic_bedrooms" else []  # the fixture has one split
    run_cli("train.py", "experiment=quickstart", f"dataset={name}", f"task={task}",
            f"paths.data_dir={pascal_root.parent}", "dataset.num_workers=0", "logger=csv", f"hydra.run.dir={run}",
            *fast, *sizes, *val)
    assert ("abs_rel" if task == "depth" else "angular_mean") in read_metrics(run)
