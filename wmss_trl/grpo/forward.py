"""WD-JT in RL: the policy's per-token log-probs from the mixed logits (``mixing_lambda < 1``).

    log p_mix(y_t) = log softmax(lambda * z_policy / T + (1 - lambda) * z_weak / T)[y_t]

with gradient only through the policy logits (:func:`wmss_trl.mixing.mixed_token_logprobs`). The entropies returned
are the policy's own (not the mixture's), as in TRL's ``entropy`` metric. Generation stays with the pure policy.
"""

from __future__ import annotations

import torch
from trl.models.utils import disable_gradient_checkpointing

from ..entropy import token_entropy
from ..mixing import mixed_token_logprobs


def mixed_policy_logps(
    trainer, model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss
):
    """``(log-probs, entropies or None, aux loss or None)`` of ``model`` (the policy) as TRL's
    ``_get_per_token_logps_and_entropies`` returns them, with the log-probs of the mixed logits. The weak logits come
    from ``trainer.weak_engine()`` (no grad), chunked over rows by ``batch_size``."""
    batch_size = batch_size or input_ids.size(0)
    all_logps, all_entropies, all_aux = [], [], []
    needs_entropy_grad = torch.is_grad_enabled() and getattr(trainer, "_entropy_bonus_enabled", False)
    chunk, lam = trainer.args.mixing_chunk_size, trainer.args.mixing_lambda
    for start in range(0, input_ids.size(0), batch_size):
        ids, mask = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
        fwd = {
            "input_ids": ids,
            "attention_mask": mask,
            "logits_to_keep": logits_to_keep + 1,
            "use_cache": False,
            "fused_lm_head": False,
        }
        with disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs):
            with trainer.weak_engine() as weak, trainer.accelerator.autocast():
                weak_logits = weak(**fwd).logits[:, :-1].float() / trainer.temperature
        if compute_aux_loss:
            fwd["output_router_logits"] = True
        with trainer.accelerator.autocast():
            outputs = model(**fwd)
        logits = outputs.logits[:, :-1].float() / trainer.temperature
        all_logps.append(mixed_token_logprobs(logits, weak_logits, ids[:, -logits_to_keep:], lam, chunk))
        if compute_entropy:
            if needs_entropy_grad:
                all_entropies.append(torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1))
            else:
                all_entropies.append(token_entropy(logits.detach(), chunk))
        if compute_aux_loss:
            all_aux.append(outputs.aux_loss)
    logps = torch.cat(all_logps)
    entropies = torch.cat(all_entropies) if compute_entropy else None
    aux_loss = torch.stack(all_aux).mean() if compute_aux_loss else None
    return logps, entropies, aux_loss
