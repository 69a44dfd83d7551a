"""Running ``wmss compare``'s arms: one ``wmss grpo`` process per (arm, seed) in its own folder, skipped when
finished and resumed from its last complete checkpoint when interrupted, then the held-out evaluations of the base
model, of the run's checkpoints and of its final model on this process."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time

import yaml

from .args import EQUAL_TIME, VANILLA, WMSS
from .plan import Plan
from .records import check_record, read_json, write_json


def run_config(plan: Plan, arm: str, seed: int, max_steps: int | None = None) -> tuple[dict, list[str]]:
    """The YAML and the flags of one ``wmss grpo`` run: the user's YAML and flags, the arm's overrides over both,
    then what the command sets per run."""
    o = dict(plan.overrides[arm])
    config = {**plan.yaml_config, **o}
    if max_steps is not None:
        config["max_steps"] = max_steps
    if plan.training_args.eval_steps is not None:
        config.update(save_strategy="steps", save_steps=plan.training_args.eval_steps, save_total_limit=None)
    per_run = set(o) | {"output_dir"}
    if max_steps is not None:
        per_run.add("max_steps")
    if plan.training_args.eval_steps is not None:
        per_run |= {"save_strategy", "save_steps", "save_total_limit"}
    flags = [t for name, tokens in plan.flags if name not in per_run for t in tokens]
    config.update(seed=seed, data_seed=seed)
    return config, flags


def run_dir(plan: Plan, arm: str, seed: int) -> str:
    return os.path.join(plan.output_dir, "runs", arm, f"seed{seed}")


def train(plan: Plan, arm: str, seed: int, config: dict, flags: list[str], out: str) -> dict:
    """One ``wmss grpo`` process (its log in ``out/train.log``); returns its timing and peak memory, or raises
    ``RuntimeError`` naming the arm and the log's tail."""
    import wmss_trl

    from ...checkpoints import last_complete_checkpoint

    checkpoint = last_complete_checkpoint(out)
    start_step = int(checkpoint.rsplit("-", 1)[1]) if checkpoint else 0
    if checkpoint:
        config = {**config, "resume_from_checkpoint": True}
    config_file = os.path.join(out, "run.yaml")
    with open(config_file, "w") as f:
        yaml.safe_dump(config, f)
    cmd = [sys.executable, "-m", "wmss_trl.cli", "grpo", "--config", config_file, *flags, "--output_dir", out]
    if plan.cmp.accelerate_config:
        cmd += ["--accelerate_config", plan.cmp.accelerate_config]
        if plan.cmp.num_processes:
            cmd += ["--num_processes", str(plan.cmp.num_processes)]
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(wmss_trl.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    env.setdefault("OMP_NUM_THREADS", "1")
    log = os.path.join(out, "train.log")
    t = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's rusage: peak RSS of the largest process of the run
        proc.returncode = code = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    if code != 0:
        with open(log) as f:
            tail = "".join(f.readlines()[-15:])
        raise RuntimeError(
            f"arm {arm!r} (seed {seed}) failed: `wmss grpo` exited with code {code}. Log: {log}\n{tail}"
        )
    state = read_json(os.path.join(out, "trainer_state.json"))
    runtime = next(h["train_runtime"] for h in reversed(state["log_history"]) if "train_runtime" in h)
    steps = state["global_step"]
    return {
        "steps": steps,
        "start_step": start_step,
        "train_runtime": runtime,
        "step_seconds": runtime / max(steps - start_step, 1),
        "peak_rss_mib": usage.ru_maxrss / 1024,  # Linux: KiB
        "wall_seconds": wall,
        # CPU time of the run's processes (the child and every process it reaped): the work done, which other jobs
        # on a shared machine do not inflate the way they inflate wall time
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
    }


class Evaluator:
    """Loads models on this process and evaluates them with :func:`wmss_trl.evaluation.evaluate_model` (the tokenizer
    loads on the first call: a run of finished arms loads nothing)."""

    def __init__(self, plan: Plan):
        self.plan = plan

    @functools.cached_property
    def tokenizer(self):
        """The policy's tokenizer, loaded on the first evaluation."""
        from ..common import load_tokenizer

        tokenizer = load_tokenizer(self.plan.model_args.model_name_or_path, self.plan.training_args.trust_remote_code)
        if tokenizer.pad_token is None:  # as GRPOTrainer does
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def __call__(self, path: str, seed: int, step: int, desc: str) -> dict:
        import torch
        from transformers import AutoModelForCausalLM

        from ...evaluation import evaluate_model
        from ...weak import require_safetensors

        require_safetensors(path, "model to evaluate")
        args = self.plan.model_args
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=args.dtype, trust_remote_code=self.plan.training_args.trust_remote_code
        ).to("cuda" if torch.cuda.is_available() else "cpu")
        try:
            return evaluate_model(
                model,
                self.tokenizer,
                self.plan.eval_set,
                self.plan.reward_funcs,
                self.plan.training_args,
                num_samples=self.plan.num_samples,
                seed=seed,
                batch_size=self.plan.eval_info["batch_size"],
                pass_threshold=self.plan.eval_info["pass_threshold"],
                step=step,
                desc=desc,
            )
        finally:
            del model


