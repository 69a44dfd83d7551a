"""The demo's accuracy curves: greedy accuracy on fixed problem sets during training, logged through the trainer
(:func:`make_callback_class`), the steps it is taken at, and the curve read back from ``log_history``."""

from __future__ import annotations

import functools
import time

from .args import DemoArguments


@functools.cache
def make_callback_class():
    """:class:`GreedyAccuracyCallback`, defined on first use so that importing this module does not import
    transformers' trainer (and torch) before :func:`pin_numerics` ran."""
    from transformers import TrainerCallback

    class GreedyAccuracyCallback(TrainerCallback):
        """Greedy-decoding accuracy of the model being trained on fixed problem sets, logged through the trainer.

        What the libraries do not do: transformers' eval loop (``eval_strategy``, ``compute_metrics``) scores a
        causal LM teacher-forced (loss and next-token argmax over the reference completion) and TRL's GRPO
        evaluation samples; neither decodes greedily and checks the final answer, which is what the demo's table
        reports. So this callback runs :func:`wmss_trl.tasks.evaluate` after the steps in ``steps`` and at the end
        of training, and hands the numbers to ``trainer.log`` as ``eval_<split>_accuracy``: from there they reach
        ``report_to``, ``trainer.state.log_history`` and ``trainer_state.json`` like every other metric, and the
        demo's curves are read back from ``log_history``. It logs while the model is in eval mode, so TRL's
        trainers file the call under their (empty) eval metrics and leave the accumulated training metrics alone.
        It also keeps its own time out of :meth:`train_time` and stops training once ``budget`` seconds of
        training are spent (transformers has no wall-time limit).
        """

        def __init__(self, trainer, tokenizer, splits: dict, steps: set[int], budget: float | None = None):
            self.trainer, self.tokenizer, self.splits, self.steps = trainer, tokenizer, splits, steps
            self.budget = budget
            self.start, self.eval_time, self.last_step = None, 0.0, None

        def _evaluate(self, model, step):
            from ...tasks import evaluate

            t = time.perf_counter()
            was_training = model.training
            metrics = {
                f"eval_{name}_accuracy": evaluate(model, self.tokenizer, ds, desc=f"curve {name}")
                for name, ds in self.splits.items()
            }
            self.trainer.log(metrics)  # model.eval() since evaluate(): TRL's log() treats this as an eval call
            model.train(was_training)
            self.last_step = step
            self.eval_time += time.perf_counter() - t

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step in self.steps:
                self._evaluate(model, state.global_step)
            if self.budget is not None and self.train_time() >= self.budget:
                control.should_training_stop = True

        def on_train_end(self, args, state, control, model=None, **kwargs):
            if self.last_step != state.global_step:
                self._evaluate(model, state.global_step)

        def train_time(self) -> float:
            """Seconds spent training, curve evaluations excluded."""
            return time.perf_counter() - self.start - self.eval_time

    return GreedyAccuracyCallback


def curve_steps(cfg: DemoArguments, max_steps: int) -> set[int]:
    """Steps after which the curves are evaluated (the end of training always is)."""
    if cfg.time_budget is not None and cfg.eval_every is None:
        return set()
    if cfg.eval_every is not None:
        return set(range(cfg.eval_every, max_steps + 1, cfg.eval_every))
    return {max(1, round(k * max_steps / 3)) for k in (1, 2, 3)}


def curve_from_log(log_history: list[dict], start: dict) -> list[dict]:
    """The accuracy curve of an arm: its starting point (the strong checkpoint, step 0) and every
    ``eval_<split>_accuracy`` the callback logged (transformers' ``state.log_history``)."""
    points = [{"step": 0, "test": start["test"], "ood": start["ood"]}]
    points += [
        {"step": h["step"], "test": h["eval_test_accuracy"], "ood": h["eval_ood_accuracy"]}
        for h in log_history
        if "eval_test_accuracy" in h
    ]
    return points
