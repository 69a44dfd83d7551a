"""Config fields shared by the WMSS trainers' configs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .mixing import DEFAULT_CHUNK_SIZE


@dataclass
class WeakModelArgs:
    """The weak-model fields of every WMSS config (mixed into [`WMSSSFTConfig`], [`WMSSGRPOConfig`] and [`WMSSDPOConfig`] before TRL's
    config class, so they come right after TRL's fields in ``--help``).

    Parameters:
        weak_model_name_or_path (`str`, *optional*):
            Local folder of the weak checkpoint (an earlier checkpoint of the same model, same tokenizer,
            safetensors). Overridden by the trainer's `weak_model` argument. With no weak model (and
            `peft_base_as_weak=False`) WMSS is inactive and the trainer is TRL's.
        weak_model_init_kwargs (`dict` or `str`, *optional*):
            Keyword arguments for `from_pretrained` of the weak model (dict or JSON string).
        peft_base_as_weak (`bool`, defaults to `False`):
            With a PEFT policy (a `PeftModel` or `peft_config`) and no weak model, use the policy with its adapters
            disabled as the weak model; no second copy of the weights. Off, a `peft_config` alone means plain TRL.
        mixing_chunk_size (`int`, defaults to `256`):
            Positions per chunk of the fp32 mixed log-softmax (WD-JT, `mixing_lambda < 1`).
    """

    weak_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Local folder of the weak checkpoint (earlier checkpoint of the same model, same tokenizer, "
            "safetensors). Without a weak model (and peft_base_as_weak=False) WMSS is inactive: this is TRL's "
            "trainer."
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
            "adapters disabled as the weak model (no second copy of the weights). Off, a peft_config alone "
            "means plain TRL."
        },
    )
    mixing_chunk_size: int = field(
        default=DEFAULT_CHUNK_SIZE, metadata={"help": "Positions per chunk of the fp32 mixed log-softmax."}
    )
