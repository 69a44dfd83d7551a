"""Which weak completions become negatives, and the advantages of the groups they join (global, identical on every
process); the estimator is in :mod:`wmss_trl.advantages`."""

from __future__ import annotations

import torch
from trl.trainer.utils import nanstd, pad

from ..advantages import advantages_with_weak_negatives, select_weak_negatives, sequence_mean
from ..core import aggregate_rewards
from . import metrics
from .batch import SOURCE_WEAK_NEGATIVE, SOURCE_WEAK_UNUSED, extend_logps_fields, pad_to


def negatives_and_advantages(trainer, rewards_per_func, weak_rpf, trl_advantages, pol_lp_weak, weak_mask):
    """Select the negatives and recompute the touched groups' advantages.

    Args:
        rewards_per_func, weak_rpf: gathered ``(world * n, F)`` rewards of the policy and of the weak rows.
        trl_advantages: TRL's ``(n_pol,)`` advantages of this process's policy rows.
        pol_lp_weak, weak_mask: the policy's log-probs and the mask ``(n_w, T)`` of this process's weak rows (the mean
            log-prob ranks wrong answers by plausibility).

    Returns:
        local policy advantages ``(n_pol,)``, local weak advantages ``(n_w,)``, local selection ``(n_w,)`` and the
        global statistics (for metrics and the completions table).
    """
    acc, args = trainer.accelerator, trainer.args
    g, k = trainer.num_generations, trainer.num_weak_generations
    rank, n_pol, n_weak = acc.process_index, trl_advantages.size(0), pol_lp_weak.size(0)
    plausibility = acc.gather(sequence_mean(pol_lp_weak, weak_mask))
    valid = acc.gather((weak_mask.sum(-1) > 0).long()).bool()
    n_groups = weak_rpf.size(0) // k
    weights = trainer.reward_weights
    correctness = weak_rpf[:, trainer.correctness_index] if trainer.correctness_index is not None else None
    correctness = aggregate_rewards(weak_rpf, weights) if correctness is None else correctness
    selected = select_weak_negatives(
        correctness.view(n_groups, k),
        plausibility.view(n_groups, k),
        args.weak_negative_threshold,
        args.max_weak_negatives,
        valid.view(n_groups, k),
    )
    policy_rewards = aggregate_rewards(rewards_per_func, weights).view(n_groups, g)
    batch_std = nanstd(policy_rewards.flatten()) if trainer.scale_rewards == "batch" else None
    weak_rewards = aggregate_rewards(weak_rpf, weights).view(n_groups, k)
    adv, weak_adv, touched = advantages_with_weak_negatives(
        policy_rewards, weak_rewards, selected, trainer.scale_rewards, batch_std
    )
    pol_index = torch.arange(rank * n_pol, (rank + 1) * n_pol, device=acc.device)
    local_adv = torch.where(touched[pol_index // g], adv.flatten()[pol_index], trl_advantages)
    weak_index = slice(rank * n_weak, (rank + 1) * n_weak)
    all_index = torch.arange(n_groups * g, device=acc.device)  # for the completions table: every row's advantage
    global_adv = torch.where(touched[all_index // g], adv.flatten(), acc.gather(trl_advantages))
    stats = {
        "correctness": correctness,
        "selected": selected,
        "plausibility": plausibility,
        "touched": touched,
        "weak_rewards": weak_rewards,
        "weak_adv": weak_adv,
        "policy_adv": global_adv,
        "policy_rewards": policy_rewards,
    }
    return local_adv, weak_adv.flatten()[weak_index], selected.flatten()[weak_index], stats


def add_negatives(trainer, out: dict, weak: dict, rewards_per_func, n_pol: int, stats) -> None:
    """Select the negatives among the weak rows and rewrite ``out`` for them: advantages (policy rows of touched
    groups, negatives), sources, completion mask 0 on unused rows, TRL's optional per-token fields and the loss
    normaliser ``num_items_in_batch`` (with the negatives' tokens)."""
    mask, width = out["completion_mask"], out["completion_ids"].size(1)
    behaviour = pad([torch.tensor(x, dtype=torch.float32) for x in weak["behaviour_logps"]], 0.0, "right")
    stats.behaviour_logps = pad_to(behaviour.to(mask.device), width, 0.0)
    stats.weak_mask = mask[n_pol:].clone()  # before unselected rows are zeroed
    advantages, weak_adv, selected, stats.negatives = negatives_and_advantages(
        trainer,
        rewards_per_func,
        weak["rewards_per_func"],
        out["advantages"],
        stats.policy_logps[n_pol:],
        mask[n_pol:],
    )
    stats.source[n_pol:] = torch.where(selected, SOURCE_WEAK_NEGATIVE, SOURCE_WEAK_UNUSED)
    mask[n_pol:] = mask[n_pol:] * selected.unsqueeze(1).to(mask.dtype)
    out["advantages"] = torch.cat([advantages, weak_adv])
    metrics.log_negatives(trainer._metrics["train"], stats.negatives, trainer.args.weak_negative_threshold)
    out["num_items_in_batch"] = trainer.accelerator.gather(mask.sum()).sum()
    extend_logps_fields(out, width, stats.policy_logps[n_pol:], stats.behaviour_logps)
