"""``wmss grpo``: GRPO with the weak checkpoint as reference, source of negatives and entropy anchor.

    wmss grpo --model_name_or_path STRONG --weak_model_name_or_path WEAK --dataset_name data.jsonl \
              --reward_funcs numeric_accuracy_reward --output_dir out \
              --beta 0.04 --num_weak_generations 2 --entropy_weighted_advantages true [--accelerate_config zero3]

or ``accelerate launch --config_file ds_configs/zero3.yaml -m wmss_trl.cli grpo ...``. Same flags and YAML keys as
``trl grpo`` (``GRPOConfig`` + ``ModelConfig``; ``--reward_funcs`` takes registered names or dotted import paths),
plus the WMSS ones of ``WMSSGRPOConfig``. ``--vanilla true`` runs TRL's plain ``GRPOTrainer`` with the same
configuration (the WMSS options are ignored; with ``beta > 0`` the reference is then TRL's copy of the policy), so a
comparison against vanilla GRPO is one switch. Like every ``wmss`` training command, the run writes the model,
``trainer_state.json`` (the logged metrics) and the model card ``README.md`` to ``output_dir``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOTrainer, ModelConfig, TrlParser, get_peft_config

from ..grpo import WMSSGRPOConfig, WMSSGRPOTrainer
from ..weak import is_zero3_partitioned, require_safetensors
from .common import DataArguments, load_run, parse_run, run_trainer, zero_stage


@dataclass
class GRPODataArguments(DataArguments):
    """The data and reward arguments of ``trl grpo`` (``GRPOScriptArguments``), plus the vanilla switch."""

    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions: registered names (numeric_accuracy_reward, math_verify_reward, "
            "accuracy_reward, ...) or dotted import paths (my_lib.rewards.f, importable from the current "
            "directory)."
        },
    )
    reward_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A sequence-classification reward model (local folder), used in addition to reward_funcs."},
    )
    vanilla: bool = field(
        default=False,
        metadata={
            "help": "Run TRL's plain GRPOTrainer with the same configuration (WMSS options ignored): the "
            "baseline of a comparison."
        },
    )


def make_parser(prog: str = "wmss grpo") -> TrlParser:
    return TrlParser((GRPODataArguments, WMSSGRPOConfig, ModelConfig), prog=prog)


def main(argv: list[str] | None = None) -> int:
    data_args, training_args, model_args = parse_run(make_parser(), argv, "policy model")
    require_safetensors(data_args.reward_model_name_or_path, "reward model")
    from ..rewards import resolve_reward_funcs

    reward_funcs = resolve_reward_funcs(data_args.reward_funcs) if data_args.reward_funcs else []
    if data_args.reward_model_name_or_path:
        reward_funcs.append(data_args.reward_model_name_or_path)
    if not reward_funcs:
        raise SystemExit(
            "no reward: pass --reward_funcs (a registered name or a dotted path) or --reward_model_name_or_path."
        )
    # prompts (a `prompt` column; other columns reach the reward functions)
    tokenizer, train, evaluation = load_run(data_args, training_args, model_args, "grpo", reward_funcs=reward_funcs)
    # WMSS-GRPO, or TRL's GRPO with the same configuration
    common = dict(
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    if data_args.vanilla:
        trainer = GRPOTrainer(model_args.model_name_or_path, **common)
        what = "vanilla TRL GRPO (WMSS options ignored)"
    else:
        trainer = WMSSGRPOTrainer(model_args.model_name_or_path, **common)
        where = {None: "none (WMSS inactive: TRL's GRPO)", "peft_base": "peft-base"}.get(trainer.weak_source)
        if training_args.weak_rollouts_path and trainer.weak_model is None:
            where = f"not loaded (weak negatives from the pool {training_args.weak_rollouts_path})"
        elif where is None:
            where = "zero3-sharded" if is_zero3_partitioned(trainer.weak_model) else "replicated"
        what = (
            f"WMSS-GRPO: weak model {where}, beta={trainer.beta}, num_weak_generations="
            f"{training_args.num_weak_generations}, entropy_weighted_advantages="
            f"{training_args.entropy_weighted_advantages}, mixing_lambda={training_args.mixing_lambda}"
        )
    return run_trainer(trainer, "wmss grpo", f"zero_stage={zero_stage(trainer)}, {what}", "GRPO model")
