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
  row, token), not from the training RNG (:class:`GumbelMaxSampler`), so resume and process count do not change
  it. They are off-policy, so their token advantages carry a truncated importance weight
  ``rho_t = min(pi_old / pi_weak, c)``; see :mod:`wmss_trl.advantages` for the estimator.
* **Entropy-weighted advantages** (``entropy_weighted_advantages=True``): token advantage = sequence advantage x a
  weight from the weak/policy entropy dynamics (WD-DS's three signals, :func:`wmss_trl.core.three_signal_weights`),
  normalised to mean 1 over the global batch.
* **WD-JT in RL** (``mixing_lambda < 1``): the policy's log-probs in the loss (and in the old-policy term) are those
  of the mixed logits ``lambda * z_policy + (1 - lambda) * z_weak``; generation stays with the pure policy.

The parts: ``config.py`` (the config), ``checks.py`` (input checks), ``weak_sampler.py`` (weak rollouts),
``clock.py`` (a callback: the epoch and generation batch that key the weak samples, TRL's prompt order on resume),
``sampling.py`` (the seeded sampler), ``batch.py`` (pure batch assembly), ``negatives.py`` (selection and
advantages), ``forward.py`` (WD-JT log-probs), ``metrics.py``, ``trainer.py`` (the overrides).

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

from ..rollouts.sampling import (
    GumbelMaxSampler,
    SampledTokenLogProbs,
    greedy_copy,
    sampling_warpers,
    stream_seed,
)
from .batch import ROW_AVERAGED_LOSSES, SOURCE_NAMES, SOURCE_POLICY, SOURCE_WEAK_NEGATIVE, SOURCE_WEAK_UNUSED
from .clock import GenerationClock, seed_epoch_order
from .config import WMSSGRPOConfig
from .trainer import StepStats, WMSSGRPOTrainer
from .weak_sampler import WeakSampler


__all__ = [
    "ROW_AVERAGED_LOSSES",
    "SOURCE_NAMES",
    "SOURCE_POLICY",
    "SOURCE_WEAK_NEGATIVE",
    "SOURCE_WEAK_UNUSED",
    "GenerationClock",
    "GumbelMaxSampler",
    "SampledTokenLogProbs",
    "StepStats",
    "WMSSGRPOConfig",
    "WMSSGRPOTrainer",
    "WeakSampler",
    "greedy_copy",
    "sampling_warpers",
    "seed_epoch_order",
    "stream_seed",
]
