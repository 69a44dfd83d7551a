"""Prompts and rewards as TRL's GRPO handles them, shared by the weak-rollout pool and DPO negative mining: the
prompt's token ids, a completion in the prompt's format, TRL's reward-function calling convention and its reward
combination."""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import Callable, Sequence

import torch
from trl.data_utils import is_conversational

from ..core import aggregate_rewards
from ..rewards import reward_func_name


def tokenize_prompt(tokenizer, prompt, chat_template_kwargs: dict | None = None) -> list[int]:
    """Prompt ids exactly as TRL's DPO/GRPO build them: the chat template with the generation prompt (and
    ``chat_template_kwargs``) for conversational prompts, the plain tokenizer otherwise."""
    if is_conversational({"prompt": prompt}):
        return list(
            tokenizer.apply_chat_template(
                prompt, tokenize=True, return_dict=True, add_generation_prompt=True, **(chat_template_kwargs or {})
            )["input_ids"]
        )
    return list(tokenizer(text=prompt)["input_ids"])


def as_completion(text: str, conversational: bool):
    """A completion in the prompt's format: an assistant message for conversational prompts, the text otherwise."""
    return [{"role": "assistant", "content": text}] if conversational else text


def _noop(*args, **kwargs):
    return None


def call_reward_funcs(
    reward_funcs: Sequence[Callable], prompts: list, completions: list, completion_ids: list[list[int]], columns: dict
) -> list[list[float | None]]:
    """Call every reward function exactly like TRL GRPO does: ``f(prompts=, completions=, completion_ids=,
    trainer_state=, log_extra=, log_metric=, **other_columns)``. Returns one list of rewards per function."""
    kwargs = dict(columns, trainer_state=None, log_extra=_noop, log_metric=_noop)
    out = []
    for func in reward_funcs:
        if isinstance(func, torch.nn.Module):
            raise TypeError("reward models (nn.Module) are not supported here; pass verifier functions.")
        result = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
        if inspect.isawaitable(result):
            result = asyncio.run(result)
        result = list(result)
        if len(result) != len(completions):
            raise ValueError(
                f"the reward function {reward_func_name(func)!r} returned {len(result)} rewards for "
                f"{len(completions)} completions; it must return one reward (or None) per completion."
            )
        out.append([None if r is None or (isinstance(r, float) and math.isnan(r)) else float(r) for r in result])
    return out


def combine_rewards(
    rewards_per_func: Sequence[Sequence[float | None]], weights: Sequence[float]
) -> list[float | None]:
    """TRL GRPO's combination (:func:`wmss_trl.core.aggregate_rewards`, fp64), per completion j: r_j = sum_k w_k r_jk
    over the functions with r_jk not None; None when no function applies (GRPO's all-NaN row)."""
    table = torch.tensor(
        [[math.nan if r is None else float(r) for r in row] for row in rewards_per_func], dtype=torch.float64
    ).reshape(len(rewards_per_func), -1)
    combined = aggregate_rewards(table.T, torch.tensor(list(weights), dtype=torch.float64))
    return [None if math.isnan(r) else r for r in combined.tolist()]
