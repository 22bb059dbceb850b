"""A Gradio demo: upload an image, pick the task and the steps, see the coloured prediction, download the float .npy
(and the 16-bit PNG for depth). A model of several maps (task=intrinsics, Marigold v1.1 IID) is one entry per map in
the task selector ("intrinsics: albedo", "intrinsics: shading", ...), each with its own .npy and uncertainty.

    densediff-app ckpt=<run>/checkpoints/last.ckpt          # or python -m densediff.app ..., make app APP_ARGS=...
    densediff-app ckpt=[<depth.ckpt>,<normals.ckpt>]          # several tasks, one model per task
    densediff-app backbone=<name> task=<depth|normals|...>    # a backbone as it is (e.g. backbone=tiny)

A Hydra app: its root config is conf/app.yaml, predict.py's config plus the server's options (server_name=127.0.0.1
server_port=7860 share=false), so any predict.py override applies (backbone.path=..., inference.steps=...,
inference.processing_res=..., device=...); `--cfg` prints the composed config.
Needs the optional extra: pip install -e ".[app]". Modelled on DMP's app.py (docs/paradigms.md#dmp);
unlike it, every request writes into its own temporary folder, never into the repository.
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib.util
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections import deque
from pathlib import Path

OWN = ("ckpt", "server_name", "server_port", "share")  # conf/app.yaml's own keys; the rest is predict.yaml's
KEEP_REQUESTS = 32  # request folders kept on disk (Gradio copies the files it serves into its own cache)
# What a request may ask for, checked on the server (the API takes any value, not only the sliders'): the sliders'
# ranges, and an input of at most MAX_PIXELS (larger photos: downscale them, or run predict.py with
# inference.processing_res=...) and MAX_UPLOAD in bytes.
MAX_STEPS, MAX_ENSEMBLE = 50, 10
MAX_PIXELS = 4096 * 4096
MAX_UPLOAD = "64mb"


class AppArgumentError(ValueError):
    """A bad command-line argument of the app itself."""


def parse_args(argv: list[str]) -> tuple[list[str], dict, list[str]]:
    """(checkpoints, server options, predict.py overrides) from the command line, composed as conf/app.yaml: Hydra
    refuses unknown keys and groups (CommandLineError); ckpt= is one checkpoint or a list of them."""
    from densediff.run.commands import command_options

    options, overrides = command_options("app", argv, OWN)
    ckpt = options["ckpt"]
    ckpts = [] if ckpt in (None, "", "null") else [str(c) for c in ckpt] if isinstance(ckpt, list) else [str(ckpt)]
    port, share = options["server_port"], options["share"]
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
        raise AppArgumentError(f"server_port={port} is not a port number (0-65535)")
    if not isinstance(share, bool):
        raise AppArgumentError(f"share={share}: pass share=true or share=false")
    if not options["server_name"]:
        raise AppArgumentError("server_name=: pass server_name=<host>")
    return ckpts, {"server_name": str(options["server_name"]), "server_port": port, "share": share}, overrides


def load_models(ckpts: list[str], overrides: list[str]) -> tuple[dict, dict, object]:
    """({task: model}, {task: where it came from}, device): each model built from predict.py's config with
    `overrides` by predict.py's own rule (densediff.run.build_predictor); raises run.ConfigError or
    FileNotFoundError with a message for the user."""
    from densediff.run import ConfigError, load_predictor

    models, sources = {}, {}
    for ckpt in ckpts or [None]:
        model, device, source = load_predictor(overrides, ckpt)
        name = model.task.name
        if name in models:
            raise ConfigError(f"ckpt={sources[name]} and ckpt={ckpt} both predict {name}: the demo serves one "
                              "model per task")
        models[name], sources[name] = model.to(device), source
    return models, sources, device


class Demo:
    """The models and the request handler, independent of the UI (so it can be called directly)."""

    def __init__(self, models: dict, sources: dict, device, workdir: str | Path):
        self.models, self.sources, self.device = models, sources, device
        # what the task selector lists: {label: (task, view)}, one view per map a model's prediction is shown as
        # (Task.views): the task's name for a one-map task, "<task>: <target>" for each target of intrinsics
        self.views = {task if view == "" else f"{task}: {view}": (task, view)
                      for task, model in models.items() for view in model.task.views()}
        self.workdir = Path(workdir)
        self._lock = threading.Lock()
        self._requests: deque[Path] = deque()

    def defaults(self, task: str) -> tuple[int, int]:
        """(steps, ensemble) of the model behind a task or one of its views."""
        options = self.models[self.views.get(task, (task,))[0]].inference
        return int(options.steps), int(options.ensemble)

    def _request_dir(self) -> Path:
        folder = Path(tempfile.mkdtemp(prefix="request-", dir=self.workdir))
        self._requests.append(folder)
        while len(self._requests) > KEEP_REQUESTS:
            shutil.rmtree(self._requests.popleft(), ignore_errors=True)
        return folder

    def predict(self, image: str | Path | None, task: str, steps: int, ensemble: int,
                name: str | None = None) -> tuple[str, str, str | None, str | None]:
        """(coloured PNG, float .npy, 16-bit PNG or None, uncertainty PNG or None) for the image file `image` and the
        task selector's entry `task` (a task, or one map of it: "intrinsics: albedo"), written by predict.py's own
        writer into a fresh temporary folder; the uncertainty is what predict.py writes with this ensemble (more than
        one member, depth, normals or each target of intrinsics: the members' disagreement, diffusers' formulas).
        Errors a user can fix raise UserError with a readable message."""
        from densediff.inference.predict import output_paths, predict_images

        if image is None:
            raise UserError("upload an image first")
        if task not in self.views:
            raise UserError(f"no model for task {task!r}; loaded: {', '.join(self.views)}")
        task, view = self.views[task]
        model = self.models[task]
        options = model.inference
        steps, ensemble = _count("steps", steps, MAX_STEPS), _count("ensemble", ensemble, MAX_ENSEMBLE)
        try:
            noise = "gaussian" if ensemble > 1 and options.noise == "zeros" else options.noise
            request = dataclasses.replace(options, steps=steps, ensemble=ensemble, noise=noise)
        except (TypeError, ValueError) as error:
            raise UserError(str(error)) from error
        source = Path(image)
        _check_size(source, name or source.name)
        folder = self._request_dir()
        stem = Path(name).stem if name else source.stem
        inputs, outputs = folder / "input", folder / "output"
        inputs.mkdir()
        local = inputs / f"{stem or 'image'}{source.suffix.lower() or '.png'}"
        shutil.copyfile(source, local)
        # what predict.py writes next to the prediction with this ensemble (the paradigm's hook): an ensemble's
        # disagreement, or a head's own uncertainty (Bae's expected angular error, white at 90 degrees)
        files = type(model).prediction_files(dict(getattr(model, "hparams", None) or {}), task, ensemble)
        uncertain = files.uncertainty and hasattr(model, "predict_with_uncertainty")
        with self._lock:  # one model object per task: its options are set for this request only
            try:
                model.inference = request
                _, skipped = predict_images(model, inputs, [local], outputs, self.device, uncertainty=uncertain,
                                            uncertainty_full_scale=files.uncertainty_full_scale)
            finally:
                model.inference = options
        if skipped:
            raise UserError(skipped[0].replace(str(local), local.name))
        paths = output_paths(local, inputs, outputs, model.task, uncertainty=uncertain)
        kinds = model.task.views()[view]
        png16, spread = paths.get(kinds.get("png16")), paths.get(kinds.get("uncertainty"))
        return (str(paths[kinds["png"]]), str(paths[kinds["npy"]]), str(png16) if png16 else None,
                str(spread) if spread is not None and spread.is_file() else None)


class UserError(ValueError):
    """Shown in the UI as a gr.Error message."""


def _count(name: str, value, most: int) -> int:
    """An integer request parameter within [1, most] (the slider's range), else UserError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError(f"{name} must be a whole number from 1 to {most}")
    try:
        number = float(value)
    except ValueError:
        raise UserError(f"{name}={value!r}: pass a whole number from 1 to {most}") from None
    if not number.is_integer() or not 1 <= number <= most:
        raise UserError(f"{name}={value}: pass a whole number from 1 to {most}")
    return int(number)


def _check_size(path: Path, name: str) -> None:
    """Refuse an image of more than MAX_PIXELS before decoding it (PIL reads the size from the header); a file PIL
    cannot open is left to the reader, whose message names it."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Exception:  # noqa: BLE001  (unreadable: predict_images reports it)
        return
    if width * height > MAX_PIXELS:
        raise UserError(f"{name} is {width} x {height} pixels ({width * height / 1e6:.1f} MP); the demo takes at most "
                        f"{MAX_PIXELS / 1e6:.1f} MP: downscale it, or run predict.py on it with "
                        "inference.processing_res=<longest side>")


def uploaded_file(record, upload_folder: str | Path) -> tuple[str | None, str | None]:
    """(path, original name) of the image a request names, which must be a file Gradio received as an upload (in
    its upload folder, `upload_folder`). The API takes whatever a client sends: a path anywhere on the server would
    otherwise be read, predicted and returned. Everything else gets one message, which says nothing about whether
    the path exists."""
    if record is None:
        return None, None
    if isinstance(record, dict):
        path, name = record.get("path"), record.get("orig_name")
    else:
        path, name = getattr(record, "path", None) or record, getattr(record, "orig_name", None)
    refused = UserError("the image must be a file uploaded to this demo")
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise refused
    try:
        real = Path(os.path.realpath(path))  # symlinks and .. resolved: where the bytes really are
        root = Path(os.path.realpath(upload_folder))
    except (OSError, ValueError):
        raise refused from None
    if root == real or root not in real.parents or not real.is_file():
        raise refused
    return str(real), name if isinstance(name, str) else None


def build_ui(demo: Demo):
    """The page; its elements have stable ids for a browser to find (tests/test_app_browser.py): input-image,
    run-button, prediction, prediction-npy, prediction-png16, prediction-uncertainty."""
    import gradio as gr

    tasks = list(demo.views)  # a task, or one map of it ("intrinsics: albedo")
    steps0, ensemble0 = demo.defaults(tasks[0])

    def run(image, task, steps, ensemble):
        # preprocess=False: `image` is Gradio's raw upload record, so an unreadable file reaches our reader (a clear
        # message) instead of failing inside Gradio's own image decoding. Gradio then checks nothing about it: the
        # record is the client's word, and only a file in Gradio's upload folder is taken (uploaded_file).
        try:
            path, name = uploaded_file(image, upload_folder())
            return demo.predict(path, task, steps, ensemble, name=name)
        except UserError as error:
            raise gr.Error(str(error)) from None
        except OSError as error:  # the server's disk (full, not writable): say so, without the server's paths
            raise gr.Error(f"the server could not write the prediction: {error.strerror or error}") from None

    def pick(task):
        steps, ensemble = demo.defaults(task)
        return gr.update(value=steps), gr.update(value=ensemble)

    loaded = "\n".join(f"- **{task}**: {demo.sources[task]} (inference.steps={demo.defaults(task)[0]})"
                       for task in demo.models)
    with gr.Blocks(title="densediff", delete_cache=(3600, 3600)) as blocks:
        gr.Markdown(f"# densediff: dense prediction with diffusion priors\nModels on {demo.device}:\n{loaded}")
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="image", type="filepath", sources=["upload", "clipboard"],
                                 elem_id="input-image")
                task = gr.Dropdown(tasks, value=tasks[0], label="task")
                steps = gr.Slider(1, MAX_STEPS, value=min(max(steps0, 1), MAX_STEPS), step=1,
                                  label="denoising steps")
                ensemble = gr.Slider(1, MAX_ENSEMBLE, value=min(max(ensemble0, 1), MAX_ENSEMBLE), step=1,
                                     label="ensemble members",
                                     info="more than 1 starts from gaussian noise when the model's "
                                          "inference.noise is zeros")
                button = gr.Button("Run", variant="primary", elem_id="run-button")
            with gr.Column():
                coloured = gr.Image(label="prediction", type="filepath", format="png", interactive=False,
                                    elem_id="prediction")
                npy = gr.File(label="float prediction (.npy)", interactive=False, elem_id="prediction-npy")
                png16 = gr.File(label="16-bit PNG (depth)", interactive=False, elem_id="prediction-png16")
                spread = gr.Image(label="uncertainty (ensembles: how much the members disagree)", type="filepath",
                                  format="png", interactive=False, elem_id="prediction-uncertainty")
        task.change(pick, inputs=task, outputs=[steps, ensemble], api_name=False)
        button.click(run, inputs=[image, task, steps, ensemble], outputs=[coloured, npy, png16, spread],
                     api_name="predict", preprocess=False)
    return blocks


def upload_folder() -> str:
    """Where Gradio keeps uploaded files ($GRADIO_TEMP_DIR, else <tmp>/gradio), as Gradio itself finds it."""
    from gradio.utils import get_upload_folder
    return get_upload_folder()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    from densediff.process import prepare_process

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    prepare_process()  # before torch: thread settings, config resolvers (densediff/process.py)
    if importlib.util.find_spec("gradio") is None:
        print("error: the demo needs gradio: pip install -e \".[app]\"", file=sys.stderr)
        return 1
    from densediff.run.commands import CommandLineError, usage_or_config
    try:
        if usage_or_config("app", argv, __doc__):
            return 0
        ckpts, server, overrides = parse_args(argv)
    except (CommandLineError, AppArgumentError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from densediff.data.common import DataReadError
    from densediff.run import ConfigError
    try:
        models, sources, device = load_models(ckpts, overrides)
    except (HydraException, OmegaConfBaseException) as error:  # a value Hydra accepted but the predict config not
        print("error: " + " ".join(line.strip() for line in str(error).splitlines() if line.strip()), file=sys.stderr)
        return 1
    except (ConfigError, FileNotFoundError, DataReadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        from densediff.io import describe_os_error
        print(f"error: {describe_os_error(error)}", file=sys.stderr)
        return 1
    workdir = tempfile.mkdtemp(prefix="densediff-app-")
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home (and none possible offline)
    blocks = build_ui(Demo(models, sources, device, workdir))
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the server like Ctrl-C: the temp folder is removed
    blocks.queue(max_size=20).launch(server_name=server["server_name"], server_port=server["server_port"],
                                     share=server["share"], allowed_paths=[workdir], ssr_mode=False,
                                     show_error=True, max_file_size=MAX_UPLOAD)
    return 0


if __name__ == "__main__":
    sys.exit(main())
