"""The pipeline's run folder: claimed by one driver at a time and refused when it holds another run, the paths of
its artefacts, and the phase markers with the fingerprints of what each phase read and wrote."""

from __future__ import annotations

import json
from pathlib import Path

from ...io import (
    ProvenanceError,
    check_provenance,
    model_fingerprint,
    path_fingerprint,
    sha256_json,
    write_json_atomic,
)
from ...locks import LockedError, WriterLock
from .config import run_fingerprint


RUN_FILE = "wmss_pipeline.json"
LOCK_FILE = "wmss_pipeline.lock"
PHASES = ("base", "data", "sft", "entropy_weak", "entropy_strong", "wd_ds", "wdjt")


def log(msg: str) -> None:
    print(f"[wmss pipeline] {msg}", flush=True)


def check_checkpoint_formats(cfg: dict) -> None:
    """The user-given base and strong models must be safetensors checkpoints (checked before any phase runs)."""
    from ...weak import require_safetensors

    for key in ("base_model", "strong_model"):
        try:
            require_safetensors(cfg[key], key)
        except ValueError as e:
            raise SystemExit(str(e)) from e


def claim_output_dir(cfg: dict) -> WriterLock:
    """Create the run folder, or check that the existing one belongs to this very run; returns the folder's writer
    lock, held (refused, naming the owner, when another driver works in the folder)."""
    out = Path(cfg["output_dir"])
    fingerprint, ident = run_fingerprint(cfg)
    run_file = out / RUN_FILE
    if out.exists() and any(out.iterdir()) and not run_file.exists() and not (out / LOCK_FILE).exists():
        raise SystemExit(
            f"{out} is not empty and holds no {RUN_FILE}: it is not a WMSS pipeline run folder. Use an empty or new "
            "output_dir."
        )
    out.mkdir(parents=True, exist_ok=True)
    lock = WriterLock(out / LOCK_FILE, f"the pipeline run folder {out}")
    try:
        lock.acquire()
    except LockedError as e:
        raise SystemExit(str(e)) from e
    try:
        _claim_locked(out, run_file, fingerprint, ident, cfg)
    except BaseException:
        lock.release()
        raise
    return lock


def _claim_locked(out: Path, run_file: Path, fingerprint: str, ident: dict, cfg: dict) -> None:
    if run_file.exists():
        previous = json.loads(run_file.read_text())
        if previous["fingerprint"] != fingerprint:
            old = previous.get("identity", {})
            diff = sorted(k for k in set(old) | set(ident) if sha256_json(old.get(k)) != sha256_json(ident.get(k)))
            raise SystemExit(
                f"{out} holds another WMSS pipeline run (different {', '.join(diff)}). Use a new output_dir, or "
                "delete that folder to start over."
            )
        log(f"continuing the run in {out}")
    else:
        if any(p.name != LOCK_FILE for p in out.iterdir()):
            raise SystemExit(
                f"{out} is not empty and holds no {RUN_FILE}: it is not a WMSS pipeline run folder. Use an empty or "
                "new output_dir."
            )
        # the run file first: a kill right after it leaves a run folder the next run continues
        write_json_atomic(run_file, {"fingerprint": fingerprint, "identity": ident, "config": cfg})
        log(f"new run in {out}")
    for sub in ("markers", "configs", "logs"):
        (out / sub).mkdir(exist_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# Paths and markers
# ---------------------------------------------------------------------------------------------------------------
class Run:
    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.dir = Path(cfg["output_dir"])

    @property
    def weak(self) -> str:
        return self.cfg["base_model"] or str(self.dir / "base")

    @property
    def data(self) -> str:
        return self.cfg["dataset"] or str(self.dir / "data" / "train.jsonl")

    @property
    def strong(self) -> str:
        return self.cfg["strong_model"] or str(self.dir / "strong")

    def entropy(self, which: str) -> str:
        return str(self.dir / "entropy" / f"{which}.jsonl")

    @property
    def merged(self) -> str:
        return str(self.dir / "wd_ds" / "entropy.jsonl")

    @property
    def final(self) -> str:
        return str(self.dir / "final")

    def marker(self, phase: str) -> Path:
        return self.dir / "markers" / f"{phase}.done.json"

    def done(self, phase: str) -> bool:
        return self.marker(phase).exists()

    def mark(self, phase: str, seconds: float, inputs: dict, **info) -> None:
        """Mark ``phase`` done, with the fingerprints of what it read (``inputs``) and wrote (``outputs``)."""
        write_json_atomic(
            self.marker(phase),
            {
                "phase": phase,
                "seconds": round(seconds, 2),
                "inputs": inputs,
                "outputs": self.fingerprints(PHASE_OUTPUTS[phase]),
                **info,
            },
        )

    def path_of(self, name: str) -> str:
        return {
            "weak": self.weak,
            "data": self.data,
            "strong": self.strong,
            "entropy_weak": self.entropy("weak"),
            "entropy_strong": self.entropy("strong"),
            "wd_ds": self.merged,
            "final": self.final,
        }[name]

    def fingerprints(self, names) -> dict:
        """Fingerprints (``wmss_trl.io.path_fingerprint``) of the named artefacts of the run."""
        out = {}
        for name in names:
            path = self.path_of(name)
            out[name] = model_fingerprint(path) if name in ("weak", "strong", "final") else path_fingerprint(path)
        return out

    def check_reuse(self, phase: str) -> None:
        """A finished phase is reused only while what it read and wrote is unchanged; else SystemExit naming it."""
        with open(self.marker(phase)) as f:
            marker = json.load(f)
        later = PHASES[PHASES.index(phase) :]
        how = (
            f"Delete {self.marker(phase)} and the markers of the later phases ({', '.join(later[1:]) or 'none'}) "
            f"to redo them from this phase, or use a new output_dir to start over."
        )
        for kind, names in (("inputs", PHASE_INPUTS[phase]), ("outputs", PHASE_OUTPUTS[phase])):
            if kind not in marker:
                raise SystemExit(f"{self.marker(phase)} records no fingerprints (written by an older wmss_trl). {how}")
            try:
                current = self.fingerprints(names)
            except FileNotFoundError as e:
                raise SystemExit(f"phase {phase!r} is marked done but its {kind[:-1]} is missing: {e} {how}") from e
            try:
                check_provenance(f"phase {phase!r} ({kind})", marker[kind], current, how)
            except ProvenanceError as e:
                raise SystemExit(str(e)) from e


# What each phase reads and writes, by artefact name (Run.path_of)
PHASE_INPUTS = {
    "base": (),
    "data": (),
    "sft": ("weak", "data"),
    "entropy_weak": ("weak", "data"),
    "entropy_strong": ("strong", "data"),
    "wd_ds": ("entropy_weak", "entropy_strong"),
    "wdjt": ("weak", "strong", "data", "wd_ds"),
}
PHASE_OUTPUTS = {
    "base": ("weak",),
    "data": ("data",),
    "sft": ("strong",),
    "entropy_weak": ("entropy_weak",),
    "entropy_strong": ("entropy_strong",),
    "wd_ds": ("wd_ds",),
    "wdjt": ("final",),
}
