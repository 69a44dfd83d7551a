"""WD-JT logit mixing: the math, as small pure functions.

The mixed distribution of WMSS joint training is

    z_mix = lam * z_strong + (1 - lam) * z_weak,      p_mix = softmax(z_mix) ∝ p_strong^lam * p_weak^(1 - lam)

and the WD-JT loss is plain cross-entropy of the labels under ``p_mix``. The strong logits receive the gradient

    d(-log p_mix[y]) / d z_strong = lam * (p_mix - onehot(y))

and, only when the weak model is co-trained (``train_weak``; frozen by default), the weak logits

    d(-log p_mix[y]) / d z_weak = (1 - lam) * (p_mix - onehot(y))

Every function here works on *chunks* of positions so that no full ``(batch, seq, vocab)`` fp32 tensor of
mixed logits ever exists. Two entry points:

* :func:`mixed_token_logprobs` takes logits the caller already has (``(..., V)``), computes ``log p_mix[y]``
  chunk by chunk in fp32 and recomputes ``p_mix`` chunk by chunk in the backward pass (GRPO, DPO, and SFT when the
  LM head cannot be fused).
* :func:`mixed_head_loss` takes the two models' *hidden states* and LM-head weights and never builds the logits at
  all, not even the strong model's: each chunk of positions is projected, mixed, reduced and dropped (the pattern of
  TRL's chunked distillation loss, including the ZeRO-3 gather of the LM heads). It is a *summed* loss, with the
  gradient computed in the forward pass (one projection per model per chunk). This is what ``WMSSSFTTrainer`` uses:
  its memory does not grow with the vocabulary and its cost is close to plain SFT's (docs/results.md).
"""

from __future__ import annotations

import torch
from trl.trainer.utils import maybe_gather_lm_head_ctx

from .diagnostics import logit_margins, nontarget_grad_norm, weak_topk_share


IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 256


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
    """log softmax(lam*z_s + (1-lam)*z_w)[y] per position, chunked; gradient to z_s (and to z_w when it requires one:
    the co-trained weak model, d log p_mix[y] / d z_w = (1 - lam) * (onehot(y) - p_mix))."""

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
        need_s, need_w = ctx.needs_input_grad[:2]
        grad = torch.empty_like(flat_s) if need_s else None
        grad_w = torch.empty_like(flat_w) if need_w else None
        for start in range(0, flat_y.numel(), chunk_size):
            sl = slice(start, start + chunk_size)
            p_mix = torch.softmax(mix_logits(flat_s[sl], flat_w[sl], lam), dim=-1)
            # d log p_mix[y] / d z_s = lam * (onehot(y) - p_mix); for z_w the factor is (1 - lam)
            g = -p_mix
            g.scatter_add_(-1, flat_y[sl, None], torch.ones_like(flat_y[sl, None], dtype=g.dtype))
            g.mul_(flat_g[sl, None])
            if need_s:
                grad[sl] = (lam * g).to(grad.dtype)
            if need_w:
                grad_w[sl] = ((1.0 - lam) * g).to(grad_w.dtype)
        return (
            None if grad is None else grad.view(strong.shape),
            None if grad_w is None else grad_w.view(weak.shape),
            None,
            None,
            None,
        )


def mixed_token_logprobs(
    strong_logits: torch.Tensor,
    weak_logits: torch.Tensor,
    tokens: torch.Tensor,
    lam: float,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    train_weak: bool = False,
) -> torch.Tensor:
    """Per-position log p_mix[token] with p_mix = softmax(lam * z_strong + (1 - lam) * z_weak).

    Args:
        strong_logits: ``(..., V)`` logits of the trained model (any dtype; upcast to fp32 per chunk).
        weak_logits: ``(..., V)`` logits of the weak model (a constant unless ``train_weak``).
        tokens: ``(...)`` token ids to score; must be valid ids (replace ignore labels before calling).
        lam: weight of the strong logits, 0 < lam <= 1.
        chunk_size: positions processed at once.
        train_weak: also differentiable w.r.t. ``weak_logits`` (the co-trained weak model).

    Returns:
        ``(...)`` fp32 log-probabilities, differentiable w.r.t. ``strong_logits``.
    """
    if strong_logits.shape != weak_logits.shape:
        raise ValueError(
            f"strong and weak logits differ in shape: {tuple(strong_logits.shape)} vs {tuple(weak_logits.shape)}; "
            "the weak model must share the strong model's tokenizer and vocabulary size."
        )
    weak_logits = weak_logits if train_weak else weak_logits.detach()
    return _MixedTokenLogProbs.apply(strong_logits, weak_logits, tokens, float(lam), int(chunk_size))


