"""Write a trained checkpoint as a diffusers folder (Marigold layout) that diffusers' own pipelines load.

    densediff-export ckpt=<run>/checkpoints/last.ckpt output=<dir> [metrics=<evaluate.py run folder>]
    python -m densediff.export ...      (the same command; its root config is conf/export.yaml)

The folder holds the fine-tuned UNet (LoRA merged into it), the backbone's VAE, text encoder and tokenizer, and its
scheduler with the model's timestep spacing (trailing for E2E-FT); model_index.json names MarigoldDepthPipeline,
MarigoldNormalsPipeline or (task=intrinsics, Marigold v1.1's n-target UNet) MarigoldIntrinsicsPipeline with its
target_properties, with the model's inference steps and resolution as defaults (1 step and native resolution for
E2E-FT). Either latent paradigm exports when it conditions by concatenation (E2E-FT, Marigold-style diffusion);
DMP's interpolation has no diffusers pipeline. A model whose normals use the x-left frame (backbone.normals_frame)
exports as it is: diffusers' pipeline then returns x-left normals. A LoRA run also gets its adapter alone as
`pytorch_lora_weights.safetensors` (peft format, unprefixed keys: `UNet2DConditionModel.load_lora_adapter(dir,
prefix=None, weight_name="pytorch_lora_weights.safetensors")` reads it; without weight_name diffusers 0.42 looks
for a .bin in a folder that holds other files).

The folder also gets a model card, README.md, as diffusers' training scripts write one (huggingface_hub's
ModelCard: YAML front matter with library_name diffusers, tags, base_model and pipeline_tag; then the training recipe
from the run's saved config, the data, the metrics, the pipeline class and a usage example). Its metrics are those of
`metrics=` (an evaluate.py run folder or its metrics.json; the split it scored is named), else the training run's
own metrics.json (the validation at the end of training).

Documented differences from our predictor when the folder runs in diffusers' Marigold pipeline with
num_inference_steps=1 and zero latents: diffusers returns the DDIM `prev_sample` (a mix of x0 and a little of the
predicted noise) where E2E-FT returns x0, and it does not min-max normalise a single depth map.
"""

from __future__ import annotations

import sys
from pathlib import Path


def _metrics_source(ckpt: Path, metrics: str | Path | None) -> Path | None:
    """The run folder whose metrics.json the card reports: `metrics` (a folder or its metrics.json), else the
    training run that wrote `ckpt` (<run>/checkpoints/<name>.ckpt) when it has one."""
    if metrics is not None:
        folder = Path(metrics)
        folder = folder.parent if folder.name == "metrics.json" else folder
        if not (folder / "metrics.json").is_file():
            raise FileNotFoundError(f"metrics={metrics}: no metrics.json there (an evaluate.py run folder)")
        return folder
    run = ckpt.resolve().parent.parent
    return run if (run / "metrics.json").is_file() else None


