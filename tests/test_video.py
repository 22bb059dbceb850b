"""predict.py on videos and frame folders (densediff/inference/video.py), latent reuse against diffusers' Marigold
video recipe (predictor.LatentReuse), the procedural camera path (data/procedural.py: camera_path) and the README's
"Videos" commands as written."""

from __future__ import annotations

import re
import shlex
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from conftest import ROOT, run_cli
from diffusers import DDIMScheduler, MarigoldDepthPipeline
from PIL import Image
from test_user_errors import assert_one_line_error

from densediff.data.procedural import (
    PATH_OBJECT_MARGIN,
    PATH_WALL_MARGIN,
    camera_path,
    render_camera_path,
    render_scene,
    sample_scene_params,
)
from densediff.inference.video import natural_key, open_frames
from densediff.run import ASSETS

MULTI_STEP = ["backbone=tiny", "inference.steps=3", "inference.noise=gaussian"]


def write_mp4(path, frames, fps=8):
    """An H.264 mp4 of uint8 frames (N, H, W, 3), written with PyAV directly (not with the code under test)."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def decode_mp4(path):
    """(frames as uint8 arrays, the stream's average frame rate)."""
    with av.open(str(path)) as container:
        rate = container.streams.video[0].average_rate
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)], rate


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """Five frames of a procedural camera path at 32x48: a folder of PNGs and an mp4 of the same frames."""
    root = tmp_path_factory.mktemp("clip")
    frames = (render_camera_path(5, 5, 32, 48)["rgb"] * 255 + 0.5).clip(0, 255).astype(np.uint8)
    (root / "frames").mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(root / "frames" / f"{i:03d}.png")
    write_mp4(root / "walk.mp4", frames)
    return root


# ----------------------------------------------------------------------------- camera paths


def test_camera_path_is_smooth_stays_clear_and_starts_at_the_scene_camera():
    for seed in range(12):
        params = sample_scene_params(seed)
        cameras = camera_path(params, 24, seed)
        xz = np.array([c["position"][[0, 2]] for c in cameras])
        W, H, D = params["room"]
        assert (xz >= PATH_WALL_MARGIN - 1e-9).all() and (xz <= np.array([W, D]) - PATH_WALL_MARGIN + 1e-9).all()
        for obj in params["objects"]:
            footprint = np.hypot(obj["half"][0], obj["half"][2]) if obj["kind"] == "box" else obj["radius"]
            assert (np.linalg.norm(xz - obj["center"][[0, 2]], axis=1) > footprint + PATH_OBJECT_MARGIN).all()
        assert np.array_equal(cameras[0]["position"], params["camera"]["position"])
        steps = np.linalg.norm(np.diff(xz, axis=0), axis=1)
        assert steps.max() < 0.15 and np.abs(np.diff(steps)).max() < 0.02, seed  # no jumps, no jerks
        yaws = np.array([c["yaw"] for c in cameras])
        assert np.abs(np.diff(yaws)).max() < np.radians(3)
        assert all(c["pitch"] == params["camera"]["pitch"] and c["position"][1] == params["camera"]["position"][1]
                   for c in cameras)
    moved = [np.linalg.norm(camera_path(sample_scene_params(s), 24, s)[-1]["position"]
                            - sample_scene_params(s)["camera"]["position"]) for s in range(12)]
    assert np.median(moved) > 0.5  # the camera does travel through the room
    assert camera_path(sample_scene_params(3), 5, 1)[-1]["yaw"] != camera_path(sample_scene_params(3), 5, 2)[-1]["yaw"]


def test_rendered_path_frame_zero_is_the_scene_and_depth_changes_smoothly():
    path = render_camera_path(3, 6, 24, 32)
    scene = render_scene(3, 24, 32)
    assert path["rgb"].shape == (6, 24, 32, 3) and path["depth"].shape == (6, 24, 32)
    assert np.array_equal(path["rgb"][0], scene["rgb"]) and np.array_equal(path["depth"][0], scene["depth"])
    again = render_camera_path(3, 6, 24, 32)
    assert np.array_equal(again["depth"], path["depth"])  # deterministic
    change = np.abs(np.diff(path["depth"], axis=0)).mean(axis=(1, 2))
    assert (change > 0).all() and change.max() < 0.5 * path["depth"].mean()


