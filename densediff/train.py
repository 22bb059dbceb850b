"""Train a dense predictor: `python train.py experiment=quickstart` in a checkout, `densediff-train ...` or
`python -m densediff.train ...` anywhere (the same config, conf/train.yaml, and overrides; README.md).

This module is the command; the checkout's train.py only runs its main(). Nothing heavy is imported before main()
has prepared the process (densediff/process.py: the thread settings must precede torch)."""

from __future__ import annotations

from densediff.process import prepare_process


def task(cfg) -> float | None:
    """The Hydra task function: one job of conf/train.yaml. A launcher may run it in a process of its own (submitit's
    jobs unpickle it and call it there, without main()), so it prepares its process too (again: a no-op)."""
    prepare_process()
    from densediff.run import optimized_metric, train, user_errors

    with user_errors():
        return optimized_metric(cfg, train(cfg))  # the value a sweeper optimises (hparams_search=...), or None


def main() -> None:
    prepare_process()
    import hydra

    from densediff.run import config_dir

    hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")(task)()


if __name__ == "__main__":
    main()
