"""The demo's phases: the weak and strong checkpoints (reused only when made by the same settings and numerics),
the WD-DS entropies, and each arm, every phase announced with a rough duration."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

from .args import (
    ARM_INFO,
    FAMILIES,
    SECONDS_ENTROPIES,
    SECONDS_PASS_AT_K,
    SECONDS_PER_EVAL,
    SECONDS_PER_STEP,
    SECONDS_SETUP,
    DemoArguments,
)
from .arms import arm_steps, rl_pass_at_k, run_arm, sft_phase
from .curves import curve_from_log, curve_steps


class Pace:
    """Announces each phase with a rough duration: the nominal seconds (:data:`SECONDS_PER_STEP` etc.) scaled by
    how much slower or faster than nominal this run has been so far."""

    def __init__(self):
        self.nominal_done, self.elapsed_done, self.t, self.nominal = 0.0, 0.0, None, 0.0

    def start(self, header: str, nominal: float | None) -> None:
        scale = self.elapsed_done / self.nominal_done if self.nominal_done else 1.0
        eta = "" if nominal is None else f" (~{_duration(nominal * scale)})"
        print(f"\n{header}{eta}", flush=True)
        self.t, self.nominal = time.perf_counter(), nominal or 0.0

    def stop(self) -> float:
        seconds = time.perf_counter() - self.t
        if self.nominal:
            self.nominal_done, self.elapsed_done = self.nominal_done + self.nominal, self.elapsed_done + seconds
        return seconds


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def check_made_by(run_dir: str, record: dict) -> None:
    """The cached weak/strong checkpoints and entropies in ``run_dir`` are reused only if they were made by the same
    settings and numerics (recorded in ``made_by.json``); a mismatch is refused, naming what differs."""
    path = os.path.join(run_dir, "made_by.json")
    if os.path.isfile(path):
        with open(path) as f:
            stored = json.load(f)
        diff = [
            f"{k}: {stored.get(k)!r} there, {record.get(k)!r} now"
            for k in sorted(set(stored) | set(record))
            if stored.get(k) != record.get(k)
        ]
        if diff:
            raise SystemExit(
                f"{run_dir} holds checkpoints made with other settings ({'; '.join(diff)}). Delete that "
                "folder or use another --output_dir."
            )
    elif os.path.isdir(run_dir) and os.listdir(run_dir):
        raise SystemExit(
            f"{run_dir} holds files but no made_by.json (an older demo made them): delete that folder or "
            "use another --output_dir."
        )
    else:
        os.makedirs(run_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump(record, f, indent=1)


def checked_run_dir(cfg: DemoArguments, numerics: dict) -> str:
    """The folder of the weak / strong checkpoints and entropies of these settings (:func:`check_made_by`)."""
    run_dir = os.path.join(
        cfg.output_dir,
        f"seed{cfg.seed}-w{cfg.weak_steps}-s{cfg.strong_steps}-"
        f"h{cfg.hidden_size}x{cfg.num_layers}-b{cfg.batch_size}-lr{cfg.learning_rate:g}",
    )
    made_by = {
        k: getattr(cfg, k)
        for k in ("seed", "weak_steps", "strong_steps", "hidden_size", "num_layers", "batch_size", "learning_rate")
    }
    check_made_by(run_dir, {**made_by, "numerics": numerics["variables"], "torch": numerics["torch"]})
    return run_dir


@dataclass
class DemoRun:
    """What the phases share: the settings, the embedded data and tokenizer, the checkpoint folder, the results."""

    cfg: DemoArguments
    data: dict
    tokenizer: object
    results: dict
    run_dir: str
    pace: Pace = field(default_factory=Pace)

    @property
    def weak(self) -> str:
        return os.path.join(self.run_dir, "weak")

    @property
    def strong(self) -> str:
        return os.path.join(self.run_dir, "strong")


def checkpoint_phase(run: DemoRun, name: str, with_pass_at_k: bool) -> None:
    """Phase 1 (``weak``: a tiny model trained from scratch with SFT) or 2 (``strong``: the weak one after more SFT),
    reused when it is there; its held-out and OOD accuracy (and, for the RL arms, the strong one's pass@k)."""
    from transformers import AutoModelForCausalLM

    from ...tasks import evaluate
    from ...toy import build_tiny_model

    cfg, data, tokenizer = run.cfg, run.data, run.tokenizer
    if name == "weak":
        path, steps, n = run.weak, cfg.weak_steps, 1
        what = (
            f"a small Qwen2 (hidden {cfg.hidden_size}, {cfg.num_layers} layers, char "
            "tokenizer) trained from scratch with SFT"
        )
    else:
        path, steps, n, what = run.strong, cfg.strong_steps, 2, "the weak checkpoint after more SFT"
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        run.pace.start(f"[{n}/4] {name} checkpoint: reusing {path} (same settings, made_by.json)", None)
    else:
        run.pace.start(
            f"[{n}/4] {name} checkpoint: {what}, {steps} steps x {cfg.batch_size} problems",
            steps * SECONDS_PER_STEP["sft"] + SECONDS_SETUP + SECONDS_PER_EVAL,
        )
        source = (
            run.weak
            if name == "strong"
            else build_tiny_model(
                tokenizer, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_heads=4, seed=cfg.seed
            )
        )
        sft_phase(
            source, tokenizer, data["train"], path, cfg.seed, steps, cfg.learning_rate, cfg.batch_size, cfg.report_to
        )
    model = AutoModelForCausalLM.from_pretrained(path)
    r = run.results["phases"][name] = {
        "test": evaluate(model, tokenizer, data["test"]),
        "ood": evaluate(model, tokenizer, data["ood"]),
    }
    if name == "strong" and with_pass_at_k:
        r["pass_at_k"] = rl_pass_at_k(model, tokenizer, data["test"], cfg, os.path.join(run.run_dir, "pass_at_k"))
    print(f"{name}: held-out {100 * r['test']:.1f}%  ood {100 * r['ood']:.1f}%  ({run.pace.stop():.0f} s)", flush=True)


def entropy_phase(run: DemoRun) -> list[str]:
    """Phase 3: the WD-DS entropies H0 (weak) and H1 (strong) on every training problem, each file reused when it is
    there; returns the two files."""
    from transformers import AutoModelForCausalLM

    from ...entropy import score_entropies
    from ...io import write_jsonl_atomic

    run.pace.start(
        f"[3/4] WD-DS entropies: mean token entropy of the weak (H0) and strong (H1) model on the "
        f"{len(run.data['train'])} training problems (the wmss arms resample by them)",
        SECONDS_ENTROPIES,
    )
    entropy_files = []
    for name, path, column in (("h0", run.weak, "entropy_0"), ("h1", run.strong, "entropy_1")):
        file = os.path.join(run.run_dir, f"{name}.jsonl")
        if not os.path.isfile(file):
            scores = score_entropies(AutoModelForCausalLM.from_pretrained(path), run.data["train"], run.tokenizer)
            rows = ({"idx": int(i), column: float(h)} for i, h in zip(scores["idx"], scores["entropy"]))
            write_jsonl_atomic(file, rows)
        entropy_files.append(file)
    print(f"entropies: {', '.join(entropy_files)}  ({run.pace.stop():.0f} s)", flush=True)
    return entropy_files


def arm_phase(run: DemoRun, i: int, arm: str, entropy_files: list[str]) -> dict:
    """Phase 4, arm ``i``: trained from the strong checkpoint (:func:`run_arm`) with its curve; its final accuracy,
    steps, training time, curve (and for the RL arms pass@k)."""
    from transformers import set_seed

    cfg, data = run.cfg, run.data
    num_arms = len(cfg.arms.split(","))
    set_seed(cfg.seed)
    steps = arm_steps(arm, cfg)
    evals = len(curve_steps(cfg, steps) | {steps})
    if cfg.time_budget is None:
        what, nominal = f"{steps} steps", steps * SECONDS_PER_STEP[arm] + SECONDS_SETUP + evals * SECONDS_PER_EVAL
    else:
        what, nominal = f"{cfg.time_budget:.0f} s of training", cfg.time_budget + SECONDS_SETUP + SECONDS_PER_EVAL
    if arm in FAMILIES["RL"]:
        nominal += SECONDS_PASS_AT_K
    run.pace.start(
        f"[4/4] arm {i}/{num_arms} {arm}: {ARM_INFO[arm]}; {what} from the strong checkpoint, greedy "
        f"accuracy {evals}x on all {len(data['test'])} held-out + {len(data['ood'])} OOD problems",
        nominal,
    )
    out = os.path.join(run.run_dir, arm)
    trainer, curve = run_arm(arm, run.strong, run.weak, run.tokenizer, data, entropy_files, cfg, out)
    points = curve_from_log(trainer.state.log_history, run.results["phases"]["strong"])
    r = {
        "test": points[-1]["test"],
        "ood": points[-1]["ood"],
        "steps": trainer.state.global_step,
        "train_seconds": curve.train_time(),
    }
    if arm in FAMILIES["RL"]:
        r["pass_at_k"] = rl_pass_at_k(trainer.model, run.tokenizer, data["test"], cfg, out)
    r.update(seconds=run.pace.stop(), curve=points)
    print(
        f"{arm}: held-out {100 * r['test']:.1f}%  ood {100 * r['ood']:.1f}%  ({r['steps']} steps, "
        f"{r['train_seconds']:.0f} s training, {r['seconds']:.0f} s in all)",
        flush=True,
    )
    return r
