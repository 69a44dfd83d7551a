"""WD-DS's three entropy signals, one weighting for every place that uses them.

With ``H_w`` the weak model's and ``H_s`` the strong model's (the policy's) entropy of an item (a sample for WD-DS
selection, a completion token for GRPO advantages, a pair's rejected answer for DPO pair weights) and
``dH = H_s - H_w``, the three signals are base difficulty ``s_1 = H_w``, consolidation ``s_2 = max(0, -dH)`` (the
strong model became more certain) and regression ``s_3 = max(0, dH)`` (it became less certain). With coefficients
``coefs = (a, b, c)`` (WD-DS's official 0.1 / 0.8 / 0.1)::

    w_i = sum_{k active} coefs_k * s_k(i) / mean(s_k)  /  sum_{k active} coefs_k          (mean_i w_i = 1)

where the means are over the items of ``mask`` (of every process, with ``reduce_sum``) and a signal is *active* when
its coefficient and its mean are > 0 (a signal with mean 0 is 0 everywhere and drops out; with none active every
weight is 1). WD-DS's sampling distribution ``p_i = a H_w(i) / Z_1 + b s_2(i) / Z_2 + c s_3(i) / Z_3``, renormalised
(``Z_k = sum_j s_k(j)``), is exactly ``w_i / N``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch


class ThreeSignalCoefs(NamedTuple):
    """The coefficients of base difficulty, consolidation and regression (WD-DS's a, b, c)."""

    difficulty: float = 0.1
    consolidation: float = 0.8
    regression: float = 0.1


def three_signals(h_weak: torch.Tensor, h_strong: torch.Tensor) -> torch.Tensor:
    """``(3, *shape)`` fp64: ``H_w`` (clamped at 0 against rounding), ``max(0, H_w - H_s)``, ``max(0, H_s - H_w)``."""
    hw, hs = h_weak.to(torch.float64).clamp(min=0.0), h_strong.to(torch.float64)
    gap = hs - hw
    return torch.stack([hw, torch.relu(-gap), torch.relu(gap)])


def three_signal_weights(
    h_weak: torch.Tensor,
    h_strong: torch.Tensor,
    coefs: tuple[float, float, float],
    mask: torch.Tensor | None = None,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    eps: float = 0.0,
) -> torch.Tensor:
    """Weights with mean 1 from the weak/strong entropies (the equation is in the module docstring).

    Args:
        h_weak, h_strong: entropies of the same items, any shape (nats).
        coefs: ``(a, b, c)``. The trainers' configs keep them >= 0; a negative one (allowed by WD-DS's official
            code, whose caller clamps the result at 0) makes weights negative, and when the active coefficients sum
            to <= 0 the weights are returned unnormalised.
        mask: which items count (1) or not (0); default all. The weights are 0 where it is 0.
        reduce_sum: sums a tensor over processes (e.g. ``lambda t: accelerator.reduce(t, reduction="sum")``), so the
            means are those of the global batch; ``None`` on one process.
        eps: a signal is active only when its mean is above ``eps`` (and its coefficient is not 0).

    Returns:
        fp64 weights of ``h_weak``'s shape.
    """
    signals = three_signals(h_weak, h_strong)
    m = torch.ones_like(signals[0]) if mask is None else mask.to(torch.float64)
    sums = torch.cat([(signals * m).flatten(1).sum(1), m.sum().reshape(1)])
    if reduce_sum is not None:
        sums = reduce_sum(sums)
    means = sums[:3] / sums[3].clamp(min=1.0)
    shares = torch.tensor(list(coefs), dtype=torch.float64, device=signals.device)
    active = (means > eps) & (shares != 0)
    if not bool(active.any()):
        return m.clone()
    view = (-1,) + (1,) * (signals.dim() - 1)
    safe = torch.where(active, means, torch.ones_like(means))
    weights = ((shares * active).view(view) * signals / safe.view(view)).sum(0)
    total = (shares * active).sum()
    return (weights / total if total > 0 else weights) * m
