"""``wmss compare``'s own flags and the checks of its arms: the built-in arm names, the fields an arm may not
override, and the YAML's ``arms:`` mapping checked against the fields of ``wmss grpo``."""

from __future__ import annotations

import difflib
from dataclasses import MISSING, dataclass, field, fields


VANILLA, WMSS, EQUAL_TIME = "vanilla", "wmss", "vanilla_equal_time"
# Fields the command sets per run (or that would break "same model, same steps"): an arm may not override them.
RUN_FIELDS = {
    "output_dir": "set per run (<output_dir>/runs/<arm>/seed<seed>)",
    "seed": "set per run from --seeds",
    "data_seed": "set per run from --seeds",
    "max_steps": "every arm trains the same steps (use --equal_time for an equal-wall-time vanilla arm)",
    "num_train_epochs": "every arm trains the same steps",
    "model_name_or_path": "every arm starts from the same model",
    "resume_from_checkpoint": "a re-run resumes each unfinished run by itself",
    "vanilla": "the vanilla arm is built in (our trainer with no weak model: TRL's GRPOTrainer)",
}
RESULTS = ("compare.md", "compare.json", "metrics_vs_step.png", "pass_at_k.png")


@dataclass
class CompareArguments:
    """The flags of ``wmss compare`` beyond those of ``wmss grpo``. It also reads two ``wmss grpo`` fields:
    ``output_dir`` (where everything goes; default ``runs/compare``), ``eval_steps`` (also evaluate the
    ``checkpoint-N`` every N steps) and ``per_device_eval_batch_size`` (prompts per evaluation ``generate`` call)."""

    arms: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated arms to run: vanilla, wmss and the names of the YAML's `arms:` mapping "
            "(default: all of them)."
        },
    )
    seeds: str = field(default="0,1,2", metadata={"help": "Comma-separated seeds (each run: seed = data_seed)."})
    k: str = field(default="1,4,16", metadata={"help": "Comma-separated k of pass@k."})
    num_eval_samples: int | None = field(
        default=None, metadata={"help": "Samples per held-out prompt, n >= max(k) (default: max(k))."}
    )
    eval_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Held-out prompts (any --dataset_name form). Default: the config's dataset, split "
            "dataset_test_split."
        },
    )
    eval_split: str | None = field(
        default=None,
        metadata={"help": "Split of --eval_dataset (default: dataset_test_split if it has one, else its only split)."},
    )
    max_eval_prompts: int | None = field(
        default=None, metadata={"help": "Evaluate on the first N held-out prompts only (default: all)."}
    )
    pass_threshold: float = field(
        default=1.0,
        metadata={"help": "A completion passes when its total (weighted) reward is >= this (1.0: a 0/1 verifier)."},
    )
    equal_time: bool = field(
        default=False,
        metadata={
            "help": "Also run vanilla_equal_time: vanilla given the wmss arm's measured training time in steps."
        },
    )
    accelerate_config: str | None = field(
        default=None,
        metadata={"help": "Run each arm under `accelerate launch` with this config (ddp, zero2, zero3, PATH)."},
    )
    num_processes: int | None = field(default=None, metadata={"help": "With --accelerate_config: processes per run."})
    plot: bool = field(default=True, metadata={"help": "Write the PNG plots (needs matplotlib)."})


def wmss_field_defaults() -> dict:
    """The WMSS fields of ``WMSSGRPOConfig`` (those ``GRPOConfig`` lacks) at their defaults: the vanilla arm."""
    from trl import GRPOConfig

    from ...grpo import WMSSGRPOConfig

    base = {f.name for f in fields(GRPOConfig)}
    return {f.name: f.default for f in fields(WMSSGRPOConfig) if f.name not in base and f.default is not MISSING}


def valid_fields() -> set[str]:
    from trl import ModelConfig

    from ...grpo import WMSSGRPOConfig
    from ..grpo import GRPODataArguments

    return {f.name for cls in (GRPODataArguments, WMSSGRPOConfig, ModelConfig) for f in fields(cls)}


def check_arms(definitions, valid: set[str]) -> dict[str, dict]:
    """The YAML's ``arms:`` mapping, checked: ``{name: {field: value}}`` with known fields only, none of
    :data:`RUN_FIELDS`, and no built-in arm name."""
    if definitions is None:
        return {}
    if not isinstance(definitions, dict) or not all(isinstance(v, dict) or v is None for v in definitions.values()):
        raise SystemExit(
            "wmss compare: `arms:` in the YAML must map arm names to config overrides, e.g. "
            "`arms: {wmss_no_entropy: {entropy_weighted_advantages: false}}`."
        )
    wmss = sorted(wmss_field_defaults())
    out = {}
    for name, overrides in definitions.items():
        name, overrides = str(name), overrides or {}
        if name in (VANILLA, WMSS, EQUAL_TIME) or "," in name or "/" in name:
            raise SystemExit(
                f"wmss compare: arm name {name!r} is reserved or invalid ({VANILLA}, {WMSS} and {EQUAL_TIME} are "
                "built in; a name has no ',' or '/'). Rename it in `arms:`."
            )
        for key in overrides:
            if key in RUN_FIELDS:
                raise SystemExit(f"wmss compare: arm {name!r} overrides {key!r}, which it may not: {RUN_FIELDS[key]}.")
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=3)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise SystemExit(
                    f"wmss compare: arm {name!r} overrides unknown field {key!r}.{hint} An arm overrides `wmss grpo` "
                    f"fields: the WMSS ones ({', '.join(wmss)}) or any TRL GRPOConfig / ModelConfig field "
                    "(`wmss grpo --help` lists them all)."
                )
        out[name] = dict(overrides)
    return out
