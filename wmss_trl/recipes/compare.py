"""``wmss compare``: WMSS-GRPO against vanilla GRPO on your own ``wmss grpo`` config, over seeds, with pass@k.

    wmss compare --config run.yaml [--arms vanilla,wmss] [--seeds 0,1,2] [--eval_dataset ...] [--k 1,4,16]
                 [--output_dir runs/compare] [--equal_time] [--eval_steps N] [--accelerate_config zero3]

The YAML and flags are those of ``wmss grpo`` (TRL's parser), plus the ones of :class:`CompareArguments` and an
optional ``arms:`` mapping of extra arms, each a set of config overrides::

    arms:
      wmss_no_entropy: {entropy_weighted_advantages: false}
      wmss_kl_only: {num_weak_generations: 0, entropy_weighted_advantages: false}

Arms: ``vanilla`` is the config with every WMSS option at its default and no weak model: our ``WMSSGRPOTrainer``
then *is* TRL's ``GRPOTrainer`` (the drop-in promise), plus our fix of TRL's ``RepeatSampler`` epoch order on
resume, so a resumed vanilla run is exact. ``wmss`` is the config as given (it must name a weak model). With
``--equal_time``, ``vanilla_equal_time`` is vanilla given, per seed, the measured training time of the ``wmss`` arm
(or the first non-vanilla arm) in extra steps.

Each (arm, seed) is a separate ``wmss grpo`` process (under ``accelerate launch`` with ``--accelerate_config``)
with ``seed = data_seed = <seed>``: every arm starts from the same model and sees the same prompts in the same order
for the same number of steps. Its log goes to ``<output_dir>/runs/<arm>/seed<seed>/train.log``. This process then
evaluates, on the held-out prompts (``--eval_dataset``, default: the config's ``dataset_test_split``), the base model
once per seed and each arm's final model (and its ``checkpoint-N`` every ``--eval_steps`` N, saved for that), all
with the base config's sampling settings and reward functions and the seed's sampling seed
(:mod:`wmss_trl.evaluation`: greedy pass@1, pass@k, mean reward).

Output in ``output_dir``: ``compare.md`` (the table: per-arm means with 95% t CIs over seeds, paired same-seed
differences vs vanilla with CIs, step time and peak memory ratios vs vanilla measured in the same runs),
``compare.json`` (everything, with provenance), ``metrics_vs_step.png`` and ``pass_at_k.png``. Resumable: a finished
(arm, seed) is skipped, an interrupted one resumes from its last complete checkpoint; a re-run with another base
config (or eval settings, or library versions) is refused. A failing arm is reported by name (its log's tail), the
other arms' results are kept and written, and the command exits non-zero. Bad input (an unknown arm or override
field, k > n, no eval set, ...) is refused before any model loads.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import MISSING, dataclass, field, fields

import yaml


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


def wmss_field_defaults() -> dict:
    """The WMSS fields of ``WMSSGRPOConfig`` (those ``GRPOConfig`` lacks) at their defaults: the vanilla arm."""
    from trl import GRPOConfig

    from ..grpo import WMSSGRPOConfig

    base = {f.name for f in fields(GRPOConfig)}
    return {f.name: f.default for f in fields(WMSSGRPOConfig) if f.name not in base and f.default is not MISSING}


def valid_fields() -> set[str]:
    from trl import ModelConfig

    from ..grpo import WMSSGRPOConfig
    from .grpo import GRPODataArguments

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


def versions() -> dict:
    import accelerate
    import torch
    import transformers
    import trl

    from .. import __version__ as wmss_version

    return {
        "wmss_trl": wmss_version,
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }


def digest(record) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _differences(stored: dict, record: dict, prefix: str = "") -> list[str]:
    diff = []
    for key in sorted(set(stored) | set(record)):
        a, b = stored.get(key), record.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diff += _differences(a, b, f"{prefix}{key}.")
        elif json.dumps(a, default=str) != json.dumps(b, default=str):
            diff.append(f"{prefix}{key}: {a!r} there, {b!r} now")
    return diff


def check_record(path: str, record: dict, what: str) -> None:
    """Write ``record`` to ``path``, or, if ``path`` holds one, refuse a different one (naming what differs)."""
    if os.path.isfile(path):
        with open(path) as f:
            stored = json.load(f)
        diff = _differences(stored, json.loads(json.dumps(record, default=str)))
        if diff:
            raise SystemExit(
                f"wmss compare: {what} in {os.path.dirname(path)} was made with other settings ({'; '.join(diff[:8])}"
                f"{'; ...' if len(diff) > 8 else ''}). Results are never mixed: use another --output_dir, or delete "
                "that folder."
            )
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def _write_json(path: str, data) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


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


def parse(argv: list[str]) -> Plan:
    """Parse and check everything (flags, YAML, arms, k, seeds, the eval set and its columns, the reward functions,
    safetensors) without loading a model."""
    from trl import ModelConfig, TrlParser

    from ..checks import check_int
    from ..data_checks import check_dataset_columns
    from ..grpo import WMSSGRPOConfig
    from ..rewards import resolve_reward_funcs
    from ..weak import require_safetensors
    from .common import DataArguments, cpu_default_argv, load_dataset_splits
    from .grpo import GRPODataArguments

    argv = list(argv)
    yaml_config, definitions = {}, None
    path = _config_path(argv)
    if path is not None:
        if not os.path.isfile(path):
            raise SystemExit(f"wmss compare: --config {path!r} does not exist.")
        with open(path) as f:
            yaml_config = yaml.safe_load(f) or {}
        if not isinstance(yaml_config, dict):
            raise SystemExit(f"wmss compare: --config {path} must hold a YAML mapping.")
        definitions = yaml_config.pop("arms", None)
    valid = valid_fields()
    overrides = {VANILLA: wmss_field_defaults(), WMSS: {}, **check_arms(definitions, valid)}

    # TRL's parser on the YAML without `arms:` (a temporary copy) and the flags.
    i = argv.index("--config") if path is not None else None
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as tmp:
        yaml.safe_dump(yaml_config, tmp)
    try:
        rest = argv[:i] + ["--config", tmp.name] + argv[i + 2 :] if i is not None else argv
        parser = TrlParser((CompareArguments, GRPODataArguments, WMSSGRPOConfig, ModelConfig), prog="wmss compare")
        cmp, data_args, training_args, model_args = parser.parse_args_and_config(args=cpu_default_argv(rest))
    except ValueError as e:
        raise SystemExit(f"wmss compare: {e}") from None
    finally:
        os.unlink(tmp.name)
    own = {f.name for f in fields(CompareArguments)} | {"config", "eval_steps", "use_cpu"}
    flags = [(name, tokens) for name, tokens in _flag_chunks(argv) if name not in own]
    given = {name for name, _ in _flag_chunks(argv)} | set(yaml_config)
    output_dir = training_args.output_dir if "output_dir" in given else "runs/compare"

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

    # Rewards and the held-out set (before any model loads).
    if data_args.reward_model_name_or_path:
        raise SystemExit(
            "wmss compare: reward models (reward_model_name_or_path) are not supported by its evaluation yet; use "
            "reward functions (--reward_funcs)."
        )
    if not data_args.reward_funcs:
        raise SystemExit("wmss compare: no reward: pass --reward_funcs (a registered name or a dotted path).")
    try:
        reward_funcs = resolve_reward_funcs(data_args.reward_funcs)
    except ValueError as e:
        raise SystemExit(f"wmss compare: {e}") from None
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
    require_safetensors(model_args.model_name_or_path, "policy model")
    for arm in arms:
        require_safetensors(
            overrides[arm].get("weak_model_name_or_path", training_args.weak_model_name_or_path), f"weak model ({arm})"
        )
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


def run_config(plan: Plan, arm: str, seed: int, max_steps: int | None = None) -> tuple[dict, list[str]]:
    """The YAML and the flags of one ``wmss grpo`` run: the user's YAML and flags, the arm's overrides over both,
    then what the command sets per run."""
    o = dict(plan.overrides[arm])
    config = {**plan.yaml_config, **o}
    if max_steps is not None:
        config["max_steps"] = max_steps
    if plan.training_args.eval_steps is not None:
        config.update(save_strategy="steps", save_steps=plan.training_args.eval_steps, save_total_limit=None)
    per_run = set(o) | {"output_dir"}
    if max_steps is not None:
        per_run.add("max_steps")
    if plan.training_args.eval_steps is not None:
        per_run |= {"save_strategy", "save_steps", "save_total_limit"}
    flags = [t for name, tokens in plan.flags if name not in per_run for t in tokens]
    config.update(seed=seed, data_seed=seed)
    return config, flags


def run_dir(plan: Plan, arm: str, seed: int) -> str:
    return os.path.join(plan.output_dir, "runs", arm, f"seed{seed}")


def train(plan: Plan, arm: str, seed: int, config: dict, flags: list[str], out: str) -> dict:
    """One ``wmss grpo`` process (its log in ``out/train.log``); returns its timing and peak memory, or raises
    ``RuntimeError`` naming the arm and the log's tail."""
    from ..checkpoints import last_complete_checkpoint

    checkpoint = last_complete_checkpoint(out)
    start_step = int(checkpoint.rsplit("-", 1)[1]) if checkpoint else 0
    if checkpoint:
        config = {**config, "resume_from_checkpoint": True}
    config_file = os.path.join(out, "run.yaml")
    with open(config_file, "w") as f:
        yaml.safe_dump(config, f)
    cmd = [sys.executable, "-m", "wmss_trl.cli", "grpo", "--config", config_file, *flags, "--output_dir", out]
    if plan.cmp.accelerate_config:
        cmd += ["--accelerate_config", plan.cmp.accelerate_config]
        if plan.cmp.num_processes:
            cmd += ["--num_processes", str(plan.cmp.num_processes)]
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    env.setdefault("OMP_NUM_THREADS", "1")
    log = os.path.join(out, "train.log")
    t = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's rusage: peak RSS of the largest process of the run
        proc.returncode = code = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    if code != 0:
        with open(log) as f:
            tail = "".join(f.readlines()[-15:])
        raise RuntimeError(
            f"arm {arm!r} (seed {seed}) failed: `wmss grpo` exited with code {code}. Log: {log}\n{tail}"
        )
    state = _read_json(os.path.join(out, "trainer_state.json"))
    runtime = next(h["train_runtime"] for h in reversed(state["log_history"]) if "train_runtime" in h)
    steps = state["global_step"]
    return {
        "steps": steps,
        "start_step": start_step,
        "train_runtime": runtime,
        "step_seconds": runtime / max(steps - start_step, 1),
        "peak_rss_mib": usage.ru_maxrss / 1024,  # Linux: KiB
        "wall_seconds": wall,
    }