# ----------------------------------------------------------------------------- latent reuse = diffusers' recipe


def test_latent_reuse_follows_diffusers_marigold_video_recipe():
    """Three frames with latent reuse: our final latents and predictions equal diffusers' MarigoldDepthPipeline run as
    its Marigold guide runs a video (one common noise; from the second frame on, latents = 0.9 x common + 0.1 x the
    previous frame's output latent), on the same tiny weights."""
    from densediff.backbones import load_backbone
    from densediff.inference import LatentEstimator
    from densediff.inference.predictor import InferenceOptions, LatentReuse, predict
    from densediff.tasks import build_task

    backbone = load_backbone(ASSETS / "tiny")
    estimator = LatentEstimator(backbone.unet.eval(), backbone.vae.eval(), backbone.scheduler,
                                backbone.empty_text_embedding)
    frames = torch.from_numpy(render_camera_path(4, 3, 32, 40)["rgb"]).permute(0, 3, 1, 2)
    options = InferenceOptions(steps=4, noise="gaussian", final_step="prev_sample")
    depth, generator = build_task("depth"), torch.Generator().manual_seed(7)
    reuse = LatentReuse(0.1)
    ours, our_latents = [], []
    for k in range(len(frames)):
        ours.append(predict(estimator, depth, frames[k:k + 1], options, generator, reuse=reuse))
        our_latents.append(reuse.previous.clone())
    alone = predict(estimator, depth, frames[:1], options, torch.Generator().manual_seed(7))
    assert torch.equal(ours[0], alone)  # the first frame is its image-by-image prediction
    replay, generator = LatentReuse(0.1), torch.Generator().manual_seed(7)
    for k in range(len(frames)):  # seeded: the same video gives the same predictions again
        assert torch.equal(predict(estimator, depth, frames[k:k + 1], options, generator, reuse=replay), ours[k])

    pipe = MarigoldDepthPipeline.from_pretrained(ASSETS / "tiny")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    common, last = reuse.noise, None  # the guide's latent_common: our first frame's draw
    for k in range(len(frames)):
        latents = common if last is None else 0.9 * common + 0.1 * last
        out = pipe(frames[k:k + 1], num_inference_steps=4, processing_resolution=0, latents=latents, output_latent=True,
                   output_type="pt")
        last = out.latent
        assert torch.allclose(our_latents[k], last, atol=1e-4), (k, (our_latents[k] - last).abs().max())
        theirs = out.prediction[:, 0]
        theirs = (theirs - theirs.min()) / (theirs.max() - theirs.min())  # we min-max normalise a single map
        assert torch.allclose(ours[k], theirs, atol=2e-3), (k, (ours[k] - theirs).abs().max())
    # and the reuse matters: without it the later frames start from fresh noise
    fresh = torch.Generator().manual_seed(7)
    independent = [predict(estimator, depth, frames[k:k + 1], options, fresh) for k in range(len(frames))]
    assert not torch.allclose(independent[2], ours[2], atol=1e-3)


# ----------------------------------------------------------------------------- predict.py on videos


