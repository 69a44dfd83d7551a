"""The refusals of the WD-JT SFT trainer: what its own loss (WD-JT, or plain SFT with ``saturation_metrics=True``)
and the co-trained weak model do not handle, each named with its fix, before any model loads where possible."""

from __future__ import annotations

import copy

from datasets import Dataset

from ..mixing import plain_lm_head
from ..weak import is_peft_model, lm_head_of
from .config import WMSSSFTConfig


def check_peft_base_as_weak(model, named: dict, weak_given: bool) -> None:
    """Refuse ``peft_base_as_weak=True`` without a PEFT policy, or together with a weak model."""
    if not (is_peft_model(model) or named.get("peft_config") is not None):
        raise ValueError(
            "peft_base_as_weak=True needs a PEFT policy (a PeftModel, or peft_config=...): it uses the policy "
            "with its adapters disabled as the weak model. Pass a peft_config, or a weak model instead "
            "(weak_model= or weak_model_name_or_path) and peft_base_as_weak=False."
        )
    if weak_given:
        raise ValueError(
            "peft_base_as_weak=True and a weak model are both given; pick one: the adapter-disabled PEFT base "
            "(drop weak_model / weak_model_name_or_path) or the weak checkpoint (peft_base_as_weak=False)."
        )


def peft_wrapped_head(model) -> bool:
    """True when PEFT wraps the model's LM head (LoRA on ``lm_head``, ``modules_to_save=["lm_head"]``): its
    ``.weight`` is then not what the head computes (the LoRA delta is missing; a saved module's trained copy stays
    on with the adapters disabled), so the fused loss, which reads the weights, must not be used."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    return isinstance(lm_head_of(model), (BaseTunerLayer, ModulesToSaveWrapper))


def own_loss_reason(args: WMSSSFTConfig, use_mixing: bool) -> tuple[str, str, str]:
    """Why wmss_trl computes the loss itself (the WD-JT loss, or plain SFT with ``saturation_metrics=True``), that
    loss's name, and how to turn it off: the parts of every refusal of a set-up that loss does not handle."""
    if use_mixing:
        off = "or set mixing_lambda=1.0 (TRL's SFT loss; the weak model is then not used)"
        return f"mixing_lambda={args.mixing_lambda} < 1", "the WD-JT loss", off
    off = "or set saturation_metrics=False (TRL's SFTTrainer, unchanged)"
    return "saturation_metrics=True", "the loss that logs the diagnostics (wmss_trl's fused head)", off


def check_co_training(model, args: WMSSSFTConfig, named: dict, weak_given: bool) -> None:
    """Refuse, before anything loads, what ``train_weak_model=True`` does not handle (the config refuses
    ``peft_base_as_weak`` and ``mixing_lambda=1``)."""
    if not weak_given:
        raise ValueError(
            "train_weak_model=True needs a weak model to train: pass weak_model= or weak_model_name_or_path, or set "
            "train_weak_model=False."
        )
    if is_peft_model(model) or named.get("peft_config") is not None:
        raise ValueError(
            "train_weak_model=True is not supported with a PEFT policy (the co-trained weak model would be frozen by "
            "PEFT and saved with the adapters). Train the policy without peft_config, or set train_weak_model=False."
        )
    optimizers = named.get("optimizers")
    if named.get("optimizer_cls_and_kwargs") is None and optimizers is not None and optimizers[0] is not None:
        raise ValueError(
            "train_weak_model=True builds the optimizer itself (the weak model's parameters in their own groups), so "
            "a ready optimizer (optimizers=(optimizer, ...)) is not supported: pass optimizer_cls_and_kwargs instead, "
            "or set train_weak_model=False."
        )