class Evaluator:
    """Loads models on this process and evaluates them with :func:`wmss_trl.evaluation.evaluate_model`."""

    def __init__(self, plan: Plan):
        from .common import load_tokenizer

        self.plan = plan
        self.tokenizer = load_tokenizer(plan.model_args.model_name_or_path, plan.training_args.trust_remote_code)
        if self.tokenizer.pad_token is None:  # as GRPOTrainer does
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def __call__(self, path: str, seed: int, step: int, desc: str) -> dict:
        import torch
        from transformers import AutoModelForCausalLM

        from ..evaluation import evaluate_model
        from ..weak import require_safetensors

        require_safetensors(path, "model to evaluate")
        args = self.plan.model_args
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=args.dtype, trust_remote_code=self.plan.training_args.trust_remote_code
        ).to("cuda" if torch.cuda.is_available() else "cpu")
        try:
            return evaluate_model(
                model,
                self.tokenizer,
                self.plan.eval_set,
                self.plan.reward_funcs,
                self.plan.training_args,
                num_samples=self.plan.num_samples,
                seed=seed,
                batch_size=self.plan.eval_info["batch_size"],
                pass_threshold=self.plan.eval_info["pass_threshold"],
                step=step,
                desc=desc,
            )
        finally:
            del model


def evaluate_run(plan: Plan, evaluator: Evaluator, out: str, seed: int, arm: str) -> list[dict]:
    """Evaluations of a finished run: every ``checkpoint-N`` with N a multiple of ``eval_steps``, then the final
    model (``out`` itself)."""
    from ..checkpoints import checkpoint_folders

    points = []
    every = plan.training_args.eval_steps
    if every:
        for folder in checkpoint_folders(out):
            step = int(folder.rsplit("-", 1)[1])
            if step % every == 0:
                points.append((step, folder))
    final = _read_json(os.path.join(out, "trainer_state.json"))["global_step"]
    points = [p for p in points if p[0] != final] + [(final, out)]
    return [
        {"step": step, "result": evaluator(path, seed, step, f"eval {arm} seed {seed} step {step}")}
        for step, path in points
    ]


