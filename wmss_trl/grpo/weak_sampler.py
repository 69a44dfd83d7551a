"""The weak rollouts of WMSS-GRPO: one object that samples the weak completions of each generation batch TRL hands
over, reading ahead so that the weak rows of several generation batches come from one ``generate`` call, and scores
them with TRL's rewards.

A weak row's tokens are drawn by :class:`~wmss_trl.rollouts.sampling.GumbelMaxSampler` from noise keyed by
``(seed, epoch, generation batch, global row)`` (:meth:`WeakSampler.row_keys`; the epoch and batch come from
:class:`~wmss_trl.grpo.clock.GenerationClock`, which reads them from state a resumed run restores), never from torch's
global RNG, so the training RNG stream (the policy's samples, TRL's shuffle) is the same whether and when the weak
model samples, and a row's completion does not depend on the resume point or the process count.

Read-ahead (``weak_rollout_prefetch = P``): the generation batches of an epoch are sampled in fixed windows of
``P + 1`` (batches ``w(P+1) .. w(P+1) + P``), all their weak rows in one call, at the window's first batch; the next
batches' prompts come from the clock's :class:`~wmss_trl.grpo.clock.EpochPlan`. A run resumed inside a window samples
the whole window again (the batches before the resume point included), so every call has the same rows as in the
uninterrupted run and gives the same bits. A planned batch is used only if its prompts are the ones TRL hands over;
otherwise (a custom dataloader) the batch is sampled on its own and the read-ahead is switched off, with a warning.
With ``weak_rollouts_path`` the
completions are read from a weak-rollout pool instead (:mod:`wmss_trl.rollouts`): weak row ``j`` of a batch of epoch
e is draw ``j mod K`` of its prompt in epoch e.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from transformers import GenerationConfig
from trl.data_utils import is_conversational
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import pad

from ..core import cut_at_eos
from ..rollouts.backend import seeded_generate
from ..rollouts.sampling import stream_seed
from ..rollouts.vllm_engine import SamplingSettings, weak_engine
from .batch import weak_row_parents


logger = logging.getLogger(__package__)


class WeakSampler:
    """Weak completions for a trainer's generation batches: one ``generate`` call per window of ``prefetch + 1``
    generation batches, with all of their weak rows (``per_device_train_batch_size * steps_per_generation * K / G``
    per process and batch). On small batches a decode step costs about the same for 2 rows as for 8, which this
    amortises (and so does ``steps_per_generation > gradient_accumulation_steps``, for the policy's rows too)."""

    def __init__(self, trainer, prefetch: int = 0, weak_model=None):
        self.trainer = trainer
        self.prefetch = prefetch
        self._ahead: dict[tuple[int, int], tuple] = {}  # key -> (prompt ids, completion ids, log-probs), read ahead
        self.generation_config = self._generation_config()
        if self.generation_config.num_beams not in (None, 1) or self.generation_config.watermarking_config is not None:
            raise NotImplementedError(
                "weak negatives sample the weak model token by token with the policy's sampling settings; beam "
                "search (num_beams > 1) and watermarking in generation_kwargs are not supported with them."
            )
        self.vllm = weak_engine(trainer, weak_model)  # None: transformers' generate
        self.vllm_settings = SamplingSettings.from_trainer(trainer) if self.vllm is not None else None
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
        importance weights, without a second forward). With a vLLM backend (:mod:`~wmss_trl.rollouts.vllm_engine`) the
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
        """One fresh weak completion (ids, behaviour log-probs) per prompt of ``prompt_ids_list`` (the weak rows of the
        generation batch TRL hands over), keyed by the batch's
        :meth:`~wmss_trl.grpo.clock.GenerationClock.generation_key`: read ahead by an earlier call of its window, or
        sampled now with the rest of its window. Under several processes the decision to sample is taken together,
        since ``generate`` is a collective under ZeRO-3. With a weak-rollout pool they are read from it
        (:meth:`_pool_samples`), epoch e's draws in epoch e."""
        key = self.trainer.generation_clock.generation_key()
        if self.pool is not None:
            return self._pool_samples(inputs, max(key[0], 0))
        ahead = self._ahead.pop(key, None)
        if ahead is not None and ahead[0] != prompt_ids_list:
            self._plan_failed(key)
            ahead = None
        if not self.trainer._max_over_processes(int(ahead is None)):
            return ahead[1], ahead[2]
        window = self._window(key, prompt_ids_list)
        row_keys = [row for k, ids in window for row in self.row_keys(k, len(ids))]
        ids, logps = self.generate([p for _, ids in window for p in ids], row_keys)
        self._ahead, start = {}, 0
        for k, prompts in window:  # the batches before `key` (a resumed run's) were sampled only for the grouping
            part = (prompts, ids[start : start + len(prompts)], logps[start : start + len(prompts)])
            start += len(prompts)
            if k == key:
                mine = part
            elif k > key:
                self._ahead[k] = part
        return mine[1], mine[2]

    def _window(self, key: tuple[int, int], prompt_ids_list: list[list[int]]) -> list[tuple[tuple[int, int], list]]:
        """``(key, weak rows' prompt ids)`` of every generation batch of ``key``'s window (just ``key``'s batch without
        read-ahead, outside training, or when the plan's batch ``key`` is not the one TRL hands over)."""
        epoch, index = key
        plan = self.trainer.generation_clock.plan
        if self.prefetch == 0 or epoch < 0 or plan is None:
            return [(key, prompt_ids_list)]
        first = index - index % (self.prefetch + 1)
        planned = [self._prompt_ids(batch) for batch in plan.batches(first, first + self.prefetch + 1)]
        if index - first >= len(planned) or planned[index - first] != prompt_ids_list:
            self._plan_failed(key)
            return [(key, prompt_ids_list)]
        return [((epoch, first + i), prompts) for i, prompts in enumerate(planned)]

    def _prompt_ids(self, batch: list[dict]) -> list[list[int]]:
        """The weak rows' prompt token ids of a generation batch (TRL's tokenization)."""
        return self.trainer._tokenize_prompts(self._prompts(batch))[0]

    def _plan_failed(self, key) -> None:
        """The planned batch ``key`` is not the one TRL hands over: no more read-ahead in this run."""
        logger.warning(
            f"weak read-ahead: the planned generation batch {key} differs from the one the trainer received (a custom "
            "train dataloader or sampler?); the weak completions are sampled per batch from now on. Set "
            "weak_rollout_prefetch=0 to silence this."
        )
        self.prefetch, self._ahead = 0, {}

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
