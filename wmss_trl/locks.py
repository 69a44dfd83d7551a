"""One writer at a time, and processes that die with the one that started them.

* :class:`WriterLock`: one writer per run folder / output file. ``fcntl.flock`` on ``<target>.lock`` (the kernel drops
  it when the holder dies, so a lock is never left behind by a crash); the lock file holds the owner's pid, host,
  command and start time for the refusal message. A lock file that still names an owner when it is acquired was left
  by a writer that died: it is taken over with a warning.
* :func:`locked_on_main`: the same lock in a distributed run (the main process holds it; every process gets the
  outcome of opening the output, or its error).
* :func:`die_with_parent`: Linux parent-death signal (``prctl(PR_SET_PDEATHSIG, SIGTERM)``) for the processes a
  ``wmss pipeline`` driver starts, so killing the driver never leaves a phase writing on its own.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import signal
import socket
import sys
import time


PIPELINE_PID_ENV = "WMSS_PIPELINE_PID"  # set by `wmss pipeline` in the environment of every phase it starts
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None  # loaded before any fork


# ---------------------------------------------------------------------------------------------------------------
# One writer at a time
# ---------------------------------------------------------------------------------------------------------------
class LockedError(RuntimeError):
    """Another live process holds the lock."""


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True
    return True


def describe_owner(owner: dict) -> str:
    return (
        f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}, command: "
        f"{owner.get('command')}"
    )


class WriterLock:
    """Exclusive writer lock on ``lock_path`` (``fcntl.flock``; the kernel releases it when the holder dies).

    ``acquire(timeout)`` waits up to ``timeout`` seconds (0: try once) and raises :class:`LockedError` naming the owner
    (pid, host, command, start time) read from the lock file. The owner info is written into the lock file on
    acquisition and cleared on release; finding it filled when the lock is free means the last writer died without
    releasing: the lock is taken over with a warning.
    """

    def __init__(self, lock_path, what: str):
        self.path = str(lock_path)
        self.what = what
        self._fd = None

    def read_owner(self) -> dict | None:
        try:
            with open(self.path) as f:
                text = f.read()
            return json.loads(text) if text.strip() else None
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def acquire(self, timeout: float = 0.0) -> WriterLock:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline, waited = time.monotonic() + timeout, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
            owner = self.read_owner() or {}
            if time.monotonic() >= deadline:
                os.close(fd)
                gone = owner.get("host") == socket.gethostname() and not _pid_alive(owner.get("pid"))
                raise LockedError(
                    f"{self.what} is being written by another process ({describe_owner(owner)}"
                    + ("; that pid has exited, but a process it started still holds the lock" if gone else "")
                    + f"). Only one writer at a time: wait for it to finish, or stop it (kill {owner.get('pid')}) and "
                    f"run again. Lock file: {self.path}"
                )
            if not waited:
                print(
                    f"waiting up to {timeout:.0f} s for the writer of {self.what} to exit ({describe_owner(owner)})",
                    file=sys.stderr,
                    flush=True,
                )
                waited = True
            time.sleep(0.2)
        self._fd = fd
        stale = self.read_owner()
        if stale:
            print(
                f"warning: taking over a stale lock on {self.what} left by {describe_owner(stale)}: that writer "
                "ended without releasing it (killed or crashed); what it wrote is checked before reuse.",
                file=sys.stderr,
                flush=True,
            )
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join(sys.argv),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # a clean release leaves no owner: a filled lock file means a dead writer
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> WriterLock:
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------------------------
# Processes started by the pipeline die with it
# ---------------------------------------------------------------------------------------------------------------
def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """``prctl(PR_SET_PDEATHSIG, sig)``: the kernel sends ``sig`` to this process when its parent exits (Linux only;
    returns False elsewhere)."""
    return _LIBC is not None and _LIBC.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def child_dies_with(parent_pid: int):
    """A ``Popen(preexec_fn=...)`` for a child of ``parent_pid``: parent-death signal SIGTERM, and SIGTERM at once if
    the parent already exited between the fork and the prctl (the child was re-parented)."""

    def preexec() -> None:
        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def die_with_parent() -> None:
    """In a process started (directly, or through ``accelerate launch``) by ``wmss pipeline``: get SIGTERM when the
    parent process exits, and stop at once if the pipeline driver is already gone (it died before this ran)."""
    driver = os.environ.get(PIPELINE_PID_ENV)
    if not driver:
        return
    set_parent_death_signal(signal.SIGTERM)
    if not _pid_alive(driver):
        raise SystemExit(f"the wmss pipeline driver (pid {driver}) that started this phase is gone; stopping.")


def locked_on_main(state, lock_file: str, what: str, open_output):
    """The main process takes the writer lock ``lock_file`` (for ``what``; the caller releases it once its output is
    written) and runs ``open_output()`` (check the folder's provenance, read what is finished); every process gets
    that result by broadcast, or the error as a ``ValueError`` (the lock released), so no process waits forever for
    a failed main. Returns ``(lock, result)``; ``lock`` is None on the other processes."""
    from accelerate.utils import broadcast_object_list

    lock, payload = None, [None]
    if state.is_main_process:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(lock_file)), exist_ok=True)
            lock = WriterLock(lock_file, what).acquire()
            payload = [{"ok": open_output()}]
        except (LockedError, ValueError) as e:  # our refusals (a ProvenanceError is a ValueError): message as is
            payload = [{"error": str(e)}]
        except Exception as e:  # noqa: BLE001 - re-raised on every process below
            payload = [{"error": f"{type(e).__name__}: {e}"}]
    if state.num_processes > 1:
        broadcast_object_list(payload, from_process=0)
    if "error" in payload[0]:
        if lock is not None:
            lock.release()
        raise ValueError(payload[0]["error"])
    return lock, payload[0]["ok"]
