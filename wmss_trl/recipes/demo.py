"""``wmss demo``: the whole story on the embedded arithmetic task, in minutes on a CPU.

    wmss demo [--output_dir runs/demo] [--seed 0] [--arms sft,neftune,wmss,grpo,wmss_grpo]

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
5. Greedy accuracy on the held-out ``test`` split and the harder ``ood`` split (3 steps, never seen in training),
   during training (curves) and at the end: a table on stdout, ``results.json`` and ``accuracy.png``.

Sizes and seeds: train 4000 problems (seed 0), test 200 (seed 1, disjoint from train), ood 200 (seed 2); model
hidden 128, 3 layers, 4 heads (~0.5M parameters); batch 32; the run seed (``--seed``) sets model init and data order.
Single process by design (the trainers themselves run under ``accelerate launch``; see the other commands).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from transformers import HfArgumentParser, TrainerCallback

ARMS = ["sft", "neftune", "wmss", "grpo", "wmss_grpo"]
CONTROLS = ["wmss_uniform", "wmss_shuffled", "dpo_mined", "dpo_random"]


@dataclass
class DemoArguments:
    output_dir: str = field(default="runs/demo", metadata={"help": "Where checkpoints, results.json and accuracy.png go."})
    seed: int = field(default=0, metadata={"help": "Seed of model init and data order (the data splits are fixed)."})
    arms: str = field(default=",".join(ARMS), metadata={"help": f"Comma-separated arms among {ARMS + CONTROLS}."})
    weak_steps: int = field(default=250, metadata={"help": "SFT steps from scratch for the weak checkpoint."})
    strong_steps: int = field(default=150, metadata={"help": "Further SFT steps from weak to strong."})
    arm_steps: int = field(default=150, metadata={"help": "Steps of each SFT-family arm (sft, neftune, wmss)."})
    grpo_steps: int = field(default=40, metadata={"help": "Steps of each GRPO arm."})
    dpo_steps: int = field(default=60, metadata={"help": "Steps of each DPO arm (benchmark arms dpo_mined, dpo_random)."})
    dpo_prompts: int = field(default=1000, metadata={"help": "Training prompts mined for the DPO arms."})
    time_budget: float | None = field(
        default=None, metadata={"help": "Equal wall time instead of equal steps: each arm stops after this many seconds."}
    )
    eval_every: int = field(default=25, metadata={"help": "Evaluate the curves every N steps (on 100 test + 100 ood)."})
    hidden_size: int = field(default=128, metadata={"help": "Model width."})
    num_layers: int = field(default=3, metadata={"help": "Model depth."})
    batch_size: int = field(default=32, metadata={"help": "Problems per step (GRPO: prompts x generations)."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak LR of the weak/strong phases."})
    arm_learning_rate: float = field(default=5e-4, metadata={"help": "Constant LR of the SFT-family arms."})
    grpo_learning_rate: float = field(default=5e-5, metadata={"help": "Constant LR of the GRPO arms (2e-4 made vanilla GRPO collapse: 59 -> 37%% held-out in 40 steps)."})
    dpo_learning_rate: float = field(
        default=1e-5, metadata={"help": "Constant LR of the DPO arms (5e-4 collapsed both DPO arms to ~2%% held-out)."}
    )
    mixing_lambda: float = field(default=0.5, metadata={"help": "WD-JT lambda (weight of the strong logits)."})
    neftune_noise_alpha: float = field(default=5.0, metadata={"help": "NEFTune noise for the neftune arm."})
    plot: bool = field(default=True, metadata={"help": "Write accuracy.png (needs matplotlib)."})


class AccuracyCurve(TrainerCallback):
    """Evaluates greedy accuracy every ``every`` steps; stops training when the wall-time budget is spent."""

    def __init__(self, tokenizer, test, ood, every, budget=None):
        self.tokenizer, self.test, self.ood, self.every, self.budget = tokenizer, test, ood, every, budget
        self.points, self.start, self.eval_time = [], None, 0.0

    def _evaluate(self, model, step):
        from ..tasks import evaluate

        t = time.perf_counter()
        was_training = model.training
        self.points.append({"step": step, "test": evaluate(model, self.tokenizer, self.test, desc="curve test"),
                            "ood": evaluate(model, self.tokenizer, self.ood, desc="curve ood")})
        model.train(was_training)
        self.eval_time += time.perf_counter() - t

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start = time.perf_counter()
        self._evaluate(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self._evaluate(model, state.global_step)
        if self.budget is not None and self.train_time() >= self.budget:
            control.should_training_stop = True

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.points[-1]["step"] != state.global_step:
            self._evaluate(model, state.global_step)

    def train_time(self) -> float:
        """Seconds spent training, curve evaluations excluded."""
        return time.perf_counter() - self.start - self.eval_time


def common_args(out, seed, steps, lr, batch, scheduler="constant", **kw):
    return dict(
        output_dir=out, use_cpu=True, bf16=False, report_to="none", save_strategy="no", activation_checkpointing=False,
        per_device_train_batch_size=batch, max_steps=steps, learning_rate=lr, lr_scheduler_type=scheduler,
        warmup_steps=min(50, steps // 10) if scheduler != "constant" else 0, logging_steps=10, seed=seed,
        data_seed=seed, **kw,
    )


def sft_phase(model, tokenizer, train, out, seed, steps, lr, batch, scheduler="cosine"):
    """Plain TRL SFT (the weak and strong phases)."""
    from trl import SFTConfig, SFTTrainer

    trainer = SFTTrainer(model, args=SFTConfig(**common_args(out, seed, steps, lr, batch, scheduler)),
                         train_dataset=train, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(out)
    return out


def control_weak_model(weak_path: str, kind: str):
    """The reviewers' controls: a weak model whose next-token distribution is uniform (LM head zeroed) or whose
    vocabulary is permuted (LM head rows shuffled: same confidence profile, wrong tokens)."""
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


def run_arm(arm, strong, weak, tokenizer, data, entropy_files, cfg: DemoArguments, out):
    """Train one arm from the strong checkpoint; returns (model, curve callback)."""
    from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

    from ..grpo import WMSSGRPOConfig, WMSSGRPOTrainer
    from ..sft import WMSSSFTConfig, WMSSSFTTrainer
    from ..tasks import correctness_reward

    curve = AccuracyCurve(tokenizer, data["test"].select(range(100)), data["ood"].select(range(100)), cfg.eval_every, cfg.time_budget)
    sft_steps = cfg.arm_steps if cfg.time_budget is None else 10**6
    grpo_steps = cfg.grpo_steps if cfg.time_budget is None else 10**6
    base = common_args(out, cfg.seed, sft_steps, cfg.arm_learning_rate, cfg.batch_size)
    if arm in ("sft", "neftune"):
        extra = {"neftune_noise_alpha": cfg.neftune_noise_alpha} if arm == "neftune" else {}
        trainer = SFTTrainer(strong, args=SFTConfig(**base, **extra), train_dataset=data["train"], processing_class=tokenizer, callbacks=[curve])
    elif arm.startswith("wmss") and arm != "wmss_grpo":
        weak_model = weak if arm == "wmss" else control_weak_model(weak, arm.split("_")[1])
        args = WMSSSFTConfig(**base, mixing_lambda=cfg.mixing_lambda, selection_mode="resample", entropy_files=entropy_files)
        trainer = WMSSSFTTrainer(strong, args=args, train_dataset=data["train"], processing_class=tokenizer, weak_model=weak_model, callbacks=[curve])
    elif arm in ("grpo", "wmss_grpo"):
        generations = 8
        grpo = common_args(out, cfg.seed, grpo_steps, cfg.grpo_learning_rate, cfg.batch_size,
                           num_generations=generations, max_completion_length=40, temperature=1.0, beta=0.0,
                           loss_type="dapo", log_completions=False)
        prompts = data["train"].remove_columns(["completion"])
        if arm == "grpo":
            trainer = GRPOTrainer(strong, reward_funcs=correctness_reward, args=GRPOConfig(**grpo), train_dataset=prompts,
                                  processing_class=tokenizer, callbacks=[curve])
        else:
            args = WMSSGRPOConfig(**grpo, num_weak_generations=generations // 4, entropy_weighted_advantages=True)
            trainer = WMSSGRPOTrainer(strong, reward_funcs=correctness_reward, args=args, train_dataset=prompts,
                                      processing_class=tokenizer, weak_model=weak, callbacks=[curve])
    elif arm in ("dpo_mined", "dpo_random"):
        from ..dpo import WMSSDPOConfig, WMSSDPOTrainer

        pairs = preference_pairs(arm, weak, strong, tokenizer, data["train"].select(range(cfg.dpo_prompts)), cfg, out)
        steps = cfg.dpo_steps if cfg.time_budget is None else 10**6
        args = WMSSDPOConfig(**common_args(out, cfg.seed, steps, cfg.dpo_learning_rate, cfg.batch_size), beta=0.1,
                             loss_type=["sigmoid", "sft"])  # RPO-style NLL on chosen: plain sigmoid DPO lowers accuracy here
        trainer = WMSSDPOTrainer(strong, args=args, train_dataset=pairs, processing_class=tokenizer, weak_model=weak, callbacks=[curve])
    else:
        raise ValueError(f"unknown arm {arm!r}; choose among {ARMS + CONTROLS}.")
    trainer.train()
    return trainer.model, curve, trainer.state.global_step


def preference_pairs(arm, weak, strong, tokenizer, prompts, cfg, out):
    """DPO pairs on the same prompts: the weak model's verified-wrong answers (most plausible to the strong model),
    or, for the control, another problem's worked solution (checked to have a different answer)."""
    import random

    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from ..negatives import mine_negatives
    from ..tasks import correctness_reward

    mined, _ = mine_negatives(
        prompts, AutoModelForCausalLM.from_pretrained(weak), AutoModelForCausalLM.from_pretrained(strong), tokenizer,
        reward_funcs=[correctness_reward], num_samples=4, reference_column="completion", max_new_tokens=40,
        max_pairs_per_prompt=1, seed=cfg.seed, batch_size=64, output_dir=os.path.join(os.path.dirname(out), "mined"),
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


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, split in zip(axes, ("test", "ood")):
        for arm, r in results["arms"].items():
            pts = r["curve"]
            ax.plot([p["step"] for p in pts], [100 * p[split] for p in pts], marker="o", ms=3, label=arm)
        ax.set_title(f"{split} accuracy (greedy, 100 problems)")
        ax.set_xlabel("steps from the strong checkpoint")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_demo(cfg: DemoArguments) -> dict:
    from transformers import AutoModelForCausalLM, set_seed

    from ..entropy import score_entropies
    from ..tasks import CHARSET, evaluate, load_embedded
    from ..toy import build_char_tokenizer, build_tiny_model

    t0 = time.perf_counter()
    os.makedirs(cfg.output_dir, exist_ok=True)
    set_seed(cfg.seed)
    data = load_embedded("arith")
    tokenizer = build_char_tokenizer(CHARSET)
    results = {"config": asdict(cfg), "phases": {}, "arms": {}}

    # 1-2. weak (from scratch) and strong (more SFT) checkpoints, reused across runs with the same settings
    run_dir = os.path.join(cfg.output_dir, f"seed{cfg.seed}-w{cfg.weak_steps}-s{cfg.strong_steps}-"
                           f"h{cfg.hidden_size}x{cfg.num_layers}-b{cfg.batch_size}")
    weak, strong = os.path.join(run_dir, "weak"), os.path.join(run_dir, "strong")
    if not os.path.isfile(os.path.join(weak, "model.safetensors")):
        model = build_tiny_model(tokenizer, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_heads=4,
                                 seed=cfg.seed)
        sft_phase(model, tokenizer, data["train"], weak, cfg.seed, cfg.weak_steps, cfg.learning_rate, cfg.batch_size)
    if not os.path.isfile(os.path.join(strong, "model.safetensors")):
        sft_phase(weak, tokenizer, data["train"], strong, cfg.seed, cfg.strong_steps, cfg.learning_rate, cfg.batch_size)
    for name, path in (("weak", weak), ("strong", strong)):
        model = AutoModelForCausalLM.from_pretrained(path)
        results["phases"][name] = {"test": evaluate(model, tokenizer, data["test"]), "ood": evaluate(model, tokenizer, data["ood"])}
        print(f"{name:>8}: test {100 * results['phases'][name]['test']:.1f}%  ood {100 * results['phases'][name]['ood']:.1f}%")

    # 3. WD-DS entropies H0 (weak) and H1 (strong) on every training problem
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

    # 4-5. the arms, each from the strong checkpoint
    for arm in cfg.arms.split(","):
        set_seed(cfg.seed)
        t = time.perf_counter()
        model, curve, steps = run_arm(arm, strong, weak, tokenizer, data, entropy_files, cfg, os.path.join(run_dir, arm))
        train_time = curve.train_time()
        r = {"test": evaluate(model, tokenizer, data["test"]), "ood": evaluate(model, tokenizer, data["ood"]),
             "steps": steps, "train_seconds": train_time, "seconds": time.perf_counter() - t, "curve": curve.points}
        results["arms"][arm] = r
        print(f"{arm:>13}: test {100 * r['test']:.1f}%  ood {100 * r['ood']:.1f}%  ({steps} steps, {train_time:.0f}s training)")

    results["seconds"] = time.perf_counter() - t0
    with open(os.path.join(cfg.output_dir, f"results_seed{cfg.seed}.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


def main(argv: list[str] | None = None) -> int:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    (cfg,) = HfArgumentParser(DemoArguments).parse_args_into_dataclasses(args=argv)
    results = run_demo(cfg)
    print(f"\nWMSS demo, seed {cfg.seed}: greedy accuracy (%) from the strong checkpoint, equal steps per family")
    print(f"{'':<14}{'held-out':>9}{'ood':>7}{'steps':>7}{'train s':>9}")
    for name, r in {**results["phases"], **results["arms"]}.items():
        steps = r.get("steps", "")
        secs = f"{r['train_seconds']:.0f}" if "train_seconds" in r else ""
        print(f"{name:<14}{100 * r['test']:>9.1f}{100 * r['ood']:>7.1f}{steps:>7}{secs:>9}")
    if cfg.plot:
        path = os.path.join(cfg.output_dir, "accuracy.png")
        plot(results, path)
        print(f"plot: {path}")
    print(f"total: {results['seconds']:.0f}s")
    return 0
