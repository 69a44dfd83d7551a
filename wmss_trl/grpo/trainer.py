"""[`WMSSGRPOTrainer`]: TRL's `GRPOTrainer` plus the weak model; the overrides only (the parts live next to it)."""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections import defaultdict, deque

import torch
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing

from ..card import WMSSModelCard
from ..checkpoints import CompleteCheckpointResume
from ..checks import as_wmss_config
from ..data_checks import check_dataset_columns
from ..trl_compat import grpo_batch_rewards, grpo_without_reference_logps, grpo_without_reference_model
from ..weak import check_weak_compatible, prepare_weak_model, require_safetensors, resolve_weak_model
from . import metrics
from .batch import (
    KNOWN_FIELDS,
    ROW_AVERAGED_LOSSES,
    SOURCE_POLICY,
    SOURCE_WEAK_UNUSED,
    append_weak_rows,
    loss_rows,
    select_rows,
)
from .checks import check_request, correctness_index
from .clock import GenerationClock
from .config import WMSSGRPOConfig
from .forward import mixed_policy_logps
from .negatives import add_negatives
from .stats import StepStats, apply_token_weights
from .weak_sampler import WeakSampler


logger = logging.getLogger(__package__)  # "wmss_trl.grpo", as before the split

# per-row fields of the batch that carry token weights still to be applied (from the loss's own forward)
DEFERRED_FIELDS = ("wmss_weak_entropy", "wmss_weak_logps", "wmss_behaviour_logps")