def evaluate_run(plan: Plan, evaluator: Evaluator, out: str, seed: int, arm: str) -> list[dict]:
    """Evaluations of a finished run: every ``checkpoint-N`` with N a multiple of ``eval_steps``, then the final
    model (``out`` itself)."""
    from ...checkpoints import checkpoint_folders

    points = []
    every = plan.training_args.eval_steps
    if every:
        for folder in checkpoint_folders(out):
            step = int(folder.rsplit("-", 1)[1])
            if step % every == 0:
                points.append((step, folder))
    final = read_json(os.path.join(out, "trainer_state.json"))["global_step"]
    points = [p for p in points if p[0] != final] + [(final, out)]
    return [
        {"step": step, "result": evaluator(path, seed, step, f"eval {arm} seed {seed} step {step}")}
        for step, path in points
    ]


def equal_time_steps(plan: Plan, runs: dict, seed: int) -> int:
    """The steps of :data:`EQUAL_TIME` for ``seed``: vanilla's steps scaled by the reference arm's (``wmss``, or the
    first non-vanilla arm) compute over vanilla's, ``round(steps_vanilla * cpu_ref / cpu_vanilla)``, measured in CPU
    time (wall time follows the load of other jobs on a shared machine); from wall time, ``train_runtime_ref /
    step_seconds_vanilla``, for runs recorded before CPU time was. ``RuntimeError`` when one of the two runs is
    missing."""
    ref = WMSS if WMSS in plan.arms else next(a for a in plan.arms if a not in (VANILLA, EQUAL_TIME))
    if seed not in runs.get(VANILLA, {}) or seed not in runs.get(ref, {}):
        raise RuntimeError(
            f"arm {EQUAL_TIME!r} (seed {seed}) skipped: it needs the {VANILLA} and {ref} runs of seed {seed}."
        )
    vanilla_train, ref_train = runs[VANILLA][seed]["train"], runs[ref][seed]["train"]
    if "cpu_seconds" in vanilla_train and "cpu_seconds" in ref_train:
        steps = vanilla_train["steps"] - vanilla_train["start_step"]
        return max(1, round(steps * ref_train["cpu_seconds"] / vanilla_train["cpu_seconds"]))
    return max(1, round(ref_train["train_runtime"] / vanilla_train["step_seconds"]))


def base_file(plan: Plan, seed: int) -> str:
    return os.path.join(plan.output_dir, "base", f"seed{seed}.json")


def evaluate_base(plan: Plan, evaluator: Evaluator, seed: int, config_hash: str) -> dict:
    """The base model's evaluation with ``seed``'s sampling seed, read back when an earlier run stored it."""
    path = base_file(plan, seed)
    if os.path.isfile(path):
        return read_json(path)["result"]
    result = evaluator(plan.model_args.model_name_or_path, seed, 0, f"eval base seed {seed}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(path, {"config_hash": config_hash, "result": result})
    return result


def run_arm(plan: Plan, arm: str, seed: int, config_hash: str, runs: dict, base: dict, evaluator: Evaluator) -> dict:
    """One (arm, seed): its ``made_by.json`` checked, then read back when finished, else the base model evaluated
    (once per seed, into ``base``), the run trained (or its timing read back) and evaluated. Returns its result
    ``{"train": timing, "evals": [...]}``; ``RuntimeError`` naming the arm when it fails."""
    from tqdm.auto import tqdm

    folder = run_dir(plan, arm, seed)
    max_steps = equal_time_steps(plan, runs, seed) if arm == EQUAL_TIME else None
    config, flags = run_config(plan, arm, seed, max_steps)
    made_by = {"config_hash": config_hash, "arm": arm, "run_config": config, "flags": flags}
    check_record(os.path.join(folder, "made_by.json"), made_by, f"run {arm} seed {seed}")
    result_file = os.path.join(folder, "result.json")
    if os.path.isfile(result_file):
        result = read_json(result_file)
        tqdm.write(f"{arm} seed {seed}: finished earlier, skipped ({result_file})")
        return result
    if seed not in base:
        base[seed] = evaluate_base(plan, evaluator, seed, config_hash)
    train_file = os.path.join(folder, "train.json")
    if os.path.isfile(train_file):
        timing = read_json(train_file)
    else:
        tqdm.write(f"{arm} seed {seed}: training (log: {os.path.join(folder, 'train.log')})")
        timing = train(plan, arm, seed, config, flags, folder)
        write_json(train_file, timing)
    result = {"train": timing, "evals": evaluate_run(plan, evaluator, folder, seed, arm)}
    write_json(result_file, result)
    tqdm.write(f"{arm} seed {seed}: done ({timing['steps']} steps, {timing['step_seconds']:.2f} s/step)")
    return result
