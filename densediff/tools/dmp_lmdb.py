"""DMP's pseudo ground truth (densediff.tools.dmp_data makedb): task maps from a densediff model or prediction
files, encoded as densediff.data.synthetic_bedrooms reads them, written into an LMDB."""

from __future__ import annotations

import collections
import io
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from densediff.tools.dmp_common import ToolError, existing, existing_dir, torch_device

LMDB_INITIAL_MAP = 1 << 30  # 1 GiB, doubled whenever a batch does not fit


def _lmdb():
    import lmdb

    return lmdb


def _check_db_output(path: Path, append: bool, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file; the LMDB output is a folder (data.mdb, lock.mdb)")
    exists = (path / "data.mdb").exists()
    if append and not exists:
        raise FileNotFoundError(f"{path / 'data.mdb'} does not exist: --append adds keys to an existing LMDB")
    if exists and not (append or overwrite):
        raise FileExistsError(f"{path / 'data.mdb'} exists; pass --append to add keys to it or --overwrite to "
                              f"replace it")


def write_lmdb(path, keys: list[str], value_of, *, append: bool = False, overwrite: bool = False,
               batch_size: int = 64, desc: str = "makedb") -> int:
    """Write `value_of(key)` (bytes) under every key, one write transaction per `batch_size` keys; the map grows
    (doubles) whenever a batch does not fit. With `append` the LMDB must exist and its keys are kept; a key already
    in it is refused unless `overwrite`. Without `append`, an existing LMDB is replaced only if `overwrite`."""
    lmdb, path = _lmdb(), Path(path)
    _check_db_output(path, append, overwrite)
    dupes = sorted(k for k, n in collections.Counter(keys).items() if n > 1)
    if dupes:
        raise ToolError(f"two inputs give the same LMDB key {dupes[0]!r} (keys are file names up to their first '.')")
    if not append and (path / "data.mdb").exists():
        for name in ("data.mdb", "lock.mdb"):
            (path / name).unlink(missing_ok=True)
    path.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), map_size=LMDB_INITIAL_MAP, subdir=True, readahead=False, meminit=False)
    try:
        env.set_mapsize(max(LMDB_INITIAL_MAP, env.info()["map_size"]))
        if append and not overwrite:
            with env.begin() as txn:
                present = next((k for k in keys if txn.get(k.encode()) is not None), None)
            if present is not None:
                raise FileExistsError(f"{path} already holds key {present!r}; pass --overwrite to replace its keys")
        for start in tqdm(range(0, len(keys), batch_size), desc=desc, unit="batch"):
            batch = [(k.encode(), value_of(k)) for k in keys[start:start + batch_size]]
            while True:
                try:
                    with env.begin(write=True) as txn:
                        for key, value in batch:
                            txn.put(key, value)
                    break
                except lmdb.MapFullError:
                    env.set_mapsize(env.info()["map_size"] * 2)
    finally:
        env.close()
    return len(keys)


