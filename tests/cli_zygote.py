"""The tests' CLI runner: a process that imports densediff (torch, lightning, diffusers, hydra) once, then runs each
entry-point call in a fork of itself.

Starting an entry point costs ~6 CPU-seconds of imports before it reads its first argument, and the suite runs a
hundred and more of them, most of which stop after a few steps or at a refused config. A fork shares those imports; the
script itself still runs from scratch as `__main__` with the call's argv, working directory, environment, stdin from
/dev/null and stdout/stderr in files, and exits with its own code, as `python script.py ...` would. This process
never runs a torch operation, so no OpenMP pool or other thread exists when it forks.

Protocol (one JSON line each way per call): {"argv": [script or "-m", module, *args], "cwd", "env", "stdout",
"stderr", "timeout"} -> {"returncode", "timed_out"}. tests/conftest.py's run_cli is the client.
"""

import json
import os
import runpy
import signal
import sys
import time

reply = os.fdopen(os.dup(1), "w", buffering=1)  # the answers; fd 1 itself goes to stderr so import noise can't mix in
os.dup2(2, 1)

from densediff.process import prepare_process  # noqa: E402

prepare_process()  # what every entry point does first (threads before torch): the forks inherit it
import densediff.run  # noqa: E402,F401  (the imports every entry point pays, once)


def run_script(request: dict) -> None:
    """In the forked child: become the entry point. Returns only when the script ends without SystemExit."""
    os.setpgid(0, 0)  # a timeout kills the script and whatever it started (DDP ranks, dataloader workers)
    reply.close()
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_CREAT),
                            (2, request["stderr"], os.O_WRONLY | os.O_CREAT)):
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stdout.reconfigure(line_buffering=True)  # the client runs scripts with PYTHONUNBUFFERED=1
    sys.stderr.reconfigure(line_buffering=True)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    argv = request["argv"]
    if argv[0] == "-m":  # python -m module: the working directory first on sys.path
        sys.argv, sys.path[0] = [argv[1], *argv[2:]], os.getcwd()
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:  # python script.py: the script's folder first on sys.path
        sys.argv, sys.path[0] = list(argv), os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")


def wait(pid: int, timeout: float) -> tuple[int, bool]:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), False
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -signal.SIGKILL, True
        time.sleep(0.02)


def main() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_script(request)
            sys.exit(0)  # the script ended normally; interpreter exit runs its atexit handlers and joins its threads
        returncode, timed_out = wait(pid, request["timeout"])
        reply.write(json.dumps({"returncode": returncode, "timed_out": timed_out}) + "\n")


if __name__ == "__main__":
    main()
