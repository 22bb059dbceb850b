"""Composing configs, what the command line set, the user-error boundary and the run directory.
(Part of the densediff.run package, the config boundary: docs/architecture.md#the-config-boundary.)"""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
import os
import sys
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from densediff.backbones.load import UnsupportedSchedulerError
from densediff.callbacks import NonFiniteTrainingError
from densediff.data.common import DataReadError
from densediff.io import describe_os_error

log = logging.getLogger("densediff")

ASSETS = Path(__file__).resolve().parents[1] / "assets"


CONFIG_PACKAGE = "densediff.conf"  # conf/, installed as package data (pyproject.toml: package-dir)


def tiny_geowizard_path(source: str | None = None) -> str:
    from densediff.backbones.geowizard_build import tiny_geowizard_folder
    return str(tiny_geowizard_folder(source=source))


class ConfigError(ValueError):
    """A config value that cannot work; the entry points print it without a traceback."""


def config_dir() -> Path:
    """The folder of this copy's Hydra configs (conf/): in a source checkout (run from it, or installed editable)
    the checkout's own conf/, else the installed package data `densediff.conf` (a wheel puts it in
    site-packages/densediff/conf/). Checked in that order so a checkout on PYTHONPATH never composes another
    install's configs."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "conf" / "__init__.py").is_file():
        return checkout / "conf"
    try:
        folder = importlib.resources.files(CONFIG_PACKAGE)
    except ModuleNotFoundError:
        raise FileNotFoundError("densediff's configs are missing: the package was installed without its "
                                "densediff.conf package data (reinstall it: pip install densediff)") from None
    if not isinstance(folder, Path):  # e.g. a zip import; Hydra reads configs from a folder
        raise FileNotFoundError(f"densediff's configs ({folder}) are not a folder on disk; install densediff "
                                "unzipped (pip install)")
    return folder


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """conf/<config_name>.yaml (train, evaluate or predict) with command-line `overrides`, composed as the entry
    points' @hydra.main composes it, for the commands that run without it (the demo app, the shard writer, the DMP
    data tools). HydraConfig is set: run_dir(), ${hydra:...} and the command-line rules below read it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name=config_name):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig().set_config(cfg)
    return cfg


def recipe_settings(overrides: list[str], keys: list[str]) -> dict:
    """The values of the dotted `keys` (e.g. "backbone.name") in conf/train.yaml composed with `overrides`, as plain
    Python values (None for a key the recipe lacks): what a script reads of a recipe without running it
    (benchmarks/check_recipes.py). Only these keys are resolved."""
    cfg = compose("train", overrides)
    return {key: to_plain(OmegaConf.select(cfg, key, default=None)) for key in keys}


def _parsed_overrides() -> list:
    return OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task))


def command_line_keys() -> set[str]:
    """The config keys and groups this run's command line sets, as Hydra parses it (`inference.steps=4` ->
    inference.steps, `+task.x=1` -> task.x; a whole group such as `inference=default` -> inference)."""
    return {override.key_or_group for override in _parsed_overrides()}


@contextlib.contextmanager
def _config_loader():
    """Hydra's config loader of this run: @hydra.main's (a job launched in another process restores it), else, after
    compose(), one on densediff's configs for the time it is used (Hydra is left as it was)."""
    if GlobalHydra.instance().is_initialized():
        yield GlobalHydra.instance().config_loader()
        return
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        yield GlobalHydra.instance().config_loader()


def _recompose_overrides(extra: list[str] = ()) -> list[str]:
    """This run's command line for composing again: its overrides plus its hydra.searchpath (configs found there, an
    experiment of one's own, must be found again)."""
    hydra = HydraConfig.get()
    searchpath = [o for o in hydra.overrides.hydra
                  if OverridesParser.create().parse_override(o).key_or_group == "hydra.searchpath"]
    return [*searchpath, *hydra.overrides.task, *extra]


def group_is_chosen(group: str) -> bool:
    """Whether the command line or a config file (an experiment, a debug config) picks `group`'s value rather than
    the root config's default, as Hydra's own defaults list records it."""
    if group in command_line_keys():
        return True
    with _config_loader() as loader:
        defaults = loader.compute_defaults_list(HydraConfig.get().job.config_name, _recompose_overrides(),
                                                RunMode.RUN)
    return group in defaults.overrides.override_metadata


def compose_group(group: str, choice: str) -> DictConfig:
    """The config node of `group` with the value `choice`, composed in this run's context (its command line and
    experiment), for a choice made after composing (resolve_backbone_task)."""
    with _config_loader() as loader:
        composed = loader.load_configuration(HydraConfig.get().job.config_name,
                                             _recompose_overrides([f"{group}={choice}"]), RunMode.RUN)
    return composed[group]


@contextlib.contextmanager
def user_errors():
    """Turn the errors a user can fix (bad config, missing path, a file that cannot be read) into one clear line
    and exit code 1."""
    _route_library_logs()
    try:
        yield
    except (ConfigError, FileNotFoundError, FileExistsError, DataReadError, NonFiniteTrainingError,
            UnsupportedSchedulerError) as error:
        print(f"\nerror: {_own_message(error)}\n(set HYDRA_FULL_ERROR=1 for the traceback)", file=sys.stderr)
        sys.exit(1)
    except OSError as error:  # a folder that cannot be written, a full disk, permissions: the path and the cause
        print(f"\nerror: {describe_os_error(error)}\n(set HYDRA_FULL_ERROR=1 for the traceback)", file=sys.stderr)
        sys.exit(1)
    except RuntimeError as error:  # a DDP rank whose peer ended first (rank 0's refusal above): one line, not a trace
        if first_process() or not _peer_ended(error):
            raise
        rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", os.environ.get("LOCAL_RANK")))
        print(f"\nerror: rank {rank} stopped: another process of this run ended first (its own error says why)",
              file=sys.stderr)
        sys.exit(1)


PEER_ENDED = ("closed by peer", "reset by peer", "remote worker crashing", "communicator was aborted")


def _peer_ended(error: RuntimeError) -> bool:
    """A collective that failed because another rank's process is gone (gloo's and NCCL's wordings)."""
    return any(phrase in str(error) for phrase in PEER_ENDED)


def _own_message(error: BaseException) -> str:
    """The error's own text. A DataLoader worker's exception is re-raised in the main process with the worker's
    whole traceback as its message; only the last line, the original message, is for the user."""
    text = str(error)
    if "\nOriginal Traceback" not in text:
        return text
    kind = type(error)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    at = text.rfind(f"\n{name}: ")
    return text[at + len(name) + 3:].strip() if at >= 0 else text


def _route_library_logs() -> None:
    """Lightning gives its loggers their own console handler and stops propagation when it is imported before
    logging is set up (it is, here); hand them back to the root logger Hydra configured, so the job's log file
    (train.log, evaluate.log) gets their messages too."""
    if not logging.getLogger().handlers:
        return
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
            logger.removeHandler(handler)
        logger.propagate = True


def first_process() -> bool:
    """Whether this is a run's first process: not a DDP rank Lightning started (LOCAL_RANK), nor another task of a
    SLURM job (SLURM_PROCID: hydra/launcher=slurm or srun start one per GPU, each running the whole command)."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("SLURM_PROCID", "0") == "0"


def run_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def to_plain(node):
    """A config node as plain, resolved Python values (dicts, lists); anything else as it is."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
