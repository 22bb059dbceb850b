"""Every published recipe for a few optimizer steps at Stable Diffusion's size: what to run on a new machine before a
week-long job (`make check-recipes`). Not a test: a table of pass/fail, step time, peak memory and checkpoint sizes.

    python benchmarks/check_recipes.py [--recipes NAME ...] [--tiny] [--cache DIR] [--work DIR] [--out FILE]
                                       [--steps 2] [--height 128 --width 160] [--max-rss-gb 19] [--timeout 1800]

Each recipe (every conf/experiment file that names a task_name: the top-level ones and the complete recipes of its
subfolders, not shared parts such as dmp/base.yaml or prior/budget.yaml) trains with train.py, in its own process, for
`--steps` optimizer steps on the embedded procedural scenes at `--height` x `--width`, with a backbone folder of random
weights in the recipe's layout: SD 1.5 (sd14, sd15: 4-channel UNet, 768-d cross-attention), SD 2 (sd2, sd2_base:
4-channel, 1024-d, widened to 8 at load where the recipe does), Marigold (the 8-channel SD 2 UNet Marigold and E2E-FT
start from) or GeoWizard (SD 2's UNet with GeoWizard's class embedding and 768-d image-token context, a small CLIP image
encoder). Recipes on a tiny backbone (the prior/ comparisons) take their parent recipe's layout; DiffusionMTL with its
ResNet-18 encoder runs as it is (its size is the recipe's). Text and image encoders are small random ones: they are
frozen and only their output width matters (the empty prompt is encoded once). The folders are built once, each in
its own process, into `--cache` (about 4 GB each) and reused.

Everything else is the recipe's own: adapter, gradient checkpointing, optimiser and schedule, batch size, precision.
The check changes only what a 2-step run on a CPU needs: trainer.accumulate_grad_batches=1 (accumulation multiplies
the time, not the memory), one validation batch of one image with one ensemble member at the rendered size
(inference.ensemble=1, inference.processing_res=0; `--validation-steps` caps its denoising steps), no logger, and
the checkpoint settings that write each kind once:
checkpoint_every_n_steps=<steps> with callbacks.last_checkpoint.keep_periodic=true and half_precision=true, so a run
leaves last.ckpt (resumable), best-step<N>.ckpt (weights, float32) and iter-step<N>.ckpt (weights, half precision).

Per recipe: pass/fail (the error's last line), the wall time of each optimizer step (densediff.callbacks.StepTimes:
the first includes warm-up; checkpoint writes are not counted), the peak resident memory of its process (the kernel's
maxrss for that child), the size of each checkpoint kind, and the run's wall time. A run whose resident memory grows
past `--max-rss-gb` is stopped (reported as such); one failure does not stop the rest. The table is written as JSON
(`--out`) and printed last. `--tiny` runs the same on the tiny backbones (seconds per recipe): the smoke mode a test
runs so this script cannot rot.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "conf" / "experiment"
LAYOUTS = ("sd15", "sd2", "marigold", "geowizard")
DEFAULT_CACHE = Path(os.environ.get("DENSEDIFF_CACHE") or Path.home() / ".cache" / "densediff") / "check_recipes"
FOLDER_VERSION = 1  # bump when build_folder changes: the cached folders are rebuilt


# ----------------------------------------------------------------------------------------------- the recipes

def recipes() -> list[str]:
    """Every complete recipe under conf/experiment (a file that names its task_name), as experiment=<name>."""
    from omegaconf import OmegaConf

    names = []
    for path in sorted(EXPERIMENTS.rglob("*.yaml")):
        if "task_name" in OmegaConf.load(path):
            names.append(path.relative_to(EXPERIMENTS).with_suffix("").as_posix())
    return sorted(names, key=lambda n: (n.count("/"), n))


RECIPE_KEYS = ["backbone.name", "backbone.layout", "backbone.unet_in_channels", "backbone.gradient_checkpointing",
               "objective.name", "encoder.name", "adapter.kind", "dataset.batch_size", "inference.steps",
               "trainer.precision"]


def recipe_settings(name: str) -> dict:
    """The recipe's settings this script reads (RECIPE_KEYS), on the procedural data, as plain values: composed by
    densediff's config boundary (densediff/run), which is the one place that reads a config."""
    from densediff.process import prepare_process

    prepare_process()  # before torch: densediff.run imports it
    from densediff.run.config import recipe_settings as settings_of

    return settings_of([f"experiment={name}", "dataset=procedural"], RECIPE_KEYS)


