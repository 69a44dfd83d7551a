"""``wmss pipeline``: the whole WMSS recipe in one command, resumable phase by phase.

    wmss pipeline                                   # the embedded default: tiny model, generated arithmetic, minutes on CPU
    wmss pipeline --config pipeline.yaml            # merged over the default (see pipeline_default.yaml)
    wmss pipeline --config pipeline.yaml --launch_config zero3 [--num_processes 2]
    wmss pipeline --print_config                    # the resolved configuration

The configuration has sections (common, sft, entropy, selection, wdjt, ...; ``wmss pipeline --help`` lists them with
the embedded default); TRL's keys may also be given flat, at the top level, as ``trl sft`` takes them (see
[`flat_targets`]).

Phases (each writes its output under ``output_dir`` and a completion marker in ``output_dir/markers``; a phase whose
marker exists is skipped, so re-running the same command after a crash continues where it stopped):

    base            the weak model M_w: `base_model`, or a tiny Qwen2 built from config (wmss_trl.toy) -> base/
    data            `dataset`, or a generated arithmetic task                                -> data/train.jsonl
    sft             phase 1: plain TRL SFTTrainer, base -> strong model M_s                   -> strong/
    entropy_weak    H0 = entropy of M_w on the data (`wmss entropy`, itself resumable)        -> entropy/weak.jsonl
    entropy_strong  H1 = entropy of M_s                                                        -> entropy/strong.jsonl
    wd_ds           WD-DS weights from (H0, H1)                                               -> wd_ds/entropy.jsonl
    wdjt            phase 3: WMSSSFTTrainer (mixed logits, frozen M_w, WD-DS selection)       -> final/

Every training / scoring phase runs in its own process: ``python -m wmss_trl.cli <command>``, or
``accelerate launch --config_file <launch.accelerate_config> -m wmss_trl.cli <command>`` (DDP, ZeRO-2, ZeRO-3), so
no accelerate / DeepSpeed state leaks from one phase into the next. Such a process dies with the driver (parent-death
signal SIGTERM, also in accelerate's workers), and only one driver works in a run folder at a time (the lock
``output_dir/wmss_pipeline.lock`` names its pid; each phase's writer holds a lock of its own too).

Provenance: the run configuration and the user-given models / dataset are fingerprinted in
``output_dir/wmss_pipeline.json`` (an output dir that holds another run's files is refused), and every phase marker
records the fingerprints of what the phase read and wrote (``wmss_trl.io``); a finished phase is reused only while
they still match, else the run stops naming what changed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ..io import (
    PIPELINE_PID_ENV,
    LockedError,
    ProvenanceError,
    WriterLock,
    check_provenance,
    child_dies_with,
    die_with_parent,
    model_fingerprint,
    path_fingerprint,
    sha256_json,
    write_json_atomic,
    write_jsonl_atomic,
)


DEFAULT_CONFIG = Path(__file__).with_name("pipeline_default.yaml")
RUN_FILE = "wmss_pipeline.json"
LOCK_FILE = "wmss_pipeline.lock"
PHASE_LOCK_FILE = "phase.lock"
CHILD_LOCK_TIMEOUT = 120.0  # seconds a phase waits for the writer of a killed earlier driver to exit
PHASES = ("base", "data", "sft", "entropy_weak", "entropy_strong", "wd_ds", "wdjt")
SECTIONS = ("toy_model", "toy_data", "launch", "common", "sft", "entropy", "selection", "wdjt")
NOT_FINGERPRINTED = ("output_dir", "launch")
TOP_KEYS = ("output_dir", "base_model", "strong_model", "dataset")
FLAT_ALIASES = {"model_name_or_path": "base_model", "dataset_name": "dataset"}  # TRL's names of the top-level keys
PIPELINE_SET = {  # WMSSSFTConfig / trl keys the pipeline sets itself
    "weak_model_name_or_path": "the weak model is `base_model` (the base before phase 1)",
    "entropy_files": "the WD-DS phase writes them",
    "weak_entropy_column": "the entropy phases name it",
    "strong_entropy_column": "the entropy phases name it",
    "resume_from_checkpoint": "a re-run resumes by itself",
}
LAUNCH_KEYS = ("accelerate_config", "num_processes")
ENTROPY_KEYS = ("per_device_eval_batch_size", "idx_column", "write_every", "entropy_chunk_size")
MASK_FIELDS = (
    "max_length",
    "truncation_mode",
    "completion_only_loss",
    "assistant_only_loss",
    "dataset_text_field",
    "chat_template_path",
    "pad_token",
    "dataset_kwargs",
)


def log(msg: str) -> None:
    print(f"[wmss pipeline] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------
def flat_targets(key: str) -> list[tuple[str, ...]]:
    """Where a flat (top-level, TRL-style) key goes; more than one entry means ambiguous, none unknown. The rule:

    accelerate_config, num_processes                      -> launch
    selection_* fields of WMSSSFTConfig                   -> selection
    the other WMSSSFTConfig fields that SFTConfig lacks   -> wdjt
    SFTConfig fields                                      -> sft and wdjt (both trainings; the entropy passes
                                                             follow WD-JT's masking fields and bf16)
    per_device_eval_batch_size and `wmss entropy`'s idx_column, write_every, entropy_chunk_size -> entropy
    """
    from dataclasses import fields

    from trl import SFTConfig

    from ..sft import WMSSSFTConfig

    sft_fields = {f.name for f in fields(SFTConfig)}
    wmss_fields = {f.name for f in fields(WMSSSFTConfig)} - sft_fields
    targets = []
    if key in LAUNCH_KEYS:
        targets.append(("launch",))
    if key in wmss_fields:
        targets.append(("selection",) if key.startswith("selection_") else ("wdjt",))
    if key in sft_fields:
        targets.append(("sft", "wdjt"))
    if key in ENTROPY_KEYS:
        targets.append(("entropy",))
    return targets


def sectioned(layer: dict, source: str) -> dict:
    """``layer`` with its flat keys (TRL's keys at the top level, as `trl sft` takes them) moved into the sections
    [`flat_targets`] names; a section the layer itself gives wins over its flat keys. SystemExit on a key that fits
    no section or several, naming the key and the sections."""
    out: dict = {}
    flat = {k: v for k, v in layer.items() if k not in TOP_KEYS and k not in SECTIONS}
    for key, value in flat.items():
        if key in FLAT_ALIASES:
            top = FLAT_ALIASES[key]
            if top in layer:
                raise SystemExit(f"{source} sets both {key!r} and {top!r} (the same setting); keep one.")
            out[top] = value
            continue
        if key in PIPELINE_SET:
            raise SystemExit(f"{key!r} in {source} is set by the pipeline ({PIPELINE_SET[key]}); remove it.")
        targets = flat_targets(key)
        if len(targets) != 1:
            where = " or ".join("`" + " + ".join(t) + "`" for t in targets)
            why = (
                f"ambiguous key {key!r} in {source}: it fits several sections ({where}); put it under the one you mean"
                if targets
                else f"unknown key {key!r} in {source}: it fits no section (it is neither a pipeline key, "
                f"{', '.join(TOP_KEYS)}, nor a field of TRL's SFTConfig, WMSSSFTConfig or `wmss entropy`)"
            )
            raise SystemExit(f"{why}. Sections: {', '.join(SECTIONS)} (see `wmss pipeline --help`).")
        for section in targets[0]:
            out.setdefault(section, {})[key] = value
    for key, value in layer.items():
        if key in flat:
            continue
        if key in SECTIONS and isinstance(value, dict) and isinstance(out.get(key), dict):
            value = {**out[key], **value}
        out[key] = value
    return out


def load_config(path: str | None = None, overrides: dict | None = None) -> dict:
    """The embedded default, with the YAML file at ``path`` merged over it (section by section), then ``overrides``.
    A layer may give TRL's keys flat, at the top level: [`sectioned`] moves them into their sections first."""
    with open(DEFAULT_CONFIG) as f:
        cfg = yaml.safe_load(f)
    layers = []
    if path is not None:
        with open(path) as f:
            user = yaml.safe_load(f) or {}
        if not isinstance(user, dict):
            raise SystemExit(f"{path} must hold a YAML mapping.")
        layers.append((path, user))
    if overrides:
        layers.append(("command line", overrides))
    for source, layer in layers:
        for key, value in sectioned(layer, source).items():
            if key in SECTIONS:
                if not isinstance(value, dict):
                    raise SystemExit(f"{key!r} in {source} must be a mapping of fields.")
                cfg[key] = {**(cfg[key] or {}), **value}
            else:
                cfg[key] = value
    cfg["output_dir"] = os.path.abspath(cfg["output_dir"])
    for key in ("base_model", "strong_model", "dataset"):
        if cfg[key] is not None:
            cfg[key] = os.path.abspath(cfg[key])
    return cfg


def run_fingerprint(cfg: dict) -> tuple[str, dict]:
    """What defines a run: the configuration (minus where it lives and how it is launched) and the fingerprints of the
    user-given base model, strong model (safetensors headers, sizes, mtimes) and dataset (content)."""
    ident = {k: v for k, v in cfg.items() if k not in NOT_FINGERPRINTED}
    for key in ("base_model", "strong_model", "dataset"):
        if cfg[key] is not None:
            if not os.path.exists(cfg[key]):
                raise SystemExit(f"{key} {cfg[key]!r} does not exist.")
            ident[f"{key}_content"] = path_fingerprint(cfg[key])
    return sha256_json(ident), ident


def check_checkpoint_formats(cfg: dict) -> None:
    """The user-given base and strong models must be safetensors checkpoints (checked before any phase runs)."""
    from ..weak import require_safetensors

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


def write_yaml(path, obj) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(obj, f, sort_keys=True)
    return str(path)


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


# ---------------------------------------------------------------------------------------------------------------
# Embedded data and model
# ---------------------------------------------------------------------------------------------------------------
def make_arithmetic_rows(num_samples: int = 512, max_operand: int = 50, seed: int = 0) -> list[dict]:
    """A minimal conversational prompt/completion task: ``"a+b="`` or ``"a-b="`` -> the result, with an ``idx``."""
    rng = random.Random(seed)
    rows = []
    for i in range(num_samples):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        op = rng.choice("+-")
        result = a + b if op == "+" else a - b
        rows.append(
            {
                "idx": i,
                "prompt": [{"role": "user", "content": f"{a}{op}{b}="}],
                "completion": [{"role": "assistant", "content": str(result)}],
            }
        )
    return rows


def phase_base(run: Run) -> dict:
    if run.cfg["base_model"] is not None:
        if not os.path.isfile(os.path.join(run.weak, "config.json")):
            raise SystemExit(f"base_model {run.weak!r} is not a checkpoint folder (no config.json).")
        return {"base_model": run.weak, "built": False}
    from ..toy import build_char_tokenizer, build_tiny_model, save_model_and_tokenizer

    tok = build_char_tokenizer()
    model = build_tiny_model(tok, **run.cfg["toy_model"])
    tmp = run.dir / "base.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_and_tokenizer(model, tok, str(tmp))
    shutil.rmtree(run.weak, ignore_errors=True)
    os.replace(tmp, run.weak)
    return {"base_model": run.weak, "built": True, "parameters": sum(p.numel() for p in model.parameters())}


def phase_data(run: Run) -> dict:
    if run.cfg["dataset"] is not None:
        return {"dataset": run.data, "generated": False}
    rows = make_arithmetic_rows(**run.cfg["toy_data"])
    os.makedirs(os.path.dirname(run.data), exist_ok=True)
    write_jsonl_atomic(run.data, rows)
    return {"dataset": run.data, "generated": True, "num_samples": len(rows)}


# ---------------------------------------------------------------------------------------------------------------
# Launched phases
# ---------------------------------------------------------------------------------------------------------------
def launch_prefix(cfg: dict) -> list[str]:
    from ..launch import resolve_accelerate_config

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
    (``PR_SET_PDEATHSIG``, see :func:`wmss_trl.io.child_dies_with`), and so do accelerate's workers (they inherit
    ``WMSS_PIPELINE_PID`` and set the same signal, :func:`wmss_trl.io.die_with_parent`). On any other exit of the
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


def training_config(run: Run, section: str) -> dict:
    cfg = {**run.cfg["common"], **run.cfg[section]}
    for reserved in ("output_dir", "model_name_or_path", "dataset_name"):
        if reserved in cfg:
            raise SystemExit(f"{reserved!r} is set by the pipeline; remove it from `{section}` / `common`.")
    return cfg


def last_checkpoint(folder: str) -> str | None:
    """The last *complete* checkpoint in ``folder``: a torn one (a kill or a full disk mid-save) is skipped with a
    warning, so a re-run never resumes from it (:mod:`wmss_trl.checkpoints`)."""
    from ..checkpoints import last_complete_checkpoint

    return last_complete_checkpoint(folder)


def phase_sft(run: Run) -> dict:
    if run.cfg["strong_model"] is not None:
        if not os.path.isfile(os.path.join(run.strong, "config.json")):
            raise SystemExit(f"strong_model {run.strong!r} is not a checkpoint folder (no config.json).")
        return {"strong_model": run.strong, "trained": False}
    run_command(run, "sft", ["pipeline", "--phase", "sft", "--output_dir", str(run.dir)])
    if not os.path.isfile(os.path.join(run.strong, "config.json")):
        raise SystemExit(f"phase 1 finished but {run.strong} holds no model.")
    return {"strong_model": run.strong, "trained": True}


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


def worker_sft(run: Run) -> int:
    """Phase 1 inside its (possibly launched) process: plain TRL SFT of the base into the strong model."""
    import torch
    from trl import SFTConfig, SFTTrainer

    from .common import DataArguments, load_dataset_splits, load_tokenizer, teardown

    kwargs = training_config(run, "sft")
    if not torch.cuda.is_available():
        kwargs.setdefault("use_cpu", True)  # before the config exists: see cpu-setup T2/T3
    args = SFTConfig(output_dir=run.strong, **kwargs)
    train = load_dataset_splits(DataArguments(dataset_name=run.data))["train"]
    trainer = SFTTrainer(run.weak, args=args, train_dataset=train, processing_class=load_tokenizer(run.weak))
    trainer.accelerator.print(
        f"phase 1 SFT: {trainer.accelerator.num_processes} process(es), {trainer.accelerator.distributed_type.value}"
    )
    trainer.train(resume_from_checkpoint=last_checkpoint(run.strong))
    trainer.save_model(run.strong)
    teardown()
    return 0


def check_pair(run: Run) -> None:
    """Weak and strong models must share the tokenizer (WMSS compares / mixes them token by token)."""
    from ..weak import check_weak_compatible
    from .common import load_tokenizer

    try:
        check_weak_compatible(run.strong, run.weak, load_tokenizer(run.strong), run.weak)
    except ValueError as e:
        raise SystemExit(f"weak model {run.weak} and strong model {run.strong} cannot be paired: {e}") from e


def entropy_config(run: Run) -> str:
    wdjt = training_config(run, "wdjt")
    cfg = {k: wdjt[k] for k in MASK_FIELDS if k in wdjt}
    cfg.update(bf16=wdjt.get("bf16", False), report_to="none")
    cfg.update(run.cfg["entropy"] or {})
    return write_yaml(run.dir / "configs" / "entropy.yaml", cfg)


def phase_entropy(run: Run, which: str) -> dict:
    model, column = (run.weak, "entropy_0") if which == "weak" else (run.strong, "entropy_1")
    output = run.entropy(which)
    run_command(
        run,
        f"entropy_{which}",
        [
            "entropy",
            "--config",
            entropy_config(run),
            "--model",
            model,
            "--dataset",
            run.data,
            "--output",
            output,
            "--entropy_column",
            column,
            "--progress",
            "false",
            "--lock_timeout",
            str(CHILD_LOCK_TIMEOUT),
        ],
    )
    with open(output + ".meta.json") as f:
        if not json.load(f)["complete"]:
            raise SystemExit(f"{output} is incomplete after the entropy phase.")
    return {"output": output, "column": column}


def phase_wd_ds(run: Run) -> dict:
    """Join H0 and H1 on idx, compute the WD-DS weights, write them (with the entropies) and a summary."""
    import numpy as np

    from ..selection import merge_entropy_files, resample_indices, unique_count, wd_ds_weights

    sel = run.cfg["selection"]
    sources = [run.entropy("weak"), run.entropy("strong")]
    idx, cols = merge_entropy_files(sources, ["entropy_0", "entropy_1"])
    h0, h1 = cols["entropy_0"], cols["entropy_1"]
    valid = ~np.isnan(h0) & ~np.isnan(h1)
    weights = np.zeros(len(idx))
    weights[valid] = wd_ds_weights(
        h0[valid],
        h1[valid],
        sel.get("selection_alpha", 0.1),
        sel.get("selection_beta", 0.8),
        sel.get("selection_gamma", 0.1),
    )
    os.makedirs(os.path.dirname(run.merged), exist_ok=True)
    write_jsonl_atomic(
        run.merged,
        (
            {"idx": i, "entropy_0": None if a != a else a, "entropy_1": None if b != b else b, "wd_ds_weight": w}
            for i, a, b, w in zip(idx.tolist(), h0.tolist(), h1.tolist(), weights.tolist())
        ),
    )
    with open(sources[0] + ".meta.json") as f:
        dataset_provenance = json.load(f)["provenance"]["dataset"]  # the same in both: merge_entropy_files checked it
    write_json_atomic(
        run.merged + ".meta.json",
        {
            "format": "wmss-entropy/2",
            "complete": True,
            "num_rows": int(len(idx)),
            "num_done": int(len(idx)),
            "entropy_column": ["entropy_0", "entropy_1", "wd_ds_weight"],
            "idx_column": "idx",
            "provenance": {
                "dataset": dataset_provenance,
                "sources": run.fingerprints(["entropy_weak", "entropy_strong"]),
            },
        },
    )
    dh = (h1 - h0)[valid]
    draw = resample_indices(weights, sel.get("selection_multiplier", 1.0), sel.get("selection_seed", 42))
    summary = {
        "num_samples": int(len(idx)),
        "num_scored": int(valid.sum()),
        "mean_entropy_weak": float(h0[valid].mean()),
        "mean_entropy_strong": float(h1[valid].mean()),
        "fraction_entropy_dropped": float((dh < 0).mean()),
        "fraction_entropy_rose": float((dh > 0).mean()),
        "max_weight_times_n": float(weights.max() * valid.sum()),
        "unique_samples_in_resample": unique_count(draw),
    }
    write_json_atomic(run.dir / "wd_ds" / "summary.json", summary)
    log("WD-DS: " + json.dumps(summary))
    return {"output": run.merged, **summary}


def phase_wdjt(run: Run) -> dict:
    cfg = training_config(run, "wdjt")
    cfg.update(run.cfg["selection"] or {})
    cfg.update(
        model_name_or_path=run.strong,
        weak_model_name_or_path=run.weak,
        dataset_name=run.data,
        output_dir=run.final,
        entropy_files=[run.merged],
        weak_entropy_column="entropy_0",
        strong_entropy_column="entropy_1",
    )
    if cfg.get("selection_mode") is None:
        cfg.pop("entropy_files")
    checkpoint = last_checkpoint(run.final)
    if checkpoint:
        cfg["resume_from_checkpoint"] = checkpoint
    config = write_yaml(run.dir / "configs" / "wdjt.yaml", cfg)
    run_command(run, "wdjt", ["pipeline", "--phase", "wdjt", "--output_dir", str(run.dir), "--config", config])
    if not os.path.isfile(os.path.join(run.final, "config.json")):
        raise SystemExit(f"WD-JT finished but {run.final} holds no model.")
    return {"final_model": run.final}


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------
def drive(cfg: dict) -> dict:
    check_checkpoint_formats(cfg)
    with claim_output_dir(cfg):
        return _drive(Run(cfg))


def _drive(run: Run) -> dict:
    steps = {
        "base": lambda: phase_base(run),
        "data": lambda: phase_data(run),
        "sft": lambda: phase_sft(run),
        "entropy_weak": lambda: phase_entropy(run, "weak"),
        "entropy_strong": lambda: phase_entropy(run, "strong"),
        "wd_ds": lambda: phase_wd_ds(run),
        "wdjt": lambda: phase_wdjt(run),
    }
    timings = {}
    start_all = time.time()
    for phase in PHASES:
        if run.done(phase):
            run.check_reuse(phase)
            log(f"{phase}: complete, skipped")
            continue
        if phase == "entropy_weak":  # before any cross-model work: the pair must share a tokenizer
            check_pair(run)
        start = time.time()
        log(f"{phase}: running")
        inputs = run.fingerprints(PHASE_INPUTS[phase])
        info = steps[phase]()
        timings[phase] = time.time() - start
        run.mark(phase, timings[phase], inputs, **info)
        log(f"{phase}: done in {timings[phase]:.1f} s")
    total = time.time() - start_all
    log(f"finished in {total:.1f} s; final model: {run.final}")
    return {"final_model": run.final, "seconds": total, "phases_run": list(timings)}


CONFIG_HELP = """\
The --config YAML is merged over the embedded default below, key by key inside each section. Its keys:

  output_dir, base_model, strong_model, dataset   the run folder, the weak model M_w (null: a tiny model built from
                                                  toy_model), an existing strong model (skips phase 1), the data
                                                  (null: generated from toy_data)
  toy_model        tiny Qwen2 built when base_model is null (wmss_trl.toy.build_tiny_model arguments)
  toy_data         arithmetic task generated when dataset is null (num_samples, max_operand, seed)
  launch           how each phase runs: accelerate_config (null | ddp | zero2 | zero3 | a path), num_processes
  common           TRL SFTConfig fields shared by phase 1 and WD-JT
  sft              SFTConfig fields of phase 1 only (plain TRL SFT, base -> strong)
  entropy          SFTConfig / `wmss entropy` fields of the entropy passes H0, H1 (they also take WD-JT's masking
                   fields and bf16)
  selection        WD-DS fields of WMSSSFTConfig (selection_mode, selection_alpha/beta/gamma, ...)
  wdjt             WMSSSFTConfig fields of WD-JT only (mixing_lambda, ...); sft and wdjt win over common

Flat form: TRL's keys may also be given at the top level, as `trl sft --config` takes them; each goes to its section:
  model_name_or_path -> base_model, dataset_name -> dataset; accelerate_config, num_processes -> launch;
  selection_* -> selection; other WMSSSFTConfig-only fields -> wdjt; SFTConfig fields -> sft and wdjt (both
  trainings); per_device_eval_batch_size, idx_column, write_every, entropy_chunk_size -> entropy.
A key that fits no section, or several (per_device_eval_batch_size: training eval or the entropy passes), is
refused, naming the sections; a section given in the same file wins over its flat keys. --print_config shows the
result. For example, this flat file

  output_dir: runs/qwen-math
  model_name_or_path: /models/Qwen3-4B-Base
  dataset_name: data/math.jsonl
  learning_rate: 1.0e-5
  mixing_lambda: 0.5

is the sectioned {output_dir: ..., base_model: ..., dataset: ..., sft: {learning_rate: 1.0e-5},
wdjt: {learning_rate: 1.0e-5, mixing_lambda: 0.5}}.

The embedded default (wmss_trl/recipes/pipeline_default.yaml):

"""


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wmss pipeline",
        description=__doc__.split("\n\n")[0],
        epilog=CONFIG_HELP + DEFAULT_CONFIG.read_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML merged over the embedded default (wmss_trl/recipes/pipeline_default.yaml).")
    p.add_argument("--output_dir", help="Run folder (overrides the config's output_dir).")
    p.add_argument("--launch_config", help="accelerate config for every phase: ddp, zero2, zero3 or a path.")
    p.add_argument("--num_processes", type=int, help="Processes per launched phase (overrides the launch config).")
    p.add_argument("--print_config", action="store_true", help="Print the resolved configuration and exit.")
    p.add_argument("--phase", choices=["sft", "wdjt"], help=argparse.SUPPRESS)  # internal: a launched phase worker
    return p


def main(argv: list[str] | None = None) -> int:
    opts = make_parser().parse_args(argv)
    if opts.phase is not None:  # inside a launched phase: the run folder already holds the configuration
        die_with_parent()
        with open(Path(opts.output_dir) / RUN_FILE) as f:
            run = Run(json.load(f)["config"])
        lock = phase_lock(run)
        try:
            if opts.phase == "sft":
                return worker_sft(run)
            from .sft import main as sft_main

            return sft_main(["--config", opts.config])
        finally:
            if lock is not None:
                lock.release()
    if "LOCAL_RANK" in os.environ:
        raise SystemExit(
            "`wmss pipeline` launches every phase itself; run it as a plain command, and give the accelerate "
            "config with --launch_config (or `launch: {accelerate_config: ...}` in the YAML), not --accelerate_config "
            "or `accelerate launch`."
        )
    overrides = {}
    if opts.output_dir:
        overrides["output_dir"] = opts.output_dir
    cfg = load_config(opts.config, overrides)
    if opts.launch_config or opts.num_processes:
        cfg["launch"] = {**cfg["launch"]}
        if opts.launch_config:
            cfg["launch"]["accelerate_config"] = opts.launch_config
        if opts.num_processes:
            cfg["launch"]["num_processes"] = opts.num_processes
    if opts.print_config:
        print(yaml.safe_dump(copy.deepcopy(cfg), sort_keys=False))
        return 0
    drive(cfg)
    return 0
