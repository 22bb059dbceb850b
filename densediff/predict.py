"""Predict images:

    python predict.py input=<image, folder or video> output=<dir> ckpt=<run>/checkpoints/last.ckpt    (in a checkout)
    densediff-predict ...  or  python -m densediff.predict ...    (anywhere: the same config, conf/predict.yaml)

This module is the command; the checkout's predict.py only runs its main(). Nothing heavy is imported before main()
has prepared the process (densediff/process.py: the thread settings must precede torch)."""

from __future__ import annotations

from densediff.process import prepare_process


def task(cfg) -> None:
    """The Hydra task function: one job of conf/predict.yaml. A launcher may run it in a process of its own (submitit's
    jobs unpickle it and call it there, without main()), so it prepares its process too (again: a no-op)."""
    prepare_process()
    from densediff.run import predict, user_errors

    with user_errors():
        predict(cfg)


def main() -> None:
    prepare_process()
    import hydra

    from densediff.run import config_dir

    hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="predict")(task)()


if __name__ == "__main__":
    main()
