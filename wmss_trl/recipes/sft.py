"""``wmss sft``: WD-JT supervised fine-tuning.

    wmss sft --model_name_or_path STRONG --weak_model_name_or_path WEAK --dataset_name data.jsonl \
             --output_dir out --mixing_lambda 0.5 [--use_peft] [--accelerate_config zero3]

Same flags and YAML keys as ``trl sft`` (``SFTConfig`` + ``ModelConfig``), plus the WMSS ones of ``WMSSSFTConfig``.
"""

from __future__ import annotations

from trl import ModelConfig, TrlParser, get_peft_config

from ..sft import WMSSSFTConfig, WMSSSFTTrainer
from .common import DataArguments, load_run, parse_run, run_trainer


def make_parser(prog: str = "wmss sft") -> TrlParser:
    return TrlParser((DataArguments, WMSSSFTConfig, ModelConfig), prog=prog)


def main(argv: list[str] | None = None) -> int:
    data_args, training_args, model_args = parse_run(make_parser(), argv)
    # the strong model is whatever `model_name_or_path` holds (e.g. the phase-1 SFT output)
    tokenizer, train, evaluation = load_run(data_args, training_args, model_args, "sft", args=training_args)
    # train with the weak model mixed into the logits; only the strong model is saved
    trainer = WMSSSFTTrainer(
        model_args.model_name_or_path,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    what = "WD-JT model" if trainer.wmss_enabled else "SFT model (WMSS inactive)"
    return run_trainer(trainer, "wmss sft", f"lambda={training_args.mixing_lambda}", what)
