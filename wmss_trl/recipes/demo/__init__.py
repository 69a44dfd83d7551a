"""``wmss demo``: the whole story on the embedded arithmetic task, in minutes on a CPU.

    wmss demo [--output_dir runs/demo] [--seed 0] [--arms sft,neftune,wmss,grpo,wmss_grpo] [--report_to none]

1. **Weak** checkpoint: a small Qwen2 model built from config (char tokenizer) trained from scratch with SFT on the
   embedded train split (``wmss_trl.tasks``: 1-2 step word problems with worked steps) for ``weak_steps``.
2. **Strong** checkpoint: the weak one after ``strong_steps`` more SFT steps.
3. WD-DS entropies: H0 (weak) and H1 (strong) on every training problem.
4. Arms, all starting from the strong checkpoint, same data, seed and number of steps:
   ``sft`` (continued SFT), ``neftune`` (TRL's ``neftune_noise_alpha``), ``wmss`` (WD-DS resampling + WD-JT),
   ``grpo`` (TRL's GRPO, correctness reward), ``wmss_grpo`` (weak reference + weak negatives + entropy-weighted
   advantages). Controls for the benchmark: ``wmss_uniform`` (the weak logits replaced by a uniform distribution)
   and ``wmss_shuffled`` (the weak model's vocabulary permuted: same confidence, wrong tokens); ``dpo_mined`` (DPO
   whose rejected answers are the weak model's verified-wrong answers, mined with ``wmss_trl.negatives``) vs
   ``dpo_random`` (same prompts, the rejected answer is another problem's solution), both with the weak reference.
5. Greedy accuracy on all 200 held-out ``test`` problems and all 200 problems of the harder ``ood`` split (3 steps,
   never seen in training), during training (curves, logged like any metric: ``eval_test_accuracy``,
   ``eval_ood_accuracy``) and at the end (the last curve point): a table and a one-line reading on stdout,
   ``results_seed<N>.json``, each arm's ``trainer_state.json`` and ``accuracy.png``.
6. The RL arms and the strong checkpoint through ``wmss compare``'s evaluation (:mod:`wmss_trl.evaluation`) on the
   200 held-out problems: greedy pass@1, pass@k for k = 1, 2, 4 from n = 4 samples per problem at the GRPO arms'
   sampling settings (unbiased estimator), mean reward; a second table and the plot's pass@k row.

Reproducible numerics: the same seed gives the same table on every Intel x86-64 CPU with AVX2 only if the kernels
take the same code path. Before torch is imported, :func:`pin_numerics` pins oneMKL's conditional numerical
reproducibility (``MKL_CBWR=AVX2``), ATen's vectorised kernels (``ATEN_CPU_CAPABILITY=avx2``), oneDNN
(``ONEDNN_MAX_CPU_ISA=AVX2``) and one thread (``OMP_NUM_THREADS=1``), except where the user set a variable
(theirs is kept). The header prints what is in effect. Tolerance and cost: docs/demo.md.

Sizes and seeds: train 4000 problems (seed 0), test 200 (seed 1, disjoint from train), ood 200 (seed 2); model
hidden 128, 3 layers, 4 heads (~0.5M parameters); batch 32; the run seed (``--seed``) sets model init and data order.
Single process by design (the trainers themselves run under ``accelerate launch``; see the other commands).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict

from .args import ARM_INFO, ARMS, CONTROLS, FAMILIES, DemoArguments
from .arms import common_args, control_weak_model, grpo_args, pass_at_k_ks, rl_pass_at_k, run_arm, sft_phase
from .curves import curve_from_log, curve_steps, make_callback_class
from .numerics import NUMERICS_PINS, numerics_in_effect, pin_numerics
from .phases import DemoRun, arm_phase, check_made_by, checked_run_dir, checkpoint_phase, entropy_phase
from .report import plot, print_tables, reading


__all__ = [
    "ARMS",
    "ARM_INFO",
    "CONTROLS",
    "FAMILIES",
    "NUMERICS_PINS",
    "DemoArguments",
    "check_made_by",
    "common_args",
    "control_weak_model",
    "curve_from_log",
    "curve_steps",
    "grpo_args",
    "main",
    "make_callback_class",
    "numerics_in_effect",
    "pass_at_k_ks",
    "pin_numerics",
    "plot",
    "reading",
    "rl_pass_at_k",
    "run_arm",
    "run_demo",
    "sft_phase",
]


def run_demo(cfg: DemoArguments, pins: dict[str, str] | None = None) -> dict:
    """Every phase of the demo; returns (and writes) the results. ``pins``: what :func:`pin_numerics` reported."""
    from transformers import set_seed

    from ...machine import describe_machine, machine_info
    from ...tasks import CHARSET, load_embedded
    from ...toy import build_char_tokenizer

    t0 = time.perf_counter()
    os.makedirs(cfg.output_dir, exist_ok=True)
    numerics = numerics_in_effect(pins)
    arms = cfg.arms.split(",")
    print(
        f"WMSS demo, seed {cfg.seed}: weak -> strong -> {len(arms)} arms ({', '.join(arms)}) -> table + plot in "
        f"{cfg.output_dir}"
    )
    print(
        "numerics: "
        + ", ".join(f"{k}={v}" for k, v in numerics["sources"].items())
        + f"; ATen kernels in effect {numerics['aten_cpu_capability']}, torch {numerics['torch']}, "
        f"{numerics['torch_threads']} thread(s)"
    )
    print(describe_machine(), flush=True)
    set_seed(cfg.seed)
    data = load_embedded("arith")
    tokenizer = build_char_tokenizer(CHARSET)
    results = {
        "config": asdict(cfg),
        "numerics": numerics,
        "machine": machine_info(),
        "eval_problems": {"test": len(data["test"]), "ood": len(data["ood"])},
        "phases": {},
        "arms": {},
    }
    run = DemoRun(cfg, data, tokenizer, results, checked_run_dir(cfg, numerics))

    # 1-2. weak (from scratch) and strong (more SFT) checkpoints, reused across runs with the same settings
    for name in ("weak", "strong"):
        checkpoint_phase(run, name, with_pass_at_k=any(a in FAMILIES["RL"] for a in arms))
    # 3. WD-DS entropies H0 (weak) and H1 (strong) on every training problem
    entropy_files = entropy_phase(run)
    # 4-5. the arms, each from the strong checkpoint
    for i, arm in enumerate(arms, 1):
        results["arms"][arm] = arm_phase(run, i, arm, entropy_files)

    results["seconds"] = time.perf_counter() - t0
    with open(os.path.join(cfg.output_dir, f"results_seed{cfg.seed}.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


def main(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser  # does not import torch: bad flags fail before the pins and models

    try:
        (cfg,) = HfArgumentParser(DemoArguments).parse_args_into_dataclasses(args=argv)
    except ValueError as e:  # DemoArguments.__post_init__: a bad value, named
        raise SystemExit(f"wmss demo: {e}") from None
    pins = pin_numerics() if cfg.reproducible_numerics else None
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    results = run_demo(cfg, pins)
    print_tables(results, cfg)
    if cfg.plot:
        path = os.path.join(cfg.output_dir, "accuracy.png")
        plot(results, path)
        print(f"plot: {path}")
    print(f"total: {results['seconds']:.0f}s")
    return 0
