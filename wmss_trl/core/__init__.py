"""Pure math shared by the trainers and the WD-DS pipeline (no trainer state, no I/O)."""

from .rollouts import aggregate_rewards, cut_at_eos
from .signals import ThreeSignalCoefs, three_signal_weights, three_signals


__all__ = ["ThreeSignalCoefs", "aggregate_rewards", "cut_at_eos", "three_signal_weights", "three_signals"]
