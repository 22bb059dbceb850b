"""Procedural scenes: geometry against hand-computed answers, invariants of the ground truth, the dataset contract."""

import copy
import math

import numpy as np
import pytest
import torch

from densediff.data import procedural
from densediff.data.procedural import (
    CLASS_NAMES,
    ProceduralScenes,
    colour_name,
    describe_scene,
    render_scene,
    render_scene_from_params,
    sample_scene_params,
)


def controlled(position, yaw=0.0, pitch=0.0, roll=0.0, hfov_deg=60.0, room=(4.0, 3.0, 6.0), objects=()):
    """A random scene's materials and light, with the room, camera and furniture set by hand."""
    params = copy.deepcopy(procedural.sample_scene_params(0))
    params["room"] = np.array(room)
    params["camera"] = {"position": np.array(position, float), "yaw": yaw, "pitch": pitch, "roll": roll,
                        "hfov_deg": hfov_deg}
    material = params["floor"]
    params["objects"] = [{**o, "material": material} for o in objects]
    return params


def test_class_names():
    assert CLASS_NAMES == ("wall", "floor", "ceiling", "box", "sphere", "cylinder")


def test_camera_facing_wall_head_on():
    # 1 m in front of the wall z = 0, looking straight at it (yaw 0 looks along -z): the wall fills the image
    s = render_scene_from_params(controlled((2.0, 1.5, 1.0)), 24, 32)
    assert (s["instance"] == 2).all() and (s["segmentation"] == CLASS_NAMES.index("wall")).all()
    np.testing.assert_allclose(s["depth"], 1.0, atol=1e-5)
    np.testing.assert_allclose(s["normals"], np.broadcast_to([0, 0, 1], s["normals"].shape), atol=1e-6)
    assert not s["saliency"].any() and not s["edges"].any()


def test_planar_depth_constant_on_fronto_parallel_wall():
    # 4 m away the floor and ceiling show too; on the wall the planar depth is 4 everywhere, although the rays to the
    # image corners are ~20% longer than the one through the centre
    s = render_scene_from_params(controlled((3.0, 1.5, 4.0), room=(6.0, 3.0, 6.0)), 48, 64)
    wall = s["instance"] == 2
    assert wall[24].all() and not wall.all()
    np.testing.assert_allclose(s["depth"][wall], 4.0, rtol=1e-6)
    np.testing.assert_allclose(s["normals"][wall], np.broadcast_to([0, 0, 1], (wall.sum(), 3)), atol=1e-6)


def test_level_camera_floor_normal_and_depth():
    h, w, cam_height = 48, 64, 1.2
    s = render_scene_from_params(controlled((4.0, cam_height, 4.0), yaw=0.7, room=(8.0, 3.0, 8.0)), h, w)
    floor = s["segmentation"] == CLASS_NAMES.index("floor")
    assert floor[-1].all() and not floor[0].any()
    np.testing.assert_allclose(s["normals"][floor], np.broadcast_to([0, 1, 0], (floor.sum(), 3)), atol=1e-6)
    # a ray through row v descends (v + 0.5 - cy) / fy per metre of planar depth and meets the floor at cam_height
    K = s["intrinsics"]
    rows = np.broadcast_to(np.arange(h)[:, None], (h, w))[floor]
    np.testing.assert_allclose(s["depth"][floor], cam_height * K[1, 1] / (rows + 0.5 - K[1, 2]), rtol=1e-5)
    # a level camera sees the ceiling with normal (0, -1, 0)
    ceiling = s["segmentation"] == CLASS_NAMES.index("ceiling")
    assert ceiling.any()
    np.testing.assert_allclose(s["normals"][ceiling], np.broadcast_to([0, -1, 0], (ceiling.sum(), 3)), atol=1e-6)


def test_intrinsics():
    s = render_scene_from_params(controlled((2.0, 1.5, 3.0), hfov_deg=90.0), 30, 40)
    np.testing.assert_allclose(s["intrinsics"], [[20, 0, 20], [0, 20, 15], [0, 0, 1]], atol=1e-5)


@pytest.fixture(scope="module")
def scenes():
    return [render_scene(seed, 48, 64) for seed in range(6)]


