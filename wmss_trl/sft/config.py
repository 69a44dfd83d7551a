"""Configuration of the WD-JT SFT trainer: [`~trl.SFTConfig`] plus the weak model, the mixing weight, the co-trained
weak model, the saturation metrics and WD-DS selection."""

from __future__ import annotations

from argparse import ArgumentTypeError
from dataclasses import dataclass, field

from transformers.hf_argparser import string_to_bool
from trl import SFTConfig

from ..checks import check_float, check_int, check_shares
from ..config import WeakModelArgs
from .selection import check_selection_config


@dataclass
class WMSSSFTConfig(WeakModelArgs, SFTConfig):
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
            model's weights for resuming with the training state (in `optimizer.pt`, or DeepSpeed's own states).
            Needs a separate weak model (not `peft_base_as_weak`), `mixing_lambda < 1` and `save_only_model=False`.
            Off: the weak model is frozen (the paper's v2 text).
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

    mixing_lambda: float = field(
        default=0.5,
        metadata={
            "help": "Weight of the strong logits in z_mix = lambda*z_strong + (1-lambda)*z_weak; "
            "0 < lambda <= 1, 1.0 is plain SFT (TRL's loss). No effect without a weak model."
        },
    )
    train_weak_model: bool = field(
        default=False,
        metadata={
            "help": "Co-train the weak model (the official code's freeze=false): the same mixed loss trains it "
            "(gradient (1-lambda)*(p_mix - onehot) on its logits), in the same optimizer with its own learning rate "
            "(weak_learning_rate), sharded like the policy under ZeRO. Only the strong model is saved; checkpoints "
            "keep the weak one for resuming. Needs a separate weak model, mixing_lambda < 1 and save_only_model=False."
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
        self._check_co_training_fields()
        self._check_selection_fields()
        check_selection_config(self)
        super().__post_init__()

    def _check_co_training_fields(self):
        """`train_weak_model` / `saturation_metrics` as booleans, and the co-training settings that contradict each
        other refused."""
        for name in ("train_weak_model", "saturation_metrics"):  # a YAML / JSON string such as "false" is truthy
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    setattr(self, name, string_to_bool(value))
                except ArgumentTypeError:
                    raise ValueError(f"{name} must be true or false, got {value!r}.") from None
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
            if self.save_only_model:
                raise ValueError(
                    "train_weak_model=True with save_only_model=True: a checkpoint keeps the co-trained weak model's "
                    "weights only with the training state (the optimizer's, or DeepSpeed's engine states), which "
                    "save_only_model=True skips, so a resumed run would lose them. Set save_only_model=False, or "
                    "train_weak_model=False."
                )

    def _check_selection_fields(self):
        """The numeric WD-DS fields, converted and checked (the shares need a positive sum when selection is on)."""
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
