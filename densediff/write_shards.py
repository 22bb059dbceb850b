"""Write a dataset as webdataset shards (densediff/data/shards.py says what a shard holds and how training reads
them):

    densediff-write-shards dataset=<name> [train.py overrides...] output=<new folder> [split=train|split=[train,val]]
                           [maxcount=1000]
    python -m densediff.write_shards ...     (the same command)

A Hydra app: its root config is conf/write_shards.yaml, train.py's config (so every dataset and override works, and
the dataset is built as train.py builds it) plus output=, split= (null: every split the dataset config defines) and
maxcount= (samples per shard); `--cfg` prints the composed config. A stopped write continues when the same command
runs again.
"""

from __future__ import annotations

import sys
from pathlib import Path

OWN = ("output", "split", "maxcount")  # conf/write_shards.yaml's own keys; the rest is train.yaml's


def main(argv: list[str] | None = None) -> int:
    from densediff.process import prepare_process

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(__doc__)
        return 0
    prepare_process()  # before torch: thread settings, config resolvers (densediff/process.py)
    from densediff.run.commands import CommandLineError, command_options, report, usage_or_config
    try:
        if usage_or_config("write_shards", argv, __doc__):
            return 0
        options, overrides = command_options("write_shards", argv, OWN)
        if not options["output"]:
            raise CommandLineError("pass output=<new folder> for the shards")
        split, maxcount = options["split"], options["maxcount"]
        splits = None if split is None else [split] if isinstance(split, str) else [str(s) for s in split]
        if isinstance(maxcount, bool) or not isinstance(maxcount, int) or maxcount < 1:
            raise CommandLineError(f"maxcount={maxcount}: pass the samples per shard, an integer >= 1")
    except CommandLineError as error:
        return report(error)

    from densediff.data.common import DataReadError
    from densediff.data.shards import INDEX, _check_output, write_shards
    from densediff.run import datasets_to_shard

    output = Path(str(options["output"]))
    try:
        _check_output(output)  # before the dataset is built (a stopped write is checked again against it)
        datasets, config, name = datasets_to_shard(overrides, splits)
        index = write_shards(datasets, output, config, maxcount=maxcount)
    except (FileNotFoundError, FileExistsError, DataReadError, ValueError, OSError) as error:
        print(file=sys.stderr)  # after the progress output
        return report(error)
    for split, entry in index["splits"].items():
        print(f"{split}: {entry['count']} samples in {len(entry['shards'])} shards under {output / split}")
    print(f"index: {output / INDEX}\ntrain from them: python train.py dataset={name} "
          f"dataset.format=shards dataset.shards={output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
