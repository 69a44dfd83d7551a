"""The WD-JT SFT trainer: TRL's ``SFTTrainer`` with the overrides WD-JT needs, each delegating to one part:
`checks` (refusals), `loss` (the mixed loss and its metrics), `cotrain` (the co-trained weak model), `selection`
(WD-DS, the training sampler); the model card is :mod:`wmss_trl.card`."""

from __future__ import annotations

import inspect
import logging
import os

from transformers import TrainingArguments
from trl import SFTConfig, SFTTrainer
from trl.models.utils import _ForwardRedirection

from ..card import WMSSModelCard
from ..checkpoints import CompleteCheckpointResume
from ..checks import as_wmss_config
from ..data_checks import check_dataset_columns, require_rows
from ..selection import unique_count
from ..weak import check_weak_compatible, prepare_weak_model, require_safetensors, resolve_weak_model
from .checks import (
    can_fuse_head,
    check_co_training,
    check_mixing_setup,
    check_mixing_supported,
    check_peft_base_as_weak,
    check_trainable_tokens,
)
from .config import WMSSSFTConfig
from .cotrain import CoTrainedWeak, check_attachable, check_resume_matches
from .loss import wdjt_loss
from .selection import format_stats, replace_train_dataset_argument, select_train_dataset, weighted_sampler_for


logger = logging.getLogger("wmss_trl.sft")  # the package's name: the one logger docs/sft.md names

_SFT_INIT = inspect.signature(SFTTrainer.__init__)


def _check_before_loading(model, args: WMSSSFTConfig, named: dict, weak_given: bool) -> None:
    """Everything refused from the arguments alone, before TRL loads the model or prepares the data."""
    if isinstance(model, (str, os.PathLike)):
        require_safetensors(model, "policy")
    require_rows(
        named.get("train_dataset"),
        "train_dataset",
        ", so there is nothing to train on. Check the split, "
        "filter or file that produced it, and pass a dataset with at least one row.",
    )
    for which in ("train_dataset", "eval_dataset"):
        check_dataset_columns(
            named.get(which), "sft", name=which, args=args, formatting_func=named.get("formatting_func")
        )
    if args.peft_base_as_weak:
        check_peft_base_as_weak(model, named, weak_given)
    if args.train_weak_model:
        check_co_training(model, args, named, weak_given)


