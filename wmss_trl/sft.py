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
from trl.models.utils import _ForwardRedirection, disable_gradient_checkpointing

from .entropy import token_entropy, token_nll, trained_positions
from .mixing import DEFAULT_CHUNK_SIZE, check_lambda, mixed_cross_entropy, mixed_head_loss, plain_lm_head
from .weak import backbone_of, check_weak_compatible, lm_head_of, prepare_weak_model, resolve_weak_model
from .selection import (
    check_selection_config,
    format_stats,
    replace_train_dataset_argument,
    select_train_dataset,
    train_dataset_argument,
    unique_count,
    weighted_sampler_for,
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
        mixing_chunk_size (`int`, defaults to `256`):
            Positions per chunk of the fp32 mixed cross-entropy (bounds its memory).

        > WD-DS selection (Weak-Driven Discrepancy Selection, see `wmss_trl.selection`)

        selection_mode (`str`, *optional*):
            How the WD-DS weights shape the training data: `None` (off), `"resample"` (official: N * multiplier draws
            with replacement, seeded), `"weighted_sampler"` (the rows are redrawn each epoch, seeded, resumable) or
            `"top_fraction"` (keep the highest-weight fraction once each).
        entropy_files (`list[str]`, *optional*):
            Output(s) of `wmss entropy`, joined on `idx`; they must cover every row of the training dataset (its `idx`
            column, else the row number).
        weak_entropy_column (`str`, defaults to `"entropy_0"`), strong_entropy_column (`str`, defaults to `"entropy_1"`):
            Columns with H0 (weak model) and H1 (strong model).
        selection_alpha, selection_beta, selection_gamma (`float`, defaults to `0.1`, `0.8`, `0.1`):
            Shares of the sampling mass for base difficulty (H0), entropy drops and entropy rises (official values).
        selection_multiplier (`float`, defaults to `1.0`):
            Draws per epoch as a multiple of the dataset size (`resample`, `weighted_sampler`).
        selection_fraction (`float`, defaults to `0.5`):
            Fraction of rows kept by `top_fraction`.
        selection_seed (`int`, defaults to `42`):
            Seed of the draws (the official code's 42).
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
        metadata={"help": "Positions per chunk of the fp32 mixed cross-entropy (memory: chunk x vocab floats)."},
    )

    # WD-DS selection
    selection_mode: str | None = field(
        default=None,
        metadata={"help": "WD-DS data selection: None (off), 'resample' (official: N*multiplier draws with "
                  "replacement), 'weighted_sampler' (redrawn each epoch) or 'top_fraction'.",
                  "choices": [None, "resample", "weighted_sampler", "top_fraction"]},
    )
    entropy_files: list[str] | None = field(
        default=None,
        metadata={"help": "Entropy file(s) written by `wmss entropy` (joined on idx) with the weak and strong "
                  "per-sample entropies; must cover every training row."},
    )
    weak_entropy_column: str = field(default="entropy_0", metadata={"help": "Column of H0, the weak model's entropy."})
    strong_entropy_column: str = field(
        default="entropy_1", metadata={"help": "Column of H1, the strong model's entropy."}
    )
    selection_alpha: float = field(default=0.1, metadata={"help": "WD-DS share for base difficulty (H0)."})
    selection_beta: float = field(default=0.8, metadata={"help": "WD-DS share for entropy drops (H1 < H0)."})
    selection_gamma: float = field(default=0.1, metadata={"help": "WD-DS share for entropy rises (H1 > H0)."})
    selection_multiplier: float = field(
        default=1.0, metadata={"help": "Draws per epoch as a multiple of the dataset size (resample, weighted_sampler)."}
    )
    selection_fraction: float = field(default=0.5, metadata={"help": "Fraction of rows kept by top_fraction."})
    selection_seed: int = field(default=42, metadata={"help": "Seed of the WD-DS draws."})

    def __post_init__(self):
        check_lambda(self.mixing_lambda)
        check_selection_config(self)
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
        self.selection_stats = None
        if args.selection_mode is not None:  # WD-DS: select / weight the raw rows before TRL prepares them
            selected, self.selection_stats = select_train_dataset(train_dataset_argument(pargs, kwargs), args)
            pargs, kwargs = replace_train_dataset_argument(pargs, kwargs, selected)
        super().__init__(model, args, *pargs, **kwargs)
        self.mixing_lambda = args.mixing_lambda

        weak, weak_path = resolve_weak_model(
            weak_model, args.weak_model_name_or_path, args.weak_model_init_kwargs, self.model
        )
        if weak is not None:
            check_weak_compatible(self.model, weak, self.processing_class, weak_path)
            weak = prepare_weak_model(weak, self.accelerator, self.is_deepspeed_enabled)
        self.weak_model = weak  # None means: the PEFT policy with adapters disabled
        self._fused_head = plain_lm_head(self.accelerator.unwrap_model(self.model))
        self._forward_redirection = _ForwardRedirection()
        self._check_trainable_tokens()
        self._log_selection()

    def _log_selection(self):
        """Record how many distinct samples WD-DS selection trains on (`selection_stats`, metric `wmss/unique_samples`)."""
        stats = self.selection_stats
        if stats is None:
            return
        if stats["mode"] == "weighted_sampler":  # redrawn each epoch; report epoch 0's draw
            stats["unique_samples"] = unique_count(weighted_sampler_for(self.train_dataset, self.args).indices(0))
        self._metrics["train"]["wmss/unique_samples"].append(float(stats["unique_samples"]))
        self.accelerator.print(f"WD-DS selection: {format_stats(stats)}")

    def _get_train_sampler(self, train_dataset=None):
        if self.args.selection_mode == "weighted_sampler":
            # `self.train_dataset` still has the weight column (the dataloader's copy has it removed)
            return weighted_sampler_for(self.train_dataset, self.args)
        return super()._get_train_sampler(train_dataset)

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

    # ---- the loss -------------------------------------------------------------------------------------------
    # Default path: hidden states of both models + their LM heads -> `mixed_head_loss`, which never builds
    # the logits and computes the gradient in the same pass. It runs inside the policy wrapper's forward (`_forward_redirection`, as TRL's distillation
    # trainer does) so DDP's gradient sync and DeepSpeed ZeRO-3's parameter gathering behave as in a normal step.
    # Fallback (models with logit scaling / soft-capping): the models' own logits, mixed chunk by chunk.

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        keep, targets = trained_positions(inputs["labels"])  # positions whose next token is trained
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        model_inputs["use_cache"] = False
        unwrapped = self.accelerator.unwrap_model(model)
        if self._fused_head:
            loss_sum, stats_sum, n_local = self._forward_redirection(
                model, unwrapped, self._fused_mixed_loss, unwrapped, model_inputs, keep, targets
            )
        else:
            loss_sum, stats_sum, n_local = self._logits_mixed_loss(model, unwrapped, model_inputs, keep, targets)

        num_tokens = n_local if num_items_in_batch is None else num_items_in_batch
        loss = loss_sum / torch.as_tensor(num_tokens).clamp(min=1)
        # Like SFTTrainer: `num_items_in_batch` counts every rank's tokens, and DDP averages gradients across ranks
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes

        self._log_wmss_metrics(mode, loss_sum.detach(), stats_sum, n_local, inputs)
        if return_outputs:
            with torch.no_grad():
                outputs = model(**model_inputs)
            return loss, outputs
        return loss

    def _fused_mixed_loss(self, unwrapped, model_inputs, keep, targets):
        mask = targets != -100
        strong_hidden = backbone_of(unwrapped)(**model_inputs).last_hidden_state[:, keep][mask]
        weak_hidden = self._weak_hidden(unwrapped, model_inputs)[:, keep][mask]
        weak = unwrapped if self.weak_model is None else self.accelerator.unwrap_model(self.weak_model)
        loss_sum, stats = mixed_head_loss(
            strong_hidden, lm_head_of(unwrapped), weak_hidden, lm_head_of(weak), targets[mask],
            self.mixing_lambda, self.args.mixing_chunk_size,
        )
        return loss_sum, stats.sum(0), mask.sum()

    def _weak_hidden(self, unwrapped, model_inputs):
        """Final hidden states of the weak model (the adapter-disabled policy under PEFT), without gradients."""
        with torch.no_grad():
            if self.weak_model is None:
                with disable_gradient_checkpointing(unwrapped, self.args.gradient_checkpointing_kwargs):
                    with unwrapped.disable_adapter():
                        return backbone_of(unwrapped)(**model_inputs).last_hidden_state
            weak = self.accelerator.unwrap_model(self.weak_model)
            return self._forward_redirection(
                self.weak_model, weak, lambda m, inputs: backbone_of(m)(**inputs).last_hidden_state, weak, model_inputs
            )

    def _logits_mixed_loss(self, model, unwrapped, model_inputs, keep, targets):
        model_inputs = {**model_inputs, "logits_to_keep": keep}
        strong_logits = model(**model_inputs).logits
        with torch.no_grad():
            if self.weak_model is not None:
                weak_logits = self.weak_model(**model_inputs).logits
            else:
                with disable_gradient_checkpointing(unwrapped, self.args.gradient_checkpointing_kwargs):
                    with unwrapped.disable_adapter():
                        weak_logits = model(**model_inputs).logits
        loss_sum, n_local = mixed_cross_entropy(
            strong_logits, weak_logits, targets, self.mixing_lambda, chunk_size=self.args.mixing_chunk_size
        )
        mask = targets != -100
        safe = targets.masked_fill(~mask, 0)
        chunk = self.args.mixing_chunk_size
        stats = torch.stack(
            [
                (token_nll(strong_logits, safe, chunk) * mask).sum(),
                (token_nll(weak_logits, safe, chunk) * mask).sum(),
                (token_entropy(strong_logits, chunk) * mask).sum(),
                (token_entropy(weak_logits, chunk) * mask).sum(),
            ]
        )
        return loss_sum, stats, n_local

    @torch.no_grad()
    def _log_wmss_metrics(self, mode, loss_sum, stats_sum, n_local, inputs):
        sums = torch.cat([loss_sum.float().view(1), stats_sum.float(), n_local.float().view(1)])
        sums = self.accelerator.reduce(sums, reduction="sum")  # global sums, so every rank logs the same value
        n = sums[-1].clamp(min=1)
        for name, value in zip(("mixed_loss", "strong_nll", "weak_nll", "strong_entropy", "weak_entropy"), sums[:-1]):
            self._metrics[mode][f"wmss/{name}"].append((value / n).item())
        if mode == "train" and "attention_mask" in inputs:  # like SFTTrainer's `num_tokens`
            self._total_train_tokens += self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
