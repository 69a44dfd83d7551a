"""``wmss compare``'s statistics and table: per arm and step each metric's mean and 95% t CI over seeds, paired
same-seed differences vs vanilla, step time (wall and CPU) and peak memory ratios; ``compare.md``.

CPU time per step is the training process's CPU time (user + system, model loading included) over the steps it ran;
on a shared machine it follows the work, where wall time also follows the other jobs' load."""

from __future__ import annotations

from .args import VANILLA
from .plan import Plan


def cpu_step_seconds(train: dict) -> float | None:
    """CPU seconds per step of one training run (None for records made before ``cpu_seconds`` was recorded)."""
    if "cpu_seconds" not in train:
        return None
    return train["cpu_seconds"] / max(1, train["steps"] - train.get("start_step", 0))


def _ratios(runs: dict, arm: str, paired: list, of) -> dict:
    """mean_ci of ``of(arm's train record) / of(vanilla's)`` over the paired seeds where both are known."""
    from ...evaluation import mean_ci

    pairs = [(of(runs[arm][s]["train"]), of(runs[VANILLA][s]["train"])) for s in paired]
    return mean_ci([a / v for a, v in pairs if a is not None and v])


def summarize_runs(plan: Plan, base: dict, runs: dict) -> dict:
    """Statistics over seeds: per arm and step, each metric's mean and 95% t CI; at the final step, paired
    same-seed differences vs vanilla; step time and peak memory ratios vs vanilla (same seed)."""
    from ...evaluation import mean_ci, metric_names, summarize

    names = metric_names(plan.ks)
    metrics = {
        arm: {
            seed: [{"step": e["step"], **summarize(e["result"], plan.ks)} for e in r["evals"]]
            for seed, r in by_seed.items()
        }
        for arm, by_seed in runs.items()
    }
    base_metrics = {seed: {"step": 0, **summarize(r, plan.ks)} for seed, r in base.items()}
    summary = {"metrics": names, "base": {m: mean_ci([b[m] for b in base_metrics.values()]) for m in names}}
    summary["arms"] = {}
    for arm, by_seed in metrics.items():
        steps = sorted({p["step"] for curve in by_seed.values() for p in curve})
        curve = [
            {
                "step": step,
                **{m: mean_ci([p[m] for c in by_seed.values() for p in c if p["step"] == step]) for m in names},
            }
            for step in steps
        ]
        final = {seed: c[-1] for seed, c in by_seed.items()}
        entry = {
            "seeds": sorted(by_seed),
            "steps": mean_ci([runs[arm][s]["train"]["steps"] for s in by_seed])["mean"],
            "curve": curve,
            "final": {m: mean_ci([f[m] for f in final.values()]) for m in names},
            "step_seconds": mean_ci([runs[arm][s]["train"]["step_seconds"] for s in by_seed]),
            "cpu_step_seconds": mean_ci(
                [c for c in (cpu_step_seconds(runs[arm][s]["train"]) for s in by_seed) if c is not None]
            ),
            "peak_rss_mib": mean_ci([runs[arm][s]["train"]["peak_rss_mib"] for s in by_seed]),
            "per_seed": {seed: {m: f[m] for m in names} for seed, f in final.items()},
        }
        vanilla = runs.get(VANILLA, {})
        paired = [s for s in by_seed if s in vanilla]
        if arm != VANILLA and paired:
            vfinal = {s: metrics[VANILLA][s][-1] for s in paired}
            entry["vs_vanilla"] = {
                "seeds": paired,
                **{m: mean_ci([final[s][m] - vfinal[s][m] for s in paired]) for m in names},
                "step_time_ratio": _ratios(runs, arm, paired, lambda t: t["step_seconds"]),
                "cpu_time_ratio": _ratios(runs, arm, paired, cpu_step_seconds),
                "peak_memory_ratio": _ratios(runs, arm, paired, lambda t: t["peak_rss_mib"]),
            }
        summary["arms"][arm] = entry
    return summary


def _fmt(stat: dict, scale: float = 100.0, digits: int = 1) -> str:
    if stat is None or stat.get("mean") is None:
        return "n/a"
    ci = "" if stat["ci"] is None else f" ± {scale * stat['ci']:.{digits}f}"
    return f"{scale * stat['mean']:.{digits}f}{ci}"


def markdown(plan: Plan, summary: dict, failures: list[str]) -> str:
    """The ``compare.md`` table."""
    names = summary["metrics"]
    info = plan.eval_info
    lines = [
        "# wmss compare",
        "",
        f"Held-out: {info['num_prompts']} prompts of {info['dataset']!r} (split {info['split']!r}), n = "
        f"{info['num_samples']} samples per prompt, a completion passes at total reward >= {info['pass_threshold']}. "
        f"Seeds {', '.join(map(str, plan.seeds))}; values in % (mean reward: x100) with 95% t CIs over seeds "
        "(none with one seed).",
        "",
        "`vanilla` = our WMSSGRPOTrainer with no weak model, i.e. TRL's GRPOTrainer (plus the fix of TRL's "
        "RepeatSampler epoch order on resume). Final step of each arm; `base` = the model before training.",
        "",
        "| arm | seeds | steps | " + " | ".join(names) + " | step s (wall) | step s (CPU) | peak RSS MiB |",
        "|---|---|---|" + "---|" * len(names) + "---|---|---|",
        "| base | " + str(len(summary["base"][names[0]]["values"])) + " | 0 | "
        + " | ".join(_fmt(summary["base"][m]) for m in names) + " | | | |",
    ]  # fmt: skip
    for arm, e in summary["arms"].items():
        lines.append(
            f"| {arm} | {len(e['seeds'])} | {e['steps']:.0f} | "
            + " | ".join(_fmt(e["final"][m]) for m in names)
            + f" | {_fmt(e['step_seconds'], 1, 3)} | {_fmt(e.get('cpu_step_seconds'), 1, 3)}"
            + f" | {_fmt(e['peak_rss_mib'], 1, 0)} |"
        )
    paired = {arm: e["vs_vanilla"] for arm, e in summary["arms"].items() if "vs_vanilla" in e}
    if paired:
        lines += [
            "",
            "Paired differences vs vanilla (same seed; points, mean reward x100), with 95% t CIs; step time (wall and "
            "CPU) and peak memory as ratios arm / vanilla measured in the same runs.",
            "",
            "| arm | paired seeds | "
            + " | ".join(f"Δ {m}" for m in names)
            + " | step time × (wall) | step time × (CPU) | peak memory × |",
            "|---|---|" + "---|" * len(names) + "---|---|---|",
        ]
        for arm, d in paired.items():
            lines.append(
                f"| {arm} | {len(d['seeds'])} | "
                + " | ".join(_fmt(d[m]) for m in names)
                + f" | {_fmt(d['step_time_ratio'], 1, 2)} | {_fmt(d.get('cpu_time_ratio'), 1, 2)}"
                + f" | {_fmt(d['peak_memory_ratio'], 1, 2)} |"
            )
    if failures:
        lines += ["", "Failed (not in the table):", "", *(f"- {f.splitlines()[0]}" for f in failures)]
    return "\n".join(lines) + "\n"