def test_frame_folder_without_reuse_is_image_by_image_and_with_reuse_starts_alike(clip, tmp_path):
    frames = clip / "frames"
    run_cli("predict.py", f"input={frames}", f"output={tmp_path / 'images'}", *MULTI_STEP)
    run_cli("predict.py", f"input={frames}", f"output={tmp_path / 'plain'}", *MULTI_STEP, "video.frames=true",
            "video.latent_reuse=0", "video.fps=5", "video.side_by_side=true")
    reused = run_cli("predict.py", f"input={frames}", f"output={tmp_path / 'reused'}", *MULTI_STEP,
                     "video.frames=true")
    assert "0.90 x the first frame's noise + 0.10 x the previous frame's latent" in reused.stdout + reused.stderr
    for i in range(5):
        image = np.load(tmp_path / "images" / f"{i:03d}.npy")
        plain = np.load(tmp_path / "plain" / "frames" / f"{i:06d}.npy")
        assert np.array_equal(image, plain), i  # latent reuse off: exactly the image-by-image prediction
        for suffix in (".png", "_16bit.png"):
            assert (tmp_path / "plain" / "frames" / f"{i:06d}{suffix}").is_file()
        again = np.load(tmp_path / "reused" / "frames" / f"{i:06d}.npy")
        assert np.array_equal(again, plain) if i == 0 else np.abs(again - plain).max() > 1e-3, i
    decoded, rate = decode_mp4(tmp_path / "plain" / "frames_depth.mp4")
    assert len(decoded) == 5 and decoded[0].shape == (32, 48, 3) and rate == 5
    coloured = np.asarray(Image.open(tmp_path / "plain" / "frames" / "000002.png")).astype(float)
    assert np.abs(decoded[2] - coloured).mean() < 6  # the mp4 shows the coloured predictions (H.264, lossy)
    side, _ = decode_mp4(tmp_path / "plain" / "frames_depth_side_by_side.mp4")
    assert len(side) == 5 and side[0].shape == (32, 96, 3)
    source = np.asarray(Image.open(frames / "002.png")).astype(float)
    assert np.abs(side[2][:, :48] - source).mean() < 6 and np.abs(side[2][:, 48:] - coloured).mean() < 6
    # the frames' files are never replaced unless asked
    again = run_cli("predict.py", f"input={frames}", f"output={tmp_path / 'plain'}", *MULTI_STEP, "video.frames=true",
                    expect_ok=False)
    assert_one_line_error(again, "exists; choose another output= or pass overwrite=true")


def test_video_file_is_predicted_frame_by_frame_at_its_frame_rate(clip, tmp_path):
    result = run_cli("predict.py", f"input={clip / 'walk.mp4'}", f"output={tmp_path}", "backbone=tiny")
    assert "single-step recipe (inference.steps=1) has no latent to reuse" in result.stdout + result.stderr
    assert sorted(p.name for p in (tmp_path / "walk").glob("*.npy")) == [f"{i:06d}.npy" for i in range(5)]
    decoded, rate = decode_mp4(tmp_path / "walk_depth.mp4")
    assert len(decoded) == 5 and decoded[0].shape == (32, 48, 3) and rate == 8
    # each frame is the prediction of the frame PyAV decodes (the same model on that picture as an image)
    source, _ = decode_mp4(clip / "walk.mp4")
    Image.fromarray(source[3]).save(tmp_path / "frame3.png")
    run_cli("predict.py", f"input={tmp_path / 'frame3.png'}", f"output={tmp_path / 'one'}", "backbone=tiny")
    assert np.array_equal(np.load(tmp_path / "one" / "frame3.npy"), np.load(tmp_path / "walk" / "000003.npy"))
    # an ensemble's members each reuse their own latent; each frame also gets the members' disagreement
    ensemble = run_cli("predict.py", f"input={clip / 'walk.mp4'}", f"output={tmp_path / 'ensemble'}", *MULTI_STEP,
                       "inference.ensemble=2")
    assert "0.10 x the previous frame's latent" in ensemble.stdout + ensemble.stderr
    uncertainty = np.load(tmp_path / "ensemble" / "walk" / "000004_uncertainty.npy")
    assert uncertainty.shape == (32, 48) and (uncertainty >= 0).all()
    assert (tmp_path / "ensemble" / "walk" / "000004_uncertainty.png").is_file()


