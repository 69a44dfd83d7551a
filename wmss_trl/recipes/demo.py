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

import functools
import json
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field


ARMS = ["sft", "neftune", "wmss", "grpo", "wmss_grpo"]
CONTROLS = ["wmss_uniform", "wmss_shuffled", "dpo_mined", "dpo_random"]
ARM_INFO = {
    "sft": "continued SFT (TRL's SFTTrainer)",
    "neftune": "SFT with NEFTune embedding noise (TRL's neftune_noise_alpha)",
    "wmss": "WMSS: WD-DS resampling by the H0/H1 entropies + WD-JT on the mixed weak/strong logits",
    "wmss_uniform": "control: WD-JT with a uniform weak model (its LM head zeroed)",
    "wmss_shuffled": "control: WD-JT with the weak model's vocabulary permuted (same confidence, wrong tokens)",
    "grpo": "TRL's GRPO, correctness reward, 8 samples per prompt",
    "wmss_grpo": "WMSS-GRPO: weak model as reference, 2 weak negatives per group, entropy-weighted advantages",
    "dpo_mined": "DPO, rejected = the weak model's verified-wrong answers (weak reference)",
    "dpo_random": "DPO, rejected = another problem's solution (weak reference)",
}
FAMILIES = {
    "SFT family": ["sft", "neftune", "wmss", "wmss_uniform", "wmss_shuffled"],
    "RL": ["grpo", "wmss_grpo"],
    "DPO": ["dpo_mined", "dpo_random"],
}
# (arm, its baseline, how the reading line names the arm) for the one-line reading after the table
READINGS = [("wmss", "sft", "WMSS"), ("wmss_grpo", "grpo", "WMSS-GRPO"), ("dpo_mined", "dpo_random", "DPO-mined")]

# Kernel code paths every Intel x86-64 CPU with AVX2 has, and one thread. Read by the libraries when their first
# kernel runs, so they must be in the environment before then (before torch is imported, to be safe).
NUMERICS_PINS = {
    "MKL_CBWR": "AVX2",  # oneMKL conditional numerical reproducibility: the AVX2 code branch (BLAS: every matmul)
    "ATEN_CPU_CAPABILITY": "avx2",  # PyTorch's own vectorised kernels: the AVX2 build (softmax, norms, adds...)
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN's JIT kernels: at most AVX2 (no AVX-512 / AMX)
    "OMP_NUM_THREADS": "1",  # one thread: MKL's reproducibility holds for a fixed thread count only
}

# Rough seconds on a 2-core Xeon at load ~2 with the pins (measured, docs/demo.md); the phase headers scale them by
# how fast this run has gone so far.
SECONDS_PER_STEP = {
    "sft": 0.23,
    "neftune": 0.23,
    "wmss": 0.28,
    "wmss_uniform": 0.28,
    "wmss_shuffled": 0.28,
    "grpo": 0.35,
    "wmss_grpo": 0.5,
    "dpo_mined": 0.35,
    "dpo_random": 0.35,
}  # "sft" also: weak, strong
SECONDS_PER_EVAL = 2.0  # greedy decoding of the 200 + 200 problems by a trained model
SECONDS_SETUP = 6.0  # building a trainer (TRL tokenizes the 4000 training problems)
SECONDS_ENTROPIES = 20.0  # H0 and H1 on the 4000 training problems
SECONDS_PASS_AT_K = 10.0  # the RL pass@k evaluation: 200 problems x (1 greedy + 4 sampled) completions (measured)
PASS_K = (1, 2, 4, 8, 16)  # the k of the RL pass@k, up to pass_at_k_samples


