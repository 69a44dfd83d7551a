"""The dataset's columns, checked against what TRL's trainers read, before any model loads.

TRL reads the columns when it prepares a dataset (SFT, DPO) or at the first step (GRPO's ``prompt`` and the reward
functions' keyword arguments), after the models have loaded, and a missing one ends in a bare ``KeyError``. The
check here reads the column names and the first row (TRL reads it too) and applies TRL's own rules with TRL's helpers
(``is_conversational``, ``is_conversational_from_value``, ``get_dataset_column_names``), so it refuses only what TRL
would fail on:

* SFT: tokenized ``input_ids``; ``prompt`` + ``completion`` (standard or conversational); conversational ``messages``
  (or ShareGPT ``conversations``, which TRL converts); else the ``dataset_text_field`` column (``text``). Not checked
  when TRL does not prepare the dataset: a ``formatting_func``, ``dataset_kwargs={"skip_prepare_dataset": True}``,
  or a vision dataset (``image`` / ``images``).
* DPO: ``chosen`` + ``rejected``; ``prompt`` is optional (an implicit prompt is the common prefix TRL extracts).
  Vision datasets are not checked (TRL does not prepare them).
* GRPO: ``prompt``; every argument a reward function requires by name (no default, beyond the ones TRL always passes)
  is a column.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable

from datasets import Dataset, IterableDataset
from trl.data_utils import get_dataset_column_names, is_conversational, is_conversational_from_value


# the keyword arguments TRL's GRPO passes to every reward function besides the dataset's columns
_REWARD_ARGUMENTS = {
    "prompts",
    "completions",
    "completion_ids",
    "trainer_state",
    "log_extra",
    "log_metric",
    "environments",
}
# the columns TRL's GRPO does not forward to the reward functions
_NOT_FORWARDED = {"prompt", "completion", "completion_ids"}


def _first_row(dataset) -> dict | None:
    """The first row, as TRL reads it (``next(iter(dataset))``); None when empty or not a ``datasets`` dataset."""
    if not isinstance(dataset, (Dataset, IterableDataset)):
        return None
    return next(iter(dataset), None)


def required_reward_columns(reward_func: Callable) -> list[str]:
    """Names a reward function requires as keyword arguments (no default), beyond those TRL's GRPO always passes:
    they must be dataset columns. Models, strings (model names) and unreadable signatures require none."""
    if not callable(reward_func) or isinstance(reward_func, str) or hasattr(reward_func, "config"):
        return []
    try:
        parameters = inspect.signature(reward_func).parameters.values()
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [
        p.name
        for p in parameters
        if p.kind in kinds and p.default is inspect.Parameter.empty and p.name not in _REWARD_ARGUMENTS
    ]


def _sft_missing(row: dict, columns: list[str], args, formatting_func) -> str | None:
    if formatting_func is not None or (getattr(args, "dataset_kwargs", None) or {}).get("skip_prepare_dataset"):
        return None
    if "image" in row or "images" in row or "input_ids" in columns or is_conversational_from_value(row):
        return None
    if "prompt" in columns:
        return None if "completion" in columns else "a 'completion' column to go with 'prompt'"
    if is_conversational(row):
        return None if "messages" in columns else "a 'messages' column for a conversational dataset"
    text_field = getattr(args, "dataset_text_field", "text")
    return None if text_field in columns else f"a {text_field!r} column (`dataset_text_field`)"


def _dpo_missing(row: dict, columns: list[str]) -> str | None:
    if "image" in row or "images" in row:
        return None
    missing = [c for c in ("chosen", "rejected") if c not in columns]
    return f"the column(s) {missing}" if missing else None


def _grpo_missing(columns: list[str], reward_funcs) -> str | None:
    if "prompt" not in columns:
        return "a 'prompt' column"
    if reward_funcs is None:
        return None
    funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    forwarded = set(columns) - _NOT_FORWARDED
    for func in funcs:
        missing = [name for name in required_reward_columns(func) if name not in forwarded]
        if missing:
            name = getattr(func, "__name__", type(func).__name__)
            never = sorted(set(missing) & _NOT_FORWARDED)
            note = f" (TRL never passes {never} as columns: give those parameters a default)" if never else ""
            return f"the column(s) {missing}, which the reward function {name!r} requires as keyword arguments{note}"
    return None


EXPECTED = {
    "sft": "one of: 'text' (the `dataset_text_field`, language modeling), 'messages' (conversational), 'prompt' + "
    "'completion' (prompt-completion, standard strings or conversational messages), or tokenized 'input_ids'",
    "dpo": "'chosen' + 'rejected', with an optional 'prompt' (explicit prompt; without it the prompt is the common "
    "prefix of chosen and rejected), each a string (standard) or a list of {'role', 'content'} messages "
    "(conversational)",
    "grpo": "a 'prompt' column (a string, or a list of {'role', 'content'} messages); the other columns are passed "
    "to the reward functions as keyword arguments",
}
FIX = {
    "sft": "Rename the columns (e.g. `dataset.rename_columns({'question': 'prompt', 'answer': 'completion'})`), set "
    "`dataset_text_field`, or pass a `formatting_func`",
    "dpo": "Rename the columns (e.g. `dataset.rename_columns({'good': 'chosen', 'bad': 'rejected'})`), or build pairs "
    "from a prompt dataset with `wmss mine-negatives`",
    "grpo": "Rename the column (e.g. `dataset.rename_column('question', 'prompt')`) or add the ones the reward "
    "functions need",
}


def check_dataset_columns(
    dataset,
    trainer: str,
    *,
    name: str = "train_dataset",
    args=None,
    formatting_func: Callable | None = None,
    reward_funcs: Callable | Iterable | None = None,
) -> None:
    """Refuse a dataset (or a dict of them) whose columns ``trainer`` (``"sft"``, ``"dpo"`` or ``"grpo"``) cannot
    read, naming the columns found and the ones expected (see the module docstring for TRL's rules). ``args`` is the
    trainer's config (SFT reads ``dataset_text_field`` and ``dataset_kwargs``); ``name`` says which dataset it is in
    the message. Empty datasets and other dataset types pass (they have their own checks)."""
    if isinstance(dataset, dict):
        for key, value in dataset.items():
            check_dataset_columns(
                value,
                trainer,
                name=f"{name}[{key!r}]",
                args=args,
                formatting_func=formatting_func,
                reward_funcs=reward_funcs,
            )
        return
    row = _first_row(dataset)
    if row is None:
        return
    columns = get_dataset_column_names(dataset)
    if trainer == "sft":
        missing = _sft_missing(row, columns, args, formatting_func)
    elif trainer == "dpo":
        missing = _dpo_missing(row, columns)
    elif trainer == "grpo":
        missing = _grpo_missing(columns, reward_funcs)
    else:
        raise ValueError(f"unknown trainer {trainer!r}: expected 'sft', 'dpo' or 'grpo'.")
    if missing is None:
        return
    kind = "conversational" if is_conversational(row) else "standard"
    raise ValueError(
        f"{name} has the columns {columns} ({kind} format) but lacks {missing}. TRL's {trainer.upper()} trainer reads "
        f"{EXPECTED[trainer]}. {FIX[trainer]}, and run again (no model has been loaded yet)."
    )


def require_rows(dataset, label: str, hint: str) -> None:
    """Refuse an empty dataset (map-style: 0 rows; iterable: no first row) before TRL reads its first row, which ends
    in a bare ``StopIteration``. The message is ``f"{label} is empty (0 rows){hint}"``. Other types pass."""
    empty = (isinstance(dataset, Dataset) and len(dataset) == 0) or (
        isinstance(dataset, IterableDataset) and next(iter(dataset), None) is None
    )
    if empty:
        raise ValueError(f"{label} is empty (0 rows){hint}")
