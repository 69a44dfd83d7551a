"""WMSS-GRPO: TRL's ``GRPOTrainer`` with a frozen weak checkpoint as reference policy, source of negatives and
entropy anchor.

WMSS is active with a weak model (``weak_model=`` / ``weak_model_name_or_path``) or ``peft_base_as_weak=True`` (the
PEFT policy with adapters disabled); without one this *is* ``GRPOTrainer``. What the weak model does (each part can be
switched on alone; with all of them off this is ``GRPOTrainer`` too):

* **Reference policy.** With ``beta > 0`` the KL term of TRL's loss is taken against the weak model (not a copy of
  the policy). It is loaded once, frozen, patched with TRL's fused LM head and prepared like TRL's reference model
  (``prepare_deepspeed``: sharded under ZeRO-3, replicated otherwise), always through :mod:`wmss_trl.weak`.
* **Weak negatives** (``num_weak_generations = K > 0``). Per prompt the weak model samples K completions with the
  policy's sampling settings; TRL's reward functions score them; the wrong ones that the current policy finds most
  plausible (at most ``max_weak_negatives = M`` per group) join the group, count in its mean/std and only ever get a
  non-positive advantage. A weak row's sample is drawn from noise seeded by (seed, epoch, generation batch, global
  row, token), not from the training RNG (:class:`GumbelMaxSampler`), so resume, read-ahead and process count do not
  change it. They are off-policy, so their token advantages carry a truncated importance weight
  ``rho_t = min(pi_old / pi_weak, c)``; see :mod:`wmss_trl.advantages` for the estimator.
* **Entropy-weighted advantages** (``entropy_weighted_advantages=True``): token advantage = sequence advantage x a
  weight from the weak/policy entropy dynamics (WD-DS's three signals), normalised to mean 1 over the global batch.
* **WD-JT in RL** (``mixing_lambda < 1``): the policy's log-probs in the loss (and in the old-policy term) are those
  of the mixed logits ``lambda * z_policy + (1 - lambda) * z_weak``; generation stays with the pure policy.

How weak negatives fit TRL's batch shapes
-----------------------------------------
TRL's ``_prepare_inputs`` shuffles the dict returned by ``_generate_and_score_completions`` along dim 0 and cuts it
into ``steps_per_generation`` equal micro-batches. Each process holds ``B = per_device_train_batch_size x
steps_per_generation`` policy rows (a contiguous slice of the global batch, groups of ``num_generations = G``
consecutive rows, possibly spanning processes). Every process generates exactly ``n_w = B x K / G`` weak
completions: its weak row ``l`` uses the prompt of its policy row ``floor(l x G / K)``, so global weak row ``j``
belongs to global group ``j // K`` and every group gets exactly K weak samples, whichever processes its rows live
on. All ``n_w`` weak rows are **appended** to the process's batch; the selection (global, identical on every
process) keeps the best <= M wrong ones per group, and the unselected weak rows stay in the batch as zero-weight
padding rows (completion mask 0, advantage 0). So the batch has a fixed ``B + n_w`` rows on every process, which
split into ``steps_per_generation`` micro-batches of ``per_device_train_batch_size x (1 + K / G)`` rows: hence the
rule ``per_device_train_batch_size x K % G == 0``, checked in :class:`WMSSGRPOConfig`. Padding rows hold no loss
token, and :meth:`WMSSGRPOTrainer._compute_loss` drops them from each micro-batch before calling TRL's loss, so they
cost no training compute and every loss type (token-normalised like ``dapo``, TRL's default, or
row-averaged like ``grpo``) sees exactly the policy rows plus the selected negatives. Under several processes each
keeps as many rows as the process that selected the most (TRL gathers per-row metrics); the extra zero-weight rows
add nothing to the loss, and row-averaged losses are rescaled to their mean over the real rows.
``num_items_in_batch`` is recomputed with the negatives' tokens.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import logging
import math
import os
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import gather_object
from datasets import IterableDataset
from transformers import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)
from transformers.generation.logits_process import TopHLogitsWarper
from trl import GRPOConfig, GRPOTrainer
from trl.data_utils import is_conversational
from trl.models.utils import disable_gradient_checkpointing, unwrap_model_for_generation
from trl.trainer.utils import RepeatSampler, nanstd, pad

from .advantages import (
    advantages_with_weak_negatives,
    entropy_advantage_weights,
    select_weak_negatives,
    sequence_mean,
    truncated_importance_weights,
)
from .checkpoints import CompleteCheckpointResume
from .checks import as_wmss_config, check_float, check_int, check_order, check_shares
from .core import aggregate_rewards, cut_at_eos
from .data_checks import check_dataset_columns
from .entropy import token_entropy
from .mixing import DEFAULT_CHUNK_SIZE, mixed_token_logprobs
from .sft import WMSSModelCard
from .trl_compat import grpo_without_reference_logps, grpo_without_reference_model
from .weak import check_weak_compatible, is_peft_model, prepare_weak_model, require_safetensors, resolve_weak_model


logger = logging.getLogger(__name__)

# codes of the `wmss_source` column of the batch
SOURCE_POLICY, SOURCE_WEAK_NEGATIVE, SOURCE_WEAK_UNUSED = 0, 1, 2
SOURCE_NAMES = {SOURCE_POLICY: "policy", SOURCE_WEAK_NEGATIVE: "weak_negative", SOURCE_WEAK_UNUSED: "weak_unused"}
# TRL loss types that average over the rows of a micro-batch (the others normalise by token counts)
ROW_AVERAGED_LOSSES = ("grpo", "sapo", "luspo", "dr_grpo")


@dataclass
class WMSSGRPOConfig(GRPOConfig):
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
        weak_is_clip (`float`, defaults to `2.0`):
            c: truncation of the per-token importance weight min(pi_old / pi_weak, c) of weak negatives.
        weak_rollout_prefetch (`int`, defaults to `3`):
            P: the weak completions of the next P generation batches are sampled in the same weak `generate` call as
            the current batch's (one call every P + 1 generation batches, P + 1 times the rows). The weak model is
            frozen, so sampling early draws from the same distribution; rewards are computed when a batch is used.
            0 = sample each batch's weak completions when it is used. Either way the weak completion of a row is drawn
            from noise seeded by (seed, epoch, generation batch, global row, token), never from the training RNG, so
            it is the same whatever P, the resume point or the process count.
        entropy_weighted_advantages (`bool`, defaults to `False`):
            Multiply each token's advantage by the WD-DS entropy weight (mean 1 over the global batch).
        entropy_weight_alpha, entropy_weight_beta, entropy_weight_gamma (`float`, defaults to `0.1, 0.8, 0.1`):
            Weights of base difficulty (weak entropy), consolidation (entropy drop weak -> policy) and regression
            (entropy rise), as WD-DS's a, b, c.
        entropy_weight_min, entropy_weight_max (`float`, *optional*):
            Clip the token weights (after the mean-1 normalisation).
        mixing_lambda (`float`, defaults to `1.0`):
            WD-JT in RL: policy log-probs in the loss from lambda * z_policy + (1 - lambda) * z_weak; 1.0 = off.
        mixing_chunk_size (`int`, defaults to `1024`):
            Positions per chunk of the fp32 mixed log-softmax.
    """

    _VALID_DICT_FIELDS = GRPOConfig._VALID_DICT_FIELDS + ["weak_model_init_kwargs"]
    # set by GRPOConfig.__post_init__ from steps_per_generation (or the reverse): not copied from a GRPOConfig
    _DERIVED_FIELDS = ("generation_batch_size",)

    weak_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Local folder of the weak checkpoint (earlier checkpoint of the same model, safetensors). "
            "With PEFT, peft_base_as_weak=True uses the adapter-disabled base instead."
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
            "adapters disabled as the weak model (no second copy of the weights). Without it, a peft_config "
            "alone is plain TRL GRPO."
        },
    )
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
    weak_is_clip: float = field(
        default=2.0,
        metadata={"help": "c: the per-token importance weight of weak negatives is min(pi_old / pi_weak, c)."},
    )
    weak_rollout_prefetch: int = field(
        default=3,
        metadata={
            "help": "P: sample the weak completions of the next P generation batches in the same weak generate "
            "call as the current batch's (one call every P + 1 generation batches). Each weak row's sample is "
            "seeded by (seed, epoch, generation batch, global row), so this gives the same samples and only "
            "amortises the decode. 0: sample per batch."
        },
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
    mixing_chunk_size: int = field(
        default=DEFAULT_CHUNK_SIZE, metadata={"help": "Positions per chunk of the fp32 mixed log-softmax."}
    )

    def __post_init__(self):
        # every numeric WMSS field: converted (a YAML/JSON string "0.5" becomes 0.5), finite and in range, kept
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
        self.weak_is_clip = check_float(
            "weak_is_clip",
            self.weak_is_clip,
            low=0.0,
            low_open=True,
            hint="It truncates the importance weight min(pi_old / pi_weak, c).",
        )
        self.weak_rollout_prefetch = check_int(
            "weak_rollout_prefetch",
            self.weak_rollout_prefetch,
            low=0,
            hint="0 samples each batch's weak completions when it is used.",
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
        super().__post_init__()
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
    def needs_weak_model(self) -> bool:
        """True when an option that needs the weak model beyond the KL reference is on."""
        return self.num_weak_generations > 0 or self.entropy_weighted_advantages or self.mixing_lambda < 1.0


class WMSSGRPOTrainer(CompleteCheckpointResume, WMSSModelCard, GRPOTrainer):
    """[`~trl.GRPOTrainer`] with a weak checkpoint as reference, source of negatives and entropy anchor.

    Args:
        model, reward_funcs, args, ...: exactly as [`~trl.GRPOTrainer`] (`args` must be a [`WMSSGRPOConfig`]).
        weak_model (`PreTrainedModel` or `str`, *optional*):
            The weak checkpoint (a model or its local folder); overrides `args.weak_model_name_or_path`. With a PEFT
            policy, `args.peft_base_as_weak=True` uses the same network with adapters disabled instead. Without a weak
            model this is TRL's `GRPOTrainer`.

    Overridden hooks: `_generate_and_score_completions` (calls TRL's, then adds weak rows, reference log-probs and
    token advantages), `_calculate_rewards` (remembers the gathered rewards), `_get_per_token_logps_and_entropies`
    (mixed log-probs for the policy when `mixing_lambda < 1`), `_compute_loss` (drops the zero-weight padding rows,
    then calls TRL's), and, with weak negatives, transformers' `get_batch_samples` (read-ahead, batch numbering) and
    `_run_epoch` (records the epoch and the batches a resumed run skips).

    Logged metrics (namespace `wmss/`): `weak_accuracy`, `weak_reward`, `weak_negatives_per_group`,
    `frac_groups_with_weak_negative`, `weak_negative_logp` (policy's mean token log-prob of the selected negatives),
    `weak_negative_advantage`, `is_weight_mean`/`is_weight_max`, `adv_weight_mean`/`adv_weight_std`/`adv_weight_max`,
    `weak_entropy`, `policy_entropy`, `kl_weak` (k3 estimate of KL(policy || weak) on the policy's samples, when both
    log-probs are at hand), `kl_weak_ref` (with `beta > 0` and a weak model: the KL term of the loss, to the weak
    reference; TRL's `kl`, the KL to a copy of the initial policy, is then not logged). The completions table gets a
    `wmss_source` column (`policy`, `weak_negative` or `weak_unused`).
    """

    _wmss_name = "WMSS-GRPO"

    def __init__(
        self, model, reward_funcs=None, args: WMSSGRPOConfig | None = None, *pargs, weak_model=None, **kwargs
    ):
        require_safetensors(model, "policy")
        args = as_wmss_config(args, WMSSGRPOConfig, model, "GRPO")
        given = (
            inspect.signature(GRPOTrainer.__init__).bind(self, model, reward_funcs, args, *pargs, **kwargs).arguments
        )
        separate_weak = weak_model is not None or bool(args.weak_model_name_or_path)
        self._check_request(model, args, weak_model, given.get("peft_config"), given.get("train_dataset"))
        for which in ("train_dataset", "eval_dataset"):  # before any model loads
            check_dataset_columns(given.get(which), "grpo", name=which, reward_funcs=reward_funcs)
        if separate_weak and args.sync_ref_model:
            raise ValueError(
                "sync_ref_model=True would overwrite the weak reference model with the policy; WMSS keeps the weak "
                "checkpoint frozen. Set sync_ref_model=False."
            )
        # A separate weak model replaces TRL's reference model: GRPOTrainer must not load and shard a copy of the
        # policy as reference (see cpu-setup.md section 5)
        with grpo_without_reference_model(args) if separate_weak else contextlib.nullcontext(args.beta) as beta:
            super().__init__(model, reward_funcs, args, *pargs, **kwargs)
        self.beta = beta
        self._setup_wmss(weak_model, separate_weak)

    @staticmethod
    def _check_request(model, args: WMSSGRPOConfig, weak_model, peft_config, train_dataset) -> None:
        """Refuse, before any model loads, what cannot run: a WMSS option without a weak model, ``peft_base_as_weak``
        without PEFT (or together with a weak model), a pickle-only weak folder, a training set with no batch."""
        separate_weak = weak_model is not None or bool(args.weak_model_name_or_path)
        peft = is_peft_model(model) or peft_config is not None
        if args.peft_base_as_weak and separate_weak:
            raise ValueError(
                "peft_base_as_weak=True and a weak model (weak_model= or weak_model_name_or_path) were both given; "
                "choose one: drop the weak model to use the adapter-disabled base, or set peft_base_as_weak=False."
            )
        if args.peft_base_as_weak and not peft:
            raise ValueError(
                "peft_base_as_weak=True needs a PEFT policy (a PeftModel or peft_config=, e.g. a LoraConfig), whose "
                "adapter-disabled base is the weak model. Pass peft_config, or give a weak model with weak_model= or "
                "weak_model_name_or_path instead."
            )
        if not (separate_weak or args.peft_base_as_weak) and args.needs_weak_model:
            options = [
                name
                for name, on in (
                    ("num_weak_generations > 0", args.num_weak_generations > 0),
                    ("entropy_weighted_advantages=True", args.entropy_weighted_advantages),
                    ("mixing_lambda < 1", args.mixing_lambda < 1.0),
                )
                if on
            ]
            raise ValueError(
                f"{', '.join(options)} needs a weak model, and none was given. Pass weak_model= to the trainer or set "
                "weak_model_name_or_path (a local checkpoint folder of an earlier version of the model), or, with a "
                "PEFT policy, set peft_base_as_weak=True to use its adapter-disabled base; or turn the option off."
            )
        for weak in (weak_model, args.weak_model_name_or_path):
            if isinstance(weak, (str, os.PathLike)):
                require_safetensors(weak, "weak model")
        if (
            train_dataset is not None
            and not isinstance(train_dataset, IterableDataset)
            and hasattr(train_dataset, "__len__")
        ):
            n, per_batch = len(train_dataset), args.generation_batch_size // args.num_generations
            if n == 0:
                raise ValueError(
                    "the training dataset is empty (0 prompts), so GRPO would train 0 steps. Pass a train_dataset with "
                    "a 'prompt' column holding at least one row (check the split and any filtering upstream)."
                )
            if n < per_batch:
                raise ValueError(
                    f"the training dataset has {n} prompt(s), fewer than the {per_batch} distinct prompts of one "
                    f"generation batch (generation_batch_size {args.generation_batch_size} / num_generations "
                    f"{args.num_generations}). TRL's sampler drops an incomplete generation batch, so GRPO would train "
                    "0 steps. Add prompts, or lower per_device_train_batch_size or steps_per_generation (or raise "
                    "num_generations)."
                )

    # ------------------------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------------------------

    def _setup_wmss(self, weak_model, separate_weak: bool) -> None:
        args = self.args
        self.num_weak_generations = args.num_weak_generations
        self.max_weak_negatives = args.max_weak_negatives
        self._use_negatives = args.num_weak_generations > 0
        self._use_entropy_weights = args.entropy_weighted_advantages
        # With one micro-batch per generation batch and one iteration, the loss's own forward sees the whole local
        # batch with the parameters of generation time, so the policy log-probs and entropies that the entropy
        # weights and the importance weights need are taken from it (no extra policy forward)
        self._defer_to_loss = args.steps_per_generation == 1 and args.num_iterations == 1
        # weak completions sampled ahead of use (see `get_batch_samples` and `_weak_samples`)
        self._weak_prefetch = args.weak_rollout_prefetch if self._use_negatives else 0
        self._prefetch_source, self._prefetched, self._returned = None, deque(), []
        self._epoch_start, self._epoch, self._next_position = (0, 0), 0, 0
        self._weak_cache: dict[tuple[int, int], tuple[list, list]] = {}
        self._cached_policy_forward = None
        self.mixing_lambda = args.mixing_lambda
        self._use_mixing = args.mixing_lambda < 1.0
        self._wmss_rewards_per_func = None
        self._wmss_debug: dict[str, Any] = {}

        self.weak_model = None
        self._weak_source = None  # "model": a separate frozen model; "peft_base": the policy with adapters disabled
        self.wmss_enabled = separate_weak or args.peft_base_as_weak  # a weak model is in use
        if not self.wmss_enabled:
            if self.accelerator.is_main_process:
                logger.warning(
                    "WMSS inactive: no weak model given, so this is TRL's GRPOTrainer. Pass weak_model= or "
                    "weak_model_name_or_path (or peft_base_as_weak=True with PEFT) to enable it."
                )
        elif args.needs_weak_model or self.beta != 0.0:
            if self._use_negatives:
                self._check_negative_rewards()  # before loading anything
            if self._is_vlm or self.tools or self.rollout_func is not None or self.environment_factories is not None:
                raise NotImplementedError(
                    "WMSS-GRPO supports single-turn text generation; tools, environments, rollout_func and "
                    "vision-language models are not supported with a weak model or the WMSS options."
                )
            if args.peft_base_as_weak:
                self._weak_source = "peft_base"
            else:
                weak, path = resolve_weak_model(
                    weak_model, args.weak_model_name_or_path, args.weak_model_init_kwargs, self.model, required=True
                )
                check_weak_compatible(self.model, weak, self.processing_class, path)
                self.weak_model = prepare_weak_model(
                    weak,
                    self.accelerator,
                    self.is_deepspeed_enabled,
                    fused_lm_head_kwargs={
                        "temperature": self.temperature,
                        "cast_lm_head_to_fp32": args.cast_lm_head_to_fp32,
                        "outputs": ("log_probs", "entropy"),
                    },
                )
                self.ref_model = self.weak_model  # the weak checkpoint IS the reference policy
                self._weak_source = "model"
        else:
            logger.warning(
                "A weak model was given, but beta=0 and every WMSS option is off, so it is not used and not loaded: "
                "this run is vanilla GRPO."
            )
        self._weak_ref = self._weak_source is not None and self.beta != 0.0
        self._wmss_hook = self._weak_ref or self._use_negatives or self._use_entropy_weights

        if self._use_negatives:
            self._weak_generation_config = self._build_weak_generation_config()
            if self._weak_generation_config.num_beams not in (None, 1) or (
                self._weak_generation_config.watermarking_config is not None
            ):
                raise NotImplementedError(
                    "weak negatives sample the weak model token by token with the policy's sampling settings; beam "
                    "search (num_beams > 1) and watermarking in generation_kwargs are not supported with them."
                )
            # the completions table holds the weak rows too: widen TRL's log buffers
            size = (
                args.generation_batch_size * (self.num_generations + self.num_weak_generations) // self.num_generations
            )
            self._logs = {
                "images": deque(maxlen=size),
                "prompt": deque(maxlen=size),
                "completion": deque(maxlen=size),
                "rewards": defaultdict(lambda: deque(maxlen=size)),
                "advantages": deque(maxlen=size),
                "extra": defaultdict(lambda: deque(maxlen=size)),
            }

    def _check_negative_rewards(self) -> None:
        names = list(self.reward_func_names)
        if not names:
            raise ValueError(
                "weak negatives need a reward function that can mark a completion wrong, but no reward function was "
                "given. Pass reward_funcs (e.g. a verifier returning 1 for right and 0 for wrong answers)."
            )
        name = self.args.weak_correctness_reward
        if name is not None:
            if name not in names:
                raise ValueError(f"weak_correctness_reward={name!r} is not one of the reward functions {names}.")
            self._correctness_index = names.index(name)
        else:
            self._correctness_index = None
            if not bool((self.reward_weights != 0).any()):
                raise ValueError(
                    "weak negatives need a reward function that can mark a completion wrong, but every reward weight "
                    f"is 0 ({self.reward_weights.tolist()}), so every weak completion would get reward 0. Give a "
                    "verifier a non-zero weight, or name it with weak_correctness_reward."
                )

    def _build_weak_generation_config(self) -> GenerationConfig:
        """The policy's HF generation config (vLLM runs build the equivalent from the same sampling settings)."""
        if getattr(self, "generation_config", None) is not None:
            return self.generation_config
        return GenerationConfig(
            max_new_tokens=self.max_completion_length,
            do_sample=True,
            pad_token_id=self._tokenizer.pad_token_id,
            bos_token_id=self._tokenizer.bos_token_id,
            eos_token_id=self.eos_token_ids,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            disable_compile=True,
        )

    # ------------------------------------------------------------------------------------------------------------
    # model helpers
    # ------------------------------------------------------------------------------------------------------------

    def _is_policy(self, model) -> bool:
        return model is self.model or model is self.model_wrapped or getattr(model, "module", None) is self.model

    @contextlib.contextmanager
    def _weak_engine(self):
        """Yields the model to call for weak log-probs/logits (no grad): the weak engine, or the policy with adapters
        disabled."""
        with torch.no_grad():
            if self._weak_source == "model":
                yield self.weak_model
            else:
                with self.model.disable_adapter():
                    yield self.model

    def _plain_logps(self, model, input_ids, attention_mask, logits_to_keep, compute_entropy):
        """TRL's fused log-probs/entropies, never mixed (for the weak model, and for stats of the pure policy)."""
        return GRPOTrainer._get_per_token_logps_and_entropies(
            self,
            model,
            input_ids,
            attention_mask,
            logits_to_keep,
            batch_size=self.args.per_device_train_batch_size,
            compute_entropy=compute_entropy,
        )[:2]

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **multimodal,
    ):
        """TRL's method, except for the policy under WD-JT (``mixing_lambda < 1``): log-probs of the mixed logits.

        ``log p_mix(y_t) = log softmax(lambda * z_policy / T + (1 - lambda) * z_weak / T)[y_t]`` with gradient only
        through the policy logits (:func:`wmss_trl.mixing.mixed_token_logprobs`). The entropies returned are the
        policy's own (not the mixture's), as in TRL's ``entropy`` metric.
        """
        cached = getattr(self, "_cached_policy_forward", None)
        if (
            cached is not None
            and self._is_policy(model)
            and cached[0].shape == input_ids.shape
            and torch.equal(cached[0], input_ids)
        ):
            self._cached_policy_forward = None
            return cached[1]
        if (
            not getattr(self, "_use_mixing", False)
            or not self._is_policy(model)
            or any(v is not None for v in multimodal.values())
        ):
            return super()._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                batch_size=batch_size,
                compute_entropy=compute_entropy,
                compute_aux_loss=compute_aux_loss,
                **multimodal,
            )
        batch_size = batch_size or input_ids.size(0)
        all_logps, all_entropies, all_aux = [], [], []
        needs_entropy_grad = torch.is_grad_enabled() and getattr(self, "_entropy_bonus_enabled", False)
        for start in range(0, input_ids.size(0), batch_size):
            ids, mask = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
            fwd = {
                "input_ids": ids,
                "attention_mask": mask,
                "logits_to_keep": logits_to_keep + 1,
                "use_cache": False,
                "fused_lm_head": False,
            }
            with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
                with self._weak_engine() as weak, self.accelerator.autocast():
                    weak_logits = weak(**fwd).logits[:, :-1].float() / self.temperature
            if compute_aux_loss:
                fwd["output_router_logits"] = True
            with self.accelerator.autocast():
                outputs = model(**fwd)
            logits = outputs.logits[:, :-1].float() / self.temperature
            tokens = ids[:, -logits_to_keep:]
            all_logps.append(
                mixed_token_logprobs(logits, weak_logits, tokens, self.mixing_lambda, self.args.mixing_chunk_size)
            )
            if compute_entropy:
                if needs_entropy_grad:
                    all_entropies.append(torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1))
                else:
                    all_entropies.append(token_entropy(logits.detach(), self.args.mixing_chunk_size))
            if compute_aux_loss:
                all_aux.append(outputs.aux_loss)
        logps = torch.cat(all_logps)
        entropies = torch.cat(all_entropies) if compute_entropy else None
        aux_loss = torch.stack(all_aux).mean() if compute_aux_loss else None
        return logps, entropies, aux_loss

    # ------------------------------------------------------------------------------------------------------------
    # rewards
    # ------------------------------------------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._wmss_rewards_per_func = rewards_per_func  # gathered (global) rewards of the last call
        return rewards_per_func

    def _aggregate(self, rewards_per_func: torch.Tensor) -> torch.Tensor:
        return aggregate_rewards(rewards_per_func, self.reward_weights)

    def _correctness(self, rewards_per_func: torch.Tensor) -> torch.Tensor:
        if self._correctness_index is not None:
            return rewards_per_func[:, self._correctness_index]
        return self._aggregate(rewards_per_func)

    # ------------------------------------------------------------------------------------------------------------
    # weak rollouts
    # ------------------------------------------------------------------------------------------------------------

    def _weak_generate(
        self, prompt_ids_list: list[list[int]], row_keys: list[tuple[int, ...]]
    ) -> tuple[list[list[int]], list[list[float]]]:
        """Sample one completion per prompt from the weak model, on every process in lockstep (ZeRO-3 gathers the
        weak shards in ``unwrap_model_for_generation``). Returns completion ids cut after the first EOS, like TRL,
        and the weak model's log-prob of each sampled token, ``log softmax(z / T)``, recorded while sampling (the
        behaviour log-probs of the importance weights, without a second forward).

        Row ``i``'s tokens are drawn by :class:`GumbelMaxSampler` from the noise of ``row_keys[i]`` (see
        :meth:`_weak_row_keys`), never from torch's global RNG, so the training RNG stream (the policy's samples,
        TRL's shuffle) is the same whether and when the weak model samples."""
        device = self.accelerator.device
        prompts = [torch.tensor(ids) for ids in prompt_ids_list]
        input_ids = pad(
            prompts,
            padding_value=self._tokenizer.pad_token_id,
            padding_side="left",
            pad_to_multiple_of=self.pad_to_multiple_of,
        ).to(device)
        attention_mask = pad(
            [torch.ones_like(t) for t in prompts],
            padding_value=0,
            padding_side="left",
            pad_to_multiple_of=self.pad_to_multiple_of,
        ).to(device)
        engine = self.weak_model if self._weak_source == "model" else self.model_wrapped
        with (
            unwrap_model_for_generation(
                engine,
                self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                generation_kwargs=getattr(self, "generation_kwargs", None),
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as unwrapped,
            torch.no_grad(),
        ):
            adapters_off = (
                unwrapped.disable_adapter() if self._weak_source == "peft_base" else contextlib.nullcontext()
            )
            recorder = SampledTokenLogProbs(self.temperature)
            # the settings `generate` would use (ours over the model's generation_config over transformers' defaults)
            settings = unwrapped._prepare_generation_config(self._weak_generation_config)[0]
            # it filled in transformers' default max_length (20) / min_length (0): unset those, as generate would, or
            # every call warns "both max_new_tokens and max_length (min_new_tokens and min_length) seem to be set"
            if settings.max_new_tokens is not None:
                settings.max_length = None
            if settings.min_new_tokens is not None:
                settings.min_length = None
            processors = [recorder]
            if settings.do_sample:  # decode greedily, with the sampling warpers and the seeded Gumbel-max draw
                processors += [*sampling_warpers(settings), GumbelMaxSampler(row_keys, input_ids.size(1))]
                settings = greedy_copy(settings)
            with adapters_off:
                out = unwrapped.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    generation_config=settings,
                    logits_processor=LogitsProcessorList(processors),
                )
        completion_ids = out[:, input_ids.size(1) :]
        logps = recorder.finish(completion_ids)
        ids = [cut_at_eos(row, set(self.eos_token_ids))[0] for row in completion_ids.tolist()]
        return ids, [lp[: len(row)] for lp, row in zip(logps.tolist(), ids, strict=True)]

    @property
    def _generate_every(self) -> int:
        """Micro-steps per generation batch: TRL's dataloader yields each generation batch this many times."""
        return self.args.steps_per_generation * self.num_iterations

    def _run_epoch(self, *args, **kwargs):
        """Transformers' epoch loop. Records the epoch and how many of its batches a resumed run skips, so that
        :meth:`get_batch_samples` knows the position of every batch it reads (the key of its weak samples)."""
        given = inspect.signature(super()._run_epoch).bind(*args, **kwargs).arguments
        resumed = given["resume_from_checkpoint"] is not None and given["epoch"] == given["epochs_trained"]
        skipped = given["steps_trained_in_current_epoch"] if resumed and not self.args.ignore_data_skip else 0
        self._epoch_start = (given["epoch"], skipped)
        return super()._run_epoch(*args, **kwargs)

    def _get_train_sampler(self, dataset=None):
        """TRL's sampler, wrapped so that a run resumed in a later epoch gets that epoch's prompt order
        (:class:`EpochOrderedSampler`); an uninterrupted run gets exactly TRL's order."""
        sampler = super()._get_train_sampler(dataset)
        return EpochOrderedSampler(sampler) if isinstance(sampler, RepeatSampler) else sampler

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Transformers' method, reading ``weak_rollout_prefetch = P`` generation batches ahead of training so that
        their weak completions can be sampled together with the current batch's (:meth:`_weak_samples`), and
        numbering the batches of the epoch as they are read. Training gets the same batches in the same order."""
        if not self._use_negatives:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        if epoch_iterator is not self._prefetch_source:  # a new epoch (or a resumed run): nothing read ahead yet
            self._prefetch_source, self._prefetched, self._weak_cache = epoch_iterator, deque(), {}
            self._epoch, self._next_position = self._epoch_start
        every = self._generate_every
        # read no batch that training will not reach (max_steps), so no weak completion is sampled in vain
        left = (self.state.max_steps - self.state.global_step) * self.args.gradient_accumulation_steps
        while len(self._prefetched) < max(num_batches, min(num_batches + self._weak_prefetch * every, left)):
            try:
                self._prefetched.append((self._next_position, next(epoch_iterator)))
            except StopIteration:
                break
            self._next_position += 1
        self._returned = [self._prefetched.popleft() for _ in range(min(num_batches, len(self._prefetched)))]
        batches = [batch for _, batch in self._returned]
        return batches, self._get_num_items_in_batch(batches, device)

    def _generation_batches(self, current) -> list[tuple[tuple[int, int], list[dict] | None]]:
        """``(key, batch)`` of the current generation batch, then of the next (at most P) ones that
        :meth:`get_batch_samples` has read. ``key = (epoch, index of the generation batch in the epoch)``; a batch
        that did not come from the training loop (a direct call) gets ``(-1, TRL's micro-step // micro-steps per
        generation)``."""
        every = self._generate_every
        window = [*self._returned, *self._prefetched]
        here = next((i for i, (_, batch) in enumerate(window) if batch is current), None)
        if here is None:
            return [((-1, self._step // every), current)]
        ahead = window[here::every][: 1 + self._weak_prefetch]
        return [((self._epoch, position // every), batch) for position, batch in ahead]

    def _weak_inputs(self, inputs: list[dict]) -> list[dict]:
        """The rows of this process's ``n_w = B * K / G`` weak completions (weak row ``l`` uses policy row
        ``l * G // K``)."""
        g, k = self.num_generations, self.num_weak_generations
        return [inputs[(j * g) // k] for j in range(len(inputs) * k // g)]

    def _weak_row_keys(self, key: tuple[int, int], n_rows: int) -> list[tuple[int, ...]]:
        """The noise keys of this process's ``n_rows`` weak rows of the generation batch ``key = (epoch, index)``:
        ``(seed, epoch, index, j)`` with ``j`` the row's position in the GLOBAL batch (``rank * n_rows + l``), so a
        row's sample does not depend on the process count, the read-ahead or the resume point."""
        first = self.accelerator.process_index * n_rows
        return [(self.args.seed, *key, first + row) for row in range(n_rows)]

    def _weak_samples(self, inputs: list[dict], prompt_ids_list: list[list[int]]):
        """One fresh weak completion (ids, behaviour log-probs) per prompt of ``prompt_ids_list``.

        With ``weak_rollout_prefetch = P > 0`` they come from a cache that one weak ``generate`` call fills, every
        ``P + 1`` generation batches, with the completions of this batch and of the next P (already read by
        :meth:`get_batch_samples`). The draws are keyed per row (:meth:`_weak_row_keys`), so each batch gets the
        same completions as when sampled on use (up to floating point, see :class:`GumbelMaxSampler`). On small
        per-device batches a decode step costs about the same for 2 rows as for 8 (every token runs the whole model
        whatever the row count), which this amortises. Under several processes the decision to generate is taken
        together, since ``generate`` is a collective under ZeRO-3.
        """
        batches = self._generation_batches(inputs)
        key = batches[0][0]
        if self._max_over_processes(int(key not in self._weak_cache)):  # some process lacks them: all generate
            prompt_ids, row_keys, spans = [], [], []
            for batch_key, batch in batches:
                ids = (
                    prompt_ids_list
                    if batch is inputs
                    else self._tokenize_prompts([x["prompt"] for x in self._weak_inputs(batch)])[0]
                )
                spans.append((batch_key, len(prompt_ids), len(prompt_ids) + len(ids)))
                prompt_ids += ids
                row_keys += self._weak_row_keys(batch_key, len(ids))
            ids, logps = self._weak_generate(prompt_ids, row_keys)
            self._weak_cache = {k: (ids[a:b], logps[a:b]) for k, a, b in spans}
        return self._weak_cache.pop(key)

    def _weak_rollouts(self, inputs: list[dict]) -> dict[str, Any]:
        """Generate and score this process's ``n_w = B * K / G`` weak completions (see the module docstring)."""
        w_inputs = self._weak_inputs(inputs)
        prompts = [x["prompt"] for x in w_inputs]
        prompt_ids_list, _, _ = self._tokenize_prompts(prompts)
        completion_ids_list, behaviour_logps = self._weak_samples(inputs, prompt_ids_list)
        if is_conversational({"prompt": prompts[0]}):
            texts = self.processing_class.batch_decode(completion_ids_list, skip_special_tokens=True)
            completions = [[{"role": "assistant", "content": t}] for t in texts]
        else:
            completions = self.processing_class.batch_decode(completion_ids_list, skip_special_tokens=True)

        # the same reward functions; their log_extra columns go to the weak rows, their log_metric values are dropped
        # (they would otherwise be averaged into the policy's reward metrics at the next step)
        pending_extra, pending_metrics = dict(self._pending_extra_logs), dict(self._pending_metrics)
        self._pending_extra_logs.clear()
        self._pending_metrics.clear()
        rewards_per_func = self._calculate_rewards(w_inputs, prompts, completions, completion_ids_list)
        weak_extra = dict(self._pending_extra_logs)
        self._pending_extra_logs.clear()
        self._pending_metrics.clear()
        self._pending_extra_logs.update(pending_extra)
        self._pending_metrics.update(pending_metrics)

        truncated = [
            len(ids) == 0 or ids[-1] not in [*self.eos_token_ids, self._tokenizer.pad_token_id]
            for ids in completion_ids_list
        ]
        return {
            "prompt_ids": prompt_ids_list,
            "completion_ids": completion_ids_list,
            "behaviour_logps": behaviour_logps,
            "prompts": prompts,
            "completions": completions,
            "rewards_per_func": rewards_per_func,  # (world * n_w, F), gathered
            "truncated": truncated,
            "extra": weak_extra,
        }

    # ------------------------------------------------------------------------------------------------------------
    # the generation hook
    # ------------------------------------------------------------------------------------------------------------

    def _generate_and_score_completions(self, inputs):
        if not self._wmss_hook:
            return super()._generate_and_score_completions(inputs)
        # the reference log-probs are computed in `_add_wmss`, with the weak model, in one forward
        with grpo_without_reference_logps(self, active=self._weak_ref):
            output = super()._generate_and_score_completions(inputs)
        return self._add_wmss(inputs, output, self._wmss_rewards_per_func)

    def _add_wmss(self, inputs, out: dict, rewards_per_func: torch.Tensor) -> dict:
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        use_neg = self._use_negatives and mode == "train"
        use_ent = self._use_entropy_weights and mode == "train"
        known = {
            "prompt_ids",
            "prompt_mask",
            "completion_ids",
            "completion_mask",
            "advantages",
            "num_items_in_batch",
            "old_per_token_logps",
            "sampling_per_token_logps",
            "importance_sampling_ratio",
            "ref_per_token_logps",
        }
        unknown = [key for key, v in out.items() if key not in known and v is not None]
        if use_neg and unknown:
            raise NotImplementedError(f"weak negatives cannot extend the batch fields {unknown}.")

        n_pol = out["prompt_ids"].size(0)
        pad_id = self._tokenizer.pad_token_id
        weak = self._weak_rollouts(inputs) if use_neg else None
        n_weak = len(weak["completion_ids"]) if weak is not None else 0

        # ---- one batch: [policy rows; weak rows], prompts left-padded, completions right-padded to common widths
        prompt_ids, prompt_mask = out["prompt_ids"], out["prompt_mask"]
        completion_ids, completion_mask = out["completion_ids"], out["completion_mask"]
        if weak is not None:
            w_prompt = [torch.tensor(x) for x in weak["prompt_ids"]]
            w_comp = [torch.tensor(x, dtype=torch.long) for x in weak["completion_ids"]]
            width_p = max(prompt_ids.size(1), max(len(x) for x in w_prompt))
            width_c = max(completion_ids.size(1), max(len(x) for x in w_comp))
            w_prompt_mask = pad([torch.ones_like(x) for x in w_prompt], 0, "left").to(device)
            w_prompt_ids = pad(w_prompt, pad_id, "left").to(device)
            w_comp_mask = pad([torch.ones_like(x) for x in w_comp], 0, "right").to(device)
            w_comp_ids = pad(w_comp, pad_id, "right").to(device)
            if self.mask_truncated_completions:
                w_comp_mask = w_comp_mask * (~torch.tensor(weak["truncated"], device=device)).unsqueeze(1).int()
            prompt_ids = torch.cat(
                [_pad_to(prompt_ids, width_p, pad_id, "left"), _pad_to(w_prompt_ids, width_p, pad_id, "left")]
            )
            prompt_mask = torch.cat(
                [_pad_to(prompt_mask, width_p, 0, "left"), _pad_to(w_prompt_mask, width_p, 0, "left")]
            )
            completion_ids = torch.cat(
                [_pad_to(completion_ids, width_c, pad_id), _pad_to(w_comp_ids, width_c, pad_id)]
            )
            completion_mask = torch.cat([_pad_to(completion_mask, width_c, 0), _pad_to(w_comp_mask, width_c, 0)])
        n_rows, width = completion_ids.size(0), completion_ids.size(1)
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        rows_w = slice(n_pol, n_rows)

        # ---- forwards (no grad): the weak model and the policy, on the rows that need them
        # weak rows need the weak forward only for the KL reference or their entropies; the importance weights use
        # the behaviour log-probs recorded while sampling
        weak_from = 0 if (self._weak_ref or use_ent) else n_pol
        weak_to = n_rows if (self._weak_ref or use_ent) else n_pol
        defer_ent = use_ent and self._defer_to_loss  # the policy entropies come from the loss's forward
        # so do the importance weights, when the selection needs no plausibility ranking (every wrong answer is kept,
        # M = K) and TRL keeps no old log-probs: then the weak rows need no policy forward here
        defer_is = (
            use_neg
            and self._defer_to_loss
            and self.max_weak_negatives >= self.num_weak_generations
            and out.get("old_per_token_logps") is None
        )
        pol_from = 0 if (use_ent and not defer_ent) else n_pol
        pol_to = n_pol if defer_is else n_rows
        weak_lp = torch.zeros(n_rows, width, device=device)
        weak_h = torch.zeros(n_rows, width, device=device)
        pol_lp = torch.zeros(n_rows, width, device=device)
        pol_h = torch.zeros(n_rows, width, device=device)
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if weak_from < weak_to:
                with self._weak_engine() as engine:
                    lp, h = self._plain_logps(
                        engine, input_ids[weak_from:weak_to], attention_mask[weak_from:weak_to], width, use_ent
                    )
                weak_lp[weak_from:weak_to] = lp.float()
                if h is not None:
                    weak_h[weak_from:weak_to] = h.float()
            if pol_from < pol_to:
                # the policy's log-probs as the loss sees them (mixed under WD-JT), its own entropy
                lp, h, _ = self._get_per_token_logps_and_entropies(
                    self.model,
                    input_ids[pol_from:pol_to],
                    attention_mask[pol_from:pol_to],
                    width,
                    batch_size=self.args.per_device_train_batch_size,
                    compute_entropy=use_ent and not defer_ent,
                )
                pol_lp[pol_from:pol_to] = lp.float()
                if h is not None:
                    pol_h[pol_from:pol_to] = h.float()

        # ---- sequence advantages: TRL's, recomputed for the groups that receive weak negatives
        advantages = out["advantages"]
        source = torch.full((n_rows,), SOURCE_POLICY, dtype=torch.long, device=device)
        rho = behaviour = None
        if weak is not None:
            behaviour = pad([torch.tensor(x, dtype=torch.float32) for x in weak["behaviour_logps"]], 0.0, "right")
            behaviour = _pad_to(behaviour.to(device), width, 0.0)
            self._wmss_debug_weak_mask = completion_mask[rows_w].clone()  # before unselected rows are zeroed
            advantages, weak_adv, selected, stats = self._negatives_and_advantages(
                rewards_per_func, weak, advantages, pol_lp[rows_w], completion_mask[rows_w]
            )
            source[rows_w] = torch.where(selected, SOURCE_WEAK_NEGATIVE, SOURCE_WEAK_UNUSED)
            completion_mask[rows_w] = completion_mask[rows_w] * selected.unsqueeze(1).to(completion_mask.dtype)
            advantages = torch.cat([advantages, weak_adv])
            self._log_negatives(stats)
            if not defer_is:
                rho = torch.ones(n_rows, width, device=device)
                rho[rows_w] = truncated_importance_weights(
                    pol_lp[rows_w], behaviour, completion_mask[rows_w], self.args.weak_is_clip
                )
                rank = self.accelerator.process_index
                plausibility = stats["plausibility"][rank * n_weak : (rank + 1) * n_weak]  # this process's weak rows
                self._log_is_weights(rho[rows_w][selected], completion_mask[rows_w][selected], plausibility[selected])
        loss_mask = completion_mask

        # ---- token weights from the entropy dynamics, normalised over the global batch
        weights = None
        if use_ent and not defer_ent:
            weights = self._entropy_weights(weak_h, pol_h, loss_mask)
            self._log_entropy_stats(weights, weak_h, pol_h, weak_lp, pol_lp, loss_mask, source == SOURCE_POLICY)

        if rho is not None or weights is not None:
            factor = torch.ones(n_rows, width, device=device)
            if rho is not None:
                factor = factor * rho
            if weights is not None:
                factor = factor * weights
            advantages = advantages.unsqueeze(1) * factor

        # ---- the output dict, every per-row field extended to the weak rows / the new width
        out["prompt_ids"], out["prompt_mask"] = prompt_ids, prompt_mask
        out["completion_ids"], out["completion_mask"] = completion_ids, completion_mask
        out["advantages"] = advantages
        out["wmss_source"] = source
        if defer_ent:  # weights applied in `_compute_loss`, from the entropies of its forward
            out["wmss_weak_entropy"] = weak_h
            out["wmss_weak_logps"] = weak_lp
        if defer_is and weak is not None:  # importance weights applied in `_compute_loss`, from its log-probs
            out["wmss_behaviour_logps"] = torch.cat([torch.zeros(n_pol, width, device=device), behaviour])
        if weak is not None:
            out["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()
            if out.get("old_per_token_logps") is not None:
                out["old_per_token_logps"] = torch.cat(
                    [_pad_to(out["old_per_token_logps"], width, 0.0), pol_lp[rows_w]]
                )
            if out.get("sampling_per_token_logps") is not None:
                out["sampling_per_token_logps"] = torch.cat(
                    [_pad_to(out["sampling_per_token_logps"], width, 0.0), behaviour]
                )
            if out.get("importance_sampling_ratio") is not None:
                ratio = out["importance_sampling_ratio"]
                if ratio.size(1) > 1:
                    ratio = _pad_to(ratio, width, 1.0)
                out["importance_sampling_ratio"] = torch.cat([ratio, torch.ones(n_weak, ratio.size(1), device=device)])
        if self._weak_ref:
            # k3 KL is an estimator for the policy's own samples. On the weak negatives' rows the reference is the
            # policy at generation time (a trust region), so the KL term never pulls the policy towards an answer
            # the weak model wrote (with the weak model as reference there, exp(ref - logp) is unbounded).
            ref = weak_lp.clone()
            ref[rows_w] = pol_lp[rows_w]  # (set from the loss's forward in `_compute_loss` when deferred)
            out["ref_per_token_logps"] = ref
        self._wmss_debug = {
            "weak_logps": weak_lp,
            "behaviour_logps": behaviour,
            "policy_logps": pol_lp,
            "weak_entropy": weak_h,
            "policy_entropy": pol_h,
            "is_weight": rho,
            "entropy_weight": weights,
            "source": source,
        }
        self._log_table_rows(weak, out, n_pol, mode)
        return out

    def _entropy_weights(self, weak_h, pol_h, mask):
        args = self.args
        return entropy_advantage_weights(
            weak_h,
            pol_h,
            mask,
            coefs=(args.entropy_weight_alpha, args.entropy_weight_beta, args.entropy_weight_gamma),
            min_weight=args.entropy_weight_min,
            max_weight=args.entropy_weight_max,
            reduce_sum=lambda t: self.accelerator.reduce(t, reduction="sum"),
        )

    def _negatives_and_advantages(self, rewards_per_func, weak, trl_advantages, pol_lp_weak, weak_mask):
        """Select the negatives (globally, identical on all processes) and recompute the touched groups' advantages.
        Returns local policy advantages, local weak advantages, local selection and global stats for logging."""
        device = self.accelerator.device
        g, k = self.num_generations, self.num_weak_generations
        rank, n_pol, n_weak = self.accelerator.process_index, trl_advantages.size(0), pol_lp_weak.size(0)
        plausibility = self.accelerator.gather(sequence_mean(pol_lp_weak, weak_mask))
        valid = self.accelerator.gather((weak_mask.sum(-1) > 0).long()).bool()
        weak_rpf = weak["rewards_per_func"]
        n_groups = weak_rpf.size(0) // k
        correctness = self._correctness(weak_rpf)
        selected = select_weak_negatives(
            correctness.view(n_groups, k),
            plausibility.view(n_groups, k),
            self.args.weak_negative_threshold,
            self.max_weak_negatives,
            valid.view(n_groups, k),
        )
        policy_rewards = self._aggregate(rewards_per_func).view(n_groups, g)
        batch_std = nanstd(policy_rewards.flatten()) if self.scale_rewards == "batch" else None
        weak_rewards = self._aggregate(weak_rpf).view(n_groups, k)
        adv, weak_adv, touched = advantages_with_weak_negatives(
            policy_rewards, weak_rewards, selected, self.scale_rewards, batch_std
        )
        pol_index = torch.arange(rank * n_pol, (rank + 1) * n_pol, device=device)
        local_adv = torch.where(touched[pol_index // g], adv.flatten()[pol_index], trl_advantages)
        weak_index = slice(rank * n_weak, (rank + 1) * n_weak)
        # for the completions table: global advantages of every row
        trl_all = self.accelerator.gather(trl_advantages)
        all_index = torch.arange(n_groups * g, device=device)
        global_adv = torch.where(touched[all_index // g], adv.flatten(), trl_all)
        stats = {
            "correctness": correctness,
            "selected": selected,
            "plausibility": plausibility,
            "touched": touched,
            "weak_rewards": weak_rewards,
            "weak_adv": weak_adv,
            "policy_adv": global_adv,
            "policy_rewards": policy_rewards,
        }
        self._wmss_debug_negatives = stats
        return local_adv, weak_adv.flatten()[weak_index], selected.flatten()[weak_index], stats

    # ------------------------------------------------------------------------------------------------------------
    # metrics and the completions table
    # ------------------------------------------------------------------------------------------------------------

    def _log_negatives(self, stats):
        metrics = self._metrics["train"]
        correctness, selected = stats["correctness"], stats["selected"]
        scored = ~torch.isnan(correctness)
        right = (correctness >= self.args.weak_negative_threshold) & scored
        metrics["wmss/weak_accuracy"].append((right.sum() / scored.sum().clamp(min=1)).item())
        metrics["wmss/weak_reward"].append(torch.nanmean(stats["weak_rewards"]).item())
        metrics["wmss/weak_negatives_per_group"].append(selected.float().sum(1).mean().item())
        metrics["wmss/frac_groups_with_weak_negative"].append(stats["touched"].float().mean().item())
        n_sel = selected.sum()
        metrics["wmss/weak_negative_advantage"].append(
            (stats["weak_adv"][selected].sum() / n_sel).item() if n_sel > 0 else float("nan")
        )

    def _log_is_weights(self, rho, mask, plausibility):
        """Metrics of this process's selected negatives (reduced over processes): their importance weights
        ``rho`` and mask ``(n, T)``, and their plausibility ``(n,)`` (mean token log-prob under the policy)."""
        metrics = self._metrics["train"]
        m = mask.float()
        sums = torch.stack(
            [(rho * m).sum(), m.sum(), plausibility.sum(), torch.tensor(float(plausibility.numel()), device=m.device)]
        )
        sums = self.accelerator.reduce(sums.double(), reduction="sum")
        local_max = (rho * m).max() if m.numel() else torch.zeros((), device=m.device)
        metrics["wmss/weak_negative_logp"].append((sums[2] / sums[3]).item() if sums[3] > 0 else float("nan"))
        metrics["wmss/is_weight_mean"].append((sums[0] / sums[1]).item() if sums[1] > 0 else float("nan"))
        metrics["wmss/is_weight_max"].append(
            self.accelerator.gather(local_max.reshape(1).float()).max().item() if sums[1] > 0 else float("nan")
        )

    def _log_entropy_stats(self, weights, weak_h, pol_h, weak_lp, pol_lp, mask, policy_rows):
        metrics = self._metrics["train"]
        m = mask.float()
        mp = m * policy_rows.unsqueeze(1).float()
        log_ratio = torch.where(mp > 0, weak_lp - pol_lp, torch.zeros_like(weak_lp))
        k3 = torch.exp(log_ratio) - log_ratio - 1  # KL(policy || weak) estimate on the policy's own samples
        sums = torch.stack(
            [
                (weights * m).sum(),
                (weights.square() * m).sum(),
                m.sum(),
                (weak_h * m).sum(),
                (pol_h * m).sum(),
                (k3 * mp).sum(),
                mp.sum(),
            ]
        ).double()
        sums = self.accelerator.reduce(sums, reduction="sum")
        n, n_pol_tok = sums[2].clamp(min=1), sums[6].clamp(min=1)
        mean = sums[0] / n
        metrics["wmss/adv_weight_mean"].append(mean.item())
        metrics["wmss/adv_weight_std"].append(torch.sqrt((sums[1] / n - mean**2).clamp(min=0)).item())
        local_max = (weights * m).max().reshape(1)
        metrics["wmss/adv_weight_max"].append(self.accelerator.gather(local_max).max().item())
        metrics["wmss/weak_entropy"].append((sums[3] / n).item())
        metrics["wmss/policy_entropy"].append((sums[4] / n).item())
        metrics["wmss/kl_weak"].append((sums[5] / n_pol_tok).item())

    def _log_table_rows(self, weak, out, n_pol, mode):
        """Add the weak rows to TRL's completions buffers, with a `wmss_source` column (and the recomputed policy
        advantages of groups that received negatives)."""
        world = self.accelerator.num_processes
        self._logs["extra"]["wmss_source"].extend(["policy"] * (n_pol * world))
        if weak is None:
            return
        stats = self._wmss_debug_negatives
        policy_adv = stats["policy_adv"].tolist()
        for _ in range(min(len(policy_adv), len(self._logs["advantages"]))):
            self._logs["advantages"].pop()
        self._logs["advantages"].extend(policy_adv)
        n_weak_global = weak["rewards_per_func"].size(0)
        self._logs["prompt"].extend(gather_object(weak["prompts"]))
        self._logs["completion"].extend(gather_object(weak["completions"]))
        for i, name in enumerate(self.reward_func_names):
            self._logs["rewards"][name].extend(weak["rewards_per_func"][:, i].tolist())
        self._logs["advantages"].extend(stats["weak_adv"].flatten().tolist())
        columns = sorted(set(gather_object(list(weak["extra"]))) | set(self._logs["extra"]))
        for column in columns:
            if column == "wmss_source":
                continue
            values = weak["extra"].get(column, [None] * len(weak["prompts"]))
            self._logs["extra"][column].extend(gather_object(values))
        sources = stats["selected"].flatten().tolist()
        self._logs["extra"]["wmss_source"].extend(
            [SOURCE_NAMES[SOURCE_WEAK_NEGATIVE] if s else SOURCE_NAMES[SOURCE_WEAK_UNUSED] for s in sources]
        )
        assert len(sources) == n_weak_global

    # ------------------------------------------------------------------------------------------------------------
    # loss
    # ------------------------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        """TRL's loss on the rows that carry loss: the zero-weight weak rows (not selected as negatives) are dropped
        first, so they cost no forward/backward and row-averaged losses (``grpo``, ``sapo``, ``luspo``, ``dr_grpo``)
        average over the same rows as without padding. Every process keeps as many rows as the process that keeps the
        most (at least one), topping up with zero-weight rows: TRL gathers per-row metrics, which needs the same row
        count everywhere, and ZeRO-3 needs every process to run the forward. Top-up rows add 0 to every loss; a
        row-averaged loss over ``R`` rows of which ``n`` are real is rescaled by ``R / n``, so it is the mean over the
        real rows, as on one process."""
        source = inputs.get("wmss_source")
        rows = n_real = None
        if source is not None and self._use_negatives:  # without weak negatives every row carries loss
            keep = source != SOURCE_WEAK_UNUSED
            n_real = int(keep.sum())
            rows = max(self._max_over_processes(n_real), 1)
            keep[(~keep).nonzero().flatten()[: rows - n_real]] = True
            if not bool(keep.all()):
                n = source.size(0)
                inputs = {
                    key: value[keep]
                    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.size(0) == n
                    else value
                    for key, value in inputs.items()
                }
        if "wmss_weak_entropy" in inputs or "wmss_behaviour_logps" in inputs:
            inputs = self._apply_deferred_weights(model, dict(inputs))
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._cached_policy_forward = None
        if self._weak_ref:
            self._rename_kl_metric()
        if rows is not None and 0 < n_real < rows and self.loss_type in ROW_AVERAGED_LOSSES:
            loss = loss * (rows / n_real)
        return loss

    def _max_over_processes(self, n: int) -> int:
        """max of ``n`` over the processes (a collective when there are several)."""
        if self.accelerator.num_processes == 1:
            return n
        return int(self.accelerator.gather(torch.tensor([n], device=self.accelerator.device)).max())

    def _rename_kl_metric(self):
        """Move the value TRL's loss just logged as ``kl`` to ``wmss/kl_weak_ref``. With the weak model as reference
        it is mean_t [exp(r_t) - r_t - 1], r_t = log pi_weak(y_t) - log pi(y_t) (k3 estimate of KL(policy || weak)),
        over the loss's tokens, 0 on weak-negative rows (their reference is the generating policy). TRL's ``kl`` means
        the KL to a frozen copy of the initial policy; a WMSS run with a weak reference has none: it logs no ``kl``."""
        metrics = self._metrics["train" if self.model.training else "eval"]
        if metrics.get("kl"):
            metrics["wmss/kl_weak_ref"].append(metrics["kl"].pop())
            if not metrics["kl"]:
                del metrics["kl"]

    def _apply_deferred_weights(self, model, inputs):
        """Entropy weights and/or the negatives' importance weights from the loss's own policy forward (one
        micro-batch per generation batch, one iteration: its log-probs and entropies are those of generation time,
        without a second forward). The forward is cached and handed to TRL's ``_compute_loss`` when it asks for it,
        so the policy runs once. On the negatives' rows the KL reference is the generating policy, i.e. these same
        (detached) log-probs."""
        weak_h, weak_lp = inputs.pop("wmss_weak_entropy", None), inputs.pop("wmss_weak_logps", None)
        behaviour = inputs.pop("wmss_behaviour_logps", None)
        completion_mask = inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        result = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            completion_mask.size(1),
            compute_entropy=True,  # as TRL's loss asks
            compute_aux_loss=self.aux_loss_enabled,
        )
        logps = result[0].detach().float()
        source = inputs["wmss_source"]
        factor = torch.ones_like(logps)
        if behaviour is not None:
            neg = source == SOURCE_WEAK_NEGATIVE
            factor[neg] = truncated_importance_weights(logps[neg], behaviour[neg], mask[neg], self.args.weak_is_clip)
            self._log_is_weights(factor[neg], mask[neg], sequence_mean(logps[neg], mask[neg]))
            if inputs.get("ref_per_token_logps") is not None:
                inputs["ref_per_token_logps"] = torch.where(neg.unsqueeze(1), logps, inputs["ref_per_token_logps"])
            self._wmss_debug.update(is_weight=factor.clone(), loss_policy_logps=logps)
        if weak_h is not None:
            entropies = result[1].detach().float()
            weights = self._entropy_weights(weak_h, entropies, mask)
            factor = factor * weights
            self._log_entropy_stats(weights, weak_h, entropies, weak_lp, logps, mask, source == SOURCE_POLICY)
            self._wmss_debug.update(entropy_weight=weights, policy_entropy=entropies)
        self._wmss_debug.update(loss_source=source)
        advantages = inputs["advantages"]
        inputs["advantages"] = (advantages.unsqueeze(1) if advantages.dim() == 1 else advantages) * factor
        self._cached_policy_forward = (input_ids, result)
        return inputs


class EpochOrderedSampler(torch.utils.data.Sampler):
    """TRL's ``RepeatSampler`` plus ``set_epoch``, so that resuming in epoch e >= 1 keeps epoch e's prompt order.

    The order of epoch e is the (e + 1)-th ``randperm`` of a generator seeded once with ``seed``, which is what an
    uninterrupted run draws. TRL's sampler has no ``set_epoch``, so a new process resumed in epoch e draws the first
    permutation again and replays epoch 0's order. transformers / accelerate call ``set_epoch(e)`` before every
    epoch: it re-seeds the generator and draws the e earlier permutations (one ``randperm(len(dataset))`` each), so
    the order is the uninterrupted run's whether or not the process started in that epoch.
    """

    def __init__(self, sampler: RepeatSampler):
        self.sampler = sampler

    def __iter__(self):
        return iter(self.sampler)

    def __len__(self):
        return len(self.sampler)

    @property
    def generator(self) -> torch.Generator:  # accelerate synchronises a sampler's `generator` across processes
        return self.sampler.generator

    def set_epoch(self, epoch: int) -> None:
        sampler = self.sampler
        if not sampler.shuffle or sampler.seed is None:
            return
        sampler.generator.manual_seed(sampler.seed)
        for _ in range(epoch):
            torch.randperm(sampler.num_samples, generator=sampler.generator)


class SampledTokenLogProbs(LogitsProcessor):
    """Records ``log softmax(scores / T)[sampled token]`` for every generated token, keeping one step's distribution.

    ``generate`` runs user processors before its sampling warpers (temperature, top-k/p), so ``scores`` are the
    model's logits (after penalties, if any were configured) and the recorded values are the temperature-scaled,
    full-vocabulary log-probs, the quantity TRL's fused LM head computes. A step's sampled token is read from the
    next call's ``input_ids``; :meth:`finish` adds the last one.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.previous = None
        self.logps: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        if self.previous is not None:
            self.logps.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, completion_ids: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` log-probs aligned with ``completion_ids``."""
        if self.previous is not None and len(self.logps) < completion_ids.size(1):
            self.logps.append(
                self.previous.gather(1, completion_ids[:, len(self.logps) : len(self.logps) + 1]).squeeze(1)
            )
        self.previous = None
        if not self.logps:
            return torch.zeros(completion_ids.shape, device=completion_ids.device)
        out = torch.stack(self.logps, dim=1)
        return _pad_to(out, completion_ids.size(1), 0.0)[:, : completion_ids.size(1)]


def _pad_to(t: torch.Tensor, width: int, value, side: str = "right") -> torch.Tensor:
    """Pad a ``(B, T)`` tensor to ``(B, width)`` on ``side`` with ``value``."""
    extra = width - t.size(1)
    if extra <= 0:
        return t
    filler = torch.full((t.size(0), extra), value, dtype=t.dtype, device=t.device)
    return torch.cat([filler, t] if side == "left" else [t, filler], dim=1)


def stream_seed(*parts: int) -> int:
    """A 63-bit generator seed from a tuple of integers (BLAKE2b of their text): distinct tuples, unrelated streams."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def sampling_warpers(settings: GenerationConfig) -> list[LogitsProcessor]:
    """The warpers ``generate`` applies after the logits processors when ``do_sample=True`` (transformers 5,
    ``GenerationMixin._get_logits_processor``, one beam): temperature, top-h, top-k, top-p, min-p, typical-p, epsilon
    and eta cutoffs, in that order, each only when its setting is active."""
    c, warpers = settings, []
    if c.temperature is not None and c.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(c.temperature))
    if c.top_h is not None:
        warpers.append(TopHLogitsWarper(top_h=c.top_h))
    if c.top_k is not None and c.top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=c.top_k, min_tokens_to_keep=1))
    if c.top_p is not None and c.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=c.top_p, min_tokens_to_keep=1))
    if c.min_p is not None:
        warpers.append(MinPLogitsWarper(min_p=c.min_p, min_tokens_to_keep=1))
    if c.typical_p is not None and c.typical_p < 1.0:
        warpers.append(TypicalLogitsWarper(mass=c.typical_p, min_tokens_to_keep=1))
    if c.epsilon_cutoff is not None and 0.0 < c.epsilon_cutoff < 1.0:
        warpers.append(EpsilonLogitsWarper(epsilon=c.epsilon_cutoff, min_tokens_to_keep=1))
    if c.eta_cutoff is not None and 0.0 < c.eta_cutoff < 1.0:
        warpers.append(EtaLogitsWarper(epsilon=c.eta_cutoff, min_tokens_to_keep=1))
    return warpers


def greedy_copy(settings: GenerationConfig) -> GenerationConfig:
    """``settings`` with ``do_sample=False`` and every warper setting at transformers' neutral default (the warpers
    and the draw are passed as logits processors instead, see :class:`GumbelMaxSampler`)."""
    greedy = copy.deepcopy(settings)
    greedy.do_sample = False
    for name, neutral in (
        ("temperature", 1.0),
        ("top_h", None),
        ("top_k", 50),
        ("top_p", 1.0),
        ("min_p", None),
        ("typical_p", 1.0),
        ("epsilon_cutoff", 0.0),
        ("eta_cutoff", 0.0),
    ):
        setattr(greedy, name, neutral)
    return greedy


class GumbelMaxSampler(LogitsProcessor):
    """Draws each row's next token from ``softmax(scores)`` as ``argmax_v(scores_v + g_v)``, with Gumbel noise
    ``g = -log(-log u)``, ``u ~ U(0, 1)`` in fp64 from a ``torch.Generator`` seeded by ``(row key, token position)``
    (:func:`stream_seed`). By the Gumbel-max trick the argmax is an exact sample of the softmax; its randomness is the
    row's own, so a row's draw depends only on its key and its logits: not on the other rows of the ``generate`` call,
    nor on torch's global RNG. Placed after the sampling warpers (:func:`sampling_warpers`) in a greedy ``generate``,
    it samples exactly what ``do_sample=True`` would. Returns 0 at the drawn token and -inf elsewhere.

    Floating point: a row's logits can still differ in the last bits with the batch it is decoded in (another batch
    size or padding width changes how the matrix products and the attention softmax are blocked and summed), and a
    near-tie of ``scores + g`` (the two best within such a last-bit difference) can then flip a token, after which
    the completion diverges. The tests measure it: no row flipped (16 weak rows between read-ahead 0 and 3 and
    between 1 and 2 processes, 8 rows decoded alone and together), while the log-probs recorded with them moved by up
    to 4.8e-7. The noise is fp64 and finite (``u`` clamped away from 0), so a filtered token (-inf) is never drawn.
    """

    def __init__(self, row_keys: list[tuple[int, ...]], prompt_width: int):
        self.row_keys = row_keys
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        position = input_ids.size(1) - self.prompt_width  # the completion token being drawn
        noise = torch.stack([self.gumbel(scores.size(1), stream_seed(*key, position)) for key in self.row_keys])
        choice = (scores.double() + noise.to(scores.device)).argmax(dim=-1, keepdim=True)
        return torch.full_like(scores, -math.inf).scatter_(1, choice, 0.0)

    @staticmethod
    def gumbel(size: int, seed: int) -> torch.Tensor:
        """``size`` standard Gumbel variates (fp64, finite) from a generator seeded with ``seed``."""
        u = torch.rand(size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        return -torch.log(-torch.log(u.clamp(min=torch.finfo(torch.float64).tiny)))
