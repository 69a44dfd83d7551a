"""Training dynamics of the GRPO experiment's arms (issue 13 §2): what the entropy weights do to the update.

Reads each finished (arm, seed)'s ``trainer_state.json`` (the metrics TRL and WMSS-GRPO log every ``logging_steps``)
under ``--runs`` (``docs/results/grpo_experiment/compare/runs`` by default) and prints one markdown table, per arm,
mean over seeds with the 95% t CI (``wmss_trl.evaluation.mean_ci``):

* ``grad_norm``: the pre-clipping gradient norm (transformers logs it before ``max_grad_norm`` clips); its mean, the
  run's largest, and the share of logged steps above ``max_grad_norm`` (those updates were clipped, so their step
  length was set by the clip, not by the advantages);
* ``wmss/adv_weight_max`` / ``_std``: the largest token weight of the step and their spread (mean 1 by construction);
* plausibility of the weak negatives: ``wmss/weak_negative_logp`` (the policy's mean token log-prob of the selected
  negatives) against ``wmss/policy_sample_logp`` (of its own samples);
* stability: the training reward over the last third of the run, and the std of the logged ``loss``.

TRL's ``clip_ratio/*`` is 0 in every run of this config (``num_iterations = 1``: the importance ratio is exactly 1),
so the clipping that acts is the gradient clipping. A PNG (``--plot``) shows the gradient norm and the largest token
weight against the step.

    python scripts/grpo_dynamics.py [--runs DIR] [--max_grad_norm 1.0] [--plot docs/results/grpo_dynamics.png]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics

from wmss_trl.evaluation import mean_ci


COLUMNS = {  # column: (how one run's log history becomes one number)
    "grad norm": lambda h, c: statistics.mean(x["grad_norm"] for x in h),
    "grad norm, largest": lambda h, c: max(x["grad_norm"] for x in h),
    "clipped steps %": lambda h, c: 100 * statistics.mean(x["grad_norm"] > c for x in h),
    "weight max": lambda h, c: _mean(h, "wmss/adv_weight_max"),
    "weight std": lambda h, c: _mean(h, "wmss/adv_weight_std"),
    "negatives' logp": lambda h, c: _mean(h, "wmss/weak_negative_logp"),
    "own samples' logp": lambda h, c: _mean(h, "wmss/policy_sample_logp"),
    "reward, last third": lambda h, c: statistics.mean(x["reward"] for x in h[-max(1, len(h) // 3) :]),
    "loss std": lambda h, c: statistics.pstdev(x["loss"] for x in h),
}


def _mean(history: list[dict], key: str) -> float | None:
    values = [x[key] for x in history if key in x]
    return statistics.mean(values) if values else None


def histories(runs: str) -> dict[str, dict[int, list[dict]]]:
    """``{arm: {seed: [the logged training steps]}}`` of every run with a ``trainer_state.json``."""
    out: dict[str, dict[int, list[dict]]] = {}
    for path in sorted(glob.glob(os.path.join(runs, "*", "seed*", "trainer_state.json"))):
        arm, seed = path.split(os.sep)[-3], int(path.split(os.sep)[-2][len("seed") :])
        with open(path) as f:
            logged = [x for x in json.load(f)["log_history"] if "loss" in x and "grad_norm" in x]
        if logged:
            out.setdefault(arm, {})[seed] = logged
    return out


def table(runs: dict[str, dict[int, list[dict]]], max_grad_norm: float) -> str:
    lines = [
        "| arm | seeds | " + " | ".join(COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for arm, seeds in runs.items():
        cells = []
        for column in COLUMNS.values():
            values = [v for v in (column(h, max_grad_norm) for h in seeds.values()) if v is not None]
            stat = mean_ci(values)
            if stat["mean"] is None:
                cells.append("-")
            else:
                cells.append(f"{stat['mean']:.3g}" + (f" ± {stat['ci']:.2g}" if stat["ci"] is not None else ""))
        lines.append(f"| {arm} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: dict[str, dict[int, list[dict]]], path: str, max_grad_norm: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    colours = plt.get_cmap("tab10").colors
    for i, (arm, seeds) in enumerate(runs.items()):
        steps = sorted({x["step"] for h in seeds.values() for x in h})
        style = {"color": colours[i % len(colours)], "ls": "--" if arm.startswith("vanilla") else "-"}
        for ax, key in zip(axes, ("grad_norm", "wmss/adv_weight_max"), strict=True):
            means = []
            for step in steps:
                at = [x[key] for h in seeds.values() for x in h if x["step"] == step and key in x]
                means.append(statistics.mean(at) if at else None)
            if any(m is not None for m in means):
                ax.plot(steps, means, label=f"{arm} ({len(seeds)} seeds)", **style)
    axes[0].axhline(max_grad_norm, color="grey", ls=":", label=f"max_grad_norm = {max_grad_norm:g} (clipped above)")
    axes[0].set(yscale="log", xlabel="GRPO step", ylabel="gradient norm before clipping (mean over seeds)")
    axes[0].set_title("Gradient norm (vanilla's first 300 steps are vanilla_equal_time's)")
    axes[1].set(xlabel="GRPO step", ylabel="largest token weight of the step (mean over seeds)")
    axes[1].set_title("Entropy weights: largest token weight (mean is 1)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("WMSS-GRPO vs vanilla GRPO on the embedded task: what the token weights do to the update")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="docs/results/grpo_experiment/compare/runs")
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="the runs' max_grad_norm (TRL's default)")
    parser.add_argument("--plot", default=None, help="write the PNG here")
    args = parser.parse_args()
    runs = histories(args.runs)
    if not runs:
        raise SystemExit(f"no trainer_state.json under {args.runs}/<arm>/seed<N>/")
    print(table(runs, args.max_grad_norm))
    if args.plot:
        plot(runs, args.plot, args.max_grad_norm)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
