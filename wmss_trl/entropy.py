"""Token entropy and per-sample mean entropy (WD-DS's H0 / H1), chunked and in fp32.

    H_t(M) = -sum_v p_M(v | ctx_t) log p_M(v | ctx_t)          (nats, full vocabulary)
    H_i(M) = mean over the trained positions t of sample i of H_t(M)

"Trained positions" are exactly the tokens a TRL SFT run would train on: position t predicts label t+1 and
counts when that label is not -100 (completion-only / assistant-only masks honoured). This fixes the official
code's off-by-one (it used unshifted logits).
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_SIZE = 1024


def token_entropy(logits: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) along the last dim, computed in fp32 in chunks of positions.

    H = logsumexp(z) - sum_v softmax(z)_v * z_v. Returns fp32 of shape ``logits.shape[:-1]``. No gradient.
    """
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    with torch.no_grad():
        for start in range(0, flat.shape[0], chunk_size):
            z = flat[start : start + chunk_size].float()
            p = torch.softmax(z, dim=-1)
            out[start : start + chunk_size] = torch.logsumexp(z, dim=-1) - (p * z).sum(-1)
    return out.view(logits.shape[:-1])


def token_nll(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """-log softmax(logits)[target] per position, fp32, chunked, no gradient. ``targets`` must be valid ids."""
    vocab = logits.shape[-1]
    flat, flat_y = logits.reshape(-1, vocab), targets.reshape(-1)
    out = torch.empty(flat_y.shape, dtype=torch.float32, device=logits.device)
    with torch.no_grad():
        for start in range(0, flat_y.numel(), chunk_size):
            z = flat[start : start + chunk_size].float()
            out[start : start + chunk_size] = torch.logsumexp(z, -1) - z.gather(-1, flat_y[start : start + chunk_size, None]).squeeze(-1)
    return out.view(targets.shape)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` along ``dim``; 0 where the mask is empty."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def trained_positions(labels: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """From unshifted labels ``(B, T)``: the positions to keep (``logits_to_keep`` indices, shape ``(K,)``) and the
    aligned next-token targets ``(B, K)`` (ignore_index where not trained)."""
    shift = labels[:, 1:]
    keep = (shift != ignore_index).any(0).nonzero().squeeze(-1)
    return keep, shift[:, keep]


@torch.no_grad()
def sample_mean_entropy(model, input_ids, attention_mask, labels, chunk_size: int = DEFAULT_CHUNK_SIZE, **forward_kwargs):
    """Per-sample mean token entropy of ``model`` over the trained positions. Returns ``(B,)`` fp32 and the
    number of positions per sample ``(B,)`` (0 means no trainable token: entropy reported as NaN)."""
    keep, targets = trained_positions(labels)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False, **forward_kwargs).logits
    mask = targets != -100
    h = token_entropy(logits, chunk_size)
    counts = mask.sum(-1)
    mean = masked_mean(h, mask)
    return torch.where(counts > 0, mean, torch.full_like(mean, float("nan"))), counts
