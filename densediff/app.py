"""A Gradio demo: upload an image, pick the task and the steps, see the coloured prediction, download the float .npy
(and the 16-bit PNG for depth).

    python -m densediff.app ckpt=<run>/checkpoints/last.ckpt [ckpt=<another task's checkpoint> ...]
    python -m densediff.app backbone=<name> task=<depth|normals|...>      # a backbone as it is (e.g. backbone=tiny)

Any predict.py override applies (backbone.path=..., inference.steps=..., inference.processing_res=..., device=...),
plus server_name=127.0.0.1 server_port=7860 share=false. Several ckpt= serve several tasks, one model per task.
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

OWN = ("ckpt", "server_name", "server_port", "share")  # the app's own arguments; everything else goes to Hydra
KEEP_REQUESTS = 32  # request folders kept on disk (Gradio copies the files it serves into its own cache)


class AppArgumentError(ValueError):
    """A bad command-line argument of the app itself."""


def parse_args(argv: list[str]) -> tuple[list[str], dict, list[str]]:
    """(checkpoints, server options, Hydra overrides) from key=value arguments; ckpt= may repeat."""
    ckpts, server, overrides = [], {"server_name": "127.0.0.1", "server_port": 7860, "share": False}, []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if key not in OWN:
            overrides.append(arg)
            continue
        if not sep or (key != "ckpt" and not value):
            raise AppArgumentError(f"{arg!r}: pass {key}=<value>")
        if key == "ckpt":
            if value not in ("", "null"):
                ckpts.append(value)
        elif key == "server_port":
            if not value.isdigit() or not 0 <= int(value) < 65536:
                raise AppArgumentError(f"server_port={value} is not a port number (0-65535)")
            server["server_port"] = int(value)
        elif key == "share":
            if value.lower() not in ("true", "false"):
                raise AppArgumentError(f"share={value}: pass share=true or share=false")
            server["share"] = value.lower() == "true"
        else:
            server[key] = value
    return ckpts, server, overrides


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
        self.workdir = Path(workdir)
        self._lock = threading.Lock()
        self._requests: deque[Path] = deque()

    def defaults(self, task: str) -> tuple[int, int]:
        options = self.models[task].inference
        return int(options.steps), int(options.ensemble)

    def _request_dir(self) -> Path:
        folder = Path(tempfile.mkdtemp(prefix="request-", dir=self.workdir))
        self._requests.append(folder)
        while len(self._requests) > KEEP_REQUESTS:
            shutil.rmtree(self._requests.popleft(), ignore_errors=True)
        return folder

    def predict(self, image: str | Path | None, task: str, steps: int, ensemble: int,
                name: str | None = None) -> tuple[str, str, str | None]:
        """(coloured PNG, float .npy, 16-bit PNG or None) for the image file `image`, written by predict.py's own
        writer into a fresh temporary folder. Errors a user can fix raise UserError with a readable message."""
        from densediff.inference.predict import output_paths, predict_images

        if image is None:
            raise UserError("upload an image first")
        if task not in self.models:
            raise UserError(f"no model for task {task!r}; loaded: {', '.join(self.models)}")
        model = self.models[task]
        options = model.inference
        try:
            steps, ensemble = int(steps), int(ensemble)
            noise = "gaussian" if ensemble > 1 and options.noise == "zeros" else options.noise
            request = dataclasses.replace(options, steps=steps, ensemble=ensemble, noise=noise)
        except (TypeError, ValueError) as error:
            raise UserError(str(error)) from error
        folder = self._request_dir()
        source = Path(image)
        stem = Path(name).stem if name else source.stem
        inputs, outputs = folder / "input", folder / "output"
        inputs.mkdir()
        local = inputs / f"{stem or 'image'}{source.suffix.lower() or '.png'}"
        shutil.copyfile(source, local)
        with self._lock:  # one model object per task: its options are set for this request only
            try:
                model.inference = request
                _, skipped = predict_images(model, inputs, [local], outputs, self.device)
            finally:
                model.inference = options
        if skipped:
            raise UserError(skipped[0].replace(str(local), local.name))
        paths = output_paths(local, inputs, outputs, task)
        png16 = paths.get("png16")
        return str(paths["png"]), str(paths["npy"]), str(png16) if png16 else None


class UserError(ValueError):
    """Shown in the UI as a gr.Error message."""


def build_ui(demo: Demo):
    """The page; its elements have stable ids for a browser to find (tests/test_app_browser.py): input-image,
    run-button, prediction, prediction-npy, prediction-png16."""
    import gradio as gr

    tasks = list(demo.models)
    steps0, ensemble0 = demo.defaults(tasks[0])

    def run(image, task, steps, ensemble):
        # preprocess=False: `image` is Gradio's raw upload record, so an unreadable file reaches our reader (a clear
        # message) instead of failing inside Gradio's own image decoding
        path, name = None, None
        if isinstance(image, dict):
            path, name = image.get("path"), image.get("orig_name")
        elif image is not None:
            path = getattr(image, "path", None) or image
        try:
            return demo.predict(path, task, steps, ensemble, name=name)
        except UserError as error:
            raise gr.Error(str(error)) from None

    def pick(task):
        steps, ensemble = demo.defaults(task)
        return gr.update(value=steps), gr.update(value=ensemble)

    loaded = "\n".join(f"- **{task}**: {demo.sources[task]} (inference.steps={demo.defaults(task)[0]})"
                       for task in tasks)
    with gr.Blocks(title="densediff", delete_cache=(3600, 3600)) as blocks:
        gr.Markdown(f"# densediff: dense prediction with diffusion priors\nModels on {demo.device}:\n{loaded}")
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="image", type="filepath", sources=["upload", "clipboard"],
                                 elem_id="input-image")
                task = gr.Dropdown(tasks, value=tasks[0], label="task")
                steps = gr.Slider(1, 50, value=min(max(steps0, 1), 50), step=1, label="denoising steps")
                ensemble = gr.Slider(1, 10, value=min(max(ensemble0, 1), 10), step=1, label="ensemble members",
                                     info="more than 1 starts from gaussian noise when the model's "
                                          "inference.noise is zeros")
                button = gr.Button("Run", variant="primary", elem_id="run-button")
            with gr.Column():
                coloured = gr.Image(label="prediction", type="filepath", format="png", interactive=False,
                                    elem_id="prediction")
                npy = gr.File(label="float prediction (.npy)", interactive=False, elem_id="prediction-npy")
                png16 = gr.File(label="16-bit PNG (depth)", interactive=False, elem_id="prediction-png16")
        task.change(pick, inputs=task, outputs=[steps, ensemble], api_name=False)
        button.click(run, inputs=[image, task, steps, ensemble], outputs=[coloured, npy, png16],
                     api_name="predict", preprocess=False)
    return blocks


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        if importlib.util.find_spec("gradio") is None:
            raise AppArgumentError("the demo needs gradio: pip install -e \".[app]\"")
        ckpts, server, overrides = parse_args(argv)
    except AppArgumentError as error:  # before the slow imports below
        print(f"error: {error}", file=sys.stderr)
        return 1
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from densediff.data.common import DataReadError
    from densediff.run import ConfigError
    try:
        models, sources, device = load_models(ckpts, overrides)
    except (HydraException, OmegaConfBaseException) as error:  # an unknown group or key on the command line
        print("error: " + " ".join(line.strip() for line in str(error).splitlines() if line.strip()), file=sys.stderr)
        return 1
    except (ConfigError, FileNotFoundError, DataReadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    workdir = tempfile.mkdtemp(prefix="densediff-app-")
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home (and none possible offline)
    blocks = build_ui(Demo(models, sources, device, workdir))
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the server like Ctrl-C: the temp folder is removed
    blocks.queue(max_size=20).launch(server_name=server["server_name"], server_port=server["server_port"],
                                     share=server["share"], allowed_paths=[workdir], ssr_mode=False,
                                     show_error=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
