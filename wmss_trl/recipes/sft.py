"""``wmss sft``: WD-JT supervised fine-tuning.

    wmss sft --model_name_or_path STRONG --weak_model_name_or_path WEAK --dataset_name data.jsonl \
             --output_dir out --mixing_lambda 0.5 [--use_peft] [--accelerate_config zero3]

Same flags and YAML keys as ``trl sft`` (``SFTConfig`` + ``ModelConfig``), plus the WMSS ones of ``WMSSSFTConfig``.
"""

from __future__ import annotations

from trl import ModelConfig, TrlParser, get_peft_config

from ..data_checks import check_dataset_columns
from ..sft import WMSSSFTConfig, WMSSSFTTrainer
from .common import (
    DataArguments,
    check_before_loading,
    cpu_default_argv,
    finish_run,
    load_dataset_splits,
    load_tokenizer,
    teardown,
)


def make_parser(prog: str = "wmss sft") -> TrlParser:
    return TrlParser((DataArguments, WMSSSFTConfig, ModelConfig), prog=prog)


def main(argv: list[str] | None = None) -> int:
    data_args, training_args, model_args = make_parser().parse_args_and_config(args=cpu_default_argv(argv))
    check_before_loading(model_args, training_args)

    # 1. Model and tokenizer: the strong model is whatever `model_name_or_path` holds (e.g. the phase-1 SFT output).
    training_args.model_init_kwargs = {"dtype": model_args.dtype, **(training_args.model_init_kwargs or {})}
    tokenizer = load_tokenizer(model_args.model_name_or_path, training_args.trust_remote_code)

    # 2. Data.
    splits = load_dataset_splits(data_args)
    train = splits[data_args.dataset_train_split]
    evaluation = splits.get(data_args.dataset_test_split) if training_args.eval_strategy != "no" else None
    for split, dataset in ((data_args.dataset_train_split, train), (data_args.dataset_test_split, evaluation)):
        where = f"--dataset_name {data_args.dataset_name} (split {split!r})"
        check_dataset_columns(dataset, "sft", name=where, args=training_args)  # before any model loads

    # 3. Train with the weak model mixed into the logits; only the strong model is saved.
    trainer = WMSSSFTTrainer(
        model_args.model_name_or_path,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    state = trainer.accelerator.state
    trainer.accelerator.print(
        f"wmss sft: {state.num_processes} process(es), {state.distributed_type.value}, lambda={training_args.mixing_lambda}"
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    finish_run(trainer, "WD-JT model" if trainer.wmss_enabled else "SFT model (WMSS inactive)")
    teardown()
    return 0
