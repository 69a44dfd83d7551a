"""Verifiers (TRL-style reward functions) for mining wrong answers, and loading reward functions by name.

Every function here has TRL GRPO's reward signature

    f(prompts, completions, completion_ids=None, **dataset_columns) -> list[float | None]

``completions`` are strings (plain prompts) or ``[{"role": "assistant", "content": ...}]`` (conversational prompts);
the reference answer arrives as a dataset column (``solution``, else ``answer``). The return value is 1.0 (correct),
0.0 (wrong) or None (not applicable: the reference cannot be read), one per completion.

Which verifier, by the answers a model writes (the names are those ``--reward_funcs`` takes):

* ``\\boxed{...}`` answers, conversational completions, a ``solution`` column: TRL's ``accuracy_reward``
  (math-verify), used as is.
* plain numbers ("... so 42", GSM8K's "#### 72"): :func:`numeric_accuracy_reward`. TRL's ``accuracy_reward`` reads
  only a LaTeX answer after an anchor or in ``\\boxed{}`` (it scores "42", "$42$" and "#### 42" as 0.0 against
  "42"), only ``completion[0]["content"]`` (a plain-string completion is a TypeError) and only a ``solution``
  column; it also needs math-verify, which wmss_trl does not require.
* other unboxed math (``$\\frac{3}{4}$``, "1/2", "x + 1"): :func:`math_verify_reward`, math-verify with plain
  expressions allowed, which TRL's ``accuracy_reward`` turns off.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import re
import sys
import threading
from collections.abc import Callable, Sequence


REFERENCE_COLUMNS = ("solution", "answer")

# An optional sign, digits with optional thousands separators, an optional decimal part; or a bare decimal (".5").
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")


def completion_text(completion) -> str:
    """The text of one completion: the string itself, or the content of the last message of a conversation."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(
        f"a completion must be a string or a list of messages [{{'role': 'assistant', 'content': ...}}], got "
        f"{type(completion).__name__}."
    )


def last_number(text) -> float | None:
    """The last number written in ``text`` as a float (``"1,234.5"`` -> 1234.5), or None when there is none.

    Numbers that are already int/float are returned as floats, so a numeric ``answer`` column works too.
    """
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        return None if isinstance(text, float) and math.isnan(text) else float(text)
    matches = _NUMBER.findall(str(text))
    if not matches:
        return None
    return float(matches[-1].replace(",", ""))


def numbers_equal(a: float, b: float, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    """|a - b| <= max(rel_tol * max(|a|, |b|), abs_tol)."""
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)


def _references(kwargs: dict, reference_column: str | None, n: int, name: str) -> list:
    columns = (reference_column,) if reference_column else REFERENCE_COLUMNS
    for column in columns:
        if column in kwargs and kwargs[column] is not None:
            refs = list(kwargs[column])
            if len(refs) != n:
                raise ValueError(f"{name}: got {n} completions but {len(refs)} values in column {column!r}.")
            return refs
    available = sorted(k for k in kwargs if k not in ("trainer_state", "log_extra", "log_metric", "completion_ids"))
    raise ValueError(
        f"{name} needs the reference answers in a dataset column named {' or '.join(repr(c) for c in columns)}; "
        f"the columns passed were {available}. Rename the column, or build the verifier with "
        f"`reference_column=...`."
    )


def get_numeric_accuracy_reward(reference_column: str | None = None, rel_tol: float = 1e-6) -> Callable:
    """Build a verifier: 1.0 when the last number of the completion equals the last number of the reference.

        r = 1[ |last_number(completion) - last_number(reference)| <= rel_tol * max(|.|, |.|) ]

    A reference without a number gives None (not applicable); a completion without a number gives 0.0. Taking the
    *last* number of the reference also reads GSM8K-style solutions (``"... #### 72"``).

    Kept beside TRL's ``accuracy_reward`` for what that cannot do: plain-number answers with no LaTeX, plain-string
    completions, an ``answer`` (or any ``reference_column``) column, and no math-verify dependency. For
    ``\\boxed{}`` answers use TRL's (``--reward_funcs accuracy_reward``).
    """

    def numeric_accuracy_reward(prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float | None]:
        if completions is None:
            raise ValueError("numeric_accuracy_reward needs `completions`.")
        refs = _references(kwargs, reference_column, len(completions), "numeric_accuracy_reward")
        rewards: list[float | None] = []
        for completion, ref in zip(completions, refs, strict=True):
            gold = last_number(ref)
            if gold is None:
                rewards.append(None)
                continue
            pred = last_number(completion_text(completion))
            rewards.append(float(pred is not None and numbers_equal(pred, gold, rel_tol=rel_tol)))
        return rewards

    return numeric_accuracy_reward


numeric_accuracy_reward = get_numeric_accuracy_reward()
numeric_accuracy_reward.__doc__ = (
    "1.0 if the last number of the completion equals the last number of the reference (column `solution`, else "
    "`answer`), 0.0 if not, None if the reference has no number. TRL reward signature."
)


