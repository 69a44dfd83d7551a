"""Where the CPU time of a GRPO step goes: per-section CPU time of the arms of ``scripts/bench_grpo.py`` (a
diagnostic, not a benchmark).

    OMP_NUM_THREADS=1 python scripts/profile_grpo.py --kinds vanilla_b0,wmss_pool,vanilla_rows --batch 64
    OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1 python scripts/profile_grpo.py \\
        --kinds vanilla_vllm,wmss_vllm,vanilla_rows_vllm --batch 64      # in the vLLM venv

The arms are built by bench_grpo's ``make_trainer`` (same models, prompts, settings) and train in alternating rounds;
the methods below are wrapped with a CPU-time accumulator (``time.process_time``, inclusive: a section contains the
sections it calls), and each timed step reports what every section took during it. The table gives the mean per
timed step of each arm and the difference of each arm to the first one. Unlike cProfile, the wrappers cost nothing
measurable, so the shares are those of an unprofiled step.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("OMP_NUM_THREADS", "1")
import bench_grpo  # noqa: E402


TOTALS: dict[str, float] = defaultdict(float)


def wrap(owner, name: str, label: str) -> None:
    """Replace ``owner.name`` by a wrapper adding its CPU time to ``TOTALS[label]``."""
    inner = getattr(owner, name)

    @functools.wraps(inner)
    def timed(*args, **kwargs):
        start = time.process_time()
        try:
            return inner(*args, **kwargs)
        finally:
            TOTALS[label] += time.process_time() - start

    setattr(owner, name, timed)


def wrap_sections(vllm: bool) -> None:
    import accelerate
    from accelerate.optimizer import AcceleratedOptimizer
    from trl import GRPOTrainer

    from wmss_trl.grpo import metrics, trainer, weak_sampler

    wrap(GRPOTrainer, "_generate", "TRL: policy generation")
    wrap(GRPOTrainer, "_generate_and_score_completions", "TRL: generate and score (incl. generation)")
    wrap(GRPOTrainer, "_calculate_rewards", "TRL: reward calls (policy and weak rows)")
    wrap(GRPOTrainer, "_tokenize_prompts", "TRL: prompt tokenisation (policy and weak rows)")
    wrap(GRPOTrainer, "_get_per_token_logps_and_entropies", "TRL: policy log-prob forwards (loss, old logps)")
    wrap(GRPOTrainer, "compute_loss", "TRL: loss (its forward included)")
    wrap(accelerate.Accelerator, "backward", "backward")
    wrap(AcceleratedOptimizer, "step", "optimizer step")
    wrap(trainer.WMSSGRPOTrainer, "_add_wmss", "WMSS: generation hook (_add_wmss)")
    wrap(trainer.WMSSGRPOTrainer, "_append_weak_rows", "WMSS:  weak rows (sample/read, decode, score, append)")
    wrap(weak_sampler.WeakSampler, "samples", "WMSS:   weak samples (pool read or weak decode)")
    wrap(weak_sampler.WeakSampler, "_score", "WMSS:   weak rewards")
    wrap(trainer.WMSSGRPOTrainer, "_no_grad_forwards", "WMSS:  no-grad forwards (weak model, policy)")
    wrap(trainer, "add_negatives", "WMSS:  selection and advantages")
    wrap(metrics, "log_table_rows", "WMSS:  completions table rows")
    wrap(trainer, "apply_token_weights", "WMSS: token weights (in the loss when deferred)")
    if vllm:
        from trl.generation.vllm_generation import VLLMGeneration

        wrap(VLLMGeneration, "generate", "TRL: vLLM policy engine call")
        wrap(VLLMGeneration, "sync_weights", "TRL: vLLM weight sync")
        wrap(weak_sampler.WeakSampler, "generate", "WMSS:    weak engine call")


class SectionTimer(bench_grpo.StepTimer):
    """bench_grpo's step timer, plus the sections' CPU time during each step."""

    def __init__(self):
        super().__init__()
        self.sections, self._before = [], {}

    def on_step_begin(self, args, state, control, **kwargs):
        self._before = dict(TOTALS)
        super().on_step_begin(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        self.sections.append({key: TOTALS[key] - self._before.get(key, 0.0) for key in TOTALS})


def main() -> int:
    import torch
    from transformers.trainer_callback import PrinterCallback

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench_grpo.add_model_flags(p, completion_length=32)
    p.add_argument("--kinds", default="vanilla_b0,wmss_pool,vanilla_rows", help="arms of bench_grpo (first: base)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per round (after one warm-up generation cycle)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--steps_per_generation", type=int, default=1, help="TRL's steps_per_generation, both arms (as bench_grpo)"
    )
    p.add_argument("--free_length", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    kinds = a.kinds.split(",")
    vllm = any(kind.endswith("_vllm") for kind in kinds)
    if vllm:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        bench_grpo.keep_vllm_cpu_weights()
    wrap_sections(vllm)
    root = tempfile.mkdtemp(prefix="profile_grpo_")
    strong, weak = bench_grpo.build_models(root, a.hidden, a.layers)
    a.pool = None
    if "wmss_pool" in kinds:
        a.pool = os.path.join(root, "pool")
        bench_grpo.build_bench_pool(weak, root, a)
    results = {kind: defaultdict(list) for kind in kinds}
    for r in range(a.rounds):
        for kind in kinds:
            timer = SectionTimer()
            trainer = bench_grpo.make_trainer(kind, strong, weak, root, a, 0.0, timer)
            trainer.remove_callback(PrinterCallback)
            trainer.train()
            timed = range(a.steps_per_generation, a.steps_per_generation + a.steps)  # after one generation cycle
            for i in timed:
                results[kind]["step"].append(timer.cpu_times[i])
                for key, value in timer.sections[i].items():
                    results[kind][key].append(value)
            print(f"round {r} {kind}: cpu " + ", ".join(f"{t:.3f}" for t in (timer.cpu_times[i] for i in timed)))
            del trainer
    base = statistics.mean(results[kinds[0]]["step"])
    print(f"\n{a.batch} rows per process; mean CPU s per timed step ({a.rounds} rounds x {a.steps} steps per arm)")
    print(f"{'section':54s}" + "".join(f"{k:>18s}" for k in kinds) + "".join(f"{'d ' + k:>22s}" for k in kinds[1:]))
    keys = ["step"] + sorted({key for kind in kinds for key in results[kind]} - {"step"})
    for key in keys:
        means = [statistics.mean(results[k][key]) if results[k][key] else 0.0 for k in kinds]
        deltas = "".join(f"{m - means[0]:+13.4f} ({100 * (m - means[0]) / base:+5.1f}%)" for m in means[1:])
        print(f"{key:54s}" + "".join(f"{m:18.4f}" for m in means) + deltas)
    return 0


if __name__ == "__main__":
    sys.exit(main())
