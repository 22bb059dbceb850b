"""Cluster sweeps (issue 16, item 1): Hydra's submitit launcher (hydra/launcher=local runs its machinery here),
the trainer's shape from a SLURM job, and preemption: on the cluster's signal a run writes last.ckpt at the next
batch and stops; the requeued job resumes in its run directory to the weights of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import FAST, ROOT, read_metrics, run_cli
from omegaconf import OmegaConf
from test_resume import LOADERS, MIXED, Learner, global_step

from densediff.checkpoints import AtomicCheckpointIO, LastCheckpoint, PendingGradients, Preempted, Preemption
from densediff.run.cluster import (
    PREEMPTED,
    preemption_signal,
    requeued_checkpoint,
    scontrol_requeue,
    slurm_trainer_shape,
)

# ----------------------------------------------------------------------------- preemption, in process


class SignalBefore(L.Callback):
    """Sends this process the preemption signal as the `batch`-th training batch starts (counted from 1)."""

    def __init__(self, batch, signum):
        self.batch, self.signum, self.started = batch, signum, 0

    def on_train_batch_start(self, *_):
        self.started += 1
        if self.started == self.batch:
            os.kill(os.getpid(), self.signum)


def fit(folder, signal_before=None, ckpt_path=None, keep=None):
    """test_resume.fit's run (10 steps, gradient accumulation 3, validation every 4 batches, last.ckpt every 2
    steps) with the Preemption callback that build_trainer adds in a submitit job."""
    model, last = Learner(), LastCheckpoint(folder, every_n_train_steps=2)
    callbacks = [Preemption(last, signal.SIGUSR2), last, PendingGradients()]
    callbacks += [SignalBefore(signal_before, signal.SIGUSR2)] if signal_before else []
    if keep is not None:
        keep.extend(callbacks)
    trainer = L.Trainer(max_steps=10, accumulate_grad_batches=3, val_check_interval=4, check_val_every_n_epoch=None,
                        limit_val_batches=1, num_sanity_val_steps=0, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, plugins=[AtomicCheckpointIO()],
                        callbacks=callbacks, use_distributed_sampler=False)
    trainer.fit(model, datamodule=LOADERS["mixed"](None, 0), ckpt_path=ckpt_path, weights_only=True)
    return model.w.detach().clone()


# before batch 5: mid-accumulation (5 = 3 + 2), past the every-2-steps checkpoint's place; 13: just after a validation
@pytest.mark.parametrize("signal_before", [5, 13])
def test_the_preemption_signal_checkpoints_at_the_next_batch_and_the_resume_matches_an_uninterrupted_run(
        signal_before, tmp_path):
    received = []
    submitit = lambda signum, frame: received.append(signum)  # noqa: E731  (stands for submitit's handler)
    signal.signal(signal.SIGUSR2, submitit)
    try:
        straight = fit(tmp_path / "straight")
        assert signal.getsignal(signal.SIGUSR2) is submitit, "a finished fit did not put the handler back"
        with pytest.raises(Preempted) as stop:
            fit(tmp_path / "run", signal_before=signal_before)
        last = torch.load(tmp_path / "run" / "last.ckpt", map_location="cpu", weights_only=True)
        assert last["global_step"] == stop.value.step == signal_before // 3  # the batch that got the signal: saved
        assert not received, "the signal reached the replaced handler before the checkpoint was written"
        resumed = fit(tmp_path / "run", ckpt_path=str(tmp_path / "run" / "last.ckpt"))
        assert torch.equal(resumed, straight)
    finally:
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)


def test_hand_over_puts_the_replaced_handler_back_and_passes_the_signal_on(tmp_path):
    received = []
    submitit = lambda signum, frame: received.append(signum)  # noqa: E731
    signal.signal(signal.SIGUSR2, submitit)
    try:
        callbacks = []
        with pytest.raises(Preempted):
            fit(tmp_path / "run", signal_before=2, keep=callbacks)
        preemption = callbacks[0]
        assert signal.getsignal(signal.SIGUSR2) == preemption._note  # a fit ended by an exception leaves it
        preemption.hand_over()  # run.train, once the run is marked preempted: submitit requeues the job
        assert received == [signal.SIGUSR2] and signal.getsignal(signal.SIGUSR2) is submitit
    finally:
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)


def test_a_requeued_job_resumes_only_an_unfinished_run_that_was_preempted_or_restarted(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert requeued_checkpoint(run) is None  # nothing to resume
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert requeued_checkpoint(run) is None  # a run killed or crashed: resuming it stays the user's choice
    (run / PREEMPTED).write_text("{}")
    assert requeued_checkpoint(run) == run / "checkpoints" / "last.ckpt"
    (run / PREEMPTED).unlink()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # SLURM requeued the job (a preemption, a node failure)
    assert requeued_checkpoint(run) == run / "checkpoints" / "last.ckpt"
    (run / "metrics.json").write_text("{}")
    assert requeued_checkpoint(run) is None  # finished


def test_a_slurm_job_sets_the_trainers_nodes_and_devices_unless_the_command_line_does(monkeypatch):
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    assert slurm_trainer_shape({"devices": 1}, set()) == {"devices": 1}  # not in a SLURM job
    for key, value in {"SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4", "SLURM_JOB_NUM_NODES": "2",
                       "SLURM_NNODES": "2", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "5"}.items():
        monkeypatch.setenv(key, value)
    assert slurm_trainer_shape({"devices": 1}, set()) == {"devices": 4, "num_nodes": 2}
    assert slurm_trainer_shape({"devices": 2}, {"trainer.devices"}) == {"devices": 2, "num_nodes": 2}
    monkeypatch.setenv("SLURM_JOB_NAME", "bash")  # an interactive allocation: Lightning starts the processes
    assert slurm_trainer_shape({"devices": 2}, set()) == {"devices": 2}


def test_the_preemption_signal_is_submitits_in_its_jobs_and_lightnings_in_a_slurm_job_started_by_hand(monkeypatch):
    for key in [k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_"))]:
        monkeypatch.delenv(key)
    assert preemption_signal() is None  # no cluster: no handler, the signals keep their defaults
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    assert preemption_signal() == signal.SIGUSR1  # sbatch --signal=USR1@300
    monkeypatch.setenv("SUBMITIT_FOLDER", "/tmp/sweep/.submitit/1")
    assert preemption_signal() == signal.SIGUSR2  # submitit's default


def test_a_slurm_job_started_by_hand_requeues_itself_with_scontrol(tmp_path, monkeypatch):
    calls = tmp_path / "calls"
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.parent.mkdir()
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{scontrol.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    scontrol_requeue()
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4200")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    scontrol_requeue()
    assert calls.read_text().split("\n")[:2] == ["requeue 4242", "requeue 4200_3"]


def test_the_slurm_launcher_config_asks_for_one_task_per_gpu_the_warning_signal_and_the_setup_lines(tmp_path,
                                                                                                    monkeypatch):
    import submitit
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    from densediff.run import compose

    srun = tmp_path / "srun"  # submitit's SLURM executor checks that it runs where srun exists
    srun.write_text("#!/bin/sh\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    cfg = compose("train", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.account=lab",
                            "hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=4",
                            f"hydra.launcher.submitit_folder={tmp_path}/%j",
                            "hydra.launcher.setup=[module load cuda]", "experiment=e2e_ft_depth"])
    launcher = instantiate(cfg.hydra.launcher)
    params = dict(launcher.params)  # what SlurmLauncher.launch hands submitit
    executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"),
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python -m submitit.core._submit x", "uid")
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--account=lab",
                 "--signal=USR2@300", "--time=1440"):
        assert f"#SBATCH {line}\n" in script
    assert "\nmodule load cuda\n" in script and "srun " in script


# ----------------------------------------------------------------------------- the submitit launcher, for real


def test_a_two_job_sweep_on_the_local_submitit_launcher_writes_each_jobs_metrics(tmp_path):
    sweep = tmp_path / "sweep"
    run_cli("train.py", "-m", "hydra/launcher=local", "experiment=quickstart", "logger=csv", "seed=0,1",
            f"hydra.sweep.dir={sweep}", *FAST)
    for job in ("0", "1"):
        assert "abs_rel" in read_metrics(sweep / job)
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
        assert f"seed={job}" in (sweep / job / ".hydra" / "overrides.yaml").read_text()
    assert list((sweep / ".submitit").glob("*/*_result.pkl")), "the jobs did not run through submitit"
    # a job runs in submitit's own process, which calls the task function, not main(): it prepares its process too
    # (densediff/process.py), so Lightning's warning about the frozen VAE in eval mode is filtered there as well
    errors = "".join(path.read_text() for path in (sweep / ".submitit").glob("*/*_log.err"))
    assert "in eval mode" not in errors, errors[-3000:]


def submitit_task(sweep: Path) -> int | None:
    """The pid of the process that runs a job of `sweep` under submitit's local controller, or None yet."""
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if proc.name.isdigit() and b"submitit.core._submit" in command and any(str(sweep).encode() in part
                                                                               for part in command):
            return int(proc.name)
    return None