def layout_of(recipe: dict) -> tuple[str | None, bool]:
    """(the recipe's backbone layout, whether its backbone group must change to carry it): None for a recipe whose
    model reads no diffusion backbone (DiffusionMTL with the ResNet-18 encoder)."""
    objective = recipe["objective.name"]
    if objective == "multitask" and recipe["encoder.name"] != "diffusion":
        return None, False
    name = str(recipe["backbone.name"])
    tiny = name in ("tiny", "tiny_random", "tiny_sd")
    if recipe["backbone.layout"] == "geowizard" or name.endswith("geowizard"):
        return "geowizard", tiny
    if name in ("sd14", "sd15"):
        return "sd15", False
    if name.startswith("sd2"):
        return "sd2", False
    if name.startswith("marigold"):
        return "marigold", False
    if objective == "self_improving" or int(recipe["backbone.unet_in_channels"] or 8) == 4:
        return "sd15", True  # a text-to-image generator (Diff-2-in-1) or DMP's 4-channel UNet: SD 1.x
    return "marigold", False  # the tiny backbone is Marigold's layout


SWITCH = {"sd15": "sd15", "geowizard": "geowizard"}  # the group a tiny-backbone recipe takes for a layout


# ----------------------------------------------------------------------------------------------- the folders

def build_folder(layout: str, output: Path) -> None:
    """A diffusers folder in `layout` with random weights (seeded): the UNet and VAE at Stable Diffusion's size."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    import densediff  # noqa: F401  (its thread settings)
    from densediff.backbones.tiny import save_marigold_folder, tiny_text_encoder_and_tokenizer

    torch.manual_seed(0)
    sd15 = layout == "sd15"
    context = 768 if layout in ("sd15", "geowizard") else 1024
    unet_options = dict(in_channels=4 if layout in ("sd15", "sd2") else 8, out_channels=4,
                        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=context)
    if sd15:
        unet_options.update(attention_head_dim=8, sample_size=64)
    else:
        unet_options.update(attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, sample_size=96)
    if layout == "geowizard":
        from densediff.backbones.geowizard_unet import CLASS_LABEL_DIM
        unet_options.update(class_embed_type="projection", projection_class_embeddings_input_dim=CLASS_LABEL_DIM)
    unet = UNet2DConditionModel(**unet_options)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                        sample_size=512 if sd15 else 768, scaling_factor=0.18215)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="epsilon" if sd15 else "v_prediction", set_alpha_to_one=False,
                              steps_offset=1, clip_sample=False)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if layout == "geowizard":
        from densediff.backbones.geowizard_build import save_geowizard, tiny_clip_image_encoder
        image_encoder, processor = tiny_clip_image_encoder(projection_dim=768)
        save_geowizard(tmp, unet, vae, scheduler, image_encoder, processor)
    else:
        _, tokenizer = tiny_text_encoder_and_tokenizer()  # a character vocabulary; one layer of the real width
        text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=context, intermediate_size=64, num_attention_heads=4,
                                                    num_hidden_layers=1, vocab_size=len(tokenizer), bos_token_id=0,
                                                    eos_token_id=1, pad_token_id=1, max_position_embeddings=77))
        save_marigold_folder({"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
                              "scheduler": scheduler}, tmp)
        index = json.loads((tmp / "model_index.json").read_text())
        # a plain pipeline name declares no task (train.py would note a re-purposed depth model otherwise)
        index["_class_name"] = "StableDiffusionPipeline" if layout != "marigold" else "MarigoldPipeline"
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    if output.exists():
        shutil.rmtree(output)
    tmp.rename(output)


def folder_for(layout: str, cache: Path, tiny: bool) -> Path:
    """The backbone folder of `layout`: built into the cache on first use (in its own process), or, with --tiny,
    the shipped tiny ones (tiny_sd for SD 1.x/2, tiny for Marigold, the tiny GeoWizard derived from it)."""
    if tiny:
        assets = ROOT / "densediff" / "assets"
        if layout == "geowizard":
            code = ("from densediff.backbones.geowizard_build import tiny_geowizard_folder; "
                    "print(tiny_geowizard_folder())")
            out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), capture_output=True,
                                 text=True, check=True)
            return Path(out.stdout.strip().splitlines()[-1])
        return assets / ("tiny" if layout == "marigold" else "tiny_sd")
    folder = cache / f"{layout}-v{FOLDER_VERSION}"
    if not (folder / "model_index.json").is_file():
        print(f"building the SD-sized {layout} folder (random weights) in {folder} ...", flush=True)
        started = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--build-layout", layout, "--build-output", str(folder)],
                       cwd=ROOT, env=child_env(), check=True)
        print(f"  built in {time.perf_counter() - started:.0f} s", flush=True)
    return folder


# ----------------------------------------------------------------------------------------------- one run

def child_env() -> dict:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def overrides_for(name: str, recipe: dict, folder: Path | None, layout: str | None, switch: bool, args) -> list[str]:
    batch = int(recipe["dataset.batch_size"])
    out = [f"experiment={name}", "dataset=procedural", f"dataset.height={args.height}", f"dataset.width={args.width}",
           f"dataset.train.num_scenes={batch}", "dataset.val.num_scenes=1", "dataset.val_batch_size=1",
           f"trainer.max_steps={args.steps}", "trainer.accumulate_grad_batches=1",
           f"trainer.val_check_interval={args.steps}", "trainer.limit_val_batches=1",
           "trainer.enable_progress_bar=false", "logger=none", "inference.ensemble=1", "inference.processing_res=0",
           f"checkpoint_every_n_steps={args.steps}", "callbacks.last_checkpoint.keep_periodic=true",
           "callbacks.last_checkpoint.half_precision=true"]
    if args.validation_steps and int(recipe["inference.steps"]) > args.validation_steps:
        out.append(f"inference.steps={args.validation_steps}")  # the validations' cost, not the training's
    if folder is not None:
        if switch:
            out.append(f"backbone={SWITCH[layout]}")
        out.append(f"backbone.path={folder}")
    return out


def checkpoint_sizes(folder: Path) -> dict:
    sizes = {}
    for path in sorted(folder.glob("*.ckpt")) if folder.is_dir() else []:
        kind = ("last" if path.name == "last.ckpt" else "best" if path.name.startswith("best-") else
                "periodic_half" if path.name.startswith("iter-") else path.stem)
        sizes[kind] = max(sizes.get(kind, 0), path.stat().st_size)
    return sizes


def last_error(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors[-1] if errors else lines[-1] if lines else "no output")[:300]


def run_recipe(name: str, args, cache: Path, work: Path) -> dict:
    row = {"recipe": name}
    try:
        recipe = recipe_settings(name)
        layout, switch = layout_of(recipe)
        folder = folder_for(layout, cache, args.tiny) if layout else None
    except Exception as error:  # a recipe that does not compose, a folder that cannot be built
        return {**row, "status": "fail", "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
    row.update(layout=layout or "resnet18 (no diffusion backbone)", adapter=str(recipe["adapter.kind"]),
               objective=str(recipe["objective.name"]), batch_size=int(recipe["dataset.batch_size"]),
               gradient_checkpointing=bool(recipe["backbone.gradient_checkpointing"] or False),
               precision=str(recipe["trainer.precision"] or "32-true"))
    run = work / name.replace("/", "-")
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    times = run / "step_times.json"
    command = [sys.executable, "train.py", *overrides_for(name, recipe, folder, layout, switch, args),
               f"hydra.run.dir={run}", "+callbacks.step_times._target_=densediff.callbacks.StepTimes",
               f"+callbacks.step_times.path={times}"]
    log = work / f"{run.name}.log"
    limit = int(args.max_rss_gb * 1e9)
    started = time.perf_counter()
    peak_seen, stopped = 0, None
    with open(log, "w") as out:
        out.write(" ".join(command) + "\n\n")
        out.flush()
        process = subprocess.Popen(command, cwd=ROOT, env=child_env(), stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            peak_seen = max(peak_seen, rss_bytes(process.pid))
            elapsed = time.perf_counter() - started
            if stopped is None and (peak_seen > limit or elapsed > args.timeout):
                stopped = (f"stopped: resident memory {peak_seen / 1e9:.1f} GB > {args.max_rss_gb} GB"
                           if peak_seen > limit else f"stopped: still running after {args.timeout} s")
                os.killpg(process.pid, signal.SIGKILL)
            time.sleep(0.5)
    process.returncode = os.waitstatus_to_exitcode(status)
    row["wall_s"] = round(time.perf_counter() - started, 1)
    row["peak_rss_gb"] = round(max(usage.ru_maxrss * 1024, peak_seen) / 1e9, 2)
    steps = json.loads(times.read_text())["steps"] if times.is_file() else []
    row["step_s"] = [round(s, 2) for s in steps]
    row["checkpoints_bytes"] = checkpoint_sizes(run / "checkpoints")
    if stopped or process.returncode != 0:
        row.update(status="fail", error=stopped or last_error(log), log=str(log))
    else:
        row["status"] = "pass"
    if not args.keep:
        shutil.rmtree(run, ignore_errors=True)
    return row


# ----------------------------------------------------------------------------------------------- the table

def gb(size) -> str:
    return "-" if not size else f"{size / 1e9:.2f}" if size >= 1e7 else f"{size / 1e9:.4f}"


def table(rows: list[dict]) -> str:
    head = ("| recipe | layout | adapter | status | batch | grad. ckpt | precision | step s (1st, 2nd, ...) | "
            "peak RSS GB | last.ckpt GB | best GB | periodic half GB | wall s |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in rows:
        c = r.get("checkpoints_bytes", {})
        step = r.get("step_s") or []
        status = r["status"] if r["status"] == "pass" else f"FAIL: {r.get('error', '')}"
        checkpointing = {True: "yes", False: "no"}.get(r.get("gradient_checkpointing"), "-")
        lines.append(f"| {r['recipe']} | {r.get('layout', '-')} | {r.get('adapter', '-')} | {status} | "
                     f"{r.get('batch_size', '-')} | {checkpointing} | {r.get('precision', '-')} | "
                     f"{', '.join(map(str, step)) or '-'} | {r.get('peak_rss_gb', '-')} | {gb(c.get('last'))} | "
                     f"{gb(c.get('best'))} | {gb(c.get('periodic_half'))} | {r.get('wall_s', '-')} |")
    return "\n".join(lines)


def machine() -> dict:
    """benchmarks/report.py's machine block (computed in a child: this process stays without torch) and the memory."""
    code = "import json, report; print(json.dumps(report.machine()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "benchmarks", env=child_env(), capture_output=True,
                         text=True, check=True)
    block = json.loads(out.stdout.strip().splitlines()[-1])
    meminfo = Path("/proc/meminfo")
    total = next((int(line.split()[1]) * 1024 for line in meminfo.read_text().splitlines()
                  if line.startswith("MemTotal:")), None) if meminfo.is_file() else None
    return {**block, "memory_gb": round(total / 1e9, 1) if total else None}


