"""The demo's trainings: the TRL arguments every phase shares, the weak and strong SFT phases, and each arm's
trainer (SFT family, RL, DPO) built from the strong checkpoint, trained with the accuracy curve."""

from __future__ import annotations

import os

from .args import PASS_K, DemoArguments
from .curves import curve_steps, make_callback_class


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

    from ...evaluation import evaluate_model, summarize
    from ...tasks import correctness_reward

    args = GRPOConfig(**grpo_args(cfg, out, 1))
    result = evaluate_model(
        model, tokenizer, test, [correctness_reward], args, cfg.pass_at_k_samples, seed=cfg.seed, batch_size=50,
        desc="pass@k",
    )  # fmt: skip
    return summarize(result, pass_at_k_ks(cfg))


def run_arm(arm, strong, weak, tokenizer, data, entropy_files, cfg: DemoArguments, out):
    """Train one arm from the strong checkpoint; returns (trainer, curve callback)."""
    steps = arm_steps(arm, cfg)
    if arm in ("sft", "neftune", "wmss", "wmss_uniform", "wmss_shuffled"):
        trainer = _sft_trainer(arm, strong, weak, tokenizer, data, entropy_files, cfg, out, steps)
    elif arm in ("grpo", "wmss_grpo"):
        trainer = _grpo_trainer(arm, strong, weak, tokenizer, data, cfg, out, steps)
    else:  # dpo_mined, dpo_random (DemoArguments refused any other name)
        trainer = _dpo_trainer(arm, strong, weak, tokenizer, data, cfg, out, steps)
    curve = make_callback_class()(
        trainer, tokenizer, {"test": data["test"], "ood": data["ood"]}, curve_steps(cfg, steps), cfg.time_budget
    )
    trainer.add_callback(curve)
    trainer.train()
    os.makedirs(out, exist_ok=True)
    trainer.state.save_to_json(os.path.join(out, "trainer_state.json"))
    return trainer, curve


def _sft_trainer(arm, strong, weak, tokenizer, data, entropy_files, cfg: DemoArguments, out, steps):
    """``sft`` / ``neftune``: TRL's SFTTrainer; ``wmss`` and its controls: WD-DS resampling + WD-JT."""
    from trl import SFTConfig, SFTTrainer

    from ...sft import WMSSSFTConfig, WMSSSFTTrainer

    base = common_args(out, cfg.seed, steps, cfg.arm_learning_rate, cfg.batch_size, cfg.report_to)
    if arm in ("sft", "neftune"):
        extra = {"neftune_noise_alpha": cfg.neftune_noise_alpha} if arm == "neftune" else {}
        return SFTTrainer(
            strong, args=SFTConfig(**base, **extra), train_dataset=data["train"], processing_class=tokenizer
        )
    weak_model = weak if arm == "wmss" else control_weak_model(weak, arm.split("_")[1])
    args = WMSSSFTConfig(
        **base, mixing_lambda=cfg.mixing_lambda, selection_mode="resample", entropy_files=entropy_files
    )
    return WMSSSFTTrainer(
        strong, args=args, train_dataset=data["train"], processing_class=tokenizer, weak_model=weak_model
    )


def _grpo_trainer(arm, strong, weak, tokenizer, data, cfg: DemoArguments, out, steps):
    """``grpo``: TRL's GRPOTrainer; ``wmss_grpo``: weak reference, weak negatives, entropy-weighted advantages."""
    from trl import GRPOConfig, GRPOTrainer

    from ...grpo import WMSSGRPOConfig, WMSSGRPOTrainer
    from ...tasks import correctness_reward

    generations = 8
    grpo = grpo_args(cfg, out, steps, generations)
    prompts = data["train"].remove_columns(["completion"])
    if arm == "grpo":
        return GRPOTrainer(
            strong,
            reward_funcs=correctness_reward,
            args=GRPOConfig(**grpo),
            train_dataset=prompts,
            processing_class=tokenizer,
        )
    args = WMSSGRPOConfig(**grpo, num_weak_generations=generations // 4, entropy_weighted_advantages=True)
    return WMSSGRPOTrainer(
        strong,
        reward_funcs=correctness_reward,
        args=args,
        train_dataset=prompts,
        processing_class=tokenizer,
        weak_model=weak,
    )


def _dpo_trainer(arm, strong, weak, tokenizer, data, cfg: DemoArguments, out, steps):
    """``dpo_mined`` / ``dpo_random``: WMSS-DPO with the weak reference on :func:`preference_pairs`."""
    from ...dpo import WMSSDPOConfig, WMSSDPOTrainer

    pairs = preference_pairs(arm, weak, strong, tokenizer, data["train"].select(range(cfg.dpo_prompts)), cfg, out)
    # RPO-style NLL on chosen: plain sigmoid DPO lowers accuracy here
    args = WMSSDPOConfig(
        **common_args(out, cfg.seed, steps, cfg.dpo_learning_rate, cfg.batch_size, cfg.report_to),
        beta=0.1,
        loss_type=["sigmoid", "sft"],
    )
    return WMSSDPOTrainer(strong, args=args, train_dataset=pairs, processing_class=tokenizer, weak_model=weak)


def preference_pairs(arm, weak, strong, tokenizer, prompts, cfg, out):
    """DPO pairs on the same prompts: the weak model's verified-wrong answers (most plausible to the strong model),
    or, for the control, another problem's worked solution (checked to have a different answer)."""
    import random

    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from ...negatives import mine_negatives
    from ...tasks import correctness_reward

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
