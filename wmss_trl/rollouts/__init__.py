"""Weak rollouts sampled once and reused: the pool (:mod:`.pool`), its reader (:mod:`.reader`), the sampling backend
(:mod:`.backend`) and TRL's prompt / reward conventions shared with DPO negative mining (:mod:`.scoring`)."""

from .backend import BACKENDS, TransformersBackend
from .config import RolloutConfig
from .pool import build_pool, prompt_id, weights_fingerprint
from .reader import WeakRolloutPool


__all__ = [
    "BACKENDS",
    "RolloutConfig",
    "TransformersBackend",
    "WeakRolloutPool",
    "build_pool",
    "prompt_id",
    "weights_fingerprint",
]
