"""Evaluate a checkpoint or a backbone:

    python evaluate.py ckpt=<run>/checkpoints/last.ckpt dataset=procedural    (in a checkout)
    densediff-evaluate ...  or  python -m densediff.evaluate ...    (anywhere: the same config, conf/evaluate.yaml)

This module is the command; the checkout's evaluate.py only runs its main(). Nothing heavy is imported before main()
has prepared the process (densediff/process.py: the thread settings must precede torch)."""

from __future__ import annotations

from densediff.process import prepare_process


def task(cfg) -> None:
    """The Hydra task function: one job of conf/evaluate.yaml. A launcher may run it in a process of its own (submitit's
    jobs unpickle it and call it there, without main()), so it prepares its process too (again: a no-op)."""
    prepare_process()
    from densediff.run import evaluate, user_errors

    with user_errors():
        evaluate(cfg)


def main() -> None:
    prepare_process()
    import hydra

    from densediff.run import config_dir

    hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="evaluate")(task)()


if __name__ == "__main__":
    main()
