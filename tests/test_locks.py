"""wmss_trl.locks: the one-writer lock (real processes, real SIGKILL), its distributed form, and the parent-death
signal of the processes the pipeline starts."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wmss_trl.locks import LockedError, WriterLock, locked_on_main


ROOT = Path(__file__).resolve().parents[1]
# wmss_trl/locks.py loaded on its own (no package import: a subprocess starts in a fraction of a second)
LOAD_IO = (
    f"import importlib.util as u; s = u.spec_from_file_location('wlocks', {str(ROOT / 'wmss_trl' / 'locks.py')!r}); "
    "io = u.module_from_spec(s); s.loader.exec_module(io)"
)
HOLDER = (
    LOAD_IO
    + """
import sys, time
io.WriterLock(sys.argv[1], "test target").acquire()
print("locked", flush=True)
time.sleep(600)
"""
)


def hold_lock(lock_path) -> subprocess.Popen:
    """A real process that takes the writer lock on ``lock_path`` and sleeps; returns once it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _state(pid) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "Z"


def test_lock_refuses_a_live_owner_naming_it_and_takes_over_after_sigkill(tmp_path, capfd):
    lock_path = tmp_path / "out" / "x.lock"
    holder = hold_lock(lock_path)
    try:
        with pytest.raises(LockedError, match=rf"being written by another process \(pid {holder.pid} on .*command: "):
            WriterLock(lock_path, "x").acquire()
        start = time.monotonic()
        with pytest.raises(LockedError, match=f"kill {holder.pid}"):
            WriterLock(lock_path, "x").acquire(timeout=1.0)  # waits, then refuses
        assert time.monotonic() - start >= 1.0
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel released the dead holder's lock; its owner record is still there: a stale lock, taken over
    assert json.loads(lock_path.read_text())["pid"] == holder.pid
    capfd.readouterr()
    with WriterLock(lock_path, "x").acquire():
        assert f"stale lock on x left by pid {holder.pid}" in capfd.readouterr().err
        assert json.loads(lock_path.read_text())["pid"] == os.getpid()
        with pytest.raises(LockedError, match=f"pid {os.getpid()}"):  # a second writer in the same process too
            WriterLock(lock_path, "x").acquire()
    assert lock_path.read_text() == ""  # a clean release leaves no owner
    with WriterLock(lock_path, "x").acquire():
        assert "stale" not in capfd.readouterr().err


def test_lock_waits_for_a_dying_owner(tmp_path):
    lock_path = tmp_path / "x.lock"
    holder = hold_lock(lock_path)
    killer = subprocess.Popen([sys.executable, "-c", f"import os, time; time.sleep(1); os.kill({holder.pid}, 9)"])
    try:
        WriterLock(lock_path, "x").acquire(timeout=30).release()
    finally:
        killer.wait()
        holder.kill()
        holder.wait()


def test_pipeline_children_die_with_the_driver(tmp_path):
    """A driver that starts a child (and the child a grandchild, like accelerate launch) the way `wmss pipeline`
    does, then is SIGKILLed: both die."""
    script = tmp_path / "driver.py"
    script.write_text(
        LOAD_IO
        + f"""
import os, subprocess, sys, time
grand = {LOAD_IO!r} + "; io.die_with_parent(); print(io.os.getpid(), flush=True); io.time.sleep(600)"
child = "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', sys.argv[1]]); p.wait()"
env = {{**os.environ, io.PIPELINE_PID_ENV: str(os.getpid())}}
proc = subprocess.Popen([sys.executable, "-c", child, grand], env=env, preexec_fn=io.child_dies_with(os.getpid()))
print(proc.pid, flush=True)
proc.wait()
"""
    )
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    child_pid, grand_pid = int(driver.stdout.readline()), int(driver.stdout.readline())
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    deadline = time.monotonic() + 20
    alive = {child_pid, grand_pid}
    while alive and time.monotonic() < deadline:
        alive = {p for p in alive if os.path.exists(f"/proc/{p}") and "Z" not in _state(p)}
        time.sleep(0.1)
    for pid in alive:  # do not leave them running when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"orphans survived the driver: {alive}"


def test_locked_on_main_returns_the_result_and_holds_the_lock(tmp_path):
    """One process: ``open_output``'s result and the held lock (a second writer is refused until released); an error
    in ``open_output`` becomes a ValueError naming it, with the lock released."""
    from types import SimpleNamespace

    state = SimpleNamespace(is_main_process=True, num_processes=1)
    lock_file = str(tmp_path / "out" / "run.lock")
    lock, result = locked_on_main(state, lock_file, "the output", lambda: {"done": [1, 2]})
    assert result == {"done": [1, 2]}
    with pytest.raises(ValueError, match="the output"):
        locked_on_main(state, lock_file, "the output", lambda: None)
    lock.release()

    def broken():
        raise OSError("disk full")

    with pytest.raises(ValueError, match="OSError: disk full"):
        locked_on_main(state, lock_file, "the output", broken)
    lock, _ = locked_on_main(state, lock_file, "the output", lambda: None)  # released after the failure
    lock.release()
