"""``wmss weak-rollouts``: sample the weak model's rollouts once, for WMSS-GRPO (``weak_rollouts_path``) and
``wmss mine-negatives`` (``--pool``).

    wmss weak-rollouts --model WEAK --dataset prompts.jsonl --num_generations 8 [--epochs 2] \
        [--reward_funcs numeric_accuracy_reward] --output pool [--temperature 1.0 --top_p 1.0 --top_k 0 \
        --max_completion_length 256] [--accelerate_config ddp]

The sampling flags are TRL's ``GRPOConfig`` ones (same names and defaults); a GRPO run uses the pool only with the
same settings, the same weak model and tokenizer, and every training prompt in it. ``--model`` / ``--dataset`` /
``--output`` are also ``--weak_model_name_or_path`` / ``--dataset_name`` / ``--output_dir``. Re-running with the same
``--output`` resumes a killed build; under ``accelerate launch`` every process samples a share (same pool as one
process). See ``docs/weak_rollouts.md`` for the format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from trl import TrlParser

from ..rollouts import RolloutConfig
from .common import DataArguments


@dataclass
class PoolDataArguments(DataArguments):
    """Where the prompts come from (``--dataset`` is ``--dataset_name``)."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "aliases": ["--dataset"],
            "help": "The prompts: a local data file or folder, a save_to_disk folder, a hub dataset, or wmss:arith "
            "(a 'prompt' column, text or messages, and the columns the reward functions read).",
        },
    )


@dataclass
class WeakRolloutsArguments:
    """Model, reward functions and output of ``wmss weak-rollouts``."""

    weak_model_name_or_path: str = field(
        default=None, metadata={"aliases": ["--model"], "help": "Local folder of the weak checkpoint (safetensors)."}
    )
    output_dir: str = field(
        default=None, metadata={"aliases": ["--output"], "help": "Folder of the pool (manifest.json + shards/)."}
    )
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Optional reward functions to score every completion with (names as for wmss grpo, or dotted "
            "import paths); without them the pool holds no rewards (the trainer computes them)."
        },
    )
    dtype: str = field(default="float32", metadata={"help": "dtype of the weak model (float32, bfloat16, float16)."})
    max_prompts: int | None = field(default=None, metadata={"help": "Only the first N prompts."})


def make_parser(prog: str = "wmss weak-rollouts") -> TrlParser:
    return TrlParser((PoolDataArguments, WeakRolloutsArguments, RolloutConfig), prog=prog)


def main(argv: list[str] | None = None) -> int:
    from accelerate import PartialState

    from ..data_checks import check_dataset_columns
    from ..rewards import resolve_reward_funcs
    from ..rollouts import build_pool
    from ..weak import load_weak_model, require_safetensors
    from .common import load_dataset_splits, load_tokenizer, teardown

    data_args, args, cfg = make_parser().parse_args_and_config(args=argv)
    if not args.weak_model_name_or_path or not args.output_dir:
        raise SystemExit(
            "wmss weak-rollouts needs --model (the weak checkpoint folder) and --output (the pool folder)."
        )
    require_safetensors(args.weak_model_name_or_path, "weak model")
    state = PartialState(cpu=not torch.cuda.is_available())  # launched CPU processes join one gloo group

    prompts = load_dataset_splits(data_args)[data_args.dataset_train_split]
    if args.max_prompts is not None:
        prompts = prompts.select(range(min(args.max_prompts, len(prompts))))
    funcs = resolve_reward_funcs(args.reward_funcs) if args.reward_funcs else None
    check_dataset_columns(prompts, "grpo", name=f"--dataset {data_args.dataset_name}", reward_funcs=funcs)
    tokenizer = load_tokenizer(args.weak_model_name_or_path)
    weak = load_weak_model(args.weak_model_name_or_path, {"dtype": args.dtype, "device_map": None})
    weak = weak.to(state.device).eval()
    state.print(
        f"wmss weak-rollouts: {state.num_processes} process(es), {len(prompts)} prompts x {cfg.epochs} epoch(s) x "
        f"{cfg.num_generations} completions, backend {cfg.backend}"
    )
    manifest = build_pool(prompts, weak, tokenizer, args.output_dir, cfg, funcs, args.weak_model_name_or_path)
    state.print(
        json.dumps({k: manifest[k] for k in ("num_rows", "shards", "resumed_shards")} | {"output": args.output_dir})
    )
    state.print(f"train with it: wmss grpo ... --weak_rollouts_path {args.output_dir}")
    teardown()
    return 0
