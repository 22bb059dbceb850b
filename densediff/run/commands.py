"""The one-shot commands' configs (the demo app, export, the shard writer): their root config under conf/ (app.yaml,
export.yaml, write_shards.yaml), composed by Hydra from the command line's key=value overrides, handed to the
command as plain values (this package is the config boundary: docs/architecture.md#the-config-boundary).

They are Hydra apps without a job: no run directory, log file or multirun (they serve or write one thing), and a bad
override is one line on stderr and exit status 1, as every error they report, where @hydra.main would print Hydra's
several lines. `--cfg` prints the composed config, `--help` the command's usage.
"""

from __future__ import annotations

import sys


class CommandLineError(ValueError):
    """A command-line argument that cannot work: printed as one line, exit status 1."""


def _one_line(error: BaseException) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def override_keys(argv: list[str]) -> list[str]:
    """The key (or group) each Hydra override of `argv` sets, as Hydra parses it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return [override.key_or_group for override in OverridesParser.create().parse_overrides(list(argv))]


def compose_command(name: str, argv: list[str]):
    """conf/<name>.yaml composed with the command line `argv`; raises CommandLineError with Hydra's message on one
    line for an override Hydra refuses (unknown key or group, bad syntax) and for a key given twice (Hydra would keep
    the last silently)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from densediff.run.config import compose

    try:
        keys = override_keys(argv)
        twice = sorted({key for key in keys if keys.count(key) > 1})
        if twice:
            raise CommandLineError(f"{twice[0]}= is given more than once: pass it once (several values as a list, "
                                   f"{twice[0]}=[a,b])")
        return compose(name, argv)
    except (HydraException, OmegaConfBaseException) as error:
        raise CommandLineError(_one_line(error)) from None


def command_options(name: str, argv: list[str], own: tuple[str, ...]) -> tuple[dict, list[str]]:
    """conf/<name>.yaml composed with `argv` (compose_command): ({key: plain value} of the command's `own` keys,
    the overrides of the config it builds on)."""
    from omegaconf import OmegaConf

    composed = compose_command(name, argv)
    options = {key: OmegaConf.to_container(composed[key], resolve=True) if OmegaConf.is_config(composed[key])
               else composed[key] for key in own}
    return options, underlying_overrides(argv, own)


def underlying_overrides(argv: list[str], own: tuple[str, ...]) -> list[str]:
    """The overrides of `argv` that are not the command's `own` keys: those of the config it builds on (predict.yaml
    for the app, train.yaml for the shard writer)."""
    return [arg for arg, key in zip(argv, override_keys(argv)) if key not in own]


def usage_or_config(name: str, argv: list[str], usage: str) -> bool:
    """--help / -h prints `usage`, --cfg the composed config; True when one of them was asked for (then the
    command stops there). Errors in composing are the caller's (CommandLineError)."""
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return True
    if argv and argv[0] == "--cfg":
        from omegaconf import OmegaConf

        composed = compose_command(name, argv[1:])
        print(OmegaConf.to_yaml({key: composed[key] for key in composed if key != "hydra"}, resolve=False), end="")
        return True
    return False


def report(error: BaseException) -> int:
    """One line on stderr for an error a user can fix; the exit status."""
    if isinstance(error, OSError) and not isinstance(error, (FileNotFoundError, FileExistsError)):
        from densediff.io import describe_os_error
        message = describe_os_error(error)
    else:
        message = str(error)
    print(f"error: {message}", file=sys.stderr)
    return 1