@dataclass
class DemoArguments:
    output_dir: str = field(default="runs/demo", metadata={"help": "Where checkpoints, results and accuracy.png go."})
    seed: int = field(default=0, metadata={"help": "Seed of model init and data order (the data splits are fixed)."})
    arms: str = field(default=",".join(ARMS), metadata={"help": f"Comma-separated arms among {ARMS + CONTROLS}."})
    weak_steps: int = field(default=250, metadata={"help": "SFT steps from scratch for the weak checkpoint."})
    strong_steps: int = field(default=150, metadata={"help": "Further SFT steps from weak to strong."})
    arm_steps: int = field(default=150, metadata={"help": "Steps of each SFT-family arm (sft, neftune, wmss)."})
    grpo_steps: int = field(default=40, metadata={"help": "Steps of each GRPO arm."})
    dpo_steps: int = field(default=60, metadata={"help": "Steps of each DPO arm (dpo_mined, dpo_random)."})
    dpo_prompts: int = field(default=1000, metadata={"help": "Training prompts mined for the DPO arms."})
    time_budget: float | None = field(
        default=None, metadata={"help": "Equal wall time instead of equal steps: each arm stops after this many s."}
    )
    eval_every: int | None = field(
        default=None,
        metadata={
            "help": "Evaluate the curves every N steps (on all 200 test + 200 ood problems, like the table). "
            "Default: 3 evenly spaced points per arm, the last being the table's number; with --time_budget, "
            "the end only."
        },
    )
    hidden_size: int = field(default=128, metadata={"help": "Model width."})
    num_layers: int = field(default=3, metadata={"help": "Model depth."})
    batch_size: int = field(default=32, metadata={"help": "Problems per step (GRPO: prompts x generations)."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak LR of the weak/strong phases."})
    arm_learning_rate: float = field(default=5e-4, metadata={"help": "Constant LR of the SFT-family arms."})
    grpo_learning_rate: float = field(
        default=5e-5,
        metadata={
            "help": "Constant LR of the GRPO arms (2e-4 made vanilla GRPO collapse: 59 -> 37%% held-out in 40 steps)."
        },
    )
    dpo_learning_rate: float = field(
        default=1e-5, metadata={"help": "Constant LR of the DPO arms (5e-4 collapsed both DPO arms to ~2%% held-out)."}
    )
    pass_at_k_samples: int = field(
        default=4,
        metadata={
            "help": "Samples per held-out problem for the RL arms' pass@k (k = 1, 2, 4, ... up to this; "
            "wmss_trl.evaluation, the code of `wmss compare`)."
        },
    )
    mixing_lambda: float = field(default=0.5, metadata={"help": "WD-JT lambda (weight of the strong logits)."})
    neftune_noise_alpha: float = field(default=5.0, metadata={"help": "NEFTune noise for the neftune arm."})
    report_to: str = field(
        default="none",
        metadata={
            "help": "transformers' report_to for every trainer (e.g. tensorboard, wandb, trackio): the losses "
            "and the accuracy curves (eval_test_accuracy, eval_ood_accuracy) go there too."
        },
    )
    plot: bool = field(default=True, metadata={"help": "Write accuracy.png (needs matplotlib)."})
    reproducible_numerics: bool = field(
        default=True,
        metadata={
            "help": "Pin the kernels to their AVX2 code paths and one thread before torch loads (MKL_CBWR, "
            "ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, OMP_NUM_THREADS; a variable you set is kept), so the "
            "same seed gives the same table on every Intel CPU with AVX2. false: the fastest kernels for this "
            "CPU, whose table differs across CPUs (docs/demo.md)."
        },
    )

    def __post_init__(self):
        from ..checks import check_int

        unknown = [a for a in self.arms.split(",") if a not in ARMS + CONTROLS]
        if unknown or not self.arms:
            raise ValueError(f"--arms: unknown arm(s) {unknown or [self.arms]}; choose among {ARMS + CONTROLS}.")
        for name in (
            "weak_steps",
            "strong_steps",
            "arm_steps",
            "grpo_steps",
            "dpo_steps",
            "dpo_prompts",
            "hidden_size",
            "num_layers",
            "batch_size",
            "pass_at_k_samples",
        ):
            setattr(self, name, check_int(name, getattr(self, name), low=1))
        self.eval_every = check_int("eval_every", self.eval_every, low=1, optional=True)


def _has_avx2() -> bool:
    """x86-64 with AVX2 and FMA (what ATen's and MKL's AVX2 code paths execute)."""
    from ..machine import cpu_info

    _, flags = cpu_info()
    return platform.machine().lower() in ("x86_64", "amd64") and {"avx2", "fma"} <= flags


def pin_numerics() -> dict[str, str]:
    """Put :data:`NUMERICS_PINS` into ``os.environ`` where the user has not set the variable; call it before torch
    runs its first kernel (the libraries choose their code paths once, then).

    Rule: a variable already set is the user's and is kept; the others get the pinned value. On a CPU without AVX2
    (or not x86-64, e.g. aarch64) only the thread count is pinned: the other paths do not exist there. Returns
    ``{variable: "value (source)"}`` for the header. Warns that the table may differ from README's when a user's
    value differs from the pin, or when torch had already chosen other ATen kernels before the pins were set.
    """
    avx2 = _has_avx2()
    state, pinned, differ = {}, [], []
    for name, value in NUMERICS_PINS.items():
        if name in os.environ:
            state[name] = f"{os.environ[name]} (yours)"
            if os.environ[name] != value:
                differ.append(f"{name}={os.environ[name]} (the demo's: {value})")
        elif avx2 or name == "OMP_NUM_THREADS":
            os.environ[name] = value
            pinned.append(name)
            state[name] = f"{value} (pinned by the demo)"
        else:
            state[name] = f"unset (not pinned: no AVX2 on this {platform.machine()} CPU)"
    if differ:
        warnings.warn(f"your {', '.join(differ)}: kept, but the table may differ from README's.", stacklevel=2)
    if "torch" in sys.modules and "ATEN_CPU_CAPABILITY" in pinned:
        in_effect = sys.modules["torch"].backends.cpu.get_cpu_capability()
        if in_effect.lower() != NUMERICS_PINS["ATEN_CPU_CAPABILITY"]:
            warnings.warn(
                f"torch ran kernels before `wmss demo` pinned the numerics ({', '.join(pinned)}): ATen's kernels in "
                f"effect are {in_effect}, so the table may differ from README's. Run `wmss demo` in a fresh process, "
                f"or export {' '.join(f'{k}={NUMERICS_PINS[k]}' for k in pinned)} before starting Python.",
                stacklevel=2,
            )
    return state


def numerics_in_effect(pins: dict[str, str] | None = None) -> dict:
    """What decides the numerics of this run (recorded with the checkpoints and the results): the pin variables
    (with their source from :func:`pin_numerics` when it ran), the torch version (which fixes the bundled oneMKL and
    oneDNN), ATen's kernels in effect and the thread count."""
    import torch

    values = {name: os.environ.get(name, "unset") for name in NUMERICS_PINS}
    return {
        "variables": values,
        "sources": pins or {name: f"{v} (environment)" for name, v in values.items()},
        "torch": torch.__version__,
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
    }


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
            from ..tasks import evaluate

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


def common_args(out, seed, steps, lr, batch, report_to="none", scheduler="constant", **kw):
    return dict(
        output_dir=out,
        use_cpu=True,
        bf16=False,
        report_to=report_to,
        save_strategy="no",
        activation_checkpointing=False,
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type=scheduler,
        warmup_steps=min(50, steps // 10) if scheduler != "constant" else 0,
        logging_steps=10,
        seed=seed,
        data_seed=seed,
        **kw,
    )


def sft_phase(model, tokenizer, train, out, seed, steps, lr, batch, report_to="none", scheduler="cosine"):
    """Plain TRL SFT (the weak and strong phases)."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**common_args(out, seed, steps, lr, batch, report_to, scheduler))
    trainer = SFTTrainer(model, args=args, train_dataset=train, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(out)
    trainer.state.save_to_json(os.path.join(out, "trainer_state.json"))
    return out


def control_weak_model(weak_path: str, kind: str):
    """The reviewers' controls: a weak model whose next-token distribution is uniform (LM head zeroed) or whose
    vocabulary is permuted (LM head rows shuffled: same confidence profile, wrong tokens)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(weak_path)
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        if kind == "uniform":
            head.zero_()
        else:
            g = torch.Generator().manual_seed(1234)
            head.copy_(head[torch.randperm(head.shape[0], generator=g)])
    return model


def arm_steps(arm: str, cfg: DemoArguments) -> int:
    if cfg.time_budget is not None:
        return 10**6
    return cfg.grpo_steps if "grpo" in arm else cfg.dpo_steps if arm.startswith("dpo") else cfg.arm_steps


def grpo_args(cfg: DemoArguments, out: str, steps: int, generations: int = 8) -> dict:
    """The ``GRPOConfig`` keyword arguments of the GRPO arms (their sampling settings also drive the RL pass@k)."""
    return common_args(
        out,
        cfg.seed,
        steps,
        cfg.grpo_learning_rate,
        cfg.batch_size,
        cfg.report_to,
        num_generations=generations,
        max_completion_length=40,
        temperature=1.0,
        beta=0.0,
        loss_type="dapo",
        log_completions=False,
    )


def pass_at_k_ks(cfg: DemoArguments) -> list[int]:
    """The k of the RL pass@k: :data:`PASS_K` up to n = ``pass_at_k_samples``, and n itself."""
    n = cfg.pass_at_k_samples
    return sorted({k for k in PASS_K if k <= n} | {n})


def rl_pass_at_k(model, tokenizer, test, cfg: DemoArguments, out: str) -> dict:
    """Greedy pass@1, pass@k and mean reward of ``model`` on the held-out problems through
    :func:`wmss_trl.evaluation.evaluate_model` (the code of ``wmss compare``), with the GRPO arms' sampling settings
    and reward, n = ``pass_at_k_samples`` samples per problem seeded by the run seed."""
    from trl import GRPOConfig

    from ..evaluation import evaluate_model, summarize
    from ..tasks import correctness_reward

    args = GRPOConfig(**grpo_args(cfg, out, 1))
    result = evaluate_model(
        model, tokenizer, test, [correctness_reward], args, cfg.pass_at_k_samples, seed=cfg.seed, batch_size=50,
        desc="pass@k",
    )  # fmt: skip
    return summarize(result, pass_at_k_ks(cfg))


def run_arm(arm, strong, weak, tokenizer, data, entropy_files, cfg: DemoArguments, out):
    """Train one arm from the strong checkpoint; returns (trainer, curve callback)."""
    from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

    from ..grpo import WMSSGRPOConfig, WMSSGRPOTrainer
    from ..sft import WMSSSFTConfig, WMSSSFTTrainer
    from ..tasks import correctness_reward

    steps = arm_steps(arm, cfg)
    base = common_args(out, cfg.seed, steps, cfg.arm_learning_rate, cfg.batch_size, cfg.report_to)
    if arm in ("sft", "neftune"):
        extra = {"neftune_noise_alpha": cfg.neftune_noise_alpha} if arm == "neftune" else {}
        trainer = SFTTrainer(
            strong, args=SFTConfig(**base, **extra), train_dataset=data["train"], processing_class=tokenizer
        )
    elif arm in ("wmss", "wmss_uniform", "wmss_shuffled"):
        weak_model = weak if arm == "wmss" else control_weak_model(weak, arm.split("_")[1])
        args = WMSSSFTConfig(
            **base, mixing_lambda=cfg.mixing_lambda, selection_mode="resample", entropy_files=entropy_files
        )
        trainer = WMSSSFTTrainer(
            strong, args=args, train_dataset=data["train"], processing_class=tokenizer, weak_model=weak_model
        )
    elif arm in ("grpo", "wmss_grpo"):
        generations = 8
        grpo = grpo_args(cfg, out, steps, generations)
        prompts = data["train"].remove_columns(["completion"])
        if arm == "grpo":
            trainer = GRPOTrainer(
                strong,
                reward_funcs=correctness_reward,
                args=GRPOConfig(**grpo),
                train_dataset=prompts,
                processing_class=tokenizer,
            )
        else:
            args = WMSSGRPOConfig(**grpo, num_weak_generations=generations // 4, entropy_weighted_advantages=True)
            trainer = WMSSGRPOTrainer(
                strong,
                reward_funcs=correctness_reward,
                args=args,
                train_dataset=prompts,
                processing_class=tokenizer,
                weak_model=weak,
            )
    else:  # dpo_mined, dpo_random (DemoArguments refused any other name)
        from ..dpo import WMSSDPOConfig, WMSSDPOTrainer

        pairs = preference_pairs(arm, weak, strong, tokenizer, data["train"].select(range(cfg.dpo_prompts)), cfg, out)
        # RPO-style NLL on chosen: plain sigmoid DPO lowers accuracy here
        args = WMSSDPOConfig(
            **common_args(out, cfg.seed, steps, cfg.dpo_learning_rate, cfg.batch_size, cfg.report_to),
            beta=0.1,
            loss_type=["sigmoid", "sft"],
        )
        trainer = WMSSDPOTrainer(strong, args=args, train_dataset=pairs, processing_class=tokenizer, weak_model=weak)
    curve = make_callback_class()(
        trainer, tokenizer, {"test": data["test"], "ood": data["ood"]}, curve_steps(cfg, steps), cfg.time_budget
    )
    trainer.add_callback(curve)
    trainer.train()
    os.makedirs(out, exist_ok=True)
    trainer.state.save_to_json(os.path.join(out, "trainer_state.json"))
    return trainer, curve


def preference_pairs(arm, weak, strong, tokenizer, prompts, cfg, out):
    """DPO pairs on the same prompts: the weak model's verified-wrong answers (most plausible to the strong model),
    or, for the control, another problem's worked solution (checked to have a different answer)."""
    import random

    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from ..negatives import mine_negatives
    from ..tasks import correctness_reward

    mined, _ = mine_negatives(
        prompts,
        AutoModelForCausalLM.from_pretrained(weak),
        AutoModelForCausalLM.from_pretrained(strong),
        tokenizer,
        reward_funcs=[correctness_reward],
        num_samples=4,
        reference_column="completion",
        max_new_tokens=40,
        max_pairs_per_prompt=1,
        seed=cfg.seed,
        batch_size=64,
        output_dir=os.path.join(os.path.dirname(out), "mined"),
    )
    if arm == "dpo_mined":
        return mined.select_columns(["prompt", "chosen", "rejected"])
    rng = random.Random(cfg.seed)
    by_index = {int(i): row for i, row in enumerate(prompts)}
    rows = []
    for row in mined:
        own = by_index[int(row["prompt_index"])]
        while True:
            other = by_index[rng.randrange(len(by_index))]
            if other["answer"] != own["answer"]:
                break
        rows.append({"prompt": row["prompt"], "chosen": row["chosen"], "rejected": other["completion"]})
    return Dataset.from_list(rows)


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


def plot(results: dict, path: str) -> None:
    """``accuracy.png``: one row per family of arms present, held-out and OOD side by side, each panel with its own
    y-axis, a legend and the weak / strong checkpoints as horizontal reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = [(name, [a for a in arms if a in results["arms"]]) for name, arms in FAMILIES.items()]
    families = [(name, arms) for name, arms in families if arms]
    sizes = results["eval_problems"]
    rl = {
        arm: results["arms"][arm]["pass_at_k"] for arm in FAMILIES["RL"] if "pass_at_k" in results["arms"].get(arm, {})
    }
    rows = len(families) + bool(rl)
    fig, axes = plt.subplots(rows, 2, figsize=(12, 3.8 * rows), squeeze=False)
    for row, (family, arms) in zip(axes, families):
        for ax, split, label in zip(row, ("test", "ood"), ("held-out", "OOD (3 steps, unseen)")):
            for ref, style in (("weak", ":"), ("strong", "--")):
                value = 100 * results["phases"][ref][split]
                ax.axhline(
                    value,
                    color="grey" if ref == "weak" else "black",
                    linestyle=style,
                    linewidth=1,
                    label=f"{ref} checkpoint ({value:.1f}%)",
                )
            for arm in arms:
                pts = results["arms"][arm]["curve"]
                ax.plot([p["step"] for p in pts], [100 * p[split] for p in pts], marker="o", ms=3, label=arm)
            ax.set_title(f"{family}: {label} accuracy, {sizes[split]} problems")
            ax.set_xlabel("steps from the strong checkpoint")
            ax.set_ylabel("greedy accuracy (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="best")
    if rl:
        plot_pass_at_k(axes[-1], {"strong checkpoint": results["phases"]["strong"]["pass_at_k"], **rl}, results)
    fig.suptitle(
        f"wmss demo, seed {results['config']['seed']}: greedy accuracy during training "
        "(last point of each curve = the table)" + ("; last row: RL pass@k after training" if rl else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pass_at_k(row, models: dict, results: dict) -> None:
    """The RL row of ``accuracy.png``: pass@k vs k per model (left) and greedy pass@1 / pass@1 / pass@n side by side
    (right), on the held-out problems (:func:`rl_pass_at_k`)."""
    ks = pass_at_k_ks(DemoArguments(**results["config"]))
    n, size = ks[-1], results["eval_problems"]["test"]
    left, right = row
    colors = {name: "black" if i == 0 else f"C{i - 1}" for i, name in enumerate(models)}  # as the curves above
    for name, m in models.items():
        style = dict(linestyle="--") if name == "strong checkpoint" else {}
        left.plot(ks, [100 * m[f"pass@{k}"] for k in ks], marker="o", ms=3, label=name, color=colors[name], **style)
    left.set_xscale("log", base=2)
    left.set_xticks(ks, [str(k) for k in ks])
    left.set_title(f"RL: held-out pass@k ({size} problems, n = {n} samples each, temperature 1)")
    left.set_xlabel("k (samples per problem)")
    left.set_ylabel("pass@k (%)")
    left.grid(alpha=0.3)
    left.legend(fontsize=8, loc="best")
    metrics = ["greedy pass@1", "pass@1", f"pass@{n}"]
    width = 0.8 / len(models)
    for i, (name, m) in enumerate(models.items()):
        xs = [j + i * width for j in range(len(metrics))]
        right.bar(xs, [100 * m[k] for k in metrics], width, label=name, color=colors[name], alpha=0.8)
    right.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(metrics))], metrics)
    right.set_title(f"RL: greedy vs sampled, held-out ({size} problems)")
    right.set_ylabel("%")
    right.grid(alpha=0.3, axis="y")
    right.legend(fontsize=8, loc="best")


class Pace:
    """Announces each phase with a rough duration: the nominal seconds (:data:`SECONDS_PER_STEP` etc.) scaled by
    how much slower or faster than nominal this run has been so far."""

    def __init__(self):
        self.nominal_done, self.elapsed_done, self.t, self.nominal = 0.0, 0.0, None, 0.0

    def start(self, header: str, nominal: float | None) -> None:
        scale = self.elapsed_done / self.nominal_done if self.nominal_done else 1.0
        eta = "" if nominal is None else f" (~{_duration(nominal * scale)})"
        print(f"\n{header}{eta}", flush=True)
        self.t, self.nominal = time.perf_counter(), nominal or 0.0

    def stop(self) -> float:
        seconds = time.perf_counter() - self.t
        if self.nominal:
            self.nominal_done, self.elapsed_done = self.nominal_done + self.nominal, self.elapsed_done + seconds
        return seconds


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def check_made_by(run_dir: str, record: dict) -> None:
    """The cached weak/strong checkpoints and entropies in ``run_dir`` are reused only if they were made by the same
    settings and numerics (recorded in ``made_by.json``); a mismatch is refused, naming what differs."""
    path = os.path.join(run_dir, "made_by.json")
    if os.path.isfile(path):
        with open(path) as f:
            stored = json.load(f)
        diff = [
            f"{k}: {stored.get(k)!r} there, {record.get(k)!r} now"
            for k in sorted(set(stored) | set(record))
            if stored.get(k) != record.get(k)
        ]
        if diff:
            raise SystemExit(
                f"{run_dir} holds checkpoints made with other settings ({'; '.join(diff)}). Delete that "
                "folder or use another --output_dir."
            )
    elif os.path.isdir(run_dir) and os.listdir(run_dir):
        raise SystemExit(
            f"{run_dir} holds files but no made_by.json (an older demo made them): delete that folder or "
            "use another --output_dir."
        )
    else:
        os.makedirs(run_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump(record, f, indent=1)


def run_demo(cfg: DemoArguments, pins: dict[str, str] | None = None) -> dict:
    """Every phase of the demo; returns (and writes) the results. ``pins``: what :func:`pin_numerics` reported."""
    from transformers import AutoModelForCausalLM, set_seed

    from ..entropy import score_entropies
    from ..machine import describe_machine, machine_info
    from ..tasks import CHARSET, evaluate, load_embedded
    from ..toy import build_char_tokenizer, build_tiny_model

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
    pace = Pace()

    # 1-2. weak (from scratch) and strong (more SFT) checkpoints, reused across runs with the same settings
    run_dir = os.path.join(
        cfg.output_dir,
        f"seed{cfg.seed}-w{cfg.weak_steps}-s{cfg.strong_steps}-"
        f"h{cfg.hidden_size}x{cfg.num_layers}-b{cfg.batch_size}-lr{cfg.learning_rate:g}",
    )
    made_by = {
        k: getattr(cfg, k)
        for k in ("seed", "weak_steps", "strong_steps", "hidden_size", "num_layers", "batch_size", "learning_rate")
    }
    check_made_by(run_dir, {**made_by, "numerics": numerics["variables"], "torch": numerics["torch"]})
    weak, strong = os.path.join(run_dir, "weak"), os.path.join(run_dir, "strong")
    for name, path, steps, what in (
        (
            "weak",
            weak,
            cfg.weak_steps,
            f"a small Qwen2 (hidden {cfg.hidden_size}, {cfg.num_layers} layers, char "
            "tokenizer) trained from scratch with SFT",
        ),
        ("strong", strong, cfg.strong_steps, "the weak checkpoint after more SFT"),
    ):
        n = 1 if name == "weak" else 2
        if os.path.isfile(os.path.join(path, "model.safetensors")):
            pace.start(f"[{n}/4] {name} checkpoint: reusing {path} (same settings, made_by.json)", None)
        else:
            pace.start(
                f"[{n}/4] {name} checkpoint: {what}, {steps} steps x {cfg.batch_size} problems",
                steps * SECONDS_PER_STEP["sft"] + SECONDS_SETUP + SECONDS_PER_EVAL,
            )
            source = (
                weak
                if name == "strong"
                else build_tiny_model(
                    tokenizer, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_heads=4, seed=cfg.seed
                )
            )
            sft_phase(
                source,
                tokenizer,
                data["train"],
                path,
                cfg.seed,
                steps,
                cfg.learning_rate,
                cfg.batch_size,
                cfg.report_to,
            )
        model = AutoModelForCausalLM.from_pretrained(path)
        r = results["phases"][name] = {
            "test": evaluate(model, tokenizer, data["test"]),
            "ood": evaluate(model, tokenizer, data["ood"]),
        }
        if name == "strong" and any(a in FAMILIES["RL"] for a in arms):
            r["pass_at_k"] = rl_pass_at_k(model, tokenizer, data["test"], cfg, os.path.join(run_dir, "pass_at_k"))
        print(f"{name}: held-out {100 * r['test']:.1f}%  ood {100 * r['ood']:.1f}%  ({pace.stop():.0f} s)", flush=True)

    # 3. WD-DS entropies H0 (weak) and H1 (strong) on every training problem
    pace.start(
        f"[3/4] WD-DS entropies: mean token entropy of the weak (H0) and strong (H1) model on the "
        f"{len(data['train'])} training problems (the wmss arms resample by them)",
        SECONDS_ENTROPIES,
    )
    entropy_files = []
    for name, path, column in (("h0", weak, "entropy_0"), ("h1", strong, "entropy_1")):
        file = os.path.join(run_dir, f"{name}.jsonl")
        if not os.path.isfile(file):
            scores = score_entropies(AutoModelForCausalLM.from_pretrained(path), data["train"], tokenizer)
            with open(file + ".tmp", "w") as f:
                for i, h in zip(scores["idx"], scores["entropy"]):
                    f.write(json.dumps({"idx": int(i), column: float(h)}) + "\n")
            os.replace(file + ".tmp", file)
        entropy_files.append(file)
    print(f"entropies: {', '.join(entropy_files)}  ({pace.stop():.0f} s)", flush=True)

    # 4-5. the arms, each from the strong checkpoint
    for i, arm in enumerate(arms, 1):
        set_seed(cfg.seed)
        steps = arm_steps(arm, cfg)
        evals = len(curve_steps(cfg, steps) | {steps})
        if cfg.time_budget is None:
            what, nominal = f"{steps} steps", steps * SECONDS_PER_STEP[arm] + SECONDS_SETUP + evals * SECONDS_PER_EVAL
        else:
            what, nominal = f"{cfg.time_budget:.0f} s of training", cfg.time_budget + SECONDS_SETUP + SECONDS_PER_EVAL
        if arm in FAMILIES["RL"]:
            nominal += SECONDS_PASS_AT_K
        pace.start(
            f"[4/4] arm {i}/{len(arms)} {arm}: {ARM_INFO[arm]}; {what} from the strong checkpoint, greedy "
            f"accuracy {evals}x on all {len(data['test'])} held-out + {len(data['ood'])} OOD problems",
            nominal,
        )
        trainer, curve = run_arm(arm, strong, weak, tokenizer, data, entropy_files, cfg, os.path.join(run_dir, arm))
        points = curve_from_log(trainer.state.log_history, results["phases"]["strong"])
        r = {
            "test": points[-1]["test"],
            "ood": points[-1]["ood"],
            "steps": trainer.state.global_step,
            "train_seconds": curve.train_time(),
        }
        if arm in FAMILIES["RL"]:
            r["pass_at_k"] = rl_pass_at_k(trainer.model, tokenizer, data["test"], cfg, os.path.join(run_dir, arm))
        r.update(seconds=pace.stop(), curve=points)
        results["arms"][arm] = r
        print(
            f"{arm}: held-out {100 * r['test']:.1f}%  ood {100 * r['ood']:.1f}%  ({r['steps']} steps, "
            f"{r['train_seconds']:.0f} s training, {r['seconds']:.0f} s in all)",
            flush=True,
        )

    results["seconds"] = time.perf_counter() - t0
    with open(os.path.join(cfg.output_dir, f"results_seed{cfg.seed}.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


def reading(results: dict) -> str:
    """One line: where each WMSS arm is above or below its baseline, with the caveat that one seed says little."""
    arms = results["arms"]
    parts = []
    for arm, base, name in READINGS:
        if arm in arms and base in arms:
            d = {s: 100 * (arms[arm][s] - arms[base][s]) for s in ("test", "ood")}
            parts.append(
                f"{name} is {_signed(d['test'])} points vs {base} held-out "
                f"({100 * arms[arm]['test']:.1f} vs {100 * arms[base]['test']:.1f}), {_signed(d['ood'])} OOD"
            )
    if not parts:
        return "Reading: no WMSS arm ran with its baseline (wmss + sft, wmss_grpo + grpo, dpo_mined + dpo_random)."
    n = results["eval_problems"]["test"]
    half = 100 * 1.96 * math.sqrt(0.25 / n)  # widest 95% binomial half-width, at 50% accuracy
    return (
        f"Reading: {'; '.join(parts)}. One seed says little: each number carries up to ±{half:.0f} points of "
        f"sampling noise ({n} problems, 95%) before any seed-to-seed variation; the multi-seed benchmark with "
        "controls is in docs/results.md."
    )


def _signed(x: float) -> str:
    return f"{x:+.1f}" if round(x, 1) else "0.0"


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
    print(
        f"\nWMSS demo, seed {cfg.seed}: greedy accuracy (%) from the strong checkpoint, equal steps per family, "
        f"{results['eval_problems']['test']} held-out / {results['eval_problems']['ood']} OOD problems"
    )
    print(f"{'':<14}{'held-out':>9}{'ood':>7}{'steps':>7}{'train s':>9}")
    for name, r in {**results["phases"], **results["arms"]}.items():
        steps = r.get("steps", "")
        secs = f"{r['train_seconds']:.0f}" if "train_seconds" in r else ""
        print(f"{name:<14}{100 * r['test']:>9.1f}{100 * r['ood']:>7.1f}{steps:>7}{secs:>9}")
    rl = {
        name: r["pass_at_k"]
        for name, r in {"strong": results["phases"]["strong"], **results["arms"]}.items()
        if "pass_at_k" in r
    }
    if rl:
        ks = pass_at_k_ks(cfg)
        names = ["greedy pass@1", *(f"pass@{k}" for k in ks), "mean reward"]
        print(
            f"\nRL through wmss_trl.evaluation (the code of `wmss compare`): {results['eval_problems']['test']} "
            f"held-out problems, n = {ks[-1]} samples each at the GRPO arms' sampling settings (%; mean reward x100)"
        )
        print(f"{'':<14}" + "".join(f"{m:>15}" for m in names))
        for name, m in rl.items():
            print(f"{name:<14}" + "".join(f"{100 * m[k]:>15.1f}" for k in names))
    print(reading(results))
    if cfg.plot:
        path = os.path.join(cfg.output_dir, "accuracy.png")
        plot(results, path)
        print(f"plot: {path}")
    print(f"total: {results['seconds']:.0f}s")
    return 0
