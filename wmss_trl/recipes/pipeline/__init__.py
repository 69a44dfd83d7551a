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
import time
from pathlib import Path

import yaml

from ...locks import die_with_parent
from .config import CONFIG_HELP, DEFAULT_CONFIG, SECTIONS, flat_targets, load_config, run_fingerprint, sectioned
from .phases import (
    check_pair,
    entropy_config,
    make_arithmetic_rows,
    phase_base,
    phase_data,
    phase_entropy,
    phase_sft,
    phase_wd_ds,
    phase_wdjt,
    training_config,
    worker_sft,
)
from .processes import launch_prefix, phase_lock, run_command
from .run import PHASE_INPUTS, PHASE_OUTPUTS, PHASES, RUN_FILE, Run, check_checkpoint_formats, claim_output_dir, log


__all__ = [
    "DEFAULT_CONFIG",
    "PHASES",
    "PHASE_INPUTS",
    "PHASE_OUTPUTS",
    "SECTIONS",
    "Run",
    "drive",
    "entropy_config",
    "flat_targets",
    "launch_prefix",
    "load_config",
    "main",
    "make_arithmetic_rows",
    "make_parser",
    "run_command",
    "run_fingerprint",
    "sectioned",
    "training_config",
]


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
            from ..sft import main as sft_main

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
