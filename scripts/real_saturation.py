"""Saturation and WD-JT's mechanism on a real model: SmolLM2-135M-Instruct SFT'd to a plateau, then SFT vs WD-JT.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 nohup python scripts/real_saturation.py --out runs/real_saturation \
        > runs/real_saturation.log 2>&1 &

One seed, mechanism only (issue 11, section 4). Every stage writes its output under ``--out`` atomically and is
skipped when that output is there; a training stage that was killed resumes from its last Trainer checkpoint
(``save_steps``), so the run can be spread over several sittings (``--fresh`` starts over). A run folder made with
other settings is refused (``run.json`` records them). Results: ``--out/results.json`` and ``--out/results.md``.

The design
----------
* **Model and task** as in ``scripts/real_grpo.py``: SmolLM2-135M-Instruct (``scripts/prepare_smollm2.py``'s
  safetensors export), reasoning-gym ``chain_sum_2d2t`` ("15 - 43 =", 1-2 digit numbers), ``--n-train`` fixed train
  problems (seed 0) and ``--eval-n`` disjoint held-out ones (seed 1). SFT data: the prompt and the gold answer as the
  assistant turn (``--completion gold``: "-28", what the prompt asks for; ``worked``: "15 - 43 = -28"); the loss is
  on the completion tokens only (TRL's prompt-completion default).
* **Stage A, plateau**: ``WMSSSFTTrainer`` with no weak model and ``saturation_metrics=True`` (plain SFT
  cross-entropy that logs ``wmss/logit_margin``, ``wmss/min_margin``, ``wmss/sft_nontarget_grad_norm``), AdamW,
  ``--warmup-steps`` linear warmup then a **constant** learning rate, logging every step. **Plateau rule**: after the
  warmup and at least 2W logged steps (W = ``--plateau-window``), stop at the first step t where the mean train loss
  of steps t-W+1..t is less than ``--plateau-tol`` (relative) below the mean of steps t-2W+1..t-W; at most
  ``--plateau-steps`` steps (if the cap is hit, the results say "no plateau by the rule", and the arms still start
  there). The result is the strong model M_s.
* **Weak model M_w**: the untouched SmolLM2-135M-Instruct.
* **Stage B, arms** from M_s, ``--arm-steps`` steps each, same learning rate, warmup (fresh AdamW state in both),
  batch size, data order (``seed`` = ``data_seed``) and seed:
  - ``sft``: continued plain SFT, ``saturation_metrics=True``;
  - ``wdjt``: WD-JT, frozen M_w, ``mixing_lambda`` (default 0.5): also logs ``wmss/nontarget_grad_norm`` (the
    gradient on the strong logits of the mixed loss, lambda (p_mix - onehot)) and ``wmss/weak_topk_grad_share``.
  Both log every step on the batch they train on (same batches in both arms, so per-step values are paired).
* **Held-out**: greedy accuracy (``wmss_trl.real_task.greedy_accuracy``, full credit only) of M_w, M_s (= before
  both arms) and after each arm, on the same ``--eval-n`` problems; Wilson 95 % intervals, differences paired by
  problem (McNemar exact binomial test on the discordant problems, normal-approximation CI) and the smallest
  difference the design detects (two-sided 5 %, 80 % power).
* **Amplification ratio**: per logged WD-JT step, ``wmss/nontarget_grad_norm / wmss/sft_nontarget_grad_norm``
  (both on the same tokens and strong logits; the numerator includes the factor lambda).

CPU: one torch thread (``OMP_NUM_THREADS=1``), fp32.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import sys
import time


os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # prepare_smollm2.py lives next to this file
sys.path.insert(0, os.path.dirname(HERE))  # wmss_trl from the repository when not installed

from run_log import StepLogger, log, read_json  # noqa: E402

from wmss_trl.io import check_provenance, jsonable, model_fingerprint, write_json_atomic  # noqa: E402
from wmss_trl.locks import WriterLock  # noqa: E402


METRICS = (
    "loss",
    "wmss/logit_margin",
    "wmss/min_margin",
    "wmss/sft_nontarget_grad_norm",
    "wmss/nontarget_grad_norm",
    "wmss/weak_topk_grad_share",
    "wmss/strong_nll",
    "wmss/weak_nll",
    "mean_token_accuracy",
    "grad_norm",
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="SFT to a plateau, then SFT vs WD-JT with the saturation diagnostics.")
    p.add_argument("--out", default="runs/real_saturation", help="run folder (results.json, results.md, stages)")
    p.add_argument("--model-dir", default=None, help="exported SmolLM2 folder (default: prepare_smollm2's cache)")
    p.add_argument("--task", default="chain_sum_2d2t", help="a preset of wmss_trl.real_task.PRESETS")
    p.add_argument(
        "--completion", choices=("gold", "worked"), default="gold", help="SFT target: answer or 'a - b = c'"
    )
    p.add_argument("--n-train", type=int, default=256)
    p.add_argument("--eval-n", type=int, default=200, help="held-out problems (greedy accuracy)")
    p.add_argument("--train-seed", type=int, default=0)
    p.add_argument("--eval-seed", type=int, default=1)
    p.add_argument("--seed", type=int, default=42, help="seed and data_seed of every training stage")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-5, help="constant learning rate (after warmup), every stage")
    p.add_argument("--warmup-steps", type=int, default=5, help="linear warmup steps of every stage")
    p.add_argument("--plateau-steps", type=int, default=60, help="cap on the plateau stage's steps")
    p.add_argument("--plateau-window", type=int, default=10, help="W of the plateau rule")
    p.add_argument("--plateau-tol", type=float, default=0.05, help="relative loss decrease per window below which")
    p.add_argument("--arm-steps", type=int, default=40)
    p.add_argument("--mixing-lambda", type=float, default=0.5)
    p.add_argument("--save-steps", type=int, default=10, help="Trainer checkpoint interval (resume)")
    p.add_argument("--eval-max-new-tokens", type=int, default=24)
    p.add_argument("--eval-batch-size", type=int, default=25)
    p.add_argument("--fresh", action="store_true", help="delete --out first")
    args = p.parse_args(argv)
    for name in ("n_train", "eval_n", "batch_size", "plateau_steps", "plateau_window", "arm_steps", "save_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    if not 0 < args.mixing_lambda < 1:
        p.error(f"--mixing-lambda must be in (0, 1) for WD-JT (got {args.mixing_lambda})")
    if args.lr <= 0 or args.warmup_steps < 0 or args.plateau_tol < 0:
        p.error("--lr must be > 0, --warmup-steps and --plateau-tol >= 0")
    if args.train_seed == args.eval_seed:
        p.error("--train-seed and --eval-seed must differ (the held-out split is drawn from its own seed)")
    return args


# ------------------------------------------------------------------------------------------------- statistics
def wilson(k, n, z=1.96):
    """Wilson score interval of a proportion k/n: (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)."""
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def mcnemar_exact_p(b, c):
    """Two-sided exact McNemar test: under H0 the b + c discordant problems split Binomial(b + c, 1/2);
    p = min(1, 2 * P[X <= min(b, c)])."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired(after, before):
    """after - before on the same problems (lists of 0/1): mean difference, 95 % normal CI of the per-problem
    differences, the discordant counts (b: wrong -> right, c: right -> wrong) and McNemar's exact p."""
    d = [a - b for a, b in zip(after, before, strict=True)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / max(1, n - 1)
    half = 1.96 * math.sqrt(var / n)
    b = sum(1 for x in d if x > 0)
    c = sum(1 for x in d if x < 0)
    return {
        "diff": mean,
        "ci95": [mean - half, mean + half],
        "gained": b,
        "lost": c,
        "p_mcnemar": mcnemar_exact_p(b, c),
    }


def min_detectable(p, n, discordant=None):
    """Smallest difference detected with 80 % power at two-sided 5 % (z = 1.96 + 0.84): unpaired, two accuracies
    near p on n problems each, 2.8 sqrt(2 p (1-p) / n); paired with discordant fraction f, 2.8 sqrt(f / n)."""
    out = {"unpaired": 2.8 * math.sqrt(max(2 * p * (1 - p), 1e-12) / n)}
    if discordant is not None:
        out["paired_at_observed_discordance"] = 2.8 * math.sqrt(max(discordant, 1.0 / n) / n)
    return out


def plateau_step(losses, window, tol, start):
    """First step t (1-based) with t - start >= 2W where mean(loss[t-W+1..t]) >= (1 - tol) mean(loss[t-2W+1..t-W])
    (the last window's loss is less than ``tol`` relative below the one before), else None."""
    for t in range(start + 2 * window, len(losses) + 1):
        recent = sum(losses[t - window : t]) / window
        prev = sum(losses[t - 2 * window : t - window]) / window
        if recent >= (1 - tol) * prev:
            return t
    return None


# ------------------------------------------------------------------------------------------------- callbacks
class PlateauStop(TrainerCallback):
    """Stops training at the plateau rule's step (recomputed from ``state.log_history``, so it survives a resume)."""

    def __init__(self, window, tol, start):
        self.window, self.tol, self.start = window, tol, start

    def on_log(self, args, state, control, logs=None, **kwargs):
        losses = [h["loss"] for h in state.log_history if "loss" in h]
        if plateau_step(losses, self.window, self.tol, self.start) is not None:
            control.should_training_stop = True


# ------------------------------------------------------------------------------------------------- stages
def train_stage(name, model_dir, out_dir, dataset, tokenizer, args, max_steps, weak_dir=None, plateau=False):
    """One training stage with WMSSSFTTrainer, resumable: Trainer checkpoints in ``<out_dir>.run`` (resumed when
    present), the final model saved to ``<out_dir>.tmp`` with ``stage.json`` and renamed to ``out_dir``."""
    from wmss_trl.checkpoints import checkpoint_folders
    from wmss_trl.sft import WMSSSFTConfig, WMSSSFTTrainer

    info_path = os.path.join(out_dir, "stage.json")
    if os.path.isfile(info_path):
        info = read_json(info_path)
        log(f"stage {name}: done ({info['steps']} steps, cached)")
        return info
    run_dir, tmp_dir = out_dir + ".run", out_dir + ".tmp"
    options = {}
    if weak_dir is not None:
        options = dict(
            weak_model_name_or_path=weak_dir,
            weak_model_init_kwargs={"dtype": torch.float32},
            mixing_lambda=args.mixing_lambda,
        )
    cfg = WMSSSFTConfig(
        output_dir=run_dir,
        max_steps=max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=args.warmup_steps,
        seed=args.seed,
        data_seed=args.seed,
        use_cpu=True,
        logging_steps=1,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=1,
        report_to="none",
        disable_tqdm=True,
        model_init_kwargs={"dtype": torch.float32},
        saturation_metrics=True,
        **options,
    )
    timer = StepLogger(name, METRICS, trigger="loss", digits=4, time_digits=1, strip="wmss/")
    callbacks = [timer]
    if plateau:
        callbacks.append(PlateauStop(args.plateau_window, args.plateau_tol, args.warmup_steps))
    trainer = WMSSSFTTrainer(
        model_dir, args=cfg, train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks
    )
    # True: WMSSSFTTrainer resumes from the newest *complete* checkpoint (a save cut short by a kill is skipped)
    resume = bool(os.path.isdir(run_dir) and checkpoint_folders(run_dir))
    log(f"stage {name}: up to {max_steps} steps from {model_dir}" + (f", resuming in {run_dir}" if resume else ""))
    t = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume or None)
    seconds = time.perf_counter() - t
    shutil.rmtree(tmp_dir, ignore_errors=True)
    trainer.save_model(tmp_dir)
    tokenizer.save_pretrained(tmp_dir)
    history = [{k: h[k] for k in ("step", *METRICS) if k in h} for h in trainer.state.log_history if "loss" in h]
    info = {
        "stage": name,
        "from": model_dir,
        "weak": weak_dir,
        "steps": trainer.state.global_step,
        "max_steps": max_steps,
        "resumed": resume,
        "seconds_this_invocation": round(seconds, 1),
        "step_seconds_this_invocation": [round(s, 2) for s in timer.step_times],
        "history": history,
    }
    if plateau:
        losses = [h["loss"] for h in history]
        info["plateau_step"] = plateau_step(losses, args.plateau_window, args.plateau_tol, args.warmup_steps)
    write_json_atomic(os.path.join(tmp_dir, "stage.json"), info)
    del trainer
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp_dir, out_dir)
    shutil.rmtree(run_dir, ignore_errors=True)  # the checkpoints (optimizer state) are no longer needed
    return info


