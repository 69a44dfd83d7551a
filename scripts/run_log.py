"""What the real-model scripts (``real_grpo.py``, ``real_saturation.py``) share: a timestamped log line, reading a
JSON file, and :class:`StepLogger`, one readable log line per optimizer step."""

from __future__ import annotations

import json
import time

from transformers import TrainerCallback


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def read_json(path):
    with open(path) as f:
        return json.load(f)


class StepLogger(TrainerCallback):
    """One log line per optimizer step, readable in a log file: ``<name> step t/T (<s>s): key=value ...``, written
    whenever the trainer logs ``trigger``, with the step's wall time (``time_digits`` decimals) and those of ``keys``
    the logged metrics hold as numbers (``digits`` significant digits, each key shown without ``strip``).
    ``step_times`` keeps the seconds of every step."""

    def __init__(self, name, keys, trigger, digits=4, time_digits=1, strip=""):
        self.name, self.keys, self.trigger = name, keys, trigger
        self.digits, self.time_digits, self.strip = digits, time_digits, strip
        self.t0, self.step_times = None, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_times.append(time.perf_counter() - self.t0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or self.trigger not in logs:
            return
        shown = " ".join(
            f"{k.removeprefix(self.strip)}={logs[k]:.{self.digits}g}"
            for k in self.keys
            if isinstance(logs.get(k), (int, float))
        )
        last = self.step_times[-1] if self.step_times else float("nan")
        log(f"{self.name} step {state.global_step}/{state.max_steps} ({last:.{self.time_digits}f}s): {shown}")