class WMSSGRPOTrainer(CompleteCheckpointResume, WMSSModelCard, GRPOTrainer):
    """[`~trl.GRPOTrainer`] with a weak checkpoint as reference, source of negatives and entropy anchor.

    Args:
        model, reward_funcs, args, ...: exactly as [`~trl.GRPOTrainer`] (`args` must be a [`WMSSGRPOConfig`]).
        weak_model (`PreTrainedModel` or `str`, *optional*):
            The weak checkpoint (a model or its local folder); overrides `args.weak_model_name_or_path`. With a PEFT
            policy, `args.peft_base_as_weak=True` uses the same network with adapters disabled instead. Without a weak
            model this is TRL's `GRPOTrainer`.

    Overridden TRL hooks (the reviewed list: `trl_overrides.OVERRIDES`): `_generate_and_score_completions` (calls TRL's,
    then adds weak rows, reference log-probs and token advantages), `_get_per_token_logps_and_entropies`
    (mixed log-probs for the policy when `mixing_lambda < 1`; applies deferred token weights in the loss) and
    `_compute_loss` (drops the zero-weight padding rows, then calls TRL's), and `train` (a complete checkpoint to
    resume from). A callback, :class:`~wmss_trl.grpo.clock.GenerationClock` (`generation_clock`), keeps TRL's prompt
    order when a run resumes in a later epoch and numbers the generation batches the weak samples are keyed by.

    Logged metrics (namespace `wmss/`): `weak_accuracy`, `weak_reward`, `weak_negatives_per_group`,
    `frac_groups_with_weak_negative`, `weak_negative_logp` (policy's mean token log-prob of the selected negatives),
    `weak_negative_advantage`, `is_weight_mean`/`is_weight_max`, `adv_weight_mean`/`adv_weight_std`/`adv_weight_max`,
    `weak_entropy`, `policy_entropy`, `kl_weak` (k3 estimate of KL(policy || weak) on the policy's samples, when both
    log-probs are at hand), `kl_weak_ref` (with `beta > 0` and a weak model: the KL term of the loss, to the weak
    reference; TRL's `kl`, the KL to a copy of the initial policy, is then not logged). The completions table gets a
    `wmss_source` column (`policy`, `weak_negative` or `weak_unused`).
    """

    _wmss_name = "WMSS-GRPO"
    weak_sampler: WeakSampler | None = None  # the weak negatives' sampler (None: no weak negatives)
    _loss_batch = None  # the batch TRL's loss is computing, while its token weights wait for the policy forward

    def __init__(
        self, model, reward_funcs=None, args: WMSSGRPOConfig | None = None, *pargs, weak_model=None, **kwargs
    ):
        require_safetensors(model, "policy")
        args = as_wmss_config(args, WMSSGRPOConfig, model, "GRPO")
        given = (
            inspect.signature(GRPOTrainer.__init__).bind(self, model, reward_funcs, args, *pargs, **kwargs).arguments
        )
        separate_weak = weak_model is not None or bool(args.weak_model_name_or_path)
        check_request(model, args, weak_model, given.get("peft_config"), given.get("train_dataset"))
        for which in ("train_dataset", "eval_dataset"):  # before any model loads
            check_dataset_columns(given.get(which), "grpo", name=which, reward_funcs=reward_funcs)
        # A separate weak model replaces TRL's reference model: GRPOTrainer must not load and shard a copy of the
        # policy as reference (see cpu-setup.md section 5)
        with grpo_without_reference_model(args) if separate_weak else contextlib.nullcontext(args.beta) as beta:
            super().__init__(model, reward_funcs, args, *pargs, **kwargs)
        self.beta = beta
        self._setup_wmss(weak_model, separate_weak)

    # ---- setup ---------------------------------------------------------------------------------------------------

    def _setup_wmss(self, weak_model, separate_weak: bool) -> None:
        args = self.args
        self.num_weak_generations, self.max_weak_negatives = args.num_weak_generations, args.max_weak_negatives
        self.mixing_lambda = args.mixing_lambda
        # With one micro-batch per generation batch and one iteration, the loss's own forward sees the whole local
        # batch with the parameters of generation time: the token statistics are taken from it (no extra forward)
        self.stats_from_loss = args.steps_per_generation == 1 and args.num_iterations == 1
        self.wmss_stats: StepStats | None = None
        self.generation_clock = GenerationClock(self)  # TRL's prompt order on resume, the weak samples' keys
        self.add_callback(self.generation_clock)
        self.weak_model = None
        self.weak_source = None  # "model": a separate frozen model; "peft_base": the policy with adapters disabled
        self.wmss_enabled = separate_weak or args.peft_base_as_weak  # a weak model is in use
        if not self.wmss_enabled:
            if self.accelerator.is_main_process:
                logger.warning(
                    "WMSS inactive: no weak model given, so this is TRL's GRPOTrainer. Pass weak_model= or "
                    "weak_model_name_or_path (or peft_base_as_weak=True with PEFT) to enable it."
                )
        elif args.needs_weak_model or self.beta != 0.0:
            self._load_weak(weak_model)
        else:
            logger.warning(
                "A weak model was given, but beta=0 and every WMSS option is off, so it is not used and not loaded: "
                "this run is vanilla GRPO."
            )
        if args.num_weak_generations > 0:
            prefetch = args.weak_rollout_prefetch if args.weak_rollouts_path is None else 0
            self.weak_sampler = WeakSampler(self, prefetch, weak_model)
            # the completions table holds the weak rows too: widen TRL's log buffers
            size = (
                args.generation_batch_size * (self.num_generations + self.num_weak_generations) // self.num_generations
            )
            self._logs = {
                name: defaultdict(lambda: deque(maxlen=size)) if name in ("rewards", "extra") else deque(maxlen=size)
                for name in ("images", "prompt", "completion", "rewards", "advantages", "extra")
            }

    def _load_weak(self, weak_model) -> None:
        args = self.args
        if args.num_weak_generations > 0:  # before loading anything
            self.correctness_index = correctness_index(
                self.reward_func_names, self.reward_weights, args.weak_correctness_reward
            )
        if self._is_vlm or self.tools or self.rollout_func is not None or self.environment_factories is not None:
            raise NotImplementedError(
                "WMSS-GRPO supports single-turn text generation; tools, environments, rollout_func and "
                "vision-language models are not supported with a weak model or the WMSS options."
            )
        if args.peft_base_as_weak:
            self.weak_source = "peft_base"
            return
        if not args.weak_model_loaded:  # a pool or vLLM decodes the weak negatives; nothing else reads the weak model
            if args.weak_vllm_backend is not None:  # (a pool: its fingerprint) the vocabularies, without loading it
                weak = weak_model if weak_model is not None else args.weak_model_name_or_path
                check_weak_compatible(self.model, weak, self.processing_class)
            return
        weak, path = resolve_weak_model(
            weak_model, args.weak_model_name_or_path, args.weak_model_init_kwargs, self.model, required=True
        )
        check_weak_compatible(self.model, weak, self.processing_class, path)
        fused = {"temperature": self.temperature, "cast_lm_head_to_fp32": args.cast_lm_head_to_fp32}
        self.weak_model = prepare_weak_model(
            weak,
            self.accelerator,
            self.is_deepspeed_enabled,
            fused_lm_head_kwargs={**fused, "outputs": ("log_probs", "entropy")},
        )
        self.ref_model = self.weak_model  # the weak checkpoint IS the reference policy
        self.weak_source = "model"

    @property
    def _weak_ref(self) -> bool:
        """The weak model is the KL reference (``beta != 0``)."""
        return self.weak_source is not None and self.beta != 0.0

    @property
    def _wmss_hook(self) -> bool:
        """The generation hook has something to add to TRL's batch."""
        return self._weak_ref or self.weak_sampler is not None or self.args.entropy_weighted_advantages

    # ---- model helpers -------------------------------------------------------------------------------------------

    def _is_policy(self, model) -> bool:
        return model is self.model or model is self.model_wrapped or getattr(model, "module", None) is self.model

    @contextlib.contextmanager
    def weak_engine(self):
        """The model to call for weak log-probs/logits (no grad): the weak engine, or the policy, adapters disabled."""
        with torch.no_grad():
            if self.weak_source == "model":
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

    # ---- the TRL overrides (listed with their reasons in trl_overrides.OVERRIDES) ------------------------------------

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
        """TRL's method, except for the policy under WD-JT (``mixing_lambda < 1``): log-probs of the mixed logits
        (:mod:`wmss_trl.grpo.forward`). Inside :meth:`_compute_loss` the policy forward also applies the batch's
        deferred token weights (:func:`~wmss_trl.grpo.stats.apply_token_weights`) before TRL's loss reads the advantages."""
        policy = self._is_policy(model)
        if policy and self.args.mixing_lambda < 1.0 and all(v is None for v in multimodal.values()):
            result = mixed_policy_logps(
                self, model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss
            )
        else:
            result = super()._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                batch_size=batch_size,
                compute_entropy=compute_entropy,
                compute_aux_loss=compute_aux_loss,
                **multimodal,
            )
        pending, self._loss_batch = self._loss_batch, None
        if pending is not None and policy:
            entropies = None if result[1] is None else result[1].detach().float()
            apply_token_weights(self, pending, result[0].detach().float(), entropies)
        return result

    def _generate_and_score_completions(self, inputs):
        if not self._wmss_hook:
            return super()._generate_and_score_completions(inputs)
        # the reference log-probs are computed in `_add_wmss`, with the weak model, in one forward
        with grpo_without_reference_logps(self, active=self._weak_ref):
            output = super()._generate_and_score_completions(inputs)
        return self._add_wmss(inputs, output)

    def _compute_loss(self, model, inputs):
        """TRL's loss on the rows that carry loss: the zero-weight weak rows (not selected as negatives) are dropped
        first, so they cost no forward/backward and row-averaged losses (``grpo``, ``sapo``, ``luspo``, ``dr_grpo``)
        average over the same rows as without padding. Every process keeps as many rows as the process that keeps the
        most (at least one), topping up with zero-weight rows: TRL gathers per-row metrics, which needs the same row
        count everywhere, and ZeRO-3 needs every process to run the forward. Top-up rows add 0 to every loss; a
        row-averaged loss over ``R`` rows of which ``n`` are real is rescaled by ``R / n``, so it is the mean over the
        real rows, as on one process."""
        rows = n_real = None
        if "wmss_source" in inputs and self.weak_sampler is not None:  # without weak negatives every row carries loss
            n_real = int((inputs["wmss_source"] != SOURCE_WEAK_UNUSED).sum())
            rows = max(self._max_over_processes(n_real), 1)
            keep = loss_rows(inputs["wmss_source"], rows)
            if not bool(keep.all()):
                inputs = select_rows(inputs, keep)
        inputs = dict(inputs)
        if any(name in inputs for name in DEFERRED_FIELDS):
            self._loss_batch = inputs  # weighted by the policy forward of TRL's loss, before it reads them
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._loss_batch = None
        if self._weak_ref:
            metrics.rename_kl_metric(self._metrics["train" if self.model.training else "eval"])
        if rows is not None and 0 < n_real < rows and self.loss_type in ROW_AVERAGED_LOSSES:
            loss = loss * (rows / n_real)
        return loss

    def _max_over_processes(self, n: int) -> int:
        """max of ``n`` over the processes (a collective when there are several)."""
        if self.accelerator.num_processes == 1:
            return n
        return int(self.accelerator.gather(torch.tensor([n], device=self.accelerator.device)).max())

    # ---- the generation hook -------------------------------------------------------------------------------------

    def _add_wmss(self, inputs, out: dict) -> dict:
        """TRL's batch ``out`` with the weak rows appended, their advantages, the weak reference log-probs and the
        token weights (applied now, or left for the loss's forward: :attr:`stats_from_loss`)."""
        train = self.model.training
        use_neg, use_ent = self.weak_sampler is not None and train, self.args.entropy_weighted_advantages and train
        n_pol = out["prompt_ids"].size(0)
        # the gathered per-function rewards TRL has just scored this batch with (before the weak rows are scored)
        rewards_per_func = grpo_batch_rewards(self, n_pol * self.accelerator.num_processes) if use_neg else None
        weak = self._append_weak_rows(inputs, out) if use_neg else None
        defer_ent = use_ent and self.stats_from_loss  # the policy entropies come from the loss's forward
        # so do the importance weights, when the selection needs no plausibility ranking (every wrong answer is kept,
        # M = K): then the weak rows need no policy forward here. Their old log-probs (TRL keeps old log-probs under
        # vLLM, for its importance correction) are the loss forward's too: one iteration, the same parameters
        defer_is = use_neg and self.stats_from_loss and self.max_weak_negatives >= self.num_weak_generations
        eager_ent = use_ent and not defer_ent
        stats = self._no_grad_forwards(
            out,
            n_pol,
            weak_rows=self._weak_ref or use_ent,
            entropies=use_ent,
            policy_entropies=eager_ent,
            policy_rows=(0 if eager_ent else n_pol, n_pol if defer_is else out["completion_ids"].size(0)),
        )
        self.wmss_stats = stats
        eager, deferred = {}, {}
        if use_ent:
            (deferred if defer_ent else eager).update(
                wmss_weak_entropy=stats.weak_entropy, wmss_weak_logps=stats.weak_logps
            )
        if weak is not None:
            add_negatives(self, out, weak, rewards_per_func, n_pol, stats)
            behaviour = torch.cat([torch.zeros_like(stats.policy_logps[:n_pol]), stats.behaviour_logps])
            (deferred if defer_is else eager)["wmss_behaviour_logps"] = behaviour
        out["wmss_source"] = stats.source
        if self._weak_ref:
            # k3 KL is an estimator for the policy's own samples. On the weak negatives' rows the reference is the
            # policy at generation time (a trust region), so the KL term never pulls the policy towards an answer
            # the weak model wrote (with the weak model as reference there, exp(ref - logp) is unbounded).
            ref = stats.weak_logps.clone()
            ref[n_pol:] = stats.policy_logps[n_pol:]  # (set from the loss's forward when deferred)
            out["ref_per_token_logps"] = ref
        if eager:
            out.update(eager)
            apply_token_weights(self, out, stats.policy_logps, stats.policy_entropy, own_rows=eager_ent)
        out.update(deferred)
        metrics.log_table_rows(self._logs, self.accelerator, self.reward_func_names, weak, stats.negatives, n_pol)
        return out

    def _append_weak_rows(self, inputs, out: dict) -> dict:
        """Sample and score the weak rows of the batch ``inputs`` and append them to TRL's batch ``out``."""
        unknown = [key for key, v in out.items() if key not in KNOWN_FIELDS and v is not None]
        if unknown:
            raise NotImplementedError(f"weak negatives cannot extend the batch fields {unknown}.")
        weak = self.weak_sampler.rollouts(inputs)
        keep = ~torch.tensor(weak["truncated"]) if self.mask_truncated_completions else None
        pad_id = self._tokenizer.pad_token_id
        out.update(append_weak_rows(out, weak["prompt_ids"], weak["completion_ids"], pad_id, keep))
        return weak

    def _no_grad_forwards(
        self, out: dict, n_pol: int, weak_rows: bool, entropies: bool, policy_entropies: bool, policy_rows
    ) -> StepStats:
        """Weak and policy log-probs (and entropies) of the batch, no grad, only on the rows that need them: the weak
        model on every row when ``weak_rows`` (KL reference, entropy weights; the importance weights use the behaviour
        log-probs recorded while sampling), the policy on ``policy_rows = (first, end)``. Rows not computed stay 0."""
        ids = out["completion_ids"]
        n_rows, width, device = ids.size(0), ids.size(1), ids.device
        input_ids = torch.cat([out["prompt_ids"], ids], dim=1)
        attention_mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
        zeros = [torch.zeros(n_rows, width, device=device) for _ in range(4)]
        stats = StepStats(torch.full((n_rows,), SOURCE_POLICY, dtype=torch.long, device=device), *zeros)
        first, end = policy_rows
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if weak_rows:
                with self.weak_engine() as engine:
                    lp, h = self._plain_logps(engine, input_ids, attention_mask, width, entropies)
                stats.weak_logps[:] = lp.float()
                if h is not None:
                    stats.weak_entropy[:] = h.float()
            if first < end:  # the policy's log-probs as the loss sees them (mixed under WD-JT), its own entropy
                lp, h, _ = self._get_per_token_logps_and_entropies(
                    self.model,
                    input_ids[first:end],
                    attention_mask[first:end],
                    width,
                    batch_size=self.args.per_device_train_batch_size,
                    compute_entropy=policy_entropies,
                )
                stats.policy_logps[first:end] = lp.float()
                if h is not None:
                    stats.policy_entropy[first:end] = h.float()
        return stats