def _png(array: np.ndarray) -> bytes:
    """uint8 HxW (grey) or HxWx3 (RGB) -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _palette_png(ids: np.ndarray, colours) -> bytes:
    """Class ids as a palette ('P') PNG: the pixels are the ids, the PLTE chunk the class colours (black beyond)."""
    image = Image.frombytes("P", (ids.shape[1], ids.shape[0]), np.ascontiguousarray(ids, np.uint8).tobytes())
    table = np.zeros((256, 3), np.uint8)
    table[:len(colours)] = np.asarray(colours, np.uint8)
    image.putpalette(table.reshape(-1).tolist())
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _unit8(values: np.ndarray) -> np.ndarray:
    return (np.clip(values.astype(np.float64), 0.0, 1.0) * 255.0).round().astype(np.uint8)


def encode_target(task: str, array: np.ndarray, where: str, *, palette: str = "bedroom", seg_format: str = "palette",
                  normals_axes=(1.0, -1.0, 1.0), depth_scale: float = 1.0) -> bytes:
    """One prediction (predict.py's .npy layout) -> the LMDB value densediff.data.synthetic_bedrooms decodes:
    depth HxW -> float16 npz 'x' (x depth_scale, metres); normals HxWx3 canonical -> RGB PNG of (n * axes + 1) / 2
    (the loader multiplies by the same axes, so the frame round-trips); albedo / shading HxWx3 (or HxW) in [0, 1]
    -> 8-bit PNG; segmentation HxW ids -> PNG (palette / rgb / index, see makedb --help)."""
    from densediff.data.synthetic_bedrooms import npz_bytes

    a = np.asarray(array)
    if task == "depth":
        if a.ndim != 2 or a.dtype.kind != "f":
            raise ToolError(f"{where}: depth must be a float HxW array, got {a.dtype} {a.shape}")
        return npz_bytes((a.astype(np.float64) * depth_scale).astype(np.float16))
    if task == "segmentation":
        if a.ndim != 2 or a.dtype.kind not in "iub":
            raise ToolError(f"{where}: segmentation must be an integer HxW array of class ids, got {a.dtype} {a.shape}")
        from densediff.tasks.palettes import IGNORE_COLOUR, palette_info

        colours = palette_info(palette)[0]
        ids = np.where((a >= 0) & (a < len(colours)), a, 255).astype(np.int64)  # out of range -> 255 (ignore)
        if seg_format == "palette":
            return _palette_png(ids, colours)
        if seg_format == "index":
            return _png(ids.astype(np.uint8))
        table = np.concatenate([np.asarray(colours, np.uint8), np.zeros((256 - len(colours), 3), np.uint8)])
        table[len(colours):] = IGNORE_COLOUR
        return _png(table[ids])
    if a.dtype.kind != "f" or not (a.ndim == 3 and a.shape[-1] == 3 or (a.ndim == 2 and task == "shading")):
        raise ToolError(f"{where}: {task} must be a float HxWx3 array, got {a.dtype} {a.shape}")
    if task == "normals":
        n = a.astype(np.float64) * np.asarray(normals_axes, np.float64)  # canonical -> file frame (axes are +-1)
        return _png(_unit8((n + 1.0) / 2.0))
    return _png(_unit8(a))


def _prediction_files(folder: Path) -> dict[str, Path]:
    files = sorted(p for p in folder.rglob("*.npy") if p.is_file())
    if not files:
        raise ToolError(f"{folder} holds no .npy predictions (predict.py writes <stem>.npy per image)")
    keys: dict[str, Path] = {}
    for f in files:
        key = f.name.split(".")[0]
        if key in keys:
            raise ToolError(f"{keys[key]} and {f} give the same LMDB key {key!r} (keys are file names up to their "
                            f"first '.')")
        keys[key] = f
    return keys


def _predict_with_model(args, task: str | None, folder: Path) -> str:
    """Run a densediff model (checkpoint or untrained backbone) over args.input with predict.py's code and rule
    (densediff.run.build_predictor), writing its .npy files into `folder`; return the model's task."""
    import torch
    from hydra.errors import HydraException

    from densediff.inference.predict import check_outputs, predict_images
    from densediff.run import load_predictor  # its ConfigError is a ValueError: main prints it
    from densediff.run.checkpoint import read_record

    overrides = list(args.set or [])
    record = None
    if args.ckpt:  # read once: its task here, the model from the same record
        ckpt = existing(args.ckpt, "a checkpoint written by train.py (<run>/checkpoints/last.ckpt)")
        record = read_record(ckpt.resolve())
        ckpt_task = record.task
        if task and ckpt_task and task != ckpt_task:
            raise ToolError(f"{ckpt} predicts {ckpt_task}, not --task {task}")
        task = task or ckpt_task
    else:
        overrides += [f"backbone={args.backbone}"]
    torch_device(args.device)  # a CUDA device that is not there: the tool's own message
    overrides = [*([f"task={task}"] if task else []), f"device={args.device}", *overrides]
    try:  # without --task: the backbone's declared task
        model, device, _ = load_predictor(overrides, ckpt.resolve() if args.ckpt else None, task_hint="pass --task",
                                          record=record)
    except HydraException as error:
        raise ToolError(f"cannot build the model config from {overrides}: {str(error).splitlines()[0]}") from error
    root, images, planned = check_outputs(args.input, folder, model.task.name, overwrite=True)
    with torch.no_grad():
        written, skipped = predict_images(model, root, images, folder, device, planned=planned)
    if skipped:
        raise ToolError(f"{len(skipped)} images could not be read, e.g. {skipped[0]}")
    return model.task.name


def makedb(args) -> int:
    out = Path(args.output)
    sources = [s for s in ("from_files", "predictions", "ckpt", "backbone") if getattr(args, s)]
    if len(sources) != 1:
        raise ToolError("pass exactly one source: --from-files DIR, --predictions DIR, --ckpt FILE or --backbone NAME")
    _check_db_output(out, args.append, args.overwrite)
    if args.from_files:
        folder = existing_dir(args.from_files, "a folder of files to store as raw bytes")
        files = sorted(f for f in os.listdir(folder) if (folder / f).is_file() and not f.startswith("."))
        if not files:
            raise ToolError(f"{folder} holds no files")
        suffix = f"-{args.key_suffix}" if args.key_suffix else ""
        keys = [f.split(".")[0] + suffix for f in files]
        by_key = dict(zip(keys, files))
        n = write_lmdb(out, keys, lambda k: (folder / by_key[k]).read_bytes(), append=args.append,
                       overwrite=args.overwrite, batch_size=args.batch_size)
        print(f"wrote {n} keys to {out}")
        return 0

    from densediff.data.synthetic_bedrooms import EXTRA_KEYS

    task = args.task
    if args.predictions:
        if task is None:
            raise ToolError("--predictions needs --task (depth, normals, albedo, shading or segmentation)")
        folder = existing_dir(args.predictions, "a folder of .npy predictions as predict.py writes them")
        return _write_predictions(args, task, folder, out, EXTRA_KEYS)
    if not args.input:
        raise ToolError("--ckpt / --backbone need -i/--input, the image folder to predict")
    existing(args.input, "the image folder (or one image) to run the model over")
    if args.keep_predictions:
        folder = Path(args.keep_predictions)
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):  # its .npy files all go to the LMDB
            raise FileExistsError(f"--keep-predictions {folder} is not an empty folder: choose a new one")
        task = _predict_with_model(args, task, folder)
        return _write_predictions(args, task, folder, out, EXTRA_KEYS)
    with tempfile.TemporaryDirectory(prefix="makedb-") as tmp:
        task = _predict_with_model(args, task, Path(tmp))
        return _write_predictions(args, task, Path(tmp), out, EXTRA_KEYS)


def _write_predictions(args, task: str, folder: Path, out: Path, extra_keys: dict) -> int:
    files = _prediction_files(folder)
    suffix = f"-{extra_keys[task]}" if task in extra_keys else ""
    axes = tuple(float(v) for v in args.normals_axes.split(","))
    if len(axes) != 3 or any(abs(v) != 1 for v in axes):
        raise ToolError(f"--normals-axes must be three of +-1 (e.g. 1,-1,1), got {args.normals_axes}")

    def value_of(key: str) -> bytes:
        path = files[key[:len(key) - len(suffix)] if suffix else key]
        return encode_target(task, np.load(path, allow_pickle=False), str(path), palette=args.palette,
                             seg_format=args.seg_format, normals_axes=axes, depth_scale=args.depth_scale)

    n = write_lmdb(out, [k + suffix for k in files], value_of, append=args.append, overwrite=args.overwrite,
                   batch_size=args.batch_size, desc=f"makedb {task}")
    print(f"wrote {n} {task} targets to {out}" + (f" (keys <stem>{suffix})" if suffix else ""))
    return 0