def summarize_runs(plan: Plan, base: dict, runs: dict) -> dict:
    """Statistics over seeds: per arm and step, each metric's mean and 95% t CI; at the final step, paired
    same-seed differences vs vanilla; step time and peak memory ratios vs vanilla (same seed)."""
    from ..evaluation import mean_ci, metric_names, summarize

    names = metric_names(plan.ks)
    metrics = {
        arm: {
            seed: [{"step": e["step"], **summarize(e["result"], plan.ks)} for e in r["evals"]]
            for seed, r in by_seed.items()
        }
        for arm, by_seed in runs.items()
    }
    base_metrics = {seed: {"step": 0, **summarize(r, plan.ks)} for seed, r in base.items()}
    summary = {"metrics": names, "base": {m: mean_ci([b[m] for b in base_metrics.values()]) for m in names}}
    summary["arms"] = {}
    for arm, by_seed in metrics.items():
        steps = sorted({p["step"] for curve in by_seed.values() for p in curve})
        curve = [
            {
                "step": step,
                **{m: mean_ci([p[m] for c in by_seed.values() for p in c if p["step"] == step]) for m in names},
            }
            for step in steps
        ]
        final = {seed: c[-1] for seed, c in by_seed.items()}
        entry = {
            "seeds": sorted(by_seed),
            "steps": mean_ci([runs[arm][s]["train"]["steps"] for s in by_seed])["mean"],
            "curve": curve,
            "final": {m: mean_ci([f[m] for f in final.values()]) for m in names},
            "step_seconds": mean_ci([runs[arm][s]["train"]["step_seconds"] for s in by_seed]),
            "peak_rss_mib": mean_ci([runs[arm][s]["train"]["peak_rss_mib"] for s in by_seed]),
            "per_seed": {seed: {m: f[m] for m in names} for seed, f in final.items()},
        }
        vanilla = runs.get(VANILLA, {})
        paired = [s for s in by_seed if s in vanilla]
        if arm != VANILLA and paired:
            vfinal = {s: metrics[VANILLA][s][-1] for s in paired}
            entry["vs_vanilla"] = {
                "seeds": paired,
                **{m: mean_ci([final[s][m] - vfinal[s][m] for s in paired]) for m in names},
                "step_time_ratio": mean_ci(
                    [runs[arm][s]["train"]["step_seconds"] / vanilla[s]["train"]["step_seconds"] for s in paired]
                ),
                "peak_memory_ratio": mean_ci(
                    [runs[arm][s]["train"]["peak_rss_mib"] / vanilla[s]["train"]["peak_rss_mib"] for s in paired]
                ),
            }
        summary["arms"][arm] = entry
    return summary


