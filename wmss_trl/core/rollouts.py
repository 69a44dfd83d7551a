"""Rollout bookkeeping shared by WMSS-GRPO and negative mining, as TRL's GRPO does it."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def aggregate_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """TRL GRPO's ``sum_then_normalize`` reward of each completion: ``r_j = nansum_k w_k r_jk``, NaN when every
    function returned None (NaN) for it. ``rewards_per_func`` is ``(n, F)``, ``weights`` ``(F,)``."""
    rewards = (rewards_per_func * weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
    rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
    return rewards


def cut_at_eos(ids: Sequence[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    """Generated ids up to and including the first EOS, as TRL cuts completions; ``truncated`` is True when there is
    no EOS."""
    ids = list(ids)
    for i, t in enumerate(ids):
        if t in eos_ids:
            return ids[: i + 1], False
    return ids, True
