"""``wmss dpo``: DPO against the weak checkpoint (WMSSDPOTrainer), e.g. on the pairs of ``wmss mine-negatives``.

    wmss dpo --model_name_or_path STRONG --weak_model_name_or_path WEAK --dataset_name mined/dataset \
             --output_dir out [--mixing_lambda 0.5] [--entropy_pair_weights true] [--accelerate_config zero3]

or ``accelerate launch --config_file ds_configs/zero3.yaml -m wmss_trl.cli dpo ...``. Same flags and YAML keys as
``trl dpo`` (``DPOConfig`` + ``ModelConfig``), plus the WMSS ones of ``WMSSDPOConfig``.
"""

from __future__ import annotations

from trl import ModelConfig, TrlParser, get_peft_config

from ..dpo import WMSSDPOConfig, WMSSDPOTrainer
from ..weak import is_zero3_partitioned
from .common import DataArguments, load_run, parse_run, run_trainer, zero_stage


def make_parser(prog: str = "wmss dpo") -> TrlParser:
    return TrlParser((DataArguments, WMSSDPOConfig, ModelConfig), prog=prog)


def main(argv: list[str] | None = None) -> int:
    data_args, training_args, model_args = parse_run(make_parser(), argv)
    # preference data (prompt / chosen / rejected), e.g. the `dataset` folder written by `wmss mine-negatives`
    tokenizer, train, evaluation = load_run(data_args, training_args, model_args, "dpo")
    # DPO with the weak checkpoint as reference; only the strong model is saved
    trainer = WMSSDPOTrainer(
        model_args.model_name_or_path,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    weak = (
        "peft-base"
        if trainer.weak_model is None
        else ("zero3-sharded" if is_zero3_partitioned(trainer.weak_model) else "replicated")
    )
    details = (
        f"zero_stage={zero_stage(trainer)}, weak model {weak}, loss_type={training_args.loss_type}, "
        f"mixing_lambda={training_args.mixing_lambda}, entropy_pair_weights={training_args.entropy_pair_weights}"
    )
    return run_trainer(
        trainer, "wmss dpo", details, "WMSS-DPO model" if trainer.wmss_enabled else "DPO model (WMSS inactive)"
    )