def test_output_contract(scenes):
    for s in scenes:
        assert s["rgb"].shape == s["albedo"].shape == s["shading"].shape == s["normals"].shape == (48, 64, 3)
        for key in ("rgb", "albedo", "shading", "depth", "normals", "intrinsics"):
            assert s[key].dtype == np.float32, key
        assert s["segmentation"].dtype == s["instance"].dtype == np.int64
        assert s["edges"].dtype == s["saliency"].dtype == bool
        assert (s["rgb"] == s["albedo"] * s["shading"]).all()  # exactly, by construction
        for key in ("rgb", "albedo", "shading"):
            assert s[key].min() >= 0 and s[key].max() <= 1, key
        assert (s["depth"] > 0).all() and np.isfinite(s["depth"]).all()
        np.testing.assert_allclose(np.linalg.norm(s["normals"], axis=-1), 1, atol=1e-5)
        assert s["segmentation"].min() >= 0 and s["segmentation"].max() < len(CLASS_NAMES)
        np.testing.assert_array_equal(s["saliency"], s["segmentation"] >= CLASS_NAMES.index("box"))
    assert any(s["saliency"].any() for s in scenes)  # furniture is usually in view


def _camera_points(s):
    """Back-project planar depth to camera-frame points (camera looks along -z)."""
    h, w = s["depth"].shape
    K = s["intrinsics"]
    x = (np.arange(w) + 0.5 - K[0, 2]) / K[0, 0]
    y = -(np.arange(h) + 0.5 - K[1, 2]) / K[1, 1]
    rays = np.stack(np.broadcast_arrays(x[None, :], y[:, None], -1.0), -1)
    return s["depth"][..., None].astype(np.float64) * rays, rays


def test_normals_face_camera_and_match_depth(scenes):
    for s in scenes:
        points, rays = _camera_points(s)
        assert ((s["normals"] * rays).sum(-1) < 0).all()
        # the normal of the surface the depth map describes (central differences), where a pixel and its four
        # neighbours lie on one surface; box edges inside one instance are the only outliers
        n = np.cross(points[1:-1, 2:] - points[1:-1, :-2], points[:-2, 1:-1] - points[2:, 1:-1])
        n /= np.linalg.norm(n, axis=-1, keepdims=True)
        inst = s["instance"]
        same = ((inst[1:-1, 1:-1] == inst[1:-1, 2:]) & (inst[1:-1, 1:-1] == inst[1:-1, :-2])
                & (inst[1:-1, 1:-1] == inst[2:, 1:-1]) & (inst[1:-1, 1:-1] == inst[:-2, 1:-1]))
        cos = np.abs((n * s["normals"][1:-1, 1:-1]).sum(-1))[same]
        angle = np.degrees(np.arccos(np.clip(cos, -1, 1)))
        assert np.median(angle) < 0.5 and np.percentile(angle, 95) < 5, (np.median(angle), np.percentile(angle, 95))


def test_edges_are_instance_boundaries(scenes):
    for s in scenes:
        inst, edges = s["instance"], s["edges"]
        # every pair of neighbours on different instances has its nearer pixel marked ...
        right = inst[:, :-1] != inst[:, 1:]
        down = inst[:-1] != inst[1:]
        assert (edges[:, :-1] | edges[:, 1:])[right].all() and (edges[:-1] | edges[1:])[down].all()
        # ... and nothing else is
        touches = np.zeros_like(edges)
        touches[:, :-1] |= right
        touches[:, 1:] |= right
        touches[:-1] |= down
        touches[1:] |= down
        assert not (edges & ~touches).any()


def test_hard_shadow_of_a_sphere():
    # light above and behind a sphere; floor points whose segment to the light passes through the sphere get ambient
    params = controlled((2.0, 1.6, 5.5), pitch=math.radians(-35),
                        objects=[{"kind": "sphere", "center": np.array([2.0, 0.4, 2.5]), "radius": 0.4, "yaw": 0.0}])
    light = params["light"]
    light.update(position=np.array([2.0, 2.8, 1.5]), ambient=0.2, falloff=10.0)
    s = render_scene_from_params(params, 48, 64)
    floor = s["segmentation"] == CLASS_NAMES.index("floor")
    points, _ = _camera_points(s)
    R = procedural.camera_to_world(params["camera"])
    world = points[floor] @ R.T + params["camera"]["position"]
    # distance from the sphere's centre to the segment floor point -> light
    seg = light["position"] - world
    c = np.array([2.0, 0.4, 2.5])
    u = np.clip(((c - world) * seg).sum(-1) / (seg * seg).sum(-1), 0, 1)
    dist = np.linalg.norm(world + u[:, None] * seg - c, axis=-1)
    ambient_only = np.isclose(s["shading"][floor], 0.2 * np.asarray(light["colour"]), atol=1e-6).all(-1)
    assert ambient_only.sum() > 10  # the shadow is in view
    np.testing.assert_array_equal(ambient_only[np.abs(dist - 0.4) > 0.01], (dist < 0.4)[np.abs(dist - 0.4) > 0.01])


