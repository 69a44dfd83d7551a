"""How the pipeline runs a phase in its own process: ``python -m wmss_trl.cli`` or ``accelerate launch``, its output
teed to the phase's log, the child dying with the driver, and the lock a launched phase holds on the run folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from ...locks import PIPELINE_PID_ENV, LockedError, WriterLock, child_dies_with
from .run import Run, log


PHASE_LOCK_FILE = "phase.lock"
CHILD_LOCK_TIMEOUT = 120.0  # seconds a phase waits for the writer of a killed earlier driver to exit


def launch_prefix(cfg: dict) -> list[str]:
    from ...launch import resolve_accelerate_config

    launch = cfg["launch"] or {}
    if not launch.get("accelerate_config"):
        return [sys.executable, "-m", "wmss_trl.cli"]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        resolve_accelerate_config(launch["accelerate_config"]),
    ]
    if launch.get("num_processes"):
        cmd += ["--num_processes", str(launch["num_processes"])]
    return cmd + ["-m", "wmss_trl.cli"]


def run_command(run: Run, phase: str, args: list[str]) -> None:
    """Run ``wmss <args>`` (launched as configured); the output goes to the terminal and to logs/<phase>.log.

    The child dies with the driver: the kernel sends it SIGTERM when the driver exits, even by SIGKILL
    (``PR_SET_PDEATHSIG``, see :func:`wmss_trl.locks.child_dies_with`), and so do accelerate's workers (they inherit
    ``WMSS_PIPELINE_PID`` and set the same signal, :func:`wmss_trl.locks.die_with_parent`). On any other exit of the
    driver (an exception, Ctrl-C) the child is terminated and waited for."""
    cmd = launch_prefix(run.cfg) + args
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), PIPELINE_PID_ENV: str(os.getpid())}
    log_path = run.dir / "logs" / f"{phase}.log"
    log(f"{phase}: {' '.join(cmd)}")
    with open(log_path, "ab") as logf:
        logf.write(f"\n$ {' '.join(cmd)}\n".encode())
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, preexec_fn=child_dies_with(os.getpid())
        )
        try:
            while chunk := proc.stdout.read1(65536):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                logf.write(chunk)
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait()
    if rc != 0:
        raise SystemExit(
            f"phase {phase!r} failed (exit code {rc}); see {log_path}. Re-run the same command to "
            "continue from this phase."
        )


def phase_lock(run: Run) -> WriterLock | None:
    """The lock a launched training phase holds on the run folder's phases (main process only): a phase started by a
    re-run waits until the process of a killed earlier driver has exited."""
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    lock = WriterLock(run.dir / PHASE_LOCK_FILE, f"the training phases of {run.dir}")
    try:
        return lock.acquire(CHILD_LOCK_TIMEOUT)
    except LockedError as e:
        raise SystemExit(str(e)) from e