@pytest.mark.slow  # two train.py runs of 10 steps and submitit's requeue: about 1.5 minutes on 2 idle cores (4 under load)
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds submitit's task process in /proc")
def test_a_job_preempted_on_the_local_launcher_is_requeued_and_resumes_to_the_uninterrupted_weights(tmp_path):
    straight, sweep = tmp_path / "straight", tmp_path / "sweep"
    run_cli("train.py", *MIXED, f"hydra.run.dir={straight}")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    last = sweep / "0" / "checkpoints" / "last.ckpt"
    with subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=local", *MIXED,
                           f"hydra.sweep.dir={sweep}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as process:
        deadline = time.monotonic() + 300
        while global_step(last) < 3:
            assert process.poll() is None, f"the sweep ended before step 3:\n{process.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        task = submitit_task(sweep)
        assert task is not None, "no submitit task runs the job"
        os.kill(task, signal.SIGUSR2)  # what the controller (or SLURM) sends before the time limit
        output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    job = sweep / "0"
    assert "abs_rel" in read_metrics(job) and not (job / PREEMPTED).exists()
    log = (job / "train.log").read_text()
    assert "preempted: stopped by SIGUSR2" in log and "requeued job: resuming the interrupted run" in log
    submitit_log = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
    assert "Requeued job" in submitit_log, "submitit did not requeue the job"
    a, b = (torch.load(r / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True) for r in (straight, job))
    assert a["global_step"] == b["global_step"] == 10
    unequal = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not unequal, f"{len(unequal)} tensors differ after the requeue, e.g. {unequal[0]}"
