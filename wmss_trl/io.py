"""Storage shared by every artefact wmss_trl writes: atomic JSON, fingerprints (provenance), and the one-writer lock.

* :func:`write_json_atomic`: write to ``<path>.tmp``, fsync, ``os.replace``: a reader sees the old file or the new one.
* Fingerprints record what made an artefact, cheaply:

      model folder   config.json (sha256) + for every weight file: size, mtime_ns, sha256 of its safetensors
                     header (names, dtypes, shapes, metadata) and of 16 sampled 4 KiB blocks; never a full hash of GBs
      loaded model   dtype, parameter count and sha256 of a strided sample of every parameter (<= 4096 values each)
      dataset        number of rows, column names and sha256 of the rows as canonical JSON (so the same rows give the
                     same fingerprint however they were loaded); datasets' own ``_fingerprint`` is recorded as a hint

  :func:`check_provenance` compares the record stored with an artefact to the current one and refuses a mismatch
  with a :class:`ProvenanceError` naming every field that differs (old -> new) and how to start over.
* :class:`WriterLock`: one writer per run folder / output file. ``fcntl.flock`` on ``<target>.lock`` (the kernel drops
  it when the holder dies, so a lock is never left behind by a crash); the lock file holds the owner's pid, host,
  command and start time for the refusal message. A lock file that still names an owner when it is acquired was left
  by a writer that died: it is taken over with a warning.
* :func:`die_with_parent`: Linux parent-death signal (``prctl(PR_SET_PDEATHSIG, SIGTERM)``) for the processes a
  ``wmss pipeline`` driver starts, so killing the driver never leaves a phase writing on its own.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import time
from pathlib import Path


PIPELINE_PID_ENV = "WMSS_PIPELINE_PID"  # set by `wmss pipeline` in the environment of every phase it starts
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None  # loaded before any fork
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth")


# ---------------------------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------------------------
def write_json_atomic(path, obj, indent: int = 1) -> None:
    """Write ``obj`` as JSON to ``path`` via ``<path>.tmp`` + fsync + ``os.replace`` (never a half-written file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_jsonl_atomic(path, rows) -> None:
    """Write ``rows`` as JSON lines to ``path`` via ``<path>.tmp`` + fsync + ``os.replace`` (never a half-written
    file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def jsonable(obj):
    """``obj`` as it reads back from JSON (tuples -> lists, other types -> str): stored and fresh records compare."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------------------------------------
def file_sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def safetensors_header_sha256(path) -> str:
    """sha256 of a safetensors file's header (8-byte length + JSON: tensor names, dtypes, shapes, offsets, meta)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes).")
        (n,) = struct.unpack("<Q", head)
        return hashlib.sha256(head + f.read(n)).hexdigest()


def file_sample_sha256(path, blocks: int = 16, block_size: int = 4096) -> str:
    """sha256 of ``blocks`` blocks of ``block_size`` bytes at evenly spaced offsets of a file (the whole file when it
    is small): a cheap look at the values of a weight file of any size."""
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= blocks * block_size:
            h.update(f.read())
        else:
            for k in range(blocks):
                f.seek(k * (size - block_size) // (blocks - 1))
                h.update(f.read(block_size))
    return h.hexdigest()


def model_fingerprint(path) -> dict:
    """What identifies the weights of a checkpoint folder without reading them all: ``config.json``'s sha256, and per
    weight file its size, mtime_ns, safetensors header sha256 and a sampled sha256 of its bytes
    (:func:`file_sample_sha256`). Rewriting a weight file changes its mtime (and almost surely the sampled bytes)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{str(path)!r} is not a model checkpoint folder.")
    weights = {}
    for f in sorted(path.iterdir()):
        if not f.is_file() or not f.name.endswith(WEIGHT_SUFFIXES) or f.name.startswith("training_args"):
            continue
        st = f.stat()
        entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if f.name.endswith(".safetensors"):
            entry["header_sha256"] = safetensors_header_sha256(f)
            entry["sample_sha256"] = file_sample_sha256(f)
        elif f.name.endswith(".json"):
            entry["sha256"] = file_sha256(f)
        weights[f.name] = entry
    config = path / "config.json"
    if not weights and not config.is_file():
        raise FileNotFoundError(f"{str(path)!r} has no config.json or weight files; is it a model checkpoint folder?")
    return {"config_sha256": file_sha256(config) if config.is_file() else None, "weights": weights}


def path_fingerprint(path) -> dict:
    """A model folder (it has ``config.json``): :func:`model_fingerprint`; a file: its size and sha256; another folder
    (e.g. a ``save_to_disk`` dataset): size and sha256 of every file in it, by relative name."""
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file():
        return model_fingerprint(p)
    if p.is_file():
        return {"size": p.stat().st_size, "sha256": file_sha256(p)}
    if p.is_dir():
        return {
            str(f.relative_to(p)): {"size": f.stat().st_size, "sha256": file_sha256(f)}
            for f in sorted(p.rglob("*"))
            if f.is_file()
        }
    raise FileNotFoundError(f"{str(path)!r} does not exist.")


def loaded_model_fingerprint(model, sample: int = 4096) -> dict:
    """What identifies a model in memory: dtype, parameter count and sha256 of a strided sample of every parameter
    (at most ``sample`` values per tensor, in fp32), in ``named_parameters`` order. Other weights or another dtype
    give another fingerprint; the same checkpoint loaded twice the same way gives the same one."""
    import torch

    base = getattr(model, "module", model)
    h = hashlib.sha256()
    count, dtypes = 0, set()
    with torch.no_grad():
        for name, p in base.named_parameters():
            flat = p.detach().reshape(-1)
            count += flat.numel()
            dtypes.add(str(p.dtype).removeprefix("torch."))
            step = max(1, flat.numel() // sample)
            values = flat[::step][:sample].to(device="cpu", dtype=torch.float32).contiguous()
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(values.numpy().tobytes())
    return {"dtype": ",".join(sorted(dtypes)), "num_parameters": count, "weights_sample_sha256": h.hexdigest()}


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what a tokenizer maps text to: its vocabulary, special tokens and chat template."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)  # processors wrap a tokenizer
    return sha256_json(
        {
            "vocab": sorted(tok.get_vocab().items()),
            "special": tok.special_tokens_map,
            "chat_template": getattr(tok, "chat_template", None),
        }
    )


def dataset_fingerprint(dataset, batch_size: int = 1000) -> dict:
    """``{"num_rows", "columns", "rows_sha256"}`` of a ``datasets.Dataset``: sha256 of its rows as canonical JSON,
    batch by batch (independent of how it was loaded), plus datasets' ``_fingerprint`` as ``datasets_fingerprint``
    (a hint only: it changes when a file is touched, and is random after some transforms, so it is not compared)."""
    h = hashlib.sha256(json.dumps(sorted(dataset.column_names)).encode())
    for batch in dataset.iter(batch_size=batch_size):
        h.update(json.dumps(batch, sort_keys=True, default=str).encode())
    return {
        "num_rows": len(dataset),
        "columns": sorted(dataset.column_names),
        "rows_sha256": h.hexdigest(),
        "datasets_fingerprint": getattr(dataset, "_fingerprint", None),
    }


NOT_COMPARED = ("datasets_fingerprint",)  # recorded for the reader's information, never a reason to refuse


def provenance_diff(old, new, prefix: str = "") -> list[str]:
    """Every leaf where two provenance records differ, as ``"key.sub: old -> new"`` (``NOT_COMPARED`` keys skipped)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            if key in NOT_COMPARED:
                continue
            out += provenance_diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    old, new = jsonable(old), jsonable(new)
    if old == new:
        return []

    def short(v):
        text = json.dumps(v, sort_keys=True)
        return text if len(text) <= 80 else text[:77] + "..."

    return [f"{prefix.rstrip('.')}: {short(old)} -> {short(new)}"]


class ProvenanceError(ValueError):
    """A stored artefact was made by something else than what would make it now."""


def check_provenance(artefact: str, stored: dict, current: dict, start_over: str) -> None:
    """Raise :class:`ProvenanceError` when ``stored`` (the record kept with ``artefact``) differs from ``current``; the
    message lists every differing field (stored -> now) and ``start_over`` (which file/folder to delete)."""
    diff = provenance_diff(stored, current)
    if diff:
        raise ProvenanceError(
            f"{artefact} was made by something else than this run; it differs in: {'; '.join(diff)} (stored -> now). "
            f"Refusing to reuse it. {start_over}"
        )


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
        except (LockedError, ProvenanceError) as e:
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
