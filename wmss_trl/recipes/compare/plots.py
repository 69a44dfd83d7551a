"""``wmss compare``'s plots: ``metrics_vs_step.png`` and ``pass_at_k.png``."""

from __future__ import annotations

import os

from .args import EQUAL_TIME
from .plan import Plan


def plots(plan: Plan, summary: dict, folder: str) -> list[str]:
    """``metrics_vs_step.png`` (each metric vs step, one line per arm, 95% CI bands over seeds; step 0 = the base
    model; only the steps every seed of the arm was evaluated at, and the final evaluations at the arm's mean final
    step when its seeds end at different steps, as an equal-time arm's do) and ``pass_at_k.png`` (final pass@k vs k
    per arm, and the base model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [os.path.join(folder, "metrics_vs_step.png"), os.path.join(folder, "pass_at_k.png")]
    for draw, path in zip((_metrics_vs_step, _pass_at_k), paths):
        fig = draw(plt, plan, summary)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return paths


def _band(ax, xs, stats, label, **kw):
    """A line of means (in %) with its 95% CI band when every point has one."""
    means = [100 * s["mean"] for s in stats]
    (line,) = ax.plot(xs, means, marker="o", ms=3, label=label, **kw)
    if all(s["ci"] is not None for s in stats):
        ci = [100 * s["ci"] for s in stats]
        lower, upper = [m - c for m, c in zip(means, ci)], [m + c for m, c in zip(means, ci)]
        ax.fill_between(xs, lower, upper, color=line.get_color(), alpha=0.2)


def _metrics_vs_step(plt, plan: Plan, summary: dict):
    names, base = summary["metrics"], summary["base"]
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, m in zip(axes.flat, names):
        for arm, e in summary["arms"].items():
            points = [{"step": 0, m: base[m]}] if base[m]["mean"] is not None else []
            points += [{"step": p["step"], m: p[m]} for p in e["curve"] if p[m]["n"] == len(e["seeds"])]
            if (
                not points or points[-1]["step"] != e["steps"]
            ):  # the seeds end at different steps: their finals, at the mean step
                points.append({"step": e["steps"], m: e["final"][m]})
            style = {"linestyle": "--"} if arm == EQUAL_TIME else {}
            _band(ax, [p["step"] for p in points], [p[m] for p in points], arm, **style)
        unit = "x100" if m == "mean reward" else "%"
        ax.set_title(f"held-out {m} ({unit})")
        ax.set_xlabel("training step (0 = base model)")
        ax.set_ylabel(f"{m} ({unit})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle(
        f"wmss compare: held-out metrics vs step, mean over seeds {plan.seeds} with 95% t CI bands "
        f"({plan.eval_info['num_prompts']} prompts, n = {plan.num_samples})"
    )
    return fig


def _pass_at_k(plt, plan: Plan, summary: dict):
    base, ks = summary["base"], plan.ks
    fig, ax = plt.subplots(figsize=(6, 4))
    if base.get("pass@1", {}).get("mean") is not None:
        _band(ax, ks, [base[f"pass@{k}"] for k in ks], "base model", color="grey", linestyle="--")
    for arm, e in summary["arms"].items():
        _band(ax, ks, [e["final"][f"pass@{k}"] for k in ks], arm)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k (samples per prompt)")
    ax.set_ylabel("pass@k (%)")
    ax.set_title(f"pass@k vs k after training (n = {plan.num_samples}, 95% t CIs over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig
