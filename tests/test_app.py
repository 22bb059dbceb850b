"""The Gradio demo (densediff/app.py): launched as a user would (python -m densediff.app backbone=tiny) on
127.0.0.1 and driven through gradio_client, as the browser's API calls do."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densediff.app import main, parse_args

pytest.importorskip("gradio", reason="the demo needs the optional extra: pip install -e '.[app]'")
gradio_client = pytest.importorskip("gradio_client", reason="the demo test drives the app with gradio_client "
                                                           "(installed with gradio: pip install -e '.[app]')")

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 120  # s: torch + diffusers + gradio imports on a busy 2-core machine


def _env(tmp: Path) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    # TMPDIR: the app's request folders and Gradio's upload cache land there, so the test sees what it leaves
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False",
            "TMPDIR": str(tmp), "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base: Path):
        self.cwd, self.tmp, self.log = base / "cwd", base / "tmp", base / "app.log"
        self.cwd.mkdir(parents=True)
        self.url = f"http://127.0.0.1:{_free_port()}"
        port = self.url.rsplit(":", 1)[1]
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "densediff.app", "backbone=tiny", "server_name=127.0.0.1",
                 f"server_port={port}"], cwd=self.cwd, env=_env(self.tmp), stdout=log, stderr=subprocess.STDOUT)

    def wait(self) -> None:
        import httpx
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the app exited ({self.process.returncode}):\n{self.log.read_text()[-4000:]}")
            try:
                if httpx.get(self.url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"the app did not answer within {START_TIMEOUT} s:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    app = Server(tmp_path_factory.mktemp("app"))
    try:
        app.wait()
        yield app
    finally:
        app.stop()


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    return gradio_client.Client(server.url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


def test_parse_args_splits_app_options_from_hydra_overrides():
    ckpts, server, overrides = parse_args(["ckpt=[a.ckpt,b dir/c.ckpt]", "inference.steps=4",
                                           "server_port=7000", "share=true", "backbone.path=/m"])
    assert ckpts == ["a.ckpt", "b dir/c.ckpt"]
    assert server == {"server_name": "127.0.0.1", "server_port": 7000, "share": True}
    assert overrides == ["inference.steps=4", "backbone.path=/m"]
    assert parse_args(["ckpt=b dir/c.ckpt"])[0] == ["b dir/c.ckpt"]
    assert parse_args([]) == ([], {"server_name": "127.0.0.1", "server_port": 7860, "share": False}, [])


def test_app_predicts_depth_and_serves_npy_and_16bit_png(client, tmp_path):
    height, width = 37, 50  # odd, non-square: padded to a multiple of 8 and cropped back
    rng = np.random.default_rng(0)
    image = tmp_path / "room.png"
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(image)

    coloured, npy, png16, uncertainty = client.predict(gradio_client.handle_file(str(image)), "depth", 1, 1,
                                                       api_name="/predict")
    assert uncertainty is None  # one member: nothing to disagree

    assert Path(npy).name == "room.npy" and Path(png16).name == "room_16bit.png"
    with Image.open(coloured) as picture:
        assert picture.size == (width, height) and picture.mode == "RGB"
    depth = np.load(npy)
    assert depth.shape == (height, width) and depth.dtype == np.float32
    assert np.isfinite(depth).all() and depth.min() >= 0 and depth.max() <= 1
    with Image.open(png16) as picture:
        sixteen = np.asarray(picture)
    assert sixteen.dtype == np.uint16 and sixteen.shape == (height, width)
    np.testing.assert_allclose(sixteen / 65535.0, depth, rtol=0, atol=1 / 65535)


def test_app_shows_missing_and_unreadable_images_as_messages(client, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(gradio_client.exceptions.AppError, match="cannot read image broken.png"):
        client.predict(gradio_client.handle_file(str(broken)), "depth", 1, 1, api_name="/predict")
    with pytest.raises(gradio_client.exceptions.AppError, match="upload an image first"):
        client.predict(None, "depth", 1, 1, api_name="/predict")


def _call(url: str, *data) -> str:
    """The app's HTTP API as any client can call it, without gradio_client's upload step: the raw event stream of
    one /predict call (it ends with `event: complete` or `event: error`)."""
    import httpx
    with httpx.Client(timeout=60) as http:
        answer = http.post(f"{url}/gradio_api/call/predict", json={"data": list(data)})
        answer.raise_for_status()
        return http.get(f"{url}/gradio_api/call/predict/{answer.json()['event_id']}").text


def test_app_reads_only_uploaded_files(server, client, tmp_path):
    """A client that names a path on the server instead of uploading gets one refusal, the same whether the path
    exists or not: no file outside Gradio's upload folder is read, predicted, copied or confirmed (issue 24.1)."""
    secret = tmp_path / "secret.png"  # a readable image: the unchecked app predicted and returned it
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(secret)
    uploads = server.tmp / "gradio"
    uploads.mkdir(parents=True, exist_ok=True)
    link = uploads / "link.png"
    link.symlink_to(secret)
    named = [str(secret), str(tmp_path / "missing.png"), str(uploads / ".." / ".." / secret.relative_to(
        secret.anchor)), str(link), str(uploads), "/etc/passwd"]
    # without Gradio's file marker ("meta") Gradio passes the record through as it is (preprocess=False)
    answers = [_call(server.url, {"path": path, "orig_name": "x.png"}, "depth", 1, 1) for path in named]
    for path, answer in zip(named, answers):
        assert "event: error" in answer and "the image must be a file uploaded to this demo" in answer, (path, answer)
        assert "event: complete" not in answer and "Errno" not in answer, answer
    # with it, Gradio refuses a path it did not receive itself (whether the file exists or not); a bare string is
    # not an image record
    for path in named:
        answer = _call(server.url, {"path": path, "meta": {"_type": "gradio.FileData"}}, "depth", 1, 1)
        assert "event: error" in answer and "event: complete" not in answer, (path, answer)
        assert "Errno" not in answer or path == str(uploads), answer
    assert "event: complete" not in _call(server.url, str(secret), "depth", 1, 1)
    request_inputs = list(server.tmp.glob("densediff-app-*/request-*/input/*"))
    assert not [p for p in request_inputs if p.read_bytes() == secret.read_bytes()], "a named file was copied"


