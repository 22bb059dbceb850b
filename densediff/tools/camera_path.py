"""Write a procedural camera path (densediff/data/procedural.py: camera_path) as a video and a folder of frames:

    python -m densediff.tools.camera_path --seed 3 --frames 24 --height 96 --width 128 --mp4 room.mp4 --folder room

--mp4: the RGB frames as an H.264 mp4 (PyAV); --folder: `<index:06d>.png` RGB frames and, with --depth, the exact
planar depth `<index:06d>_depth.npy` (float32 metres) beside them. A test video for predict.py (README "Videos") and
the flicker measurement (experiments/video)."""

from __future__ import annotations

import argparse
import sys
from fractions import Fraction
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="the scene (procedural seed)")
    parser.add_argument("--path-seed", type=int, default=None, help="the path through it (default: --seed)")
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--fps", type=float, default=10.0)
    parser.add_argument("--mp4", type=Path, default=None, help="write the RGB frames as this mp4")
    parser.add_argument("--folder", type=Path, default=None, help="write the RGB frames as PNGs into this folder")
    parser.add_argument("--depth", action="store_true", help="with --folder: also <index>_depth.npy (metres)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if args.mp4 is None and args.folder is None:
        parser.error("give --mp4 and/or --folder")
    if args.frames < 1 or args.height < 8 or args.width < 8:
        parser.error("--frames must be >= 1, --height and --width >= 8")
    if args.fps <= 0:
        parser.error("--fps must be > 0")
    for target in (args.mp4, args.folder):
        if target is not None and target.exists() and not args.overwrite:
            sys.exit(f"error: {target} exists; choose another path or pass --overwrite")

    import numpy as np
    from PIL import Image

    from densediff.data.procedural import render_camera_path
    from densediff.inference.video import Mp4Writer

    path = render_camera_path(args.seed, args.frames, args.height, args.width, args.path_seed)
    frames = (np.clip(path["rgb"], 0, 1) * 255 + 0.5).astype(np.uint8)
    if args.mp4 is not None:
        writer = Mp4Writer(args.mp4, Fraction(args.fps).limit_denominator(1001), (args.height, args.width))
        for frame in frames:
            writer.write(frame)
        writer.close()
        print(f"wrote {args.mp4}: {args.frames} frames, {args.width}x{args.height}, {args.fps:g} fps")
    if args.folder is not None:
        args.folder.mkdir(parents=True, exist_ok=True)
        for index, frame in enumerate(frames):
            Image.fromarray(frame).save(args.folder / f"{index:06d}.png")
            if args.depth:
                np.save(args.folder / f"{index:06d}_depth.npy", path["depth"][index])
        print(f"wrote {args.folder}: {args.frames} frames" + (" with depth" if args.depth else ""))


if __name__ == "__main__":
    main()