def _fmt(stat: dict, scale: float = 100.0, digits: int = 1) -> str:
    if stat is None or stat.get("mean") is None:
        return "n/a"
    ci = "" if stat["ci"] is None else f" ± {scale * stat['ci']:.{digits}f}"
    return f"{scale * stat['mean']:.{digits}f}{ci}"


def markdown(plan: Plan, summary: dict, failures: list[str]) -> str:
    """The ``compare.md`` table."""
    names = summary["metrics"]
    info = plan.eval_info
    lines = [
        "# wmss compare",
        "",
        f"Held-out: {info['num_prompts']} prompts of {info['dataset']!r} (split {info['split']!r}), n = "
        f"{info['num_samples']} samples per prompt, a completion passes at total reward >= {info['pass_threshold']}. "
        f"Seeds {', '.join(map(str, plan.seeds))}; values in % (mean reward: x100) with 95% t CIs over seeds "
        "(none with one seed).",
        "",
        "`vanilla` = our WMSSGRPOTrainer with no weak model, i.e. TRL's GRPOTrainer (plus the fix of TRL's "
        "RepeatSampler epoch order on resume). Final step of each arm; `base` = the model before training.",
        "",
        "| arm | seeds | steps | " + " | ".join(names) + " | step s | peak RSS MiB |",
        "|---|---|---|" + "---|" * len(names) + "---|---|",
        "| base | " + str(len(summary["base"][names[0]]["values"])) + " | 0 | "
        + " | ".join(_fmt(summary["base"][m]) for m in names) + " | | |",
    ]  # fmt: skip
    for arm, e in summary["arms"].items():
        lines.append(
            f"| {arm} | {len(e['seeds'])} | {e['steps']:.0f} | "
            + " | ".join(_fmt(e["final"][m]) for m in names)
            + f" | {_fmt(e['step_seconds'], 1, 3)} | {_fmt(e['peak_rss_mib'], 1, 0)} |"
        )
    paired = {arm: e["vs_vanilla"] for arm, e in summary["arms"].items() if "vs_vanilla" in e}
    if paired:
        lines += [
            "",
            "Paired differences vs vanilla (same seed; points, mean reward x100), with 95% t CIs; step time and "
            "peak memory as ratios arm / vanilla measured in the same runs.",
            "",
            "| arm | paired seeds | " + " | ".join(f"Δ {m}" for m in names) + " | step time × | peak memory × |",
            "|---|---|" + "---|" * len(names) + "---|---|",
        ]
        for arm, d in paired.items():
            lines.append(
                f"| {arm} | {len(d['seeds'])} | "
                + " | ".join(_fmt(d[m]) for m in names)
                + f" | {_fmt(d['step_time_ratio'], 1, 2)} | {_fmt(d['peak_memory_ratio'], 1, 2)} |"
            )
    if failures:
        lines += ["", "Failed (not in the table):", "", *(f"- {f.splitlines()[0]}" for f in failures)]
    return "\n".join(lines) + "\n"


