"""WMSS-GRPO's input checks that need more than the config: run before any model loads where possible."""

from __future__ import annotations

import importlib.util
import math
import os

import torch
from datasets import IterableDataset

from ..weak import is_peft_model, require_safetensors, weak_folder
from .config import WMSSGRPOConfig


def check_request(model, args: WMSSGRPOConfig, weak_model, peft_config, train_dataset) -> None:
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
    if args.weak_rollouts_path is not None:
        check_weak_rollouts(args, weak_model, train_dataset)
    check_weak_vllm(args, weak_model)
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


def pool_epochs_needed(args: WMSSGRPOConfig, num_rows: int) -> int:
    """Epochs of weak draws a run takes: ``ceil(num_train_epochs)``, or with ``max_steps > 0``
    ``ceil(max_steps / S)`` with ``S = max(L // gradient_accumulation_steps, 1)`` optimizer steps per epoch and
    ``L = (num_rows // P) * num_iterations * steps_per_generation`` micro-batches per epoch (TRL's ``RepeatSampler``
    with ``P = generation_batch_size / num_generations`` prompts per generation batch)."""
    if args.max_steps <= 0:
        return math.ceil(args.num_train_epochs)
    per_batch = args.generation_batch_size // args.num_generations
    micro = (num_rows // per_batch) * args.num_iterations * args.steps_per_generation
    return math.ceil(args.max_steps / max(micro // args.gradient_accumulation_steps, 1))


def check_weak_rollouts(args: WMSSGRPOConfig, weak_model, train_dataset) -> None:
    """Refuse, before any model loads, a ``weak_rollouts_path`` that cannot serve this run: no weak negatives to
    serve, the PEFT base as weak model, or a pool made by another weak model (its folder's weights, or the weights of
    a ``weak_model`` object), other sampling settings, too few completions or epochs, or missing training prompts
    (:meth:`~wmss_trl.rollouts.WeakRolloutPool.check`). The tokenizer is checked by the trainer once it has it."""
    from ..rollouts import WeakRolloutPool, prompt_id, weights_fingerprint
    from ..rollouts.config import sampling_settings

    if args.num_weak_generations == 0:
        raise ValueError(
            "weak_rollouts_path holds weak completions for the weak negatives, but num_weak_generations=0. Set "
            "num_weak_generations > 0 (at most the pool's completions per prompt), or unset weak_rollouts_path."
        )
    if args.weak_use_vllm or args.weak_vllm_server_base_url:
        raise ValueError(
            "weak_rollouts_path serves the weak negatives from a pool, so the weak model does not decode; "
            "weak_use_vllm / weak_vllm_server_base_url would not be used. Unset them (build the pool with vLLM "
            "instead), or unset weak_rollouts_path to sample online."
        )
    if args.peft_base_as_weak:
        raise ValueError(
            "weak_rollouts_path needs a separate weak model (weak_model_name_or_path or weak_model=), the one the pool "
            "was built from; with peft_base_as_weak=True unset weak_rollouts_path (the base samples online)."
        )
    path = weak_model if isinstance(weak_model, (str, os.PathLike)) else None
    path = path or (args.weak_model_name_or_path if weak_model is None else None)
    if path is not None and not os.path.isdir(path):
        raise ValueError(
            f"weak_rollouts_path: the pool's weak model is checked from its local folder, and {str(path)!r} is not "
            "one. Pass the local checkpoint folder the pool was built from (wmss weak-rollouts --model)."
        )
    loaded = None
    if weak_model is not None and path is None:
        from ..io import loaded_model_fingerprint

        loaded = loaded_model_fingerprint(weak_model)
    sized = train_dataset is not None and not isinstance(train_dataset, IterableDataset)
    WeakRolloutPool(args.weak_rollouts_path).check(
        sampling=sampling_settings(args),
        num_generations=args.num_weak_generations,
        epochs=pool_epochs_needed(args, len(train_dataset)) if sized else 1,
        prompt_ids=[prompt_id(p) for p in train_dataset["prompt"]] if sized else [],
        weak_files=weights_fingerprint(path) if path is not None else None,
        weak_loaded=loaded,
    )


def check_weak_vllm(args: WMSSGRPOConfig, weak_model) -> None:
    """Refuse a weak vLLM backend (``args.weak_vllm_backend``) that cannot run: vLLM not installed, the adapter-disabled
    base as weak model (vLLM serves a checkpoint folder), or, for the colocated engine, a weak model that is not a
    local folder of safetensors (the folder ``weak_model`` names or was loaded from, else ``weak_model_name_or_path``)."""
    backend = args.weak_vllm_backend
    if backend is None:
        return
    off = "or set weak_use_vllm=False to decode the weak model with transformers"
    if importlib.util.find_spec("vllm") is None:
        raise ValueError(
            f"the weak negatives are sampled with vLLM ({_why_vllm(args)}), but vllm is not installed. Install it "
            f"(pip install 'wmss_trl[vllm]'), {off}."
        )
    if args.peft_base_as_weak:
        raise ValueError(
            f"the weak model on vLLM ({_why_vllm(args)}) must be a checkpoint folder, but peft_base_as_weak=True "
            f"makes it the policy's adapter-disabled base. Give the base checkpoint folder as weak_model_name_or_path "
            f"(and peft_base_as_weak=False), {off}."
        )
    if backend == "colocate":
        folder = weak_folder(weak_model, args.weak_model_name_or_path)
        if not folder or not os.path.isdir(folder):
            raise ValueError(
                f"the colocated weak vLLM engine ({_why_vllm(args)}) loads the weak checkpoint from a local folder, "
                f"but the weak model is not one (got {folder!r}). Save it with save_pretrained and pass the folder "
                f"(weak_model= or weak_model_name_or_path), use a weak server (weak_vllm_server_base_url), {off}."
            )
        require_safetensors(folder, "weak model")


def _why_vllm(args: WMSSGRPOConfig) -> str:
    if args.weak_vllm_backend == "server":
        return f"weak_vllm_server_base_url={args.weak_vllm_server_base_url!r}"
    return "weak_use_vllm=True" if args.weak_use_vllm else "use_vllm=True, so weak_use_vllm defaults to True"


# ------------------------------------------------------------------------------------------------------------
# setup
# ------------------------------------------------------------------------------------------------------------


def correctness_index(reward_func_names: list[str], reward_weights: torch.Tensor, name: str | None) -> int | None:
    """The reward function that decides whether a weak completion is wrong (``weak_correctness_reward``), or None for
    the weighted sum of all of them; refuses reward setups that cannot mark anything wrong."""
    names = list(reward_func_names)
    if not names:
        raise ValueError(
            "weak negatives need a reward function that can mark a completion wrong, but no reward function was "
            "given. Pass reward_funcs (e.g. a verifier returning 1 for right and 0 for wrong answers)."
        )
    if name is not None:
        if name not in names:
            raise ValueError(f"weak_correctness_reward={name!r} is not one of the reward functions {names}.")
        return names.index(name)
    if not bool((reward_weights != 0).any()):
        raise ValueError(
            "weak negatives need a reward function that can mark a completion wrong, but every reward weight "
            f"is 0 ({reward_weights.tolist()}), so every weak completion would get reward 0. Give a "
            "verifier a non-zero weight, or name it with weak_correctness_reward."
        )
    return None