@pytest.mark.parametrize("steps, ensemble, message", [
    (400, 1, "steps=400: pass a whole number from 1 to 50"),
    (1, 64, "ensemble=64: pass a whole number from 1 to 10"),
    (0, 1, "steps=0"), (1.5, 1, "steps=1.5"), ("1; rm", 1, "steps="),
])
def test_app_bounds_every_parameter_on_the_server(client, tmp_path, steps, ensemble, message):
    image = tmp_path / "small.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    with pytest.raises(gradio_client.exceptions.AppError, match=message.replace("[", r"\[")):
        client.predict(gradio_client.handle_file(str(image)), "depth", steps, ensemble, api_name="/predict")


def test_app_refuses_images_above_its_pixel_bound(client, tmp_path):
    from densediff.app import MAX_PIXELS
    big = tmp_path / "big.png"  # one colour: a few kB on disk, 17 MP once decoded (never decoded: the header tells)
    Image.new("RGB", (4100, 4100), (90, 120, 150)).save(big, optimize=True)
    assert 4100 * 4100 > MAX_PIXELS and big.stat().st_size < 1_000_000
    with pytest.raises(gradio_client.exceptions.AppError, match=r"big.png is 4100 x 4100 pixels \(16.8 MP\); the "
                                                                 r"demo takes at most 16.8 MP"):
        client.predict(gradio_client.handle_file(str(big)), "depth", 1, 1, api_name="/predict")


def test_app_stops_on_sigterm_and_leaves_no_files(server, client):
    assert server.stop() == 0
    assert not list(server.cwd.iterdir()), "the app wrote into its working directory"
    assert not list(server.tmp.glob("densediff-app-*")), "the app left its temporary folder behind"


def test_app_bad_argument_exits_with_one_line_error(tmp_path):
    """The real process: exit status 1 and one line on stderr."""
    result = subprocess.run([sys.executable, "-m", "densediff.app", "server_port=http"], check=False,
                            cwd=tmp_path, env=_env(tmp_path / "t"), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: server_port=http is not a port number (0-65535)"], result.stderr[-3000:]


@pytest.mark.parametrize("argument, message", [
    ("ckpt=/nonexistent/last.ckpt", "error: ckpt=/nonexistent/last.ckpt does not exist: pass a checkpoint"),
    ("backbone=no_such_backbone", "error: In 'predict': Could not find 'backbone/no_such_backbone'"),
    ("inference.stepz=3", "error: Could not override 'inference.stepz'."),
    ("inference.noise=bad", "error: inference.noise must be one of zeros, gaussian, pyramid"),
    ("share=maybe", "error: share=maybe: pass share=true or share=false"),
    ("server_port=70000", "error: server_port=70000 is not a port number (0-65535)"),
    ("bogus=1", "error: Could not override 'bogus'."),
])
def test_app_config_errors_are_one_line(argument, message, capsys):
    """conf/app.yaml is composed by Hydra: its own keys and every predict.py key, anything else refused."""
    assert main([argument]) == 1  # in-process: the same code path as the CLI, without another interpreter start
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), lines


def test_app_refuses_a_key_given_twice_and_prints_its_config(capsys):
    assert main(["ckpt=a.ckpt", "ckpt=b.ckpt"]) == 1  # Hydra alone would keep the last one silently
    assert capsys.readouterr().err.strip() == ("error: ckpt= is given more than once: pass it once (several values "
                                               "as a list, ckpt=[a,b])")
    assert main(["--cfg", "server_port=7001", "backbone=tiny_random"]) == 0
    printed = capsys.readouterr().out
    assert "server_port: 7001" in printed and "name: tiny_random" in printed and "\nhydra:" not in printed


def test_demo_serves_one_model_per_task(tmp_path):
    """Two tasks in one demo (what several ckpt= give), called without the server: normals write no 16-bit PNG;
    an ensemble over a zeros-noise model starts from gaussian noise instead of failing."""
    from densediff.app import Demo, build_ui, load_models

    depth, _, device = load_models([], ["backbone=tiny", "task=depth"])
    normals, _, _ = load_models([], ["backbone=tiny", "task=normals", "inference.steps=3"])
    demo = Demo({**depth, **normals}, {"depth": "backbone=tiny", "normals": "backbone=tiny"}, device, tmp_path)
    assert demo.defaults("depth") == (1, 1) and demo.defaults("normals") == (3, 1)
    image = tmp_path / "wall.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(image)

    coloured, npy, png16, uncertainty = demo.predict(image, "normals", 1, 2)

    assert png16 is None and Path(npy).name == "wall.npy"
    spread = np.load(Path(uncertainty).with_suffix(".npy"))  # the two members' disagreement, written beside it
    assert Path(uncertainty).name == "wall_uncertainty.png" and spread.shape == (24, 40) and spread.max() > 0
    with Image.open(uncertainty) as picture:
        assert picture.size == (40, 24)
    values = np.load(npy)
    assert values.shape == (24, 40, 3)
    np.testing.assert_allclose(np.linalg.norm(values, axis=-1), 1, atol=1e-3)
    with Image.open(coloured) as picture:
        assert picture.size == (40, 24)
    assert demo.models["normals"].inference.ensemble == 1  # the request's options do not stick
    build_ui(demo)  # the page builds with both tasks in the selector


def test_demo_shows_each_target_of_an_iid_checkpoint_with_its_uncertainty(tmp_path):
    """A Marigold v1.1 IID checkpoint (the lighting recipe trained 2 steps on the tiny backbone): one entry per target
    in the task selector, each serving that target's PNG (as predict.py shows it), its HxWx3 .npy and, with an
    ensemble, its own uncertainty (diffusers' per-channel spread, written beside it)."""
    import torch
    from conftest import run_cli
    from test_marigold_iid import SMALL

    from densediff.app import Demo, build_ui, load_models

    run = tmp_path / "lighting"
    run_cli("train.py", "experiment=marigold_iid_lighting", *SMALL, f"hydra.run.dir={run}")
    ckpt = str(run / "checkpoints" / "last.ckpt")
    models, sources, device = load_models([ckpt], [])
    demo = Demo(models, sources, device, tmp_path / "work")
    (tmp_path / "work").mkdir()
    assert list(demo.views) == ["intrinsics: albedo", "intrinsics: shading", "intrinsics: residual"]
    assert demo.defaults("intrinsics: shading") == (4, 1)  # the recipe's validation settings
    image = tmp_path / "room.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(image)

    coloured, npy, png16, uncertainty = demo.predict(image, "intrinsics: shading", 2, 3)

    assert png16 is None and Path(npy).name == "room_shading.npy" and Path(coloured).name == "room_shading.png"
    shading = np.load(npy)
    assert shading.shape == (24, 40, 3) and 0 <= shading.min() <= shading.max() <= 1
    task = demo.models["intrinsics"].task
    with Image.open(coloured) as picture:  # up to scale and linear: over its maximum, then gamma 1/2.2
        np.testing.assert_array_equal(np.asarray(picture), task.visualize("shading", torch.from_numpy(
            shading).permute(2, 0, 1)))
    assert Path(uncertainty).name == "room_shading_uncertainty.png"
    spread = np.load(Path(uncertainty).with_suffix(".npy"))
    assert spread.shape == (24, 40, 3) and spread.max() > 0
    with Image.open(uncertainty) as picture:
        assert picture.size == (40, 24) and picture.mode == "RGB"
    # another target's entry with the same settings: its own files, of the same decomposition (the model's seed)
    _, albedo, _, albedo_spread = demo.predict(image, "intrinsics: albedo", 2, 3)
    assert Path(albedo).name == "room_albedo.npy" and Path(albedo_spread).name == "room_albedo_uncertainty.png"
    np.testing.assert_array_equal(np.load(Path(albedo).with_name("room_shading.npy")), shading)
    assert demo.predict(image, "intrinsics: albedo", 2, 1)[3] is None  # one member: nothing to disagree
    with pytest.raises(ValueError, match="no model for task 'intrinsics'; loaded: intrinsics: albedo"):
        demo.predict(image, "intrinsics", 1, 1)
    build_ui(demo)  # the page builds with one selector entry per target
