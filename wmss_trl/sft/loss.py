"""The loss of the WD-JT SFT trainer when wmss_trl computes it (WD-JT, or plain SFT with ``saturation_metrics=True``).

Without mixing (no weak model, or lambda = 1) and without the saturation metrics, the trainer uses TRL's
`compute_loss`, untouched, and nothing here runs.
Default path: hidden states of both models + their LM heads -> `mixed_head_loss`, which never builds the logits and
computes the gradient in the same pass. It runs inside the policy wrapper's forward (`_forward_redirection`, as TRL's
distillation trainer does) so DDP's gradient sync and DeepSpeed ZeRO-3's parameter gathering behave as in a normal
step. Fallback (PEFT-wrapped heads, logit scaling / soft-capping, the MoE router loss): the models' own logits, mixed
chunk by chunk.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch
from trl.models.utils import disable_gradient_checkpointing

from ..entropy import trained_positions
from ..mixing import DIAGNOSTIC_NAMES, STAT_NAMES, logits_stats, mixed_cross_entropy, mixed_head_loss
from ..weak import backbone_of, lm_head_of


def wdjt_loss(trainer, model, inputs, return_outputs=False, num_items_in_batch=None):
    """`compute_loss` when wmss_trl computes the loss: L = sum of the token losses / N_tokens (N: the Trainer's
    `num_items_in_batch` over every rank, else this micro-batch's trained tokens), plus the MoE router term as
    SFTTrainer adds it; the metrics are logged from the same pass (`log_mixing_metrics`)."""
    mode = "train" if trainer.model.training else "eval"
    diagnostics = diagnostics_logged_now(trainer)
    keep, targets = trained_positions(inputs["labels"])  # positions whose next token is trained
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    model_inputs["use_cache"] = False
    if trainer.aux_loss_enabled:  # MoE: the router logits, for the load-balancing loss (as SFTTrainer)
        model_inputs["output_router_logits"] = True
    unwrapped = trainer.accelerator.unwrap_model(model)
    if trainer._fused_head:
        loss_sum, stats_sum, n_local, aux_loss = trainer._forward_redirection(
            model, unwrapped, partial(fused_mixed_loss, trainer), unwrapped, model_inputs, keep, targets, diagnostics
        )
    else:
        loss_sum, stats_sum, n_local, aux_loss = logits_mixed_loss(
            trainer, model, unwrapped, model_inputs, keep, targets, diagnostics
        )

    num_tokens = n_local if num_items_in_batch is None else num_items_in_batch
    loss = loss_sum / torch.as_tensor(num_tokens).clamp(min=1)
    # Like SFTTrainer: `num_items_in_batch` counts every rank's tokens, and DDP averages gradients across ranks
    if trainer.args.average_tokens_across_devices and num_items_in_batch is not None:
        loss = loss * trainer.accelerator.num_processes
    if aux_loss is not None:
        # Like SFTTrainer: a per-micro-batch mean, averaged over the accumulation steps when the loss is summed
        steps = trainer.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        loss = loss + trainer.router_aux_loss_coef * aux_loss / steps
        aux_mean = trainer.accelerator.gather_for_metrics(aux_loss.detach()).mean().item()
        trainer._metrics[mode]["aux_loss"].append(aux_mean)

    log_mixing_metrics(trainer, mode, loss_sum.detach(), stats_sum, n_local, inputs)
    if return_outputs:
        with torch.no_grad():
            outputs = model(**model_inputs)
        return loss, outputs
    return loss


def diagnostics_logged_now(trainer) -> bool:
    """Whether this step computes the saturation metrics: only on the training steps whose metrics are logged
    (transformers' DefaultFlowCallback rule: logging_strategy="steps", global_step % logging_steps == 0, or the
    first step with logging_first_step), and on every evaluation batch; every step with another strategy."""
    if not trainer.saturation_metrics:
        return False
    args, step = (
        trainer.args,
        trainer.state.global_step + 1,
    )  # the step being computed, once its optimizer step is done
    if not trainer.model.training or args.logging_strategy != "steps":
        return True
    return step % trainer.state.logging_steps == 0 or (args.logging_first_step and step == 1)


def fused_mixed_loss(trainer, unwrapped, model_inputs, keep, targets, diagnostics):
    """The token-loss sum, statistics sums and token count from the backbones' hidden states and the LM heads
    (`mixed_head_loss`, which never builds the logits), run inside the policy wrapper's forward."""
    mask = targets != -100
    strong = backbone_of(unwrapped)(**model_inputs)
    strong_hidden = strong.last_hidden_state[:, keep][mask]
    weak_hidden = weak_head = None
    if trainer.use_mixing:
        weak_hidden = weak_hidden_states(trainer, unwrapped, model_inputs)[:, keep][mask]
        weak_head = lm_head_of(
            unwrapped if trainer.weak_model is None else trainer.accelerator.unwrap_model(trainer.weak_model)
        )
    loss_sum, stats = mixed_head_loss(
        strong_hidden,
        lm_head_of(unwrapped),
        weak_hidden,
        weak_head,
        targets[mask],
        trainer.mixing_lambda if trainer.use_mixing else 1.0,
        trainer.args.mixing_chunk_size,
        train_weak=trainer.args.train_weak_model,
        diagnostics=diagnostics,
    )
    return loss_sum, stats.sum(0), mask.sum(), None  # no router loss on this path (see `_fused_head`)


def weak_hidden_states(trainer, unwrapped, model_inputs):
    """Final hidden states of the weak model (the adapter-disabled policy under PEFT), without gradients unless it
    is co-trained (it is then a submodule of the policy, run inside the policy's forward)."""
    if trainer.args.train_weak_model:
        return backbone_of(trainer.weak_model)(**model_inputs).last_hidden_state
    with torch.no_grad():
        if trainer.weak_model is None:
            with disable_gradient_checkpointing(unwrapped, trainer.args.gradient_checkpointing_kwargs):
                with unwrapped.disable_adapter():
                    return backbone_of(unwrapped)(**model_inputs).last_hidden_state
        weak = trainer.accelerator.unwrap_model(trainer.weak_model)
        return trainer._forward_redirection(
            trainer.weak_model, weak, lambda m, inputs: backbone_of(m)(**inputs).last_hidden_state, weak, model_inputs
        )


def logits_mixed_loss(trainer, model, unwrapped, model_inputs, keep, targets, diagnostics):
    """As `fused_mixed_loss`, from the models' own logits, mixed chunk by chunk (`mixed_cross_entropy`)."""
    model_inputs = {**model_inputs, "logits_to_keep": keep}
    strong = model(**model_inputs)
    strong_logits = strong.logits
    lam, chunk = (trainer.mixing_lambda if trainer.use_mixing else 1.0), trainer.args.mixing_chunk_size
    weak_logits = None
    train_weak = trainer.args.train_weak_model
    with contextlib.nullcontext() if train_weak else torch.no_grad():  # no weak model: plain SFT + diagnostics
        if trainer.use_mixing and trainer.weak_model is not None:
            weak_logits = trainer.weak_model(**model_inputs).logits
        elif trainer.use_mixing:
            with disable_gradient_checkpointing(unwrapped, trainer.args.gradient_checkpointing_kwargs):
                with unwrapped.disable_adapter():
                    weak_logits = model(**model_inputs).logits
    # lam = 1 without a weak model: z_mix = z_strong, SFT's cross-entropy (the weak slot's logits do not count)
    loss_sum, n_local = mixed_cross_entropy(
        strong_logits,
        strong_logits if weak_logits is None else weak_logits,
        targets,
        lam,
        chunk_size=chunk,
        train_weak=train_weak,
    )
    stats = logits_stats(strong_logits, weak_logits, targets, lam, chunk, diagnostics).sum(0)
    return loss_sum, stats, n_local, strong.aux_loss if trainer.aux_loss_enabled else None


@torch.no_grad()
def log_mixing_metrics(trainer, mode, loss_sum, stats_sum, n_local, inputs):
    """TRL's SFT metrics of the strong model (`entropy`, `mean_token_accuracy`, `num_tokens`), the `wmss/` ones
    with WD-JT, and the saturation metrics when computed, from the per-token statistics the loss computed anyway:
    means over the trained tokens of every rank (global sums / global count: every rank logs the same)."""
    sums = torch.cat([loss_sum.float().view(1), stats_sum.float(), n_local.float().view(1)])
    sums = trainer.accelerator.reduce(sums, reduction="sum")
    names = ("mixed_loss", *STAT_NAMES, *DIAGNOSTIC_NAMES)[: len(sums) - 1]  # diagnostics: on logged steps only
    means = dict(zip(names, (sums[:-1] / sums[-1].clamp(min=1)).tolist()))
    metrics = trainer._metrics[mode]
    metrics["entropy"].append(means["strong_entropy"])
    metrics["mean_token_accuracy"].append(means["strong_top1"])
    if mode == "train":
        trainer._total_train_tokens += count_batch_tokens(trainer, inputs)
    metrics["num_tokens"] = [trainer._total_train_tokens]
    if trainer.use_mixing:
        for name in ("mixed_loss", "strong_nll", "weak_nll", "strong_entropy", "weak_entropy"):
            metrics[f"wmss/{name}"].append(means[name])
    diagnostics = DIAGNOSTIC_NAMES if trainer.use_mixing else ("logit_margin", "min_margin", "sft_nontarget_grad_norm")
    for name in diagnostics:
        if name in means:
            metrics[f"wmss/{name}"].append(means[name])


def count_batch_tokens(trainer, inputs) -> int:
    """Tokens of the global batch, counted as SFTTrainer counts `num_tokens` (padding-free: the packed row)."""
    if "attention_mask" in inputs:
        local = inputs["attention_mask"].sum()
    elif "position_ids" in inputs:
        local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
    else:
        raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
    return trainer.accelerator.gather_for_metrics(local).sum().item() // trainer._tp_size
