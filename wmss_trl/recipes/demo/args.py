"""``wmss demo``'s flags, its arms (what each is, its family) and the nominal durations of its phases."""

from __future__ import annotations

from dataclasses import dataclass, field


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
        from ...checks import check_int

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