def test_frames_are_taken_in_natural_order(tmp_path):
    for name in ("f10.png", "f2.png", "f1.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in sorted(tmp_path.glob("f*.png"), key=natural_key)] == ["f1.png", "f2.png", "f10.png"]
    for i in (10, 2, 1):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / f"f{i}.png")
    source = open_frames(tmp_path, 10)
    assert [p.name for p in source.files] == ["f1.png", "f2.png", "f10.png"] and source.fps == Fraction(10)
    assert [int(rgb[0, 0, 0, 0] * 255 + 0.5) for _, rgb in source.frames()] == [1, 2, 10]


@pytest.fixture
def bad_inputs(tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 255, 4096, dtype=np.uint8).tobytes())
    audio = tmp_path / "voice.mp4"  # an mp4 with one audio stream and no video
    with av.open(str(audio), mode="w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    (tmp_path / "empty").mkdir()
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "walk.mp4").write_bytes(corrupt.read_bytes())
    (tmp_path / "broken").mkdir()
    Image.fromarray(np.zeros((16, 24, 3), np.uint8)).save(tmp_path / "broken" / "1.png")
    (tmp_path / "broken" / "2.png").write_bytes(b"not a picture")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(np.zeros((16, 24, 3), np.uint8)).save(mixed / "1.png")
    Image.fromarray(np.zeros((16, 20, 3), np.uint8)).save(mixed / "2.png")
    return tmp_path


@pytest.mark.parametrize("arguments, needles", [
    (["input={root}/corrupt.mp4"], ["cannot read video {root}/corrupt.mp4"]),
    (["input={root}/voice.mp4"], ["{root}/voice.mp4 holds no video stream (audio)"]),
    (["input={root}/missing.mp4"], ["input={root}/missing.mp4 does not exist"]),
    (["input={root}/empty", "video.frames=true"], ["input={root}/empty holds no frames"]),
    (["input={root}/mixed", "video.frames=true"], ["must share one size", "{root}/mixed/1.png is 24x16",
                                                  "{root}/mixed/2.png is 20x16"]),
    (["input={root}/mixed", "video.frames=true", "video.latent_reuse=2"], ["video.latent_reuse=2 is not valid"]),
    (["input={root}/mixed/1.png", "video.frames=true"], ["is not a folder"]),
    (["input={root}/mixed", "video.frames=true", "video.fps=0"], ["video.fps=0 is not a frame rate"]),
    (["input={root}/clips"], ["input={root}/clips holds no images", "it holds videos (walk.mp4)"]),
    (["input={root}/broken", "video.frames=true"], ["cannot read frame {root}/broken/2.png"]),
    (["input={root}/clips/walk.mp4", "pointcloud=true"], ["pointcloud=true writes one .ply per image"]),
])
def test_bad_video_inputs_are_one_line_before_any_work(bad_inputs, arguments, needles):
    root = bad_inputs
    result = run_cli("predict.py", *[a.format(root=root) for a in arguments], f"output={root / 'out'}",
                     "backbone=tiny", expect_ok=False)
    assert_one_line_error(result, *[n.format(root=root) for n in needles])
    assert not (root / "out").exists()


def test_readme_videos_commands_run_as_written(tmp_path):
    readme = (ROOT / "README.md").read_text()
    body = readme.split("## Videos\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", body, re.DOTALL).group(1)
    commands = [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["python", "-m"], ["python", "predict.py"], ["python", "predict.py"]]
    for command in commands:
        if command[1] == "-m":
            result = run_cli("-m", *command[2:], cwd=tmp_path)
        else:
            result = run_cli(command[1], *command[2:], cwd=tmp_path)
        assert "Traceback" not in result.stderr
    assert len(decode_mp4(tmp_path / "predictions" / "room_depth.mp4")[0]) == 12
    assert len(list((tmp_path / "frame_predictions" / "room").glob("*.npy"))) == 12
    side, rate = decode_mp4(tmp_path / "frame_predictions" / "room_depth_side_by_side.mp4")
    assert len(side) == 12 and side[0].shape == (96, 256, 3) and rate == 10
