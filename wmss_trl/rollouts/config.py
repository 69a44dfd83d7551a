"""[`RolloutConfig`]: the settings of a weak-rollout pool (the flags of `wmss weak-rollouts`)."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from typing import Any

from ..checks import check_float, check_int


# the settings that change what is sampled, named as in TRL's GRPOConfig: a pool is used only with the same ones
SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "max_completion_length",
    "generation_kwargs",
    "chat_template_kwargs",
)


@dataclass
class RolloutConfig:
    r"""
    Settings of [`build_pool`] (also the flags of `wmss weak-rollouts`). The sampling settings have the names, defaults
    and meaning of TRL's [`~trl.GRPOConfig`]; a GRPO run uses the pool only with the same ones.

    Parameters:
        num_generations (`int`, defaults to `8`): K: completions sampled per prompt and epoch.
        epochs (`int`, defaults to `1`): E: the pool holds E x K completions per prompt (epoch e of training takes the
            e-th K).
        temperature, top_p, top_k, min_p, repetition_penalty, max_completion_length, generation_kwargs,
            chat_template_kwargs: as in [`~trl.GRPOConfig`].
        seed (`int`, defaults to `0`): Completion k of epoch e of a prompt is drawn from noise seeded by
            (seed, prompt id, e, k), whatever the batch or the process count.
        backend (`str`, defaults to `"transformers"`): The sampling engine: `"transformers"` (``generate``) or
            `"vllm"` (a colocated vLLM engine of the weak model's folder; needs ``pip install 'wmss_trl[vllm]'``).
        batch_size (`int`, defaults to `16`): Completions per generate call (does not change the samples).
        shard_size (`int`, defaults to `64`): Prompts per written shard (the unit of resume).
        progress (`bool`, defaults to `True`): Show a progress bar on the main process.
    """

    num_generations: int = field(default=8, metadata={"help": "K: completions sampled per prompt and epoch."})
    epochs: int = field(
        default=1,
        metadata={"help": "E: draw E x K completions per prompt; training epoch e takes the e-th K of them."},
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (as GRPOConfig)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold, 1.0 = off (as GRPOConfig)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling, 0 = off (as GRPOConfig)."})
    min_p: float | None = field(default=None, metadata={"help": "Min-p sampling threshold (as GRPOConfig)."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Repetition penalty, 1.0 = off."})
    max_completion_length: int = field(default=256, metadata={"help": "Maximum tokens per completion."})
    generation_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Extra GenerationConfig keywords (dict or JSON string), as GRPOConfig."}
    )
    chat_template_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Extra keywords of the chat template (dict or JSON string), as GRPOConfig."}
    )
    seed: int = field(
        default=0, metadata={"help": "Completion k of epoch e of a prompt is seeded by (seed, prompt id, e, k)."}
    )
    backend: str = field(
        default="transformers",
        metadata={
            "help": "Sampling engine: transformers (generate) or vllm (a colocated vLLM engine of the weak model's "
            "folder; one per process under accelerate launch; pip install 'wmss_trl[vllm]').",
            "choices": ["transformers", "vllm"],
        },
    )
    batch_size: int = field(default=16, metadata={"help": "Completions per generate call (samples unchanged)."})
    shard_size: int = field(default=64, metadata={"help": "Prompts per written shard (the unit of resume)."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar on the main process."})

    def __post_init__(self):
        self.num_generations = check_int("num_generations", self.num_generations, low=1)
        self.epochs = check_int("epochs", self.epochs, low=1)
        self.temperature = check_float(
            "temperature", self.temperature, low=0.0, low_open=True, hint="Weak rollouts are sampled."
        )
        self.top_p = check_float("top_p", self.top_p, low=0.0, low_open=True, high=1.0)
        self.top_k = check_int("top_k", self.top_k, low=0, hint="0 is off.")
        self.min_p = check_float("min_p", self.min_p, low=0.0, high=1.0, optional=True)
        self.repetition_penalty = check_float("repetition_penalty", self.repetition_penalty, low=0.0, low_open=True)
        self.max_completion_length = check_int("max_completion_length", self.max_completion_length, low=1)
        self.batch_size = check_int("batch_size", self.batch_size, low=1)
        self.shard_size = check_int("shard_size", self.shard_size, low=1)
        for name in ("generation_kwargs", "chat_template_kwargs"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    setattr(self, name, json.loads(value))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{name} is not valid JSON: {value!r} ({e}).") from e
        from .backend import BACKENDS

        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {self.backend!r}.")
        if self.backend == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ValueError(
                "backend='vllm' samples with vLLM, but vllm is not installed. Install it (pip install "
                "'wmss_trl[vllm]'), or use backend='transformers' (the same distribution, decoded by generate)."
            )

    def sampling(self) -> dict:
        """The settings that change what is sampled (:data:`SAMPLING_FIELDS`), as recorded in the pool."""
        return sampling_settings(self)


def sampling_settings(config) -> dict:
    """:data:`SAMPLING_FIELDS` of a [`RolloutConfig`] or a TRL ``GRPOConfig`` (``None`` and ``{}`` are the same)."""
    out = {name: getattr(config, name) for name in SAMPLING_FIELDS}
    for name in ("generation_kwargs", "chat_template_kwargs"):
        out[name] = out[name] or None
    return out
