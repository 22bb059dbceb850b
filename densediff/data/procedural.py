"""Procedural indoor scenes: the embedded default dataset.

A vectorised numpy ray caster renders a random box room (4 walls, floor, ceiling) with 2-6 furniture primitives
(yaw-rotated boxes, spheres, vertical cylinders), procedural solid textures and one point light with hard shadows, and
returns exact ground truth for every task: planar depth, canonical normals, albedo, shading (rgb == albedo * shading),
segmentation (semantic class) and instance ids, edges and saliency. `describe_scene` captions the picture from its own
contents (wall and floor colours and textures, the visible objects' colours, kinds and rough positions); every dataset
sample carries that caption as `prompt`.

Everything about a scene (room, camera, objects, colours, light) is drawn from `seed` by `sample_scene_params`, before
any pixel exists, so one seed is one picture at every resolution. `render_scene_from_params` turns those plain
parameters into images; tests build their own parameters to get scenes with known answers.

World frame: y up, the room spans [0, W] x [0, H] x [0, D]. Camera frame (the package's canonical one): x right, y up,
z toward the viewer, so the camera looks along -z.
"""

import argparse
import colorsys
import math

import numpy as np
import torch

from densediff.tasks.palettes import PROCEDURAL_CLASSES

CLASS_NAMES = PROCEDURAL_CLASSES  # kept with their palette: the tasks never import the data
WALL, FLOOR, CEILING, BOX, SPHERE, CYLINDER = range(len(CLASS_NAMES))
PATTERNS = ("plain", "checker", "stripes", "noise")
TASKS = ("depth", "normals", "albedo", "shading", "segmentation", "edges", "saliency", "residual", "material")
SPLITS = ("train", "val", "test")
SCENES_PER_SPLIT = 10**7  # seed-space stride between splits; makes split seed ranges disjoint by construction

# room surfaces are instances 0..5 (walls x=0, x=W, z=0, z=D, then floor, ceiling); object k is instance 6 + k
_ROOM_NORMALS = np.array([[1, 0, 0], [-1, 0, 0], [0, 0, 1], [0, 0, -1], [0, 1, 0], [0, -1, 0]], np.float32)
_ROOM_CLASSES = (WALL, WALL, WALL, WALL, FLOOR, CEILING)
_KIND_CLASS = {"box": BOX, "sphere": SPHERE, "cylinder": CYLINDER}
_T_MIN = 1e-4  # nearest accepted hit along a ray; the rays are not unit length but are ~1 long, so this is ~0.1 mm
_SHADOW_OFFSET = 1e-3  # shadow rays start 1 mm off the surface so they do not hit it again through round-off


# ----------------------------------------------------------------------------- scene parameters