def check_mixing_supported(model, args: WMSSSFTConfig, named: dict, use_mixing: bool) -> None:
    """Refuse, before anything loads, what wmss_trl's loss (the WD-JT loss, ``mixing_lambda < 1``, or plain SFT with
    ``saturation_metrics=True``) does not implement.

    Supported: ``loss_type="nll"``, no ``compute_loss_func`` / label smoothing / Liger, PEFT adapters that keep the
    backbone's forward (LoRA-like; not prompt / prefix tuning).
    """
    what, loss, off = own_loss_reason(args, use_mixing)
    if args.loss_type != "nll":
        raise ValueError(
            f"loss_type={args.loss_type!r} is not supported with {what}: {loss} is a plain cross-entropy (of the "
            f"mixed logits with WD-JT), so the only supported loss_type is 'nll'. Set loss_type='nll', {off}."
        )
    if named.get("compute_loss_func") is not None:
        raise ValueError(
            f"compute_loss_func is not supported with {what}: the loss is {loss}. Remove compute_loss_func, {off}."
        )
    if args.label_smoothing_factor > 0:
        raise ValueError(
            f"label_smoothing_factor={args.label_smoothing_factor} is not supported with {what} "
            f"({loss} is not smoothed). Set label_smoothing_factor=0, {off}."
        )
    if args.use_liger_kernel:
        raise ValueError(
            f"use_liger_kernel=True is not supported with {what}: {loss} runs its own "
            f"chunked LM head on the backbone's hidden states. Set use_liger_kernel=False, {off}."
        )
    peft_config = named.get("peft_config")
    if peft_config is None and is_peft_model(model):
        peft_config = model.active_peft_config
    if peft_config is not None and peft_config.is_prompt_learning:
        raise ValueError(
            f"PEFT {type(peft_config).__name__} (prompt learning) is not supported with {what}: {loss} calls the "
            "backbone directly, which skips the virtual tokens. Use an adapter that keeps the backbone's forward "
            f"(e.g. peft.LoraConfig), {off}."
        )


def can_fuse_head(trainer, models) -> bool:
    """Whether the fused loss can run: it reads the LM heads' weights and computes no router loss, so the models'
    own logits are used when a head is PEFT-wrapped (LoRA on lm_head, modules_to_save), has logit scaling or
    soft-capping, or the MoE router loss is on."""
    return plain_lm_head(models[0]) and not trainer.aux_loss_enabled and not any(map(peft_wrapped_head, models))


def check_mixing_setup(trainer):
    """Refuse the set-ups wmss_trl's loss does not handle that are only known once the accelerator exists."""
    what, loss, off = own_loss_reason(trainer.args, trainer.use_mixing)
    config = trainer.accelerator.parallelism_config
    if config is not None and (config.tp_enabled or config.cp_enabled or config.sp_enabled):
        raise ValueError(
            f"tensor, context or sequence parallelism is not supported with {what} ({loss} "
            f"needs every position's full hidden state). Use data parallelism or DeepSpeed ZeRO, {off}."
        )
    if trainer.is_fsdp_enabled:
        raise ValueError(
            f"FSDP is not supported with {what}. Use DeepSpeed ZeRO-2/3 (e.g. "
            f"wmss_trl/accelerate_configs/zero3.yaml) or DDP, {off}."
        )
    if trainer._is_vlm:
        raise ValueError(
            f"vision-language models are not supported with {what} ({loss} runs the text "
            f"backbone only). Train a causal LM, {off}."
        )


def check_trainable_tokens(trainer, raw_dataset):
    """Refuse a prepared training dataset without any trained token (TRL would train on nothing or crash)."""
    dataset = trainer.train_dataset
    if not isinstance(dataset, Dataset) or "labels" not in dataset.column_names:
        return
    if len(dataset) == 0:  # TRL drops the rows that truncation leaves fully masked
        raise truncation_error(trainer, raw_dataset)
    for labels in dataset["labels"]:
        if any(label != -100 for label in labels[1:]):
            return
    raise ValueError(
        "the training dataset has no trainable tokens: every label is masked (-100). Check the completion / "
        "assistant masks (`completion_only_loss`, `assistant_only_loss`, the chat template's generation tags)."
    )


def truncation_error(trainer, raw_dataset) -> ValueError:
    """The error for a dataset that truncation emptied, with the prompt lengths (tokens before the first trained
    token, measured by preparing the rows again without `max_length`)."""
    args = trainer.args
    max_length, untruncated = args.max_length, copy.copy(args)  # a copy: the trainer's own args stay untouched
    untruncated.max_length = None
    full = trainer._prepare_dataset(
        raw_dataset, trainer.processing_class, untruncated, False, trainer._formatting_func, "train"
    )
    prompts = [next((i for i, y in enumerate(labels) if y != -100), len(labels)) for labels in full["labels"]]
    return ValueError(
        f"truncation removed every trainable token: with max_length={max_length} (truncation_mode="
        f"{args.truncation_mode!r}) none of the {len(prompts)} training rows keeps a trained token, so TRL "
        f"dropped them all and the training dataset is empty. The prompts (tokens before the first trained token) "
        f"are {min(prompts)} to {max(prompts)} tokens long. Set max_length above {max(prompts)} (or "
        "max_length=None), or shorten the prompts."
    )
