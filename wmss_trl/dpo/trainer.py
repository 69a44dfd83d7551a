"""[`WMSSDPOTrainer`]: TRL's `DPOTrainer` with the weak checkpoint as reference; the overrides only."""

from __future__ import annotations

import logging

import torch
from datasets import Dataset
from trl import DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import add_fused_lm_head, hash_module

from ..card import WMSSModelCard
from ..checkpoints import CompleteCheckpointResume
from ..checks import as_wmss_config
from ..entropy import token_entropy, token_nll, trained_positions
from ..trl_compat import dpo_reference_from_inputs
from ..weak import (
    check_weak_compatible,
    freeze,
    resolve_weak_model,
    weak_forward_context,
)
from .config import _NON_MODEL_KEYS, WMSSDPOConfig
from .data import _report_truncation_drops, _require_pairs, check_before_loading, handle_identical_pairs
from .policy import _scatter_columns, _WeakOutputs, _WMSSPolicy, sequence_logps


logger = logging.getLogger(__package__)


# ----------------------------------------------------------------------------------------------------------------
# The trainer


class WMSSDPOTrainer(CompleteCheckpointResume, WMSSModelCard, DPOTrainer):
    """[`~trl.DPOTrainer`] whose reference model is the weak checkpoint, with optional WD-JT and entropy-gap weights.

    Args:
        model, ref_model, args, ...: as [`~trl.DPOTrainer`]. `ref_model`, if given, is the weak model.
        weak_model (`PreTrainedModel` or `str`, *optional*):
            The weak model or its local folder; overrides `args.weak_model_name_or_path`. With a PEFT policy and
            `args.peft_base_as_weak=True`, the same network with adapters disabled is the weak model (no second copy).

    With no weak model and `peft_base_as_weak=False`, WMSS is inactive and this is TRL's `DPOTrainer` exactly (its
    default reference, losses, metrics and input checks); `mixing_lambda < 1` and `entropy_pair_weights` are then
    refused. Every TRL `loss_type` works (the sorting `aot` losses not with `entropy_pair_weights`), and so does
    `precompute_ref_log_probs` (the weak log-probs are then cached; WD-JT and pair weights still run a weak forward
    per batch, for the logits and entropies).
    """

    _wmss_name = "WMSS-DPO"

    def __init__(
        self,
        model,
        ref_model=None,
        args: WMSSDPOConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        *,
        weak_model=None,
    ):
        args = as_wmss_config(args, WMSSDPOConfig, model, "DPO")
        if ref_model is not None:
            if weak_model is not None and weak_model is not ref_model:
                raise ValueError("pass the weak model once: as `weak_model=` (or `ref_model=`, which means the same).")
            weak_model = ref_model
        has_weak = check_before_loading(args, model, weak_model, peft_config, train_dataset, eval_dataset)
        self.wmss_enabled = has_weak or args.peft_base_as_weak
        self.identical_pairs_dropped: dict[str, int] = {}
        weak = self._resolve_weak(weak_model, args, model, processing_class) if has_weak else None
        super().__init__(
            model,
            ref_model=weak,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        self._check_weak_once()
        self._setup_wmss(has_weak)

    def _resolve_weak(self, weak_model, args: WMSSDPOConfig, model, processing_class):
        """The weak model, loaded if given as a path, frozen, and checked against the policy now if the processing
        class is known, else once TRL has loaded it (:meth:`_check_weak_once`)."""
        weak, weak_path = resolve_weak_model(
            weak_model, args.weak_model_name_or_path, args.weak_model_init_kwargs, model
        )
        freeze(weak)
        if processing_class is not None:  # before the policy loads
            check_weak_compatible(model, weak, processing_class, weak_path)
        else:  # once TRL has loaded its processing class, before the first weak forward (precompute or training)
            self._weak_to_check = (weak, weak_path)
        return weak

    def _setup_wmss(self, has_weak: bool) -> None:
        """After TRL's ``__init__``: the weak model (TRL's reference), the mode's log line, the WD-JT / pair-weight
        switches and the fused head's entropy output they need."""
        args = self.args
        self.weak_model = self.ref_model if has_weak else None  # None: the PEFT policy with adapters disabled, or off
        if args.peft_base_as_weak:
            self._drop_ref_adapter()
        elif not has_weak and self.accelerator.is_main_process:
            logger.warning(
                "WMSS inactive: no weak model given, so this is TRL's DPOTrainer. Pass weak_model= or "
                "weak_model_name_or_path (or peft_base_as_weak=True with PEFT) to enable it."
            )
        self.mixing_lambda = args.mixing_lambda
        self._wmss_active = args.mixing_lambda < 1.0 or args.entropy_pair_weights
        if args.entropy_pair_weights and args.mixing_lambda == 1.0 and self.ref_model is not None:
            # The weak forward reads its entropy from TRL's fused LM head: add it to the outputs (outermost patch)
            add_fused_lm_head(getattr(self.ref_model, "module", self.ref_model), outputs=("log_probs", "entropy"))

    def _check_weak_once(self):
        """Vocabulary and tokenizer of the weak model against the policy and the processing class TRL loaded."""
        pending = self.__dict__.pop("_weak_to_check", None)
        if pending is not None:
            weak, weak_path = pending
            check_weak_compatible(self.model, weak, self.processing_class, weak_path)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        self._check_weak_once()  # TRL's precompute is the first weak forward
        if self.args.peft_base_as_weak:
            self._drop_ref_adapter()  # TRL's __init__ precomputes before it returns: the reference is the base
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _drop_ref_adapter(self):
        """Reference = adapters disabled: remove the frozen copy of the adapter ("ref") that TRL adds to a PeftModel
        (TRL then disables the adapters for the reference), and re-key TRL's precompute cache to the model without it,
        so a cache of log-probs against that copy is not reused."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        if "ref" in unwrapped.peft_config:
            unwrapped.delete_adapter("ref")
            if self.args.precompute_ref_log_probs:
                self._precompute_model_hash = hash_module(self.model)

    # -- data ------------------------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        _require_pairs(dataset, dataset_name)
        rows_before = len(dataset) if isinstance(dataset, Dataset) else None
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if rows_before is not None:
            _report_truncation_drops(rows_before, len(dataset), args, dataset_name)
        dataset, dropped = handle_identical_pairs(dataset, args, dataset_name, self.wmss_enabled)
        if dropped is not None:
            self.identical_pairs_dropped[dataset_name] = dropped
        return dataset

    # -- loss ------------------------------------------------------------------------------------------------------

    def _weak_forward(self, model_kwargs: dict, labels: torch.Tensor) -> _WeakOutputs:
        """One no-grad forward of the weak model on the [chosen; rejected] batch: full logits at the completion
        positions with WD-JT, else TRL's fused log-probs and entropies."""
        with (
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            weak_forward_context(self.ref_model, self.model) as weak,
        ):
            if self.mixing_lambda < 1.0:
                keep, targets = trained_positions(labels)
                logits = weak(**model_kwargs, logits_to_keep=keep).logits
                mask = targets != -100
                chunk = self.args.mixing_chunk_size
                width = labels.shape[1] - 1
                per_token = _scatter_columns(-token_nll(logits, targets.clamp(min=0), chunk) * mask, keep, width)
                entropy = None
                if self.args.entropy_pair_weights:
                    entropy = _scatter_columns(token_entropy(logits, chunk) * mask, keep, width)
                return _WeakOutputs(per_token, entropy, logits, keep)
            out = weak(**model_kwargs, labels=labels, fused_lm_head=True)
            if self.args.entropy_pair_weights and out.entropy is None:
                raise RuntimeError("internal error: the weak model's fused LM head does not return entropies.")
            seq_len = labels.shape[1] - 1
            entropy = None if out.entropy is None else out.entropy[:, -seq_len:]
            return _WeakOutputs(out.log_probs[:, -seq_len:], entropy, None, None)

    def _compute_loss(self, model, inputs, return_outputs):
        if not self._wmss_active:
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        completion_mask = inputs["completion_mask"]
        shift_mask = completion_mask[:, 1:]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        weak = self._weak_forward(model_kwargs, labels)

        inputs = dict(inputs)
        if not self.precompute_ref_logps:
            ref = sequence_logps(weak.per_token_logps, shift_mask, self.ld_alpha)
            inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = ref.chunk(2, dim=0)
        policy = _WMSSPolicy(model, self, weak, shift_mask)
        # Hand the weak log-probs to DPOTrainer through its own precomputed-reference input path (no second forward)
        with dpo_reference_from_inputs(self):
            result = super()._compute_loss(policy, inputs, return_outputs)
        self._log_wmss_metrics(mode, weak, policy, shift_mask)
        return result

    @torch.no_grad()
    def _log_wmss_metrics(self, mode, weak: _WeakOutputs, policy: _WMSSPolicy, shift_mask):
        metrics = self._metrics[mode]
        gather = self.accelerator.gather
        weak_chosen, weak_rejected = sequence_logps(weak.per_token_logps.float(), shift_mask).chunk(2, dim=0)
        metrics["wmss/weak_logps/chosen"].append(gather(weak_chosen).mean().item())
        metrics["wmss/weak_logps/rejected"].append(gather(weak_rejected).mean().item())
        if "strong_logps" in policy.stats:
            strong_chosen, strong_rejected = policy.stats["strong_logps"].chunk(2, dim=0)
            metrics["wmss/strong_logps/chosen"].append(gather(strong_chosen).mean().item())
            metrics["wmss/strong_logps/rejected"].append(gather(strong_rejected).mean().item())
        if "weights" in policy.stats:
            w = gather(policy.stats["weights"])
            h_weak, h_strong = gather(policy.stats["h_weak"]), gather(policy.stats["h_strong"])
            metrics["wmss/weak_entropy/rejected"].append(h_weak.mean().item())
            metrics["wmss/strong_entropy/rejected"].append(h_strong.mean().item())
            metrics["wmss/entropy_gap/rejected"].append((h_strong - h_weak).mean().item())
            metrics["wmss/pair_weight/min"].append(w.min().item())
            metrics["wmss/pair_weight/max"].append(w.max().item())
            metrics["wmss/pair_weight/std"].append(w.std(unbiased=False).item())