def get_math_verify_reward(reference_column: str | None = None) -> Callable:
    """Build a verifier for LaTeX-style answers with ``math_verify``: 1.0 when the completion's final answer is
    mathematically equal to the reference (``\\frac{1}{2}`` == ``0.5``), 0.0 when not, None when the reference cannot
    be parsed.

    The completion's answer is the first match in math_verify's priority order (a ``\\boxed{}`` first, then anchored
    phrases such as "the answer is", then the last expression), so hedging ("41 or 42") is not rewarded.

    The same math-verify calls as TRL's ``accuracy_reward``, plus what that turns off or cannot take: unanchored
    LaTeX and plain expressions (``ExprExtractionConfig``: "1/2", "$\\frac{3}{4}$" without "answer is"),
    plain-string completions and an ``answer`` (or any ``reference_column``) column.
    """

    def math_verify_reward(prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float | None]:
        try:
            from latex2sympy2_extended import NormalizationConfig
            from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
        except ImportError as e:  # pragma: no cover - math-verify is installed with the `demo` extra
            raise ImportError("math_verify_reward needs the `math-verify` package: pip install math-verify") from e
        if completions is None:
            raise ValueError("math_verify_reward needs `completions`.")
        refs = _references(kwargs, reference_column, len(completions), "math_verify_reward")
        # math_verify times out with signal.alarm, which only works in the main thread
        main_thread = threading.current_thread() is threading.main_thread()
        parse_timeout, verify_timeout = (10, 5) if main_thread else (None, None)
        if not main_thread:
            logging.getLogger("math_verify").setLevel(logging.ERROR)
        answer_config = [
            LatexExtractionConfig(normalization_config=NormalizationConfig(units=True), boxed_match_priority=0),
            ExprExtractionConfig(),
        ]
        rewards: list[float | None] = []
        for completion, ref in zip(completions, refs, strict=True):
            gold = parse(str(ref), parsing_timeout=parse_timeout) if ref is not None else []
            if len(gold) == 0:
                rewards.append(None)
                continue
            pred = parse(
                completion_text(completion),
                extraction_config=answer_config,
                extraction_mode="first_match",
                parsing_timeout=parse_timeout,
            )
            rewards.append(float(len(pred) > 0 and verify(gold, pred, timeout_seconds=verify_timeout)))
        return rewards

    return math_verify_reward


math_verify_reward = get_math_verify_reward()
math_verify_reward.__doc__ = (
    "1.0 if the completion's final answer equals the reference (column `solution`, else `answer`) according to "
    "math_verify (LaTeX or plain), 0.0 if not, None if the reference cannot be parsed. TRL reward signature."
)


def _registry() -> dict[str, Callable]:
    """Ours, plus TRL's verifiers under the names ``trl grpo --reward_funcs`` gives them (trl/scripts/grpo.py, where
    the registry is local to ``main`` and cannot be imported), with the same arguments."""
    from trl.rewards import (
        accuracy_reward,
        get_soft_overlong_punishment,
        reasoning_accuracy_reward,
        think_format_reward,
    )

    return {
        "numeric_accuracy_reward": numeric_accuracy_reward,
        "math_verify_reward": math_verify_reward,
        "accuracy_reward": accuracy_reward,
        "reasoning_accuracy_reward": reasoning_accuracy_reward,
        "think_format_reward": think_format_reward,
        "get_soft_overlong_punishment": get_soft_overlong_punishment(max_completion_len=1280, soft_punish_cache=256),
    }


def resolve_reward_funcs(names: Sequence[str | Callable]) -> list[Callable]:
    """Turn names into reward functions, like ``trl grpo --reward_funcs``: a registered name
    (``numeric_accuracy_reward``, ``math_verify_reward``, TRL's ``accuracy_reward``...) or a dotted import path
    (``my_lib.rewards.f``, importable from the current directory). Callables are passed through."""
    if isinstance(names, (str, bytes)) or callable(names):
        names = [names]
    if not names:
        raise ValueError("no reward function: pass at least one (e.g. numeric_accuracy_reward or my_lib.rewards.f).")
    registry = _registry()
    funcs = []
    for name in names:
        if callable(name):
            funcs.append(name)
        elif name in registry:
            funcs.append(registry[name])
        elif "." in name:
            module_path, attr = name.rsplit(".", 1)
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            try:
                module = importlib.import_module(module_path)
            except ImportError as e:
                raise ValueError(f"could not import module {module_path!r} of reward function {name!r}: {e}") from e
            if not hasattr(module, attr):
                raise ValueError(f"module {module_path!r} has no attribute {attr!r} (reward function {name!r}).")
            func = getattr(module, attr)
            if not callable(func):
                raise ValueError(f"reward function {name!r} is not callable.")
            funcs.append(func)
        else:
            raise ValueError(
                f"unknown reward function {name!r}: use one of {sorted(registry)} or a dotted import path "
                "(e.g. my_lib.rewards.my_reward)."
            )
    return funcs


def reward_func_name(func) -> str:
    return getattr(func, "__name__", type(func).__name__)
