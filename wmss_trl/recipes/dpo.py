"""``wmss dpo``: DPO against the weak checkpoint (WMSSDPOTrainer), e.g. on the pairs of ``wmss mine-negatives``.

    wmss dpo --model_name_or_path STRONG --weak_model_name_or_path WEAK --dataset_name mined/dataset \
             --output_dir out [--mixing_lambda 0.5] [--entropy_pair_weights true] [--accelerate_config zero3]

or ``accelerate launch --config_file ds_configs/zero3.yaml -m wmss_trl.cli dpo ...``. Same flags and YAML keys as
``trl dpo`` (``DPOConfig`` + ``ModelConfig``), plus the WMSS ones of ``WMSSDPOConfig``.
"""

from __future__ import annotations

from trl import ModelConfig, TrlParser, get_peft_config

from ..data_checks import check_dataset_columns
from ..dpo import WMSSDPOConfig, WMSSDPOTrainer
from ..weak import is_zero3_partitioned
from .common import (
    DataArguments,
    check_before_loading,
    cpu_default_argv,
    finish_run,
    load_dataset_splits,
    load_tokenizer,
    teardown,
)


def make_parser(prog: str = "wmss dpo") -> TrlParser:
    return TrlParser((DataArguments, WMSSDPOConfig, ModelConfig), prog=prog)


def main(argv: list[str] | None = None) -> int:
    data_args, training_args, model_args = make_parser().parse_args_and_config(args=cpu_default_argv(argv))
    check_before_loading(model_args, training_args)

    # 1. Model and tokenizer: the strong model is `model_name_or_path`; the weak one is the DPO reference.
    training_args.model_init_kwargs = {"dtype": model_args.dtype, **(training_args.model_init_kwargs or {})}
    tokenizer = load_tokenizer(model_args.model_name_or_path, training_args.trust_remote_code)

    # 2. Preference data (prompt / chosen / rejected), e.g. the `dataset` folder written by `wmss mine-negatives`.
    splits = load_dataset_splits(data_args)
    train = splits[data_args.dataset_train_split]
    evaluation = splits.get(data_args.dataset_test_split) if training_args.eval_strategy != "no" else None
    for split, dataset in ((data_args.dataset_train_split, train), (data_args.dataset_test_split, evaluation)):
        where = f"--dataset_name {data_args.dataset_name} (split {split!r})"
        check_dataset_columns(dataset, "dpo", name=where)  # before any model loads

    # 3. DPO with the weak checkpoint as reference; only the strong model is saved.
    trainer = WMSSDPOTrainer(
        model_args.model_name_or_path,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    state = trainer.accelerator.state
    zero = state.deepspeed_plugin.zero_stage if state.deepspeed_plugin else None
    weak = (
        "peft-base"
        if trainer.weak_model is None
        else ("zero3-sharded" if is_zero3_partitioned(trainer.weak_model) else "replicated")
    )
    trainer.accelerator.print(
        f"wmss dpo: {state.num_processes} process(es), {state.distributed_type.value}, zero_stage={zero}, "
        f"weak model {weak}, loss_type={training_args.loss_type}, mixing_lambda={training_args.mixing_lambda}, "
        f"entropy_pair_weights={training_args.entropy_pair_weights}"
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    finish_run(trainer, "WMSS-DPO model" if trainer.wmss_enabled else "DPO model (WMSS inactive)")
    teardown()
    return 0