def plots(plan: Plan, summary: dict, folder: str) -> list[str]:
    """``metrics_vs_step.png`` (each metric vs step, one line per arm, 95% CI bands over seeds; step 0 = the base
    model) and ``pass_at_k.png`` (final pass@k vs k per arm, and the base model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = summary["metrics"]
    base = summary["base"]

    def band(ax, xs, stats, label, **kw):
        means = [100 * s["mean"] for s in stats]
        (line,) = ax.plot(xs, means, marker="o", ms=3, label=label, **kw)
        if all(s["ci"] is not None for s in stats):
            ci = [100 * s["ci"] for s in stats]
            ax.fill_between(xs, [m - c for m, c in zip(means, ci)], [m + c for m, c in zip(means, ci)],
                            color=line.get_color(), alpha=0.2)  # fmt: skip

    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, m in zip(axes.flat, names):
        for arm, e in summary["arms"].items():
            points = [{"step": 0, m: base[m]}] if base[m]["mean"] is not None else []
            points += [{"step": p["step"], m: p[m]} for p in e["curve"]]
            band(ax, [p["step"] for p in points], [p[m] for p in points], arm)
        unit = "x100" if m == "mean reward" else "%"
        ax.set_title(f"held-out {m} ({unit})")
        ax.set_xlabel("training step (0 = base model)")
        ax.set_ylabel(f"{m} ({unit})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle(
        f"wmss compare: held-out metrics vs step, mean over seeds {plan.seeds} with 95% t CI bands "
        f"({plan.eval_info['num_prompts']} prompts, n = {plan.num_samples})"
    )
    fig.tight_layout()
    paths = [os.path.join(folder, "metrics_vs_step.png")]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ks = plan.ks
    if base.get("pass@1", {}).get("mean") is not None:
        band(ax, ks, [base[f"pass@{k}"] for k in ks], "base model", color="grey", linestyle="--")
    for arm, e in summary["arms"].items():
        band(ax, ks, [e["final"][f"pass@{k}"] for k in ks], arm)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k (samples per prompt)")
    ax.set_ylabel("pass@k (%)")
    ax.set_title(f"pass@k vs k after training (n = {plan.num_samples}, 95% t CIs over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(folder, "pass_at_k.png"))
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    from tqdm.auto import tqdm

    plan = parse(sys.argv[1:] if argv is None else argv)
    out = plan.output_dir
    check_record(os.path.join(out, "compare_config.json"), plan.record, "a comparison")
    config_hash = digest(plan.record)
    print(
        f"wmss compare: arms {', '.join(plan.arms)} x seeds {', '.join(map(str, plan.seeds))}, eval on "
        f"{plan.eval_info['num_prompts']} prompts x n={plan.num_samples}, k={plan.ks}, in {out} (config {config_hash})",
        flush=True,
    )
    base, runs, failures = {}, {}, []
    evaluator = None
    order = [(seed, arm) for seed in plan.seeds for arm in plan.arms]
    bar = tqdm(order, desc="wmss compare", unit="run")
    for seed, arm in bar:
        bar.set_postfix_str(f"{arm} seed {seed}")
        folder = run_dir(plan, arm, seed)
        try:
            max_steps = None
            if arm == EQUAL_TIME:
                ref = WMSS if WMSS in plan.arms else next(a for a in plan.arms if a not in (VANILLA, EQUAL_TIME))
                if seed not in runs.get(VANILLA, {}) or seed not in runs.get(ref, {}):
                    raise RuntimeError(
                        f"arm {arm!r} (seed {seed}) skipped: it needs the {VANILLA} and {ref} runs of seed {seed}."
                    )
                vanilla_train = runs[VANILLA][seed]["train"]
                max_steps = max(1, round(runs[ref][seed]["train"]["train_runtime"] / vanilla_train["step_seconds"]))
            config, flags = run_config(plan, arm, seed, max_steps)
            made_by = {"config_hash": config_hash, "arm": arm, "run_config": config, "flags": flags}
            check_record(os.path.join(folder, "made_by.json"), made_by, f"run {arm} seed {seed}")
            result_file = os.path.join(folder, "result.json")
            if os.path.isfile(result_file):
                runs.setdefault(arm, {})[seed] = _read_json(result_file)
                tqdm.write(f"{arm} seed {seed}: finished earlier, skipped ({result_file})")
                continue
            if evaluator is None:
                evaluator = Evaluator(plan)
            if seed not in base:
                base_file = os.path.join(out, "base", f"seed{seed}.json")
                if os.path.isfile(base_file):
                    base[seed] = _read_json(base_file)["result"]
                else:
                    base[seed] = evaluator(plan.model_args.model_name_or_path, seed, 0, f"eval base seed {seed}")
                    os.makedirs(os.path.dirname(base_file), exist_ok=True)
                    _write_json(base_file, {"config_hash": config_hash, "result": base[seed]})
            train_file = os.path.join(folder, "train.json")
            if os.path.isfile(train_file):
                timing = _read_json(train_file)
            else:
                tqdm.write(f"{arm} seed {seed}: training (log: {os.path.join(folder, 'train.log')})")
                timing = train(plan, arm, seed, config, flags, folder)
                _write_json(train_file, timing)
            result = {"train": timing, "evals": evaluate_run(plan, evaluator, folder, seed, arm)}
            _write_json(result_file, result)
            runs.setdefault(arm, {})[seed] = result
            tqdm.write(f"{arm} seed {seed}: done ({timing['steps']} steps, {timing['step_seconds']:.2f} s/step)")
        except RuntimeError as e:
            failures.append(str(e))
            tqdm.write(f"FAILED: {e}")
    bar.close()
    for seed in plan.seeds:  # base evaluations of seeds whose runs were all finished earlier
        base_file = os.path.join(out, "base", f"seed{seed}.json")
        if seed not in base and os.path.isfile(base_file):
            base[seed] = _read_json(base_file)["result"]

    summary = summarize_runs(plan, base, runs) if runs else {"metrics": [], "base": {}, "arms": {}}
    report = {
        "provenance": {"config_hash": config_hash, **plan.record, "argv": sys.argv[1:] if argv is None else argv},
        "arms": {arm: plan.overrides[arm] for arm in plan.arms},
        "seeds": plan.seeds,
        "k": plan.ks,
        "summary": summary,
        "base": base,
        "runs": runs,
        "failures": failures,
    }
    _write_json(os.path.join(out, "compare.json"), report)
    if runs:
        with open(os.path.join(out, "compare.md"), "w") as f:
            f.write(markdown(plan, summary, failures))
        print("\n" + markdown(plan, summary, failures))
        if plan.cmp.plot:
            for path in plots(plan, summary, out):
                print(f"plot: {path}")
    print(f"results: {os.path.join(out, 'compare.md')}, {os.path.join(out, 'compare.json')}")
    if failures:
        names = sorted({f.split("'")[1] for f in failures})
        print(
            f"wmss compare: {len(failures)} run(s) failed: arm(s) {', '.join(names)} (see above); the finished "
            "runs are kept, and a re-run retries only the failed ones.",
            file=sys.stderr,
        )
        return 1
    return 0