def model_card(pipeline_class: str, task: str, paradigm: str, hparams: dict, defaults: dict, training: dict,
               scores: dict, folder: str, tag: str | None = None, usage: list[str] | None = None):
    """The model card (huggingface_hub.ModelCard) of an exported folder, from plain values: the pipeline class
    name, task, paradigm (and its tag, `tag`; default the paradigm's name), the checkpoint's hyper-parameters, the
    pipeline's defaults, run.run_record of the training run and of the run that scored it (may be the same, or {}),
    and the usage example's lines (default: diffusers' pipeline class, usage_example)."""
    tag = tag or paradigm
    from huggingface_hub import ModelCard, ModelCardData

    saved_adapter = hparams.get("adapter") or {}  # the latent paradigms' adapter dict; none for the others
    adapter, rank = str(saved_adapter.get("kind", "full")), saved_adapter.get("rank")
    backbone_path = (hparams.get("backbone") or {}).get("path", hparams.get("backbone_path"))
    kind = {"depth": "depth-estimation", "intrinsics": "intrinsic-image-decomposition"}.get(task, "normals-estimation")
    tags = ["diffusers", "densediff", "marigold", kind, tag, *(["lora"] if adapter.startswith("lora") else [])]
    data = ModelCardData(library_name="diffusers", tags=list(dict.fromkeys(tags)),
                         base_model=training.get("base_model"),
                         pipeline_tag="depth-estimation" if task == "depth" else None)
    choices = training.get("choices", {})
    recipe = {
        "experiment": choices.get("experiment"), "objective (paradigm)": training.get("objective", paradigm),
        "backbone": f"{training.get('backbone', '?')} (`{backbone_path}`)", "adapter":
        adapter + (f", rank {rank}" if adapter.startswith("lora") else ""),
        "task": task, "dataset": training.get("dataset"), "optimizer steps": training.get("steps"),
        "learning rate": training.get("lr", hparams.get("lr")), "batch size": training.get("batch_size"),
        "gradient accumulation": training.get("accumulate_grad_batches"), "precision": training.get("precision"),
        "seed": training.get("seed")}
    title = "intrinsic image decomposition" if task == "intrinsics" else f"{task} estimation"
    lines = [f"# {title} with a diffusion prior ({tag})", "",
             f"Fine-tuned with densediff (dense prediction with diffusion priors) and exported for diffusers' "
             f"`{pipeline_class}`: the "
             f"fine-tuned UNet{' with its LoRA merged' if adapter.startswith('lora') else ''}, the backbone's VAE, "
             "text encoder and tokenizer, and a DDIM scheduler with the model's timestep spacing. The pipeline "
             f"defaults to {defaults['steps']} denoising step(s) at "
             + (f"processing resolution {defaults['processing_res']}" if defaults["processing_res"] else
                "the input's own resolution") + ".", "", "## Usage", "", "```python",
             *(usage or usage_example(pipeline_class, folder)), "```", "",
             "`prediction` is a numpy array " + {
                 "depth": "(1, H, W, 1), affine-invariant depth in [0, 1]",
                 "intrinsics": "(targets, H, W, 3), one map in [0, 1] per target in the order of model_index.json's "
                               "target_properties.target_names"}.get(task, "(1, H, W, 3), unit normals") + ".", "",
             "## Training recipe", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in recipe.items() if v is not None]
    if training.get("overrides"):
        lines += ["", "Command line: `train.py " + " ".join(training["overrides"]) + "`"]
    dataset = training.get("dataset", "?")
    about = (": densediff's built-in renderer of random indoor scenes (walls, boxes, spheres, a point light) with "
             "exact ground truth, deterministic by seed" if str(dataset).startswith("procedural") else
             " (densediff's dataset config of that name; its data is not part of this folder)")
    lines += ["", "## Data", "", f"Trained on `dataset={dataset}`{about}."]
    metrics = scores.get("metrics")
    if metrics:
        by = ("train.py's validation at the end of training" if scores.get("job") == "train" else
              f"evaluate.py of `{scores.get('checkpoint', 'this checkpoint')}`")
        lines += ["", "## Metrics", "", f"On `{scores.get('dataset', '?')}`, split `{scores.get('split', '?')}` "
                  f"({by}; densediff's own predictor, which can differ slightly from diffusers' pipeline: it returns "
                  "x0 where the pipeline returns DDIM's prev_sample):", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in metrics.items()]
    else:
        lines += ["", "## Metrics", "", "No metrics.json was found for this checkpoint (evaluate it with densediff's "
                  "evaluate.py and export with `metrics=<that run>`)."]
    return ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(lines) + "\n")


def usage_example(pipeline_class: str, folder: str) -> list[str]:
    """Three lines that run the exported folder in diffusers (`image.png`: the user's image)."""
    return ["import diffusers",
            f"pipe = diffusers.{pipeline_class}.from_pretrained({folder!r})",
            'prediction = pipe(diffusers.utils.load_image("image.png")).prediction']


def export(ckpt: str | Path, output: str | Path, metrics: str | Path | None = None) -> Path:
    """`ckpt` as a diffusers folder at `output` with its model card: the paradigm's own layout where its class has
    one (its export_pipeline hook, densediff/paradigms/base.py), else the Marigold layout (export_marigold)."""
    from densediff.io import write_text
    from densediff.run.checkpoint import check_checkpoint_file, read_record
    from densediff.run.rundir import run_record

    ckpt, output = check_checkpoint_file(ckpt), Path(output)
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"output={output} exists and is not empty; choose a new folder")
    scored = _metrics_source(ckpt, metrics)  # before writing anything: a wrong metrics= fails first
    record = read_record(ckpt)
    try:
        model = record.load()
    except (KeyError, TypeError, AttributeError, RuntimeError) as error:  # a foreign file torch could read
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"cannot load checkpoint {ckpt}: not a checkpoint of train.py ({cause})") from None
    exported = model.export_pipeline(output)
    pipeline_class, usage = exported if exported is not None else (export_marigold(model, output), None)
    card = model_card(pipeline_class, model.task.name, record.paradigm, dict(model.hparams),
                      {"steps": model.inference.steps, "processing_res": model.inference.processing_res},
                      run_record(ckpt.resolve().parent.parent), run_record(scored) if scored else {}, str(output),
                      tag=model.card_tag, usage=usage)
    write_text(output / "README.md", str(card))
    return output


