"""The weak model on vLLM: its own engine, loaded once and never weight-synced (the weak model is frozen).

Two backends with one interface, :meth:`WeakVLLMEngine.sample` ``(prompt_ids_list, n, settings, seed) -> (completion
ids, token log-probs)``, used by :class:`~wmss_trl.grpo.weak_sampler.WeakSampler` when ``use_vllm=True`` (or
``weak_vllm_server_base_url`` is set) and usable on its own (e.g. to build a weak-rollout pool):

- **colocate** (:class:`WeakVLLMEngine`): a ``vllm.LLM`` of the weak checkpoint in this process, next to TRL's policy
  engine. In a trainer it runs with TRL's settings for its own colocated engine (``distributed_executor_backend=
  "external_launcher"``, so it stays in the training process).
- **server** (:class:`WeakVLLMServer`): a ``vllm serve WEAK --logprobs-mode processed_logprobs`` server, reached with
  TRL's :class:`~trl.generation.vllm_client.VLLMClient` (no communicator: nothing is synced).

The log-probs are vLLM's ``processed_logprobs`` of the sampled tokens, as TRL requests for its own importance
correction: ``log softmax`` of the logits after the repetition penalty, temperature, min-p, top-k and top-p, that is
the log-probability under the distribution vLLM actually sampled from (the behaviour policy). With top-k / top-p /
min-p off (TRL's defaults) this is ``log softmax(z / T)[y]``, the quantity the transformers backend records and TRL's
policy forward computes; with them on it is the renormalised truncated distribution's, which is at least as large.

Seeding: each completion is one vLLM request with its own seed (:func:`completion_seeds`), drawn from a per-request
generator, so a completion depends on its seed, its prompt and the model only, not on the other requests of the call.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from .sampling import stream_seed


@dataclass(frozen=True)
class SamplingSettings:
    """The sampling settings of a weak vLLM call, with TRL's names and neutral values (``top_k=0``: off, ``min_p=None``:
    off). ``extra`` is passed to ``vllm.SamplingParams`` as is (TRL's ``generation_kwargs`` in vLLM mode)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_trainer(cls, trainer) -> SamplingSettings:
        """The policy's sampling settings in a GRPO trainer (what TRL passes to its own vLLM engine), stopping at the
        trainer's EOS tokens like the transformers backend."""
        return cls.of(trainer, trainer.eos_token_ids, trainer.args.generation_kwargs)

    @classmethod
    def of(cls, source, stop_token_ids, generation_kwargs) -> SamplingSettings:
        """The settings of ``source``, anything with TRL's sampling fields (``max_completion_length``,
        ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty``: a GRPO trainer or config, a
        rollout config), stopping at ``stop_token_ids``; ``generation_kwargs`` go to vLLM as they are."""
        return cls(
            max_tokens=source.max_completion_length,
            temperature=source.temperature,
            top_p=source.top_p,
            top_k=source.top_k or 0,
            min_p=source.min_p,
            repetition_penalty=source.repetition_penalty,
            stop_token_ids=tuple(stop_token_ids),
            extra=dict(generation_kwargs or {}),
        )

    def request(self) -> dict:
        """The keyword arguments of one request (``vllm.SamplingParams`` / the OpenAI completions body), n = 1, with
        the sampled token's log-prob."""
        body = {k: v for k, v in asdict(self).items() if k not in ("extra", "stop_token_ids")}
        body["min_p"] = 0.0 if self.min_p is None else self.min_p
        body["stop_token_ids"] = list(self.stop_token_ids)
        return {**body, "n": 1, "logprobs": 0, **self.extra}


def completion_seeds(seed: int | Sequence[int] | None, num_prompts: int, n: int) -> list[int | None]:
    """One seed per completion, prompt-major: completion ``j`` of prompt ``i`` gets ``stream_seed(s_i, j)``, with
    ``s_i = seed[i]`` (one seed per prompt, e.g. from a stable prompt id) or ``s_i = stream_seed(seed, i)`` for one int
    seed. ``None``: unseeded (vLLM's engine seed). Distinct (prompt, draw) pairs get unrelated streams (vLLM itself
    would give the ``n`` children of a request the seeds ``s, s + 1, ...``, which collide across requests)."""
    if seed is None:
        return [None] * (num_prompts * n)
    per_prompt = [stream_seed(seed, i) for i in range(num_prompts)] if isinstance(seed, int) else list(seed)
    if len(per_prompt) != num_prompts:
        raise ValueError(
            f"got {len(per_prompt)} seeds for {num_prompts} prompts; give one seed per prompt or one int."
        )
    return [stream_seed(s, j) for s in per_prompt for j in range(n)]


def _sampled_logps(logprobs) -> list[float]:
    """The sampled token's log-prob at each position of a vLLM completion (``logprobs=0``: one entry per position)."""
    return [next(iter(position.values())).logprob for position in logprobs]


class WeakVLLMEngine:
    """The weak checkpoint in a colocated ``vllm.LLM`` (loaded once; the weak model is frozen, so never synced).

    Args:
        model: local folder of the weak checkpoint (safetensors).
        seed: the engine's seed (used only by unseeded requests).
        max_model_len, gpu_memory_utilization, max_num_seqs, dtype: passed to ``vllm.LLM``.
        external_launcher: run under the training processes' ``torch.distributed`` launch, as TRL's colocated engine
            (``distributed_executor_backend="external_launcher"``); ``False`` for a standalone process, where the
            engine core runs in-process too (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless set: a faster start, and no
            engine subprocess).
    """

    def __init__(
        self,
        model: str,
        *,
        seed: int = 0,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.2,
        max_num_seqs: int | None = None,
        dtype: str = "auto",
        external_launcher: bool = False,
    ):
        if not external_launcher:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        kwargs = {"distributed_executor_backend": "external_launcher"} if external_launcher else {}
        self.dtype = dtype
        self.llm = LLM(
            model=model,
            seed=seed,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            max_num_seqs=max_num_seqs,
            dtype=dtype,
            max_num_batched_tokens=4096,  # as TRL's colocated engine: the default misleads vLLM's memory profiler
            logprobs_mode="processed_logprobs",
            trust_remote_code=False,
            **kwargs,
        )

    @classmethod
    def for_trainer(cls, trainer, model: str, dtype: str = "auto") -> WeakVLLMEngine:
        """The weak engine of a GRPO trainer, next to TRL's colocated policy engine: the same launch (TRL's
        environment variables for ``external_launcher``), ``vllm_max_model_length``; ``dtype``: the weak model's."""
        acc, args = trainer.accelerator, trainer.args
        join_launch(acc)
        engine = cls(
            model,
            seed=args.seed + acc.process_index,
            max_model_len=args.vllm_max_model_length,
            gpu_memory_utilization=args.weak_vllm_gpu_memory_utilization,
            dtype=dtype,
            external_launcher=True,
        )
        acc.wait_for_everyone()
        return engine

    def sample(
        self,
        prompt_ids_list: list[list[int]],
        n: int,
        settings: SamplingSettings,
        seed: int | Sequence[int] | None = None,
    ) -> tuple[list[list[int]], list[list[float]]]:
        """``n`` completions per prompt, prompt-major (the ``n`` of prompt 0 first): token ids (a completion that
        stopped at a stop token ends with it) and the sampled tokens' log-probs (see the module docstring). Seeds by
        :func:`completion_seeds`. vLLM does not detokenize (``detokenize=False``; the ids and log-probs are the same,
        it saves about a tenth of the call), unless ``stop`` strings are given."""
        from vllm import SamplingParams

        seeds = completion_seeds(seed, len(prompt_ids_list), n)
        prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_ids_list for _ in range(n)]
        request = settings.request()
        if not request.get("stop"):  # only ids and log-probs are read: no text (stop strings need it)
            request.setdefault("detokenize", False)
        params = [SamplingParams(**request, seed=s) for s in seeds]
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        completions = [out.outputs[0] for out in outputs]
        return [list(c.token_ids) for c in completions], [_sampled_logps(c.logprobs) for c in completions]