def evaluate(model_dir, tokenizer, test, args, name):
    """Greedy held-out accuracy of a saved model, cached as ``eval_<name>.json`` (per-problem rewards kept)."""
    from transformers import AutoModelForCausalLM

    from wmss_trl.real_task import exact_correct, greedy_accuracy

    path = os.path.join(args.out, f"eval_{name}.json")
    if os.path.isfile(path):
        r = read_json(path)
        log(f"eval {name}: {r['accuracy']:.3f} (cached)")
        return r
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=False)
    r = greedy_accuracy(
        model, tokenizer, test, batch_size=args.eval_batch_size, max_new_tokens=args.eval_max_new_tokens, desc=name
    )
    r["correct"] = [int(exact_correct(x)) for x in r["rewards"]]
    r["seconds"] = round(time.perf_counter() - t, 1)
    r["examples"] = [
        {"question": q, "answer": a, "completion": c}
        for q, a, c in zip(test["question"][:6], test["answer"][:6], r["completions"][:6])
    ]
    del r["completions"]
    write_json_atomic(path, r)
    log(f"eval {name}: accuracy {r['accuracy']:.3f} on {r['n']} held-out ({r['seconds']:.0f}s)")
    return r


def git_commit():
    try:
        out = subprocess.run(["git", "-C", HERE, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", HERE, "status", "--porcelain"], capture_output=True, text=True).stdout
        return out.stdout.strip() + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def versions():
    import accelerate
    import datasets
    import transformers
    import trl

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}
    out |= {"accelerate": accelerate.__version__, "datasets": datasets.__version__}
    try:
        import reasoning_gym

        out["reasoning_gym"] = getattr(reasoning_gym, "__version__", "?")
    except ImportError:
        pass
    return out


# ------------------------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if args.fresh and os.path.isdir(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out, exist_ok=True)
    lock = WriterLock(os.path.join(args.out, ".writer.lock"), f"run folder {args.out}").acquire()
    argv_used = sys.argv[1:] if argv is None else list(argv)
    command = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(__file__), *argv_used]
    )
    wall0 = time.perf_counter()
    log(f"{command}\n  torch {torch.__version__}, {torch.get_num_threads()} thread(s)")

    from prepare_smollm2 import default_out, prepare

    from wmss_trl.real_task import build_splits, resolve_task
    from wmss_trl.recipes.common import load_tokenizer

    weak_dir = str(prepare(pathlib.Path(args.model_dir) if args.model_dir else default_out(), check=False))
    tokenizer = load_tokenizer(weak_dir)

    # provenance: the settings and the weak weights that made this folder; a mismatch is refused, not reused
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "fresh", "model_dir")}
    compared = {"settings": settings, "weak_model": model_fingerprint(weak_dir), "versions": versions()}
    run_path = os.path.join(args.out, "run.json")
    if os.path.isfile(run_path):
        check_provenance(
            f"run folder {args.out}",
            read_json(run_path)["compared"],
            jsonable(compared),
            f"Delete {args.out} (or pass --fresh), or use another --out.",
        )
        record = read_json(run_path)
    else:
        record = {"compared": compared, "commit": git_commit(), "command": command, "weak_dir": weak_dir}
        write_json_atomic(run_path, record)

    splits = build_splits(args.task, args.n_train, args.eval_n, args.train_seed, args.eval_seed)
    train, test = splits["train"], splits["test"]
    rg_name, rg_cfg = resolve_task(args.task)

    def completion(row):
        if args.completion == "gold":
            text = row["answer"]
        else:  # "State the final answer to the following arithmetic problem: 15 - 43 =" -> "15 - 43 = -28"
            text = f"{row['question'].rsplit(':', 1)[-1].strip()} {row['answer']}"
        return {"completion": [{"role": "assistant", "content": text}]}

    sft_data = train.map(completion, remove_columns=[c for c in train.column_names if c != "prompt"])
    log(
        f"task {args.task}: {len(train)} train, {len(test)} held-out; e.g. {sft_data[0]['completion'][0]['content']!r}"
    )

    # ---- stage A: SFT to the plateau (strong M_s); weak M_w = the untouched model
    strong_dir = os.path.join(args.out, "strong")
    plateau = train_stage("plateau", weak_dir, strong_dir, sft_data, tokenizer, args, args.plateau_steps, plateau=True)
    evals = {"weak": evaluate(weak_dir, tokenizer, test, args, "weak")}
    evals["strong"] = evaluate(strong_dir, tokenizer, test, args, "strong")

    # ---- stage B: two arms from M_s, same LR / data order / seed
    arms = {}
    for arm, weak in (("sft", None), ("wdjt", weak_dir)):
        arm_dir = os.path.join(args.out, f"arm_{arm}")
        arms[arm] = train_stage(arm, strong_dir, arm_dir, sft_data, tokenizer, args, args.arm_steps, weak_dir=weak)
        evals[arm] = evaluate(arm_dir, tokenizer, test, args, arm)

    results = summarize(args, plateau, arms, evals)
    results |= {
        "command": command,
        "provenance": record,
        "task": {"preset": args.task, "reasoning_gym": rg_name, "config": rg_cfg, "n_train": len(train)},
        "n_eval": len(test),
        "environment": {
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
        },
        "wall_seconds_last_invocation": round(time.perf_counter() - wall0, 1),
        "examples": {k: v["examples"] for k, v in evals.items()},
    }
    write_json_atomic(os.path.join(args.out, "results.json"), results)
    md = markdown(results)
    tmp = os.path.join(args.out, "results.md.tmp")
    with open(tmp, "w") as f:
        f.write(md)
    os.replace(tmp, os.path.join(args.out, "results.md"))
    print(md, flush=True)
    lock.release()
    return 0


