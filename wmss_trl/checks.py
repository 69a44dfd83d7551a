"""Validation of the numeric WMSS config fields, shared by the three configs.

Values may arrive as strings (some YAML/JSON paths, ``--flag 0.5`` parsed as text): each helper converts the value,
checks that it is finite and in range, and returns the converted value, which the caller stores back on the config
(``self.x = check_float("x", self.x, ...)``), so nothing downstream ever sees the string.
"""

from __future__ import annotations

import math


def check_float(
    name: str,
    value,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
    hint: str = "",
) -> float | None:
    """``float(value)``, refused unless finite and in the range ``[low, high]`` (``(`` / ``)`` where open).

    ``optional``: ``None`` passes through. ``hint`` is appended to the message (what the field means).
    """
    if value is None and optional:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got the boolean {value!r}.{_suffix(hint)}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__}).{_suffix(hint)}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}.{_suffix(hint)}")
    too_low = low is not None and (number <= low if low_open else number < low)
    too_high = high is not None and (number >= high if high_open else number > high)
    if too_low or too_high:
        raise ValueError(
            f"{name} must be in {_interval(low, high, low_open, high_open)}, got {number}.{_suffix(hint)}"
        )
    return number


def check_int(
    name: str, value, *, low: int | None = None, high: int | None = None, optional: bool = False, hint: str = ""
) -> int | None:
    """``int(value)`` (an integral float or numeric string is accepted), refused unless in ``[low, high]``."""
    if value is None and optional:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got the boolean {value!r}.{_suffix(hint)}")
    try:
        number = float(value) if isinstance(value, str) else value
        if isinstance(number, float):
            if not number.is_integer():
                raise ValueError
            number = int(number)
        number = int(number)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be an integer, got {value!r}.{_suffix(hint)}") from None
    if (low is not None and number < low) or (high is not None and number > high):
        raise ValueError(f"{name} must be in {_interval(low, high, False, False)}, got {number}.{_suffix(hint)}")
    return number


def check_order(low_name: str, low, high_name: str, high) -> None:
    """Refuse ``low > high`` when both are set (e.g. ``entropy_weight_min`` and ``entropy_weight_max``)."""
    if low is not None and high is not None and low > high:
        raise ValueError(f"{low_name} ({low}) must be <= {high_name} ({high}).")


def check_shares(names: tuple[str, ...], values: tuple, *, need_positive_sum: bool = True) -> tuple[float, ...]:
    """Three-signal shares (WD-DS a, b, c and their GRPO/DPO counterparts): finite, >= 0, positive sum."""
    shares = tuple(check_float(n, v, low=0.0) for n, v in zip(names, values))
    if need_positive_sum and sum(shares) <= 0:
        raise ValueError(f"at least one of {', '.join(names)} must be > 0, got {shares}.")
    return shares


def _interval(low, high, low_open, high_open) -> str:
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    return f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"


def _suffix(hint: str) -> str:
    return f" {hint}" if hint else ""


def as_wmss_config(args, config_class, model, suffix: str):
    """The config a wmss_trl trainer runs with, accepting what TRL's trainer accepts.

    ``args`` itself when it is a ``config_class``; TRL's own config (``SFTConfig`` / ``DPOConfig`` / ``GRPOConfig``)
    or any ``TrainingArguments``, converted field by field with the WMSS fields at their defaults (not through
    ``to_dict()``, which masks every ``*_token`` field, SFT's ``eos_token`` / ``pad_token`` too); with ``None``, TRL's
    default ``<model name>-<suffix>`` output folder (``suffix`` = ``"SFT"``, ``"DPO"``, ``"GRPO"``).
    """
    from dataclasses import fields

    from transformers import TrainingArguments
    from trl.trainer.utils import get_config_model_id

    if args is None:
        name = model if isinstance(model, str) else get_config_model_id(model.config)
        return config_class(f"{str(name).split('/')[-1]}-{suffix}")
    if isinstance(args, config_class):
        return args
    if not isinstance(args, TrainingArguments):
        raise TypeError(
            f"args must be a {config_class.__name__}, TRL's config or TrainingArguments, got {type(args).__name__}."
        )
    # fields the config's __post_init__ derives from others are left for it to derive again (GRPO: generation batch)
    own = {f.name for f in fields(config_class) if f.init} - set(getattr(config_class, "_DERIVED_FIELDS", ()))
    return config_class(**{f.name: getattr(args, f.name) for f in fields(args) if f.init and f.name in own})
