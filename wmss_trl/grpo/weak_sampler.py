"""The weak rollouts of WMSS-GRPO: one object that samples the weak completions, reads training batches ahead so that
the completions of several generation batches come from one ``generate`` call, and scores them with TRL's rewards.

A weak row's tokens are drawn by :class:`~wmss_trl.grpo.sampling.GumbelMaxSampler` from noise keyed by
``(seed, epoch, generation batch, global row)`` (:meth:`WeakSampler.row_keys`), never from torch's global RNG, so the
training RNG stream (the policy's samples, TRL's shuffle) is the same whether and when the weak model samples, and a
row's completion does not depend on the read-ahead, the resume point or the process count. With
``weak_rollouts_path`` the completions are read from a weak-rollout pool instead (:mod:`wmss_trl.rollouts`): weak row
``j`` of a batch of epoch e is draw ``j mod K`` of its prompt in epoch e.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import deque
from typing import Any

import torch
from transformers import GenerationConfig
from trl.data_utils import is_conversational
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import RepeatSampler, pad

from ..core import cut_at_eos
from ..rollouts.backend import seeded_generate
from .batch import weak_row_parents
from .sampling import (
    EpochOrderedSampler,
    stream_seed,
)
from .vllm_engine import SamplingSettings, weak_engine


class WeakSampler:
    """Weak completions for a trainer's generation batches, with a read-ahead cache.

    ``prefetch = P``: the weak completions of the next P generation batches (already read by :meth:`read`) are
    sampled in the same weak ``generate`` call as the current batch's, one call every ``P + 1`` generation batches
    with ``P + 1`` times the rows. The weak model is frozen, so sampling early draws from the same distribution; the
    rewards are computed when a batch is used. On small per-device batches a decode step costs about the same for 2
    rows as for 8, which this amortises.
    """

    def __init__(self, trainer, prefetch: int):
        self.trainer = trainer
        self.prefetch = prefetch
        self.generation_config = self._generation_config()
        if self.generation_config.num_beams not in (None, 1) or self.generation_config.watermarking_config is not None:
            raise NotImplementedError(
                "weak negatives sample the weak model token by token with the policy's sampling settings; beam "
                "search (num_beams > 1) and watermarking in generation_kwargs are not supported with them."
            )
        self.vllm = weak_engine(trainer)  # None: transformers' generate
        self.vllm_settings = SamplingSettings.from_trainer(trainer) if self.vllm is not None else None
        self._source, self._ahead, self._returned = None, deque(), []
        self._epoch_start, self._epoch, self._next_position = (0, 0), 0, 0
        self._cache: dict[tuple[int, int], tuple[list, list]] = {}
        self.pool = self._open_pool(trainer.args.weak_rollouts_path)

    def _open_pool(self, path: str | None):
        """The weak-rollout pool of ``weak_rollouts_path`` (checked against the run before any model loaded, see
        :func:`~wmss_trl.grpo.checks.check_weak_rollouts`), now also against the trainer's tokenizer."""
        if path is None:
            return None
        from ..io import tokenizer_fingerprint
        from ..rollouts import WeakRolloutPool

        pool = WeakRolloutPool(path)
        pool.check(tokenizer=tokenizer_fingerprint(self.trainer.processing_class))
        return pool

    def _generation_config(self) -> GenerationConfig:
        """The policy's HF generation config (vLLM runs build the equivalent from the same sampling settings)."""
        t = self.trainer
        if getattr(t, "generation_config", None) is not None:
            return t.generation_config
        return GenerationConfig(
            max_new_tokens=t.max_completion_length,
            do_sample=True,
            pad_token_id=t._tokenizer.pad_token_id,
            bos_token_id=t._tokenizer.bos_token_id,
            eos_token_id=t.eos_token_ids,
            temperature=t.temperature,
            top_p=t.top_p,
            top_k=t.top_k,
            min_p=t.min_p,
            repetition_penalty=t.repetition_penalty,
            disable_compile=True,
        )

    @property
    def _every(self) -> int:
        """Micro-steps per generation batch: TRL's dataloader yields each generation batch this many times."""
        return self.trainer.args.steps_per_generation * self.trainer.num_iterations

    # ---- batch positions -----------------------------------------------------------------------------------------

    def start_epoch(self, epoch: int, skipped: int) -> None:
        """The epoch transformers' loop starts, and how many of its batches a resumed run skips."""
        self._epoch_start = (epoch, skipped)

    def read(self, epoch_iterator, num_batches: int, left: int) -> list:
        """The next ``num_batches`` batches of ``epoch_iterator``, reading up to ``P`` generation batches ahead (but
        no batch beyond the ``left`` that training will reach) and numbering the batches of the epoch as they come."""
        if epoch_iterator is not self._source:  # a new epoch (or a resumed run): nothing read ahead yet
            self._source, self._ahead, self._cache = epoch_iterator, deque(), {}
            self._epoch, self._next_position = self._epoch_start
        while len(self._ahead) < max(num_batches, min(num_batches + self.prefetch * self._every, left)):
            try:
                self._ahead.append((self._next_position, next(epoch_iterator)))
            except StopIteration:
                break
            self._next_position += 1
        self._returned = [self._ahead.popleft() for _ in range(min(num_batches, len(self._ahead)))]
        return [batch for _, batch in self._returned]

    def _generation_batches(self, current) -> list[tuple[tuple[int, int], list[dict] | None]]:
        """``(key, batch)`` of the current generation batch, then of the next (at most P) ones already read.
        ``key = (epoch, index of the generation batch in the epoch)``; a batch that did not come from the training loop
        (a direct call) gets ``(-1, TRL's micro-step // micro-steps per generation)``."""
        every = self._every
        window = [*self._returned, *self._ahead]
        here = next((i for i, (_, batch) in enumerate(window) if batch is current), None)
        if here is None:
            return [((-1, self.trainer._step // every), current)]
        ahead = window[here::every][: 1 + self.prefetch]
        return [((self._epoch, position // every), batch) for position, batch in ahead]

    def row_keys(self, key: tuple[int, int], n_rows: int) -> list[tuple[int, ...]]:
        """The noise keys of this process's ``n_rows`` weak rows of the generation batch ``key = (epoch, index)``:
        ``(seed, epoch, index, j)`` with ``j`` the row's position in the GLOBAL batch (``rank * n_rows + l``)."""
        first = self.trainer.accelerator.process_index * n_rows
        return [(self.trainer.args.seed, *key, first + row) for row in range(n_rows)]

    # ---- sampling ------------------------------------------------------------------------------------------------

    def generate(
        self, prompt_ids_list: list[list[int]], row_keys: list[tuple[int, ...]]
    ) -> tuple[list[list[int]], list[list[float]]]:
        """One completion per prompt from the weak model, on every process in lockstep (ZeRO-3 gathers the weak shards
        in ``unwrap_model_for_generation``): completion ids cut after the first EOS, like TRL, and the weak model's
        log-prob ``log softmax(z / T)`` of each sampled token, recorded while sampling (the behaviour log-probs of the
        importance weights, without a second forward). With a vLLM backend (:mod:`~wmss_trl.grpo.vllm_engine`) the
        row's seed is ``stream_seed(*row key)`` and the log-probs are vLLM's."""
        t = self.trainer
        if self.vllm is not None:
            seeds = [stream_seed(*key) for key in row_keys]
            ids, logps = self.vllm.sample(prompt_ids_list, 1, self.vllm_settings, seeds)
            ids = [cut_at_eos(row, set(t.eos_token_ids))[0] for row in ids]
            return ids, [lp[: len(row)] for lp, row in zip(logps, ids, strict=True)]
        prompts = [torch.tensor(ids) for ids in prompt_ids_list]
        padded = {
            "padding_side": "left",
            "pad_to_multiple_of": t.pad_to_multiple_of,
        }
        input_ids = pad(prompts, padding_value=t._tokenizer.pad_token_id, **padded).to(t.accelerator.device)
        attention_mask = pad([torch.ones_like(p) for p in prompts], padding_value=0, **padded).to(t.accelerator.device)
        engine = t.weak_model if t.weak_source == "model" else t.model_wrapped
        with (
            unwrap_model_for_generation(
                engine,
                t.accelerator,
                gather_deepspeed3_params=t.args.ds3_gather_for_generation,
                generation_kwargs=getattr(t, "generation_kwargs", None),
                gradient_checkpointing_kwargs=t.args.gradient_checkpointing_kwargs,
            ) as unwrapped,
            torch.no_grad(),
        ):
            adapters_off = unwrapped.disable_adapter() if t.weak_source == "peft_base" else contextlib.nullcontext()
            with adapters_off:
                return seeded_generate(
                    unwrapped,
                    self.generation_config,
                    t.temperature,
                    input_ids,
                    attention_mask,
                    row_keys,
                    t.eos_token_ids,
                )

    def samples(self, inputs: list[dict], prompt_ids_list: list[list[int]]):
        """One fresh weak completion (ids, behaviour log-probs) per prompt of ``prompt_ids_list``, from the cache that
        one weak ``generate`` call fills, every ``P + 1`` generation batches, with this batch's completions and the
        next P's. Under several processes the decision to generate is taken together, since ``generate`` is a
        collective under ZeRO-3. With a weak-rollout pool they are read from it (:meth:`_pool_samples`)."""
        t = self.trainer
        batches = self._generation_batches(inputs)
        key = batches[0][0]
        if self.pool is not None:
            return self._pool_samples(inputs, max(key[0], 0))
        if t._max_over_processes(int(key not in self._cache)):  # some process lacks them: all generate
            prompt_ids, row_keys, spans = [], [], []
            for batch_key, batch in batches:
                ids = prompt_ids_list if batch is inputs else t._tokenize_prompts(self._prompts(batch))[0]
                spans.append((batch_key, len(prompt_ids), len(prompt_ids) + len(ids)))
                prompt_ids += ids
                row_keys += self.row_keys(batch_key, len(ids))
            ids, logps = self.generate(prompt_ids, row_keys)
            self._cache = {k: (ids[a:b], logps[a:b]) for k, a, b in spans}
        return self._cache.pop(key)

    def _pool_samples(self, inputs: list[dict], epoch: int):
        """This process's weak completions from the pool: the weak row with global index ``j = rank * n_w + l`` is
        draw ``j mod K`` of its prompt in epoch ``epoch`` (the K weak rows of a group are the draws 0..K-1)."""
        from ..rollouts import prompt_id

        prompts = self._prompts(inputs)
        first, k = self.trainer.accelerator.process_index * len(prompts), self.trainer.num_weak_generations
        draws = [self.pool.draw(prompt_id(p), epoch, (first + row) % k) for row, p in enumerate(prompts)]
        return [ids for ids, _ in draws], [logps for _, logps in draws]

    def _prompts(self, inputs: list[dict]) -> list:
        """The prompts of this process's ``n_w = B * K / G`` weak rows."""
        parents = weak_row_parents(len(inputs), self.trainer.num_generations, self.trainer.num_weak_generations)
        return [inputs[i]["prompt"] for i in parents]

    def rollouts(self, inputs: list[dict]) -> dict[str, Any]:
        """Sample and score this process's ``n_w = B * K / G`` weak completions of the batch ``inputs``."""
        t = self.trainer
        parents = weak_row_parents(len(inputs), t.num_generations, t.num_weak_generations)
        w_inputs = [inputs[i] for i in parents]
        prompts = [x["prompt"] for x in w_inputs]
        prompt_ids_list, _, _ = t._tokenize_prompts(prompts)
        completion_ids_list, behaviour_logps = self.samples(inputs, prompt_ids_list)
        texts = t.processing_class.batch_decode(completion_ids_list, skip_special_tokens=True)
        if is_conversational({"prompt": prompts[0]}):
            completions = [[{"role": "assistant", "content": text}] for text in texts]
        else:
            completions = texts
        rewards_per_func, weak_extra = self._score(w_inputs, prompts, completions, completion_ids_list)
        truncated = [
            len(ids) == 0 or ids[-1] not in [*t.eos_token_ids, t._tokenizer.pad_token_id]
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

    def _score(self, w_inputs, prompts, completions, completion_ids_list):
        """TRL's reward functions on the weak completions. Their ``log_extra`` columns go to the weak rows; their
        ``log_metric`` values are dropped (they would otherwise be averaged into the policy's reward metrics)."""
        t = self.trainer
        pending_extra, pending_metrics = dict(t._pending_extra_logs), dict(t._pending_metrics)
        t._pending_extra_logs.clear()
        t._pending_metrics.clear()
        rewards_per_func = t._calculate_rewards(w_inputs, prompts, completions, completion_ids_list)
        weak_extra = dict(t._pending_extra_logs)
        t._pending_extra_logs.clear()
        t._pending_metrics.clear()
        t._pending_extra_logs.update(pending_extra)
        t._pending_metrics.update(pending_metrics)
        return rewards_per_func, weak_extra


class WeakReadAhead:
    """Trainer mixin: the batch positions the :class:`WeakSampler` keys its samples by, and the resume-safe prompt
    order. ``weak_sampler`` is None without weak negatives, and then these are transformers' / TRL's methods."""

    weak_sampler: WeakSampler | None = None

    def _run_epoch(self, *args, **kwargs):
        """Transformers' epoch loop; records the epoch and how many of its batches a resumed run skips."""
        if self.weak_sampler is not None:
            given = inspect.signature(super()._run_epoch).bind(*args, **kwargs).arguments
            resumed = given["resume_from_checkpoint"] is not None and given["epoch"] == given["epochs_trained"]
            skipped = given["steps_trained_in_current_epoch"] if resumed and not self.args.ignore_data_skip else 0
            self.weak_sampler.start_epoch(given["epoch"], skipped)
        return super()._run_epoch(*args, **kwargs)

    def _get_train_sampler(self, dataset=None):
        """TRL's sampler, wrapped so that a run resumed in a later epoch gets that epoch's prompt order
        (:class:`EpochOrderedSampler`); an uninterrupted run gets exactly TRL's order."""
        sampler = super()._get_train_sampler(dataset)
        return EpochOrderedSampler(sampler) if isinstance(sampler, RepeatSampler) else sampler

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Transformers' method, reading ``weak_rollout_prefetch`` generation batches ahead (:meth:`WeakSampler.read`).
        Training gets the same batches in the same order."""
        if self.weak_sampler is None:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        # read no batch that training will not reach (max_steps), so no weak completion is sampled in vain
        left = (self.state.max_steps - self.state.global_step) * self.args.gradient_accumulation_steps
        batches = self.weak_sampler.read(epoch_iterator, num_batches, left)
        return batches, self._get_num_items_in_batch(batches, device)