def series(history, key):
    return [h.get(key) for h in history]


def stats(values):
    v = [x for x in values if x is not None]
    if not v:
        return None
    return {"first": v[0], "last": v[-1], "mean": sum(v) / len(v), "min": min(v), "max": max(v)}


def summarize(args, plateau, arms, evals):
    n = evals["strong"]["n"]
    acc = {}
    for name, r in evals.items():
        k = sum(r["correct"])
        acc[name] = {"accuracy": k / n, "correct": k, "n": n, "wilson95": wilson(k, n)}
    diffs = {
        "sft_vs_strong": paired(evals["sft"]["correct"], evals["strong"]["correct"]),
        "wdjt_vs_strong": paired(evals["wdjt"]["correct"], evals["strong"]["correct"]),
        "wdjt_vs_sft": paired(evals["wdjt"]["correct"], evals["sft"]["correct"]),
    }
    for d in diffs.values():
        d["min_detectable"] = min_detectable(acc["strong"]["accuracy"], n, (d["gained"] + d["lost"]) / n)
    wd = arms["wdjt"]["history"]
    ratio = [
        (h["wmss/nontarget_grad_norm"] / h["wmss/sft_nontarget_grad_norm"])
        if h.get("wmss/sft_nontarget_grad_norm")
        else None
        for h in wd
    ]
    curves = {
        "plateau": {
            k: series(plateau["history"], k)
            for k in ("loss", "wmss/logit_margin", "wmss/min_margin", "wmss/sft_nontarget_grad_norm")
        },
        "sft": {
            k: series(arms["sft"]["history"], k)
            for k in ("loss", "wmss/logit_margin", "wmss/min_margin", "wmss/sft_nontarget_grad_norm")
        },
        "wdjt": {k: series(wd, k) for k in METRICS if any(k in h for h in wd)} | {"amplification": ratio},
    }
    return {
        "plateau": {
            "steps": plateau["steps"],
            "plateau_step": plateau["plateau_step"],
            "rule": (
                f"first step t >= warmup + 2W (W={args.plateau_window}) with mean loss of the last W steps >= "
                f"(1 - {args.plateau_tol}) x the mean of the W before; cap {args.plateau_steps} steps"
            ),
        },
        "accuracy": acc,
        "paired": diffs,
        "amplification": stats(ratio),
        # the same without WD-JT's factor lambda on the strong logits' gradient: ||p_mix - onehot|| / ||p_s - onehot||
        "amplification_over_lambda": stats([None if x is None else x / args.mixing_lambda for x in ratio]),
        "per_arm": {
            arm: {k: stats(series(a["history"], k)) for k in METRICS if any(k in h for h in a["history"])}
            for arm, a in arms.items()
        },
        "seconds_per_step": {
            name: (sum(s["step_seconds_this_invocation"]) / len(s["step_seconds_this_invocation"]))
            if s["step_seconds_this_invocation"]
            else None
            for name, s in (("plateau", plateau), *arms.items())
        },
        "curves": curves,
        "settings": vars(args),
    }


