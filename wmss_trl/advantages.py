"""WMSS-GRPO advantage math, as small pure functions (no trainer state, no I/O).

Three pieces, each with its equation:

1. **Entropy-weighted advantages** (:func:`entropy_advantage_weights`), WD-DS's three signals moved from samples to
   completion tokens (:func:`wmss_trl.core.three_signal_weights`, the one implementation of the weighting). With H^w_t the weak model's and H^p_t the policy's token entropy (nats, full vocabulary) and
   dH_t = H^p_t - H^w_t::

       raw_t = a * H^w_t / mean(H^w) + b * relu(-dH_t) / mean(relu(-dH)) + c * relu(dH_t) / mean(relu(dH))
       w_t   = clip(raw_t / mean(raw), w_min, w_max)

   ``a`` weights base difficulty (weak entropy), ``b`` consolidation (entropy drop from weak to policy), ``c``
   regression (entropy rise); WD-DS's official values are a, b, c = 0.1, 0.8, 0.1. Every mean is over all completion
   tokens of the *global* batch (the sums are reduced across processes), so the weights do not depend on how the
   batch is split over ranks; a term whose mean is 0 drops out (WD-DS's "zero total -> 1e-12"). Since each
   normalised term has mean 1, ``mean(raw)`` is exactly the sum of the coefficients of the non-zero terms. Clipping
   is applied after the normalisation (so with clipping the mean can move away from 1). The token advantage is
   ``A_t = A_seq * w_t``.

2. **Weak negatives** (:func:`select_weak_negatives`, :func:`advantages_with_weak_negatives`): the weak model's
   completions whose reward is below a threshold ("wrong") and that are most plausible to the policy (highest mean
   token log-prob) join their prompt's group. In a group with negatives the baseline and scale are taken over the
   G policy rewards plus the n <= M selected negative rewards::

       mu = mean(r_1..r_G, r^w_1..r^w_n),   sigma = std(same)   (group scaling; TRL's nan-aware, unbiased std)
       A_i = (r_i - mu) / (sigma + 1e-4),   A^w_j = min((r^w_j - mu) / (sigma + 1e-4), 0)

   so a negative never gets a positive advantage. ``scale_rewards="batch"`` keeps TRL's batch std of the policy
   rewards (the negatives only move their group's mean), ``"none"`` does not divide. Groups without a selected
   negative keep TRL's advantages exactly.

3. **Importance weights** (:func:`importance_weights`) for the off-policy negatives, sampled by the weak model
   pi_w, trained on with the policy's loss. With the masked token log-ratio (NaN, e.g. a log-prob the sampler did
   not return, counts as 0, as in TRL)::

       d_t = (log pi_old(y_t | y_<t) - log pi_w(y_t | y_<t)) * m_t

   the four modes of TRL's ``vllm_importance_sampling_mode`` (``weak_is_mode``), with the bounds C_min, C_max
   (``weak_is_clip_min``, ``weak_is_clip_max``; a missing bound is 0 resp. +inf)::

       token_truncate:    rho_t = clamp(exp(d_t), C_min, C_max)                       (TIS, the default)
       token_mask:        rho_t = exp(d_t) if C_min <= exp(d_t) <= C_max else 0      (MIS per token)
       sequence_truncate: rho_t = clamp(exp(sum_s d_s), C_min, C_max)   for every t   (sequence TIS)
       sequence_mask:     rho_t = exp(sum_s d_s) if C_min <= exp(sum_s d_s) <= C_max else 0   (sequence MIS)

   The sequence ratio is the product of the token ratios (their log-ratios summed, as TRL does), not a geometric
   mean. rho is computed once at generation time (pi_old = the policy that generated the batch, detached), is 0 where
   ``m_t`` is 0, and is folded into the token advantage ``A^w_t = A^w * rho_t``. TRL's clipped ratio pi_theta / pi_old
   then applies as for on-policy samples. Because ``rho_t >= 0`` and the per-token GRPO/DAPO loss is
   ``-min(r A, clip(r) A)``, multiplying A by rho is the same as multiplying the token's policy loss by rho, which is
   where TRL applies its vLLM correction: the estimators are TRL's, with the weak model as the sampler.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from trl.trainer.utils import nanstd

from .core import ThreeSignalCoefs, three_signal_weights
from .entropy import masked_mean


ReduceFn = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------------------------
# 1. entropy weights
# ----------------------------------------------------------------------------------------------------------------


def entropy_advantage_weights(
    weak_entropy: torch.Tensor,
    policy_entropy: torch.Tensor,
    mask: torch.Tensor,
    coefs: tuple[float, float, float] = ThreeSignalCoefs(),
    min_weight: float | None = None,
    max_weight: float | None = None,
    reduce_sum: ReduceFn | None = None,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Per-token advantage weights from weak/policy entropy dynamics (see the module docstring for the equation).

    Args:
        weak_entropy, policy_entropy: ``(B, T)`` token entropies (nats) of the weak model and of the policy.
        mask: ``(B, T)`` completion tokens that carry loss (1) or not (0).
        coefs: ``(a, b, c)``, the coefficients of base difficulty, consolidation (entropy drop) and regression (rise).
        min_weight, max_weight: optional clipping, applied after the mean-1 normalisation.
        reduce_sum: sums a tensor over all processes (e.g. ``lambda t: accelerator.reduce(t, "sum")``); ``None`` for
            one process. The statistics are global, so 2 processes give the weights of 1 process on the same batch.

    Returns:
        ``(B, T)`` fp32 weights; 0 where ``mask`` is 0; mean 1 over the global masked tokens before clipping. When
        every term is 0 (e.g. all entropies 0) the weights are 1.
    """
    weights = three_signal_weights(weak_entropy, policy_entropy, coefs, mask, reduce_sum, eps)
    if min_weight is not None or max_weight is not None:
        weights = weights.clamp(min=min_weight, max=max_weight) * mask.to(weights.dtype)
    return weights.to(torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# 2. weak negatives
# ----------------------------------------------------------------------------------------------------------------


def select_weak_negatives(
    weak_rewards: torch.Tensor,
    plausibility: torch.Tensor,
    threshold: float,
    max_negatives: int,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick each group's weak negatives. Returns a ``(N, K)`` bool mask.

    A weak completion is *wrong* when its reward is finite and ``< threshold`` (NaN = unscorable is never wrong). Of
    the wrong ones, the ``max_negatives`` with the highest ``plausibility`` (the policy's mean token log-prob of the
    completion) are selected.

    Args:
        weak_rewards: ``(N, K)`` aggregated rewards of the K weak completions of each of N groups.
        plausibility: ``(N, K)`` mean token log-prob under the policy (``-inf``/NaN = not selectable).
        threshold: rewards strictly below it are wrong (0.5 makes 0 wrong and 1 right for 0/1 rewards).
        max_negatives: at most this many per group.
        valid: optional ``(N, K)`` mask of selectable completions (e.g. not empty / not truncated-and-masked).
    """
    wrong = torch.isfinite(weak_rewards) & (weak_rewards < threshold) & torch.isfinite(plausibility)
    if valid is not None:
        wrong &= valid.bool()
    k = min(int(max_negatives), weak_rewards.shape[1])
    if k <= 0 or weak_rewards.numel() == 0:
        return torch.zeros_like(wrong)
    score = torch.where(
        wrong, plausibility.to(torch.float64), torch.full_like(plausibility, -math.inf, dtype=torch.float64)
    )
    top = torch.topk(score, k, dim=1).indices
    selected = torch.zeros_like(wrong)
    selected.scatter_(1, top, True)
    return selected & wrong


def advantages_with_weak_negatives(
    rewards: torch.Tensor,
    weak_rewards: torch.Tensor,
    selected: torch.Tensor,
    scale_rewards: str = "group",
    batch_std: torch.Tensor | float | None = None,
    eps: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-relative advantages with the selected weak negatives counted in the group statistics.

    Args:
        rewards: ``(N, G)`` aggregated policy rewards per group (NaN = unscorable, excluded like in TRL).
        weak_rewards: ``(N, K)`` aggregated weak rewards.
        selected: ``(N, K)`` bool, from :func:`select_weak_negatives`.
        scale_rewards: TRL's ``"group"``, ``"batch"`` or ``"none"``.
        batch_std: the std used with ``"batch"`` (TRL's std over the whole batch of policy rewards).

    Returns:
        ``(adv (N, G), weak_adv (N, K), touched (N,))``. ``weak_adv`` is ``<= 0`` and 0 where not selected; NaN
        advantages (unscorable) become 0. For untouched groups ``adv`` equals TRL's formula without negatives.
    """
    sel = selected.bool()
    pooled = torch.cat([rewards, torch.where(sel, weak_rewards, torch.full_like(weak_rewards, float("nan")))], dim=1)
    mean = torch.nanmean(pooled, dim=1, keepdim=True)
    if scale_rewards == "group":
        std = nanstd(pooled, dim=1).unsqueeze(1) if pooled.shape[1] > 1 else torch.zeros_like(mean)
    elif scale_rewards == "batch":
        if batch_std is None:
            raise ValueError("scale_rewards='batch' needs batch_std.")
        std = torch.as_tensor(batch_std, dtype=rewards.dtype, device=rewards.device).expand_as(mean)
    elif scale_rewards == "none":
        std = None
    else:
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}.")
    adv = rewards - mean
    weak_adv = weak_rewards - mean
    if std is not None:
        adv = adv / (std + eps)
        weak_adv = weak_adv / (std + eps)
    weak_adv = torch.where(sel, weak_adv.clamp(max=0.0), torch.zeros_like(weak_adv))
    return torch.nan_to_num(adv, nan=0.0), torch.nan_to_num(weak_adv, nan=0.0), sel.any(dim=1)


# ----------------------------------------------------------------------------------------------------------------
# 3. importance weights
# ----------------------------------------------------------------------------------------------------------------


IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def importance_log_ratios(
    policy_logps: torch.Tensor, behaviour_logps: torch.Tensor, mask: torch.Tensor, sequence: bool = False
) -> torch.Tensor:
    """``d_t = (log pi_old - log pi_w) * m_t`` per token, NaN -> 0 (TRL's rule for a log-prob the sampler did not
    return), as ``(B, T)``; with ``sequence`` the sum over the sequence, ``sum_t d_t``, as ``(B, 1)`` (the log of the
    product of the token ratios). fp32, no gradient."""
    with torch.no_grad():
        diff = torch.nan_to_num((policy_logps.float() - behaviour_logps.float()) * mask.float(), nan=0.0)
        return diff.sum(dim=-1, keepdim=True) if sequence else diff


def _log_bounds(clip: float | None, clip_min: float | None) -> tuple[float, float]:
    """``(log C_min, log C_max)`` with a missing bound at -inf / +inf; refuses C_max <= 0, C_min < 0, C_min >= C_max."""
    if clip is not None and clip <= 0:
        raise ValueError(f"the importance-weight clip must be > 0, got {clip}.")
    if clip_min is not None and clip_min < 0:
        raise ValueError(f"the importance-weight lower bound must be >= 0, got {clip_min}.")
    if clip is not None and clip_min is not None and clip_min >= clip:
        raise ValueError(f"the importance-weight lower bound ({clip_min}) must be below the clip ({clip}).")
    low = math.log(clip_min) if clip_min else -math.inf
    return low, (math.log(clip) if clip is not None else math.inf)


def truncated_importance_weights(
    policy_logps: torch.Tensor,
    behaviour_logps: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None,
    clip_min: float | None = None,
    sequence: bool = False,
) -> torch.Tensor:
    """Truncated IS: ``rho = clamp(exp(d), C_min, C_max)`` with ``C_max = clip`` and ``d`` the token log-ratio
    ``d_t``, or with ``sequence`` the sequence log-ratio ``sum_t d_t`` given to every token of the row
    (:func:`importance_log_ratios`). ``(B, T)``; 0 where ``mask`` is 0. Clamped in log space, so it never overflows
    when ``C_max`` is set. No gradient."""
    low, high = _log_bounds(clip, clip_min)
    with torch.no_grad():
        log_ratio = importance_log_ratios(policy_logps, behaviour_logps, mask, sequence).clamp(min=low, max=high)
        return torch.exp(log_ratio).expand(mask.shape) * mask.float()


def masked_importance_weights(
    policy_logps: torch.Tensor,
    behaviour_logps: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None,
    clip_min: float | None = None,
    sequence: bool = False,
) -> torch.Tensor:
    """Masked IS: ``rho = exp(d)`` where ``C_min <= exp(d) <= C_max``, else 0, with ``d`` the token or (``sequence``)
    the sequence log-ratio as in :func:`truncated_importance_weights`. ``(B, T)``; 0 where ``mask`` is 0. The bounds
    are compared in log space. No gradient."""
    low, high = _log_bounds(clip, clip_min)
    with torch.no_grad():
        log_ratio = importance_log_ratios(policy_logps, behaviour_logps, mask, sequence)
        rho = torch.exp(log_ratio).masked_fill((log_ratio < low) | (log_ratio > high), 0.0)
        return rho.expand(mask.shape) * mask.float()


def importance_weights(
    policy_logps: torch.Tensor,
    behaviour_logps: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    clip: float | None,
    clip_min: float | None = None,
) -> torch.Tensor:
    """The importance weights of ``mode`` (one of :data:`IS_MODES`, TRL's ``vllm_importance_sampling_mode`` names;
    equations in the module docstring), ``(B, T)``, 0 where ``mask`` is 0."""
    if mode not in IS_MODES:
        raise ValueError(f"the importance-sampling mode must be one of {', '.join(IS_MODES)}, got {mode!r}.")
    level, kind = mode.split("_")
    weights = truncated_importance_weights if kind == "truncate" else masked_importance_weights
    return weights(policy_logps, behaviour_logps, mask, clip, clip_min, sequence=level == "sequence")


def sequence_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` per row; ``-inf`` for rows with no token (never plausible)."""
    mean = masked_mean(values, mask)
    return torch.where(mask.sum(-1) > 0, mean, torch.full_like(mean, -math.inf))
