"""Saturation and mechanism diagnostics of WMSS, as pure functions of per-token logits.

Every function takes a chunk of ``N`` already-flattened trained positions: logits or probabilities ``(N, V)`` and the
targets ``(N,)`` (valid token ids, no ignore index), and returns one fp32 value per position; the caller averages over
trained tokens. Nothing here builds a tensor larger than the chunk it is given (plus one fp32 copy of it).

Notation: z are logits, p = softmax(z), y the target. The gradient of the cross-entropy -log softmax(z)[y] on the
logits it is taken w.r.t. is ``g = scale * (p - onehot(y))``:

* plain SFT on the strong logits: p = p_strong, scale = 1;
* WD-JT on the strong logits (z_mix = lam z_s + (1 - lam) z_w): p = p_mix, scale = lam; on the weak logits
  scale = 1 - lam.

Off the target, g_k = scale * p_k >= 0: this is the push-down on the non-target tokens that vanishes when SFT
saturates (p_y -> 1), and that mixing in a weak model's logits is supposed to revive (arXiv 2602.08222).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _off_target(x: Tensor, targets: Tensor, fill: float) -> Tensor:
    """fp32 copy of ``x`` with the target column of every row replaced by ``fill``."""
    return x.float().scatter(-1, targets[:, None], fill)


def logit_margins(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token logit margins of the target, ``(N, V), (N,) -> ((N,), (N,))``:

        mean_margin = z_y - mean_{k != y} z_k = z_y - (sum_k z_k - z_y) / (V - 1)
        min_margin  = z_y - max_{k != y} z_k

    A saturating model drives both up; ``min_margin > 0`` means the target is the argmax.
    """
    z = logits.float()
    z_y = z.gather(-1, targets[:, None]).squeeze(-1)
    mean_margin = z_y - (z.sum(-1) - z_y) / (z.shape[-1] - 1)
    min_margin = z_y - _off_target(z, targets, float("-inf")).amax(-1)
    return mean_margin, min_margin


def nontarget_grad_norm(probs: Tensor, targets: Tensor, scale: float = 1.0) -> Tensor:
    """Per-token norm of the cross-entropy gradient on the non-target logits, ``(N, V), (N,) -> (N,)``:

        ||g_{k != y}||_2 = sqrt(sum_{k != y} g_k^2),   g = scale * (probs - onehot(y))   (so g_k = scale * p_k)

    Plain SFT: ``probs = p_strong``, ``scale = 1``. WD-JT on the strong logits: ``probs = p_mix``, ``scale = lam``.
    The ratio of the two is the paper's "gradient amplification".
    """
    return abs(scale) * torch.linalg.vector_norm(_off_target(probs, targets, 0.0), dim=-1)


def weak_topk_share(probs: Tensor, weak_logits: Tensor, targets: Tensor, k: int = 5) -> Tensor:
    """Per-token share of the non-target gradient mass that falls on the weak model's top-k non-target tokens,
    ``(N, V), (N, V), (N,) -> (N,)``:

        share = sum_{j in T_k} g_j / sum_{j != y} g_j = sum_{j in T_k} p_j / sum_{j != y} p_j,
        T_k = the k largest weak logits z_w,j over j != y   (g_j = scale * p_j >= 0 off the target; scale cancels)

    ``k`` is capped at V - 1. The denominator is summed off the target (not 1 - p_y) so it stays exact when p_y
    rounds to 1; a token whose non-target probabilities all underflow to 0 has share 0.
    """
    k = min(int(k), probs.shape[-1] - 1)
    off = _off_target(probs, targets, 0.0)
    top = _off_target(weak_logits, targets, float("-inf")).topk(k, dim=-1).indices
    num, den = off.gather(-1, top).sum(-1), off.sum(-1)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(den))
