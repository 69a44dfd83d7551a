"""The multi-seed benchmark behind docs/results.md: every arm of `wmss demo`, over seeds, at equal steps and at
equal wall time, with the reviewers' controls (uniform / shuffled weak model) and the DPO negatives comparison.

    python scripts/benchmark.py --seeds 0,1,2 --out runs/benchmark     # ~1 h on 2 CPU cores
    python scripts/benchmark.py --seeds 0 --quick                       # smoke run
    python scripts/benchmark.py --seeds 0,1,2 --only dpo_mined,dpo_random   # re-run some arms, keep the rest

Per seed: the weak and strong checkpoints (cached), then every arm from the strong checkpoint at equal steps; then
the baselines again with a wall-time budget equal to the matching WMSS arm's training time *in the same run*
(sft and neftune get wmss's time, grpo gets wmss_grpo's). Reported: mean and 95% confidence interval over seeds
(t distribution) of held-out and OOD greedy accuracy, the paired difference to the baseline, and training-time
ratios. Writes `<out>/benchmark.json` and the markdown tables to `<out>/results.md`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time


SFT_ARMS = ["sft", "neftune", "wmss", "wmss_uniform", "wmss_shuffled"]
RL_ARMS = ["grpo", "wmss_grpo"]
DPO_ARMS = ["dpo_mined", "dpo_random"]
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t confidence interval (0 for a single value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def fmt(values: list[float], scale: float = 100.0) -> str:
    mean, half = ci([scale * v for v in values])
    return f"{mean:.1f}" if math.isnan(half) else f"{mean:.1f} ± {half:.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="runs/benchmark")
    parser.add_argument("--quick", action="store_true", help="tiny step counts, for a smoke run")
    parser.add_argument(
        "--only",
        default=None,
        help="re-run only these equal-steps arms and merge them into the "
        "existing <out>/benchmark.json (e.g. after changing their settings)",
    )
    args = parser.parse_args()
    from wmss_trl.recipes.demo import DemoArguments, pin_numerics, run_demo

    pins = pin_numerics()  # before torch runs a kernel: the numerics of `wmss demo` (docs/demo.md), 1 thread
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    seeds = [int(s) for s in args.seeds.split(",")]
    steps = (
        dict(weak_steps=30, strong_steps=20, arm_steps=10, grpo_steps=4, dpo_steps=4, dpo_prompts=64, eval_every=5)
        if args.quick
        else {}
    )
    t0 = time.time()
    runs = {}
    path = os.path.join(args.out, "benchmark.json")
    if args.only:
        with open(path) as f:
            previous = json.load(f)
        runs = {int(k): v for k, v in previous["runs"].items()}
        commands = previous.get("commands", [previous.get("argv")]) + [sys.argv]
        for seed in seeds:
            common = dict(output_dir=args.out, seed=seed, plot=False, **steps)
            runs[seed]["equal_steps"].update(run_demo(DemoArguments(arms=args.only, **common), pins)["arms"])
        with open(path, "w") as f:
            json.dump({"seeds": seeds, "runs": runs, "commands": commands}, f, indent=1)
        report(runs, seeds, args.out, commands, time.time() - t0)
        return
    for seed in seeds:
        common = dict(output_dir=args.out, seed=seed, plot=False, **steps)
        equal_steps = run_demo(DemoArguments(arms=",".join(SFT_ARMS + RL_ARMS + DPO_ARMS), **common), pins)
        arms = equal_steps["arms"]
        budget_sft, budget_rl = arms["wmss"]["train_seconds"], arms["wmss_grpo"]["train_seconds"]
        timed = run_demo(DemoArguments(arms="sft,neftune", time_budget=budget_sft, **common), pins)["arms"]
        timed.update(run_demo(DemoArguments(arms="grpo", time_budget=budget_rl, **common), pins)["arms"])
        runs[seed] = {
            "phases": equal_steps["phases"],
            "equal_steps": arms,
            "equal_time": timed,
            "budgets": {"sft": budget_sft, "rl": budget_rl},
        }
        with open(path, "w") as f:
            json.dump({"seeds": seeds, "runs": runs, "commands": [sys.argv]}, f, indent=1)
        print(f"seed {seed} done ({time.time() - t0:.0f}s)", flush=True)
    report(runs, seeds, args.out, [sys.argv], time.time() - t0)


def report(runs: dict, seeds: list[int], out_dir: str, commands: list[list[str]], seconds: float) -> None:
    """Markdown tables of `runs` (written to <out_dir>/results.md and printed)."""
    lines = [
        f"Seeds {seeds}; mean ± 95% CI (t, n={len(seeds)}) of greedy accuracy (%), 200 held-out and 200 OOD problems.",
        "",
        "### Starting points",
        "",
        "| checkpoint | held-out | OOD |",
        "|---|---|---|",
    ]
    for name in ("weak", "strong"):
        lines.append(
            f"| {name} | {fmt([runs[s]['phases'][name]['test'] for s in seeds])} | "
            f"{fmt([runs[s]['phases'][name]['ood'] for s in seeds])} |"
        )

    def table(title, regime, arms, baseline):
        out = [
            "",
            f"### {title}",
            "",
            f"| arm | steps | train s | held-out | OOD | held-out − {baseline} | OOD − {baseline} |",
            "|---|---|---|---|---|---|---|",
        ]
        for arm in arms:
            rows = [runs[s][regime].get(arm) or runs[s]["equal_steps"][arm] for s in seeds]
            base = [runs[s]["equal_steps"][baseline] for s in seeds]
            diff_t = [r["test"] - b["test"] for r, b in zip(rows, base)]
            diff_o = [r["ood"] - b["ood"] for r, b in zip(rows, base)]
            out.append(
                f"| {arm} | {statistics.fmean(r['steps'] for r in rows):.0f} | "
                f"{statistics.fmean(r['train_seconds'] for r in rows):.0f} | {fmt([r['test'] for r in rows])} | "
                f"{fmt([r['ood'] for r in rows])} | {fmt(diff_t)} | {fmt(diff_o)} |"
            )
        return out

    lines += table("SFT family, equal steps (from the strong checkpoint)", "equal_steps", SFT_ARMS, "sft")
    lines += table(
        "SFT family, equal wall time (baselines get WMSS's training time)",
        "equal_time",
        ["sft", "neftune", "wmss"],
        "sft",
    )
    lines += table("RL, equal steps", "equal_steps", RL_ARMS, "grpo")
    lines += table("RL, equal wall time (GRPO gets WMSS-GRPO's training time)", "equal_time", RL_ARMS, "grpo")
    lines += table(
        "DPO: mined weak negatives vs random negatives (same prompts, weak reference)",
        "equal_steps",
        DPO_ARMS,
        "dpo_random",
    )
    ratio_sft = [
        runs[s]["equal_steps"]["wmss"]["train_seconds"] / runs[s]["equal_steps"]["sft"]["train_seconds"] for s in seeds
    ]
    ratio_rl = [
        runs[s]["equal_steps"]["wmss_grpo"]["train_seconds"] / runs[s]["equal_steps"]["grpo"]["train_seconds"]
        for s in seeds
    ]
    lines += [
        "",
        "### Training-time overhead at equal steps (same run)",
        "",
        f"- WD-JT (wmss) / SFT: {fmt(ratio_sft, 1.0)}x (includes WD-DS resampling, nothing else differs)",
        f"- WMSS-GRPO / GRPO: {fmt(ratio_rl, 1.0)}x",
        "",
        f"Wall time of the last invocation: {seconds:.0f}s. Commands, in order:",
    ]
    lines += [f"`{' '.join(['python'] + c)}`" for c in commands]
    from wmss_trl.machine import describe_machine

    lines += ["", describe_machine() + " (when this report was written)"]
    text = "\n".join(lines)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
