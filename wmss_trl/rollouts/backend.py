"""The sampling backend of the weak rollouts: one object, ``sample(prompt_ids_list, row_keys) -> (ids, logps)``.

Every backend returns, per prompt, one completion (cut after the first EOS, like TRL) and the weak model's log-prob
``log softmax(z / T)`` of each sampled token (the behaviour policy), with the draw of a row depending only on its key
(``row_keys``), so that the samples do not depend on the batch a row is decoded in nor on the process count.
:class:`TransformersBackend` is the default; :class:`VLLMBackend` (``--backend vllm``) samples with the weak model's
own colocated vLLM engine (:class:`~wmss_trl.rollouts.vllm_engine.WeakVLLMEngine`), row ``key`` seeded by
``stream_seed(*key)`` as the GRPO trainer's online vLLM path. Both draw exactly from the configured sampling
distribution; their behaviour log-probs agree when top-k / top-p / min-p are off (``log softmax(z / T)``), and with them
on vLLM's are those of the renormalised truncated distribution it sampled from (see
:mod:`~wmss_trl.rollouts.vllm_engine`), as in a GRPO run with ``weak_use_vllm``.
"""

from __future__ import annotations

import os

import torch
from transformers import GenerationConfig, LogitsProcessorList
from trl.trainer.utils import pad

from ..core import cut_at_eos


def seeded_decoding(model, generation_config: GenerationConfig, recorder, row_keys, prompt_width: int):
    """The generation config and logits processors of a seeded ``generate`` call: the settings ``generate`` would use
    (ours over the model's generation_config over transformers' defaults), decoded greedily with the sampling warpers
    and the seeded Gumbel-max draw (:class:`~wmss_trl.rollouts.sampling.GumbelMaxSampler`) as processors, after the
    ``recorder`` of the sampled tokens' log-probs."""
    from .sampling import GumbelMaxSampler, greedy_copy, sampling_warpers

    settings = model._prepare_generation_config(generation_config)[0]
    # it filled in transformers' default max_length (20) / min_length (0): unset those, as generate would, or
    # every call warns "both max_new_tokens and max_length (min_new_tokens and min_length) seem to be set"
    if settings.max_new_tokens is not None:
        settings.max_length = None
    if settings.min_new_tokens is not None:
        settings.min_length = None
    processors = [recorder]
    if settings.do_sample:
        processors += [*sampling_warpers(settings), GumbelMaxSampler(row_keys, prompt_width)]
        settings = greedy_copy(settings)
    return settings, processors


def seeded_generate(model, generation_config, temperature: float, input_ids, attention_mask, row_keys, eos_ids):
    """One seeded completion per row of the left-padded ``input_ids`` ``(n, P)``: the ids cut after the first EOS
    (like TRL) and the behaviour log-probs ``log softmax(z / T)`` of the sampled tokens, recorded while sampling."""
    from .sampling import SampledTokenLogProbs

    recorder = SampledTokenLogProbs(temperature)
    settings, processors = seeded_decoding(model, generation_config, recorder, row_keys, input_ids.size(1))
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        generation_config=settings,
        logits_processor=LogitsProcessorList(processors),
    )
    completion_ids = out[:, input_ids.size(1) :]  # (n, T)
    logps = recorder.finish(completion_ids)
    ids = [cut_at_eos(row, set(eos_ids))[0] for row in completion_ids.tolist()]
    return ids, [lp[: len(row)] for lp, row in zip(logps.tolist(), ids, strict=True)]