def export_marigold(model, output: Path) -> str:
    """`model` (a latent model conditioned by concatenation) as a folder in the Marigold layout that diffusers'
    MarigoldDepthPipeline / MarigoldNormalsPipeline load; returns that pipeline's class name."""
    from diffusers import DDIMScheduler, MarigoldDepthPipeline, MarigoldIntrinsicsPipeline, MarigoldNormalsPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    from densediff.backbones.load import resolve_backbone_path

    estimator = getattr(model, "estimator", None)
    if estimator is None:
        raise ValueError(f"a {model.paradigm} model has no UNet + VAE estimator to export as a diffusers folder")
    if getattr(estimator, "conditioning", "concat") != "concat":
        raise ValueError("this model uses DMP's interpolation conditioning, which no diffusers pipeline runs; only "
                         "concat-conditioned models (E2E-FT, Marigold-style diffusion) export to Marigold's layout")
    if model.task.name not in ("depth", "normals", "intrinsics"):
        raise ValueError(f"diffusers' Marigold pipelines predict depth, normals or intrinsics, not {model.task.name}")
    source = resolve_backbone_path(model.hparams.backbone["path"])
    unet = estimator.unet
    output.mkdir(parents=True, exist_ok=True)
    lora = model.hparams.adapter["kind"].startswith("lora")
    staging = output.parent / f".{output.name}.lora"
    if lora:  # save the adapter beside the folder first: save_pretrained below clears stray weight files
        unet.save_lora_adapter(staging)
        unet.fuse_lora()
        unet.unload_lora()
    # the betas the model was trained and is sampled with: rescaled to zero terminal SNR where objective.zero_snr
    # rescaled them (Marigold v1.1 from SD2, whose own scheduler is not)
    zero_snr = bool(estimator.scheduler_config.get("rescale_betas_zero_snr", False))
    scheduler = DDIMScheduler.from_pretrained(source, subfolder="scheduler", rescale_betas_zero_snr=zero_snr,
                                              timestep_spacing=model.inference.timestep_spacing)
    if model.task.name == "depth":
        pipeline_class, extra = MarigoldDepthPipeline, {"scale_invariant": True, "shift_invariant": True}
    elif model.task.name == "normals":
        pipeline_class, extra = MarigoldNormalsPipeline, {"use_full_z_range": True}
    else:  # Marigold v1.1 IID: the n-target UNet and each target's metadata (visualize_intrinsics reads it)
        pipeline_class, extra = MarigoldIntrinsicsPipeline, {"target_properties": model.task.target_properties}
    pipeline = pipeline_class(
        unet=unet, vae=estimator.vae, scheduler=scheduler,
        text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"),
        prediction_type=model.task.name, default_denoising_steps=model.inference.steps,
        default_processing_resolution=model.inference.processing_res, **extra)
    pipeline.save_pretrained(output, safe_serialization=True)
    if lora:
        (staging / "pytorch_lora_weights.safetensors").rename(output / "pytorch_lora_weights.safetensors")
        staging.rmdir()
    return pipeline_class.__name__


def main(argv: list[str] | None = None) -> int:
    """The command (module docstring): conf/export.yaml composed from the command line; one line and exit status 1
    for what a user can fix."""
    from densediff.process import prepare_process

    argv = list(sys.argv[1:] if argv is None else argv)
    prepare_process()  # before torch: thread settings (densediff/process.py)
    from densediff.run.commands import CommandLineError, command_options, report, usage_or_config
    try:
        if usage_or_config("export", argv, __doc__):
            return 0
        options, _ = command_options("export", argv, ("ckpt", "output", "metrics"))
        missing = [key for key in ("ckpt", "output") if options[key] in (None, "")]
        if missing:
            raise CommandLineError(f"pass {' and '.join(f'{key}=' for key in missing)}: densediff-export "
                                   "ckpt=<run>/checkpoints/last.ckpt output=<new folder> [metrics=<evaluate.py run>]")
        import torch

        from densediff.data.common import DataReadError

        try:
            metrics = None if options["metrics"] is None else str(options["metrics"])
            with torch.no_grad():  # not set_grad_enabled: main(argv) also runs inside other processes (tests, tools)
                path = export(str(options["ckpt"]), str(options["output"]), metrics)
        except (FileNotFoundError, FileExistsError, ValueError, DataReadError, OSError) as error:
            return report(error)
    except CommandLineError as error:
        return report(error)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