def markdown(r):
    s = r["settings"]
    acc, p = r["accuracy"], r["plateau"]

    def pct(x):
        return f"{100 * x:.1f} %"

    def f3(x):
        return "-" if x is None else f"{x:.3g}"

    stop = (
        f"plateau by the rule at step {p['plateau_step']}"
        if p["plateau_step"]
        else f"no plateau by the rule within the cap ({p['steps']} steps)"
    )
    lines = [
        f"SmolLM2-135M-Instruct, reasoning-gym `{r['task']['reasoning_gym']}` {r['task']['config']}, "
        f"{r['task']['n_train']} train problems ({s['completion']} answers), batch {s['batch_size']}, lr {s['lr']} "
        f"constant after {s['warmup_steps']} warmup steps, seed {s['seed']}. Plateau stage: {stop} "
        f"(rule: {p['rule']}). Arms: {s['arm_steps']} steps each from that checkpoint; WD-JT lambda "
        f"{s['mixing_lambda']}, weak = the untouched model (frozen).",
        "",
        f"| model | held-out accuracy (n = {r['n_eval']}, Wilson 95 %) |",
        "| --- | --- |",
    ]
    for name, label in (
        ("weak", "M_w: untouched (the weak model)"),
        ("strong", "M_s: after the plateau stage (before both arms)"),
        ("sft", f"M_s + {s['arm_steps']} steps plain SFT"),
        ("wdjt", f"M_s + {s['arm_steps']} steps WD-JT"),
    ):
        a = acc[name]
        lines.append(f"| {label} | {pct(a['accuracy'])} [{pct(a['wilson95'][0])}, {pct(a['wilson95'][1])}] |")
    lines += [
        "",
        "| difference (paired by problem) | diff (95 % CI) | gained / lost | McNemar exact p | smallest detectable "
        "(80 % power; paired at observed discordance / unpaired) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, d in r["paired"].items():
        md = d["min_detectable"]
        lines.append(
            f"| {name.replace('_vs_', ' - ')} | {100 * d['diff']:+.1f} pts [{100 * d['ci95'][0]:+.1f}, "
            f"{100 * d['ci95'][1]:+.1f}] | {d['gained']} / {d['lost']} | {d['p_mcnemar']:.3g} | "
            f"{100 * md['paired_at_observed_discordance']:.1f} / {100 * md['unpaired']:.1f} pts |"
        )
    lines += [
        "",
        "Per-step diagnostics on the trained tokens (first / mean / last over the logged steps):",
        "",
        "| stage | loss | logit_margin | min_margin | sft_nontarget_grad_norm | nontarget_grad_norm | amplification "
        "| weak_topk_grad_share | s/step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = {"plateau": r["curves"]["plateau"], "sft": r["curves"]["sft"], "wdjt": r["curves"]["wdjt"]}
    for name, c in rows.items():

        def cell(key, c=c):
            st = stats(c.get(key, []))
            return "-" if st is None else f"{st['first']:.3g} / {st['mean']:.3g} / {st['last']:.3g}"

        lines.append(
            f"| {name} | {cell('loss')} | {cell('wmss/logit_margin')} | {cell('wmss/min_margin')} | "
            f"{cell('wmss/sft_nontarget_grad_norm')} | {cell('wmss/nontarget_grad_norm')} | {cell('amplification')} "
            f"| {cell('wmss/weak_topk_grad_share')} | {f3(r['seconds_per_step'].get(name))} |"
        )
    amp = r["curves"]["wdjt"]["amplification"]
    every = max(1, len(amp) // 10)
    lines += [
        "",
        "Amplification ratio (WD-JT nontarget_grad_norm / sft_nontarget_grad_norm, lambda included) by step: "
        + ", ".join(f"{i + 1}: {f3(x)}" for i, x in enumerate(amp) if i % every == 0 or i == len(amp) - 1)
        + f"; divided by lambda (the mixed distribution's own push-down vs SFT's), mean "
        f"{f3((r['amplification_over_lambda'] or {}).get('mean'))}.",
        "",
        f"Command: `{r['command']}` (commit {r['provenance'].get('commit')})",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