def mixed_cross_entropy(
    strong_logits: torch.Tensor,
    weak_logits: torch.Tensor,
    labels: torch.Tensor,
    lam: float,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    train_weak: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed WD-JT cross-entropy -sum_t log p_mix[y_t] over positions whose label != ignore_index.

    ``labels`` are aligned with the logits (already shifted). Returns ``(loss_sum, num_tokens)``; divide
    to get the mean, or divide by a global token count for gradient accumulation, as TRL does. ``train_weak``: the
    weak logits get their gradient too (see :func:`mixed_token_logprobs`).
    """
    mask = labels != ignore_index
    safe = labels.masked_fill(~mask, 0)
    logp = mixed_token_logprobs(strong_logits, weak_logits, safe, lam, chunk_size, train_weak)
    return -(logp * mask).sum(), mask.sum()


def _project(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Logits of a chunk of positions, in fp32: hidden @ weight.T (+ bias), in the weight's dtype, then upcast."""
    z = hidden.to(weight.dtype) @ weight.t()
    if bias is not None:
        z = z + bias
    return z.float()


STAT_NAMES = ("strong_nll", "weak_nll", "strong_entropy", "weak_entropy", "strong_top1")
# per-position diagnostics (wmss_trl.diagnostics): the strong model's own three, then the two of the mixed gradient
DIAGNOSTIC_NAMES = (
    "logit_margin",
    "min_margin",
    "sft_nontarget_grad_norm",
    "nontarget_grad_norm",
    "weak_topk_grad_share",
)
WEAK_TOP_K = 5


def _own_stats(
    z_s: torch.Tensor, z_w: torch.Tensor | None, y: torch.Tensor, diagnostics: bool = False
) -> torch.Tensor:
    """Logging statistics of each model on its own, per position: ``[NLL_s, NLL_w, H_s, H_w, top1_s]`` (fp32,
    (n, 5), columns named by :data:`STAT_NAMES`; the weak columns are 0 without a weak model, ``z_w=None``), and with
    ``diagnostics`` the strong model's ``[logit_margin, min_margin, sft_nontarget_grad_norm]`` after them (the first
    three :data:`DIAGNOSTIC_NAMES`, see :mod:`wmss_trl.diagnostics`; the last from the same softmax as H_s).

    NLL = logsumexp(z) - z[y];  H = logsumexp(z) - sum_v softmax(z)_v z_v;  top1_s = 1 if argmax_v z_s = y (the first
    maximum, as TRL's ``is_top1``), else 0;  logit_margin = z_s,y - mean_{k != y} z_s,k;
    min_margin = z_s,y - max_{k != y} z_s,k;  sft_nontarget_grad_norm = ||softmax(z_s)_{k != y}||_2.
    """
    cols, extra = [], []
    for z in (z_s, z_w):
        if z is None:
            cols += [torch.zeros_like(cols[0])] * 2
            continue
        lse = torch.logsumexp(z, -1)
        p = torch.softmax(z, -1)
        cols += [lse - z.gather(-1, y).squeeze(-1), lse - (p * z).sum(-1)]
        if diagnostics and z is z_s:
            extra = [*logit_margins(z_s, y[:, 0]), nontarget_grad_norm(p, y[:, 0])]
    nll_s, h_s, nll_w, h_w = cols
    top1_s = (z_s.argmax(-1) == y.squeeze(-1)).float()
    return torch.stack([nll_s, nll_w, h_s, h_w, top1_s, *extra], dim=-1)


def _mixed_diagnostics(p_mix: torch.Tensor, z_w: torch.Tensor | None, y: torch.Tensor, lam: float) -> torch.Tensor:
    """The last two :data:`DIAGNOSTIC_NAMES` per position, (n, 2): ``nontarget_grad_norm`` = lam ||p_mix,{k != y}||_2
    (the WD-JT gradient on the strong logits, off the target) and ``weak_topk_grad_share`` = the share of
    sum_{k != y} p_mix,k on the weak model's top-5 non-target tokens. Without a weak model (``z_w=None``, lam = 1,
    p_mix = p_s) the first is SFT's and the share is 0."""
    norm = nontarget_grad_norm(p_mix, y[:, 0], lam)
    share = torch.zeros_like(norm) if z_w is None else weak_topk_share(p_mix, z_w, y[:, 0], WEAK_TOP_K)
    return torch.stack([norm, share], dim=-1)


class _ChunkedMixedHeadLoss(torch.autograd.Function):
    """Summed WD-JT loss sum_t -log p_mix[y_t] from hidden states and LM heads, with the gradient computed during
    the forward: one projection per model per chunk, instead of a second one in the backward.

    Per chunk: z = lam z_s + (1-lam) z_w, loss += logsumexp(z) - z[y]; with g = softmax(z) - onehot(y),
    lam * g is dL/dz_s, so dL/dh_s = lam g W_s and dL/dW_s += lam g^T h_s; with ``train_weak``, (1 - lam) * g is
    dL/dz_w and the weak side gets the same form. Without a weak model (``h_w`` None, lam = 1) it is plain SFT's
    cross-entropy. The backward only scales these by the upstream gradient (a scalar), which is why this works for a
    summed loss only (per-token log-probs: :func:`mixed_token_logprobs`).
    """

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_w, w_w, b_w, targets, lam, chunk_size, train_weak, diagnostics):
        ctx.set_materialize_grads(False)
        needs = ctx.needs_input_grad[:6] if train_weak else (*ctx.needs_input_grad[:3], False, False, False)
        scales = (lam,) * 3 + (1.0 - lam,) * 3
        n, device = h_s.shape[0], h_s.device
        loss = torch.zeros((), dtype=torch.float32, device=device)
        width = len(STAT_NAMES) + (len(DIAGNOSTIC_NAMES) if diagnostics else 0)
        stats = torch.empty(n, width, dtype=torch.float32, device=device)
        grads = [None] * 6
        with maybe_gather_lm_head_ctx(w_s, b_s), maybe_gather_lm_head_ctx(w_w, b_w), torch.no_grad():
            for i, (param, need) in enumerate(zip((h_s, w_s, b_s, h_w, w_w, b_w), needs)):
                if need:
                    grads[i] = torch.zeros(param.shape, dtype=torch.float32, device=device)
            for start in range(0, n, chunk_size):
                sl = slice(start, start + chunk_size)
                y = targets[sl, None]
                z_s = _project(h_s[sl], w_s, b_s)
                z_w = None if h_w is None else _project(h_w[sl], w_w, b_w)
                stats[sl, : width - 2 * diagnostics] = _own_stats(z_s, z_w, y, diagnostics)
                z = z_s if z_w is None else z_s.mul_(lam).add_(z_w, alpha=1.0 - lam)  # z_mix, in place of z_s
                lse = torch.logsumexp(z, -1)
                loss += (lse - z.gather(-1, y).squeeze(-1)).sum()
                if diagnostics or any(needs):
                    g = z.sub_(lse[:, None]).exp_()  # p_mix, in place
                    if diagnostics:
                        stats[sl, width - 2 :] = _mixed_diagnostics(g, z_w, y, lam)
                if any(needs):
                    g.scatter_add_(-1, y, torch.full_like(y, -1, dtype=g.dtype))  # p_mix - onehot(y)
                    for side, (h, w) in enumerate(((h_s, w_s), (h_w, w_w))):
                        need_h, need_w, need_b = needs[3 * side : 3 * side + 3]
                        if not (need_h or need_w or need_b):
                            continue
                        g_side = g * scales[3 * side]
                        if need_h:
                            grads[3 * side][sl] = (g_side.to(w.dtype) @ w).float()
                        if need_w:
                            grads[3 * side + 1] += g_side.t() @ h[sl].float()
                        if need_b:
                            grads[3 * side + 2] += g_side.sum(0)
        ctx.save_for_backward(*grads)
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (h_s, w_s, b_s, h_w, w_w, b_w))
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _):
        if grad_loss is None:
            return (None,) * 11
        out = [None if g is None else (g * grad_loss).to(dt) for g, dt in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*out, None, None, None, None, None)


