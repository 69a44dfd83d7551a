"""The one statistics path of WMSS-GRPO: the token weights (the negatives' importance weights, the entropy weights)
are computed once, by :func:`apply_token_weights`, either at generation time from a no-grad forward or inside TRL's
loss from its own policy forward; what they used and gave is kept in the :class:`StepStats` of the batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..advantages import entropy_advantage_weights, importance_weights, sequence_mean
from . import metrics
from .batch import SOURCE_POLICY, SOURCE_WEAK_NEGATIVE


@dataclass
class StepStats:
    """What the WMSS step of the last generation batch computed, ``(rows, T)`` over ``[policy rows; weak rows]``: the
    weak and policy log-probs / entropies, the weak rows' behaviour log-probs and their mask before the unselected ones
    were zeroed, the row sources, the token weights (importance weights of the negatives, entropy weights: set when
    they are applied, from the loss's forward when deferred) and the negatives' selection (the completions table
    reads it). Replaced at every generation batch."""

    source: torch.Tensor
    weak_logps: torch.Tensor
    weak_entropy: torch.Tensor
    policy_logps: torch.Tensor
    policy_entropy: torch.Tensor
    behaviour_logps: torch.Tensor | None = None
    weak_mask: torch.Tensor | None = None
    negatives: dict | None = None
    is_weight: torch.Tensor | None = None
    entropy_weight: torch.Tensor | None = None


def apply_token_weights(
    trainer, batch: dict, logps: torch.Tensor, entropies: torch.Tensor | None, own_rows: bool = True
) -> None:
    """Fold the token weights into ``batch["advantages"]`` (in place), from the policy log-probs / entropies of the
    batch's rows: the negatives' importance weights of ``weak_is_mode`` (default ``min(pi_old / pi_weak, c)``; their
    KL reference, and the weak rows' old log-probs when TRL keeps old log-probs, become these log-probs) and the
    entropy weights. One path for both timings: at generation time, or inside
    TRL's loss from its own forward (one micro-batch per generation batch, one iteration). ``own_rows``: ``logps`` holds
    the policy's own rows too (always inside the loss; at generation time only when the entropy weights needed them),
    so their plausibility is logged next to the negatives'."""
    weak_h, weak_lp = batch.pop("wmss_weak_entropy", None), batch.pop("wmss_weak_logps", None)
    behaviour = batch.pop("wmss_behaviour_logps", None)
    mask = batch["completion_mask"] if "tool_mask" not in batch else batch["completion_mask"] * batch["tool_mask"]
    source, train_metrics, stats = batch["wmss_source"], trainer._metrics["train"], trainer.wmss_stats
    factor = torch.ones_like(logps)
    if behaviour is not None:
        neg = source == SOURCE_WEAK_NEGATIVE
        mode, clip, clip_min = trainer.args.weak_is_mode, trainer.args.weak_is_clip_max, trainer.args.weak_is_clip_min
        factor[neg] = importance_weights(logps[neg], behaviour[neg], mask[neg], mode, clip, clip_min)
        plausibility = sequence_mean(logps[neg], mask[neg])
        own = (source == SOURCE_POLICY) & (mask.sum(-1) > 0)
        own_plausibility = sequence_mean(logps[own], mask[own]) if own_rows else None
        metrics.log_is_weights(
            train_metrics, trainer.accelerator, factor[neg], mask[neg], plausibility, own_plausibility
        )
        if batch.get("ref_per_token_logps") is not None:
            batch["ref_per_token_logps"] = torch.where(neg.unsqueeze(1), logps, batch["ref_per_token_logps"])
        if batch.get("old_per_token_logps") is not None:  # the weak rows' old policy is the policy of ``logps``
            weak_rows = (source != SOURCE_POLICY).unsqueeze(1)
            batch["old_per_token_logps"] = torch.where(weak_rows, logps, batch["old_per_token_logps"])
        stats.is_weight = factor.clone()
    if weak_h is not None:
        args = trainer.args
        weights = entropy_advantage_weights(
            weak_h,
            entropies,
            mask,
            coefs=(args.entropy_weight_alpha, args.entropy_weight_beta, args.entropy_weight_gamma),
            min_weight=args.entropy_weight_min,
            max_weight=args.entropy_weight_max,
            reduce_sum=lambda t: trainer.accelerator.reduce(t, reduction="sum"),
        )
        factor = factor * weights
        policy_rows = source == SOURCE_POLICY
        metrics.log_entropy_stats(
            train_metrics, trainer.accelerator, weights, weak_h, entropies, weak_lp, logps, mask, policy_rows
        )
        stats.entropy_weight, stats.policy_entropy = weights, entropies
    advantages = batch["advantages"]
    batch["advantages"] = (advantages.unsqueeze(1) if advantages.dim() == 1 else advantages) * factor
