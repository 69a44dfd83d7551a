"""WD-JT (Weak-Driven Joint Training) as a drop-in TRL ``SFTTrainer``.

With a weak model (a frozen earlier checkpoint of the same model, or the adapter-disabled PEFT base with
``peft_base_as_weak=True``) and ``0 < lam < 1``, the loss is cross-entropy of the labels under the mixed logits:

    z_mix = lam * z_strong + (1 - lam) * z_weak,      L = -sum_t log softmax(z_mix)_t[y_t] / N_tokens

on exactly the tokens TRL's SFT trains (completion-only / assistant-only masks honoured); for an MoE policy,
SFTTrainer's router load-balancing term ``router_aux_loss_coef * aux_loss`` is added to L. Only the strong model is
trained and saved; the weak model is never part of a checkpoint, so inference is unchanged.

Without a weak model, or with ``lam = 1`` (where z_mix = z_strong), the trainer is TRL's ``SFTTrainer``: its
``compute_loss`` (every ``loss_type``, ``compute_loss_func``, the MoE auxiliary loss, PEFT prompt learning) and its
metrics; a weak model is then neither loaded nor run. docs/sft.md lists what ``lam < 1`` supports.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model
from transformers import TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import SAFE_WEIGHTS_NAME
from trl import SFTConfig, SFTTrainer
from trl.models.utils import _ForwardRedirection, disable_gradient_checkpointing
from trl.trainer.utils import get_config_model_id

from .checkpoints import CompleteCheckpointResume
from .checks import as_wmss_config, check_float, check_int, check_shares
from .data_checks import check_dataset_columns, require_rows
from .entropy import trained_positions
from .mixing import (
    DEFAULT_CHUNK_SIZE,
    DIAGNOSTIC_NAMES,
    STAT_NAMES,
    logits_stats,
    mixed_cross_entropy,
    mixed_head_loss,
    plain_lm_head,
)
from .selection import (
    check_selection_config,
    format_stats,
    replace_train_dataset_argument,
    select_train_dataset,
    unique_count,
    weighted_sampler_for,
)
from .weak import (
    backbone_of,
    check_weak_compatible,
    is_peft_model,
    lm_head_of,
    prepare_weak_model,
    require_safetensors,
    resolve_weak_model,
)


logger = logging.getLogger(__name__)

# the co-trained weak model: its name as a submodule of the policy, and its folder in a checkpoint
WEAK_MODULE = "wmss_weak_model"
WEAK_CHECKPOINT_FOLDER = "weak_model"

WMSS_PAPER = {
    "title": "Weak-Driven Learning: How Weak Agents Make Strong Agents Stronger",
    "id": "2602.08222",
    "citation": "@article{chen2026weakdriven, title={Weak-Driven Learning: How Weak Agents Make Strong Agents "
    "Stronger}, author={Chen, Zehao and Li, Gongxun and Ai, Tianxiang and others}, journal={arXiv preprint "
    "arXiv:2602.08222}, year={2026}}",
}


class WMSSModelCard:
    """TRL's model card (`create_model_card`: written with each checkpoint, and by the `wmss` commands at the end),
    naming the WMSS run as TRL's cards name their method.

    WMSS active (`wmss_enabled`): method `_wmss_name`, the WMSS paper (`WMSS_PAPER`), tag `wmss`, the base model (a
    local folder too, which TRL's template renders as "[None]"; the quick start then loads `output_dir`), the TRL
    method and its paper, the weak model and every WMSS setting of the config.
    WMSS inactive: TRL's card, exactly, plus one line saying so.
    """

    _wmss_name = "WMSS"

    @property
    def _card_as_wmss(self) -> bool:
        return getattr(self, "wmss_enabled", False)

    @property
    def _trl_name(self) -> str:
        """The name of the TRL trainer this one extends (the class after this mixin in the MRO), e.g. `SFTTrainer`."""
        mro = type(self).__mro__
        return mro[mro.index(WMSSModelCard) + 1].__name__

    @property
    def _name(self):
        return self._wmss_name if self._card_as_wmss else super()._name

    @property
    def _paper(self):
        return WMSS_PAPER if self._card_as_wmss else super()._paper

    @property
    def _tag_names(self):
        return [*super()._tag_names, "wmss"] if self._card_as_wmss else super()._tag_names

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if not self.is_world_process_zero():
            return
        path = os.path.join(self.args.output_dir, "README.md")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if self._card_as_wmss:
            base = get_config_model_id(self.model.config)
            if base and os.path.isdir(base):  # TRL names hub models only: "fine-tuned version of [None](...)"
                text = text.replace("[None](https://huggingface.co/None)", f"`{base}` (local folder)", 1)
            if self.hub_model_id is None:  # TRL's quick start would load model="None"
                text = text.replace('model="None"', f'model="{self.args.output_dir}"', 1)
            text = _insert_before(text, "### Framework versions", self._wmss_card_section(base))
        else:
            line = (
                f"WMSS was inactive in this run (no weak model given): it was trained by TRL's "
                f"{self._trl_name}, unchanged, through wmss_trl.\n"
            )
            text = _insert_before(text, "## Quick start", line + "\n")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)

    def _wmss_card_section(self, base: str) -> str:
        """The card's WMSS section: base and weak model, and the WMSS fields of the config (those declared by
        wmss_trl's config classes) with their values."""
        args = self.args
        names = [
            name
            for cls in reversed(type(args).__mro__)
            if cls.__module__.startswith("wmss_trl")
            for name in cls.__dict__.get("__annotations__", {})
            if name != "weak_model_name_or_path"
        ]
        weak = getattr(self, "weak_model", None)
        if getattr(args, "peft_base_as_weak", False):
            weak_text = "the base model with its PEFT adapters disabled (`peft_base_as_weak=True`)"
        elif weak is not None:
            weak_text = f"`{get_config_model_id(self.accelerator.unwrap_model(weak).config)}`"
        elif args.weak_model_name_or_path:
            weak_text = f"`{args.weak_model_name_or_path}` (given; not loaded, this configuration does not use it)"
        else:
            weak_text = "given as a model object; not loaded, this configuration does not use it"
        trl_paper = super()._paper
        built_on = f" ([{trl_paper['title']}](https://huggingface.co/papers/{trl_paper['id']}))" if trl_paper else ""
        lines = [
            "### WMSS (Weak-Driven Learning)",
            "",
            f"{self._wmss_name} (arXiv:{WMSS_PAPER['id']}) is TRL's {self._trl_name}{built_on} with a weak model, "
            "trained with wmss_trl:",
            "",
            f"- Base (strong) model: `{base}`",
            f"- Weak model: {weak_text}",
            *(f"- `{name}`: `{getattr(args, name)!r}`" for name in names),
        ]
        return "\n".join(lines) + "\n\n"


def _insert_before(text: str, anchor: str, insert: str) -> str:
    """``text`` with ``insert`` placed before the first line starting with ``anchor`` (appended when there is none)."""
    at = text.find("\n" + anchor)
    return text + "\n" + insert if at < 0 else text[: at + 1] + insert + text[at + 1 :]


@dataclass
class WMSSSFTConfig(SFTConfig):
    r"""
    Configuration for [`WMSSSFTTrainer`]: everything of [`~trl.SFTConfig`], plus the weak model and the mixing weight.

    Parameters:
        weak_model_name_or_path (`str`, *optional*):
            Local folder of the weak checkpoint (an earlier checkpoint of the same model, same tokenizer). Overridden
            by the trainer's `weak_model` argument. Without a weak model (and `peft_base_as_weak=False`) the trainer
            is TRL's `SFTTrainer`.
        weak_model_init_kwargs (`dict` or `str`, *optional*):
            Keyword arguments for `from_pretrained` of the weak model (dict or JSON string), e.g. `{"dtype": "bfloat16"}`.
        peft_base_as_weak (`bool`, defaults to `False`):
            With a PEFT policy (a `PeftModel` or `peft_config`) and no weak model, use the policy with its adapters
            disabled as the weak model (no second copy of the weights). Off by default: a `peft_config` alone is plain
            TRL SFT.
        mixing_lambda (`float`, defaults to `0.5`):
            Weight of the strong logits: z_mix = lambda * z_strong + (1 - lambda) * z_weak. Must satisfy
            0 < lambda <= 1; 1.0 is plain SFT (TRL's loss; the weak model is then not loaded). 0.5 is the official
            code's value (paper's sweet spot 0.42-0.48). No effect without a weak model.
        mixing_chunk_size (`int`, defaults to `256`):
            Positions per chunk of the fp32 mixed cross-entropy (bounds its memory).
        train_weak_model (`bool`, defaults to `False`):
            Co-train the weak model (the official code's default, `freeze=false`): the same mixed loss trains it, with
            the gradient (1 - lambda) * (p_mix - onehot(y)) on its logits, in the same optimizer (its own parameter
            group, learning rate `weak_learning_rate`) and sharded like the policy under DeepSpeed ZeRO. Only the
            strong model is saved by `save_model` and as a checkpoint's model weights; a checkpoint keeps the weak
            model's state for resuming (`checkpoint-N/weak_model/model.safetensors`, or DeepSpeed's own states).
            Needs a separate weak model (not `peft_base_as_weak`) and `mixing_lambda < 1`. Off: the weak model is
            frozen (the paper's v2 text).
        weak_learning_rate (`float`, *optional*):
            Learning rate of the co-trained weak model (same schedule as the policy's). Defaults to `learning_rate`.
        saturation_metrics (`bool`, *optional*):
            Log the saturation and mechanism diagnostics on the trained tokens at each logging step (docs/sft.md):
            `wmss/logit_margin`, `wmss/min_margin`, `wmss/sft_nontarget_grad_norm` and, with the WD-JT loss,
            `wmss/nontarget_grad_norm` and `wmss/weak_topk_grad_share`. `None`: on when the WD-JT loss runs (a weak
            model and `mixing_lambda < 1`). `True`: also in plain SFT (the first three); this is a WMSS option, so the
            trainer is then not TRL's `SFTTrainer` exactly (the same cross-entropy, computed by wmss_trl's fused
            head; `loss_type="nll"` only). `False`: off.

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
        metadata={
            "help": "Local folder of the weak checkpoint (earlier checkpoint of the same model). Without a "
            "weak model (and peft_base_as_weak=False) the trainer is TRL's SFTTrainer."
        },
    )
    weak_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for from_pretrained of the weak model, as a dict or a JSON string."},
    )
    peft_base_as_weak: bool = field(
        default=False,
        metadata={
            "help": "With a PEFT policy (a PeftModel or peft_config) and no weak model, use the policy with its "
            "adapters disabled as the weak model (no second copy of the weights). Off: a peft_config alone is "
            "plain TRL SFT."
        },
    )
    mixing_lambda: float = field(
        default=0.5,
        metadata={
            "help": "Weight of the strong logits in z_mix = lambda*z_strong + (1-lambda)*z_weak; "
            "0 < lambda <= 1, 1.0 is plain SFT (TRL's loss). No effect without a weak model."
        },
    )
    mixing_chunk_size: int = field(
        default=DEFAULT_CHUNK_SIZE,
        metadata={"help": "Positions per chunk of the fp32 mixed cross-entropy (memory: chunk x vocab floats)."},
    )
    train_weak_model: bool = field(
        default=False,
        metadata={
            "help": "Co-train the weak model (the official code's freeze=false): the same mixed loss trains it "
            "(gradient (1-lambda)*(p_mix - onehot) on its logits), in the same optimizer with its own learning rate "
            "(weak_learning_rate), sharded like the policy under ZeRO. Only the strong model is saved; checkpoints "
            "keep the weak one for resuming. Needs a separate weak model and mixing_lambda < 1."
        },
    )
    weak_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the co-trained weak model (train_weak_model=True); default learning_rate."
        },
    )
    saturation_metrics: bool | None = field(
        default=None,
        metadata={
            "help": "Log the saturation/mechanism diagnostics (wmss/logit_margin, wmss/min_margin, "
            "wmss/sft_nontarget_grad_norm; with WD-JT also wmss/nontarget_grad_norm, wmss/weak_topk_grad_share) at "
            "each logging step. None: on when the WD-JT loss runs (a weak model and mixing_lambda < 1). True: also "
            "in plain SFT, which makes it a WMSS option (the trainer is then not TRL's SFTTrainer exactly: same "
            "cross-entropy, computed by wmss_trl's fused head, loss_type='nll' only). False: off."
        },
    )

    # WD-DS selection
    selection_mode: str | None = field(
        default=None,
        metadata={
            "help": "WD-DS data selection: None (off), 'resample' (official: N*multiplier draws with "
            "replacement), 'weighted_sampler' (redrawn each epoch) or 'top_fraction'.",
            "choices": [None, "resample", "weighted_sampler", "top_fraction"],
        },
    )
    entropy_files: list[str] | None = field(
        default=None,
        metadata={
            "help": "Entropy file(s) written by `wmss entropy` (joined on idx) with the weak and strong "
            "per-sample entropies; must cover every training row."
        },
    )
    weak_entropy_column: str = field(default="entropy_0", metadata={"help": "Column of H0, the weak model's entropy."})
    strong_entropy_column: str = field(
        default="entropy_1", metadata={"help": "Column of H1, the strong model's entropy."}
    )
    selection_alpha: float = field(default=0.1, metadata={"help": "WD-DS share for base difficulty (H0)."})
    selection_beta: float = field(default=0.8, metadata={"help": "WD-DS share for entropy drops (H1 < H0)."})
    selection_gamma: float = field(default=0.1, metadata={"help": "WD-DS share for entropy rises (H1 > H0)."})
    selection_multiplier: float = field(
        default=1.0,
        metadata={"help": "Draws per epoch as a multiple of the dataset size (resample, weighted_sampler)."},
    )
    selection_fraction: float = field(default=0.5, metadata={"help": "Fraction of rows kept by top_fraction."})
    selection_seed: int = field(default=42, metadata={"help": "Seed of the WD-DS draws."})

    def __post_init__(self):
        # every numeric WMSS field, converted (YAML / JSON may give strings) and stored back, before anything uses it
        self.mixing_lambda = check_float(
            "mixing_lambda",
            self.mixing_lambda,
            low=0.0,
            low_open=True,
            high=1.0,
            hint="It is the weight of the STRONG logits: 1.0 is plain SFT, the paper's default is 0.5.",
        )
        self.mixing_chunk_size = check_int(
            "mixing_chunk_size", self.mixing_chunk_size, low=1, hint="It is the number of positions per loss chunk."
        )
        if self.weak_learning_rate is not None:
            if not self.train_weak_model:
                raise ValueError(
                    f"weak_learning_rate={self.weak_learning_rate} is set but train_weak_model=False: it is the "
                    "learning rate of the co-trained weak model. Set train_weak_model=True, or drop weak_learning_rate."
                )
            self.weak_learning_rate = check_float(
                "weak_learning_rate",
                self.weak_learning_rate,
                low=0.0,
                low_open=True,
                hint="It is the co-trained weak model's learning rate (train_weak_model=False freezes it).",
            )
        if self.train_weak_model:
            if self.peft_base_as_weak:
                raise ValueError(
                    "train_weak_model=True cannot train the adapter-disabled PEFT base (peft_base_as_weak=True): that "
                    "weak model is the policy's own frozen base weights. Pass a separate weak checkpoint (weak_model= "
                    "or weak_model_name_or_path, with peft_base_as_weak=False), or set train_weak_model=False."
                )
            if self.mixing_lambda == 1.0:
                raise ValueError(
                    "train_weak_model=True with mixing_lambda=1.0: the loss is then plain SFT, the weak model gets "
                    "no gradient ((1 - lambda) = 0) and is not even loaded. Set mixing_lambda < 1 (the official code "
                    "uses 0.5), or train_weak_model=False."
                )
        self.selection_alpha, self.selection_beta, self.selection_gamma = check_shares(
            ("selection_alpha", "selection_beta", "selection_gamma"),
            (self.selection_alpha, self.selection_beta, self.selection_gamma),
            need_positive_sum=self.selection_mode is not None,
        )
        self.selection_multiplier = check_float(
            "selection_multiplier",
            self.selection_multiplier,
            low=0.0,
            low_open=True,
            hint="It is the number of draws per epoch as a multiple of the dataset size.",
        )
        self.selection_fraction = check_float(
            "selection_fraction",
            self.selection_fraction,
            low=0.0,
            low_open=True,
            high=1.0,
            hint="It is the fraction of rows top_fraction keeps.",
        )
        self.selection_seed = check_int("selection_seed", self.selection_seed, low=0, hint="numpy seeds are >= 0.")
        check_selection_config(self)
        super().__post_init__()


_SFT_INIT = inspect.signature(SFTTrainer.__init__)


def _peft_wrapped_head(model) -> bool:
    """True when PEFT wraps the model's LM head (LoRA on ``lm_head``, ``modules_to_save=["lm_head"]``): its
    ``.weight`` is then not what the head computes (the LoRA delta is missing; a saved module's trained copy stays
    on with the adapters disabled), so the fused loss, which reads the weights, must not be used."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    return isinstance(lm_head_of(model), (BaseTunerLayer, ModulesToSaveWrapper))


def _own_loss_reason(args: WMSSSFTConfig, use_mixing: bool) -> tuple[str, str, str]:
    """Why wmss_trl computes the loss itself (the WD-JT loss, or plain SFT with ``saturation_metrics=True``), that
    loss's name, and how to turn it off: the parts of every refusal of a set-up that loss does not handle."""
    if use_mixing:
        off = "or set mixing_lambda=1.0 (TRL's SFT loss; the weak model is then not used)"
        return f"mixing_lambda={args.mixing_lambda} < 1", "the WD-JT loss", off
    off = "or set saturation_metrics=False (TRL's SFTTrainer, unchanged)"
    return "saturation_metrics=True", "the loss that logs the diagnostics (wmss_trl's fused head)", off


def _check_co_training(model, args: WMSSSFTConfig, named: dict, weak_given: bool) -> None:
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


def _check_mixing_supported(model, args: WMSSSFTConfig, named: dict, use_mixing: bool) -> None:
    """Refuse, before anything loads, what wmss_trl's loss (the WD-JT loss, ``mixing_lambda < 1``, or plain SFT with
    ``saturation_metrics=True``) does not implement.

    Supported: ``loss_type="nll"``, no ``compute_loss_func`` / label smoothing / Liger, PEFT adapters that keep the
    backbone's forward (LoRA-like; not prompt / prefix tuning).
    """
    what, loss, off = _own_loss_reason(args, use_mixing)
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


class WMSSSFTTrainer(CompleteCheckpointResume, WMSSModelCard, SFTTrainer):
    """[`~trl.SFTTrainer`] whose loss is cross-entropy on the weak/strong mixed logits (WD-JT).

    Args:
        model, args, ...: as [`~trl.SFTTrainer`] (`args` may also be an `SFTConfig` or `TrainingArguments`).
        weak_model (`PreTrainedModel` or `str`, *optional*):
            The frozen weak model, or its local folder; overrides `args.weak_model_name_or_path`.

    Modes (one info line at construction says which):
        * no weak model and `peft_base_as_weak=False`: TRL's `SFTTrainer`, exactly (WD-DS selection still applies
          when `selection_mode` is set);
        * a weak model and `mixing_lambda == 1`: TRL's `SFTTrainer` too; the weak model is neither loaded nor run;
        * a weak model (or `peft_base_as_weak=True` with PEFT) and `mixing_lambda < 1`: the WD-JT loss. What it does
          not support is refused here (see `_check_mixing_supported` and docs/sft.md).

    Logged metrics with `mixing_lambda < 1`: TRL's `entropy`, `mean_token_accuracy` (of the strong model alone),
    `num_tokens` and (MoE) `aux_loss`, and in the namespace `wmss/`: `mixed_loss` (the training loss, per token),
    `strong_nll` (plain SFT loss of the strong model on the same tokens), `weak_nll`, `strong_entropy`,
    `weak_entropy` (nats, per token).
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
        if isinstance(model, (str, os.PathLike)):
            require_safetensors(model, "policy")
        require_rows(
            named.get("train_dataset"),
            "train_dataset",
            ", so there is nothing to train on. Check the split, "
            "filter or file that produced it, and pass a dataset with at least one row.",
        )
        for which in ("train_dataset", "eval_dataset"):  # before any model loads
            check_dataset_columns(
                named.get(which), "sft", name=which, args=args, formatting_func=named.get("formatting_func")
            )

        weak_given = weak_model is not None or bool(args.weak_model_name_or_path)
        if args.peft_base_as_weak:
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
        if args.train_weak_model:
            _check_co_training(model, args, named, weak_given)
        self.wmss_enabled = weak_given or args.peft_base_as_weak
        self.use_mixing = self.wmss_enabled and args.mixing_lambda < 1.0  # lambda = 1: z_mix = z_strong, TRL's loss
        # the saturation diagnostics; in plain SFT (`saturation_metrics=True`) they need wmss_trl's loss path too
        self.saturation_metrics = self.use_mixing if args.saturation_metrics is None else args.saturation_metrics
        self._own_loss = self.use_mixing or self.saturation_metrics
        if self._own_loss:
            _check_mixing_supported(model, args, named, self.use_mixing)

        self.selection_stats = None
        train_dataset = named.get("train_dataset")
        if args.selection_mode is not None:  # WD-DS: select / weight the raw rows before TRL prepares them
            train_dataset, self.selection_stats = select_train_dataset(train_dataset, args)
            pargs, kwargs = replace_train_dataset_argument(pargs, kwargs, train_dataset)
        super().__init__(model, args, *pargs, **kwargs)
        self.mixing_lambda = args.mixing_lambda
        self.weak_model = None
        weak_source = None
        if self._own_loss:
            self._check_mixing_setup()
            self._forward_redirection = _ForwardRedirection()
            self._fused_head = self._can_fuse_head([self.accelerator.unwrap_model(self.model)])
        if self.use_mixing:
            weak, weak_path = resolve_weak_model(
                weak_model, args.weak_model_name_or_path, args.weak_model_init_kwargs, self.model
            )
            weak_source = "the adapter-disabled PEFT base"  # `self.weak_model` None: the policy, adapters disabled
            if weak is not None:
                check_weak_compatible(self.model, weak, self.processing_class, weak_path)
                if args.train_weak_model:
                    self.weak_model = self._attach_co_trained_weak(weak)
                else:
                    self.weak_model = prepare_weak_model(weak, self.accelerator, self.is_deepspeed_enabled)
                weak_source = weak_path or f"a loaded {type(weak).__name__}"
            if self.weak_model is not None:
                self._fused_head = self._can_fuse_head(
                    [self.accelerator.unwrap_model(self.model), self.accelerator.unwrap_model(self.weak_model)]
                )
        self._check_trainable_tokens(train_dataset)
        self._log_selection()
        self._log_mode(weak_source)

    def _attach_co_trained_weak(self, weak):
        """Make the co-trained weak model the submodule `WEAK_MODULE` of the policy, so that the Trainer's one model
        holds both: its optimizer (the weak parameters in their own groups, see `create_optimizer`), gradient
        clipping, DDP wrapper and DeepSpeed engine (ZeRO shards the weak model like the policy). `_save` keeps it out
        of the saved weights; `_save_checkpoint` / `_load_from_checkpoint` keep its state for resuming."""
        what = f"train_weak_model=True puts the weak model in the policy's optimizer{' and DeepSpeed engine' if self.is_deepspeed_enabled else ''}"
        if self.is_deepspeed_enabled and self.args.save_only_model:
            raise ValueError(
                f"{what}, whose checkpoint states are then its only copy, but save_only_model=True skips them. Set "
                "save_only_model=False, or train_weak_model=False."
            )
        ds_config = self.accelerator.state.deepspeed_plugin.deepspeed_config if self.is_deepspeed_enabled else {}
        if "optimizer" in ds_config and self.args.weak_learning_rate not in (None, self.args.learning_rate):
            raise ValueError(
                f"{what}, but the DeepSpeed config builds its own optimizer (its 'optimizer' section), with one "
                f"learning rate for both models, not weak_learning_rate={self.args.weak_learning_rate}. Drop the "
                "config's optimizer section (the Trainer then builds it), or drop weak_learning_rate."
            )
        strong = next(self.model.parameters())
        weak_dtype = next(weak.parameters()).dtype
        if weak_dtype != strong.dtype:
            raise ValueError(
                f"{what}, so it must have the policy's dtype: the weak model is {weak_dtype}, the policy {strong.dtype}. "
                "Load both in the same dtype (weak_model_init_kwargs / model_init_kwargs `dtype`), or set "
                "train_weak_model=False."
            )
        weak.requires_grad_(True)
        weak.train(self.model.training)
        self.model.add_module(WEAK_MODULE, weak.to(strong.device))
        return weak

    def create_optimizer(self, model=None):
        """Trainer's optimizer; with a co-trained weak model its parameters are moved to groups of their own (same
        settings, learning rate `weak_learning_rate`), so the scheduler scales both learning rates alike."""
        built = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if built and self.args.train_weak_model and self.weak_model is not None:
            lr = self.args.weak_learning_rate if self.args.weak_learning_rate is not None else self.args.learning_rate
            weak = {id(p) for p in self.weak_model.parameters()}
            for group in list(optimizer.param_groups):
                moved = [p for p in group["params"] if id(p) in weak]
                if moved:
                    group["params"] = [p for p in group["params"] if id(p) not in weak]
                    optimizer.add_param_group({**group, "params": moved, "lr": lr})
        return optimizer

    def _save(self, output_dir=None, state_dict=None):
        """Trainer's save of the policy; a co-trained weak model (a submodule of it) is left out of the weights, so
        the folder is the strong model alone, loadable by `AutoModelForCausalLM.from_pretrained`."""
        if self.args.train_weak_model and self.weak_model is not None:
            if state_dict is None:
                state_dict = self.accelerator.unwrap_model(self.model).state_dict()
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(f"{WEAK_MODULE}.")}
        super()._save(output_dir, state_dict=state_dict)

    def _save_checkpoint(self, model, trial):
        """Trainer's checkpoint; with a co-trained weak model (not under DeepSpeed, whose states hold it) first its
        weights, in `checkpoint-N/weak_model/model.safetensors` (before `trainer_state.json`, which a complete
        checkpoint ends with)."""
        if self.args.train_weak_model and not self.is_deepspeed_enabled and self.args.should_save:
            checkpoint = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            os.makedirs(os.path.join(checkpoint, WEAK_CHECKPOINT_FOLDER), exist_ok=True)
            save_safetensors_model(
                self.weak_model, os.path.join(checkpoint, WEAK_CHECKPOINT_FOLDER, SAFE_WEIGHTS_NAME)
            )
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Trainer's resume of the policy's weights, then the co-trained weak model's; a checkpoint written with the
        other `train_weak_model` setting is refused."""
        weak_file = os.path.join(resume_from_checkpoint, WEAK_CHECKPOINT_FOLDER, SAFE_WEIGHTS_NAME)
        if self.args.train_weak_model and not os.path.isfile(weak_file):
            raise ValueError(
                f"{resume_from_checkpoint} has no {WEAK_CHECKPOINT_FOLDER}/{SAFE_WEIGHTS_NAME}: it was written by a "
                "run with a frozen weak model (train_weak_model=False), so it holds no co-trained weak model to "
                "resume. Resume it with train_weak_model=False, or start this co-trained run from scratch."
            )
        if not self.args.train_weak_model and os.path.exists(weak_file):
            raise ValueError(
                f"{resume_from_checkpoint} was written by a run that co-trained its weak model (it holds "
                f"{WEAK_CHECKPOINT_FOLDER}/), but this run freezes it: it would continue with the original weak model. "
                "Resume it with train_weak_model=True, or start this run from scratch."
            )
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.args.train_weak_model:
            load_safetensors_model(self.weak_model, weak_file)

    def _issue_warnings_after_load(self, load_result):
        # the co-trained weak model is not in the policy's saved weights (`_save`); it is loaded on its own
        if self.args.train_weak_model:
            missing = [k for k in load_result.missing_keys if not k.startswith(f"{WEAK_MODULE}.")]
            load_result = load_result._replace(missing_keys=missing)
        super()._issue_warnings_after_load(load_result)

    def _can_fuse_head(self, models) -> bool:
        """Whether the fused loss can run: it reads the LM heads' weights and computes no router loss, so the models'
        own logits are used when a head is PEFT-wrapped (LoRA on lm_head, modules_to_save), has logit scaling or
        soft-capping, or the MoE router loss is on."""
        return plain_lm_head(models[0]) and not self.aux_loss_enabled and not any(map(_peft_wrapped_head, models))

    def _check_mixing_setup(self):
        """Refuse the set-ups wmss_trl's loss does not handle that are only known once the accelerator exists."""
        what, loss, off = _own_loss_reason(self.args, self.use_mixing)
        config = self.accelerator.parallelism_config
        if config is not None and (config.tp_enabled or config.cp_enabled or config.sp_enabled):
            raise ValueError(
                f"tensor, context or sequence parallelism is not supported with {what} ({loss} "
                f"needs every position's full hidden state). Use data parallelism or DeepSpeed ZeRO, {off}."
            )
        if self.is_fsdp_enabled:
            raise ValueError(
                f"FSDP is not supported with {what}. Use DeepSpeed ZeRO-2/3 (e.g. "
                f"wmss_trl/accelerate_configs/zero3.yaml) or DDP, {off}."
            )
        if self._is_vlm:
            raise ValueError(
                f"vision-language models are not supported with {what} ({loss} runs the text "
                f"backbone only). Train a causal LM, {off}."
            )

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

    def _get_train_sampler(self, train_dataset=None):
        if self.args.selection_mode == "weighted_sampler":
            # `self.train_dataset` still has the weight column (the dataloader's copy has it removed)
            return weighted_sampler_for(self.train_dataset, self.args)
        return super()._get_train_sampler(train_dataset)

    def _check_trainable_tokens(self, raw_dataset):
        """Refuse a prepared training dataset without any trained token (TRL would train on nothing or crash)."""
        dataset = self.train_dataset
        if not isinstance(dataset, Dataset) or "labels" not in dataset.column_names:
            return
        if len(dataset) == 0:  # TRL drops the rows that truncation leaves fully masked
            raise self._truncation_error(raw_dataset)
        for labels in dataset["labels"]:
            if any(label != -100 for label in labels[1:]):
                return
        raise ValueError(
            "the training dataset has no trainable tokens: every label is masked (-100). Check the completion / "
            "assistant masks (`completion_only_loss`, `assistant_only_loss`, the chat template's generation tags)."
        )

    def _truncation_error(self, raw_dataset) -> ValueError:
        """The error for a dataset that truncation emptied, with the prompt lengths (tokens before the first trained
        token, measured by preparing the rows again without `max_length`)."""
        args = self.args
        max_length, args.max_length = args.max_length, None
        try:
            full = self._prepare_dataset(
                raw_dataset, self.processing_class, args, False, self._formatting_func, "train"
            )
        finally:
            args.max_length = max_length
        prompts = [next((i for i, y in enumerate(labels) if y != -100), len(labels)) for labels in full["labels"]]
        return ValueError(
            f"truncation removed every trainable token: with max_length={max_length} (truncation_mode="
            f"{args.truncation_mode!r}) none of the {len(prompts)} training rows keeps a trained token, so TRL "
            f"dropped them all and the training dataset is empty. The prompts (tokens before the first trained token) "
            f"are {min(prompts)} to {max(prompts)} tokens long. Set max_length above {max(prompts)} (or "
            "max_length=None), or shorten the prompts."
        )

    # ---- the loss -------------------------------------------------------------------------------------------
    # Without mixing (no weak model, or lambda = 1): TRL's `compute_loss`, untouched.
    # Default mixing path: hidden states of both models + their LM heads -> `mixed_head_loss`, which never builds
    # the logits and computes the gradient in the same pass. It runs inside the policy wrapper's forward
    # (`_forward_redirection`, as TRL's distillation trainer does) so DDP's gradient sync and DeepSpeed ZeRO-3's
    # parameter gathering behave as in a normal step.
    # Fallback (models with logit scaling / soft-capping): the models' own logits, mixed chunk by chunk.

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._own_loss:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        diagnostics = self._diagnostics_logged_now()
        keep, targets = trained_positions(inputs["labels"])  # positions whose next token is trained
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        model_inputs["use_cache"] = False
        if self.aux_loss_enabled:  # MoE: the router logits, for the load-balancing loss (as SFTTrainer)
            model_inputs["output_router_logits"] = True
        unwrapped = self.accelerator.unwrap_model(model)
        if self._fused_head:
            loss_sum, stats_sum, n_local, aux_loss = self._forward_redirection(
                model, unwrapped, self._fused_mixed_loss, unwrapped, model_inputs, keep, targets, diagnostics
            )
        else:
            loss_sum, stats_sum, n_local, aux_loss = self._logits_mixed_loss(
                model, unwrapped, model_inputs, keep, targets, diagnostics
            )

        num_tokens = n_local if num_items_in_batch is None else num_items_in_batch
        loss = loss_sum / torch.as_tensor(num_tokens).clamp(min=1)
        # Like SFTTrainer: `num_items_in_batch` counts every rank's tokens, and DDP averages gradients across ranks
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        if aux_loss is not None:
            # Like SFTTrainer: a per-micro-batch mean, averaged over the accumulation steps when the loss is summed
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * aux_loss / steps
            aux_mean = self.accelerator.gather_for_metrics(aux_loss.detach()).mean().item()
            self._metrics[mode]["aux_loss"].append(aux_mean)

        self._log_mixing_metrics(mode, loss_sum.detach(), stats_sum, n_local, inputs)
        if return_outputs:
            with torch.no_grad():
                outputs = model(**model_inputs)
            return loss, outputs
        return loss

    def _diagnostics_logged_now(self) -> bool:
        """Whether this step computes the saturation metrics: only on the training steps whose metrics are logged
        (transformers' DefaultFlowCallback rule: logging_strategy="steps", global_step % logging_steps == 0, or the
        first step with logging_first_step), and on every evaluation batch; every step with another strategy."""
        if not self.saturation_metrics:
            return False
        args, step = self.args, self.state.global_step + 1  # the step being computed, once its optimizer step is done
        if not self.model.training or args.logging_strategy != "steps":
            return True
        return step % self.state.logging_steps == 0 or (args.logging_first_step and step == 1)

    def _fused_mixed_loss(self, unwrapped, model_inputs, keep, targets, diagnostics):
        mask = targets != -100
        strong = backbone_of(unwrapped)(**model_inputs)
        strong_hidden = strong.last_hidden_state[:, keep][mask]
        weak_hidden = weak_head = None
        if self.use_mixing:
            weak_hidden = self._weak_hidden(unwrapped, model_inputs)[:, keep][mask]
            weak_head = lm_head_of(
                unwrapped if self.weak_model is None else self.accelerator.unwrap_model(self.weak_model)
            )
        loss_sum, stats = mixed_head_loss(
            strong_hidden,
            lm_head_of(unwrapped),
            weak_hidden,
            weak_head,
            targets[mask],
            self.mixing_lambda if self.use_mixing else 1.0,
            self.args.mixing_chunk_size,
            train_weak=self.args.train_weak_model,
            diagnostics=diagnostics,
        )
        return loss_sum, stats.sum(0), mask.sum(), None  # no router loss on this path (see `_fused_head`)

    def _weak_hidden(self, unwrapped, model_inputs):
        """Final hidden states of the weak model (the adapter-disabled policy under PEFT), without gradients unless it
        is co-trained (it is then a submodule of the policy, run inside the policy's forward)."""
        if self.args.train_weak_model:
            return backbone_of(self.weak_model)(**model_inputs).last_hidden_state
        with torch.no_grad():
            if self.weak_model is None:
                with disable_gradient_checkpointing(unwrapped, self.args.gradient_checkpointing_kwargs):
                    with unwrapped.disable_adapter():
                        return backbone_of(unwrapped)(**model_inputs).last_hidden_state
            weak = self.accelerator.unwrap_model(self.weak_model)
            return self._forward_redirection(
                self.weak_model, weak, lambda m, inputs: backbone_of(m)(**inputs).last_hidden_state, weak, model_inputs
            )

    def _logits_mixed_loss(self, model, unwrapped, model_inputs, keep, targets, diagnostics):
        model_inputs = {**model_inputs, "logits_to_keep": keep}
        strong = model(**model_inputs)
        strong_logits = strong.logits
        lam, chunk = (self.mixing_lambda if self.use_mixing else 1.0), self.args.mixing_chunk_size
        weak_logits = None
        train_weak = self.args.train_weak_model
        with contextlib.nullcontext() if train_weak else torch.no_grad():  # no weak model: plain SFT + diagnostics
            if self.use_mixing and self.weak_model is not None:
                weak_logits = self.weak_model(**model_inputs).logits
            elif self.use_mixing:
                with disable_gradient_checkpointing(unwrapped, self.args.gradient_checkpointing_kwargs):
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
        return loss_sum, stats, n_local, strong.aux_loss if self.aux_loss_enabled else None

    @torch.no_grad()
    def _log_mixing_metrics(self, mode, loss_sum, stats_sum, n_local, inputs):
        """TRL's SFT metrics of the strong model (`entropy`, `mean_token_accuracy`, `num_tokens`), the `wmss/` ones
        with WD-JT, and the saturation metrics when computed, from the per-token statistics the loss computed anyway:
        means over the trained tokens of every rank (global sums / global count: every rank logs the same)."""
        sums = torch.cat([loss_sum.float().view(1), stats_sum.float(), n_local.float().view(1)])
        sums = self.accelerator.reduce(sums, reduction="sum")
        names = ("mixed_loss", *STAT_NAMES, *DIAGNOSTIC_NAMES)[: len(sums) - 1]  # diagnostics: on logged steps only
        means = dict(zip(names, (sums[:-1] / sums[-1].clamp(min=1)).tolist()))
        metrics = self._metrics[mode]
        metrics["entropy"].append(means["strong_entropy"])
        metrics["mean_token_accuracy"].append(means["strong_top1"])
        if mode == "train":
            self._total_train_tokens += self._count_batch_tokens(inputs)
        metrics["num_tokens"] = [self._total_train_tokens]
        if self.use_mixing:
            for name in ("mixed_loss", "strong_nll", "weak_nll", "strong_entropy", "weak_entropy"):
                metrics[f"wmss/{name}"].append(means[name])
        diagnostics = (
            DIAGNOSTIC_NAMES if self.use_mixing else ("logit_margin", "min_margin", "sft_nontarget_grad_norm")
        )
        for name in diagnostics:
            if name in means:
                metrics[f"wmss/{name}"].append(means[name])

    def _count_batch_tokens(self, inputs) -> int:
        """Tokens of the global batch, counted as SFTTrainer counts `num_tokens` (padding-free: the packed row)."""
        if "attention_mask" in inputs:
            local = inputs["attention_mask"].sum()
        elif "position_ids" in inputs:
            local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
        else:
            raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
        return self.accelerator.gather_for_metrics(local).sum().item() // self._tp_size