def mixed_head_loss(
    strong_hidden: torch.Tensor,
    strong_head: torch.nn.Module,
    weak_hidden: torch.Tensor | None,
    weak_head: torch.nn.Module | None,
    targets: torch.Tensor,
    lam: float,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    train_weak: bool = False,
    diagnostics: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed WD-JT cross-entropy sum_t -log p_mix[y_t] from final hidden states ``(N, H)`` and the LM heads.

    The fastest form for a summed loss (SFT): gradients are computed in the same pass as the loss. Returns
    ``(loss_sum, stats)``: ``stats`` is ``(N, 5)`` (no gradient), per position: strong NLL, weak NLL, strong entropy,
    weak entropy and whether the strong model's top-1 token is the target (:data:`STAT_NAMES`, :func:`_own_stats`),
    followed with ``diagnostics`` by the :data:`DIAGNOSTIC_NAMES` columns (:func:`_mixed_diagnostics`). The heads must
    have no logit scaling or soft-capping (see :func:`plain_lm_head`). The weak side is a constant unless ``train_weak``
    (co-training: it then gets the gradient (1 - lam) * (p_mix - onehot(y)) on its logits). ``weak_hidden=None`` and
    ``weak_head=None``: plain SFT cross-entropy of the strong model (lam must be 1).
    """
    if weak_hidden is None and lam != 1.0:
        raise ValueError(f"mixed_head_loss without a weak model is plain SFT and needs lam=1.0, got {lam}.")
    return _ChunkedMixedHeadLoss.apply(
        strong_hidden,
        strong_head.weight,
        strong_head.bias,
        weak_hidden,
        None if weak_head is None else weak_head.weight,
        None if weak_head is None else weak_head.bias,
        targets,
        float(lam),
        int(chunk_size),
        bool(train_weak),
        bool(diagnostics),
    )


@torch.no_grad()
def logits_stats(
    strong_logits: torch.Tensor,
    weak_logits: torch.Tensor | None,
    targets: torch.Tensor,
    lam: float,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    diagnostics: bool = False,
) -> torch.Tensor:
    """The per-position statistics of :func:`mixed_head_loss` (:data:`STAT_NAMES`, then with ``diagnostics``
    :data:`DIAGNOSTIC_NAMES`), from logits ``(..., V)`` the caller already has, for the positions whose target is
    not ``IGNORE_INDEX``: ``(N_trained, columns)`` fp32, chunk by chunk. ``weak_logits=None``: plain SFT (lam = 1)."""
    vocab = strong_logits.shape[-1]
    rows = (targets != IGNORE_INDEX).reshape(-1).nonzero().squeeze(-1)
    flat_s, flat_y = strong_logits.reshape(-1, vocab), targets.reshape(-1)
    flat_w = None if weak_logits is None else weak_logits.reshape(-1, vocab)
    width = len(STAT_NAMES) + (len(DIAGNOSTIC_NAMES) if diagnostics else 0)
    out = torch.empty(rows.numel(), width, dtype=torch.float32, device=strong_logits.device)
    for start in range(0, rows.numel(), chunk_size):
        sl, at = slice(start, start + chunk_size), rows[start : start + chunk_size]
        z_s, y = flat_s[at].float(), flat_y[at, None]
        z_w = None if flat_w is None else flat_w[at].float()
        out[sl, : width - 2 * diagnostics] = _own_stats(z_s, z_w, y, diagnostics)
        if diagnostics:
            p_mix = torch.softmax(z_s if z_w is None else mix_logits(z_s, z_w, lam), -1)
            out[sl, width - 2 :] = _mixed_diagnostics(p_mix, z_w, y, lam)
    return out


def plain_lm_head(model) -> bool:
    """True when the model's logits are exactly ``hidden @ lm_head.weight.T + bias`` (no logit scale, no
    soft-capping), i.e. when :func:`mixed_head_loss` reproduces its logits."""
    config = model.config.get_text_config()
    if getattr(config, "final_logit_softcapping", None) is not None:
        return False
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            return False
    return True
