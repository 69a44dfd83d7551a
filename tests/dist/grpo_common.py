"""Helpers shared by the WMSS-GRPO tests and their launched scripts: toy rewards, prompt data, CPU configs."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def has_digit(prompts, completions, **kwargs):
    """1 when the completion contains a digit, else 0: a 0/1 'verifier' that random tiny models pass about half the
    time, so groups have reward variance and the weak model produces wrong answers."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [float(any(ch.isdigit() for ch in t)) for t in texts]


def digit_fraction(prompts, completions, **kwargs):
    """Fraction of digit characters in the completion (a continuous reward)."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(1, len(t)) for t in texts]


def prompt_dataset(n: int = 16):
    """Conversational prompts 'a+b=' (no completion column), as GRPO datasets have."""
    from conftest import arithmetic_prompt_completion

    return arithmetic_prompt_completion(n).remove_columns("completion")


def grpo_args(output_dir, **kw):
    """``conftest.cpu_args`` for WMSSGRPOConfig (or ``config_class``), with small generation settings."""
    from conftest import cpu_args

    from wmss_trl import WMSSGRPOConfig

    cls = kw.pop("config_class", WMSSGRPOConfig)
    return cpu_args(cls, output_dir, **{"num_generations": 4, "max_completion_length": 8, "learning_rate": 1e-3, **kw})