def join_launch(state) -> None:
    """Set up the environment ``external_launcher`` reads, as TRL's colocated engine does: this process's rank in the
    launch (``state``: accelerate's ``Accelerator`` or ``PartialState``) and a rendezvous address (TRL's
    ``ensure_master_addr_port``). Each process then has its own engine (tensor parallel size 1), its requests its own."""
    from trl.trainer.utils import ensure_master_addr_port

    os.environ.setdefault("RANK", str(state.process_index))
    os.environ.setdefault("LOCAL_RANK", str(state.local_process_index))
    os.environ.setdefault("WORLD_SIZE", str(state.num_processes))
    ensure_master_addr_port()


class WeakVLLMServer:
    """The weak model on a vLLM server (``vllm serve WEAK --logprobs-mode processed_logprobs``), through TRL's
    ``VLLMClient``. Nothing is synced, so any vLLM server of the weak checkpoint works; every process sends its own
    rows. Same :meth:`sample` as :class:`WeakVLLMEngine`: one request per completion (its own seed), sent
    ``max_concurrent_requests`` at a time, which the server batches."""

    def __init__(self, base_url: str, connection_timeout: float = 240.0, max_concurrent_requests: int = 32):
        from trl.generation.vllm_client import VLLMClient

        self.client = VLLMClient(base_url=base_url, connection_timeout=connection_timeout)
        self.max_concurrent_requests = max_concurrent_requests

    def sample(
        self,
        prompt_ids_list: list[list[int]],
        n: int,
        settings: SamplingSettings,
        seed: int | Sequence[int] | None = None,
    ) -> tuple[list[list[int]], list[list[float]]]:
        """As :meth:`WeakVLLMEngine.sample`."""
        seeds = completion_seeds(seed, len(prompt_ids_list), n)
        body = settings.request()
        known = ("n", "repetition_penalty", "temperature", "top_p", "top_k", "min_p", "max_tokens", "logprobs")
        named = {k: body.pop(k) for k in known}

        def send(job):
            ids, s = job
            extra = {**body, **({"seed": s} if s is not None else {})}
            out = self.client.generate(prompts=[list(ids)], **named, generation_kwargs=extra)
            return out["completion_ids"][0], [position[0] for position in out["logprobs"][0]]

        jobs = [(ids, seeds[i * n + j]) for i, ids in enumerate(prompt_ids_list) for j in range(n)]
        with ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrent_requests, len(jobs)))) as pool:
            results = list(pool.map(send, jobs))
        return [ids for ids, _ in results], [logps for _, logps in results]


def weak_engine(trainer, weak_model=None) -> WeakVLLMEngine | WeakVLLMServer | None:
    """The weak vLLM backend of a GRPO trainer (``args.weak_vllm_backend``), or ``None`` for transformers' ``generate``.
    The colocated engine loads the weak checkpoint's folder (the loaded weak model's, else that of the trainer's
    ``weak_model`` argument or ``weak_model_name_or_path``: :func:`~wmss_trl.weak.weak_folder`;
    :func:`wmss_trl.grpo.checks.check_request` refuses anything but a local folder before loading), in the dtype the
    weak model has or would be loaded in."""
    from ..weak import weak_dtype, weak_folder

    args = trainer.args
    if args.weak_vllm_backend == "server":
        return WeakVLLMServer(args.weak_vllm_server_base_url, connection_timeout=args.vllm_server_timeout)
    if args.weak_vllm_backend == "colocate":
        weak = trainer.weak_model if trainer.weak_model is not None else weak_model
        folder = weak_folder(weak, args.weak_model_name_or_path)
        return WeakVLLMEngine.for_trainer(trainer, folder, weak_dtype(weak, args.weak_model_init_kwargs))
    return None
