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

For the weak read-ahead the clock also knows where training *will* be: :class:`EpochPlan`, this process's generation
batches of the epoch, read from a copy of the dataloader's batch sampler taken when the epoch begins.
"""

from __future__ import annotations

import contextlib
import copy
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


class EpochPlan:
    """This process's generation batches of one epoch, known before the training loop reads them.

    A copy of the train dataloader's batch sampler, taken at ``on_epoch_begin`` once TRL's sampler is seeded for the
    epoch (the dataset shared, not copied), is iterated on its own: the loop's sampler and RNG are untouched.
    Generation batch ``b`` is the dataloader's batch ``b * every`` (TRL's dataloader yields each generation batch
    ``every = steps_per_generation * num_iterations`` times in a row), collated by the dataloader's ``collate_fn``.
    Batches at or beyond ``num_batches`` (the generation batches training reaches in this epoch) are not planned. The
    plan of a custom dataloader may be wrong: its user (the weak read-ahead) checks each planned batch against the one
    TRL hands over.
    """

    def __init__(self, dataloader, every: int, num_batches: int):
        self.dataset, self.collate = dataloader.dataset, dataloader.collate_fn
        self.every, self.num_batches = every, num_batches
        shared = {id(self.dataset): self.dataset}
        sampler = get_sampler(dataloader)
        if hasattr(sampler, "data_source"):
            shared[id(sampler.data_source)] = sampler.data_source
        self._sampler = iter(copy.deepcopy(dataloader.batch_sampler, shared))
        self._indices: dict[int, list[int]] = {}  # generation batch -> dataset indices (read, not yet forgotten)
        self._read = 0  # dataloader batches read from the copy

    def batches(self, first: int, end: int) -> list[list]:
        """The collated generation batches ``first .. end - 1`` (fewer at the end of the epoch or of training);
        earlier batches are forgotten."""
        for b in [b for b in self._indices if b < first]:
            del self._indices[b]
        out = []
        for b in range(first, min(end, self.num_batches)):
            while b not in self._indices and self._read <= b * self.every:
                try:
                    indices = next(self._sampler)
                except StopIteration:
                    return out
                if self._read % self.every == 0:
                    self._indices[self._read // self.every] = list(indices)
                self._read += 1
            if b not in self._indices:
                return out
            out.append(self.collate([self.dataset[i] for i in self._indices[b]]))
        return out


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
        self.plan: EpochPlan | None = None  # the epoch's generation batches (None: not planned)

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
        self.plan = None
        weak = getattr(self.trainer, "weak_sampler", None)  # the weak read-ahead is the plan's only user
        reads_ahead = weak is not None and weak.prefetch > 0
        if reads_ahead and train_dataloader is not None and getattr(train_dataloader, "batch_sampler", None):
            # the generation batches training reaches in this epoch: its batches, or fewer where max_steps ends it
            left = max(state.max_steps - self.epoch * per_epoch, 0) * args.gradient_accumulation_steps
            with contextlib.suppress(TypeError):
                left = min(left, len(train_dataloader))
            every = self.micro_steps_per_generation
            self.plan = EpochPlan(train_dataloader, every, math.ceil(left / every))

    def on_train_end(self, args, state, control, **kwargs):
        self.epoch, self.plan = None, None

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