def _rot_x(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _rot_y(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rot_z(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def camera_to_world(camera):
    """Rotation taking camera-frame vectors to the world: yaw about world up, pitch (positive looks up), then roll."""
    return _rot_y(camera["yaw"]) @ _rot_x(camera["pitch"]) @ _rot_z(camera["roll"])


def _lerp(lo_hi, u):
    return lo_hi[0] + (lo_hi[1] - lo_hi[0]) * u


def _pick(u, probs):
    """Index drawn with the given probabilities from one uniform number u (rng.choice with p= is ~10x slower)."""
    i, acc = 0, probs[0]
    while u > acc and i < len(probs) - 1:
        i, acc = i + 1, acc + probs[i + 1]
    return i


def sample_material(rng, value=(0.25, 0.95), saturation=(0.05, 0.75), pattern_p=(0.3, 0.25, 0.2, 0.25)):
    """A base colour, a second colour the texture blends toward, and every pattern parameter. Two bulk draws, the same
    whatever the pattern, so that the draws after this one do not depend on it (and because scalar draws are slow)."""
    u, g = rng.random(20), rng.normal(size=(5, 3))
    colour = np.array(colorsys.hsv_to_rgb(u[0], _lerp(saturation, u[1]), _lerp(value, u[2])))
    other = np.array(colorsys.hsv_to_rgb(u[3], _lerp(saturation, u[4]), _lerp(value, u[5])))
    # the second colour is usually a darker/lighter shade of the first (wood grain, tiles), sometimes another hue
    shade = np.minimum(colour * _lerp((0.45, 1.4), u[6]), 1)
    # stripes mostly follow the room's axes (wallpaper, floorboards), sometimes run diagonally
    direction = np.eye(3)[int(3 * u[8])] if u[9] < 0.7 else _unit(g[4])
    return {
        "pattern": PATTERNS[_pick(u[10], pattern_p)],
        "colour": colour,
        "colour2": other if u[7] < 0.3 else shade,
        "scale": _lerp((0.1, 0.6), u[11]),  # texture period in metres
        "direction": direction,
        "waves": g[:4] * _lerp((0.5, 2.0), u[12:16, None]),  # noise: a few random plane waves, cycles per period
        "phases": 2 * math.pi * u[16:20],
    }


def _unit(v):
    return v / np.linalg.norm(v)


def sample_scene_params(seed):
    """All the randomness of a scene, as plain numbers and small arrays. Depends only on the seed."""
    rng = np.random.default_rng(seed)
    W, H, D = rng.uniform(3, 8), rng.uniform(2.4, 3.5), rng.uniform(3, 8)
    position = np.array([rng.uniform(0.5, W - 0.5), rng.uniform(1.0, min(1.9, H - 0.5)), rng.uniform(0.5, D - 0.5)])
    # look roughly toward the middle of the room, as a photographer would, not at a wall half a metre away
    to_middle = np.array([W / 2, D / 2]) - position[[0, 2]]
    camera = {
        "position": position,
        "yaw": math.atan2(-to_middle[0], -to_middle[1]) + math.radians(rng.uniform(-50, 50)),
        "pitch": math.radians(rng.uniform(-20, 5)),  # people mostly look level or slightly down at a room
        "roll": math.radians(rng.uniform(-4, 4)),
        "hfov_deg": rng.uniform(55, 75),
    }
    wall = sample_material(rng, saturation=(0.05, 0.5))
    shared_walls = rng.random() < 0.6  # real rooms mostly have one paint for all walls
    walls = [wall if shared_walls else sample_material(rng, saturation=(0.05, 0.5)) for _ in range(4)]
    floor = sample_material(rng, value=(0.2, 0.8), pattern_p=(0.2, 0.35, 0.3, 0.15))
    ceiling = sample_material(rng, value=(0.7, 0.95), saturation=(0, 0.2), pattern_p=(0.7, 0.1, 0.1, 0.1))
    light = {
        "position": np.array([rng.uniform(0.3, W - 0.3), rng.uniform(H - 0.5, H - 0.2), rng.uniform(0.3, D - 0.3)]),
        "colour": (c := 1 - rng.uniform(0, 0.25, size=3)) / c.max(),  # white, warm or cool, brightest channel 1
        "ambient": rng.uniform(0.12, 0.35),
        "falloff": rng.uniform(2.5, 5.0),  # full strength up to this distance, inverse-square beyond
    }
    objects = []
    cam_xz = camera["position"][[0, 2]]
    max_height = min(2.0, H - 0.8)  # keeps every object below the light
    for _ in range(rng.integers(2, 7)):
        kind = ("box", "sphere", "cylinder")[_pick(rng.random(), (0.5, 0.25, 0.25))]
        if kind == "box":
            half = np.array([rng.uniform(0.15, 0.75), rng.uniform(0.3, max_height) / 2, rng.uniform(0.15, 0.75)])
            obj = {"half": half, "yaw": 0.0 if rng.random() < 0.4 else rng.uniform(0, math.pi / 2)}
            footprint, y = math.hypot(half[0], half[2]), half[1]
        elif kind == "sphere":
            r = rng.uniform(0.15, 0.6)
            obj = {"radius": r, "yaw": rng.uniform(0, 2 * math.pi)}
            footprint, y = r, r
        else:
            r, h = rng.uniform(0.1, 0.5), rng.uniform(0.3, max_height)
            obj = {"radius": r, "height": h, "yaw": rng.uniform(0, 2 * math.pi)}
            footprint, y = r, h / 2
        # most objects go into the view cone so that scenes are not empty rooms; the rest anywhere in the room
        for _ in range(20):
            if rng.random() < 0.8:
                a = camera["yaw"] + rng.uniform(-0.45, 0.45) * math.radians(camera["hfov_deg"])
                ray = np.array([-math.sin(a), -math.cos(a)])  # the camera's forward direction is (-sin yaw, -cos yaw)
                with np.errstate(divide="ignore"):
                    to_wall = np.where(ray > 0, ([W, D] - cam_xz) / ray, -cam_xz / ray).min()
                xz = cam_xz + rng.uniform(footprint + 0.8, max(footprint + 1.0, to_wall)) * ray
            else:
                xz = rng.uniform(0, 1, size=2) * [W, D]
            xz = np.clip(xz, footprint + 0.02, np.array([W, D]) - footprint - 0.02)
            if np.linalg.norm(xz - cam_xz) > footprint + 0.7:  # no camera inside or right against an object
                center = np.array([xz[0], y, xz[1]])
                objects.append({"kind": kind, "center": center, **obj, "material": sample_material(rng)})
                break
    return {"room": np.array([W, H, D]), "camera": camera, "walls": walls, "floor": floor, "ceiling": ceiling,
            "light": light, "objects": objects}


def intrinsics(camera, height, width):
    """Pinhole K in pixels; square pixels, principal point at the image centre (pixel centres at +0.5)."""
    f = 0.5 * width / math.tan(0.5 * math.radians(camera["hfov_deg"]))
    return np.array([[f, 0, 0.5 * width], [0, f, 0.5 * height], [0, 0, 1]], np.float32)


# ----------------------------------------------------------------------------- ray-primitive intersections
# Vectors are stored channels-first, (3, N): numpy reduces over a short leading axis much faster than over a trailing
# one. o: (3, 1) or (3, N) ray origins, d: (3, N) directions (not unit). Each returns t (N,), +inf where the ray misses.
# Rays never start inside an object (camera placement and shadow offsets see to that), so only the entry hit matters.


def _object_frame(obj):
    return np.asarray(obj["center"], np.float32)[:, None], _rot_y(obj["yaw"]).astype(np.float32)


def _hit_box(o, d, obj):
    c, R = _object_frame(obj)
    h = np.asarray(obj["half"], np.float32)[:, None]
    ol, dl = R.T @ (o - c), R.T @ d  # into the box frame, where it is an axis-aligned box around the origin
    with np.errstate(divide="ignore", invalid="ignore"):  # slab method; 1/0 = inf does the right thing
        inv = 1 / dl
        t1, t2 = (-h - ol) * inv, (h - ol) * inv
    near, far = np.minimum(t1, t2).max(0), np.maximum(t1, t2).min(0)
    return np.where((near <= far) & (near > _T_MIN), near, np.inf)


def _hit_sphere(o, d, obj):
    oc = o - np.asarray(obj["center"], np.float32)[:, None]
    a, b, c = (d * d).sum(0), (oc * d).sum(0), (oc * oc).sum(0) - np.float32(obj["radius"]) ** 2
    disc = b * b - a * c
    t = (-b - np.sqrt(np.maximum(disc, 0))) / a
    return np.where((disc >= 0) & (t > _T_MIN), t, np.inf)


def _hit_cylinder(o, d, obj):
    c = obj["center"]
    r, h = np.float32(obj["radius"]), np.float32(obj["height"])
    ox, oy, oz = o[0] - np.float32(c[0]), o[1], o[2] - np.float32(c[2])
    a, b, cc = d[0] * d[0] + d[2] * d[2], ox * d[0] + oz * d[2], ox * ox + oz * oz - r * r
    disc = b * b - a * cc
    with np.errstate(divide="ignore", invalid="ignore"):
        t_side = (-b - np.sqrt(np.maximum(disc, 0))) / a
        t_top = (h - oy) / d[1]
    y = oy + t_side * d[1]
    t_side = np.where((disc >= 0) & (t_side > _T_MIN) & (y >= 0) & (y <= h), t_side, np.inf)
    x, z = ox + t_top * d[0], oz + t_top * d[2]
    t_top = np.where((t_top > _T_MIN) & (x * x + z * z <= r * r), t_top, np.inf)
    return np.minimum(t_side, t_top)  # the bottom cap lies on the floor and can never be seen or cast a shadow


_HIT = {"box": _hit_box, "sphere": _hit_sphere, "cylinder": _hit_cylinder}


def _object_normal(q, obj):
    """Outward normal (3, M) in the object's frame at surface points q (3, M) given in that frame (centre at 0)."""
    if obj["kind"] == "box":
        face = np.abs(q / np.asarray(obj["half"], np.float32)[:, None]).argmax(0)  # the slab the point sits on
        n = np.zeros_like(q)
        cols = np.arange(q.shape[1])
        n[face, cols] = np.sign(q[face, cols])
        return n
    if obj["kind"] == "sphere":
        return q / np.float32(obj["radius"])
    # cylinder: top cap where the point is at the top (1 mm tolerance covers round-off), side elsewhere
    n = q * np.array([[1], [0], [1]], np.float32) / np.float32(obj["radius"])
    n[:, q[1] > 0.5 * obj["height"] - 1e-3] = [[0], [1], [0]]
    return n


# ----------------------------------------------------------------------------- shading and textures


def _texture(q, m):
    """Blend weight (M,) in [0, 1] of a solid (3D) texture at points q (3, M) in metres. Solid textures need no UV
    unwrapping and stay continuous across a box's edges."""
    s = np.float32(m["scale"])
    if m["pattern"] == "checker":
        return (np.floor(q / s).sum(0) % 2).astype(np.float32)
    if m["pattern"] == "stripes":
        return ((np.asarray(m["direction"], np.float32) @ q / s) % 1 < 0.5).astype(np.float32)
    if m["pattern"] == "noise":
        waves = np.asarray(m["waves"], np.float32) * np.float32(2 * math.pi) / s
        return 0.5 + 0.5 * np.sin(waves @ q + np.asarray(m["phases"], np.float32)[:, None]).mean(0)
    return np.zeros(q.shape[1], np.float32)


def _albedo(q, n, m):
    # step 1 mm into the surface first: a wall that lies exactly on a checker cell boundary would otherwise speckle
    w = _texture(q - np.float32(1e-3) * n, m)
    c1, c2 = np.asarray(m["colour"], np.float32)[:, None], np.asarray(m["colour2"], np.float32)[:, None]
    return (1 - w) * c1 + w * c2


def _edges(instance, depth):
    """One pixel wide boundaries between instances, drawn on the nearer side (the occluding contour). Every instance
    is convex and the room is convex, so every depth discontinuity is also an instance boundary."""
    edges = np.zeros(instance.shape, bool)
    for a, b in (((slice(None, -1), slice(None)), (slice(1, None), slice(None))),  # vertical neighbours
                 ((slice(None), slice(None, -1)), (slice(None), slice(1, None)))):  # horizontal neighbours
        differ = instance[a] != instance[b]
        first_nearer = depth[a] <= depth[b]
        edges[a] |= differ & first_nearer
        edges[b] |= differ & ~first_nearer
    return edges


# ----------------------------------------------------------------------------- rendering


def render_scene_from_params(params, height, width):
    """Ray cast the scene described by `params` (see sample_scene_params) at height x width, one ray per pixel."""
    cam = params["camera"]
    K = intrinsics(cam, height, width)
    R = camera_to_world(cam).astype(np.float32)
    # camera-frame ray through each pixel centre, scaled so that its z component is -1: the hit distance t along it is
    # then exactly the planar depth, with no per-pixel division
    x = (np.arange(width, dtype=np.float32) + 0.5 - K[0, 2]) / K[0, 0]
    y = -(np.arange(height, dtype=np.float32) + 0.5 - K[1, 2]) / K[1, 1]
    d_cam = np.empty((3, height, width), np.float32)
    d_cam[0], d_cam[1], d_cam[2] = x[None, :], y[:, None], -1
    d = R @ d_cam.reshape(3, -1)
    o = np.asarray(cam["position"], np.float32)[:, None]
    cols = np.arange(d.shape[1])

    # the room: the camera is inside a box, so each ray leaves through the nearest of the three faces it heads toward;
    # per axis that face is the farther of the two planes (the other lies behind, at negative t; 1/0 gives +inf)
    room = np.asarray(params["room"], np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1 / d
        t_axes = np.maximum((room - o) * inv, -o * inv)
    axis = t_axes.argmin(0)
    depth = t_axes[axis, cols]
    instance = np.array([[0, 1], [4, 5], [2, 3]])[axis, (d[axis, cols] > 0).astype(int)]  # (axis, sign) -> surface
    # furniture: keep the nearest hit
    objects = params["objects"]
    for k, obj in enumerate(objects):
        t = _HIT[obj["kind"]](o, d, obj)
        closer = t < depth
        depth = np.where(closer, t, depth)
        instance = np.where(closer, 6 + k, instance)
    p = o + depth * d

    # normals, texture and class per surface: a handful of surfaces, each a boolean mask over the pixels
    materials = params["walls"] + [params["floor"], params["ceiling"]] + [obj["material"] for obj in objects]
    classes = np.array(_ROOM_CLASSES + tuple(_KIND_CLASS[obj["kind"]] for obj in objects))
    normal = _ROOM_NORMALS.T[:, np.minimum(instance, 5)]  # room normals point inward, i.e. toward the camera
    albedo = np.empty_like(p)
    for i in range(len(materials)):
        m = instance == i
        if not m.any():
            continue
        if i < 6:
            albedo[:, m] = _albedo(p[:, m], normal[:, m], materials[i])
            continue
        obj = objects[i - 6]
        c, Ro = _object_frame(obj)
        q = Ro.T @ (p[:, m] - c)  # object frame, so the texture turns and moves with the object
        n_local = _object_normal(q, obj)
        normal[:, m] = Ro @ n_local
        albedo[:, m] = _albedo(q, n_local, materials[i])
    # face the camera (the room is seen from inside and objects from outside, so this only guards round-off)
    normal *= np.where((normal * d).sum(0) > 0, np.float32(-1), np.float32(1))
    normal /= np.sqrt((normal * normal).sum(0))

    # Lambertian point light with a clamped inverse-square falloff and hard shadows; the room is convex and the light
    # is inside it, so only furniture can shadow, and only pixels facing the light need a shadow ray
    light = params["light"]
    light_pos = np.asarray(light["position"], np.float32)[:, None]
    to_light = light_pos - p
    dist = np.sqrt((to_light * to_light).sum(0))
    cos = np.maximum((normal * to_light).sum(0) / dist, 0)
    lit = np.flatnonzero(cos > 0)
    if objects and len(lit):
        origin = p[:, lit] + np.float32(_SHADOW_OFFSET) * normal[:, lit]
        ray = light_pos - origin  # t in (0, 1) is between the surface and the light
        blocked = np.zeros(len(lit), bool)
        for obj in objects:
            blocked |= _HIT[obj["kind"]](origin, ray, obj) < 1
        cos[lit[blocked]] = 0
    ambient = np.float32(light["ambient"])
    diffuse = cos * np.minimum(1, (np.float32(light["falloff"]) / dist) ** 2)
    # ambient + (1 - ambient) * diffuse is in [0, 1], and so is the light colour: shading stays in [0, 1] unclipped
    shading = np.asarray(light["colour"], np.float32)[:, None] * (ambient + (1 - ambient) * diffuse)

    def hwc(a):
        return np.ascontiguousarray(a.reshape(3, height, width).transpose(1, 2, 0), dtype=np.float32)
    instance = instance.reshape(height, width).astype(np.int64)
    depth = depth.reshape(height, width).astype(np.float32)
    albedo, shading = hwc(albedo), hwc(shading)
    return {
        "rgb": albedo * shading,
        "albedo": albedo,
        "shading": shading,
        # Marigold's lighting target rgb = albedo x shading + residual: exactly zero here; the appearance target's
        # material (roughness, metallicity, 0) of these Lambertian, non-metallic surfaces: (1, 0, 0) everywhere
        "residual": np.zeros_like(albedo),
        "material": np.broadcast_to(np.array([1, 0, 0], np.float32), albedo.shape).copy(),
        "depth": depth,
        "normals": hwc(R.T @ normal),  # world -> camera frame
        "segmentation": classes[instance].astype(np.int64),
        "instance": instance,
        "edges": _edges(instance, depth),
        "saliency": instance >= 6,
        "intrinsics": K,
    }


def render_scene(seed, height, width):
    """Render the random scene of `seed`. Same seed -> bit-identical output; the scene does not depend on resolution."""
    return render_scene_from_params(sample_scene_params(seed), height, width)


# ----------------------------------------------------------------------------- camera paths (videos)

PATH_WALL_MARGIN = 0.5    # metres between the camera and any wall along a path (sample_scene_params' placement)
PATH_OBJECT_MARGIN = 0.7  # metres between the camera and an object's footprint (sample_scene_params' clearance)


def _footprint(obj):
    """Radius of an object's footprint on the floor (as sample_scene_params measures it)."""
    return math.hypot(obj["half"][0], obj["half"][2]) if obj["kind"] == "box" else obj["radius"]


def _path_clear(params, xz):
    """Whether camera positions xz (N, 2) all keep PATH_WALL_MARGIN from the walls and PATH_OBJECT_MARGIN from
    every object's footprint."""
    W, _, D = params["room"]
    inside = (xz >= PATH_WALL_MARGIN).all() and (xz <= np.array([W, D]) - PATH_WALL_MARGIN).all()
    return bool(inside) and all(
        (np.linalg.norm(xz - np.asarray(obj["center"])[[0, 2]], axis=1) > _footprint(obj) + PATH_OBJECT_MARGIN).all()
        for obj in params["objects"])


def camera_path(params, num_frames, path_seed=0, length=(0.6, 1.5), turn_deg=25.0, tries=50):
    """A smooth camera path of `num_frames` cameras through the room of `params` (sample_scene_params): frame 0 is
    the scene's own camera; the position follows a quadratic Bezier curve to an end point `length` metres away (a
    random direction, the control point off the straight line) with eased timing (0.5 - 0.5 cos(pi u): starts and
    stops gently), the yaw turns smoothly by up to `turn_deg` degrees, height, pitch, roll and field of view stay.
    Every position (checked at 8 points per frame) keeps PATH_WALL_MARGIN from the walls and PATH_OBJECT_MARGIN from
    the objects; when no end point passes in `tries` draws the camera turns in place. The path's randomness comes
    from its own generator (`path_seed`), so the scene and every other seed's renders are unchanged."""
    if num_frames < 1:
        raise ValueError(f"procedural: a camera path needs at least 1 frame, got {num_frames}")
    rng = np.random.default_rng([int(path_seed), 0x9A7])  # a stream of its own, apart from the scenes' seeds
    cam = params["camera"]
    start = np.asarray(cam["position"], np.float64)
    start_xz = start[[0, 2]]
    dense = 0.5 - 0.5 * np.cos(np.pi * np.linspace(0, 1, 8 * max(num_frames, 2)))
    end_xz, control_xz = start_xz, start_xz
    for _ in range(tries):
        angle, distance = rng.uniform(0, 2 * math.pi), _lerp(length, rng.random())
        end = start_xz + distance * np.array([math.cos(angle), math.sin(angle)])
        side = np.array([-math.sin(angle), math.cos(angle)]) * distance * rng.uniform(-0.3, 0.3)
        control = (start_xz + end) / 2 + side
        curve = ((1 - dense) ** 2)[:, None] * start_xz + (2 * (1 - dense) * dense)[:, None] * control \
            + (dense ** 2)[:, None] * end
        if _path_clear(params, curve):
            end_xz, control_xz = end, control
            break
    turn = math.radians(turn_deg) * rng.uniform(-1, 1)
    cameras = []
    for k in range(num_frames):
        u = k / (num_frames - 1) if num_frames > 1 else 0.0
        s = 0.5 - 0.5 * math.cos(math.pi * u)
        xz = (1 - s) ** 2 * start_xz + 2 * (1 - s) * s * control_xz + s ** 2 * end_xz
        cameras.append({**cam, "position": np.array([xz[0], start[1], xz[1]]), "yaw": cam["yaw"] + turn * s})
    return cameras


def render_camera_path(seed, num_frames, height, width, path_seed=None):
    """Render the room of scene `seed` along camera_path (path_seed defaults to the scene's seed): a dict of
    stacked frames, `rgb` (N, H, W, 3) and exact planar `depth` (N, H, W) in metres, plus `intrinsics` (3, 3) and the
    `cameras`. Frame 0 is render_scene(seed) itself."""
    params = sample_scene_params(seed)
    cameras = camera_path(params, num_frames, seed if path_seed is None else path_seed)
    frames = [render_scene_from_params({**params, "camera": camera}, height, width) for camera in cameras]
    return {"rgb": np.stack([f["rgb"] for f in frames]), "depth": np.stack([f["depth"] for f in frames]),
            "intrinsics": frames[0]["intrinsics"], "cameras": cameras}


# ----------------------------------------------------------------------------- captions

# A small named palette (sRGB in [0, 1]); a material is named by the entry nearest to its base colour in CIELAB with
# lightness at half weight (at full weight lightness dominates and a dark blue reads as purple or black)
COLOUR_NAMES = {  # anchors at the middle of what sample_material draws, so muted colours get their hue's name
    "black": (0.1, 0.1, 0.1), "grey": (0.5, 0.5, 0.5), "white": (0.9, 0.9, 0.9), "red": (0.7, 0.2, 0.2),
    "orange": (0.85, 0.5, 0.2), "yellow": (0.85, 0.8, 0.3), "green": (0.35, 0.6, 0.3), "teal": (0.2, 0.5, 0.5),
    "blue": (0.3, 0.4, 0.75), "purple": (0.5, 0.3, 0.6), "pink": (0.85, 0.55, 0.65), "brown": (0.45, 0.3, 0.18),
    "beige": (0.8, 0.72, 0.58),
}
PATTERN_WORDS = {"plain": "", "checker": "checked", "stripes": "striped", "noise": "mottled"}
NEAR_FAR_M = 2.5  # an object whose visible pixels have a median planar depth below this is "near", else "far"
MIN_OBJECT_AREA = 0.005  # objects covering less of the image than this are not mentioned
SECOND_WALL_AREA = 0.1  # a second wall that looks different is mentioned when it covers this much of the image


def _lab(rgb):
    """sRGB in [0, 1], (..., 3) -> CIELAB (D65)."""
    rgb = np.asarray(rgb, np.float64)
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = lin @ np.array([[0.4124, 0.2126, 0.0193], [0.3576, 0.7152, 0.1192], [0.1805, 0.0722, 0.9505]])
    xyz = xyz / np.array([0.9505, 1.0, 1.089])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


_LAB_WEIGHTS = np.array([0.5, 1.0, 1.0])
_PALETTE_LAB = _lab(np.array(list(COLOUR_NAMES.values()))) * _LAB_WEIGHTS


def colour_name(rgb):
    """The palette name nearest to an sRGB colour (Euclidean distance in CIELAB, lightness at half weight)."""
    return list(COLOUR_NAMES)[int(((_PALETTE_LAB - _lab(rgb) * _LAB_WEIGHTS) ** 2).sum(-1).argmin())]


def _material_words(material):
    texture = PATTERN_WORDS[material["pattern"]]
    return f"{colour_name(material['colour'])} {texture}".strip()


def describe_scene(params, scene):
    """A short caption of what the rendered picture shows, e.g. "beige striped walls, brown checked floor, red
    sphere near left, blue box far right".

    First the most visible wall (and a second one, "grey and pink walls", when it covers SECOND_WALL_AREA of the
    image and looks different) and the floor: colour (the palette name of the material's base colour, i.e. its
    albedo, not the lit pixel) and texture (plain, checked, striped, mottled). Then every object covering at least
    MIN_OBJECT_AREA of the image, largest first: colour, kind, distance (near/far: the median planar depth of its
    pixels against NEAR_FAR_M) and side (left, centre or right third of the image, by the mean column of its
    pixels). What is out of view or hidden is not mentioned. A plain function of the parameters and the rendered
    instance and depth maps, so a scene always gets the same caption (at another resolution it can differ only where
    an area or a position sits on a threshold). The largest things come first, so an encoder that truncates (CLIP's
    77 tokens; tiny_sd's word-level tokenizer gives every word and comma one token) keeps the most visible ones."""
    instance, depth = scene["instance"], scene["depth"]
    height, width = instance.shape
    area = np.bincount(instance.ravel(), minlength=6 + len(params["objects"])) / instance.size
    parts = []
    first, second = np.argsort(-area[:4], kind="stable")[:2]
    if area[first] > 0:
        walls = _material_words(params["walls"][first])
        other = _material_words(params["walls"][second])
        if area[second] >= SECOND_WALL_AREA and other != walls:  # rooms whose walls differ: the two most visible
            walls = f"{walls} and {other}"
        parts.append(f"{walls} walls")
    if area[4] > 0:
        parts.append(f"{_material_words(params['floor'])} floor")
    columns = np.broadcast_to(np.arange(width), (height, width))
    for i in sorted(range(6, len(area)), key=lambda i: (-area[i], i)):
        if area[i] < MIN_OBJECT_AREA:
            break
        obj, mask = params["objects"][i - 6], instance == i
        distance = "near" if np.median(depth[mask]) < NEAR_FAR_M else "far"
        x = (columns[mask].mean() + 0.5) / width
        side = "left" if x < 1 / 3 else "right" if x > 2 / 3 else "centre"
        parts.append(f"{colour_name(obj['material']['colour'])} {obj['kind']} {distance} {side}")
    return ", ".join(parts)


# ----------------------------------------------------------------------------- dataset


class ProceduralScenes(torch.utils.data.Dataset):
    """Random rooms rendered on demand (a 64x80 scene takes a few milliseconds, so nothing is cached). Scene i of a
    split has seed `scene_seed(i)`; the splits own disjoint seed ranges, so val/test scenes never leak into train."""

    def __init__(self, split="train", num_scenes=1000, height=64, width=80, seed=0, tasks=None, partial_labels="full"):
        if split not in SPLITS:
            raise ValueError(f"procedural: split must be one of {SPLITS}, got {split!r}")
        if not 1 <= num_scenes <= SCENES_PER_SPLIT:
            raise ValueError(f"procedural: num_scenes must be in [1, {SCENES_PER_SPLIT}], got {num_scenes}")
        if height < 8 or width < 8:
            raise ValueError(f"procedural: height and width must be >= 8, got {height}x{width}")
        if seed < 0:
            raise ValueError(f"procedural: seed must be >= 0, got {seed}")
        tasks = TASKS if tasks is None else (tasks,) if isinstance(tasks, str) else tuple(tasks)
        unknown = set(tasks) - set(TASKS) - {"instance"}
        if unknown:
            raise ValueError(f"procedural: unknown tasks {sorted(unknown)}; available: {TASKS + ('instance',)}")
        self.split, self.num_scenes, self.height, self.width, self.seed, self.tasks = (
            split, num_scenes, height, width, seed, tasks)
        # multi-task partial labels (data/partial_labels.py), drawn from the seed; `full` adds no `labelled` key
        from densediff.data.partial_labels import check_setting, generate

        self.labels = None if check_setting(partial_labels) == "full" else generate(
            range(num_scenes), [t for t in tasks if t != "instance"], partial_labels, seed)

    def __len__(self):
        return self.num_scenes

    def scene_seed(self, index):
        return (self.seed * len(SPLITS) + SPLITS.index(self.split)) * SCENES_PER_SPLIT + index

    def __getitem__(self, index):
        index = int(index)
        if index < 0:
            index += self.num_scenes
        if not 0 <= index < self.num_scenes:
            raise IndexError(f"procedural: index {index} out of range for {self.num_scenes} scenes")
        params = sample_scene_params(self.scene_seed(index))
        s = render_scene_from_params(params, self.height, self.width)
        def chw(a):
            return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))
        item = {
            "rgb": chw(s["rgb"]),
            "valid_mask": torch.ones(self.height, self.width, dtype=torch.bool),  # every ray hits something
            "intrinsics": torch.from_numpy(s["intrinsics"]),
            "name": f"procedural/{self.split}/{index:06d}",
            "relative_path": f"{self.split}/{index:06d}.png",  # where a precomputed prediction is looked up
            "prompt": describe_scene(params, s),  # a caption of the picture (text-conditioned recipes, txt2img)
        }
        for task in self.tasks:
            a = s[task]
            if task in ("edges", "saliency"):
                item[task] = torch.from_numpy(a.astype(np.float32))
            else:
                item[task] = chw(a) if a.ndim == 3 else torch.from_numpy(a)
        if self.labels is not None:
            item["labelled"] = {t: torch.tensor(v) for t, v in self.labels[index].items()}
        return item


# ----------------------------------------------------------------------------- a picture for people


def _colourise(a, lo=None, hi=None):
    """Scalar map -> RGB with a small blue-green-yellow ramp (no matplotlib needed)."""
    lo = a.min() if lo is None else lo
    hi = a.max() if hi is None else hi
    x = np.clip((a - lo) / max(hi - lo, 1e-8), 0, 1)
    stops = np.array([[0.27, 0, 0.33], [0.23, 0.32, 0.55], [0.13, 0.57, 0.55], [0.37, 0.79, 0.38], [0.99, 0.91, 0.14]])
    pos = x * (len(stops) - 1)
    i = np.minimum(pos.astype(int), len(stops) - 2)
    f = (pos - i)[..., None]
    return (1 - f) * stops[i] + f * stops[i + 1]


def mosaic(scene):
    """2 x 4 uint8 grid: rgb | depth | normals | segmentation / albedo | shading | edges | saliency."""
    palette = np.array([[0.6, 0.6, 0.6], [0.55, 0.35, 0.2], [0.9, 0.9, 0.8], [0.9, 0.2, 0.2], [0.2, 0.5, 0.9],
                        [0.3, 0.8, 0.3]])
    def grey(m):
        return np.repeat(m.astype(np.float32)[..., None], 3, -1)
    tiles = [scene["rgb"], _colourise(scene["depth"]), (scene["normals"] + 1) / 2, palette[scene["segmentation"]],
             scene["albedo"], scene["shading"], grey(scene["edges"]), grey(scene["saliency"])]
    rows = [np.concatenate(tiles[:4], 1), np.concatenate(tiles[4:], 1)]
    return (np.clip(np.concatenate(rows, 0), 0, 1) * 255).round().astype(np.uint8)


def main():
    from PIL import Image

    ap = argparse.ArgumentParser(description="Render one procedural scene and save a mosaic of all its targets.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--out", default="scene.png")
    args = ap.parse_args()
    params = sample_scene_params(args.seed)
    scene = render_scene_from_params(params, args.height, args.width)
    Image.fromarray(mosaic(scene)).save(args.out)
    print(f"wrote {args.out} (rgb | depth | normals | segmentation / albedo | shading | edges | saliency)")
    print(f"caption: {describe_scene(params, scene)}")


if __name__ == "__main__":
    main()