def test_deterministic_and_seed_dependent():
    a, b, c = render_scene(7, 24, 32), render_scene(7, 24, 32), render_scene(8, 24, 32)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["rgb"], c["rgb"]) and not np.array_equal(a["depth"], c["depth"])


def test_same_scene_at_two_resolutions():
    for seed in (1, 2):
        lo, hi = render_scene(seed, 32, 40), render_scene(seed, 64, 80)
        np.testing.assert_allclose(hi["intrinsics"][:2], 2 * lo["intrinsics"][:2], rtol=1e-6)
        pooled = hi["depth"].reshape(32, 2, 40, 2).mean((1, 3))
        rel = np.abs(pooled - lo["depth"]) / lo["depth"]
        assert np.median(rel) < 0.01 and (rel > 0.05).mean() < 0.1
        # the segmentation map agrees except along boundaries
        assert (hi["segmentation"][::2, ::2] == lo["segmentation"]).mean() > 0.9


def test_dataset_item():
    ds = ProceduralScenes("val", num_scenes=5, height=24, width=32, seed=1)
    assert len(ds) == 5
    item = ds[2]
    assert item["name"] == "procedural/val/000002"
    assert item["rgb"].shape == item["normals"].shape == item["albedo"].shape == item["shading"].shape == (3, 24, 32)
    for key in ("depth", "valid_mask", "segmentation", "edges", "saliency"):
        assert item[key].shape == (24, 32), key
    assert item["intrinsics"].shape == (3, 3)
    assert item["valid_mask"].dtype == torch.bool and item["valid_mask"].all()
    assert item["segmentation"].dtype == torch.int64
    for key in ("rgb", "depth", "normals", "albedo", "shading", "edges", "saliency", "intrinsics"):
        assert item[key].dtype == torch.float32, key
    assert set(item["edges"].unique().tolist()) <= {0.0, 1.0}
    scene = render_scene(ds.scene_seed(2), 24, 32)
    np.testing.assert_array_equal(item["rgb"].permute(1, 2, 0).numpy(), scene["rgb"])
    np.testing.assert_array_equal(item["depth"].numpy(), scene["depth"])
    assert torch.equal(ds[-1]["rgb"], ds[4]["rgb"])
    with pytest.raises(IndexError):
        ds[5]


def test_dataset_tasks_filter():
    item = ProceduralScenes(num_scenes=2, height=16, width=16, tasks=("depth",))[0]
    assert set(item) == {"rgb", "valid_mask", "name", "relative_path", "intrinsics", "prompt", "depth"}


def test_splits_are_disjoint():
    seeds = {split: {ProceduralScenes(split, num_scenes=1000).scene_seed(i) for i in range(1000)}
             for split in ("train", "val", "test")}
    assert not seeds["train"] & seeds["val"] and not seeds["train"] & seeds["test"] and not seeds["val"] & seeds["test"]
    other = {ProceduralScenes("train", num_scenes=1000, seed=1).scene_seed(i) for i in range(1000)}
    assert not other & set().union(*seeds.values())
    train, val = ProceduralScenes("train", 1, 16, 16)[0], ProceduralScenes("val", 1, 16, 16)[0]
    assert not torch.equal(train["rgb"], val["rgb"])


@pytest.mark.parametrize("kwargs", [dict(split="validation"), dict(num_scenes=0), dict(height=4), dict(width=7),
                                    dict(tasks=("depht",))])
def test_dataset_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="procedural"):
        ProceduralScenes(**kwargs)


