"""wmss_trl: Weak-Driven Learning (WMSS, arXiv 2602.08222) for Hugging Face TRL.

The public names are imported lazily (PEP 562): ``import wmss_trl`` and ``wmss --help`` stay instant, and torch /
TRL load only when a trainer, config or helper is first used.
"""

from __future__ import annotations

import importlib


__version__ = "0.1.0"

_EXPORTS = {
    "WMSSSFTConfig": ".sft",
    "WMSSSFTTrainer": ".sft",
    "WMSSGRPOConfig": ".grpo",
    "WMSSGRPOTrainer": ".grpo",
    "WMSSDPOConfig": ".dpo",
    "WMSSDPOTrainer": ".dpo",
    "MiningConfig": ".negatives",
    "mine_negatives": ".negatives",
    "mixed_cross_entropy": ".mixing",
    "mixed_token_logprobs": ".mixing",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value  # cache: __getattr__ runs once per name
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
