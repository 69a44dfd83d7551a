"""WD-JT (Weak-Driven Joint Training) as a drop-in TRL ``SFTTrainer``.

The loss is cross-entropy of the labels under the mixed logits of the trained (strong) model and a frozen
weak checkpoint of the same model:

    z_mix = lam * z_strong + (1 - lam) * z_weak,      L = -sum_t log softmax(z_mix)_t[y_t] / N_tokens

on exactly the tokens TRL's SFT trains (completion-only / assistant-only masks honoured). Only the strong
model is trained and saved; the weak model is never part of a checkpoint, so inference is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from trl import SFTConfig, SFTTrainer
from trl.models.utils import disable_gradient_checkpointing

from .entropy import token_entropy, token_nll, trained_positions
from .mixing import DEFAULT_CHUNK_SIZE, check_lambda, mixed_cross_entropy
from .weak import (
    check_weak_compatible,
    is_peft_model,
    prepare_weak_model,
    resolve_weak_model,
    weak_forward_context,
)

WMSS_PAPER = {
    "title": "Weak-Driven Learning: How Weak Agents Make Strong Agents Stronger",
    "id": "2602.08222",
    "citation": "@article{chen2026weakdriven, title={Weak-Driven Learning: How Weak Agents Make Strong Agents "
    "Stronger}, author={Chen, Zehao and Li, Gongxun and Ai, Tianxiang and others}, journal={arXiv preprint "
    "arXiv:2602.08222}, year={2026}}",
}


@dataclass
class WMSSSFTConfig(SFTConfig):
    r"""
    Configuration for [`WMSSSFTTrainer`]: everything of [`~trl.SFTConfig`], plus the weak model and the mixing weight.

    Parameters:
        weak_model_name_or_path (`str`, *optional*):
            Local folder of the weak checkpoint (an earlier checkpoint of the same model, same tokenizer). Overridden
            by the trainer's `weak_model` argument. Not needed for a PEFT model (its adapter-disabled base is used).
        weak_model_init_kwargs (`dict` or `str`, *optional*):
            Keyword arguments for `from_pretrained` of the weak model (dict or JSON string), e.g. `{"dtype": "bfloat16"}`.
        mixing_lambda (`float`, defaults to `0.5`):
            Weight of the strong logits: z_mix = lambda * z_strong + (1 - lambda) * z_weak. Must satisfy
            0 < lambda <= 1; 1.0 is plain SFT. 0.5 is the official code's value (paper's sweet spot 0.42-0.48).
        mixing_chunk_size (`int`, defaults to `1024`):
            Positions per chunk of the fp32 mixed cross-entropy (bounds its memory).
    """

    _VALID_DICT_FIELDS = SFTConfig._VALID_DICT_FIELDS + ["weak_model_init_kwargs"]

    weak_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Local folder of the weak checkpoint (earlier checkpoint of the same model). Not needed "
                  "with PEFT: the adapter-disabled base is the weak model."},
    )
    weak_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for from_pretrained of the weak model, as a dict or a JSON string."},
    )
    mixing_lambda: float = field(
        default=0.5,
        metadata={"help": "Weight of the strong logits in z_mix = lambda*z_strong + (1-lambda)*z_weak; "
                  "0 < lambda <= 1, 1.0 is plain SFT."},
    )
    mixing_chunk_size: int = field(
        default=DEFAULT_CHUNK_SIZE,
        metadata={"help": "Positions per chunk of the fp32 mixed cross-entropy."},
    )

    def __post_init__(self):
        check_lambda(self.mixing_lambda)
        if self.mixing_chunk_size < 1:
            raise ValueError(f"mixing_chunk_size must be >= 1, got {self.mixing_chunk_size}.")
        super().__post_init__()


class WMSSSFTTrainer(SFTTrainer):
    """[`~trl.SFTTrainer`] whose loss is cross-entropy on the weak/strong mixed logits (WD-JT).

    Args:
        model, args, ...: as [`~trl.SFTTrainer`].
        weak_model (`PreTrainedModel` or `str`, *optional*):
            The frozen weak model, or its local folder; overrides `args.weak_model_name_or_path`. With a PEFT model
            and no weak model, the same network with adapters disabled is used (no second copy of the weights).

    Logged metrics (namespace `wmss/`): `mixed_loss` (the training loss, per token), `strong_nll` (plain SFT loss of
    the strong model on the same tokens), `weak_nll`, `strong_entropy`, `weak_entropy` (nats, per token).
    """

    _tag_names = ["trl", "sft", "wmss"]
    _name = "WMSS-SFT"
    _paper = WMSS_PAPER

    def __init__(self, model, args: WMSSSFTConfig | None = None, *pargs, weak_model=None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = WMSSSFTConfig(f"{str(name).split('/')[-1]}-WMSS")
        elif not isinstance(args, WMSSSFTConfig):
            raise TypeError(f"args must be a WMSSSFTConfig, got {type(args).__name__}.")
        super().__init__(model, args, *pargs, **kwargs)
        self.mixing_lambda = args.mixing_lambda

        weak, weak_path = resolve_weak_model(
            weak_model, args.weak_model_name_or_path, args.weak_model_init_kwargs, self.model
        )
        if weak is not None:
            check_weak_compatible(self.model, weak, self.processing_class, weak_path)
            weak = prepare_weak_model(weak, self.accelerator, self.is_deepspeed_enabled)
        self.weak_model = weak  # None means: the PEFT policy with adapters disabled
        self._check_trainable_tokens()

    def _check_trainable_tokens(self):
        dataset = self.train_dataset
        if dataset is None or not hasattr(dataset, "column_names") or "labels" not in (dataset.column_names or []):
            return
        if len(dataset) == 0:
            raise ValueError("the training dataset is empty.")
        for labels in dataset["labels"]:
            if any(label != -100 for label in labels[1:]):
                return
        raise ValueError(
            "the training dataset has no trainable tokens: every label is masked (-100). Check the completion / "
            "assistant masks (`completion_only_loss`, `assistant_only_loss`, the chat template's generation tags) "
            "and `max_length` (truncation may cut off every completion)."
        )

    def _weak_logits(self, model, model_inputs):
        if self.weak_model is not None:
            with weak_forward_context(self.weak_model, model) as weak:
                return weak(**model_inputs).logits
        unwrapped = self.accelerator.unwrap_model(model)
        with disable_gradient_checkpointing(unwrapped, self.args.gradient_checkpointing_kwargs):
            with weak_forward_context(None, model) as weak:
                return weak(**model_inputs).logits

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        labels = inputs["labels"]
        keep, targets = trained_positions(labels)  # only positions whose next token is trained get logits
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        model_inputs.update(use_cache=False, logits_to_keep=keep)

        outputs = model(**model_inputs)
        strong_logits = outputs.logits
        weak_logits = self._weak_logits(model, model_inputs)

        loss_sum, n_local = mixed_cross_entropy(
            strong_logits, weak_logits, targets, self.mixing_lambda, chunk_size=self.args.mixing_chunk_size
        )
        num_tokens = n_local if num_items_in_batch is None else num_items_in_batch
        loss = loss_sum / torch.as_tensor(num_tokens).clamp(min=1)
        # Like SFTTrainer: `num_items_in_batch` counts every rank's tokens, and DDP averages gradients across ranks
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes

        self._log_wmss_metrics(mode, strong_logits, weak_logits, targets, loss_sum.detach())
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _log_wmss_metrics(self, mode, strong_logits, weak_logits, targets, loss_sum):
        mask = targets != -100
        safe = targets.masked_fill(~mask, 0)
        chunk = self.args.mixing_chunk_size
        sums = torch.stack(
            [
                loss_sum.float(),
                (token_nll(strong_logits, safe, chunk) * mask).sum(),
                (token_nll(weak_logits, safe, chunk) * mask).sum(),
                (token_entropy(strong_logits, chunk) * mask).sum(),
                (token_entropy(weak_logits, chunk) * mask).sum(),
                mask.sum().float(),
            ]
        )
        sums = self.accelerator.reduce(sums, reduction="sum")
        n = sums[-1].clamp(min=1)
        for name, value in zip(("mixed_loss", "strong_nll", "weak_nll", "strong_entropy", "weak_entropy"), sums[:-1]):
            self._metrics[mode][f"wmss/{name}"].append((value / n).item())