def available_gb() -> float:
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return float("inf")
    kb = next((int(line.split()[1]) for line in meminfo.read_text().splitlines() if line.startswith("MemAvailable:")),
              None)
    return kb * 1024 / 1e9 if kb is not None else float("inf")


def wait_for_memory(least_gb: float) -> None:
    """A machine shared with other jobs: start the next recipe only when `least_gb` is available."""
    said = False
    while available_gb() < least_gb:
        if not said:
            print(f"  waiting for {least_gb} GB of memory to be available ({available_gb():.1f} GB now) ...",
                  flush=True)
            said = True
        time.sleep(10)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="+", help="experiment names (default: every recipe)")
    parser.add_argument("--tiny", action="store_true", help="the tiny backbones (the smoke mode: seconds a recipe)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the SD-sized folders are built")
    parser.add_argument("--work", type=Path, default=None, help="the runs' folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "check_recipes.json")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--height", type=int, default=None, help="default 128 (32 with --tiny)")
    parser.add_argument("--width", type=int, default=None, help="default 160 (40 with --tiny)")
    parser.add_argument("--max-rss-gb", type=float, default=19.0, help="stop a run whose resident memory passes it")
    parser.add_argument("--timeout", type=float, default=1800, help="stop a run after this many seconds")
    parser.add_argument("--validation-steps", type=int, default=None,
                        help="cap the denoising steps of the validations (default: each recipe's inference.steps)")
    parser.add_argument("--wait-free-gb", type=float, default=0.0,
                        help="before each recipe, wait until the machine has this much memory available")
    parser.add_argument("--keep", action="store_true", help="keep each run's folder (checkpoints included)")
    parser.add_argument("--build-layout", choices=LAYOUTS, help=argparse.SUPPRESS)
    parser.add_argument("--build-output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build_layout:
        build_folder(args.build_layout, args.build_output)
        return 0
    args.height = args.height or (32 if args.tiny else 128)
    args.width = args.width or (40 if args.tiny else 160)
    known = recipes()
    chosen = args.recipes or known
    unknown = [n for n in chosen if n not in known]
    if unknown:
        parser.error(f"unknown recipe {unknown[0]!r}; the recipes: {', '.join(known)}")
    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="densediff-check-recipes-"))
    work.mkdir(parents=True, exist_ok=True)
    size = "tiny" if args.tiny else "SD"
    print(f"checking {len(chosen)} recipes at {size} size, {args.steps} steps at {args.height}x{args.width}; "
          f"logs in {work}", flush=True)
    rows, host = [], machine()
    for i, name in enumerate(chosen, 1):
        wait_for_memory(args.wait_free_gb)
        print(f"[{i}/{len(chosen)}] {name} ...", flush=True)
        row = run_recipe(name, args, args.cache, work)
        rows.append(row)
        c = row.get("checkpoints_bytes", {})
        print(f"[{i}/{len(chosen)}] {name}: {row['status']}"
              + (f" ({row['error']})" if row["status"] != "pass" else "")
              + f", steps {row.get('step_s')} s, peak {row.get('peak_rss_gb')} GB, "
              f"last {gb(c.get('last'))} GB, best {gb(c.get('best'))} GB, periodic half "
              f"{gb(c.get('periodic_half'))} GB, {row.get('wall_s')} s", flush=True)
        report = {"machine": host, "size": size, "steps": args.steps, "height": args.height,
                  "width": args.width, "validation_steps": args.validation_steps, "recipes": rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(f".{args.out.name}.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")  # rewritten after each recipe: a stopped check keeps them
        tmp.replace(args.out)
    print(f"\nwrote {args.out}\n")
    print(table(rows))
    return 0 if all(r["status"] == "pass" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
