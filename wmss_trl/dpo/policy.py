"""The policy forward as ``DPOTrainer._compute_loss`` sees it under WMSS, and the small pure functions it uses."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import three_signal_weights
from ..entropy import masked_mean, token_entropy, token_nll, trained_positions
from ..mixing import mix_logits, mixed_token_logprobs
from ..trl_compat import fused_lm_head_output


# ----------------------------------------------------------------------------------------------------------------
# Small pure functions


def sequence_logps(per_token_logps: torch.Tensor, shift_completion_mask: torch.Tensor, ld_alpha: float | None = None):
    """Sequence log-prob of each row, exactly as TRL's DPO builds it from per-token log-probs (zero off-completion).

    log p(y|x) = sum_t log p(y_t | x, y_<t)
    LD-DPO (ld_alpha): sum over the first min(|y+|, |y-|) tokens + ld_alpha * sum over the rest
    """
    if ld_alpha is None:
        return per_token_logps.sum(dim=1)
    comp_pos = shift_completion_mask.cumsum(dim=1)
    chosen_lens, rejected_lens = shift_completion_mask.sum(dim=1).long().chunk(2, dim=0)
    shared = torch.minimum(chosen_lens, rejected_lens)
    shared = torch.cat([shared, shared], dim=0).to(per_token_logps.device).unsqueeze(1)
    shared_mask = (comp_pos > 0) & (comp_pos <= shared)
    tail_mask = comp_pos > shared
    return (per_token_logps * shared_mask).sum(dim=1) + ld_alpha * (per_token_logps * tail_mask).sum(dim=1)


class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient of row i by ``scale[i]`` in the backward pass."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        return grad * scale.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1))), None


def scale_grad(x: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """y = x, dL/dx_i = row_scale_i * dL/dy_i. Weighting every per-token log-prob of pair i by w_i this way turns the
    gradient of any per-pair DPO loss (1/B) sum_i l_i into (1/B) sum_i w_i grad l_i."""
    return _ScaleGrad.apply(x, row_scale.detach())


def _scatter_columns(values: torch.Tensor, columns: torch.Tensor, width: int) -> torch.Tensor:
    """A ``(rows, width)`` tensor of zeros with ``values[:, k]`` placed at column ``columns[k]`` (differentiable)."""
    out = values.new_zeros((values.shape[0], width))
    return out.index_copy(1, columns.to(values.device), values)


@torch.no_grad()
def _mixed_log_sum_sq_probs(strong, weak, lam, chunk_size):
    """log sum_v p_mix(v)^2 per position (WPO's weights), chunked, fp32."""
    vocab = strong.shape[-1]
    flat_s, flat_w = strong.reshape(-1, vocab), weak.reshape(-1, vocab)
    out = torch.empty(flat_s.shape[0], dtype=torch.float32, device=strong.device)
    for start in range(0, flat_s.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        logp = torch.log_softmax(mix_logits(flat_s[sl], flat_w[sl], lam), dim=-1)
        out[sl] = torch.logsumexp(2 * logp, dim=-1)
    return out.view(strong.shape[:-1])


# ----------------------------------------------------------------------------------------------------------------
# The policy forward, as DPOTrainer._compute_loss sees it


@dataclass
class _WeakOutputs:
    per_token_logps: torch.Tensor  # (2B, T-1), zero off-completion
    entropy: torch.Tensor | None  # (2B, T-1) or None
    logits: torch.Tensor | None  # (2B, K, V) at `keep` positions (WD-JT only)
    keep: torch.Tensor | None


class _WMSSPolicy:
    """Stands in for the policy inside ``DPOTrainer._compute_loss``: a call with ``fused_lm_head=True`` returns a
    ``FusedCausalLMOutput`` whose ``log_probs`` are the mixed ones (WD-JT) and/or carry the per-pair gradient weights;
    every other call goes to the model unchanged."""

    def __init__(self, model, trainer, weak: _WeakOutputs, shift_mask: torch.Tensor):
        self.model, self.trainer, self.weak, self.shift_mask = model, trainer, weak, shift_mask
        self.stats: dict[str, torch.Tensor] = {}

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        if not kwargs.get("fused_lm_head", False):
            return self.model(*args, **kwargs)
        trainer = self.trainer
        if trainer.mixing_lambda < 1.0:
            out = self._mixed_forward(kwargs)
        else:
            out = self.model(*args, **kwargs)
        if trainer.args.entropy_pair_weights:
            _, rejected_mask = self.shift_mask.chunk(2, dim=0)
            _, h_strong = masked_mean(out.entropy.detach().float(), self.shift_mask).chunk(2, dim=0)
            _, h_weak = masked_mean(self.weak.entropy.float(), self.shift_mask).chunk(2, dim=0)
            args = trainer.args
            w = three_signal_weights(
                h_weak,
                h_strong,
                (args.pair_weight_alpha, args.pair_weight_beta, args.pair_weight_gamma),
                reduce_sum=lambda t: trainer.accelerator.reduce(t, reduction="sum"),
            ).float()
            out.log_probs = scale_grad(out.log_probs, torch.cat([w, w]))
            self.stats.update(weights=w, h_weak=h_weak, h_strong=h_strong)
        return out

    def _mixed_forward(self, kwargs):
        trainer = self.trainer
        kwargs = dict(kwargs)
        kwargs.pop("fused_lm_head")
        labels = kwargs.pop("labels")
        keep, targets = trained_positions(labels)
        if self.weak.keep is None or not torch.equal(keep, self.weak.keep):
            raise RuntimeError("internal error: the weak and strong forwards scored different positions.")
        outputs = self.model(**kwargs, logits_to_keep=keep)  # the original forward: logits at `keep` only
        strong = outputs.logits
        width = labels.shape[1] - 1
        mask_k = targets != -100
        safe = targets.clamp(min=0)
        lam, chunk = trainer.mixing_lambda, trainer.args.mixing_chunk_size
        log_probs = mixed_token_logprobs(strong, self.weak.logits, safe, lam, chunk) * mask_k
        with torch.no_grad():
            strong_lp = -token_nll(strong, safe, chunk) * mask_k
            self.stats["strong_logps"] = _scatter_columns(strong_lp, keep, width).sum(1)
            entropy = token_entropy(strong, chunk) * mask_k
            mean_logits = strong.float().mean(-1) * mask_k
            is_top1 = (strong.argmax(-1) == targets) & mask_k
            log_sum_sq = None
            if trainer.use_weighting:
                log_sum_sq = _scatter_columns(
                    _mixed_log_sum_sq_probs(strong, self.weak.logits, lam, chunk) * mask_k, keep, width
                )
        return fused_lm_head_output(
            log_probs=_scatter_columns(log_probs, keep, width),
            entropy=_scatter_columns(entropy, keep, width),
            log_sum_sq_probs=log_sum_sq,
            mean_logits=_scatter_columns(mean_logits, keep, width),
            is_top1=_scatter_columns(is_top1.long(), keep, width).bool(),
            label_mask=labels[:, 1:] != -100,
            aux_loss=getattr(outputs, "aux_loss", None),
        )
