"""``wmss mine-negatives``: the weak model's plausible wrong answers as DPO rejected responses.

    wmss mine-negatives --dataset_name prompts.jsonl --weak_model_name_or_path WEAK \
        --strong_model_name_or_path STRONG --reward_funcs numeric_accuracy_reward --num_samples 8 \
        --output_dir mined [--rank_by strong|weak] [--chosen reference|correct_sample] [--accelerate_config ddp]

The prompt dataset needs a ``prompt`` column (text or messages) and the chosen (reference) answers: by default the
first of ``completion``, ``solution``, ``answer`` present (a worked answer, as the model writes it, before a bare final
answer; on ``wmss:arith`` the worked ``completion``), or ``--reference_column``. The verifiers read their own columns
(e.g. the short ``answer``). A warning names the fix when the chosen answers and the model's answers differ grossly in
length or final-answer marker. ``--reward_funcs`` takes names (``numeric_accuracy_reward``,
``math_verify_reward``, TRL's ``accuracy_reward``) or dotted import paths, like ``trl grpo``. Writes
``OUTPUT/dataset`` (``save_to_disk``; pass it to ``wmss dpo --dataset_name``), ``OUTPUT/summary.json`` and the chunks;
re-running with the same ``--output_dir`` resumes. Under ``accelerate launch`` every process generates a share.
``--pool DIR`` takes the samples from a weak-rollout pool (``wmss weak-rollouts``, the same sampling flags) instead of
sampling: one pool serves GRPO's weak negatives and DPO's rejected answers (the weak model is then loaded only for
``--rank_by weak``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from trl import TrlParser

from ..data_checks import check_dataset_columns
from ..negatives import MiningConfig, find_reference_column, mine_negatives
from ..rewards import resolve_reward_funcs
from ..weak import check_weak_compatible, require_safetensors
from .common import DataArguments, load_dataset_splits, load_tokenizer, teardown


@dataclass
class MineNegativesArguments:
    """Models, verifiers and output of ``wmss mine-negatives``."""

    weak_model_name_or_path: str = field(
        default=None, metadata={"help": "Local folder of the weak checkpoint (it generates the candidate answers)."}
    )
    output_dir: str = field(
        default=None, metadata={"help": "Folder for the mined dataset, the summary and the resumable chunks."}
    )
    strong_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Local folder of the strong model (the ranker when --rank_by strong)."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer folder (default: the weak model's folder)."}
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["numeric_accuracy_reward"],
        metadata={
            "help": "Verifiers: numeric_accuracy_reward, math_verify_reward, accuracy_reward (TRL), or dotted "
            "import paths (my_lib.rewards.f)."
        },
    )
    dtype: str = field(default="float32", metadata={"help": "dtype of both models (float32, bfloat16, float16)."})
    max_prompts: int | None = field(default=None, metadata={"help": "Mine only the first N prompts."})


def make_parser(prog: str = "wmss mine-negatives") -> TrlParser:
    return TrlParser((DataArguments, MineNegativesArguments, MiningConfig), prog=prog)


def _load(path: str, dtype: str, device):
    from ..weak import load_weak_model

    return load_weak_model(path, {"dtype": dtype, "device_map": None}).to(device).eval()


def main(argv: list[str] | None = None) -> int:
    from accelerate import PartialState

    data_args, args, mining = make_parser().parse_args_and_config(args=argv)
    if not (args.weak_model_name_or_path or mining.pool) or not args.output_dir:
        raise SystemExit(
            "wmss mine-negatives needs --output_dir and --weak_model_name_or_path (or --pool, a weak-rollout pool, "
            "with --rank_by strong)."
        )
    require_safetensors(args.weak_model_name_or_path, "weak model")
    require_safetensors(args.strong_model_name_or_path, "strong model")
    # With no GPU the launched processes must join a gloo group (a bare MULTI_GPU state would run them apart)
    state = PartialState(cpu=not torch.cuda.is_available())

    # 1. Prompts with reference answers.
    splits = load_dataset_splits(data_args)
    prompts = splits[data_args.dataset_train_split]
    if args.max_prompts is not None:
        prompts = prompts.select(range(min(args.max_prompts, len(prompts))))
    # the columns the verifiers and the chosen answers read, before any model loads
    name = f"--dataset_name {data_args.dataset_name} (split {data_args.dataset_train_split!r})"
    check_dataset_columns(prompts, "grpo", name=name, reward_funcs=resolve_reward_funcs(args.reward_funcs))
    chosen_column = find_reference_column(
        prompts.column_names, mining.reference_column, required=mining.chosen == "reference"
    )

    # 2. Models (safetensors, no remote code) and the shared tokenizer, checked before either model loads: the
    # tokenizer used for the weak model must be the strong model's (found in its folder).
    tokenizer_path = args.tokenizer_name_or_path or args.weak_model_name_or_path or args.strong_model_name_or_path
    tokenizer = load_tokenizer(tokenizer_path)
    if args.strong_model_name_or_path and args.weak_model_name_or_path:
        check_weak_compatible(args.strong_model_name_or_path, args.weak_model_name_or_path, None, tokenizer_path)
    # with a pool the weak model only ranks (--rank_by weak): not loaded otherwise
    needs_weak = args.weak_model_name_or_path and not (mining.pool and mining.rank_by == "strong")
    weak = _load(args.weak_model_name_or_path, args.dtype, state.device) if needs_weak else None
    if mining.pool and args.weak_model_name_or_path and not needs_weak:  # the pool's weak model, from its files
        from ..rollouts import WeakRolloutPool, weights_fingerprint

        WeakRolloutPool(mining.pool).check(weak_files=weights_fingerprint(args.weak_model_name_or_path))
    strong = (
        _load(args.strong_model_name_or_path, args.dtype, state.device) if args.strong_model_name_or_path else None
    )
    state.print(
        f"wmss mine-negatives: {state.num_processes} process(es), {state.distributed_type.value}, "
        f"{len(prompts)} prompts x {mining.num_samples} samples, rank_by={mining.rank_by}, chosen={mining.chosen} "
        f"(column {chosen_column!r})"
    )

    # 3. Sample, verify, rank; chunks are written as they finish.
    dataset, summary = mine_negatives(
        prompts, weak, strong, tokenizer, args.reward_funcs, output_dir=args.output_dir, config=mining
    )
    state.print(json.dumps(summary, indent=2))
    state.print(
        f"{len(dataset)} preference pairs written to {args.output_dir}/dataset (train with: wmss dpo "
        f"--dataset_name {args.output_dir}/dataset ...)"
    )
    teardown()
    return 0
