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
    """Small deterministic CPU settings for WMSSGRPOConfig."""
    from wmss_trl import WMSSGRPOConfig

    base = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        activation_checkpointing=False,
        logging_steps=1,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=2,
        learning_rate=1e-3,
        seed=0,
        disable_tqdm=True,
    )
    base.update(kw)
    cls = base.pop("config_class", WMSSGRPOConfig)
    return cls(**base)
