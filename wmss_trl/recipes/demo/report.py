"""What the demo shows: the tables and the one-line reading on stdout, and ``accuracy.png``."""

from __future__ import annotations

import math

from .args import FAMILIES, READINGS, DemoArguments
from .arms import pass_at_k_ks


def print_tables(results: dict, cfg: DemoArguments) -> None:
    """The accuracy table (the checkpoints and every arm), the RL pass@k table when an RL arm ran, the reading."""
    print(
        f"\nWMSS demo, seed {cfg.seed}: greedy accuracy (%) from the strong checkpoint, equal steps per family, "
        f"{results['eval_problems']['test']} held-out / {results['eval_problems']['ood']} OOD problems"
    )
    print(f"{'':<14}{'held-out':>9}{'ood':>7}{'steps':>7}{'train s':>9}")
    for name, r in {**results["phases"], **results["arms"]}.items():
        steps = r.get("steps", "")
        secs = f"{r['train_seconds']:.0f}" if "train_seconds" in r else ""
        print(f"{name:<14}{100 * r['test']:>9.1f}{100 * r['ood']:>7.1f}{steps:>7}{secs:>9}")
    rl = {
        name: r["pass_at_k"]
        for name, r in {"strong": results["phases"]["strong"], **results["arms"]}.items()
        if "pass_at_k" in r
    }
    if rl:
        ks = pass_at_k_ks(cfg)
        names = ["greedy pass@1", *(f"pass@{k}" for k in ks), "mean reward"]
        print(
            f"\nRL through wmss_trl.evaluation (the code of `wmss compare`): {results['eval_problems']['test']} "
            f"held-out problems, n = {ks[-1]} samples each at the GRPO arms' sampling settings (%; mean reward x100)"
        )
        print(f"{'':<14}" + "".join(f"{m:>15}" for m in names))
        for name, m in rl.items():
            print(f"{name:<14}" + "".join(f"{100 * m[k]:>15.1f}" for k in names))
    print(reading(results))


def reading(results: dict) -> str:
    """One line: where each WMSS arm is above or below its baseline, with the caveat that one seed says little."""
    arms = results["arms"]
    parts = []
    for arm, base, name in READINGS:
        if arm in arms and base in arms:
            d = {s: 100 * (arms[arm][s] - arms[base][s]) for s in ("test", "ood")}
            parts.append(
                f"{name} is {_signed(d['test'])} points vs {base} held-out "
                f"({100 * arms[arm]['test']:.1f} vs {100 * arms[base]['test']:.1f}), {_signed(d['ood'])} OOD"
            )
    if not parts:
        return "Reading: no WMSS arm ran with its baseline (wmss + sft, wmss_grpo + grpo, dpo_mined + dpo_random)."
    n = results["eval_problems"]["test"]
    half = 100 * 1.96 * math.sqrt(0.25 / n)  # widest 95% binomial half-width, at 50% accuracy
    return (
        f"Reading: {'; '.join(parts)}. One seed says little: each number carries up to ±{half:.0f} points of "
        f"sampling noise ({n} problems, 95%) before any seed-to-seed variation; the multi-seed benchmark with "
        "controls is in docs/results.md."
    )


def _signed(x: float) -> str:
    return f"{x:+.1f}" if round(x, 1) else "0.0"


def plot(results: dict, path: str) -> None:
    """``accuracy.png``: one row per family of arms present, held-out and OOD side by side, each panel with its own
    y-axis, a legend and the weak / strong checkpoints as horizontal reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = [(name, [a for a in arms if a in results["arms"]]) for name, arms in FAMILIES.items()]
    families = [(name, arms) for name, arms in families if arms]
    sizes = results["eval_problems"]
    rl = {
        arm: results["arms"][arm]["pass_at_k"] for arm in FAMILIES["RL"] if "pass_at_k" in results["arms"].get(arm, {})
    }
    rows = len(families) + bool(rl)
    fig, axes = plt.subplots(rows, 2, figsize=(12, 3.8 * rows), squeeze=False)
    for row, (family, arms) in zip(axes, families):
        for ax, split, label in zip(row, ("test", "ood"), ("held-out", "OOD (3 steps, unseen)")):
            for ref, style in (("weak", ":"), ("strong", "--")):
                value = 100 * results["phases"][ref][split]
                ax.axhline(
                    value,
                    color="grey" if ref == "weak" else "black",
                    linestyle=style,
                    linewidth=1,
                    label=f"{ref} checkpoint ({value:.1f}%)",
                )
            for arm in arms:
                pts = results["arms"][arm]["curve"]
                ax.plot([p["step"] for p in pts], [100 * p[split] for p in pts], marker="o", ms=3, label=arm)
            ax.set_title(f"{family}: {label} accuracy, {sizes[split]} problems")
            ax.set_xlabel("steps from the strong checkpoint")
            ax.set_ylabel("greedy accuracy (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="best")
    if rl:
        plot_pass_at_k(axes[-1], {"strong checkpoint": results["phases"]["strong"]["pass_at_k"], **rl}, results)
    fig.suptitle(
        f"wmss demo, seed {results['config']['seed']}: greedy accuracy during training "
        "(last point of each curve = the table)" + ("; last row: RL pass@k after training" if rl else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pass_at_k(row, models: dict, results: dict) -> None:
    """The RL row of ``accuracy.png``: pass@k vs k per model (left) and greedy pass@1 / pass@1 / pass@n side by side
    (right), on the held-out problems (:func:`rl_pass_at_k`)."""
    ks = pass_at_k_ks(DemoArguments(**results["config"]))
    n, size = ks[-1], results["eval_problems"]["test"]
    left, right = row
    colors = {name: "black" if i == 0 else f"C{i - 1}" for i, name in enumerate(models)}  # as the curves above
    for name, m in models.items():
        style = dict(linestyle="--") if name == "strong checkpoint" else {}
        left.plot(ks, [100 * m[f"pass@{k}"] for k in ks], marker="o", ms=3, label=name, color=colors[name], **style)
    left.set_xscale("log", base=2)
    left.set_xticks(ks, [str(k) for k in ks])
    left.set_title(f"RL: held-out pass@k ({size} problems, n = {n} samples each, temperature 1)")
    left.set_xlabel("k (samples per problem)")
    left.set_ylabel("pass@k (%)")
    left.grid(alpha=0.3)
    left.legend(fontsize=8, loc="best")
    metrics = ["greedy pass@1", "pass@1", f"pass@{n}"]
    width = 0.8 / len(models)
    for i, (name, m) in enumerate(models.items()):
        xs = [j + i * width for j in range(len(metrics))]
        right.bar(xs, [100 * m[k] for k in metrics], width, label=name, color=colors[name], alpha=0.8)
    right.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(metrics))], metrics)
    right.set_title(f"RL: greedy vs sampled, held-out ({size} problems)")
    right.set_ylabel("%")
    right.grid(alpha=0.3, axis="y")
    right.legend(fontsize=8, loc="best")