def eos_token_ids(model, tokenizer) -> list[int]:
    """TRL GRPO's rule: every EOS id the model's generation config declares, and the tokenizer's first."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id not in ids:
        ids = [tokenizer.eos_token_id, *ids]
    return ids


def generation_config(settings, tokenizer, eos_ids: list[int]) -> GenerationConfig:
    """The ``GenerationConfig`` TRL's GRPOTrainer builds from a config's sampling settings (``settings`` has
    ``max_completion_length``, ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty``,
    ``generation_kwargs``)."""
    kwargs = {
        "max_new_tokens": settings.max_completion_length,
        "do_sample": True,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0],
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": eos_ids,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "top_k": settings.top_k,
        "min_p": settings.min_p,
        "repetition_penalty": settings.repetition_penalty,
    }
    kwargs.update(settings.generation_kwargs or {})
    return GenerationConfig(**kwargs, disable_compile=True)


class TransformersBackend:
    """Samples with transformers' ``generate`` (greedy decoding plus the seeded Gumbel-max draw: an exact sample of
    ``do_sample=True`` with the same settings), recording the behaviour log-probs while sampling."""

    name = "transformers"

    def __init__(self, model, tokenizer, settings):
        self.model, self.tokenizer, self.temperature = model, tokenizer, settings.temperature
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.generation_config = generation_config(settings, tokenizer, self.eos_ids)
        if self.generation_config.num_beams not in (None, 1):
            raise NotImplementedError("weak rollouts sample token by token; num_beams > 1 is not supported.")

    @torch.no_grad()
    def sample(self, prompt_ids_list: list[list[int]], row_keys: list[tuple[int, ...]]):
        """One completion per prompt: ``(completion ids cut after the first EOS, their behaviour log-probs)``."""
        device = next(self.model.parameters()).device
        prompts = [torch.tensor(ids) for ids in prompt_ids_list]
        pad_id = self.generation_config.pad_token_id
        input_ids = pad(prompts, padding_value=pad_id, padding_side="left").to(device)
        attention_mask = pad([torch.ones_like(p) for p in prompts], padding_value=0, padding_side="left").to(device)
        return seeded_generate(
            self.model, self.generation_config, self.temperature, input_ids, attention_mask, row_keys, self.eos_ids
        )


class VLLMBackend:
    """Samples with a colocated vLLM engine of the weak checkpoint's folder (``model.name_or_path``: the folder the
    pool's weak model was loaded from), one request per row seeded by ``stream_seed(*row key)``, recording vLLM's
    log-probs of the sampled tokens as the behaviour log-probs. Under ``accelerate launch`` every process has its own
    engine in the launch's group (as TRL's colocated engine) and samples the rows the pool builder gives it; the rows
    are seeded by key, so the pool is the one-process pool. The engine is loaded once, in the weak model's dtype."""

    name = "vllm"

    def __init__(self, model, tokenizer, settings):
        from accelerate import PartialState

        from ..weak import weak_dtype, weak_folder
        from .vllm_engine import SamplingSettings, WeakVLLMEngine, join_launch

        folder = weak_folder(model, None)
        if not folder or not os.path.isdir(folder):
            raise ValueError(
                f"--backend vllm loads the weak checkpoint from its local folder, but the weak model was not loaded "
                f"from one (name_or_path={folder!r}). Save it with save_pretrained and pass the folder (--model), or "
                "use --backend transformers."
            )
        if (settings.generation_kwargs or {}).get("num_beams", 1) != 1:
            raise NotImplementedError("weak rollouts sample token by token; num_beams > 1 is not supported.")
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.settings = SamplingSettings.of(settings, self.eos_ids, settings.generation_kwargs)
        state = PartialState()
        if state.num_processes > 1:  # under accelerate launch: one engine per process, each sampling its own rows
            join_launch(state)
        self.engine = WeakVLLMEngine(
            folder, seed=settings.seed, dtype=weak_dtype(model, None), external_launcher=state.num_processes > 1
        )

    def sample(self, prompt_ids_list: list[list[int]], row_keys: list[tuple[int, ...]]):
        """One completion per prompt: ``(completion ids cut after the first EOS, vLLM's behaviour log-probs)``."""
        from .sampling import stream_seed

        ids, logps = self.engine.sample(prompt_ids_list, 1, self.settings, [stream_seed(*key) for key in row_keys])
        ids = [cut_at_eos(row, set(self.eos_ids))[0] for row in ids]
        return ids, [lp[: len(row)] for lp, row in zip(logps, ids, strict=True)]


BACKENDS = {
    "transformers": TransformersBackend,
    "vllm": VLLMBackend,
}  # --backend NAME: the class, built as BACKENDS[NAME](model, tok, s)