def test_main_writes_mosaic(tmp_path, monkeypatch):
    from PIL import Image

    out = tmp_path / "scene.png"
    monkeypatch.setattr("sys.argv", ["procedural", "--seed", "3", "--height", "24", "--width", "32", "--out", str(out)])
    procedural.main()
    assert Image.open(out).size == (4 * 32, 2 * 24)


# ----------------------------------------------------------------------------- captions


def coloured(material, rgb, pattern="plain"):
    return {**material, "colour": np.array(rgb), "pattern": pattern}


def test_colour_names_from_the_palette():
    for name, rgb in procedural.COLOUR_NAMES.items():
        assert colour_name(rgb) == name
    assert colour_name((0.1, 0.13, 0.36)) == "blue"  # dark blue is blue, not black or purple
    assert colour_name((0.95, 0.1, 0.05)) == "red" and colour_name((0.2, 0.7, 0.2)) == "green"
    assert colour_name((0.02, 0.02, 0.02)) == "black" and colour_name((1.0, 1.0, 1.0)) == "white"


def test_caption_describes_a_known_scene():
    # camera at z = 5 looking along -z: a red sphere 2 m ahead in the middle, a blue box 4 m ahead on the left
    sphere = {"kind": "sphere", "center": np.array([2.0, 0.5, 3.0]), "radius": 0.5, "yaw": 0.0}
    box = {"kind": "box", "center": np.array([0.8, 0.4, 1.0]), "half": np.array([0.3, 0.4, 0.3]), "yaw": 0.0}
    params = controlled((2.0, 1.5, 5.0), pitch=-0.2, objects=(sphere, box))
    params["walls"] = [coloured(params["walls"][0], (0.8, 0.72, 0.58), "stripes")] * 4
    params["floor"] = coloured(params["floor"], (0.45, 0.3, 0.18), "checker")
    params["objects"][0]["material"] = coloured(params["floor"], (0.8, 0.1, 0.1))
    params["objects"][1]["material"] = coloured(params["floor"], (0.2, 0.3, 0.8))
    s = render_scene_from_params(params, 48, 64)
    expected = "beige striped walls, brown checked floor, red sphere near centre, blue box far left"
    assert describe_scene(params, s) == expected
    # without the sphere the caption has no sphere, and a second wall paint that covers enough of the view is named
    params["objects"] = params["objects"][1:]
    params["walls"] = params["walls"][:2] + [coloured(params["walls"][0], (0.3, 0.4, 0.75))] + params["walls"][3:]
    caption = describe_scene(params, render_scene_from_params(params, 48, 64))
    assert "sphere" not in caption and "blue box far left" in caption
    assert caption.startswith("blue and beige striped walls")


def test_caption_mentions_exactly_the_visible_objects():
    for seed in range(40):
        params = sample_scene_params(seed)
        s = render_scene_from_params(params, 32, 40)
        caption = describe_scene(params, s)
        assert caption == describe_scene(sample_scene_params(seed), render_scene(seed, 32, 40))  # deterministic
        seen = {CLASS_NAMES[c] for c in np.unique(s["segmentation"])}
        area = np.bincount(s["instance"].ravel(), minlength=6 + len(params["objects"])) / s["instance"].size
        large = {obj["kind"] for k, obj in enumerate(params["objects"]) if area[6 + k] >= procedural.MIN_OBJECT_AREA}
        for kind in ("box", "sphere", "cylinder"):
            assert (kind in caption) == (kind in large), (seed, caption)
            if kind in caption:
                assert kind in seen
        assert caption.count(",") + 1 == ("wall" in seen) + ("floor" in seen) + sum(
            area[6:] >= procedural.MIN_OBJECT_AREA)


def test_every_sample_has_a_caption():
    a, b = ProceduralScenes("val", num_scenes=6, height=24, width=32, tasks=()), ProceduralScenes("val", 6, 24, 32)
    prompts = [a[i]["prompt"] for i in range(6)]
    assert all(isinstance(p, str) and p for p in prompts)
    assert prompts == [b[i]["prompt"] for i in range(6)]  # same seed and index, same caption, whatever the tasks
    assert len(set(prompts)) == 6
    batch = torch.utils.data.default_collate([a[0], a[1]])
    assert batch["prompt"] == prompts[:2]  # collated as a list of str, what the text-conditioned paradigms take
