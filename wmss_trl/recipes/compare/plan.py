"""``wmss compare``'s command line read into a :class:`Plan`: the flags, the YAML and its ``arms:``, k and the seeds,
the held-out set and its columns, the reward functions and safetensors, all checked before any model loads."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, fields

import yaml

from .args import (
    EQUAL_TIME,
    RUN_FIELDS,
    VANILLA,
    WMSS,
    CompareArguments,
    check_arms,
    valid_fields,
    wmss_field_defaults,
)
from .records import versions


@dataclass
class Plan:
    """What the command was asked to do, checked before any model loads."""

    cmp: CompareArguments
    data_args: object
    training_args: object
    model_args: object
    yaml_config: dict
    flags: list[tuple[str, list[str]]]
    arms: list[str]
    overrides: dict[str, dict]
    seeds: list[int]
    ks: list[int]
    num_samples: int
    output_dir: str
    eval_info: dict
    eval_set: object
    reward_funcs: list
    record: dict


def _ints(name: str, value: str, low: int) -> list[int]:
    try:
        out = [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"wmss compare: --{name} takes comma-separated integers, got {value!r}.") from None
    if not out or min(out) < low or len(set(out)) != len(out):
        raise SystemExit(f"wmss compare: --{name} needs distinct integers >= {low}, got {value!r}.")
    return out


def _config_path(argv: list[str]) -> str | None:
    if "--config" not in argv:
        return None
    i = argv.index("--config")
    if i + 1 >= len(argv):
        raise SystemExit("wmss compare: --config needs a value.")
    return argv[i + 1]


def _flag_chunks(argv: list[str]) -> list[tuple[str, list[str]]]:
    """``["--a", "1", "--b=2", "--c"]`` -> ``[("a", ["--a", "1"]), ("b", ["--b=2"]), ("c", ["--c"])]``: each flag's
    field name (dashes read as underscores, as transformers' parser does) and its tokens."""
    chunks = []
    for token in argv:
        if token.startswith("--"):
            chunks.append((token[2:].split("=", 1)[0].replace("-", "_"), [token]))
        elif chunks:
            chunks[-1][1].append(token)
        else:
            raise SystemExit(f"wmss compare: unexpected argument {token!r} (flags are --name value).")
    return chunks


def parse(argv: list[str]) -> Plan:
    """Parse and check everything (flags, YAML, arms, k, seeds, the eval set and its columns, the reward functions,
    safetensors) without loading a model."""
    argv = list(argv)
    yaml_config, definitions = _read_config(argv)
    overrides = {VANILLA: wmss_field_defaults(), WMSS: {}, **check_arms(definitions, valid_fields())}
    cmp, data_args, training_args, model_args = _parse_with_trl(argv, yaml_config)
    own = {f.name for f in fields(CompareArguments)} | {"config", "eval_steps", "use_cpu"}
    flags = [(name, tokens) for name, tokens in _flag_chunks(argv) if name not in own]
    given = {name for name, _ in _flag_chunks(argv)} | set(yaml_config)
    output_dir = training_args.output_dir if "output_dir" in given else "runs/compare"
    seeds, ks, n = _check_settings(cmp, data_args, training_args, given)
    arms = _choose_arms(cmp, training_args, overrides)

    # Rewards and the held-out set (before any model loads).
    reward_funcs = _reward_funcs(data_args)
    eval_set, source, split = _eval_set(cmp, data_args, reward_funcs)
    _check_safetensors(model_args, training_args, arms, overrides)
    eval_info = {
        "dataset": source,
        "split": split,
        "num_prompts": len(eval_set),
        "num_samples": n,
        "pass_threshold": cmp.pass_threshold,
        "batch_size": training_args.per_device_eval_batch_size,
        "eval_steps": training_args.eval_steps,
    }
    base_flags = [tokens for name, tokens in flags if name != "output_dir"]
    record = {"config": yaml_config, "flags": base_flags, "eval": eval_info, "versions": versions()}
    return Plan(
        cmp, data_args, training_args, model_args, yaml_config, flags, arms, overrides, seeds, ks, n,
        output_dir, eval_info, eval_set, reward_funcs, record,
    )  # fmt: skip


def _read_config(argv: list[str]) -> tuple[dict, dict | None]:
    """The ``--config`` YAML (``{}`` without one) without its ``arms:`` mapping, and that mapping."""
    path = _config_path(argv)
    if path is None:
        return {}, None
    if not os.path.isfile(path):
        raise SystemExit(f"wmss compare: --config {path!r} does not exist.")
    with open(path) as f:
        yaml_config = yaml.safe_load(f) or {}
    if not isinstance(yaml_config, dict):
        raise SystemExit(f"wmss compare: --config {path} must hold a YAML mapping.")
    return yaml_config, yaml_config.pop("arms", None)


def _parse_with_trl(argv: list[str], yaml_config: dict) -> tuple:
    """TRL's parser on the YAML without ``arms:`` (a temporary copy) and the flags: ``(cmp, data, training, model)``
    arguments."""
    from trl import ModelConfig, TrlParser

    from ...grpo import WMSSGRPOConfig
    from ..common import cpu_default_argv
    from ..grpo import GRPODataArguments

    i = argv.index("--config") if _config_path(argv) is not None else None
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as tmp:
        yaml.safe_dump(yaml_config, tmp)
    try:
        rest = argv[:i] + ["--config", tmp.name] + argv[i + 2 :] if i is not None else argv
        parser = TrlParser((CompareArguments, GRPODataArguments, WMSSGRPOConfig, ModelConfig), prog="wmss compare")
        return parser.parse_args_and_config(args=cpu_default_argv(rest))
    except ValueError as e:
        raise SystemExit(f"wmss compare: {e}") from None
    finally:
        os.unlink(tmp.name)


def _check_settings(cmp: CompareArguments, data_args, training_args, given: set[str]) -> tuple[list, list, int]:
    """The fields the command sets per run are not given; the seeds, the k and n; ``max_eval_prompts`` and
    ``eval_steps`` (whole numbers). Returns ``(seeds, ks, n)``."""
    from ...checks import check_int

    if data_args.vanilla:
        raise SystemExit("wmss compare: remove `vanilla` from the config: the vanilla arm is built in.")
    for key in ("seed", "data_seed", "resume_from_checkpoint"):
        if key in given:
            raise SystemExit(f"wmss compare: remove {key!r} from the config and flags: {RUN_FIELDS[key]}.")
    seeds = _ints("seeds", cmp.seeds, 0)
    ks = _ints("k", cmp.k, 1)
    n = check_int("num_eval_samples", cmp.num_eval_samples, low=1, optional=True) or max(ks)
    if max(ks) > n:
        raise SystemExit(
            f"wmss compare: --k {cmp.k} needs n >= {max(ks)} samples per prompt, but --num_eval_samples is {n}: "
            f"raise --num_eval_samples to {max(ks)} or drop the larger k."
        )
    cmp.max_eval_prompts = check_int("max_eval_prompts", cmp.max_eval_prompts, low=1, optional=True)
    if training_args.eval_steps is not None:
        if float(training_args.eval_steps) != int(training_args.eval_steps) or training_args.eval_steps < 1:
            raise SystemExit(
                f"wmss compare: --eval_steps takes a whole number of steps >= 1, got {training_args.eval_steps}."
            )
        training_args.eval_steps = int(training_args.eval_steps)
    return seeds, ks, n


def _choose_arms(cmp: CompareArguments, training_args, overrides: dict[str, dict]) -> list[str]:
    """The arms of ``--arms`` (default: all), each but vanilla with a weak model; with ``--equal_time`` also
    :data:`EQUAL_TIME` (added to ``overrides``: vanilla's)."""
    known = [VANILLA, WMSS, *(a for a in overrides if a not in (VANILLA, WMSS))]
    arms = [a.strip() for a in cmp.arms.split(",") if a.strip()] if cmp.arms else list(known)
    unknown = [a for a in arms if a not in known]
    if unknown or len(set(arms)) != len(arms) or not arms:
        raise SystemExit(
            f"wmss compare: --arms {cmp.arms!r}: unknown or repeated arm(s) {unknown or arms}; the arms are "
            f"{', '.join(known)} (define more under `arms:` in the YAML)."
        )
    for arm in arms:
        o = {"weak_model_name_or_path": training_args.weak_model_name_or_path, **overrides[arm]}
        if arm != VANILLA and not (
            o["weak_model_name_or_path"] or o.get("peft_base_as_weak", training_args.peft_base_as_weak)
        ):
            raise SystemExit(
                f"wmss compare: arm {arm!r} has no weak model (set weak_model_name_or_path in the config or in its "
                "overrides), so it would be the vanilla arm again."
            )
    if cmp.equal_time:
        if VANILLA not in arms or len(arms) < 2:
            raise SystemExit("wmss compare: --equal_time needs the vanilla arm and a WMSS arm in --arms.")
        arms.append(EQUAL_TIME)
        overrides[EQUAL_TIME] = overrides[VANILLA]
    return arms


def _reward_funcs(data_args) -> list:
    """The ``--reward_funcs``, resolved (reward models are refused: the evaluation calls functions)."""
    from ...rewards import resolve_reward_funcs

    if data_args.reward_model_name_or_path:
        raise SystemExit(
            "wmss compare: reward models (reward_model_name_or_path) are not supported by its evaluation yet; use "
            "reward functions (--reward_funcs)."
        )
    if not data_args.reward_funcs:
        raise SystemExit("wmss compare: no reward: pass --reward_funcs (a registered name or a dotted path).")
    try:
        return resolve_reward_funcs(data_args.reward_funcs)
    except ValueError as e:
        raise SystemExit(f"wmss compare: {e}") from None


def _eval_set(cmp: CompareArguments, data_args, reward_funcs: list) -> tuple[object, str, str]:
    """The held-out prompts ``(dataset, source, split)``: ``--eval_dataset`` (split ``--eval_split``, else the test
    split, else its only split) or the config's test split, never the training split; columns checked."""
    from ...data_checks import check_dataset_columns
    from ..common import DataArguments, load_dataset_splits

    source = cmp.eval_dataset or data_args.dataset_name
    if source is None:
        raise SystemExit("wmss compare: no eval set: pass --eval_dataset, or a --dataset_name with a test split.")
    try:
        splits = load_dataset_splits(
            DataArguments(
                dataset_name=source,
                dataset_config=None if cmp.eval_dataset else data_args.dataset_config,
                dataset_train_split=data_args.dataset_train_split,
                dataset_test_split=data_args.dataset_test_split,
            )
        )
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"wmss compare: eval set: {e}") from None
    split = cmp.eval_split
    if split is None:
        split = data_args.dataset_test_split
        if split not in splits and cmp.eval_dataset and len(splits) == 1:
            split = next(iter(splits))
    if split not in splits:
        raise SystemExit(
            f"wmss compare: no eval set: {source!r} has no split {split!r} (it has {sorted(splits)}). Pass "
            "--eval_dataset (held-out prompts) or --eval_split."
        )
    if cmp.eval_dataset is None and split == data_args.dataset_train_split:
        raise SystemExit(
            f"wmss compare: the eval split {split!r} is the training split: pass held-out prompts (--eval_dataset)."
        )
    eval_set = splits[split]
    if cmp.max_eval_prompts is not None:
        eval_set = eval_set.select(range(min(cmp.max_eval_prompts, len(eval_set))))
    try:
        check_dataset_columns(
            eval_set, "grpo", name=f"eval set {source!r} (split {split!r})", reward_funcs=reward_funcs
        )
    except ValueError as e:
        raise SystemExit(f"wmss compare: {e}") from None
    if len(eval_set) == 0:
        raise SystemExit(f"wmss compare: the eval set {source!r} (split {split!r}) is empty.")
    return eval_set, source, split


def _check_safetensors(model_args, training_args, arms: list[str], overrides: dict[str, dict]) -> None:
    """The policy and every arm's weak model are safetensors checkpoints."""
    from ...weak import require_safetensors

    require_safetensors(model_args.model_name_or_path, "policy model")
    for arm in arms:
        require_safetensors(
            overrides[arm].get("weak_model_name_or_path", training_args.weak_model_name_or_path), f"weak model ({arm})"
        )
