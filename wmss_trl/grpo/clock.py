"""Where WMSS-GRPO's training is, read from state a resumed run restores: the epoch and generation batch that key the
seeded weak samples, and TRL's prompt order in that epoch. A :class:`~transformers.TrainerCallback`, no override.

transformers' loop (``Trainer._inner_training_loop``) calls ``on_epoch_begin`` before ``_run_epoch`` iterates the
train dataloader. A run resumed at ``state.global_step`` starts in epoch ``global_step // U`` (``U`` optimizer steps
per epoch) and skips the ``(global_step % U) * gradient_accumulation_steps`` batches it trained (unless
``ignore_data_skip``), as ``Trainer._init_training_state`` computes. TRL's dataloader yields each generation batch
``steps_per_generation * num_iterations`` times in a row, and its ``_prepare_inputs`` generates at the first of them
(TRL's micro-step counter ``_step`` counts the micro-steps this process trained). So the generation batch a call of
``_generate_and_score_completions`` scores is ``(epoch, (batches of the epoch before it) // that count)``, the same
numbers in an uninterrupted and in a resumed run.
"""

from __future__ import annotations

import math

import torch
from accelerate.data_loader import get_sampler
from transformers import TrainerCallback
from trl.trainer.utils import RepeatSampler


def seed_epoch_order(sampler: RepeatSampler, epoch: int) -> None:
    """Put TRL's shuffling sampler where an uninterrupted run has it when epoch ``epoch`` begins: its generator seeded
    with ``seed`` and ``epoch`` permutations drawn (one ``randperm(len(dataset))`` per epoch). TRL's sampler has no
    ``set_epoch``, so a new process resumed in epoch e >= 1 would otherwise replay epoch 0's order. A sampler without
    shuffling or without a seed is left alone."""
    if not sampler.shuffle or sampler.seed is None:
        return
    sampler.generator.manual_seed(sampler.seed)
    for _ in range(epoch):
        torch.randperm(sampler.num_samples, generator=sampler.generator)


class GenerationClock(TrainerCallback):
    """The epoch and generation batch of WMSS-GRPO's training, and TRL's prompt order resumable in any epoch.

    ``on_epoch_begin`` re-seeds TRL's ``RepeatSampler`` (found through the ``train_dataloader`` transformers hands
    the callbacks) to the epoch's order (:func:`seed_epoch_order`) and records where the epoch starts in TRL's
    micro-step count. :meth:`generation_key` is then ``(epoch, generation batch of the epoch)``; outside training (a
    direct call), ``(-1, TRL's micro-step // micro-steps per generation batch)``.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.epoch: int | None = None  # the epoch training is in (None: not training)
        self._epoch_start = 0  # TRL's ``_step`` at the epoch's first batch (a resumed run's skipped batches included)

    def on_train_begin(self, args, state, control, **kwargs):
        self.epoch = None

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        per_epoch = _update_steps_per_epoch(train_dataloader, args, state)
        if self.epoch is None:  # the first epoch of this train(): where a resumed run starts
            self.epoch = state.global_step // per_epoch
            skipped = (
                0 if args.ignore_data_skip else (state.global_step % per_epoch) * args.gradient_accumulation_steps
            )
        else:
            self.epoch, skipped = self.epoch + 1, 0
        self._epoch_start = self.trainer._step - skipped
        sampler = get_sampler(train_dataloader) if train_dataloader is not None else None
        if isinstance(sampler, RepeatSampler):
            seed_epoch_order(sampler, self.epoch)

    def on_train_end(self, args, state, control, **kwargs):
        self.epoch = None

    @property
    def micro_steps_per_generation(self) -> int:
        """TRL's dataloader yields each generation batch this many times; TRL generates at the first."""
        return self.trainer.args.steps_per_generation * self.trainer.num_iterations

    def generation_key(self) -> tuple[int, int]:
        """``(epoch, index of the generation batch in the epoch)`` of the batch TRL is generating for now."""
        every = self.micro_steps_per_generation
        if self.epoch is None:
            return -1, self.trainer._step // every
        return self.epoch, (self.trainer._step - self._epoch_start) // every


def _update_steps_per_epoch(train_dataloader, args, state) -> int:
    """transformers' ``num_update_steps_per_epoch`` (``Trainer.set_initial_training_values``): ``ceil(len / GA)``
    optimizer steps, at least 1; ``max_steps`` for a dataloader without a length (one epoch)."""
    try:
        length = len(train_dataloader)
    except TypeError:
        return max(state.max_steps, 1)
    return max(math.ceil(length / args.gradient_accumulation_steps), 1)
