"""WMSS-GRPO's metrics (namespace ``wmss/``, reduced over processes) and its rows of TRL's completions table."""

from __future__ import annotations

import torch
from accelerate.utils import gather_object

from .batch import SOURCE_NAMES, SOURCE_WEAK_NEGATIVE, SOURCE_WEAK_UNUSED


def log_negatives(metrics, stats: dict, threshold: float) -> None:
    """Weak accuracy and reward, negatives per group, share of groups with one, their mean advantage."""
    correctness, selected = stats["correctness"], stats["selected"]
    scored = ~torch.isnan(correctness)
    right = (correctness >= threshold) & scored
    metrics["wmss/weak_accuracy"].append((right.sum() / scored.sum().clamp(min=1)).item())
    metrics["wmss/weak_reward"].append(torch.nanmean(stats["weak_rewards"]).item())
    metrics["wmss/weak_negatives_per_group"].append(selected.float().sum(1).mean().item())
    metrics["wmss/frac_groups_with_weak_negative"].append(stats["touched"].float().mean().item())
    n_sel = selected.sum()
    metrics["wmss/weak_negative_advantage"].append(
        (stats["weak_adv"][selected].sum() / n_sel).item() if n_sel > 0 else float("nan")
    )


def log_is_weights(metrics, accelerator, rho, mask, plausibility, own_plausibility) -> None:
    """Metrics of this process's selected negatives (reduced over processes): their importance weights
    ``rho`` and mask ``(n, T)``, and their plausibility ``(n,)`` (mean token log-prob under the policy), next to
    the same for the policy's own samples, ``own_plausibility`` ``(m,)`` (or ``None``: not logged): ``wmss/weak_negative_logp`` and
    ``wmss/policy_sample_logp`` are ``mean_i (1/|y_i|) sum_t log pi(y_it | x, y_i<t)`` over the two sets of rows, so
    their gap says how far off the policy's support the weak negatives are."""
    m = mask.float()
    count = lambda t: torch.tensor(float(t.numel()), device=m.device)  # noqa: E731
    own = own_plausibility if own_plausibility is not None else torch.zeros(0, device=m.device)
    sums = torch.stack([(rho * m).sum(), m.sum(), plausibility.sum(), count(plausibility), own.sum(), count(own)])
    sums = accelerator.reduce(sums.double(), reduction="sum")
    local_max = (rho * m).max() if m.numel() else torch.zeros((), device=m.device)
    metrics["wmss/weak_negative_logp"].append((sums[2] / sums[3]).item() if sums[3] > 0 else float("nan"))
    if own_plausibility is not None:  # None: the policy's own rows had no forward (eager, no entropy weights)
        metrics["wmss/policy_sample_logp"].append((sums[4] / sums[5]).item() if sums[5] > 0 else float("nan"))
    metrics["wmss/is_weight_mean"].append((sums[0] / sums[1]).item() if sums[1] > 0 else float("nan"))
    metrics["wmss/is_weight_max"].append(
        accelerator.gather(local_max.reshape(1).float()).max().item() if sums[1] > 0 else float("nan")
    )


def log_entropy_stats(metrics, accelerator, weights, weak_h, pol_h, weak_lp, pol_lp, mask, policy_rows) -> None:
    """Token-weight mean/std/max, weak and policy entropy, k3 KL(policy || weak) on the policy's own rows."""
    m = mask.float()
    mp = m * policy_rows.unsqueeze(1).float()
    log_ratio = torch.where(mp > 0, weak_lp - pol_lp, torch.zeros_like(weak_lp))
    k3 = torch.exp(log_ratio) - log_ratio - 1  # KL(policy || weak) estimate on the policy's own samples
    sums = torch.stack(
        [
            (weights * m).sum(),
            (weights.square() * m).sum(),
            m.sum(),
            (weak_h * m).sum(),
            (pol_h * m).sum(),
            (k3 * mp).sum(),
            mp.sum(),
        ]
    ).double()
    sums = accelerator.reduce(sums, reduction="sum")
    n, n_pol_tok = sums[2].clamp(min=1), sums[6].clamp(min=1)
    mean = sums[0] / n
    metrics["wmss/adv_weight_mean"].append(mean.item())
    metrics["wmss/adv_weight_std"].append(torch.sqrt((sums[1] / n - mean**2).clamp(min=0)).item())
    local_max = (weights * m).max().reshape(1)
    metrics["wmss/adv_weight_max"].append(accelerator.gather(local_max).max().item())
    metrics["wmss/weak_entropy"].append((sums[3] / n).item())
    metrics["wmss/policy_entropy"].append((sums[4] / n).item())
    metrics["wmss/kl_weak"].append((sums[5] / n_pol_tok).item())


def log_table_rows(logs, accelerator, reward_func_names, weak, negatives, n_pol) -> None:
    """Add the weak rows to TRL's completions buffers, with a `wmss_source` column (and the recomputed policy
    advantages of groups that received negatives)."""
    world = accelerator.num_processes
    logs["extra"]["wmss_source"].extend(["policy"] * (n_pol * world))
    if weak is None:
        return
    stats = negatives
    policy_adv = stats["policy_adv"].tolist()
    for _ in range(min(len(policy_adv), len(logs["advantages"]))):
        logs["advantages"].pop()
    logs["advantages"].extend(policy_adv)
    n_weak_global = weak["rewards_per_func"].size(0)
    logs["prompt"].extend(gather_object(weak["prompts"]))
    logs["completion"].extend(gather_object(weak["completions"]))
    for i, name in enumerate(reward_func_names):
        logs["rewards"][name].extend(weak["rewards_per_func"][:, i].tolist())
    logs["advantages"].extend(stats["weak_adv"].flatten().tolist())
    columns = sorted(set(gather_object(list(weak["extra"]))) | set(logs["extra"]))
    for column in columns:
        if column == "wmss_source":
            continue
        values = weak["extra"].get(column, [None] * len(weak["prompts"]))
        logs["extra"][column].extend(gather_object(values))
    sources = stats["selected"].flatten().tolist()
    logs["extra"]["wmss_source"].extend(
        [SOURCE_NAMES[SOURCE_WEAK_NEGATIVE] if s else SOURCE_NAMES[SOURCE_WEAK_UNUSED] for s in sources]
    )
    assert len(sources) == n_weak_global


def rename_kl_metric(metrics) -> None:
    """Move the value TRL's loss just logged as ``kl`` to ``wmss/kl_weak_ref``. With the weak model as reference it is
    mean_t [exp(r_t) - r_t - 1], r_t = log pi_weak(y_t) - log pi(y_t) (k3 estimate of KL(policy || weak)), over the
    loss's tokens, 0 on weak-negative rows (their reference is the generating policy). TRL's ``kl`` means the KL to a
    frozen copy of the initial policy; a WMSS run with a weak reference has none: it logs no ``kl``."""
    if metrics.get("kl"):
        metrics["wmss/kl_weak_ref"].append(metrics["kl"].pop())
        if not metrics["kl"]:
            del metrics["kl"]
