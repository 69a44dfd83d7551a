"""[`WMSSGRPOConfig`]: TRL's `GRPOConfig` plus the weak model and the WMSS-GRPO options."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

from trl import GRPOConfig

from ..advantages import IS_MODES
from ..checks import check_float, check_int, check_order, check_shares
from ..config import WeakModelArgs


@dataclass
class WMSSGRPOConfig(WeakModelArgs, GRPOConfig):
    r"""
    Configuration for [`WMSSGRPOTrainer`]: everything of [`~trl.GRPOConfig`] plus the weak model and the WMSS options.
    WMSS is active only with a weak model (`weak_model=` or `weak_model_name_or_path`) or `peft_base_as_weak=True`.
    Without one, training is exactly TRL's GRPO (a `peft_config` alone too: plain TRL GRPO with LoRA), and an option
    that needs the weak model (`num_weak_generations > 0`, `entropy_weighted_advantages`, `mixing_lambda < 1`) is
    refused.

    Parameters:
        weak_model_name_or_path (`str`, *optional*):
            Local folder of the weak checkpoint (an earlier checkpoint of the same model, same tokenizer, safetensors).
            Overridden by the trainer's `weak_model` argument.
        peft_base_as_weak (`bool`, defaults to `False`):
            With a PEFT policy (a `PeftModel` or `peft_config`) and no weak model, use the policy with its adapters
            disabled as the weak model; no second copy of the weights.
        weak_model_init_kwargs (`dict` or `str`, *optional*):
            Keyword arguments for `from_pretrained` of the weak model (dict or JSON string).
        num_weak_generations (`int`, defaults to `0`):
            K: completions the weak model samples per prompt (0 = no weak negatives). `per_device_train_batch_size *
            K` must be divisible by `num_generations`.
        max_weak_negatives (`int`, *optional*):
            M: at most this many wrong weak completions join each group, the most plausible to the policy
            (default: K). With M < K the ranking costs a policy forward over the weak rows at generation time.
        weak_negative_threshold (`float`, defaults to `0.5`):
            A weak completion is wrong when its reward is below this (0/1 rewards: reward 0).
        weak_correctness_reward (`str`, *optional*):
            Name of the reward function that decides wrongness (default: the weighted sum of all reward functions).
        weak_is_mode (`str`, defaults to `"token_truncate"`):
            How the importance weight pi_old / pi_weak of the weak negatives is computed and bounded, with the names
            and rules of TRL's `vllm_importance_sampling_mode`: `"token_truncate"` (per-token ratio clipped to
            [C_min, C_max]), `"token_mask"` (per-token ratio, 0 outside [C_min, C_max]), `"sequence_truncate"` (the
            product of the token ratios, clipped, for every token of the completion) or `"sequence_mask"` (the
            sequence ratio, 0 outside the bounds).
        weak_is_clip_max (`float`, *optional*, defaults to `2.0`):
            C_max of `weak_is_mode`, like TRL's `vllm_importance_sampling_clip_max`. `None`: no upper bound.
        weak_is_clip_min (`float`, *optional*):
            C_min of `weak_is_mode`, like TRL's `vllm_importance_sampling_clip_min`. `None`: no lower bound.
        weak_is_clip:

            <Deprecated>

            Use `weak_is_clip_max` instead (the value is copied there, with a warning).

            </Deprecated>
        weak_rollout_prefetch (`int`, defaults to `3`):
            P: the weak completions of P + 1 consecutive generation batches are sampled in one weak `generate` call
            (fixed windows: batches 0..P of an epoch, then P+1..2P+1, ...; their prompts read ahead from a copy of
            the train dataloader's sampler, see `wmss_trl.grpo.clock.EpochPlan`). On small batches a decode step
            costs about the same for 2 rows as for 8, which this amortises. Each weak row's sample is drawn from
            noise seeded by (seed, epoch, generation batch, global row), and a window is always the same batches, so
            the samples are those of an uninterrupted run whatever the resume point. 0: one call per generation
            batch. Combines with TRL's `steps_per_generation` (which batches the policy's rows too).
        weak_rollouts_path (`str`, *optional*):
            Folder of a weak-rollout pool (`wmss weak-rollouts`): the weak negatives of epoch e are the pool's
            completions of epoch e (draw k of a prompt for its k-th weak row) instead of being sampled, with their
            recorded behaviour log-probs. The weak model is then loaded only if `beta > 0`,
            `entropy_weighted_advantages` or `mixing_lambda < 1` needs it. Refused at construction, naming what
            differs, unless the pool was built from the same weak model and tokenizer with the same sampling settings,
            holds every training prompt, at least `num_weak_generations` completions per prompt and enough epochs.
        weak_use_vllm (`bool`, *optional*):
            Sample the weak negatives with a vLLM engine of the weak checkpoint (its own `vllm.LLM` in this process,
            loaded once, never synced since the weak model is frozen). `None` (default): when `use_vllm=True`.
            `False`: the weak model decodes with transformers even when the policy uses vLLM.
        weak_vllm_server_base_url (`str`, *optional*):
            URL of a vLLM server of the weak checkpoint (`vllm serve WEAK --logprobs-mode processed_logprobs`), a
            second server next to the policy's; the weak negatives are sampled there, by every process for its own
            rows. Needs no weight sync, so any vLLM server works (also without GPUs).
        weak_vllm_gpu_memory_utilization (`float`, defaults to `0.2`):
            `gpu_memory_utilization` of the colocated weak engine (TRL's `vllm_gpu_memory_utilization` is the
            policy engine's).
        entropy_weighted_advantages (`bool`, defaults to `False`):
            Multiply each token's advantage by the WD-DS entropy weight (mean 1 over the global batch).
        entropy_weight_alpha, entropy_weight_beta, entropy_weight_gamma (`float`, defaults to `0.1, 0.8, 0.1`):
            Weights of base difficulty (weak entropy), consolidation (entropy drop weak -> policy) and regression
            (entropy rise), as WD-DS's a, b, c.
        entropy_weight_min, entropy_weight_max (`float`, *optional*):
            Clip the token weights (after the mean-1 normalisation).
        mixing_lambda (`float`, defaults to `1.0`):
            WD-JT in RL: policy log-probs in the loss from lambda * z_policy + (1 - lambda) * z_weak; 1.0 = off.
        mixing_chunk_size (`int`, defaults to `256`):
            Positions per chunk of the fp32 mixed log-softmax.
    """

    _VALID_DICT_FIELDS = GRPOConfig._VALID_DICT_FIELDS + ["weak_model_init_kwargs"]
    # set by GRPOConfig.__post_init__ from steps_per_generation (or the reverse): not copied from a GRPOConfig
    _DERIVED_FIELDS = ("generation_batch_size",)

    num_weak_generations: int = field(
        default=0,
        metadata={
            "help": "K: completions the weak model samples per prompt; its plausible wrong ones become "
            "negatives of the group. 0 disables weak negatives. per_device_train_batch_size * K must be "
            "divisible by num_generations."
        },
    )
    max_weak_negatives: int | None = field(
        default=None,
        metadata={
            "help": "M: at most this many weak negatives per group, the most plausible to the policy "
            "(default: num_weak_generations). With M < K the ranking costs a policy forward over the weak rows."
        },
    )
    weak_negative_threshold: float = field(
        default=0.5,
        metadata={"help": "A weak completion is wrong when its reward is below this value (0/1 rewards: 0 is wrong)."},
    )
    weak_correctness_reward: str | None = field(
        default=None,
        metadata={
            "help": "Name of the reward function that decides whether a weak completion is wrong (default: "
            "the weighted sum of all reward functions)."
        },
    )
    weak_is_mode: str = field(
        default="token_truncate",
        metadata={
            "help": "Importance sampling of the weak negatives, with the modes of TRL's "
            "vllm_importance_sampling_mode: 'token_truncate' (per-token ratio pi_old / pi_weak clipped to "
            "[C_min, C_max]), 'token_mask' (per-token ratio set to 0 outside the bounds), 'sequence_truncate' (the "
            "product of the token ratios, clipped, applied to every token) or 'sequence_mask' (the sequence ratio, "
            "0 outside the bounds).",
            "choices": list(IS_MODES),
        },
    )
    weak_is_clip_max: float | None = field(
        default=2.0,
        metadata={
            "help": "C_max of weak_is_mode (like TRL's vllm_importance_sampling_clip_max): '*_truncate' clips the "
            "ratio from above at it, '*_mask' sets larger ratios to 0. None: no upper bound."
        },
    )
    weak_is_clip_min: float | None = field(
        default=None,
        metadata={
            "help": "C_min of weak_is_mode (like TRL's vllm_importance_sampling_clip_min): '*_truncate' clips the "
            "ratio from below at it, '*_mask' sets smaller ratios to 0. None: no lower bound."
        },
    )
    weak_is_clip: float | None = field(
        default=None,
        metadata={"help": "Deprecated, use weak_is_clip_max instead (the value is copied there)."},
    )
    weak_rollout_prefetch: int = field(
        default=3,
        metadata={
            "help": "P: sample the weak completions of P + 1 consecutive generation batches in one weak generate call "
            "(fixed windows of the epoch, prompts read ahead from a copy of the dataloader's sampler). Each weak "
            "row's sample is seeded by (seed, epoch, generation batch, global row), so this gives the same samples "
            "and only amortises the decode. 0: one call per generation batch."
        },
    )
    weak_rollouts_path: str | None = field(
        default=None,
        metadata={
            "help": "Folder of a weak-rollout pool built by `wmss weak-rollouts` with the same weak model, tokenizer "
            "and sampling settings: epoch e's weak negatives are the pool's epoch-e completions (with their "
            "behaviour log-probs) instead of being sampled, and the weak model is loaded only if beta > 0, "
            "entropy_weighted_advantages or mixing_lambda < 1 needs it. A pool that does not match is refused."
        },
    )
    weak_use_vllm: bool | None = field(
        default=None,
        metadata={
            "help": "Sample the weak negatives with the weak checkpoint's own vLLM engine in this process (loaded once, "
            "never synced). None: when use_vllm=True. False: decode the weak model with transformers."
        },
    )
    weak_vllm_server_base_url: str | None = field(
        default=None,
        metadata={
            "help": "URL of a vLLM server of the weak checkpoint (vllm serve WEAK --logprobs-mode "
            "processed_logprobs) that samples the weak negatives; no weight sync is needed."
        },
    )
    weak_vllm_gpu_memory_utilization: float = field(
        default=0.2,
        metadata={"help": "gpu_memory_utilization of the colocated weak vLLM engine."},
    )
    entropy_weighted_advantages: bool = field(
        default=False,
        metadata={
            "help": "Weight each token's advantage by the WD-DS entropy-dynamics weight (mean 1 over the "
            "global batch)."
        },
    )
    entropy_weight_alpha: float = field(
        default=0.1, metadata={"help": "Weight of base difficulty: the weak model's token entropy."}
    )
    entropy_weight_beta: float = field(
        default=0.8, metadata={"help": "Weight of consolidation: relu(H_weak - H_policy)."}
    )
    entropy_weight_gamma: float = field(
        default=0.1, metadata={"help": "Weight of regression: relu(H_policy - H_weak)."}
    )
    entropy_weight_min: float | None = field(
        default=None, metadata={"help": "Lower clip of the token weights (after normalisation)."}
    )
    entropy_weight_max: float | None = field(
        default=None, metadata={"help": "Upper clip of the token weights (after normalisation)."}
    )
    mixing_lambda: float = field(
        default=1.0,
        metadata={
            "help": "WD-JT in RL: the loss uses log-probs of lambda*z_policy + (1-lambda)*z_weak; "
            "0 < lambda <= 1, 1.0 is off."
        },
    )

    def __post_init__(self):
        self._check_numbers()
        super().__post_init__()
        self._check_weak_negatives()

    def _check_numbers(self):
        """Every numeric WMSS field: converted (a YAML/JSON string "0.5" becomes 0.5), finite and in range, kept."""
        self.mixing_lambda = check_float(
            "mixing_lambda",
            self.mixing_lambda,
            low=0.0,
            low_open=True,
            high=1.0,
            hint="It is the weight of the policy logits; 1.0 is off.",
        )
        self.mixing_chunk_size = check_int("mixing_chunk_size", self.mixing_chunk_size, low=1)
        self.num_weak_generations = check_int(
            "num_weak_generations", self.num_weak_generations, low=0, hint="0 disables weak negatives."
        )
        self.max_weak_negatives = check_int("max_weak_negatives", self.max_weak_negatives, low=1, optional=True)
        self.weak_negative_threshold = check_float(
            "weak_negative_threshold",
            self.weak_negative_threshold,
            hint="A weak completion is wrong when its reward is below it (0.5 for 0/1 rewards).",
        )
        self._check_importance_sampling()
        self.weak_vllm_gpu_memory_utilization = check_float(
            "weak_vllm_gpu_memory_utilization", self.weak_vllm_gpu_memory_utilization, low=0.0, low_open=True, high=1.0
        )
        self.weak_rollout_prefetch = check_int(
            "weak_rollout_prefetch",
            self.weak_rollout_prefetch,
            low=0,
            hint="0 samples each generation batch's weak completions in its own call.",
        )
        self.entropy_weight_alpha, self.entropy_weight_beta, self.entropy_weight_gamma = check_shares(
            ("entropy_weight_alpha", "entropy_weight_beta", "entropy_weight_gamma"),
            (self.entropy_weight_alpha, self.entropy_weight_beta, self.entropy_weight_gamma),
            need_positive_sum=bool(self.entropy_weighted_advantages),
        )
        self.entropy_weight_min = check_float(
            "entropy_weight_min",
            self.entropy_weight_min,
            low=0.0,
            optional=True,
            hint="It is the lower clip of the token weights (mean 1).",
        )
        self.entropy_weight_max = check_float(
            "entropy_weight_max",
            self.entropy_weight_max,
            low=0.0,
            low_open=True,
            optional=True,
            hint="It is the upper clip of the token weights (mean 1); a weight <= 0 would flip or erase advantages.",
        )
        check_order("entropy_weight_min", self.entropy_weight_min, "entropy_weight_max", self.entropy_weight_max)

    def _check_importance_sampling(self):
        """``weak_is_mode`` and its bounds, with TRL's rules for ``vllm_importance_sampling_*`` (a ``*_truncate`` mode
        needs a bound, ``C_min < C_max``); the deprecated ``weak_is_clip`` is copied to ``weak_is_clip_max`` as TRL
        copies ``vllm_importance_sampling_cap``."""
        if self.weak_is_mode not in IS_MODES:
            raise ValueError(
                f"weak_is_mode must be one of {', '.join(repr(m) for m in IS_MODES)} (the modes of TRL's "
                f"vllm_importance_sampling_mode), got {self.weak_is_mode!r}."
            )
        bound = "It bounds the importance weight pi_old / pi_weak of the weak negatives."
        self.weak_is_clip = check_float("weak_is_clip", self.weak_is_clip, low=0.0, low_open=True, optional=True)
        if self.weak_is_clip is not None:
            warnings.warn(
                f"weak_is_clip is deprecated: use weak_is_clip_max (the bound of weak_is_mode, like TRL's "
                f"vllm_importance_sampling_clip_max). weak_is_clip_max is set to weak_is_clip={self.weak_is_clip}.",
                FutureWarning,
                stacklevel=5,
            )
            self.weak_is_clip_max = self.weak_is_clip
        self.weak_is_clip_max = check_float(
            "weak_is_clip_max", self.weak_is_clip_max, low=0.0, low_open=True, optional=True, hint=bound
        )
        self.weak_is_clip_min = check_float(
            "weak_is_clip_min", self.weak_is_clip_min, low=0.0, optional=True, hint=bound
        )
        if self.weak_is_clip_min is not None and self.weak_is_clip_max is not None:
            if self.weak_is_clip_min >= self.weak_is_clip_max:
                raise ValueError(
                    f"weak_is_clip_min ({self.weak_is_clip_min}) must be less than weak_is_clip_max "
                    f"({self.weak_is_clip_max})."
                )
        if self.weak_is_mode.endswith("_truncate") and self.weak_is_clip_min is None and self.weak_is_clip_max is None:
            raise ValueError(
                f"weak_is_mode={self.weak_is_mode!r} truncates the importance weight, so it needs a bound: set "
                "weak_is_clip_max (e.g. 2.0) or weak_is_clip_min, or use a '*_mask' mode."
            )

    def _check_weak_negatives(self):
        """The batch layout of weak negatives (see the module docstring of :mod:`wmss_trl.grpo`) and their defaults."""
        k, g, p = self.num_weak_generations, self.num_generations, self.per_device_train_batch_size
        if k > 0:
            if (p * k) % g != 0:
                step = g // math.gcd(p, g)
                raise ValueError(
                    f"num_weak_generations={k} breaks the batch layout: every process appends "
                    f"per_device_train_batch_size * steps_per_generation * num_weak_generations / num_generations weak "
                    f"completions to its batch, which must still split into steps_per_generation equal micro-batches, "
                    f"so per_device_train_batch_size * num_weak_generations ({p} * {k}) must be divisible by "
                    f"num_generations ({g}). With these sizes use a multiple of {step} (e.g. {step}), or change "
                    "per_device_train_batch_size."
                )
            if self.max_weak_negatives is None:
                self.max_weak_negatives = k
            if not 1 <= self.max_weak_negatives <= k:
                raise ValueError(
                    f"max_weak_negatives must be between 1 and num_weak_generations ({k}), got {self.max_weak_negatives}."
                )
            if self.multi_objective_aggregation != "sum_then_normalize":
                raise ValueError(
                    "weak negatives (num_weak_generations > 0) need multi_objective_aggregation='sum_then_normalize' "
                    f"(got {self.multi_objective_aggregation!r}): the negatives are scored by the weighted sum of the "
                    "rewards."
                )

    @property
    def weak_model_loaded(self) -> bool:
        """False when the weak negatives are decoded elsewhere (a weak-rollout pool, or vLLM: the weak model's own engine
        or server, which return the behaviour log-probs) and nothing else reads the weak model (``beta = 0``, no
        entropy weights, no mixing): the trainer then does not load it."""
        decoded_elsewhere = self.weak_rollouts_path is not None or self.weak_vllm_backend is not None
        reads_weak = self.beta != 0.0 or self.entropy_weighted_advantages or self.mixing_lambda < 1.0
        return not decoded_elsewhere or reads_weak

    @property
    def weak_vllm_backend(self) -> str | None:
        """How the weak negatives are decoded with vLLM: ``"server"`` (``weak_vllm_server_base_url``), ``"colocate"``
        (``weak_use_vllm``, by default with ``use_vllm``), or ``None`` (transformers' ``generate``)."""
        if self.num_weak_generations == 0 or self.weak_rollouts_path is not None:
            return None  # no weak decoding: no weak negatives, or a pool serves them
        if self.weak_vllm_server_base_url:
            return "server"
        return "colocate" if (self.use_vllm if self.weak_use_vllm is None else self.weak_use_vllm) else None

    @property
    def needs_weak_model(self) -> bool:
        """True when an option that needs the weak model beyond the KL reference is on."""
        return self.num_weak_generations > 0 or self.entropy_weighted_advantages or self.mixing_lambda < 1.0
