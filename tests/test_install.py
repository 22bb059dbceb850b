"""densediff installed as a package (not editable), used from outside the checkout: the configs ship as package data
(densediff.conf), and the console scripts (predict, the shard writer, export) and the demo app's model loading find
them there."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import numpy as np
import tomllib
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def test_package_list_names_every_package_folder():
    """pyproject.toml lists the packages explicitly (conf/ is mapped to densediff.conf, which packages.find cannot
    see): a new sub-package must be added there or an installed densediff lacks it."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "densediff").rglob("__init__.py")
               if "assets" not in p.parts and "__pycache__" not in p.parts}
    assert set(setuptools["packages"]) == folders | {"densediff.conf"}
    assert setuptools["package-dir"] == {"densediff.conf": "conf"}


def _venv_with_project_dependencies(folder: Path) -> Path:
    """A fresh venv whose only extra path is this environment's site-packages (torch, diffusers, ... without a
    download). A path listed in a .pth file is added as it is: the .pth files in it (this checkout's editable
    install of densediff) are not run, so the venv sees no densediff until one is installed into it."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    python = folder / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def test_non_editable_install_runs_predict_shards_and_app_from_elsewhere(tmp_path):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {f"densediff-{name}" for name in ("train", "evaluate", "predict", "app", "export",
                                                              "write-shards")}
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info next to pyproject.toml
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("densediff", "conf"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    python = _venv_with_project_dependencies(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(WANDB_MODE="offline", HYDRA_FULL_ERROR="1", PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    # --ignore-installed: pip must never touch the densediff it sees through the dependencies' path (this checkout)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--ignore-installed", str(source)], check=True, env=env, timeout=300, capture_output=True)
    shutil.rmtree(source)  # nothing may be read from the checkout or its copy from here on

    work = tmp_path / "elsewhere"
    work.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(work / "room.png")

    predict = subprocess.run([str(tmp_path / "venv" / "bin" / "densediff-predict"), "input=room.png", "output=pred",
                              "backbone=tiny", "inference.steps=1"],
                             cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert predict.returncode == 0, predict.stderr[-3000:]
    assert (work / "pred" / "room.npy").is_file() and (work / "pred" / "room_16bit.png").is_file()

    bin_ = tmp_path / "venv" / "bin"
    assert all((bin_ / name).is_file() for name in scripts), sorted(p.name for p in bin_.iterdir())
    shards = subprocess.run([str(bin_ / "densediff-write-shards"), "dataset=procedural", "dataset.train.num_scenes=2",
                             "dataset.val.num_scenes=1", "dataset.test.num_scenes=1", "output=shards"],
                            cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert shards.returncode == 0 and (work / "shards" / "index.json").is_file(), shards.stderr[-3000:]
    export = subprocess.run([str(bin_ / "densediff-export"), "output=x"], cwd=work, env=env,
                            capture_output=True, text=True, timeout=300)
    assert export.returncode == 1 and export.stderr.strip().startswith("error: pass ckpt="), export.stderr[-3000:]
    export = subprocess.run([str(bin_ / "densediff-export"), "--cfg", "output=x"], cwd=work, env=env,
                            capture_output=True, text=True, timeout=300)
    assert export.returncode == 0 and "output: x" in export.stdout, export.stdout + export.stderr[-3000:]

    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from densediff.process import prepare_process
        prepare_process()
        import densediff, densediff.run as run
        venv = Path({str(tmp_path / "venv")!r})
        assert venv in Path(densediff.__file__).resolve().parents, densediff.__file__
        assert venv in run.config_dir().parents and (run.config_dir() / "train.yaml").is_file(), run.config_dir()

        from densediff.app import load_models
        models, sources, device = load_models([], ["backbone=tiny", "backbone.task=normals", "inference.steps=2"])
        assert list(models) == ["normals"], models  # the backbone's declared task, as predict.py resolves it
        assert models["normals"].inference.steps == 2
        print("ok")
    """)
    check = subprocess.run([str(python), "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0 and check.stdout.strip().endswith("ok"), check.stdout[-2000:] + check.stderr[-4000:]
