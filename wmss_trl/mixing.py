"""WD-JT logit mixing: the math, as small pure functions.

The mixed distribution of WMSS joint training is

    z_mix = lam * z_strong + (1 - lam) * z_weak,      p_mix = softmax(z_mix) ∝ p_strong^lam * p_weak^(1 - lam)

and the WD-JT loss is plain cross-entropy of the labels under ``p_mix``. The weak model is frozen, so only
the strong logits receive a gradient:

    d(-log p_mix[y]) / d z_strong = lam * (p_mix - onehot(y))

Every function here works on *chunks* of positions so that no full ``(batch, seq, vocab)`` fp32 tensor of
mixed logits ever exists: :class:`_MixedTokenLogProbs` computes ``log p_mix[y]`` chunk by chunk in fp32 in the
forward pass and recomputes ``p_mix`` chunk by chunk in the backward pass (nothing but the inputs is saved).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 1024


def check_lambda(lam: float) -> float:
    """Validate the mixing weight of the strong logits: 0 < lam <= 1 (lam = 1 is plain SFT)."""
    lam = float(lam)
    if not 0.0 < lam <= 1.0:
        raise ValueError(
            f"mixing_lambda must satisfy 0 < mixing_lambda <= 1 (it is the weight of the STRONG logits; "
            f"1.0 is plain SFT, the paper's default is 0.5), got {lam}."
        )
    return lam


def mix_logits(strong_logits: torch.Tensor, weak_logits: torch.Tensor, lam: float) -> torch.Tensor:
    """z_mix = lam * z_strong + (1 - lam) * z_weak, in fp32. Materialises the mix: use on chunks only."""
    return lam * strong_logits.float() + (1.0 - lam) * weak_logits.float()


class _MixedTokenLogProbs(torch.autograd.Function):
    """log softmax(lam*z_s + (1-lam)*z_w)[y] per position, chunked; gradient flows to z_s only."""

    @staticmethod
    def forward(ctx, strong, weak, tokens, lam, chunk_size):
        vocab = strong.shape[-1]
        flat_s, flat_w, flat_y = strong.reshape(-1, vocab), weak.reshape(-1, vocab), tokens.reshape(-1)
        out = torch.empty(flat_y.shape, dtype=torch.float32, device=strong.device)
        with torch.no_grad():
            for start in range(0, flat_y.numel(), chunk_size):
                sl = slice(start, start + chunk_size)
                z = mix_logits(flat_s[sl], flat_w[sl], lam)
                out[sl] = z.gather(-1, flat_y[sl, None]).squeeze(-1) - torch.logsumexp(z, dim=-1)
        ctx.save_for_backward(strong, weak, tokens)
        ctx.lam, ctx.chunk_size = lam, chunk_size
        return out.view(tokens.shape)

    @staticmethod
    def backward(ctx, grad_out):
        strong, weak, tokens = ctx.saved_tensors
        lam, chunk_size = ctx.lam, ctx.chunk_size
        vocab = strong.shape[-1]
        flat_s, flat_w, flat_y = strong.reshape(-1, vocab), weak.reshape(-1, vocab), tokens.reshape(-1)
        flat_g = grad_out.reshape(-1).float()
        grad = torch.empty_like(flat_s)
        for start in range(0, flat_y.numel(), chunk_size):
            sl = slice(start, start + chunk_size)
            p_mix = torch.softmax(mix_logits(flat_s[sl], flat_w[sl], lam), dim=-1)
            # d log p_mix[y] / d z_s = lam * (onehot(y) - p_mix)
            g = -p_mix
            g.scatter_add_(-1, flat_y[sl, None], torch.ones_like(flat_y[sl, None], dtype=g.dtype))
            grad[sl] = (lam * flat_g[sl, None] * g).to(grad.dtype)
        return grad.view(strong.shape), None, None, None, None


def mixed_token_logprobs(
    strong_logits: torch.Tensor,
    weak_logits: torch.Tensor,
    tokens: torch.Tensor,
    lam: float,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Per-position log p_mix[token] with p_mix = softmax(lam * z_strong + (1 - lam) * z_weak).

    Args:
        strong_logits: ``(..., V)`` logits of the trained model (any dtype; upcast to fp32 per chunk).
        weak_logits: ``(..., V)`` logits of the frozen weak model (treated as a constant).
        tokens: ``(...)`` token ids to score; must be valid ids (replace ignore labels before calling).
        lam: weight of the strong logits, 0 < lam <= 1.
        chunk_size: positions processed at once.

    Returns:
        ``(...)`` fp32 log-probabilities, differentiable w.r.t. ``strong_logits``.
    """
    if strong_logits.shape != weak_logits.shape:
        raise ValueError(
            f"strong and weak logits differ in shape: {tuple(strong_logits.shape)} vs {tuple(weak_logits.shape)}; "
            "the weak model must share the strong model's tokenizer and vocabulary size."
        )
    return _MixedTokenLogProbs.apply(strong_logits, weak_logits.detach(), tokens, float(lam), int(chunk_size))


def mixed_cross_entropy(
    strong_logits: torch.Tensor,
    weak_logits: torch.Tensor,
    labels: torch.Tensor,
    lam: float,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed WD-JT cross-entropy -sum_t log p_mix[y_t] over positions whose label != ignore_index.

    ``labels`` are aligned with the logits (already shifted). Returns ``(loss_sum, num_tokens)``; divide
    to get the mean, or divide by a global token count for gradient accumulation, as TRL does.
    """
    mask = labels != ignore_index
    safe = labels.masked_fill(~mask, 0)
    logp = mixed_token_logprobs(strong_logits, weak_logits, safe, lam, chunk_size)
    return -(logp * mask).sum(), mask.sum()
