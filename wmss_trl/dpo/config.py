"""[`WMSSDPOConfig`]: TRL's `DPOConfig` plus the weak model and the WMSS-DPO options."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import DPOConfig

from ..checks import check_float, check_int, check_shares
from ..config import WeakModelArgs


_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
_SORTING_LOSSES = {"aot", "aot_unpaired"}


@dataclass
class WMSSDPOConfig(WeakModelArgs, DPOConfig):
    r"""
    Configuration for [`WMSSDPOTrainer`]: everything of [`~trl.DPOConfig`], plus the weak model and the WMSS options.

    Parameters:
        weak_model_name_or_path (`str`, *optional*):
            Local folder of the weak checkpoint, the DPO reference (an earlier checkpoint of the same model, same
            tokenizer). Overridden by the trainer's `weak_model` argument. With no weak model (and
            `peft_base_as_weak=False`) WMSS is inactive and the trainer is TRL's `DPOTrainer`.
        peft_base_as_weak (`bool`, defaults to `False`):
            With a PEFT policy (a `PeftModel` or `peft_config`) and no weak model, use the policy with its adapters
            disabled as the weak model (no second copy of the weights). Off, a `peft_config` alone means plain TRL.
        weak_model_init_kwargs (`dict` or `str`, *optional*):
            Keyword arguments for `from_pretrained` of the weak model (dict or JSON string).
        mixing_lambda (`float`, defaults to `1.0`):
            WD-JT: the policy log-probs come from z_mix = lambda * z_strong + (1 - lambda) * z_weak. 1.0 is off (plain
            DPO log-probs); the WMSS paper's value is 0.5. Must satisfy 0 < lambda <= 1.
        mixing_chunk_size (`int`, defaults to `256`):
            Positions per chunk of the fp32 mixed log-softmax.
        entropy_pair_weights (`bool`, defaults to `False`):
            Weight each pair by the weak/strong entropy gap on its rejected answer (formula in the module docstring).
        pair_weight_alpha, pair_weight_beta, pair_weight_gamma (`float`, defaults to `0.1`, `0.8`, `0.1`):
            Shares of the three WD-DS signals: weak entropy, entropy drop (strong more certain), entropy rise.
        drop_identical_pairs (`bool`, defaults to `False`):
            Pairs whose chosen and rejected are the same token sequence after tokenisation and truncation
            (`max_length`, `truncation_mode`) carry no preference: with WMSS active they raise an error by default;
            with this set they are dropped and counted. With WMSS inactive they are kept, as TRL does, with a warning.
    """

    _VALID_DICT_FIELDS = DPOConfig._VALID_DICT_FIELDS + ["weak_model_init_kwargs"]

    mixing_lambda: float = field(
        default=1.0,
        metadata={
            "help": "WD-JT: policy log-probs from lambda*z_strong + (1-lambda)*z_weak. 1.0 = off (plain DPO); "
            "the paper uses 0.5."
        },
    )
    entropy_pair_weights: bool = field(
        default=False,
        metadata={"help": "Weight each pair by the weak/strong entropy gap on its rejected answer (mean 1)."},
    )
    pair_weight_alpha: float = field(default=0.1, metadata={"help": "Share of the weak-entropy signal."})
    pair_weight_beta: float = field(
        default=0.8, metadata={"help": "Share of the entropy-drop signal (strong more certain than weak)."}
    )
    pair_weight_gamma: float = field(
        default=0.1, metadata={"help": "Share of the entropy-rise signal (strong less certain than weak)."}
    )
    drop_identical_pairs: bool = field(
        default=False,
        metadata={
            "help": "Drop (and count) pairs whose chosen and rejected are the same tokens after truncation, "
            "instead of raising an error (WMSS active) or keeping them with a warning (WMSS inactive)."
        },
    )

    def __post_init__(self):
        self.mixing_lambda = check_float(
            "mixing_lambda",
            self.mixing_lambda,
            low=0.0,
            low_open=True,
            high=1.0,
            hint="It is the weight of the STRONG logits: 1.0 is plain DPO, the paper's value is 0.5.",
        )
        self.mixing_chunk_size = check_int("mixing_chunk_size", self.mixing_chunk_size, low=1)
        self.pair_weight_alpha, self.pair_weight_beta, self.pair_weight_gamma = check_shares(
            ("pair_weight_alpha", "pair_weight_beta", "pair_weight_gamma"),
            (self.pair_weight_alpha, self.pair_weight_beta, self.pair_weight_gamma),
        )
        super().__post_init__()
        if self.entropy_pair_weights and _SORTING_LOSSES & set(self.loss_type):
            raise ValueError(
                f"entropy_pair_weights cannot be combined with loss_type {sorted(_SORTING_LOSSES & set(self.loss_type))}: "
                "those losses sort the pairs of a batch, which breaks per-pair weights."
            )