class WMSSSFTTrainer(CompleteCheckpointResume, WMSSModelCard, SFTTrainer):
    """[`~trl.SFTTrainer`] whose loss is cross-entropy on the weak/strong mixed logits (WD-JT).

    Args:
        model, args, ...: as [`~trl.SFTTrainer`] (`args` may also be an `SFTConfig` or `TrainingArguments`).
        weak_model (`PreTrainedModel` or `str`, *optional*):
            The weak model (frozen unless `train_weak_model=True`), or its local folder; overrides
            `args.weak_model_name_or_path`.

    Modes (one info line at construction says which):
        * no weak model and `peft_base_as_weak=False`: TRL's `SFTTrainer`, exactly (WD-DS selection still applies
          when `selection_mode` is set);
        * a weak model and `mixing_lambda == 1`: TRL's `SFTTrainer` too; the weak model is neither loaded nor run;
        * a weak model (or `peft_base_as_weak=True` with PEFT) and `mixing_lambda < 1`: the WD-JT loss. What it does
          not support is refused here (see `checks.check_mixing_supported` and docs/sft.md).

    Logged metrics with `mixing_lambda < 1`: TRL's `entropy`, `mean_token_accuracy` (of the strong model alone),
    `num_tokens` and (MoE) `aux_loss`, and in the namespace `wmss/`: `mixed_loss` (the training loss, per token),
    `strong_nll` (plain SFT loss of the strong model on the same tokens), `weak_nll`, `strong_entropy`,
    `weak_entropy` (nats, per token), and on logged steps the saturation metrics `logit_margin`, `min_margin`,
    `sft_nontarget_grad_norm`, `nontarget_grad_norm`, `weak_topk_grad_share` (docs/sft.md; the first three also in
    plain SFT with `saturation_metrics=True`).
    """

    _wmss_name = "WMSS-SFT"

    def __init__(
        self,
        model,
        args: WMSSSFTConfig | SFTConfig | TrainingArguments | None = None,
        *pargs,
        weak_model=None,
        **kwargs,
    ):
        args = as_wmss_config(args, WMSSSFTConfig, model, "SFT")
        named = _SFT_INIT.bind(self, model, args, *pargs, **kwargs).arguments  # TypeError like SFTTrainer's
        weak_given = weak_model is not None or bool(args.weak_model_name_or_path)
        _check_before_loading(model, args, named, weak_given)
        self.wmss_enabled = weak_given or args.peft_base_as_weak
        self.use_mixing = self.wmss_enabled and args.mixing_lambda < 1.0  # lambda = 1: z_mix = z_strong, TRL's loss
        # the saturation diagnostics; in plain SFT (`saturation_metrics=True`) they need wmss_trl's loss path too
        self.saturation_metrics = self.use_mixing if args.saturation_metrics is None else args.saturation_metrics
        self._own_loss = self.use_mixing or self.saturation_metrics
        if self._own_loss:
            check_mixing_supported(model, args, named, self.use_mixing)

        self.selection_stats = None
        train_dataset = named.get("train_dataset")
        if args.selection_mode is not None:  # WD-DS: select / weight the raw rows before TRL prepares them
            train_dataset, self.selection_stats = select_train_dataset(train_dataset, args)
            pargs, kwargs = replace_train_dataset_argument(pargs, kwargs, train_dataset)
        super().__init__(model, args, *pargs, **kwargs)
        self.mixing_lambda = args.mixing_lambda
        self.weak_model = self._co_trained = None
        weak_source = None
        if self._own_loss:
            check_mixing_setup(self)
            self._forward_redirection = _ForwardRedirection()
            self._fused_head = can_fuse_head(self, [self.accelerator.unwrap_model(self.model)])
        if self.use_mixing:
            weak_source = self._set_up_weak_model(weak_model)
        check_trainable_tokens(self, train_dataset)
        self._log_selection()
        self._log_mode(weak_source)

    def _set_up_weak_model(self, weak_model) -> str:
        """Load and prepare the weak model (`self.weak_model`: None for the adapter-disabled PEFT base; frozen, or
        co-trained as the policy's submodule) and choose the loss path for both models; returns where it came from."""
        args = self.args
        weak, weak_path = resolve_weak_model(
            weak_model, args.weak_model_name_or_path, args.weak_model_init_kwargs, self.model
        )
        if weak is None:  # `self.weak_model` None: the policy, adapters disabled
            return "the adapter-disabled PEFT base"
        check_weak_compatible(self.model, weak, self.processing_class, weak_path)
        if args.train_weak_model:
            check_attachable(self, weak)
            lr = args.weak_learning_rate if args.weak_learning_rate is not None else args.learning_rate
            self._co_trained = CoTrainedWeak(self.model, weak, lr)
            self.weak_model = weak
        else:
            self.weak_model = prepare_weak_model(weak, self.accelerator, self.is_deepspeed_enabled)
        unwrap = self.accelerator.unwrap_model
        self._fused_head = can_fuse_head(self, [unwrap(self.model), unwrap(self.weak_model)])
        return weak_path or f"a loaded {type(weak).__name__}"

    # ---- the overrides of TRL's SFTTrainer / transformers' Trainer ------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._own_loss:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return wdjt_loss(self, model, inputs, return_outputs, num_items_in_batch)

    def _get_train_sampler(self, train_dataset=None):
        if self.args.selection_mode == "weighted_sampler":
            # `self.train_dataset` still has the weight column (the dataloader's copy has it removed)
            return weighted_sampler_for(self.train_dataset, self.args)
        return super()._get_train_sampler(train_dataset)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Trainer's train; a co-trained weak model is the policy's submodule only until it returns (`cotrain`)."""
        if self._co_trained is None:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        with self._co_trained.attached_while_training():
            return super().train(resume_from_checkpoint, *args, **kwargs)

    def create_optimizer(self, model=None):
        """Trainer's optimizer; a co-trained weak model's parameters in groups of their own, and its weights in the
        optimizer's state dict, so that checkpoints hold them (outside DeepSpeed, whose engine states do; `cotrain`)."""
        built = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if built and self._co_trained is not None:
            self._co_trained.split_param_groups(optimizer)
            if not self.is_deepspeed_enabled:
                self._co_trained.keep_in_optimizer_state(optimizer)
        return optimizer

    # ---- `CompleteCheckpointResume`'s hook (ours, not TRL's) -------------------------------------------------------

    def check_resume_checkpoint(self, checkpoint: str) -> None:
        """`CompleteCheckpointResume`'s check: a checkpoint written with the other `train_weak_model` setting is
        refused (under DeepSpeed the engine's strict load refuses it)."""
        if not self.is_deepspeed_enabled:
            check_resume_matches(checkpoint, self.args.train_weak_model)

    # ---- the log lines ---------------------------------------------------------------------------------------

    def _log_mode(self, weak_source: str | None):
        """One log line: which of the three modes this trainer is in (a warning when WMSS is inactive)."""
        args = self.args
        if self._own_loss and not self.use_mixing:
            message = (
                "WMSS mixing off (no weak model, or mixing_lambda=1.0): the loss is plain SFT cross-entropy, computed "
                "by wmss_trl's fused head instead of TRL's so that it logs the saturation metrics "
                "(saturation_metrics=True: wmss/logit_margin, wmss/min_margin, wmss/sft_nontarget_grad_norm). Set "
                "saturation_metrics=False for TRL's SFTTrainer, unchanged."
            )
        elif not self.wmss_enabled:
            selection = ""
            if args.selection_mode is not None:
                selection = f" WD-DS selection (selection_mode={args.selection_mode!r}) still applies."
            message = (
                "WMSS inactive: no weak model given, so this is TRL's SFTTrainer (its loss for every loss_type, its "
                f"metrics); mixing_lambda={args.mixing_lambda} has no effect.{selection} Pass weak_model= or "
                "weak_model_name_or_path (or peft_base_as_weak=True with PEFT) to enable it."
            )
        elif not self.use_mixing:
            message = (
                "WMSS mixing off: mixing_lambda=1.0 makes the loss TRL's SFT loss (z_mix = z_strong), so the weak "
                "model is neither loaded nor run. Set mixing_lambda < 1 (the paper uses 0.5) to mix it in."
            )
        else:
            message = (
                f"WMSS WD-JT active: the loss is the cross-entropy of z_mix = {args.mixing_lambda} * z_strong + "
                f"{1 - args.mixing_lambda:g} * z_weak, weak model: {weak_source}."
            )
        if self.accelerator.is_main_process:
            (logger.info if self.wmss_enabled or self._own_loss else logger.warning)(message)

    def _log_selection(self):
        """Record how many distinct samples WD-DS selection trains on (`selection_stats`, metric `wmss/unique_samples`)."""
        stats = self.selection_stats
        if stats is None:
            return
        if stats["mode"] == "weighted_sampler":  # redrawn each epoch; report epoch 0's draw
            stats["unique_samples"] = unique_count(weighted_sampler_for(self.train_dataset, self.args).indices(0))
        self._metrics["train"]["wmss/unique_samples"].append(float(stats["unique_samples"]))
        self.accelerator.print(f"WD-DS selection: {format_stats(stats)}")
